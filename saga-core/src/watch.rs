//! Watching the services' queues: commands that wait with no worker to consume them (a
//! service down, or a worker started under a misspelt name) are reported, not guessed at.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::message::Destination;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::transport::Transport;

/// Looks at each service's queue every little while; a queue that has held commands with no
/// consumer for longer than the smallest timeout of the steps it serves is logged at ERROR,
/// once per episode, and its age is the gauge `saga_service_unconsumed_seconds`.
pub(crate) struct QueueWatcher {
    transport: Arc<dyn Transport>,
    /// Each service the registry's definitions send to, with how long its queue may hold
    /// commands unconsumed before it is reported.
    services: Vec<(String, Duration)>,
    metrics: Metrics,
}

/// The longest pause between two looks.
const MAX_INTERVAL: Duration = Duration::from_secs(5);

impl QueueWatcher {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        registry: &Registry,
        metrics: Metrics,
    ) -> Self {
        let mut patience: HashMap<String, Duration> = HashMap::new();
        for definition in registry.iter() {
            for step in definition.steps() {
                let timeout = step.timeout.unwrap_or(crate::DEFAULT_STEP_TIMEOUT);
                for action in step.action().into_iter().chain(&step.compensation) {
                    let entry = patience.entry(action.service.clone()).or_insert(timeout);
                    *entry = (*entry).min(timeout);
                }
            }
        }
        let mut services: Vec<_> = patience.into_iter().collect();
        services.sort();
        Self {
            transport,
            services,
            metrics,
        }
    }

    pub(crate) async fn run(self, stop: CancellationToken) {
        let Some(shortest) = self.services.iter().map(|(_, p)| *p).min() else {
            return;
        };
        let interval = (shortest / 2).clamp(Duration::from_millis(100), MAX_INTERVAL);
        let mut unconsumed: HashMap<String, (Instant, bool)> = HashMap::new();
        loop {
            for (service, patience) in &self.services {
                let queue = Destination::Service(service.clone());
                let status = tokio::select! {
                    _ = stop.cancelled() => return,
                    status = self.transport.queue_status(&queue) => status,
                };
                let status = match status {
                    Ok(Some(status)) => status,
                    // This transport cannot tell.
                    Ok(None) => return,
                    Err(e) => {
                        debug!(%service, error = %e, "reading a queue's status failed");
                        continue;
                    }
                };
                if status.messages == 0 || status.consumers > 0 {
                    if let Some((_, reported)) = unconsumed.remove(service) {
                        self.metrics.unconsumed(service, 0.0);
                        if reported {
                            info!(%service, "the service's queue is consumed again");
                        }
                    }
                    continue;
                }
                let (since, reported) = unconsumed
                    .entry(service.clone())
                    .or_insert((Instant::now(), false));
                let waited = since.elapsed();
                self.metrics.unconsumed(service, waited.as_secs_f64());
                if waited >= *patience && !*reported {
                    *reported = true;
                    error!(
                        %service,
                        commands = status.messages,
                        waited_secs = waited.as_secs(),
                        "commands wait in the queue of service `{service}` and no worker consumes it: \
                         is the service running, under this name?"
                    );
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
