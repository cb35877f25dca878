//! Starts against the real PostgreSQL when many arrive at once: they share statements and
//! commits, yet each gets exactly the rows a lone start writes, a business key still makes
//! one saga, and a start the database rejects fails alone. Beside a running orchestrator,
//! starts hand their first commands to its relay.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use saga_core::store::{LocalRelay, Started};
use saga_core::{Client, OutboxStore, PgStore, SagaStore};
use saga_tests::order::{self, Order};
use saga_tests::{TestDb, database};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

fn order(id: u32) -> Order {
    Order {
        id,
        ..Order::default()
    }
}

/// Starts `n` orders at once, the `i`-th with the key `key(i)`.
async fn start_at_once(
    client: &Client,
    n: u32,
    key: impl Fn(u32) -> Option<String>,
) -> Vec<saga_core::Result<Started>> {
    let def = order::definition();
    join_all((0..n).map(|i| {
        let (client, def, key) = (client.clone(), def.clone(), key(i));
        async move {
            match key {
                Some(key) => client.start_with_key(&def, &order(i), &key).await,
                None => client.start(&def, &order(i)).await,
            }
        }
    }))
    .await
}

/// Rows per saga in `table` of the test's schema.
async fn rows_per_saga(db: &TestDb, table: &str, column: &str) -> HashMap<Uuid, i64> {
    let sql = format!(
        "SELECT {column}, count(*) FROM \"{}\".{table} GROUP BY {column}",
        db.schema
    );
    sqlx::query_as::<_, (Uuid, i64)>(AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// How many transactions wrote the saga rows: rows written by one share its `xmin`.
async fn transactions(db: &TestDb) -> i64 {
    let sql = format!(
        "SELECT count(DISTINCT xmin::text) FROM \"{}\".instances",
        db.schema
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn starts_at_once_share_commits_and_each_gets_the_rows_of_a_lone_start() {
    let db = database().await;
    let client = Client::new(Arc::new(db.store()));
    let lone = client
        .start(&order::definition(), &order(0))
        .await
        .unwrap()
        .saga_id;

    let started = start_at_once(&client, 200, |_| None).await;
    let ids: HashSet<Uuid> = started
        .into_iter()
        .map(|s| {
            let s = s.unwrap();
            assert!(s.created);
            s.saga_id
        })
        .collect();
    assert_eq!(ids.len(), 200, "every start has an id of its own");
    assert!(!ids.contains(&lone));

    let sagas = transactions(&db).await;
    assert!(
        sagas < 201,
        "201 starts took {sagas} transactions: none was shared"
    );
    for (table, column) in [
        ("events", "saga_id"),
        ("outbox", "saga_id"),
        ("timers", "saga_id"),
    ] {
        let rows = rows_per_saga(&db, table, column).await;
        if table != "timers" {
            assert!(rows.contains_key(&lone), "a lone start writes {table} rows");
        }
        for id in &ids {
            assert_eq!(
                rows.get(id),
                rows.get(&lone),
                "saga {id} has the {table} rows of a lone start"
            );
        }
    }
    for id in ids {
        let summary = client.summary(id).await.unwrap().unwrap();
        assert_eq!(summary.saga, "order");
        let history = client.history(id).await.unwrap();
        assert_eq!(
            history.len(),
            client.history(lone).await.unwrap().len(),
            "saga {id}"
        );
    }
    db.drop_schema().await;
}

#[tokio::test]
async fn one_business_key_started_at_once_makes_one_saga() {
    let db = database().await;
    let client = Client::new(Arc::new(db.store()));
    // Even i: the same key; odd i: a key of its own.
    let started = start_at_once(&client, 100, |i| {
        Some(if i % 2 == 0 {
            "order-shared".to_owned()
        } else {
            format!("order-{i}")
        })
    })
    .await;
    let started: Vec<Started> = started.into_iter().map(Result::unwrap).collect();
    let shared: Vec<&Started> = started.iter().step_by(2).collect();
    assert_eq!(
        shared.iter().filter(|s| s.created).count(),
        1,
        "one start of the shared key created the saga"
    );
    assert!(shared.iter().all(|s| s.saga_id == shared[0].saga_id));
    assert!(started.iter().skip(1).step_by(2).all(|s| s.created));
    let counts = client.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 51);
    // The saga of the shared key has the rows of one start, not of fifty.
    let events = rows_per_saga(&db, "events", "saga_id").await;
    let own = started[1].saga_id;
    assert_eq!(events.get(&shared[0].saga_id), events.get(&own));
    db.drop_schema().await;
}

#[tokio::test]
async fn a_start_the_database_rejects_fails_alone() {
    let db = database().await;
    let client = Client::new(Arc::new(db.store()));
    // PostgreSQL's text cannot hold a NUL: the statement holding this key fails.
    let started = start_at_once(&client, 100, |i| {
        (i == 50).then(|| "order-\0-50".to_owned())
    })
    .await;
    for (i, s) in started.iter().enumerate() {
        match (i, s) {
            // invalid byte sequence (text) or unsupported Unicode escape (jsonb)
            (50, Err(saga_core::Error::Database(e))) if e.is_server_answer() => {
                assert!(
                    matches!(e.code().as_deref(), Some("22021" | "22P05")),
                    "{e}"
                )
            }
            (50, Err(e)) => panic!("not the database's refusal: {e}"),
            (50, Ok(s)) => panic!("a key with a NUL was stored: {s:?}"),
            (_, Err(e)) => panic!("start {i} failed with the bad one: {e}"),
            (_, Ok(s)) => assert!(s.created),
        }
    }
    let counts = client.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 99);
    db.drop_schema().await;
}

#[tokio::test]
async fn two_stores_starting_the_same_keys_at_once_make_one_saga_per_key() {
    let db = database().await;
    // Two stores, as two processes would have, each with its own queue of starts.
    let (one, two) = (
        Client::new(Arc::new(db.store())),
        Client::new(Arc::new(db.store())),
    );
    let key: fn(u32) -> Option<String> = |i| Some(format!("order-{}", i % 40));
    let reversed: fn(u32) -> Option<String> = |i| Some(format!("order-{}", 39 - i % 40));
    let (a, b) = tokio::join!(
        start_at_once(&one, 80, key),
        start_at_once(&two, 80, reversed)
    );
    let mut by_key: HashMap<String, HashSet<Uuid>> = HashMap::new();
    let mut created = 0;
    for (store, started, key) in [("first", a, key), ("second", b, reversed)] {
        for (i, s) in (0u32..).zip(started) {
            let s = s.unwrap_or_else(|e| panic!("start {i} of the {store} store: {e}"));
            created += usize::from(s.created);
            by_key.entry(key(i).unwrap()).or_default().insert(s.saga_id);
        }
    }
    assert_eq!(by_key.len(), 40);
    assert!(
        by_key.values().all(|ids| ids.len() == 1),
        "every caller of a key got the same saga"
    );
    assert_eq!(created, 40, "one start per key created its saga");
    let counts = one.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 40);
    // Each store wrote its starts in one statement: taking the keys in one order, neither
    // deadlocked and fell back to one start at a time.
    let written = transactions(&db).await;
    assert!(written <= 2, "40 sagas took {written} transactions");
    db.drop_schema().await;
}

/// Panics building its first command for an order whose id is 13.
fn unlucky() -> saga_core::SagaDefinition<Order> {
    saga_core::SagaDefinition::<Order>::builder("unlucky", 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |ctx| {
                assert!(ctx.input().id != 13, "unlucky order");
                Ok(ctx.input().clone())
            })
        })
        .build()
        .unwrap()
}

