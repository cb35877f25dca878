//! Clocks that disagree, on the real PostgreSQL: due times, leases and the times in the log
//! follow the database's clock, whatever the clock of the process that writes them says.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use saga_core::{
    Client, InProcessTransport, Orchestrator, OutboxStore, PgStore, QueryStore, SagaDefinition,
    SagaStatus,
};
use saga_tests::{TestDb, database, wait_until};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;

/// A store in the test's schema whose process clock is `skew` off.
fn skewed(db: &TestDb, skew: chrono::Duration) -> PgStore {
    PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .local_clock(Arc::new(move || Utc::now() + skew))
        .build()
        .unwrap()
}

fn approval() -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("approval", 1)
        .step("approve", |s| s.wait_for::<bool>("approved", |_| Ok(())))
        .build()
        .unwrap()
}

/// A client whose clock runs an hour ahead sends a signal: it is due at the database's
/// `now()`, so an orchestrator applies it at once (not an hour later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_from_a_client_whose_clock_runs_ahead_is_applied_at_once() {
    let db = database().await;
    let def = approval();
    let store = Arc::new(db.store());
    let shutdown = CancellationToken::new();
    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(InProcessTransport::new()))
        .register(&def)
        .config(saga_tests::harness::config())
        .build();
    let task = tokio::spawn(orchestrator.run(shutdown.clone()));
    let id = Client::new(store.clone())
        .start(&def, &1)
        .await
        .unwrap()
        .saga_id;
    let ahead = Client::new(Arc::new(skewed(&db, chrono::Duration::hours(1))));
    ahead.signal(id, "approved", &true).await.unwrap();
    let done = wait_until(Duration::from_secs(10), || async {
        store.summary(id).await.unwrap().unwrap().status == SagaStatus::Completed
    })
    .await;
    assert!(done, "the signal was applied");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    db.drop_schema().await;
}

/// A relay's poller whose clock runs an hour ahead does not take an outbox row another
/// process claimed a moment ago: leases are read by the database's clock.
#[tokio::test]
async fn a_poller_whose_clock_runs_ahead_leaves_rows_another_holds() {
    let db = database().await;
    let store = db.store();
    Client::new(Arc::new(store.clone()))
        .start(&approval_command(), &1)
        .await
        .unwrap();
    let claimed = store
        .claim_outbox(10, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let ahead = skewed(&db, chrono::Duration::hours(1));
    let taken = ahead
        .claim_outbox(10, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(taken.is_empty(), "took a row another holds: {taken:?}");
    db.drop_schema().await;
}

fn approval_command() -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("command", 1)
        .step("only", |s| {
            s.action("svc", "only", |ctx| Ok(*ctx.input()))
                .timeout(Duration::from_secs(30))
        })
        .build()
        .unwrap()
}

/// A process whose clock runs an hour behind starts a saga: its events are recorded at the
/// database's time, and its first command's timeout is due 30 s from the database's now.
#[tokio::test]
async fn times_written_by_a_process_whose_clock_is_behind_follow_the_database() {
    let db = database().await;
    let behind = skewed(&db, chrono::Duration::hours(-1));
    Client::new(Arc::new(behind))
        .start(&approval_command(), &1)
        .await
        .unwrap();
    let (recorded, due): (f64, f64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT (SELECT extract(epoch FROM now() - max(recorded_at)) FROM \"{0}\".events)::float8, \
         (SELECT extract(epoch FROM max(due_at) - now()) FROM \"{0}\".timers)::float8",
        db.schema
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(recorded.abs() < 60.0, "recorded {recorded} s before now");
    assert!((due - 30.0).abs() < 60.0, "due in {due} s");
    db.drop_schema().await;
}
