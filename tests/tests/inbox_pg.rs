//! The inbox helper against the real PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use saga_core::worker::{CommandContext, StepError};
use saga_core::{Direction, Inbox};
use saga_tests::database;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

fn ctx(key: &str) -> CommandContext {
    CommandContext {
        saga_id: Uuid::new_v4(),
        saga: "order".into(),
        step: "charge".into(),
        step_index: 1,
        direction: Direction::Forward,
        attempt: 1,
        command_id: Uuid::new_v4(),
        command: "charge".into(),
        idempotency_key: key.into(),
        trace_id: None,
    }
}

async fn setup() -> (saga_tests::TestDb, Inbox, String) {
    let db = database().await;
    let inbox = Inbox::new(db.pool.clone(), &db.schema).unwrap();
    inbox.migrate().await.unwrap();
    let table = format!("\"{}\".ledger", db.schema);
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (amount int NOT NULL)"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    (db, inbox, table)
}

async fn charge(
    inbox: &Inbox,
    ctx: &CommandContext,
    table: &str,
    runs: &Arc<AtomicU32>,
    result: Result<i32, StepError>,
) -> Result<i32, StepError> {
    let insert = format!("INSERT INTO {table} (amount) VALUES (10)");
    let runs = Arc::clone(runs);
    inbox
        .run(ctx, |tx| {
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                sqlx::query(AssertSqlSafe(insert)).execute(&mut *tx).await?;
                result
            })
        })
        .await
}

async fn ledger(db: &saga_tests::TestDb, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_redelivery_returns_the_recorded_result_without_reapplying() {
    let (db, inbox, table) = setup().await;
    let runs = Arc::new(AtomicU32::new(0));
    let first = ctx("saga-1:1:forward");
    assert_eq!(charge(&inbox, &first, &table, &runs, Ok(7)).await, Ok(7));
    // A retry of the same step has a new command id and attempt, but the same key.
    let retry = CommandContext {
        attempt: 2,
        command_id: Uuid::new_v4(),
        ..first.clone()
    };
    assert_eq!(charge(&inbox, &retry, &table, &runs, Ok(8)).await, Ok(7));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(ledger(&db, &table).await, 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn retryable_failures_roll_back_and_terminal_ones_are_recorded() {
    let (db, inbox, table) = setup().await;
    let runs = Arc::new(AtomicU32::new(0));
    let c = ctx("k-retry");
    let flaky = charge(
        &inbox,
        &c,
        &table,
        &runs,
        Err(StepError::retryable("gateway down")),
    )
    .await;
    assert!(flaky.unwrap_err().is_retryable());
    assert_eq!(
        ledger(&db, &table).await,
        0,
        "the failed attempt's write rolled back"
    );
    assert_eq!(
        charge(&inbox, &c, &table, &runs, Ok(1)).await,
        Ok(1),
        "the next attempt runs afresh"
    );

    let d = ctx("k-terminal");
    let declined = charge(
        &inbox,
        &d,
        &table,
        &runs,
        Err(StepError::terminal("card declined")),
    )
    .await;
    assert_eq!(declined, Err(StepError::terminal("card declined")));
    let again = charge(&inbox, &d, &table, &runs, Ok(2)).await;
    assert_eq!(
        again,
        Err(StepError::terminal("card declined")),
        "a redelivery fails the same way"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(ledger(&db, &table).await, 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn concurrent_deliveries_apply_once() {
    let (db, inbox, table) = setup().await;
    let runs = Arc::new(AtomicU32::new(0));
    let c = ctx("k-concurrent");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (inbox, c, table, runs) = (inbox.clone(), c.clone(), table.clone(), Arc::clone(&runs));
        tasks.spawn(async move { charge(&inbox, &c, &table, &runs, Ok(5)).await });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap(), Ok(5));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(ledger(&db, &table).await, 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_forward_delivery_after_its_compensation_does_nothing() {
    let (db, inbox, table) = setup().await;
    let runs = Arc::new(AtomicU32::new(0));
    let saga_id = Uuid::new_v4();
    let key = |d: Direction| saga_core::Command::idempotency_key_for(saga_id, 1, d);
    let forward = CommandContext {
        saga_id,
        idempotency_key: key(Direction::Forward),
        ..ctx("")
    };
    let compensation = CommandContext {
        direction: Direction::Compensation,
        command: "refund".into(),
        idempotency_key: key(Direction::Compensation),
        ..forward.clone()
    };
    // The compensation runs first (the forward command sat in a backlog past its timeout).
    assert_eq!(
        charge(&inbox, &compensation, &table, &runs, Ok(0)).await,
        Ok(0)
    );
    let late = charge(&inbox, &forward, &table, &runs, Ok(10)).await;
    assert!(
        matches!(&late, Err(e) if !e.is_retryable() && e.message().contains("compensated")),
        "{late:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the late forward did not run"
    );
    assert_eq!(
        ledger(&db, &table).await,
        1,
        "only the compensation's write"
    );
    db.drop_schema().await;
}