/// A panic in the definition's code at a start (its first command's input) parks that saga
/// as stuck with the panic's message; the starts written with it in one statement go on.
#[tokio::test]
async fn a_panic_in_the_definition_parks_its_own_saga_only() {
    let db = database().await;
    let client = Client::new(Arc::new(db.store()));
    let def = unlucky();
    // Queued together before any runs, so that they share statements.
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let (client, def) = (client.clone(), def.clone());
            tokio::spawn(async move { client.start(&def, &order(i)).await })
        })
        .collect();
    let mut unlucky_id = None;
    for (i, call) in join_all(calls).await.into_iter().enumerate() {
        let started = call
            .expect("no start panics")
            .expect("every start is written");
        assert!(started.created);
        if i == 13 {
            unlucky_id = Some(started.saga_id);
        }
    }
    let unlucky = client.summary(unlucky_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(unlucky.status, saga_core::SagaStatus::Stuck);
    let reason = unlucky.reason.unwrap();
    assert!(
        reason.contains(
            "failed at step `reserve` (forward): its input builder panicked: unlucky order"
        ),
        "{reason}"
    );
    let counts = client.count_by_status().await.unwrap();
    assert_eq!(counts.get(&saga_core::SagaStatus::Stuck), Some(&1));
    assert_eq!(counts.values().sum::<u64>(), 30);
    db.drop_schema().await;
}

