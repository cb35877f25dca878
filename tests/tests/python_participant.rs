//! The order saga with its `payment` service written in Python without saga-core
//! (examples/python, from docs/PROTOCOL.md), beside the Rust services, on the real PostgreSQL
//! and RabbitMQ: killed mid-run (orders cancelled meanwhile, so their charges are fenced at
//! it), and replaced, every order's effects are still exactly as required.

use std::path::PathBuf;
use std::time::Duration;

use saga_tests::process::Stack;
use saga_tests::wait_until;

/// The Python service's launcher; its virtual environment is made by `--setup` (which
/// `scripts/test` runs first).
fn payment_service() -> PathBuf {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/payment-service"
    ));
    let setup = std::process::Command::new(&path)
        .arg("--setup")
        .status()
        .unwrap_or_else(|e| panic!("run {} --setup ({e}): it needs python3", path.display()));
    assert!(
        setup.success(),
        "{} --setup failed: it installs pika and psycopg from PyPI into examples/python/.venv",
        path.display()
    );
    path
}

async fn count(stack: &Stack, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_payment_service_serves_the_order_saga_through_kills() {
    let python = payment_service();
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    // Short step timeouts: attempts sent while the payment service is down time out and are
    // sent again.
    let short = [("STEP_TIMEOUT_MS", "1500")];
    let orchestrator = stack.spawn_with(&["orchestrator"], &short);
    for service in ["inventory", "shipping"] {
        stack.spawn(&["service", service]);
    }
    let payment = stack.spawn_program(&python, &[]);
    let starter = stack.spawn_with(
        &[
            "start",
            "--count",
            "200",
            "--fail-every",
            "10",
            "--in-flight",
            "8",
        ],
        &short,
    );

    // Killed once some charges went through.
    let pool = stack.pool.clone();
    let charged = |n: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM example_effects WHERE service = 'payment'",
            )
            .fetch_one(&pool)
            .await
            .is_ok_and(|c| c >= n)
        }
    };
    assert!(
        wait_until(Duration::from_secs(60), || charged(20)).await,
        "the Python service charges"
    );
    stack.signal(payment, "KILL");
    stack.wait_exit(payment, Duration::from_secs(10)).await;
    // While it is down, orders waiting on their charge are cancelled: the orchestrator fences
    // each charge at the payment service (did it apply?) before it compensates. (Orders whose
    // charge was sent after the kill: nobody can have answered it, so they still wait.)
    let killed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    let waiting_on_charge = || {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>(
                "SELECT i.id FROM saga.instances i JOIN saga.events e \
                 ON e.saga_id = i.id AND e.seq = i.last_seq \
                 WHERE i.status = 'running' AND e.kind = 'dispatched' \
                 AND e.data->>'command' = 'charge' AND e.recorded_at > $1 LIMIT 3",
            )
            .bind(killed_at)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert!(
        wait_until(Duration::from_secs(20), || async {
            !waiting_on_charge().await.is_empty()
        })
        .await,
        "orders wait on their charge"
    );
    let waiting = waiting_on_charge().await;
    for id in &waiting {
        stack
            .run(&["cancel", &id.to_string(), "customer withdrew"])
            .await;
    }
    let payment = stack.spawn_program(&python, &[]);
    // The orchestrator is killed too, and replaced.
    assert!(wait_until(Duration::from_secs(60), || charged(80)).await);
    stack.signal(orchestrator, "KILL");
    stack.wait_exit(orchestrator, Duration::from_secs(10)).await;
    stack.spawn_with(&["orchestrator"], &short);
    // And the payment service again, with a second copy beside the first.
    assert!(wait_until(Duration::from_secs(60), || charged(140)).await);
    stack.signal(payment, "KILL");
    stack.wait_exit(payment, Duration::from_secs(10)).await;
    stack.spawn_program(&python, &[]);
    stack.spawn_program(&python, &[]);

    assert!(
        stack.wait_exit(starter, Duration::from_secs(120)).await,
        "all started"
    );
    let counts: serde_json::Value =
        serde_json::from_str(&stack.run(&["wait", "--timeout", "180"]).await).unwrap();
    let cancelled = waiting.len() as i64;
    assert_eq!(counts["running"], 0, "{counts}");
    assert_eq!(counts["stuck"], 0, "{counts}");
    assert_eq!(counts["cancelled"], cancelled, "{counts}");
    assert_eq!(
        counts["completed"].as_i64().unwrap() + counts["compensated"].as_i64().unwrap(),
        200 - cancelled,
        "{counts}"
    );
    // Exactly once, whatever was killed: a completed order reserved, charged and shipped; a
    // compensated one also refunded and released, in that order; a cancelled one released,
    // and refunded only if its fence found the charge applied.
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT i.status, coalesce(s.seq, ''), count(*) FROM saga.instances i LEFT JOIN \
         (SELECT saga_id, string_agg(action, ',' ORDER BY id) AS seq FROM example_effects \
         GROUP BY saga_id) s ON s.saga_id = i.id GROUP BY 1, 2",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    for (status, seq, n) in &rows {
        let allowed: &[&str] = match status.as_str() {
            "completed" => &["reserve,charge,ship"],
            "compensated" => &["reserve,charge,refund,release"],
            "cancelled" => &["reserve,release", "reserve,charge,refund,release"],
            other => panic!("{n} sagas {other}"),
        };
        assert!(
            allowed.contains(&seq.as_str()),
            "{n} {status} sagas did {seq}"
        );
    }
    // The cancels fenced the charges at the Python service (a queued attempt of the charge
    // may settle a step before its fence's answer: the next test checks the answers).
    let fences = count(
        &stack,
        "SELECT count(*) FROM saga.events WHERE kind = 'dispatched' AND data->>'direction' = 'fence'",
    )
    .await;
    assert!(
        fences >= cancelled,
        "each cancel fenced its charge: {fences}"
    );
    // The payments were the Python service's: it keeps its records in the `payment` inbox.
    let charges_and_refunds = count(
        &stack,
        "SELECT count(*) FROM example_effects WHERE service = 'payment'",
    )
    .await;
    let recorded = count(
        &stack,
        "SELECT count(*) FROM payment.inbox WHERE outcome ? 'ok'",
    )
    .await;
    assert_eq!(recorded, charges_and_refunds);
    stack.shutdown().await;
}

