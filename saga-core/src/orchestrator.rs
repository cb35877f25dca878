//! The orchestrator: consumes results, fires timers, and relays the outbox.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::decide::{Input, Verdict};
use crate::definition::SagaDefinition;
use crate::error::Result;
use crate::message::{Destination, Reply};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::relay::{Relay, RelayConfig};
use crate::store::{Applied, LocalRelay, OutboxRecord, Store};
use crate::transport::{Delivery, Transport};

/// Drives saga instances: applies results and due timers to the log, and publishes commands.
///
/// Any number of orchestrators may share one database and one results queue.
///
/// ```no_run
/// # async fn demo(def: saga_core::SagaDefinition<u32>) -> saga_core::Result<()> {
/// use std::sync::Arc;
/// use saga_core::{InProcessTransport, MemoryStore, Orchestrator};
/// use tokio_util::sync::CancellationToken;
///
/// let orchestrator = Orchestrator::builder(Arc::new(MemoryStore::new()), Arc::new(InProcessTransport::new()))
///     .register(&def)
///     .build();
/// orchestrator.run(CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct Orchestrator {
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    registry: Registry,
    config: OrchestratorConfig,
    on_settled: Option<SettledHook>,
    metrics: Metrics,
}

/// Called with a saga's id and status when this orchestrator moves it out of running or
/// compensating (see [`OrchestratorBuilder::on_settled`]).
pub type SettledHook = Arc<dyn Fn(uuid::Uuid, crate::SagaStatus) + Send + Sync>;

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Tuning of an [`Orchestrator`].
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// The largest message accepted or sent; a larger command fails its step, a larger result
    /// is dead-lettered.
    pub max_message_bytes: usize,
    /// Most results applied in one transaction.
    pub batch_size: usize,
    /// Batches applied at once, each in its own transaction. Results of one saga still apply
    /// one at a time: each transaction locks the saga's row, as two orchestrators would.
    pub concurrent_batches: usize,
    /// How often the outbox and timers are polled when nothing wakes them.
    pub poll_interval: Duration,
    /// How long outbox rows claimed by the poller stay claimed.
    pub outbox_lease: Duration,
    /// How long to wait before handing back a result this process cannot apply.
    pub defer_delay: Duration,
}

impl OrchestratorConfig {
    /// Default batch size.
    pub const DEFAULT_BATCH_SIZE: usize = 128;
    /// Default number of batches applied at once.
    pub const DEFAULT_CONCURRENT_BATCHES: usize = 2;
    /// Default poll interval.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
    /// Default outbox lease for polled rows.
    pub const DEFAULT_OUTBOX_LEASE: Duration = Duration::from_secs(10);
    /// Default delay before handing back a deferred result.
    pub const DEFAULT_DEFER_DELAY: Duration = Duration::from_secs(1);
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: crate::message::DEFAULT_MAX_MESSAGE_BYTES,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            concurrent_batches: Self::DEFAULT_CONCURRENT_BATCHES,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            outbox_lease: Self::DEFAULT_OUTBOX_LEASE,
            defer_delay: Self::DEFAULT_DEFER_DELAY,
        }
    }
}

/// Builds an [`Orchestrator`].
pub struct OrchestratorBuilder {
    inner: Orchestrator,
}

impl std::fmt::Debug for OrchestratorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl OrchestratorBuilder {
    /// Registers a definition this orchestrator can run.
    pub fn register<I>(mut self, definition: &SagaDefinition<I>) -> Self {
        self.inner.registry.register(definition);
        self
    }

    /// Replaces the registry.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.inner.registry = registry;
        self
    }

    /// Calls `hook` right after the commit that settles a saga here (completed, compensated,
    /// cancelled or stuck): for metrics, benchmarks and tests. It must not block.
    pub fn on_settled(
        mut self,
        hook: impl Fn(uuid::Uuid, crate::SagaStatus) + Send + Sync + 'static,
    ) -> Self {
        self.inner.on_settled = Some(Arc::new(hook));
        self
    }

    /// Counts into `metrics` (shared with the process's workers and its metrics endpoint).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.inner.metrics = metrics;
        self
    }

    /// Replaces the tuning.
    pub fn config(mut self, config: OrchestratorConfig) -> Self {
        self.inner.config = config;
        self
    }

    /// Builds the orchestrator; no I/O.
    pub fn build(self) -> Orchestrator {
        self.inner
    }
}

impl Orchestrator {
    /// Starts building an orchestrator on `store` and `transport`.
    pub fn builder(store: Arc<dyn Store>, transport: Arc<dyn Transport>) -> OrchestratorBuilder {
        OrchestratorBuilder {
            inner: Orchestrator {
                store,
                transport,
                registry: Registry::new(),
                config: OrchestratorConfig::default(),
                on_settled: None,
                metrics: Metrics::new(),
            },
        }
    }

    /// Runs until `shutdown` is cancelled: stops consuming, publishes what is committed, and
    /// returns. Fails if the queues cannot be declared or consumed at start, or if one of its
    /// loops (results, timers, relay) ends before `shutdown` (a panic, a stream that closed):
    /// the others are stopped then, so that the process can exit and be restarted rather than
    /// half run.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut sources = vec![Destination::Results];
        sources.extend(
            self.registry
                .services()
                .into_iter()
                .map(Destination::Service),
        );
        self.transport.declare(&sources).await?;
        let results = self.transport.consume(&Destination::Results).await?;
        info!(sagas = self.registry.iter().count(), "orchestrator running");

