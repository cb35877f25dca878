//! OpenTelemetry export: one trace per saga, the orchestrator's root span and the
//! participants' step spans under it, over the real RabbitMQ and PostgreSQL.
//!
//! Its own test binary: it installs the global tracer provider and subscriber.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry::trace::{SpanId, Status, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use saga_core::otel::{SagaIdGenerator, root_span_id};
use saga_core::{Event, SagaStatus};
use saga_tests::amqp::broker;
use saga_tests::database;
use saga_tests::harness;
use saga_tests::order::Order;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_saga_is_one_trace_with_its_steps_under_the_root_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .with_id_generator(SagaIdGenerator::default())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();

    let (db, broker) = (database().await, broker().await);
    let running = harness::run(&db, || broker.transport()).await;
    let mut ids = running.start(6, 3).await;
    // One saga retries its charge twice: each attempt is a span of its own.
    ids.push(
        running
            .client
            .start(
                &saga_tests::order::definition(),
                &Order {
                    id: 100,
                    flaky_charge: 2,
                    ..Order::default()
                },
            )
            .await
            .unwrap()
            .saga_id,
    );
    running.settle(Duration::from_secs(60)).await;
    // Stopped first: a worker's step span ends after its ack, a root span after the commit
    // that settles the saga, so only then are they all exported.
    let client = running.client.clone();
    running.stop().await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    for id in &ids {
        let trace = TraceId::from_bytes(*id.as_bytes());
        let in_trace: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .collect();
        let roots: Vec<&&SpanData> = in_trace
            .iter()
            .filter(|s| s.name.starts_with("saga "))
            .collect();
        assert_eq!(roots.len(), 1, "one root span for saga {id}: {in_trace:#?}");
        let root = roots[0];
        let status = client.summary(*id).await.unwrap().unwrap().status;
        assert_eq!(root.name, "saga order");
        assert_eq!(root.span_context.span_id(), root_span_id(*id));
        assert_eq!(
            root.parent_span_id,
            SpanId::INVALID,
            "the root has no parent"
        );
        assert_eq!(attribute(root, "saga.status"), Some(status.to_string()));
        assert_eq!(attribute(root, "saga.id"), Some(id.to_string()));
        assert!(root.start_time <= root.end_time);
        match status {
            SagaStatus::Completed => assert_eq!(root.status, Status::Unset),
            _ => assert!(matches!(root.status, Status::Error { .. }), "{root:?}"),
        }

        // One step span per command the orchestrator dispatched, each under the root.
        let definition = saga_tests::order::definition();
        let steps = definition.definition().steps();
        let mut dispatched: BTreeMap<(String, String), u32> = BTreeMap::new();
        for e in client.history(*id).await.unwrap() {
            if let Event::Dispatched {
                step, direction, ..
            } = e.event
            {
                let name = steps[step as usize].name.clone();
                *dispatched.entry((name, direction.to_string())).or_default() += 1;
            }
        }
        let mut stepped: BTreeMap<(String, String), u32> = BTreeMap::new();
        for s in in_trace.iter().filter(|s| s.name == "step") {
            assert_eq!(s.parent_span_id, root_span_id(*id), "{s:?}");
            assert!(
                s.parent_span_is_remote,
                "the parent came in a message header"
            );
            assert_eq!(attribute(s, "saga.id"), Some(id.to_string()));
            let key = (
                attribute(s, "step").expect("the step attribute"),
                attribute(s, "direction").expect("the direction attribute"),
            );
            *stepped.entry(key).or_default() += 1;
        }
        assert!(dispatched.len() >= 3, "{dispatched:?}");
        assert_eq!(stepped, dispatched, "step spans of saga {id}");
    }
    // The saga whose charge failed twice shows three charge attempts.
    let flaky = *ids.last().unwrap();
    let charges = spans
        .iter()
        .filter(|s| {
            s.span_context.trace_id() == TraceId::from_bytes(*flaky.as_bytes())
                && s.name == "step"
                && attribute(s, "step").as_deref() == Some("charge")
        })
        .count();
    assert_eq!(charges, 3);

    broker.cleanup().await;
    db.drop_schema().await;
    provider.shutdown().unwrap();
}
