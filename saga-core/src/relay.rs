//! The outbox relay: publishes committed outbox rows, then deletes them.
//!
//! Rows come two ways: handed over in memory right after the commit that wrote them (fast
//! path: rows written by results and timers, and by starts through the orchestrator's own
//! store), and claimed by a poller once their lease has lapsed or when nobody holds them
//! (rows written by starts elsewhere, or left behind by a crash). A row is deleted only after
//! the broker confirmed it, so every logged command is published at least once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::decide::{Input, Verdict};
use crate::error::Result;
use crate::message::{Command, Envelope, Outcome, Reply, oversize};
use crate::registry::Registry;
use crate::store::{OutboxRecord, OutboxStore, SagaStore};
use crate::transport::{PublishError, Transport};

/// Settings of the relay.
#[derive(Debug, Clone)]
pub(crate) struct RelayConfig {
    pub(crate) max_message_bytes: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) batch: usize,
    pub(crate) lease: Duration,
}

pub(crate) struct Relay {
    /// Where the rows to publish are claimed and deleted.
    pub(crate) outbox: Arc<dyn OutboxStore>,
    /// Where the failures of commands that cannot be delivered are applied.
    pub(crate) store: Arc<dyn SagaStore>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) registry: Registry,
    pub(crate) config: RelayConfig,
    /// Failures of commands returned late, not yet confirmed by the broker.
    pub(crate) late_failures: std::sync::Mutex<Vec<Envelope>>,
}

/// The most failures of late-returned commands the relay keeps to publish again.
const LATE_FAILURES_KEPT: usize = 1024;

/// Deletes published rows off the relay's path: the next publish does not wait for the
/// previous delete, and the ids that arrive meanwhile go in one statement. The rows stay
/// claimed until deleted, so the poller does not publish them again; if the process dies
/// first, they are published again after their lease and the duplicates are dropped.
async fn delete_published(
    store: Arc<dyn OutboxStore>,
    mut published: mpsc::UnboundedReceiver<Vec<i64>>,
) {
    while let Some(mut ids) = published.recv().await {
        while let Ok(more) = published.try_recv() {
            ids.extend(more);
        }
        if let Err(e) = store.delete_outbox(&ids).await {
            // The rows are published; if they are published again, the results are duplicates.
            warn!(error = %e, count = ids.len(), "deleting published outbox rows failed");
        }
    }
}

