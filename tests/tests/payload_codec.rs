//! Payloads encrypted at rest and on the wire: the order saga on the real PostgreSQL and
//! RabbitMQ with the AES-GCM codec on. Every row written (events, outbox, inbox, timers) and
//! every message the broker routed is read raw: none holds the input's marker; the sagas
//! complete and compensate as usual; rotating the key while sagas are in flight loses nothing;
//! `saga show` decodes with the key and shows a placeholder without it.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use saga_core::codec::{AesGcmCodec, Payloads};
use saga_core::{Client, Destination, Orchestrator, PgStore, QueryStore, SagaStatus};
use saga_tests::amqp::broker;
use saga_tests::harness::config;
use saga_tests::order::{self, Order};
use saga_tests::process::binary;
use saga_tests::{TestDb, database, wait_until};
use serde_json::Value;
use sqlx::AssertSqlSafe;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Personal data in every saga's input (and in every step's output).
const MARKER: &str = "Ada Lovelace, 12 Marylebone Rd";
const K1: &str = "k1:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
const K2: &str = "k2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];

fn payloads(keys: &str) -> Payloads {
    Payloads::new(AesGcmCodec::parse(keys).expect("valid keys"))
}

/// A store in the test's schema, its payloads under `keys`.
fn store_with(db: &TestDb, keys: &str) -> Arc<PgStore> {
    Arc::new(
        PgStore::builder(db.pool.clone())
            .schema(&db.schema)
            .outbox_lease(Duration::from_secs(1))
            .payloads(payloads(keys))
            .build()
            .unwrap(),
    )
}

/// An orchestrator and the participants (all but those in `held`) with `keys`.
struct Run {
    store: Arc<PgStore>,
    shutdown: CancellationToken,
    tasks: JoinSet<saga_core::Result<()>>,
}

async fn run(db: &TestDb, broker: &saga_tests::amqp::Broker, keys: &str, held: &[&str]) -> Run {
    let store = store_with(db, keys);
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let participants =
        order::participants_with(&db.pool, &db.schema, "payment", payloads(keys)).await;
    for worker in participants.workers {
        if !held.contains(&worker.service()) {
            tasks.spawn(worker.run(Arc::new(broker.transport().await), shutdown.clone()));
        }
    }
    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(broker.transport().await))
        .register(&order::definition())
        .config(config())
        .build();
    tasks.spawn(orchestrator.run(shutdown.clone()));
    Run {
        store,
        shutdown,
        tasks,
    }
}

impl Run {
    async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(result) = self.tasks.join_next().await {
            result.expect("no panic").expect("ended cleanly");
        }
    }
}

/// Starts `n` orders numbered from `first`; every 4th one's shipment fails, so it compensates.
async fn start(store: &Arc<PgStore>, first: u32, n: u32) -> Vec<Uuid> {
    let client = Client::new(store.clone());
    let mut ids = Vec::new();
    for id in first..first + n {
        let order = Order {
            id,
            fail_ship: id % 4 == 0,
            note: MARKER.to_owned(),
            ..Order::default()
        };
        ids.push(
            client
                .start(&order::definition(), &order)
                .await
                .unwrap()
                .saga_id,
        );
    }
    ids
}

