//! The participant runtime: consume commands, run handlers, publish results, then ack.

mod handler;
mod step_error;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::error::Result;
use crate::message::{Command, Destination, Outcome, Reply};
use crate::metrics::Metrics;
use crate::transport::{Delivery, Transport};

pub use handler::{CommandContext, FnHandler, Handler, handler_fn};
use handler::{Erased, ErasedHandler};
pub use step_error::{StepError, StepResultExt};

/// Runs the step handlers of one participant service.
///
/// A handler's error, panic or hang (past the attempt's timeout) is reported as a failed
/// attempt; the command is acknowledged only after its result is confirmed by the transport,
/// so a crash before that redelivers it.
///
/// ```no_run
/// # async fn demo(transport: std::sync::Arc<saga_core::InProcessTransport>) -> saga_core::Result<()> {
/// use saga_core::worker::{handler_fn, CommandContext, StepError, Worker};
/// use tokio_util::sync::CancellationToken;
///
/// let worker = Worker::builder("inventory")
///     .handler("reserve", handler_fn(|qty: u32, _ctx: CommandContext| async move {
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
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut commands: Vec<_> = self.handlers.keys().collect();
        commands.sort();
        f.debug_struct("Worker")
            .field("service", &self.service)
            .field("commands", &commands)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Worker`].
#[derive(Debug)]
pub struct WorkerBuilder {
    inner: Worker,
}

impl WorkerBuilder {
    /// Registers the handler of `command`.
    pub fn handler<H: Handler>(mut self, command: &str, handler: H) -> Self {
        self.inner
            .handlers
            .insert(command.to_owned(), Arc::new(Erased(handler)));
        self
    }

    /// How many commands run at once.
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

    /// Starts building the worker of `service` (the routing key of its queue).
    pub fn builder(service: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            inner: Worker {
                service: service.into(),
                handlers: HashMap::new(),
                concurrency: Self::DEFAULT_CONCURRENCY,
                default_timeout: Self::DEFAULT_TIMEOUT,
                metrics: Metrics::new(),
                max_message_bytes: crate::message::DEFAULT_MAX_MESSAGE_BYTES,
            },
        }
    }

    /// The service this worker serves.
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
        tracker.wait().await;
        info!(service = %this.service, "worker stopped");
        Ok(())
    }

    async fn process(&self, transport: &dyn Transport, delivery: Delivery) {
        if let Some(why) = crate::message::oversize(&delivery.message.body, self.max_message_bytes)
        {
            warn!(service = %self.service, reason = %why, "dead-lettering an oversized command");
            self.metrics.dead_lettered(&self.service);
            let _ = delivery.dead_letter(&why).await;
            return;
        }
        let command = match Command::from_message(&delivery.message) {
            Ok(command) => command,
            Err(malformed) => {
                warn!(service = %self.service, reason = %malformed, "dead-lettering a malformed command");
                self.metrics.dead_lettered(&self.service);
                let _ = delivery.dead_letter(&malformed.0).await;
                return;
            }
        };
        if command.service != self.service {
            let reason = format!(
                "command for service `{}` reached service `{}`",
                command.service, self.service
            );
            warn!(%reason, "dead-lettering a misrouted command");
            self.metrics.dead_lettered(&self.service);
            let _ = delivery.dead_letter(&reason).await;
            return;
        }
        let traceparent = delivery
            .message
            .headers
            .get(crate::message::headers::TRACEPARENT);
        let trace_id = traceparent
            .and_then(|t| t.split('-').nth(1))
            .map(str::to_owned);
        let span = info_span!(
            "step",
            saga.id = %command.saga_id,
            saga.name = %command.saga,
            step = %command.step_name,
            direction = %command.direction,
            attempt = command.attempt,
            trace_id = trace_id.as_deref().unwrap_or(""),
        );
        #[cfg(feature = "otel")]
        crate::otel::adopt(&span, traceparent.map(String::as_str));
        async {
            let began = std::time::Instant::now();
            let outcome = self.run_handler(&command, trace_id.clone()).await;
            let label = match &outcome {
                Outcome::Success { .. } => "success",
                Outcome::Failure {
                    retryable: true, ..
                } => "retryable",
                Outcome::Failure {
                    retryable: false, ..
                } => "terminal",
            };
            self.metrics
                .attempt(&self.service, &command.command, label, began.elapsed());
            match &outcome {
                Outcome::Failure {
                    error,
                    retryable: true,
                } => warn!(%error, "step attempt failed; it may be retried"),
                Outcome::Failure {
                    error,
                    retryable: false,
                } => info!(%error, "step failed terminally"),
                Outcome::Success { .. } => {}
            }
            let mut reply = Reply::to(&command, outcome);
            let mut envelope = reply.to_envelope();
            if let Some(why) =
                crate::message::oversize(&envelope.message.body, self.max_message_bytes)
            {
                warn!(reason = %why, "the output is too large; failing the step");
                reply.outcome = Outcome::Failure {
                    error: format!(
                        "the output of command `{}` is too large: {why}",
                        command.command
                    ),
                    retryable: false,
                };
                envelope = reply.to_envelope();
            }
            match transport.publish(vec![envelope]).await {
                Ok(()) => {
                    if let Err(e) = delivery.ack().await {
                        warn!(error = %e, "ack failed; the command will be redelivered");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "publishing the result failed; handing the command back");
                    let _ = delivery.requeue().await;
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn run_handler(&self, command: &Command, trace_id: Option<String>) -> Outcome {
        let Some(handler) = self.handlers.get(&command.command) else {
            return Outcome::Failure {
                error: format!(
                    "service `{}` has no handler for command `{}`",
                    self.service, command.command
                ),
                retryable: false,
            };
        };
        let timeout = command
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.default_timeout);
        let task = tokio::spawn(
            Arc::clone(handler)
                .call(
                    command.payload.clone(),
                    CommandContext {
                        trace_id,
                        ..CommandContext::of(command)
                    },
                )
                .in_current_span(),
        );
        let abort = task.abort_handle();
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(Ok(output))) => Outcome::Success { output },
            Ok(Ok(Err(error))) => Outcome::Failure {
                error: error.message().to_owned(),
                retryable: error.is_retryable(),
            },
            Ok(Err(join)) => Outcome::Failure {
                error: format!("handler panicked: {}", panic_message(join)),
                retryable: true,
            },
            Err(_) => {
                abort.abort();
                Outcome::Failure {
                    error: format!("handler did not finish within {timeout:?}"),
                    retryable: true,
                }
            }
        }
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned()),
        Err(join) => join.to_string(),
    }
}
