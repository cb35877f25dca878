//! Upgrading a store whose sagas ran under an earlier version, on the real PostgreSQL.

use saga_core::Timer;
use saga_tests::database;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

const EVERY_COMMAND_TIMED: &str =
    include_str!("../../saga-core/migrations/store/20261207000001_every_command_timed.sql");

/// Commands dispatched before every command had a timeout: the migration gives the last
/// command of each active saga a timeout the engine reads, leaves finished sagas alone, and
/// adds nothing when run again.
#[tokio::test]
async fn the_last_command_of_each_active_saga_gets_a_timeout() {
    let db = database().await;
    let s = &db.schema;
    let (active, finished) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, status) in [(active, "running"), (finished, "completed")] {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{s}\".instances (id, saga, version, status, last_seq, created_at, updated_at) \
             VALUES ($1, 'order', 1, $2, 3, now(), now())"
        )))
        .bind(id)
        .bind(status)
        .execute(&db.pool)
        .await
        .unwrap();
        for (seq, step) in [(2, 0), (3, 1)] {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{s}\".events (saga_id, seq, kind, data, recorded_at) \
                 VALUES ($1, $2, 'dispatched', $3, now())"
            )))
            .bind(id)
            .bind(seq)
            .bind(serde_json::json!({
                "type": "dispatched", "step": step, "direction": "forward", "attempt": 2,
                "command_id": Uuid::new_v4(), "payload": null
            }))
            .execute(&db.pool)
            .await
            .unwrap();
        }
    }
    for _ in 0..2 {
        let mut conn = db.pool.acquire().await.unwrap();
        sqlx::query(AssertSqlSafe(format!("SET search_path TO \"{s}\"")))
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::raw_sql(AssertSqlSafe(EVERY_COMMAND_TIMED))
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("RESET search_path")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let timers: Vec<(Uuid, String, serde_json::Value, f64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT saga_id, key, timer, extract(epoch FROM due_at - now())::float8 FROM \"{s}\".timers"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(timers.len(), 1, "{timers:?}");
    let (saga, key, timer, due_in) = &timers[0];
    assert_eq!((saga, key.as_str()), (&active, "timeout:1:forward:2"));
    let timer: Timer = serde_json::from_value(timer.clone()).unwrap();
    assert_eq!(timer.key(), *key);
    assert!((50.0..=61.0).contains(due_in), "due in {due_in} s");
    db.drop_schema().await;
}
