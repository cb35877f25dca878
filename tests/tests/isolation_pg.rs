//! One saga whose log cannot be applied does not hold back the others: its result is
//! dead-lettered with the reason, its timer is postponed, and the other sagas go on.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use saga_core::{
    Client, Command, Destination, InProcessTransport, Orchestrator, Outcome, Reply, RetryPolicy,
    SagaDefinition, SagaStatus, Transport,
};
use saga_tests::harness::config;
use saga_tests::{database, wait_until};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn definition() -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("solo", 1)
        .step("only", |s| {
            s.action("svc", "only", |ctx| Ok(*ctx.input()))
                .retry(RetryPolicy {
                    max_attempts: 3,
                    initial_backoff: Duration::from_millis(500),
                    max_backoff: Duration::from_millis(500),
                    multiplier: 1.0,
                    jitter: 0.0,
                    max_elapsed: None,
                })
        })
        .build()
        .unwrap()
}

/// Appends an event naming a step the definition lacks, so the saga's log no longer replays.
/// Like every writer of the log, it raises the saga's `last_seq`: a state kept in memory is
/// then read again from the log.
async fn corrupt(db: &saga_tests::TestDb, saga_id: Uuid) {
    let s = &db.schema;
    sqlx::query(AssertSqlSafe(format!(
        "WITH e AS (INSERT INTO \"{s}\".events (saga_id, seq, kind, data, recorded_at) \
         SELECT $1, max(seq) + 1, 'succeeded', \
         '{{\"type\":\"succeeded\",\"step\":99,\"direction\":\"forward\",\"attempt\":1,\"output\":null}}', now() \
         FROM \"{s}\".events WHERE saga_id = $1 RETURNING seq) \
         UPDATE \"{s}\".instances SET last_seq = (SELECT seq FROM e) WHERE id = $1"
    )))
    .bind(saga_id)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_saga_that_does_not_replay_is_isolated() {
    let db = database().await;
    let store = Arc::new(db.store());
    let transport = Arc::new(InProcessTransport::new());
    let def = definition();
    let shutdown = CancellationToken::new();
    let orchestrator = Orchestrator::builder(store.clone(), transport.clone())
        .register(&def)
        .config(config())
        .build();
    let run = tokio::spawn(orchestrator.run(shutdown.clone()));
    // The test is the participant.
    let mut commands = transport
        .consume(&Destination::Service("svc".into()))
        .await
        .unwrap();
    let client = Client::new(store.clone());
    let mut next_commands = async |n: usize| {
        let mut got = Vec::new();
        while got.len() < n {
            let delivery = commands.next().await.unwrap();
            got.push(Command::from_message(&delivery.message).unwrap());
            delivery.ack().await.unwrap();
        }
        got
    };
    let reply = |c: &Command, outcome: Outcome| Reply::to(c, outcome).to_envelope();
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(client.start(&def, &n).await.unwrap().saga_id);
    }
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let first = next_commands(3).await;
    let command_of = |id: Uuid| first.iter().find(|cmd| cmd.saga_id == id).unwrap().clone();

    // A and B fail retryably: each gets a retry timer 500 ms out.
    let flaky = || Outcome::Failure {
        error: "flaky".into(),
        retryable: true,
    };
    transport
        .publish(vec![
            reply(&command_of(a), flaky()),
            reply(&command_of(b), flaky()),
        ])
        .await
        .unwrap();
    // The retry timer, not the attempt's timeout timer (set when it was dispatched): only the
    // retry says the failure was applied.
    let retry_pending = |id: Uuid| {
        let (pool, schema) = (db.pool.clone(), db.schema.clone());
        async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                "SELECT count(*) FROM \"{schema}\".timers \
                 WHERE saga_id = $1 AND key LIKE 'retry:%' AND fired_at IS NULL"
            )))
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(
        wait_until(Duration::from_secs(5), || async {
            retry_pending(a).await == 1 && retry_pending(b).await == 1
        })
        .await
    );
    // Then A's and C's logs stop replaying (as after a definition changed without a version).
    corrupt(&db, a).await;
    corrupt(&db, c).await;

    // C's result is dead-lettered with the reason; B's retry still fires and B completes.
    transport
        .publish(vec![reply(
            &command_of(c),
            Outcome::Success {
                output: serde_json::json!(3),
            },
        )])
        .await
        .unwrap();
    let retry_b = next_commands(1).await.remove(0);
    assert_eq!((retry_b.saga_id, retry_b.attempt), (b, 2));
    transport
        .publish(vec![reply(
            &retry_b,
            Outcome::Success {
                output: serde_json::json!(2),
            },
        )])
        .await
        .unwrap();
    let done = wait_until(Duration::from_secs(10), || async {
        client.summary(b).await.unwrap().unwrap().status == SagaStatus::Completed
            && !transport.dead_letters(&Destination::Results).is_empty()
    })
    .await;
    let letters = transport.dead_letters(&Destination::Results);
    assert!(
        done,
        "B completed and C's result was dead-lettered: {letters:?}"
    );
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].1.contains("SAGA-R002"),
        "the reason names the replay error: {}",
        letters[0].1
    );

    // A's timer is postponed (once it came due), not fired in a loop.
    let due = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(AssertSqlSafe(format!(
            "SELECT min(due_at) FROM \"{}\".timers WHERE saga_id = $1 AND fired_at IS NULL",
            db.schema
        )))
        .bind(a)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let postponed = wait_until(Duration::from_secs(10), || async {
        due().await > chrono::Utc::now() + Duration::from_secs(20)
    })
    .await;
    assert!(postponed, "postponed to {}", due().await);
    shutdown.cancel();
    run.await.unwrap().unwrap();
    db.drop_schema().await;
}