#[tokio::test]
async fn starts_without_a_connection_all_get_the_error() {
    let db = database().await;
    // A pool of its own to close: the test's pool drops the schema at the end.
    let store = PgStore::builder(saga_tests::admin_pool().await)
        .schema(&db.schema)
        .build()
        .unwrap();
    store.pool().close().await;
    let client = Client::new(Arc::new(store));
    let started = start_at_once(&client, 20, |_| None).await;
    for s in started {
        let e = s.expect_err("no connection to start on");
        assert!(e.is_transient(), "a closed pool may open again: {e}");
        assert!(e.to_string().contains("closed"), "{e}");
    }
    db.drop_schema().await;
}

/// The outbox rows of the test's schema: id, saga, message id, and whether a relay holds it.
async fn outbox_rows(db: &TestDb) -> Vec<(i64, Uuid, Uuid, bool)> {
    let sql = format!(
        "SELECT id, saga_id, message_id, claimed_until > now() FROM \"{}\".outbox ORDER BY id",
        db.schema
    );
    sqlx::query_as(AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn starts_hand_their_first_commands_to_the_relay_of_an_orchestrator_beside_them() {
    let db = database().await;
    let store = Arc::new(db.store());
    let (sender, mut handed) = tokio::sync::mpsc::unbounded_channel();
    let relay = LocalRelay::new(sender);
    store.attach_relay(relay.clone());
    // Detaching a relay that is not the attached one changes nothing.
    store.detach_relay(&LocalRelay::new(tokio::sync::mpsc::unbounded_channel().0));
    let client = Client::new(store.clone());

    // 50 starts of 40 keys: 40 sagas.
    let created: HashSet<Uuid> = start_at_once(&client, 50, |i| Some(format!("k{}", i % 40)))
        .await
        .into_iter()
        .map(|s| s.unwrap())
        .filter(|s| s.created)
        .map(|s| s.saga_id)
        .collect();
    assert_eq!(created.len(), 40, "one saga per key");
    // Handed before the starts returned: each saga's first command, claimed for the relay.
    let mut records = Vec::new();
    while let Ok(batch) = handed.try_recv() {
        records.extend(batch);
    }
    let rows = outbox_rows(&db).await;
    assert_eq!(rows.len(), 40, "one first command per saga");
    assert_eq!(records.len(), rows.len(), "every row handed over");
    let by_id: HashMap<i64, (Uuid, Uuid, bool)> = rows
        .iter()
        .map(|&(id, saga, message, held)| (id, (saga, message, held)))
        .collect();
    let mut sagas = HashSet::new();
    for record in &records {
        let (saga, message, held) = by_id[&record.id];
        assert_eq!(record.envelope.message.id, message, "row {}", record.id);
        assert!(
            held,
            "row {} is claimed for the relay it went to",
            record.id
        );
        sagas.insert(saga);
    }
    assert_eq!(sagas, created);
    let lease = Duration::from_secs(10);
    assert!(
        store.claim_outbox(100, lease).await.unwrap().is_empty(),
        "no poller takes a handed row"
    );

    // Once detached, a start's command is left to the pollers.
    store.detach_relay(&relay);
    let lone = client
        .start(&order::definition(), &order(99))
        .await
        .unwrap()
        .saga_id;
    assert!(handed.try_recv().is_err(), "nothing handed once detached");
    let claimed = store.claim_outbox(100, lease).await.unwrap();
    let row = outbox_rows(&db)
        .await
        .into_iter()
        .find(|r| r.1 == lone)
        .expect("the lone saga's command");
    assert_eq!(
        claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
        [row.0],
        "a poller takes the lone saga's command"
    );
    db.drop_schema().await;
}
