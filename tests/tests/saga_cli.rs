//! The operator's tool `saga`, run as a process against a real PostgreSQL, with an
//! orchestrator applying its actions: list, show, signal, cancel, retry, resolve, pause, resume
//! and purge, each checked against the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use saga_core::worker::{StepError, Worker, handler_fn};
use saga_core::{
    Client, CommandContext, Event, InProcessTransport, Orchestrator, QueryStore, RetryPolicy,
    SagaDefinition, SagaStatus,
};
use saga_tests::harness::config;
use saga_tests::process::binary;
use saga_tests::{TestDb, database, wait_until};
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// a (undo_a, one attempt) -> b, which fails when the input says so.
fn failing() -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("ops-fail", 1)
        .step("a", |s| {
            s.action("svc", "a", |c| Ok(c.input().clone()))
                .compensation("svc", "undo_a", |c| Ok(c.input().clone()))
                .compensation_retry(RetryPolicy::no_retry())
        })
        .step("b", |s| {
            s.pivot().action("svc", "b", |c| Ok(c.input().clone()))
        })
        .build()
        .unwrap()
}

/// a -> waits for `go` -> b.
fn gated() -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("ops-gate", 1)
        .step("a", |s| {
            s.action("svc", "a", |c| Ok(c.input().clone()))
                .compensation("svc", "undo_a", |c| Ok(c.input().clone()))
        })
        .step("gate", |s| s.wait_for::<Value>("go", |_| Ok(())))
        .step("b", |s| {
            s.pivot().action("svc", "b", |c| Ok(c.input().clone()))
        })
        .build()
        .unwrap()
}

