//! Purge against the real PostgreSQL (and the in-memory store, which must agree): a saga goes
//! when it finished long enough ago, with its events and timers, however it finished.

use std::sync::Arc;

use chrono::{Duration, Utc};
use std::time::Duration as StdDuration;

use saga_core::{Client, InputError, MemoryStore, SagaDefinition, SagaStatus};
use saga_tests::database;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

/// Finishes at its start: the first step's command cannot be built, so nothing ran and there
/// is nothing to compensate.
fn unbuildable() -> SagaDefinition<Value> {
    SagaDefinition::builder("unbuildable", 1)
        .step("first", |s| {
            s.action("svc", "first", |_| -> Result<Value, InputError> {
                Err(InputError::new("no such order"))
            })
        })
        .build()
        .unwrap()
}

/// Waits on its first step (no orchestrator runs here), timed by a timer row.
fn waiting() -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("waiting", 1)
        .step("first", |s| {
            s.action("svc", "first", |c| {
                Ok::<Value, InputError>(c.input().clone())
            })
            .timeout(StdDuration::from_secs(60))
        })
        .build()
        .unwrap()
}

/// Starts one saga of each kind and purges; returns the ids (finished, running).
async fn purge_takes_only_finished_sagas(client: &Client) -> (uuid::Uuid, uuid::Uuid) {
    let finished = client
        .start(&unbuildable(), &json!({}))
        .await
        .unwrap()
        .saga_id;
    let running = client.start(&waiting(), &json!({})).await.unwrap().saga_id;
    let status = |id| async move { client.summary(id).await.unwrap().unwrap().status };
    assert_eq!(status(finished).await, SagaStatus::Compensated);
    assert_eq!(status(running).await, SagaStatus::Running);

    assert_eq!(
        client.purge(Utc::now() - Duration::hours(1)).await.unwrap(),
        0,
        "nothing finished an hour ago"
    );
    assert_eq!(
        client
            .purge(Utc::now() + Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    assert!(client.summary(finished).await.unwrap().is_none());
    assert_eq!(status(running).await, SagaStatus::Running);
    (finished, running)
}

#[tokio::test]
async fn a_saga_finished_at_its_start_is_purged_with_its_rows() {
    let db = database().await;
    let store = Arc::new(db.store());
    let client = Client::new(store.clone());
    let (finished, running) = purge_takes_only_finished_sagas(&client).await;
    let count = |table: &'static str, id: uuid::Uuid| {
        let (pool, schema) = (db.pool.clone(), db.schema.clone());
        async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                "SELECT count(*) FROM \"{schema}\".{table} WHERE saga_id = $1"
            )))
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(count("events", finished).await, 0);
    assert_eq!(count("timers", finished).await, 0);
    assert!(count("events", running).await > 0);
    assert!(
        count("timers", running).await > 0,
        "the running saga's step timeout"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn the_memory_store_purges_the_same_way() {
    let client = Client::new(Arc::new(MemoryStore::new()));
    purge_takes_only_finished_sagas(&client).await;
}