        let (relay_tx, relay_rx) = mpsc::unbounded_channel();
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let relay = Relay {
            store: Arc::clone(&self.store),
            transport: Arc::clone(&self.transport),
            registry: self.registry.clone(),
            config: RelayConfig {
                max_message_bytes: self.config.max_message_bytes,
                poll_interval: self.config.poll_interval,
                batch: self.config.batch_size,
                lease: self.config.outbox_lease,
            },
            late_failures: std::sync::Mutex::new(Vec::new()),
        };
        // The relay stops after the loops that feed it, so what they committed is published.
        let relay_stop = CancellationToken::new();
        let mut relay = tokio::spawn(relay.run(relay_rx, relay_stop.clone()));
        // Sagas started through this store in this process hand their first commands to the
        // relay as well, until the loops stop (or this future is dropped).
        let attached = Attached::new(&self.store, LocalRelay::new(relay_tx.clone()));
        let watcher = crate::watch::QueueWatcher::new(
            Arc::clone(&self.transport),
            &self.registry,
            self.metrics.clone(),
        );
        let engine = Arc::new(Engine {
            store: self.store,
            registry: self.registry,
            config: self.config,
            relay: relay_tx,
            wake: wake_tx,
            on_settled: self.on_settled,
            metrics: self.metrics,
        });
        let stop = shutdown.child_token();
        let mut consume = tokio::spawn(Arc::clone(&engine).consume(results, stop.clone()));
        let mut timers = tokio::spawn(Arc::clone(&engine).fire_timers(wake_rx, stop.clone()));
        let watch = tokio::spawn(watcher.run(stop.clone()));
        let ended = tokio::select! {
            _ = shutdown.cancelled() => None,
            done = &mut consume => Some(("results consumer", done)),
            done = &mut timers => Some(("timer loop", done)),
            done = &mut relay => Some(("outbox relay", done)),
        };
        let ended_loop = ended.as_ref().map(|(name, _)| *name);
        stop.cancel();
        // A task whose end the select saw is not awaited again.
        if ended_loop != Some("results consumer") {
            let _ = consume.await;
        }
        if ended_loop != Some("timer loop") {
            let _ = timers.await;
        }
        let _ = watch.await;
        drop((attached, engine));
        relay_stop.cancel();
        if ended_loop != Some("outbox relay") {
            let _ = relay.await;
        }
        // A loop that ends because shutdown came first (the select may see either) is fine.
        let Some((name, done)) = ended.filter(|_| !shutdown.is_cancelled()) else {
            info!("orchestrator stopped");
            return Ok(());
        };
        let why = match done {
            Ok(()) => "it returned".to_owned(),
            Err(e) if e.is_panic() => format!(
                "it panicked: {}",
                crate::decide::panic_message(e.into_panic().as_ref())
            ),
            Err(e) => e.to_string(),
        };
        error!(
            loop_name = name,
            %why,
            "an orchestrator loop ended before shutdown; stopping"
        );
        Err(crate::Error::LoopEnded(format!(
            "the orchestrator's {name} ({why})"
        )))
    }
}

/// A relay attached to a store, detached when dropped: a `run` future dropped half-way does
/// not leave the store holding a relay that no longer runs.
struct Attached {
    store: Arc<dyn Store>,
    relay: LocalRelay,
}

impl Attached {
    fn new(store: &Arc<dyn Store>, relay: LocalRelay) -> Self {
        store.attach_relay(relay.clone());
        Self {
            store: Arc::clone(store),
            relay,
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.store.detach_relay(&self.relay);
    }
}

const BLOCKED_TIMER_RETRY: Duration = Duration::from_millis(50);

struct Engine {
    store: Arc<dyn Store>,
    registry: Registry,
    config: OrchestratorConfig,
    relay: mpsc::UnboundedSender<Vec<OutboxRecord>>,
    wake: mpsc::UnboundedSender<DateTime<Utc>>,
    on_settled: Option<SettledHook>,
    metrics: Metrics,
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
    async fn consume(
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
    /// on. A transient failure (the database restarting) hands the batch back after a delay.
    async fn apply_parsed(&self, deliveries: Vec<Delivery>, batch: Vec<(uuid::Uuid, Input)>) {
        let mut applied = match self.store.apply(&self.registry, batch.clone()).await {
            Ok(applied) => applied,
            Err(e) if e.is_transient() => {
                error!(error = %e, count = deliveries.len(), "applying results failed; handing them back");
                tokio::time::sleep(self.config.defer_delay).await;
                for delivery in deliveries {
                    let _ = delivery.requeue().await;
                }
                return;
            }
            Err(e) if batch.len() == 1 => {
                let reason = format!("cannot apply this result: {e}");
                error!(saga.id = %batch[0].0, %reason, "dead-lettering a result");
                for delivery in deliveries {
                    let _ = delivery.dead_letter(&reason).await;
                }
                return;
            }
            Err(e) => {
                warn!(error = %e, count = batch.len(), "a batch failed; applying its results one by one");
                for (delivery, item) in deliveries.into_iter().zip(batch) {
                    Box::pin(self.apply_parsed(vec![delivery], vec![item])).await;
                }
                return;
            }
        };
        self.hand_over(&mut applied);
        // Settled together: the acks go out in one burst, not one round trip each.
        let mut settles = Vec::with_capacity(deliveries.len());
        for ((delivery, (saga_id, _)), a) in deliveries.into_iter().zip(&batch).zip(applied) {
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
                    warn!(saga.id = %saga_id, error = %e, "settling a result failed; it will be redelivered");
                }
            });
        }
        futures_util::future::join_all(settles).await;
    }

    /// Fires due timers; sleeps until the next one is due, a new one is set, or the poll.
    async fn fire_timers(
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