impl Relay {
    /// Runs until `shutdown`; then publishes what was already handed over and returns.
    pub(crate) async fn run(
        self,
        mut handed: mpsc::UnboundedReceiver<Vec<OutboxRecord>>,
        shutdown: CancellationToken,
    ) {
        let mut notifications = match self.outbox.outbox_notifications().await {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "outbox notifications unavailable; relying on polling");
                futures_util::stream::pending().boxed()
            }
        };
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (published, to_delete) = mpsc::unbounded_channel();
        let deleter = tokio::spawn(delete_published(Arc::clone(&self.outbox), to_delete));
        loop {
            // Unbiased: under steady hand-overs the poller still gets its turn (rows of starts
            // made elsewhere, unconfirmed rows, a crashed peer's rows).
            tokio::select! {
                records = handed.recv() => match records {
                    Some(mut records) => {
                        while let Ok(more) = handed.try_recv() {
                            records.extend(more);
                        }
                        self.publish(records, &published).await;
                    }
                    None => break,
                },
                _ = shutdown.cancelled() => break,
                Some(()) = notifications.next() => self.poll(&published).await,
                _ = poll.tick() => self.poll(&published).await,
            }
            self.fail_late_returns().await;
        }
        handed.close();
        while let Some(records) = handed.recv().await {
            self.publish(records, &published).await;
        }
        self.fail_late_returns().await;
        // What was published is deleted before the relay returns.
        drop(published);
        if let Err(e) = deleter.await {
            warn!(error = %e, "the outbox deleter failed");
        }
    }

    /// Publishes rows that nobody holds, until none are left.
    async fn poll(&self, published: &mpsc::UnboundedSender<Vec<i64>>) {
        loop {
            match self
                .outbox
                .claim_outbox(self.config.batch, self.config.lease)
                .await
            {
                Ok(records) if records.is_empty() => return,
                Ok(records) => {
                    debug!(count = records.len(), "publishing unclaimed outbox rows");
                    let full = records.len() == self.config.batch;
                    self.publish(records, published).await;
                    if !full {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "claiming outbox rows failed");
                    return;
                }
            }
        }
    }

    /// Publishes `records`; hands those confirmed to `published` for deletion, fails the steps
    /// of unroutable commands, and leaves the rest for the poller once their lease lapses.
    async fn publish(
        &self,
        records: Vec<OutboxRecord>,
        published: &mpsc::UnboundedSender<Vec<i64>>,
    ) {
        if records.is_empty() {
            return;
        }
        let ids: HashMap<uuid::Uuid, i64> = records
            .iter()
            .map(|r| (r.envelope.message.id, r.id))
            .collect();
        let (oversized, envelopes): (Vec<Envelope>, Vec<Envelope>) = records
            .into_iter()
            .map(|r| r.envelope)
            .partition(|e| oversize(&e.message.body, self.config.max_message_bytes).is_some());
        if !oversized.is_empty() {
            match self.fail_undeliverable(&oversized, published).await {
                Ok(handled) => {
                    let _ = published.send(handled.iter().map(|id| ids[id]).collect());
                }
                Err(e) => warn!(error = %e, "failing oversized commands failed; will retry"),
            }
        }
        if envelopes.is_empty() {
            return;
        }
        let (done, unroutable) = match self.transport.publish(envelopes.clone()).await {
            Ok(()) => (envelopes, Vec::new()),
            Err(PublishError::Unroutable(unroutable)) => {
                let bad: Vec<_> = unroutable.iter().map(|e| e.message.id).collect();
                let done = envelopes
                    .into_iter()
                    .filter(|e| !bad.contains(&e.message.id))
                    .collect();
                (done, unroutable)
            }
            Err(PublishError::NotConfirmed {
                reason,
                envelopes: unconfirmed,
                unroutable,
            }) => {
                warn!(%reason, count = unconfirmed.len(), "publish not confirmed; the poller will retry");
                let pending: Vec<_> = unconfirmed
                    .iter()
                    .chain(&unroutable)
                    .map(|e| e.message.id)
                    .collect();
                let done = envelopes
                    .into_iter()
                    .filter(|e| !pending.contains(&e.message.id))
                    .collect();
                (done, unroutable)
            }
        };
        let mut confirmed: Vec<i64> = done.iter().map(|e| ids[&e.message.id]).collect();
        if !unroutable.is_empty() {
            match self.fail_undeliverable(&unroutable, published).await {
                Ok(handled) => confirmed.extend(handled.iter().map(|id| ids[id])),
                Err(e) => warn!(error = %e, "failing unroutable commands failed; will retry"),
            }
        }
        if !confirmed.is_empty() {
            let _ = published.send(confirmed);
        }
    }

    /// Fails the steps of commands the transport learned were unroutable only after their
    /// publish had finished. Their rows may be gone, so each failure is sent as a result to
    /// the orchestrators (durable in the broker, applied by whichever orchestrator knows the
    /// saga's definition, a duplicate dropped); failures the broker did not confirm are kept
    /// and sent again on the loop's next turn, or before the relay returns.
    async fn fail_late_returns(&self) {
        let late = self.transport.take_late_returns();
        let mut failures = std::mem::take(&mut *self.late_failures());
        if late.is_empty() && failures.is_empty() {
            return;
        }
        for envelope in late {
            let Ok(command) = Command::from_message(&envelope.message) else {
                warn!(destination = %envelope.destination.encode(), "dropping a non-command message returned late");
                continue;
            };
            let error = undeliverable(&command, &envelope, self.config.max_message_bytes);
            warn!(saga.id = %command.saga_id, step = command.step, %error, "command returned late");
            let failure = Outcome::Failure {
                error,
                retryable: false,
            };
            failures.push(Reply::to(&command, failure).to_envelope());
        }
        if let Err(e) = self.transport.publish(failures.clone()).await {
            warn!(error = %e, count = failures.len(), "sending the failures of commands returned late failed; will retry");
            let mut kept = self.late_failures();
            kept.extend(failures);
            let excess = kept.len().saturating_sub(LATE_FAILURES_KEPT);
            if excess > 0 {
                kept.drain(..excess);
                warn!(
                    dropped = excess,
                    "dropping the oldest failures of commands returned late"
                );
            }
        }
    }

    fn late_failures(&self) -> std::sync::MutexGuard<'_, Vec<Envelope>> {
        self.late_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A command that cannot be delivered (no queue for its service, or too large) fails its
    /// step for good. Returns the message ids whose failure was recorded (or that need none).
    async fn fail_undeliverable(
        &self,
        unroutable: &[Envelope],
        published: &mpsc::UnboundedSender<Vec<i64>>,
    ) -> Result<Vec<uuid::Uuid>> {
        let mut handled = Vec::with_capacity(unroutable.len());
        let mut batch = Vec::with_capacity(unroutable.len());
        let mut pending = Vec::with_capacity(unroutable.len());
        for envelope in unroutable {
            let Ok(command) = Command::from_message(&envelope.message) else {
                warn!(destination = %envelope.destination.encode(), "dropping an unroutable non-command message");
                handled.push(envelope.message.id);
                continue;
            };
            let error = undeliverable(&command, envelope, self.config.max_message_bytes);
            warn!(saga.id = %command.saga_id, step = command.step, %error, "unroutable command");
            let reply = Reply::to(
                &command,
                Outcome::Failure {
                    error,
                    retryable: false,
                },
            );
            batch.push((command.saga_id, Input::Reply(reply)));
            pending.push(envelope.message.id);
        }
        if batch.is_empty() {
            return Ok(handled);
        }
        let applied = self.store.apply(&self.registry, batch).await?;
        let mut follow_up = Vec::new();
        for (id, a) in pending.into_iter().zip(applied) {
            // A deferred failure (unknown definition here) keeps its row for another process.
            if !matches!(a.verdict, Verdict::Deferred(_)) {
                handled.push(id);
            }
            follow_up.extend(a.outbox);
        }
        Box::pin(self.publish(follow_up, published)).await;
        Ok(handled)
    }
}

/// Why `command` (carried by `envelope`) cannot be delivered: too large, or no queue.
fn undeliverable(command: &Command, envelope: &Envelope, limit: usize) -> String {
    match oversize(&envelope.message.body, limit) {
        Some(why) => format!("command `{}` cannot be sent: {why}", command.command),
        None => format!(
            "no queue is bound for service `{}`; command `{}` cannot be delivered",
            command.service, command.command
        ),
    }
}