/// Copies every row inserted into the outbox (rows are deleted once published) and the
/// timers, so that the test reads each one as it was written.
async fn keep_copies(db: &TestDb) {
    let s = &db.schema;
    for table in ["outbox", "timers"] {
        for statement in [
            format!("CREATE TABLE \"{s}\".{table}_copy (LIKE \"{s}\".{table})"),
            format!(
                "CREATE FUNCTION \"{s}\".copy_{table}() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN INSERT INTO \"{s}\".{table}_copy SELECT NEW.*; RETURN NEW; END $$"
            ),
            format!(
                "CREATE TRIGGER copy AFTER INSERT OR UPDATE ON \"{s}\".{table} FOR EACH ROW \
                 EXECUTE FUNCTION \"{s}\".copy_{table}()"
            ),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }
}

/// The text of every row of `table`; an outbox row's body (bytea, in hex in the row's text)
/// also as the text it holds.
async fn rows(db: &TestDb, table: &str) -> Vec<String> {
    let body = if table.starts_with("outbox") {
        "convert_from(t.body, 'UTF8')"
    } else {
        "''"
    };
    let sql = format!(
        "SELECT t::text || ' ' || {body} FROM \"{}\".{table} t",
        db.schema
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// A tap on every route the sagas' messages take, declared before any is sent.
async fn tap(broker: &saga_tests::amqp::Broker) -> lapin::Channel {
    let mut routes: Vec<Destination> = SERVICES
        .iter()
        .map(|s| Destination::Service((*s).to_owned()))
        .collect();
    routes.push(Destination::Results);
    saga_tests::amqp::tap(&broker.config, &routes).await
}

/// Every message the tap holds: its headers as text, and its body.
async fn tapped(channel: &lapin::Channel) -> Vec<(String, Vec<u8>)> {
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get("tap".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let mut headers = String::new();
        if let Some(table) = message.delivery.properties.headers() {
            for (name, value) in table.inner() {
                let value = match value {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    other => format!("{other:?}"),
                };
                headers.push_str(&format!("{}={value} ", name.as_str()));
            }
        }
        messages.push((headers, message.delivery.data.clone()));
    }
    messages
}

async fn saga_show(db: &TestDb, id: Uuid, keys: Option<&str>) -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| saga_tests::DEFAULT_DATABASE_URL.to_owned());
    let mut command = tokio::process::Command::new(binary("saga"));
    command
        .args(["show", &id.to_string()])
        .env("DATABASE_URL", url)
        .env("SAGA_SCHEMA", &db.schema)
        .env_remove("SAGA_PAYLOAD_KEYS");
    if let Some(keys) = keys {
        command.env("SAGA_PAYLOAD_KEYS", keys);
    }
    let output = command.output().await.expect("run saga");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "saga show failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_in_rows_or_messages_and_a_key_rotation_mid_run_loses_nothing() {
    let db = database().await;
    let broker = broker().await;
    keep_copies(&db).await;
    let channel = tap(&broker).await;

    // Under k1, with shipping down: the sagas stop at their pivot, its commands queued.
    let first = run(&db, &broker, K1, &["shipping"]).await;
    let before = start(&first.store, 0, 12).await;
    let waiting = wait_until(Duration::from_secs(30), || async {
        let mut all = true;
        for id in &before {
            let effects = order::effects(&db.pool, &db.schema, *id).await;
            all &= effects == ["reserve", "charge"];
        }
        all
    })
    .await;
    assert!(waiting, "every saga reached its pivot under k1");
    // A signal (no step waits for it: the saga keeps it) travels as a timer, then an event.
    Client::new(first.store.clone())
        .signal(before[1], "note", &serde_json::json!({ "note": MARKER }))
        .await
        .unwrap();
    let kept = wait_until(Duration::from_secs(10), || async {
        let history = first.store.history(before[1]).await.unwrap();
        history.iter().any(|r| {
            matches!(&r.event, saga_core::Event::SignalReceived { payload, .. }
                if payload["note"] == MARKER)
        })
    })
    .await;
    assert!(kept, "the signal is in the log, opened for the reader");
    first.stop().await;

    // Rotated: k2 for new writes, k1 still read. The queued k1 commands run, new sagas too.
    let second = run(&db, &broker, &format!("{K2},{K1}"), &[]).await;
    let after = start(&second.store, 12, 12).await;
    let settled = wait_until(Duration::from_secs(60), || async {
        let counts = second.store.count_by_status().await.unwrap();
        counts.keys().all(|s| !s.is_active())
    })
    .await;
    let counts = second.store.count_by_status().await.unwrap();
    assert!(settled, "sagas still active: {counts:?}");
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&18), "{counts:?}");
    assert_eq!(counts.get(&SagaStatus::Compensated), Some(&6), "{counts:?}");
    for (n, id) in before.iter().chain(&after).enumerate() {
        let expected: &[&str] = if n % 4 == 0 {
            &["reserve", "charge", "refund", "release"]
        } else {
            &["reserve", "charge", "ship"]
        };
        assert_eq!(
            order::effects(&db.pool, &db.schema, *id).await,
            expected,
            "saga #{n}"
        );
    }
    // The outputs come back whole, through the client, under either key.
    let client = Client::new(second.store.clone());
    for id in [before[1], after[1]] {
        let outcome = client.outcome(id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            outcome.output::<String>("ship").unwrap(),
            Some(format!("ship:{id}:{MARKER}"))
        );
    }
    second.stop().await;

    // Raw rows: sealed payloads under both keys, never the marker.
    let mut written = Vec::new();
    for table in ["events", "outbox_copy", "timers_copy", "inbox"] {
        let rows = rows(&db, table).await;
        assert!(!rows.is_empty(), "{table} has rows");
        for row in &rows {
            assert!(!row.contains(MARKER), "plaintext in {table}: {row}");
        }
        written.extend(rows);
    }
    // A row's text doubles the quotes of the JSON it holds.
    let all = written.join("\n").replace("\"\"", "\"").replace(' ', "");
    for key in ["\"key\":\"k1\"", "\"key\":\"k2\""] {
        assert!(all.contains(key), "no payload sealed under {key}");
    }
    // Raw messages: every command and result routed, none with the marker.
    let messages = tapped(&channel).await;
    assert!(
        messages.len() >= 24 * 3 * 2,
        "{} messages tapped",
        messages.len()
    );
    for (headers, body) in &messages {
        let text = String::from_utf8_lossy(body);
        assert!(!headers.contains(MARKER), "plaintext in headers: {headers}");
        assert!(!text.contains(MARKER), "plaintext on the wire: {text}");
        // A command's input and a success's output are sealed values.
        let json: Value = serde_json::from_slice(body).unwrap();
        let carried = match (json.get("payload"), json.pointer("/outcome/output")) {
            (Some(payload), _) => payload,
            (None, Some(output)) => output,
            (None, None) => continue,
        };
        assert!(
            Payloads::sealed_key(carried).is_some() || carried.is_null(),
            "an unsealed payload: {text}"
        );
    }
    // Nothing was dead-lettered.
    let dead =
        saga_tests::amqp::rabbitmqctl(&["list_queues", "-p", &broker.vhost, "name", "messages"])
            .await;
    for line in dead.lines().filter(|l| l.contains(".dead")) {
        assert!(line.trim_end().ends_with('0'), "dead letters: {line}");
    }

    // `saga show`: the input with the keys, a placeholder without them.
    let shown = saga_show(&db, after[0], Some(&format!("{K2},{K1}"))).await;
    assert!(shown.contains(MARKER), "{shown}");
    let hidden = saga_show(&db, after[0], None).await;
    assert!(
        hidden.contains("input: \"<encrypted: key k2>\""),
        "{hidden}"
    );
    assert!(!hidden.contains(MARKER), "{hidden}");
    let old_only = saga_show(&db, after[0], Some(K1)).await;
    assert!(old_only.contains("<encrypted: key k2>"), "{old_only}");

    channel.close(0, "done".into()).await.ok();
    broker.cleanup().await;
    db.drop_schema().await;
}

