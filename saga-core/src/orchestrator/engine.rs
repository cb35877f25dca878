//! The orchestrator's loops: results applied in batches, and due timers fired.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{OrchestratorConfig, SettledHook};
use crate::batch::one_by_one;
use crate::decide::{Input, Verdict};
use crate::error::Error;
use crate::message::Reply;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{Applied, OutboxRecord, Store};
use crate::transport::Delivery;

const BLOCKED_TIMER_RETRY: Duration = Duration::from_millis(50);

pub(super) struct Engine {
    pub(super) store: Arc<dyn Store>,
    pub(super) registry: Registry,
    pub(super) config: OrchestratorConfig,
    pub(super) relay: mpsc::UnboundedSender<Vec<OutboxRecord>>,
    pub(super) wake: mpsc::UnboundedSender<DateTime<Utc>>,
    pub(super) on_settled: Option<SettledHook>,
    pub(super) metrics: Metrics,
}

impl Engine {
    fn hand_over(&self, applied: &mut [Applied]) {
        let mut records = Vec::new();
        for a in applied.iter_mut() {
            if let Some(saga) = &a.saga {
                self.metrics.retries(saga, a.retries);
            }
            if let (true, Some(status)) = (a.settled, a.status) {
                if status == crate::SagaStatus::Stuck {
                    error!(
                        saga.id = %a.saga_id,
                        saga.name = a.saga.as_deref().unwrap_or(""),
                        reason = a.reason.as_deref().unwrap_or(""),
                        "saga stuck: it waits for an operator (saga show / retry / resolve)"
                    );
                }
                if let Some(saga) = &a.saga {
                    self.metrics.settled(saga, status);
                    #[cfg(feature = "otel")]
                    crate::otel::settled(a.saga_id, saga, status);
                }
                if let Some(hook) = &self.on_settled {
                    hook(a.saga_id, status);
                }
            }
            records.append(&mut a.outbox);
            if let Some(at) = a.wake_at {
                let _ = self.wake.send(at);
            }
        }
        if !records.is_empty() {
            let _ = self.relay.send(records);
        }
    }

    /// Applies results in batches: one transaction per batch, acks after the commit; up to
    /// `concurrent_batches` at once. On shutdown it takes no new batch and finishes the
    /// batches it holds.
    pub(super) async fn consume(
        self: Arc<Self>,
        results: futures_util::stream::BoxStream<'static, Delivery>,
        shutdown: CancellationToken,
    ) {
        let limit = self.config.concurrent_batches.max(1);
        results
            .ready_chunks(self.config.batch_size)
            .take_until(shutdown.cancelled_owned())
            .for_each_concurrent(limit, |chunk| self.apply_results(chunk))
            .await;
    }

