//! The orchestrator: consumes results, fires timers, and relays the outbox.

mod engine;

use engine::Engine;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::definition::SagaDefinition;
use crate::error::Result;
use crate::message::Destination;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::relay::{Relay, RelayConfig};
use crate::store::{LocalRelay, Store};
use crate::transport::Transport;

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
            outbox: Arc::clone(&self.store) as Arc<dyn crate::store::OutboxStore>,
            store: Arc::clone(&self.store) as Arc<dyn crate::store::SagaStore>,
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
        // Dropped half-way, `run` stops its loops and its relay all the same.
        let _stopper = (stop.clone().drop_guard(), relay_stop.clone().drop_guard());
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
