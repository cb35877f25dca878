//! Metrics in the Prometheus text format, from orchestrators and workers.
//!
//! Counted in process: results by verdict, sagas settled by name and status (`stuck` among
//! them), retries, timers fired, dead-lettered messages, each handler attempt (count and
//! duration by service, command and outcome; fences as `fence:COMMAND`), and how long each
//! service's queue has held commands that no worker consumes. Read from the store at scrape time, so they agree across
//! processes: sagas by name and status, the outbox backlog and its oldest row's age, due and
//! pending timers.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::StoreStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SagaStatusLabels {
    saga: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SagaLabels {
    saga: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    service: String,
    command: String,
    outcome: String,
}

struct Inner {
    registry: Registry,
    settled: Family<SagaStatusLabels, Counter>,
    retries: Family<SagaLabels, Counter>,
    results: Family<VerdictLabels, Counter>,
    dead_lettered: Family<SourceLabels, Counter>,
    timers_fired: Counter,
    attempts: Family<CommandLabels, Counter>,
    handler_seconds: Family<CommandLabels, Histogram>,
    unconsumed: Family<ServiceLabels, Gauge<f64, AtomicU64>>,
}

/// A set of metrics shared by the orchestrator and workers of one process. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics, registered under the `saga_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("saga");
        let settled = Family::<SagaStatusLabels, Counter>::default();
        let retries = Family::<SagaLabels, Counter>::default();
        let results = Family::<VerdictLabels, Counter>::default();
        let dead_lettered = Family::<SourceLabels, Counter>::default();
        let timers_fired = Counter::default();
        let attempts = Family::<CommandLabels, Counter>::default();
        let handler_seconds = Family::<CommandLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "settled",
            "Sagas this process settled, by name and status",
            settled.clone(),
        );
        registry.register(
            "retries",
            "Retries scheduled, by saga name",
            retries.clone(),
        );
        registry.register("results", "Results applied, by verdict", results.clone());
        registry.register(
            "dead_lettered",
            "Messages dead-lettered, by source queue",
            dead_lettered.clone(),
        );
        registry.register("timers_fired", "Timers fired", timers_fired.clone());
        registry.register(
            "step_attempts",
            "Handler attempts, by service, command and outcome",
            attempts.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Handler attempt duration, by service, command and outcome",
            handler_seconds.clone(),
        );
        let unconsumed = Family::<ServiceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "service_unconsumed_seconds",
            "How long a service's queue has held commands with no consumer (0: consumed)",
            unconsumed.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                settled,
                retries,
                results,
                dead_lettered,
                timers_fired,
                attempts,
                handler_seconds,
                unconsumed,
            }),
        }
    }

    pub(crate) fn settled(&self, saga: &str, status: crate::SagaStatus) {
        self.inner
            .settled
            .get_or_create(&SagaStatusLabels {
                saga: saga.to_owned(),
                status: status.as_str().to_owned(),
            })
            .inc();
    }

    pub(crate) fn retries(&self, saga: &str, n: u32) {
        if n > 0 {
            self.inner
                .retries
                .get_or_create(&SagaLabels {
                    saga: saga.to_owned(),
                })
                .inc_by(u64::from(n));
        }
    }

    pub(crate) fn result(&self, verdict: &str) {
        self.inner
            .results
            .get_or_create(&VerdictLabels {
                verdict: verdict.to_owned(),
            })
            .inc();
    }

    pub(crate) fn dead_lettered(&self, source: &str) {
        self.inner
            .dead_lettered
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc();
    }

    pub(crate) fn timers_fired(&self, n: usize) {
        self.inner.timers_fired.inc_by(n as u64);
    }

    pub(crate) fn attempt(&self, service: &str, command: &str, outcome: &str, took: Duration) {
        let labels = CommandLabels {
            service: service.to_owned(),
            command: command.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.inner.attempts.get_or_create(&labels).inc();
        self.inner
            .handler_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub(crate) fn unconsumed(&self, service: &str, seconds: f64) {
        self.inner
            .unconsumed
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(seconds);
    }

    /// The metrics in the Prometheus text format, with `stats` (read from the store) added.
    pub fn render(&self, stats: Option<&StoreStats>) -> String {
        let mut out = String::new();
        if let Some(stats) = stats {
            let _ = writeln!(
                out,
                "# HELP saga_sagas Sagas in the store, by name and status."
            );
            let _ = writeln!(out, "# TYPE saga_sagas gauge");
            for (saga, status, n) in &stats.sagas {
                let _ = writeln!(
                    out,
                    "saga_sagas{{saga=\"{}\",status=\"{status}\"}} {n}",
                    escape(saga)
                );
            }
            for (name, help, value) in [
                (
                    "saga_outbox_backlog",
                    "Outbox rows not yet published.",
                    stats.outbox_backlog as f64,
                ),
                (
                    "saga_outbox_oldest_age_seconds",
                    "Age of the oldest unpublished outbox row.",
                    stats.outbox_oldest_age_secs,
                ),
                (
                    "saga_timers_due",
                    "Timers due and not fired.",
                    stats.timers_due as f64,
                ),
                (
                    "saga_timers_pending",
                    "Timers not fired yet.",
                    stats.timers_pending as f64,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
                );
            }
        }
        let mut text = String::new();
        encode(&mut text, &self.inner.registry).expect("writing to a String cannot fail");
        out + &text
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