    async fn apply_results(&self, chunk: Vec<Delivery>) {
        let mut deliveries = Vec::with_capacity(chunk.len());
        let mut batch = Vec::with_capacity(chunk.len());
        for delivery in chunk {
            if let Some(why) =
                crate::message::oversize(&delivery.message.body, self.config.max_message_bytes)
            {
                warn!(reason = %why, "dead-lettering an oversized result");
                self.metrics.dead_lettered("results");
                let _ = delivery.dead_letter(&why).await;
                continue;
            }
            match Reply::from_message(&delivery.message) {
                Ok(reply) => {
                    batch.push((reply.saga_id, Input::Reply(reply)));
                    deliveries.push(delivery);
                }
                Err(malformed) => {
                    warn!(reason = %malformed, "dead-lettering a malformed result");
                    self.metrics.dead_lettered("results");
                    if let Err(e) = delivery.dead_letter(&malformed.0).await {
                        warn!(error = %e, "dead-lettering failed");
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.apply_parsed(deliveries, batch).await;
        }
    }

    /// Applies a batch in one transaction. If it fails for a reason that will not pass, each
    /// result is applied on its own, so one saga whose log cannot be applied (a definition
    /// changed without a new version, say) is dead-lettered with the reason and the others go
    /// on. A transient failure (the database restarting) hands the results back after a delay.
    async fn apply_parsed(&self, deliveries: Vec<Delivery>, batch: Vec<(uuid::Uuid, Input)>) {
        let e = match self.store.apply(&self.registry, batch.clone()).await {
            Ok(applied) => return self.settle(deliveries, &batch, applied).await,
            Err(e) => e,
        };
        if e.is_transient() || batch.len() == 1 {
            return self.give_back(deliveries, &batch, e).await;
        }
        warn!(error = %e, count = batch.len(), "a batch failed; applying its results one by one");
        let results = one_by_one(batch.iter().cloned(), |item| {
            self.store.apply(&self.registry, vec![item])
        })
        .await;
        // Results that failed for a reason that may pass go back together, after one delay.
        let (mut back, mut back_items, mut why) = (Vec::new(), Vec::new(), None);
        for ((delivery, item), result) in deliveries.into_iter().zip(batch).zip(results) {
            match result {
                Ok(applied) => self.settle(vec![delivery], &[item], applied).await,
                Err(e) if e.is_transient() || e.is_missing_key() => {
                    back.push(delivery);
                    back_items.push(item);
                    why = Some(e);
                }
                Err(e) => self.give_back(vec![delivery], &[item], e).await,
            }
        }
        if let Some(e) = why {
            self.give_back(back, &back_items, e).await;
        }
    }

    /// Hands back results that could not be applied: after a delay if the failure may pass
    /// (the database restarting, a payload key not rolled out here yet), else to the dead
    /// letters with the reason.
    async fn give_back(&self, deliveries: Vec<Delivery>, batch: &[(uuid::Uuid, Input)], e: Error) {
        if e.is_transient() || e.is_missing_key() {
            error!(error = %e, count = deliveries.len(), "applying results failed; handing them back");
            tokio::time::sleep(self.config.defer_delay).await;
            for delivery in deliveries {
                let _ = delivery.requeue().await;
            }
            return;
        }
        let reason = format!("cannot apply this result: {e}");
        for (delivery, (saga_id, _)) in deliveries.into_iter().zip(batch) {
            error!(saga.id = %saga_id, %reason, "dead-lettering a result");
            self.metrics.dead_lettered("results");
            let _ = delivery.dead_letter(&reason).await;
        }
    }

    /// Settles the deliveries of applied results by their verdicts, after handing the
    /// commands and timers they produced to the relay and the timer loop.
    async fn settle(
        &self,
        deliveries: Vec<Delivery>,
        batch: &[(uuid::Uuid, Input)],
        mut applied: Vec<Applied>,
    ) {
        self.hand_over(&mut applied);
        // Settled together: the acks go out in one burst, not one round trip each.
        let mut settles = Vec::with_capacity(deliveries.len());
        for ((delivery, (saga_id, _)), a) in deliveries.into_iter().zip(batch).zip(applied) {
            self.metrics.result(match &a.verdict {
                Verdict::Applied => "applied",
                Verdict::Ignored(_) => "ignored",
                Verdict::Rejected(_) => "rejected",
                Verdict::Deferred(_) => "deferred",
            });
            if matches!(a.verdict, Verdict::Rejected(_)) {
                self.metrics.dead_lettered("results");
            }
            let saga_id = *saga_id;
            let defer_delay = self.config.defer_delay;
            settles.push(async move {
                let settled = match a.verdict {
                    Verdict::Applied => delivery.ack().await,
                    Verdict::Ignored(reason) => {
                        info!(saga.id = %saga_id, %reason, "dropping a result");
                        delivery.ack().await
                    }
                    Verdict::Rejected(reason) => {
                        warn!(saga.id = %saga_id, %reason, "dead-lettering a result");
                        delivery.dead_letter(&reason).await
                    }
                    Verdict::Deferred(reason) => {
                        error!(saga.id = %saga_id, %reason, "cannot apply a result here; handing it back");
                        tokio::spawn(async move {
                            tokio::time::sleep(defer_delay).await;
                            let _ = delivery.requeue().await;
                        });
                        Ok(())
                    }
                };
                if let Err(e) = settled {
                    warn!(saga.id = %saga_id, error = %e, "settling a result failed; the broker redelivers it unless the ack still reaches it");
                }
            });
        }
        futures_util::future::join_all(settles).await;
    }

    /// Fires due timers; sleeps until the next one is due, a new one is set, or the poll.
    pub(super) async fn fire_timers(
        self: Arc<Self>,
        mut wake: mpsc::UnboundedReceiver<DateTime<Utc>>,
        shutdown: CancellationToken,
    ) {
        // Signals and cancel requests queued by clients wake the loop; the poll is the fallback.
        let mut queued = match self.store.timer_notifications().await {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "timer notifications unavailable; relying on polling");
                futures_util::stream::pending().boxed()
            }
        };
        loop {
            let mut next = self.store.now() + self.config.poll_interval;
            match self
                .store
                .fire_due_timers(&self.registry, self.config.batch_size)
                .await
            {
                Ok(mut applied) => {
                    let fired = applied.len();
                    self.hand_over(&mut applied);
                    if fired > 0 {
                        self.metrics.timers_fired(fired);
                        debug!(fired, "fired timers");
                        continue;
                    }
                    match self.store.next_timer_due(&self.registry).await {
                        // A due timer that did not fire is held by another process (or its
                        // definition is unknown here): look again shortly, not in a busy loop.
                        Ok(Some(due)) => {
                            next = next.min(due.max(self.store.now() + BLOCKED_TIMER_RETRY))
                        }
                        Ok(None) => {}
                        Err(e) => warn!(error = %e, "reading the next timer failed"),
                    }
                }
                Err(e) => warn!(error = %e, "firing timers failed"),
            }
            loop {
                let sleep = (next - self.store.now()).to_std().unwrap_or_default();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(sleep) => break,
                    Some(()) = queued.next() => break,
                    Some(at) = wake.recv() => {
                        if at < next {
                            next = at;
                        }
                    }
                }
            }
        }
    }
}