/// A tap on the results, so the test reads every result, and a transport to send commands.
async fn results_tap(stack: &Stack) -> (saga_amqp::AmqpTransport, lapin::Channel) {
    use saga_core::Transport as _;
    let config = stack.broker_config();
    let transport = saga_amqp::AmqpTransport::connect(config.clone())
        .await
        .unwrap();
    let payment = saga_core::Destination::Service("payment".into());
    transport.declare(&[payment]).await.unwrap();
    let tap = saga_tests::amqp::tap(&config, &[saga_core::Destination::Results]).await;
    (transport, tap)
}

/// Sends `command` to the payment queue and returns the result that answers it (its body
/// checked against the result schema).
async fn ask(
    transport: &saga_amqp::AmqpTransport,
    tap: &lapin::Channel,
    message: saga_core::Envelope,
    command_id: uuid::Uuid,
) -> serde_json::Value {
    use saga_core::Transport as _;
    transport.publish(vec![message]).await.unwrap();
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/schemas/result.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = tap
            .basic_get(
                "tap".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        match got {
            Some(message) => {
                let body: serde_json::Value =
                    serde_json::from_slice(&message.delivery.data).unwrap();
                assert!(validator.is_valid(&body), "not a valid result: {body}");
                if body["command_id"] == command_id.to_string() {
                    return body["outcome"].clone();
                }
            }
            None => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no answer to {command_id}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_service_answers_as_the_protocol_says() {
    use saga_core::{Command, Direction};
    use serde_json::json;
    let python = payment_service();
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    let (transport, tap) = results_tap(&stack).await;
    stack.spawn_program(&python, &[]);
    let command = |saga_id: uuid::Uuid, direction: Direction, name: &str, attempt: u32| Command {
        command_id: uuid::Uuid::now_v7(),
        saga_id,
        saga: "order".into(),
        step: 1,
        step_name: "charge".into(),
        direction,
        attempt,
        service: "payment".into(),
        command: name.into(),
        idempotency_key: Command::idempotency_key_for(saga_id, 1, Direction::Forward),
        timeout_ms: Some(10_000),
        input_type: None,
        payload: if direction == Direction::Fence {
            serde_json::Value::Null
        } else {
            json!({"order_no": 7, "amount_cents": 1200})
        },
    };
    let send = |c: Command| {
        let (transport, tap) = (&transport, &tap);
        async move { ask(transport, tap, c.to_envelope(), c.command_id).await }
    };
    let effects = |saga_id: uuid::Uuid| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM example_effects WHERE saga_id = $1")
                .bind(saga_id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // A charge applies once; a redelivery (another attempt, the same key) gets the same answer.
    let a = uuid::Uuid::now_v7();
    let charged = json!({"status": "success", "output": {"id": format!("charge-{a}")}});
    assert_eq!(
        send(command(a, Direction::Forward, "charge", 1)).await,
        charged
    );
    assert_eq!(
        send(command(a, Direction::Forward, "charge", 2)).await,
        charged
    );
    assert_eq!(effects(a).await, 1);
    // A fence of an applied step answers its output.
    assert_eq!(
        send(command(a, Direction::Fence, "charge", 1)).await,
        charged
    );

    // A fence of a step no delivery applied writes a tombstone: a later delivery does nothing.
    let b = uuid::Uuid::now_v7();
    let fenced = send(command(b, Direction::Fence, "charge", 1)).await;
    assert_eq!(fenced["status"], "fenced", "{fenced}");
    let late = send(command(b, Direction::Forward, "charge", 1)).await;
    assert_eq!(late["status"], "fenced", "{late}");
    assert_eq!(effects(b).await, 0);

    // A command no handler knows: retryable for two attempts, then terminal.
    let c = uuid::Uuid::now_v7();
    let unknown = send(command(c, Direction::Forward, "tip", 1)).await;
    assert_eq!(
        (unknown["status"].as_str(), unknown["retryable"].as_bool()),
        (Some("failure"), Some(true)),
        "{unknown}"
    );
    let unknown = send(command(c, Direction::Forward, "tip", 3)).await;
    assert_eq!(
        (unknown["status"].as_str(), unknown["retryable"].as_bool()),
        (Some("failure"), Some(false)),
        "{unknown}"
    );

    // A command it cannot read (a schema version from the future) is fenced by its headers
    // and answered, never run.
    let d = uuid::Uuid::now_v7();
    let future = command(d, Direction::Forward, "charge", 1);
    let mut envelope = future.to_envelope();
    envelope.message.headers.insert(
        saga_core::message::headers::SCHEMA_VERSION.into(),
        "99".into(),
    );
    let refused = ask(&transport, &tap, envelope, future.command_id).await;
    assert_eq!(refused["status"], "fenced", "{refused}");
    assert_eq!(effects(d).await, 0);
    stack.shutdown().await;
}