/// A rotation rolled out in the wrong order: the orchestrator reads results under a key it
/// does not hold yet. They wait (handed back, an error naming the key) instead of being
/// dead-lettered, and apply once it holds the key.
#[tokio::test(flavor = "current_thread")]
async fn results_under_a_key_the_orchestrator_lacks_wait_for_it() {
    let (errors, _guard) = saga_tests::logs::Errors::capture();
    let db = database().await;
    let broker = broker().await;
    // The participants write under k2; the orchestrator knows only k1.
    let store = |keys: &str| store_with(&db, keys);
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let workers = order::participants_with(
        &db.pool,
        &db.schema,
        "payment",
        payloads(&format!("{K2},{K1}")),
    )
    .await;
    for worker in workers.workers {
        tasks.spawn(worker.run(Arc::new(broker.transport().await), shutdown.clone()));
    }
    let behind = CancellationToken::new();
    let old = store(K1);
    let mut orchestrator = tokio::spawn(
        Orchestrator::builder(old.clone(), Arc::new(broker.transport().await))
            .register(&order::definition())
            .config(config())
            .build()
            .run(behind.clone()),
    );
    let ids = start(&old, 1, 3).await;
    let waited = wait_until(Duration::from_secs(20), || async {
        let mut reserved = true;
        for id in &ids {
            reserved &= !order::effects(&db.pool, &db.schema, *id).await.is_empty();
        }
        reserved && errors.contain("encrypted with key `k2`, which is not configured here")
    })
    .await;
    assert!(
        waited,
        "the orchestrator says which key it lacks: {:?}",
        errors.lines()
    );
    // Their reservations' results wait: no saga went on to its charge.
    for id in &ids {
        assert_eq!(order::effects(&db.pool, &db.schema, *id).await, ["reserve"]);
    }
    behind.cancel();
    (&mut orchestrator).await.unwrap().unwrap();

    // Given the key, it applies the results that waited.
    let rotated = store(&format!("{K2},{K1}"));
    tasks.spawn(
        Orchestrator::builder(rotated.clone(), Arc::new(broker.transport().await))
            .register(&order::definition())
            .config(config())
            .build()
            .run(shutdown.clone()),
    );
    let done = wait_until(Duration::from_secs(30), || async {
        let counts = rotated.count_by_status().await.unwrap();
        counts.get(&SagaStatus::Completed) == Some(&3)
    })
    .await;
    assert!(done, "{:?}", rotated.count_by_status().await.unwrap());
    for id in &ids {
        assert_eq!(
            order::effects(&db.pool, &db.schema, *id).await,
            ["reserve", "charge", "ship"]
        );
    }
    assert!(
        !errors.contain("dead-lettering"),
        "nothing dead-lettered: {:?}",
        errors.lines()
    );
    shutdown.cancel();
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    broker.cleanup().await;
    db.drop_schema().await;
}

