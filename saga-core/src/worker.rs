//! The participant runtime: consume commands, run handlers in the inbox's transactions,
//! answer fences, publish results, then ack.

mod attempt;
mod handler;
mod process;
mod step_error;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::codec::Payloads;
use crate::contract::{Contract, Service};
use crate::error::Result;
use crate::inbox::Inbox;
use crate::message::Destination;
use crate::metrics::Metrics;
use crate::transport::Transport;

use handler::Erased;
pub(crate) use handler::ErasedHandler;
pub use handler::{CommandContext, FnHandler, Handler, Tx, handler_fn};
pub use step_error::{StepError, StepResultExt};

/// Runs the step handlers of one participant service.
///
/// With an [`Inbox`] (the default, [`Worker::builder`]), every command runs in a transaction
/// of the participant's own database that records its outcome under the step's idempotency
/// key: a handler's writes through [`CommandContext::transaction`] apply exactly once,
/// redeliveries and retries get the recorded result back, and the orchestrator can *fence* a
/// step whose outcome it does not know (the worker answers from the inbox whether it applied,
/// or writes a tombstone so that it never will). [`Worker::at_least_once`] runs handlers
/// without one: their effects are at least once, and a step whose outcome is unknown counts as
/// applied (it is compensated; a pivot parks its saga as `stuck`).
///
/// A handler's error, panic or hang (past the attempt's timeout) is a failed attempt; a
/// command is acknowledged only after its result is confirmed by the transport, so a crash
/// before that redelivers it. A command the worker cannot run (unreadable, too large, for
/// another service) is answered with a terminal failure, then dead-lettered.
///
/// ```no_run
/// # async fn demo(transport: std::sync::Arc<saga_core::InProcessTransport>, pool: sqlx::PgPool) -> saga_core::Result<()> {
/// use saga_core::worker::{handler_fn, CommandContext, StepError, Worker};
/// use saga_core::Inbox;
/// use tokio_util::sync::CancellationToken;
///
/// let inbox = Inbox::new(pool, "inventory")?;
/// inbox.migrate().await?;
/// let worker = Worker::builder("inventory", inbox)
///     .handler("reserve", handler_fn(|qty: i32, ctx: CommandContext| async move {
///         let mut tx = ctx.transaction().await?;
///         sqlx::query("UPDATE stock SET reserved = reserved + $1").bind(qty).execute(&mut *tx).await?;
///         Ok::<_, StepError>(qty)
///     }))
///     .build();
/// worker.run(transport, CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct Worker {
    service: String,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    concurrency: usize,
    default_timeout: Duration,
    metrics: Metrics,
    max_message_bytes: usize,
    inbox: Option<Inbox>,
    payloads: Payloads,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut commands: Vec<_> = self.handlers.keys().collect();
        commands.sort();
        f.debug_struct("Worker")
            .field("service", &self.service)
            .field("commands", &commands)
            .field("concurrency", &self.concurrency)
            .field("inbox", &self.inbox)
            .field("payloads", &self.payloads)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Worker`]: of a service declared by type ([`Worker::for_service`]), whose
/// contracts it [`serve`](Self::serve)s, or named by a string ([`Worker::builder`]).
#[derive(Debug)]
pub struct WorkerBuilder<S = ()> {
    inner: Worker,
    _service: PhantomData<fn() -> S>,
}

impl<S: Service> WorkerBuilder<S> {
    /// Serves the contract `C`, a command of this worker's service, with `handler`, whose
    /// input and output are the contract's (anything else does not compile).
    pub fn serve<C: Contract<Service = S>>(
        self,
        handler: impl Handler<Input = C::Input, Output = C::Output>,
    ) -> Self {
        self.handler(C::COMMAND, handler)
    }
}

impl<S> WorkerBuilder<S> {
    /// Registers the handler of `command` by its name (for commands without a
    /// [`Contract`], as from a service in another language).
    pub fn handler<H: Handler>(mut self, command: &str, handler: H) -> Self {
        self.inner
            .handlers
            .insert(command.to_owned(), Arc::new(Erased(handler)));
        self
    }

    /// How many commands run at once (default [`Worker::DEFAULT_CONCURRENCY`]); with an
    /// inbox, each holds a connection of its pool while it runs.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.inner.concurrency = concurrency.max(1);
        self
    }

    /// How long a handler may run when the command carries no timeout of its own.
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.inner.default_timeout = timeout;
        self
    }

    /// The largest command accepted and result sent (default 1 MiB): a larger command is
    /// dead-lettered, a larger output fails the step terminally.
    pub fn max_message_bytes(mut self, limit: usize) -> Self {
        self.inner.max_message_bytes = limit;
        self
    }

    /// Counts attempts and their durations into `metrics`.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.inner.metrics = metrics;
        self
    }

    /// The codec for payloads (default: [`Payloads::plain`]), the orchestrator's: commands'
    /// inputs are opened before their handler runs (one under a key the codec lacks is
    /// answered retryable, with an error naming the key), outputs sealed before they are
    /// recorded in the inbox or sent.
    pub fn payloads(mut self, payloads: Payloads) -> Self {
        self.inner.payloads = payloads;
        self
    }

    /// Builds the worker; no I/O.
    pub fn build(self) -> Worker {
        self.inner
    }
}

impl Worker {
    /// Default number of commands run at once.
    pub const DEFAULT_CONCURRENCY: usize = 32;
    /// Default handler timeout when the command carries none.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// Starts building the worker of `service` (the routing key of its queue), whose commands
    /// run in transactions of `inbox`: exactly-once effects, and every step can be fenced.
    pub fn builder(service: impl Into<String>, inbox: Inbox) -> WorkerBuilder {
        Self::with(service.into(), Some(inbox))
    }

    /// Starts building the worker of the service `S` declared by type
    /// ([`service!`](crate::service!)), with `inbox` as [`Worker::builder`]: it
    /// [`serve`](WorkerBuilder::serve)s that service's contracts.
    pub fn for_service<S: Service>(inbox: Inbox) -> WorkerBuilder<S> {
        Self::with(S::NAME.to_owned(), Some(inbox))
    }

    /// Starts building the worker of `service` without an inbox, for a participant with no
    /// database of its own: its handlers' effects are at least once (make them idempotent,
    /// with [`CommandContext::idempotency_key`]), and it cannot fence, so a step whose outcome
    /// the orchestrator does not know counts as applied and is compensated (a pivot parks its
    /// saga as `stuck` for an operator).
    pub fn at_least_once(service: impl Into<String>) -> WorkerBuilder {
        Self::with(service.into(), None)
    }

    /// [`Worker::at_least_once`] for the service `S` declared by type.
    pub fn at_least_once_for<S: Service>() -> WorkerBuilder<S> {
        Self::with(S::NAME.to_owned(), None)
    }

    fn with<S>(service: String, inbox: Option<Inbox>) -> WorkerBuilder<S> {
        WorkerBuilder {
            _service: PhantomData,
            inner: Worker {
                service,
                handlers: HashMap::new(),
                concurrency: Self::DEFAULT_CONCURRENCY,
                default_timeout: Self::DEFAULT_TIMEOUT,
                metrics: Metrics::new(),
                max_message_bytes: crate::message::DEFAULT_MAX_MESSAGE_BYTES,
                inbox,
                payloads: Payloads::plain(),
            },
        }
    }

    /// A copy sharing its handlers, inbox and metrics (for the test kit).
    #[cfg(feature = "testing")]
    pub(crate) fn shared(&self) -> Arc<Worker> {
        Arc::new(Worker {
            service: self.service.clone(),
            handlers: self.handlers.clone(),
            concurrency: self.concurrency,
            default_timeout: self.default_timeout,
            metrics: self.metrics.clone(),
            max_message_bytes: self.max_message_bytes,
            inbox: self.inbox.clone(),
            payloads: self.payloads.clone(),
        })
    }

    /// Its inbox, if it keeps one (for the test kit).
    #[cfg(feature = "testing")]
    pub(crate) fn inbox(&self) -> Option<&Inbox> {
        self.inbox.as_ref()
    }

    /// The commands it has handlers for (for the test kit).
    #[cfg(feature = "testing")]
    pub(crate) fn commands(&self) -> impl Iterator<Item = &String> {
        self.handlers.keys()
    }

    /// How it encodes payloads (for the test kit).
    #[cfg(feature = "testing")]
    pub(crate) fn payloads(&self) -> &Payloads {
        &self.payloads
    }

    /// The service whose commands it runs.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Consumes the service's queue until `shutdown`; in-flight commands finish first.
    pub async fn run(
        self,
        transport: Arc<dyn Transport>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let source = Destination::Service(self.service.clone());
        transport
            .declare(&[source.clone(), Destination::Results])
            .await?;
        let mut deliveries = transport.consume(&source).await?;
        info!(service = %self.service, "worker running");
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.concurrency));
        let tracker = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = Arc::clone(&permits).acquire_owned() => permit.expect("semaphore open"),
            };
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                delivery = deliveries.next() => match delivery {
                    Some(delivery) => delivery,
                    None => break,
                },
            };
            let this = Arc::clone(&this);
            let transport = Arc::clone(&transport);
            tracker.spawn(async move {
                this.process(transport.as_ref(), delivery).await;
                drop(permit);
            });
        }
        drop(deliveries);
        tracker.close();
        info!(service = %this.service, in_flight = tracker.len(), "stopping: the commands in flight finish first");
        tracker.wait().await;
        info!(service = %this.service, "worker stopped");
        Ok(())
    }
}
