//! An orchestrator whose runtime is dropped mid-run, with commands and results in flight, and a
//! new orchestrator on the same database: every saga finishes and no effect is applied twice.

use std::sync::Arc;
use std::time::Duration;

use saga_core::orchestrator::OrchestratorConfig;
use saga_core::{Client, InProcessTransport, Orchestrator, PgStore, QueryStore, SagaStatus};
use saga_tests::order::{self, Order};
use saga_tests::{database, wait_until};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;

const SAGAS: u32 = 60;

fn config() -> OrchestratorConfig {
    OrchestratorConfig {
        poll_interval: Duration::from_millis(100),
        outbox_lease: Duration::from_millis(500),
        batch_size: 8,
        ..OrchestratorConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_orchestrator_is_replaced_without_loss_or_double_effects() {
    let db = database().await;
    let transport = InProcessTransport::new();
    let shutdown = CancellationToken::new();
    let participants = order::participants(&db.pool, &db.schema).await;
    let mut workers = tokio::task::JoinSet::new();
    let mut participants = participants.workers;
    // Shipping starts only after the crash, so the crash finds every saga mid-run.
    let shipping = participants.pop().expect("shipping worker");
    assert_eq!(shipping.service(), "shipping");
    for worker in participants {
        workers.spawn(worker.run(Arc::new(transport.clone()), shutdown.clone()));
    }
    let store = Arc::new(db.store_with_lease(Duration::from_millis(500)));
    let client = Client::new(store.clone());
    let def = order::definition();
    let mut ids = Vec::new();
    for id in 0..SAGAS {
        let order = Order {
            id,
            fail_ship: id % 5 == 0,
            ..Order::default()
        };
        ids.push(client.start(&def, &order).await.unwrap().saga_id);
    }

    // The first orchestrator lives in a runtime of its own, with its own pool.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (url, schema) = (database_url(), db.schema.clone());
    let first_transport = transport.clone();
    let first_def = def.clone();
    doomed.spawn(async move {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let store = PgStore::builder(pool)
            .schema(schema)
            .outbox_lease(Duration::from_millis(500))
            .build()
            .unwrap();
        Orchestrator::builder(Arc::new(store), Arc::new(first_transport))
            .register(&first_def)
            .config(config())
            .build()
            .run(CancellationToken::new())
            .await
    });
    let ship_queue = saga_core::Destination::Service("shipping".into());
    let progressed = wait_until(Duration::from_secs(20), || async {
        transport.depth(&ship_queue) >= SAGAS as usize / 2
    })
    .await;
    assert!(progressed, "the first orchestrator made progress");
    // Dropped mid-run: its in-flight deliveries go back to the queue unacknowledged, and the
    // outbox rows it held in memory stay in the table.
    doomed.shutdown_background();
    let unfinished = store.count_by_status().await.unwrap();
    assert_eq!(
        unfinished.get(&SagaStatus::Running),
        Some(&u64::from(SAGAS)),
        "every saga was still running when it died"
    );
    workers.spawn(shipping.run(Arc::new(transport.clone()), shutdown.clone()));

    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(transport.clone()))
        .register(&def)
        .config(config())
        .build();
    let second = tokio::spawn(orchestrator.run(shutdown.clone()));
    let finished = wait_until(Duration::from_secs(30), || async {
        let counts = store.count_by_status().await.unwrap();
        counts.iter().all(|(s, _)| !s.is_active())
    })
    .await;
    let counts = store.count_by_status().await.unwrap();
    assert!(finished, "every saga finished: {counts:?}");
    assert_eq!(
        counts.get(&SagaStatus::Completed),
        Some(&u64::from(SAGAS - SAGAS / 5))
    );
    assert_eq!(
        counts.get(&SagaStatus::Compensated),
        Some(&u64::from(SAGAS / 5))
    );

    for (n, id) in ids.iter().enumerate() {
        let effects = order::effects(&db.pool, &db.schema, *id).await;
        let expected: &[&str] = if n % 5 == 0 {
            &["reserve", "charge", "refund", "release"]
        } else {
            &["reserve", "charge", "ship"]
        };
        assert_eq!(effects, expected, "saga #{n} {id}");
    }
    // Rows the dead orchestrator held (published or not) are taken over once their lease
    // lapses, published again (the duplicates are dropped), and deleted.
    let outbox = || async {
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\".outbox",
            db.schema
        )))
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), || async { outbox().await == 0 }).await,
        "the outbox is drained"
    );
    shutdown.cancel();
    second.await.unwrap().unwrap();
    while let Some(w) = workers.join_next().await {
        w.unwrap().unwrap();
    }
    db.drop_schema().await;
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| saga_tests::DEFAULT_DATABASE_URL.to_owned())
}
