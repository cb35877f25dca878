//! Metrics, health, trace propagation and graceful shutdown, with `order-saga` as processes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::worker::{StepError, Worker, handler_fn};
use saga_core::{
    Client, CommandContext, InProcessTransport, Orchestrator, QueryStore, SagaDefinition,
    SagaStatus,
};
use saga_tests::process::Stack;
use saga_tests::{database, free_port, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the ops endpoint");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `name{labels} value` lines of a scrape, by `name{labels}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_owned(), v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_run_and_health_answers() {
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    let orchestrator_port = free_port();
    stack.spawn_with(
        &["orchestrator"],
        &[("METRICS_ADDR", &format!("127.0.0.1:{orchestrator_port}"))],
    );
    let shipping_port = free_port();
    for service in ["inventory", "payment", "shipping"] {
        let env = if service == "shipping" {
            vec![("METRICS_ADDR", format!("127.0.0.1:{shipping_port}"))]
        } else {
            vec![]
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        stack.spawn_with(&["service", service], &env);
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            get_ok(orchestrator_port, "/readyz").await
        })
        .await,
        "ready"
    );
    assert_eq!(get(orchestrator_port, "/livez").await.0, 200);
    stack
        .run(&["start", "--count", "20", "--fail-every", "10"])
        .await;
    stack.run(&["wait", "--timeout", "60"]).await;

    let (status, body) = get(orchestrator_port, "/metrics").await;
    assert_eq!(status, 200);
    let m = samples(&body);
    let at = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {body}"))
    };
    assert_eq!(at(r#"saga_sagas{saga="order",status="completed"}"#), 18.0);
    assert_eq!(at(r#"saga_sagas{saga="order",status="compensated"}"#), 2.0);
    assert_eq!(
        at(r#"saga_settled_total{saga="order",status="completed"}"#),
        18.0
    );
    assert_eq!(
        at(r#"saga_settled_total{saga="order",status="compensated"}"#),
        2.0
    );
    // 18 x 3 results + 2 x 5 results, all applied.
    assert_eq!(at(r#"saga_results_total{verdict="applied"}"#), 64.0);
    assert_eq!(at("saga_outbox_backlog"), 0.0);
    // No timer is left due: one a last transaction claimed, or one that came due as its saga
    // ended (seen once under load: 2 for a moment), is fired by the timer loop (and ignored by
    // its ended saga) within a poll.
    let drained = wait_until(Duration::from_secs(10), || async {
        let (_, body) = get(orchestrator_port, "/metrics").await;
        samples(&body).get("saga_timers_due") == Some(&0.0)
    })
    .await;
    assert!(drained, "timers left due: {body}");

    let (_, body) = get(shipping_port, "/metrics").await;
    let m = samples(&body);
    assert_eq!(
        m.get(r#"saga_step_attempts_total{service="shipping",command="ship",outcome="success"}"#),
        Some(&18.0),
        "{body}"
    );
    assert_eq!(
        m.get(r#"saga_step_attempts_total{service="shipping",command="ship",outcome="terminal"}"#),
        Some(&2.0),
        "{body}"
    );
    assert_eq!(
        m.get(r#"saga_step_duration_seconds_count{service="shipping",command="ship",outcome="success"}"#),
        Some(&18.0),
        "{body}"
    );
    stack.shutdown().await;
}

async fn get_ok(port: u16, path: &str) -> bool {
    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(_) => get(port, path).await.0 == 200,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_exits_in_the_grace_period_and_loses_nothing() {
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    let grace = [("SHUTDOWN_GRACE_SECS", "10")];
    let mut pids = vec![stack.spawn_with(&["orchestrator"], &grace)];
    for service in ["inventory", "payment", "shipping"] {
        pids.push(stack.spawn_with(&["service", service], &grace));
    }
    // Sagas keep starting while the processes stop, so the run is surely cut short.
    let starter = stack.spawn(&["start", "--count", "200", "--fail-every", "10"]);
    let pool = stack.pool.clone();
    let finished = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM saga.instances WHERE status IN ('completed', 'compensated')",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert!(wait_until(Duration::from_secs(60), || async { finished().await >= 20 }).await);
    for pid in &pids {
        stack.signal(*pid, "TERM");
    }
    for pid in pids {
        assert!(
            stack.wait_exit(pid, Duration::from_secs(12)).await,
            "process {pid} exited cleanly within the grace period"
        );
    }
    assert!(finished().await < 200, "the run was cut short");
    assert!(
        stack.wait_exit(starter, Duration::from_secs(60)).await,
        "all sagas were started"
    );
    stack.spawn(&["orchestrator"]);
    for service in ["inventory", "payment", "shipping"] {
        stack.spawn(&["service", service]);
    }
    assert_eq!(
        stack.run(&["wait", "--timeout", "120"]).await.trim(),
        r#"{"running":0,"completed":180,"compensated":20,"stuck":0}"#
    );
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT saga_id, action FROM example_effects GROUP BY saga_id, action HAVING count(*) > 1) d",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0, "no effect applied twice");
    stack.shutdown().await;
}

#[tokio::test]
async fn a_participant_sees_the_orchestrators_trace_id() {
    let db = database().await;
    let store = Arc::new(db.store());
    let transport = Arc::new(InProcessTransport::new());
    let def = SagaDefinition::<u32>::builder("traced", 1)
        .step("only", |s| s.action("svc", "only", |c| Ok(*c.input())))
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let worker = Worker::builder("svc", db.inbox().await)
        .handler(
            "only",
            handler_fn(move |n: u32, ctx: CommandContext| {
                record
                    .lock()
                    .unwrap()
                    .push((ctx.saga_id, ctx.trace_id.clone()));
                async move { Ok::<_, StepError>(n) }
            }),
        )
        .build();
    let shutdown = CancellationToken::new();
    let w = tokio::spawn(worker.run(transport.clone(), shutdown.clone()));
    let o = tokio::spawn(
        Orchestrator::builder(store.clone(), transport)
            .register(&def)
            .build()
            .run(shutdown.clone()),
    );
    let client = Client::new(store.clone());
    let id = client.start(&def, &1).await.unwrap().saga_id;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            client.summary(id).await.unwrap().unwrap().status == SagaStatus::Completed
        })
        .await
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(id, Some(id.simple().to_string()))],
        "the trace id is the saga's"
    );
    let _ = store.count_by_status().await.unwrap();
    shutdown.cancel();
    w.await.unwrap().unwrap();
    o.await.unwrap().unwrap();
    db.drop_schema().await;
}

/// A stand-in OpenTelemetry collector: takes OTLP/HTTP export requests and keeps their paths
/// and bodies (the test checks them, so a bad request fails the test, not a task).
async fn collector() -> (u16, Arc<Mutex<Vec<(String, Vec<u8>)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&bodies);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    // Request line and headers, then a body of Content-Length bytes.
                    let mut length = None;
                    let mut path = String::new();
                    loop {
                        let mut line = String::new();
                        if tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut line)
                            .await
                            .unwrap_or(0)
                            == 0
                        {
                            return;
                        }
                        if path.is_empty() {
                            path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            length = v.trim().parse::<usize>().ok();
                        }
                    }
                    // Without a Content-Length the body is kept empty, and fails to decode.
                    let mut body = vec![0; length.unwrap_or(0)];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    kept.lock().unwrap().push((path, body));
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_export_one_trace_per_saga_over_otlp() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message as _;

    let (port, bodies) = collector().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    stack.spawn_with(&["orchestrator"], &env);
    for service in ["inventory", "payment", "shipping"] {
        stack.spawn_with(&["service", service], &env);
    }
    let started = stack
        .run(&["start", "--count", "4", "--fail-every", "2", "--ids"])
        .await;
    let ids: Vec<uuid::Uuid> = started
        .lines()
        .skip(1)
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(
        stack.run(&["wait", "--timeout", "60"]).await.trim(),
        r#"{"running":0,"completed":2,"compensated":2,"stuck":0}"#
    );
    // SIGTERM: each process flushes its spans before it exits.
    stack.shutdown().await;

    // (service name, span name, trace id, span id, parent span id), from every export.
    let mut spans = Vec::new();
    let bodies = bodies.lock().unwrap().clone();
    assert!(!bodies.is_empty(), "the processes exported spans");
    for (path, body) in &bodies {
        assert_eq!(path, "/v1/traces");
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .expect("a service name");
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push((
                    service.clone(),
                    span.name,
                    span.trace_id,
                    span.span_id,
                    span.parent_span_id,
                ));
            }
        }
    }
    for (n, id) in ids.iter().enumerate() {
        let trace = id.as_bytes().to_vec();
        let root_id = id.as_bytes()[8..].to_vec();
        let in_trace: Vec<_> = spans.iter().filter(|s| s.2 == trace).collect();
        let roots: Vec<_> = in_trace.iter().filter(|s| s.1 == "saga order").collect();
        assert_eq!(roots.len(), 1, "saga {id}: {in_trace:?}");
        assert_eq!(roots[0].0, "order-saga orchestrator");
        assert_eq!(roots[0].3, root_id);
        assert!(roots[0].4.is_empty(), "the root span has no parent");
        let mut steps: Vec<&str> = in_trace
            .iter()
            .filter(|s| s.1 == "step")
            .map(|s| {
                assert_eq!(
                    s.4, root_id,
                    "a step span is a child of the saga's root span"
                );
                s.0.as_str()
            })
            .collect();
        steps.sort_unstable();
        // Every second saga (the second, the fourth) fails to ship and compensates.
        let expected: &[&str] = if n % 2 == 1 {
            &[
                "order-saga inventory",
                "order-saga inventory",
                "order-saga payment",
                "order-saga payment",
                "order-saga shipping",
            ]
        } else {
            &[
                "order-saga inventory",
                "order-saga payment",
                "order-saga shipping",
            ]
        };
        assert_eq!(steps, expected, "the step attempts of saga {id}");
    }
}