/// The other wrong order: a worker lacks the key its commands come under. Each attempt fails
/// retryably with an error naming the key, nothing is applied; once the retries are spent the
/// step fails like any other, and what applied before it is compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_key_applies_nothing_and_says_which_key() {
    let db = database().await;
    let broker = broker().await;
    let store = store_with(&db, &format!("{K2},{K1}"));
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let with_k2 = order::participants_with(
        &db.pool,
        &db.schema,
        "payment",
        payloads(&format!("{K2},{K1}")),
    )
    .await;
    let only_k1 = order::participants_with(&db.pool, &db.schema, "payment", payloads(K1)).await;
    // inventory and shipping hold k2; payment only k1.
    let chosen = with_k2
        .workers
        .into_iter()
        .filter(|w| w.service() != "payment")
        .chain(
            only_k1
                .workers
                .into_iter()
                .filter(|w| w.service() == "payment"),
        );
    for worker in chosen {
        tasks.spawn(worker.run(Arc::new(broker.transport().await), shutdown.clone()));
    }
    tasks.spawn(
        Orchestrator::builder(store.clone(), Arc::new(broker.transport().await))
            .register(&order::definition())
            .config(config())
            .build()
            .run(shutdown.clone()),
    );
    let id = start(&store, 1, 1).await[0];
    let client = Client::new(store.clone());
    let outcome = client.outcome(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let reason = outcome.reason.unwrap_or_default();
    assert!(
        reason.contains("cannot read the input of command `charge`") && reason.contains("key `k2`"),
        "{reason}"
    );
    assert_eq!(
        order::effects(&db.pool, &db.schema, id).await,
        ["reserve", "release"]
    );
    shutdown.cancel();
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    broker.cleanup().await;
    db.drop_schema().await;
}

/// A signal sealed under a key the orchestrator lacks waits (postponed, an ERROR names the
/// key) without holding back the timers of other sagas.
#[tokio::test(flavor = "current_thread")]
async fn a_timer_under_a_missing_key_waits_alone() {
    let (errors, _guard) = saga_tests::logs::Errors::capture();
    let db = database().await;
    let broker = broker().await;
    // Shipping down: the sagas wait at their pivot, running, while signals come.
    let running = run(&db, &broker, K1, &["shipping"]).await;
    let ids = start(&running.store, 1, 2).await;
    let at_pivot = wait_until(Duration::from_secs(20), || async {
        let mut all = true;
        for id in &ids {
            all &= order::effects(&db.pool, &db.schema, *id).await == ["reserve", "charge"];
        }
        all
    })
    .await;
    assert!(at_pivot);
    let sender = PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .payloads(payloads(&format!("{K2},{K1}")))
        .build()
        .unwrap();
    let signal = serde_json::json!({ "note": MARKER });
    Client::new(Arc::new(sender))
        .signal(ids[0], "note", &signal)
        .await
        .unwrap();
    Client::new(running.store.clone())
        .signal(ids[1], "note", &signal)
        .await
        .unwrap();
    let received = |id: Uuid| {
        let store = running.store.clone();
        async move {
            store.history(id).await.unwrap().iter().any(|r| {
                matches!(&r.event, saga_core::Event::SignalReceived { payload, .. }
                    if payload["note"] == MARKER)
            })
        }
    };
    let applied = wait_until(Duration::from_secs(20), || async {
        received(ids[1]).await && errors.contain("a timer cannot be applied; postponing it")
    })
    .await;
    assert!(applied, "{:?}", errors.lines());
    assert!(errors.contain("key `k2`"), "{:?}", errors.lines());
    assert!(!received(ids[0]).await, "the k2 signal waits");
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}
