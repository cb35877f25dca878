//! OpenTelemetry tracing (feature `otel`): one trace per saga, across processes.
//!
//! The trace id is the saga id, and the saga's root span id is the last 8 bytes of it
//! ([`root_span_id`]), so every process can name the root without sharing state:
//!
//! - every command carries `traceparent: 00-<saga id>-<root span id>-01`;
//! - a [`Worker`](crate::Worker)'s `step` span (one per attempt) takes that as its parent;
//! - the orchestrator exports the root span, `saga NAME`, when the saga settles: it starts
//!   when the saga was started (read from its UUIDv7 id) and ends at the settlement, with the
//!   outcome in `saga.status`. A saga that gets stuck exports a `saga stuck` child span then,
//!   and its root span once an operator's fix lets it settle.
//!
//! To export, install an SDK tracer provider with [`SagaIdGenerator`] (so the root span gets
//! the ids above) as the global one, and add [`tracing_opentelemetry::layer`] to the `tracing`
//! subscriber so `tracing` spans become OpenTelemetry spans. Without them, nothing is
//! recorded and nothing is paid.
//!
//! ```no_run
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt as _;
//! use tracing_subscriber::util::SubscriberInitExt as _;
//!
//! // Add an exporter (OTLP, say) with `.with_batch_exporter(..)`.
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
//!     .with_id_generator(saga_core::otel::SagaIdGenerator::default())
//!     .build();
//! opentelemetry::global::set_tracer_provider(provider.clone());
//! tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer())
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("payments")))
//!     .init();
//! // ... run workers and orchestrators; before exit:
//! provider.shutdown().ok();
//! ```

use std::cell::Cell;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::Span as _;
use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::state::SagaStatus;

/// The instrumentation scope of the spans this module exports.
pub const SCOPE: &str = "saga";

/// The saga's root span id: the last 8 bytes of its id (the random part of a UUIDv7).
pub fn root_span_id(saga_id: Uuid) -> SpanId {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&saga_id.as_bytes()[8..]);
    SpanId::from_bytes(bytes)
}

/// The context of a saga's root span, as a remote parent.
pub fn saga_context(saga_id: Uuid) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(*saga_id.as_bytes()),
        root_span_id(saga_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// Parses a W3C `traceparent` header (`00-<trace id>-<parent id>-<flags>`) into a remote
/// parent context; `None` if it is not one.
pub fn remote_context(traceparent: &str) -> Option<Context> {
    let mut parts = traceparent.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    if version.len() != 2 || version == "ff" || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace)
        .ok()
        .filter(|t| t.to_string() == trace)?;
    let span_id = SpanId::from_hex(parent)
        .ok()
        .filter(|s| s.to_string() == parent)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context
        .is_valid()
        .then(|| Context::new().with_remote_span_context(context))
}

/// Makes `span` a child of the span named by `traceparent`, when it names one.
pub(crate) fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(remote_context) {
        // Fails only when the span is disabled or already started: then there is nothing to do.
        let _ = span.set_parent(parent);
    }
}

thread_local! {
    /// The ids the next span built on this thread takes, when set.
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Span and trace ids for an SDK tracer provider: random, except for a saga's root span,
/// whose ids come from the saga id. Install it with `with_id_generator`.
#[derive(Debug, Default)]
pub struct SagaIdGenerator(RandomIdGenerator);

impl IdGenerator for SagaIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_IDS.get() {
            Some((trace, _)) => trace,
            None => self.0.new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match NEXT_IDS.get() {
            Some((_, span)) => span,
            None => self.0.new_span_id(),
        }
    }
}

/// When the saga was started, read from its UUIDv7 id; `None` for other kinds of id.
fn started_at(saga_id: Uuid) -> Option<SystemTime> {
    let (secs, nanos) = saga_id.get_timestamp()?.to_unix();
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Exports what a saga's settlement closes: its root span, or a `saga stuck` span under it.
pub(crate) fn settled(saga_id: Uuid, saga: &str, status: SagaStatus) {
    let tracer = global::tracer(SCOPE);
    let now = SystemTime::now();
    let attributes = vec![
        KeyValue::new("saga.id", saga_id.to_string()),
        KeyValue::new("saga.name", saga.to_owned()),
        KeyValue::new("saga.status", status.to_string()),
    ];
    if status == SagaStatus::Stuck {
        let mut span = tracer.build_with_context(
            SpanBuilder::from_name("saga stuck")
                .with_kind(SpanKind::Internal)
                .with_start_time(now)
                .with_attributes(attributes),
            &saga_context(saga_id),
        );
        span.set_status(Status::error("the saga needs an operator"));
        span.end_with_timestamp(now);
        return;
    }
    let ids = (
        TraceId::from_bytes(*saga_id.as_bytes()),
        root_span_id(saga_id),
    );
    NEXT_IDS.set(Some(ids));
    let mut span = tracer.build_with_context(
        SpanBuilder::from_name(format!("saga {saga}"))
            .with_kind(SpanKind::Internal)
            .with_start_time(started_at(saga_id).filter(|t| *t <= now).unwrap_or(now))
            .with_attributes(attributes),
        &Context::new(),
    );
    NEXT_IDS.set(None);
    let context = span.span_context();
    if context.is_valid() && (context.trace_id(), context.span_id()) != ids {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "saga root spans get random ids, so step spans miss their parent: install \
                 `saga_core::otel::SagaIdGenerator` with the tracer provider's `with_id_generator`"
            );
        });
    }
    if status != SagaStatus::Completed {
        span.set_status(Status::error(format!("the saga ended {status}")));
    }
    span.end_with_timestamp(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_parses_to_its_ids() {
        let saga = Uuid::now_v7();
        let header = crate::message::traceparent(saga);
        let cx = remote_context(&header).expect("a valid traceparent");
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(sc.trace_id().to_bytes(), *saga.as_bytes());
        assert_eq!(sc.span_id(), root_span_id(saga));
        assert!(sc.is_sampled() && sc.is_remote());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-0000000000000001-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert!(remote_context(bad).is_none(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_root_span_starts_when_the_saga_did() {
        let before = SystemTime::now() - Duration::from_millis(2);
        let at = started_at(Uuid::now_v7()).unwrap();
        assert!(at >= before && at <= SystemTime::now());
        assert_eq!(started_at(Uuid::new_v4()), None);
    }
}