async fn saga(db: &TestDb, args: &[&str]) -> (bool, String, String) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| saga_tests::DEFAULT_DATABASE_URL.to_owned());
    let output = tokio::process::Command::new(binary("saga"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("SAGA_SCHEMA", &db.schema)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn ok(db: &TestDb, args: &[&str]) -> String {
    let (success, stdout, stderr) = saga(db, args).await;
    assert!(success, "saga {args:?} failed: {stderr}");
    stdout
}

async fn kinds(client: &Client, id: Uuid) -> Vec<&'static str> {
    client
        .history(id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.event.kind())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_find_inspect_and_fix_sagas() {
    let db = database().await;
    let store = Arc::new(db.store());
    let transport = Arc::new(InProcessTransport::new());
    let shutdown = CancellationToken::new();
    let refunds_down = Arc::new(AtomicBool::new(true));
    let down = Arc::clone(&refunds_down);
    let worker = Worker::builder("svc", db.inbox().await)
        .handler(
            "a",
            handler_fn(|v: Value, _: CommandContext| async move { Ok::<_, StepError>(v) }),
        )
        .handler(
            "undo_a",
            handler_fn(move |v: Value, _: CommandContext| {
                let down = down.load(Ordering::SeqCst);
                async move {
                    if down {
                        Err(StepError::terminal("refund gateway down"))
                    } else {
                        Ok(v)
                    }
                }
            }),
        )
        .handler(
            "b",
            handler_fn(|v: Value, _: CommandContext| async move {
                if v["fail"] == json!(true) {
                    Err(StepError::terminal("b refused"))
                } else {
                    Ok(v)
                }
            }),
        )
        .build();
    let w = tokio::spawn(worker.run(transport.clone(), shutdown.clone()));
    let o = tokio::spawn(
        Orchestrator::builder(store.clone(), transport.clone())
            .register(&failing())
            .register(&gated())
            .config(config())
            .build()
            .run(shutdown.clone()),
    );
    let client = Client::new(store.clone());
    let status = |id: Uuid| {
        let client = client.clone();
        async move { client.summary(id).await.unwrap().unwrap().status }
    };
    let settle = |id: Uuid, want: SagaStatus| async move {
        assert!(
            wait_until(Duration::from_secs(10), || async {
                status(id).await == want
            })
            .await,
            "{id} to be {want}, is {}",
            status(id).await
        )
    };

    // Two sagas get stuck: b fails, and undoing a fails too.
    let s1 = client
        .start(&failing(), &json!({"fail": true}))
        .await
        .unwrap()
        .saga_id;
    let s2 = client
        .start(&failing(), &json!({"fail": true}))
        .await
        .unwrap()
        .saga_id;
    settle(s1, SagaStatus::Stuck).await;
    settle(s2, SagaStatus::Stuck).await;

    // list finds them, text and JSON; show explains why.
    let listed: Vec<Value> =
        serde_json::from_str(&ok(&db, &["list", "--status", "stuck", "--json"]).await).unwrap();
    let ids: Vec<&str> = listed.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert!(
        ids.contains(&s1.to_string().as_str())
            && ids.contains(&s2.to_string().as_str())
            && ids.len() == 2,
        "{listed:?}"
    );
    let text = ok(&db, &["list", "--saga", "ops-fail"]).await;
    assert!(
        text.lines().count() == 3 && text.contains("stuck"),
        "{text}"
    );
    let paged: Vec<Value> =
        serde_json::from_str(&ok(&db, &["list", "--limit", "1", "--page", "2", "--json"]).await)
            .unwrap();
    assert_eq!(paged.len(), 1);
    let shown = ok(&db, &["show", &s1.to_string()]).await;
    assert!(
        shown.contains("refund gateway down") && shown.contains("stuck"),
        "{shown}"
    );
    assert!(
        shown.contains("failed (attempt 1, terminal) in"),
        "durations are shown: {shown}"
    );
    // The log names its steps and commands: no definition needed to read it.
    assert!(
        shown.contains("a        >> -> svc.a (attempt 1)"),
        "steps named from the log: {shown}"
    );
    let shown: Value =
        serde_json::from_str(&ok(&db, &["show", &s1.to_string(), "--json"]).await).unwrap();
    assert_eq!(shown["saga"]["status"], "stuck");
    assert_eq!(
        shown["events"].as_array().unwrap().last().unwrap()["event"]["type"],
        "stuck"
    );

    // retry both while the fault lasts, in bulk: asked first (no terminal here: refused,
    // saying how many), then with --yes; stuck again, each on a new attempt.
    let bulk = ["retry", "--status", "stuck", "--name", "ops-fail"];
    let (success, _, stderr) = saga(&db, &bulk).await;
    assert!(
        !success && stderr.contains("2 stuck `ops-fail` sagas match") && stderr.contains("--yes"),
        "{stderr}"
    );
    let retried: Value =
        serde_json::from_str(&ok(&db, &[&bulk[..], &["--yes", "--json"]].concat()).await).unwrap();
    assert_eq!(retried["matched"], 2, "{retried}");
    assert_eq!(retried["retried"], 2, "{retried}");
    for id in [s1, s2] {
        assert!(
            wait_until(Duration::from_secs(10), || async {
                kinds(&client, id)
                    .await
                    .iter()
                    .filter(|k| **k == "stuck")
                    .count()
                    == 2
            })
            .await
        );
    }
    // once fixed: compensated.
    refunds_down.store(false, Ordering::SeqCst);
    ok(&db, &["retry", &s1.to_string()]).await;
    settle(s1, SagaStatus::Compensated).await;
    let attempts = client
        .history(s1)
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            matches!(
                r.event,
                Event::Dispatched {
                    direction: saga_core::Direction::Compensation,
                    ..
                }
            )
        })
        .count();
    assert_eq!(attempts, 3);

    // resolve: the refund was done by hand; the log keeps who said what.
    ok(
        &db,
        &[
            "resolve",
            &s2.to_string(),
            "--step",
            "a",
            "--reason",
            "refunded by hand, ticket 42",
        ],
    )
    .await;
    settle(s2, SagaStatus::Compensated).await;
    assert!(client.history(s2).await.unwrap().iter().any(|r| matches!(&r.event, Event::Resolved { reason, .. } if reason == "refunded by hand, ticket 42")));

    // Errors name the saga and the reason.
    let (success, _, stderr) = saga(&db, &["retry", &s2.to_string()]).await;
    assert!(
        !success
            && stderr.contains(&s2.to_string())
            && stderr.contains("only a stuck saga can be retried"),
        "{stderr}"
    );
    let (success, _, stderr) = saga(
        &db,
        &[
            "resolve",
            &s1.to_string(),
            "--step",
            "nope",
            "--reason",
            "x",
        ],
    )
    .await;
    assert!(!success && stderr.contains("cannot resolve"), "{stderr}");

    // pause holds the next command back; resume sends it; signal opens the gate.
    let s3 = client.start(&gated(), &json!({})).await.unwrap().saga_id;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            kinds(&client, s3).await.contains(&"waiting")
        })
        .await
    );
    ok(
        &db,
        &["pause", &s3.to_string(), "--reason", "checking stock"],
    )
    .await;
    ok(&db, &["signal", &s3.to_string(), "go", "{\"by\":\"ops\"}"]).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            kinds(&client, s3).await.contains(&"held")
        })
        .await
    );
    assert_eq!(status(s3).await, SagaStatus::Running);
    ok(&db, &["resume", &s3.to_string()]).await;
    settle(s3, SagaStatus::Completed).await;

    // cancel while it waits.
    let s4 = client.start(&gated(), &json!({})).await.unwrap().saga_id;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            kinds(&client, s4).await.contains(&"waiting")
        })
        .await
    );
    ok(&db, &["cancel", &s4.to_string(), "not needed"]).await;
    settle(s4, SagaStatus::Cancelled).await;

    // purge: finished sagas older than a day go, with their logs.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".instances SET updated_at = updated_at - interval '2 days', \
         finished_at = finished_at - interval '2 days'",
        db.schema
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let rows = |table: &'static str| {
        let sql = format!("SELECT count(*) FROM \"{}\".{table}", db.schema);
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(
        rows("timers").await > 0,
        "the sagas left timer rows to purge"
    );
    let purged: Value =
        serde_json::from_str(&ok(&db, &["purge", "--older-than", "1d", "--json"]).await).unwrap();
    assert_eq!(purged["purged"], 4);
    assert!(store.count_by_status().await.unwrap().is_empty());
    assert_eq!(rows("events").await, 0);
    assert_eq!(rows("timers").await, 0, "purged sagas keep no timer rows");

    shutdown.cancel();
    w.await.unwrap().unwrap();
    o.await.unwrap().unwrap();
    db.drop_schema().await;
}

#[tokio::test]
async fn purge_inbox_keygen_and_bad_payload_keys() {
    let db = database().await;
    let inbox = db.inbox().await;
    for age in ["2 days", "0 days"] {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".inbox (idempotency_key, saga_id, command, created_at) \
             VALUES ($1, $2, 'charge', now() - interval '{age}')",
            db.schema
        )))
        .bind(format!("key-{age}"))
        .bind(Uuid::now_v7())
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let purged: Value = serde_json::from_str(
        &ok(
            &db,
            &[
                "purge-inbox",
                "--inbox",
                inbox.schema(),
                "--older-than",
                "1d",
                "--json",
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(purged["purged"], 1);
    let left: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT idempotency_key FROM \"{}\".inbox",
        db.schema
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, ["key-0 days"]);

    // keygen: a key SAGA_PAYLOAD_KEYS takes.
    let key = ok(&db, &["keygen"]).await;
    saga_core::codec::AesGcmCodec::parse(&format!("k1:{}", key.trim())).expect("a usable key");
    // A key that is not one is refused before anything else, without echoing it.
    let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA==";
    let output = tokio::process::Command::new(binary("saga"))
        .args(["list"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("SAGA_PAYLOAD_KEYS", format!("k1:{secret}"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("SAGA_PAYLOAD_KEYS") && stderr.contains("AES-256 takes 32"),
        "{stderr}"
    );
    assert!(!stderr.contains(secret), "{stderr}");
    db.drop_schema().await;
}

#[tokio::test]
async fn list_pads_its_columns_survives_a_closed_pipe_and_errors_say_it_once() {
    let db = database().await;
    let client = Client::new(Arc::new(db.store()));
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            client
                .start(&failing(), &json!({ "n": n }))
                .await
                .unwrap()
                .saga_id,
        );
    }
    // Statuses of three lengths.
    for (id, status) in ids.iter().zip(["stuck", "compensated", "running"]) {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE \"{}\".instances SET status = $2 WHERE id = $1",
            db.schema
        )))
        .bind(id)
        .bind(status)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let listed = ok(&db, &["list"]).await;
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{listed}");
    let year = |row: &str| row.find(" 20").expect("an updated time");
    assert!(
        rows.iter().all(|r| year(r) == year(rows[0])),
        "the column after the status drifts:\n{listed}"
    );

    // `saga list | head`: the reader is gone before the first line; the tool ends quietly.
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| saga_tests::DEFAULT_DATABASE_URL.to_owned());
    let mut child = tokio::process::Command::new(binary("saga"))
        .arg("list")
        .env("DATABASE_URL", &url)
        .env("SAGA_SCHEMA", &db.schema)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.is_empty(), "{stderr}");

    // A schema without the saga tables: the cause once, on one line.
    let (success, _, stderr) = saga(
        &TestDb {
            pool: db.pool.clone(),
            schema: "no_such_schema".into(),
        },
        &["list"],
    )
    .await;
    assert!(!success);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("does not exist").count(), 1, "{stderr}");

    // A URL naming a database that does not exist: at once, the cause once, on one line.
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url.as_str(), String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("a database in DATABASE_URL");
    let wrong = format!("{server}/no_such_database{query}");
    let output = tokio::process::Command::new(binary("saga"))
        .arg("list")
        .env("DATABASE_URL", &wrong)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr
            .matches("\"no_such_database\" does not exist")
            .count(),
        1,
        "{stderr}"
    );

    // `show` explains its marks.
    let shown = ok(&db, &["show", &ids[0].to_string()]).await;
    assert!(
        shown.contains("legend: >> the action, << its compensation, || a fence"),
        "{shown}"
    );
    db.drop_schema().await;
}
