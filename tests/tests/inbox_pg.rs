//! The worker's inbox against the real PostgreSQL: each command runs in a transaction that
//! records its outcome under its idempotency key, fences answer from the record, and a
//! command the worker will not run is answered before it is dead-lettered.
//!
//! Commands go straight into the service's queue of an in-process transport; the answers are
//! read from the results queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use saga_core::message::headers;
use saga_core::transport::Delivery;
use saga_core::worker::{CommandContext, StepError, handler_fn};
use saga_core::{
    Command, Destination, Direction, InProcessTransport, Outcome, Reply, Transport, Worker,
};
use saga_tests::{TestDb, database};
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A payment worker whose `charge` writes a ledger row in its transaction, then does what
/// its input says: `ok`, `retry`, `decline`, `panic`, `hang`, `huge` (an output over the size
/// limit) or `wait` (until `release` is notified).
struct Payment {
    db: TestDb,
    transport: Arc<InProcessTransport>,
    results: BoxStream<'static, Delivery>,
    runs: Arc<AtomicU32>,
    release: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<saga_core::Result<()>>,
}

impl Payment {
    async fn start(with_inbox: bool) -> Self {
        let db = database().await;
        let table = format!("\"{}\".ledger", db.schema);
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {table} (saga_id uuid NOT NULL)"
        )))
        .execute(&db.pool)
        .await
        .unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (r, n) = (Arc::clone(&runs), Arc::clone(&release));
        let charge = handler_fn(move |input: Value, ctx: CommandContext| {
            let (runs, release, table) = (Arc::clone(&r), Arc::clone(&n), table.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let mut tx = ctx.transaction().await?;
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {table} (saga_id) VALUES ($1)"
                )))
                .bind(ctx.saga_id)
                .execute(&mut *tx)
                .await?;
                drop(tx);
                match input["then"].as_str().unwrap_or("ok") {
                    "retry" => Err(StepError::retryable("gateway down")),
                    "decline" => Err(StepError::terminal("card declined")),
                    "panic" => panic!("charge bug"),
                    "hang" => std::future::pending().await,
                    "huge" => Ok(json!("x".repeat(2 << 20))),
                    "wait" => {
                        release.notified().await;
                        Ok(json!("ch-1"))
                    }
                    _ => Ok(json!("ch-1")),
                }
            }
        });
        let builder = if with_inbox {
            Worker::builder("payment", db.inbox().await)
        } else {
            Worker::at_least_once("payment")
        };
        let worker = builder.handler("charge", charge).concurrency(8).build();
        let transport = Arc::new(InProcessTransport::new());
        transport
            .declare(&[Destination::Service("payment".into())])
            .await
            .unwrap();
        let results = transport.consume(&Destination::Results).await.unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(transport.clone(), shutdown.clone()));
        Payment {
            db,
            transport,
            results,
            runs,
            release,
            shutdown,
            task,
        }
    }

    async fn send(&self, command: &Command) {
        self.transport
            .publish(vec![command.to_envelope()])
            .await
            .unwrap();
    }

    async fn answer(&mut self) -> Reply {
        let delivery = tokio::time::timeout(Duration::from_secs(10), self.results.next())
            .await
            .expect("an answer within 10 s")
            .expect("the results stream is open");
        let reply = Reply::from_message(&delivery.message).unwrap();
        delivery.ack().await.unwrap();
        reply
    }

    async fn ledger(&self, saga_id: Uuid) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\".ledger WHERE saga_id = $1",
            self.db.schema
        )))
        .bind(saga_id)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        self.db.drop_schema().await;
    }
}

/// Attempt `attempt` of the charge step of saga `saga_id`, doing `then`.
fn charge(saga_id: Uuid, attempt: u32, then: &str) -> Command {
    Command {
        command_id: Uuid::new_v4(),
        saga_id,
        saga: "order".into(),
        step: 1,
        step_name: "charge".into(),
        direction: Direction::Forward,
        attempt,
        service: "payment".into(),
        command: "charge".into(),
        idempotency_key: Command::idempotency_key_for(saga_id, 1, Direction::Forward),
        timeout_ms: Some(2_000),
        input_type: None,
        payload: json!({ "then": then }),
    }
}

fn fence(saga_id: Uuid) -> Command {
    Command {
        direction: Direction::Fence,
        payload: Value::Null,
        ..charge(saga_id, 1, "")
    }
}

fn ok(output: &str) -> Outcome {
    Outcome::Success {
        output: json!(output),
    }
}

#[tokio::test]
async fn a_redelivery_or_retry_gets_the_recorded_result_without_running_again() {
    let mut p = Payment::start(true).await;
    let saga = Uuid::new_v4();
    p.send(&charge(saga, 1, "ok")).await;
    assert_eq!(p.answer().await.outcome, ok("ch-1"));
    // A retry of the same step: a new command id and attempt, the same key.
    p.send(&charge(saga, 2, "decline")).await;
    let again = p.answer().await;
    assert_eq!((again.attempt, again.outcome), (2, ok("ch-1")));
    assert_eq!(p.runs.load(Ordering::SeqCst), 1);
    assert_eq!(p.ledger(saga).await, 1);
    p.stop().await;
}

#[tokio::test]
async fn failures_roll_the_writes_back_and_terminal_ones_are_recorded() {
    let mut p = Payment::start(true).await;
    let saga = Uuid::new_v4();
    for then in ["retry", "panic"] {
        p.send(&charge(saga, 1, then)).await;
        let answer = p.answer().await;
        assert!(
            matches!(
                answer.outcome,
                Outcome::Failure {
                    retryable: true,
                    ..
                }
            ),
            "{then}: {:?}",
            answer.outcome
        );
        assert_eq!(p.ledger(saga).await, 0, "{then}: the write rolled back");
    }
    p.send(&charge(saga, 2, "decline")).await;
    let declined = p.answer().await.outcome;
    assert_eq!(
        declined,
        Outcome::Failure {
            error: "card declined".into(),
            retryable: false
        }
    );
    assert_eq!(
        p.ledger(saga).await,
        0,
        "a terminal failure's write rolled back"
    );
    p.send(&charge(saga, 3, "ok")).await;
    assert_eq!(
        p.answer().await.outcome,
        declined,
        "recorded: a redelivery fails the same way"
    );
    assert_eq!(p.runs.load(Ordering::SeqCst), 3);
    p.stop().await;
}

/// A handler that hangs past the command's timeout is aborted and its transaction rolled
/// back: its write never lands, and the next attempt runs afresh.
#[tokio::test]
async fn a_hung_handler_is_aborted_and_its_writes_rolled_back() {
    let mut p = Payment::start(true).await;
    let saga = Uuid::new_v4();
    let hang = Command {
        timeout_ms: Some(300),
        input_type: None,
        ..charge(saga, 1, "hang")
    };
    p.send(&hang).await;
    let answer = p.answer().await.outcome;
    assert!(
        matches!(&answer, Outcome::Failure { retryable: true, error } if error.contains("did not finish")),
        "{answer:?}"
    );
    assert_eq!(p.ledger(saga).await, 0);
    p.send(&charge(saga, 2, "ok")).await;
    assert_eq!(p.answer().await.outcome, ok("ch-1"));
    assert_eq!(p.ledger(saga).await, 1);
    p.stop().await;
}

#[tokio::test]
async fn concurrent_deliveries_apply_once() {
    let mut p = Payment::start(true).await;
    let saga = Uuid::new_v4();
    for attempt in 1..=8 {
        p.send(&charge(saga, attempt, "ok")).await;
    }
    for _ in 0..8 {
        assert_eq!(p.answer().await.outcome, ok("ch-1"));
    }
    assert_eq!(p.runs.load(Ordering::SeqCst), 1);
    assert_eq!(p.ledger(saga).await, 1);
    p.stop().await;
}

/// A fence before any delivery writes a tombstone: it answers `fenced`, and every later
/// delivery of any attempt answers `fenced` without running the handler.
#[tokio::test]
async fn a_fence_stops_every_later_delivery() {
    let mut p = Payment::start(true).await;
    let saga = Uuid::new_v4();
    p.send(&fence(saga)).await;
    let answer = p.answer().await;
    assert_eq!(answer.direction, Direction::Fence);
    assert!(
        matches!(answer.outcome, Outcome::Fenced { .. }),
        "{answer:?}"
    );
    for attempt in 1..=2 {
        p.send(&charge(saga, attempt, "ok")).await;
        assert!(matches!(p.answer().await.outcome, Outcome::Fenced { .. }));
    }
    assert_eq!(p.runs.load(Ordering::SeqCst), 0);
    assert_eq!(p.ledger(saga).await, 0);
    p.stop().await;
}

/// A fence after the step applied answers with its recorded output; after a recorded
/// terminal failure, `fenced`.
#[tokio::test]
async fn a_fence_answers_what_the_inbox_recorded() {
    let mut p = Payment::start(true).await;
    let (applied, declined) = (Uuid::new_v4(), Uuid::new_v4());
    p.send(&charge(applied, 1, "ok")).await;
    p.send(&charge(declined, 1, "decline")).await;
    p.answer().await;
    p.answer().await;
    p.send(&fence(applied)).await;
    assert_eq!(p.answer().await.outcome, ok("ch-1"));
    p.send(&fence(declined)).await;
    let answer = p.answer().await.outcome;
    assert!(
        matches!(&answer, Outcome::Fenced { detail } if detail.contains("card declined")),
        "{answer:?}"
    );
    p.stop().await;
}

/// A fence that arrives while a delivery of its step runs waits for that delivery's
/// transaction, then answers with its outcome: never both applied and fenced.
#[tokio::test]
async fn a_fence_waits_for_a_running_delivery() {
    let mut p = Payment::start(true).await;
    let saga = Uuid::new_v4();
    p.send(&charge(saga, 1, "wait")).await;
    saga_tests::wait_until(Duration::from_secs(5), || async {
        p.runs.load(Ordering::SeqCst) == 1
    })
    .await;
    p.send(&fence(saga)).await;
    // The fence is blocked on the running delivery's key until it commits.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), p.results.next())
            .await
            .is_err(),
        "nothing answers while the charge runs"
    );
    p.release.notify_one();
    let (first, second) = (p.answer().await, p.answer().await);
    assert_eq!(
        (first.direction, first.outcome),
        (Direction::Forward, ok("ch-1"))
    );
    assert_eq!(
        (second.direction, second.outcome),
        (Direction::Fence, ok("ch-1"))
    );
    assert_eq!(p.ledger(saga).await, 1);
    p.stop().await;
}

/// An output over the size limit cannot be sent: the step's writes roll back and it fails for
/// good (recorded), rather than apply with no result to tell of it.
#[tokio::test]
async fn an_output_too_large_rolls_back_and_fails_for_good() {
    let mut p = Payment::start(true).await;
    let saga = Uuid::new_v4();
    p.send(&charge(saga, 1, "huge")).await;
    let answer = p.answer().await.outcome;
    assert!(
        matches!(&answer, Outcome::Failure { retryable: false, error } if error.contains("too large")),
        "{answer:?}"
    );
    assert_eq!(p.ledger(saga).await, 0);
    p.stop().await;
}

/// A worker without an inbox cannot fence; its handlers have no transaction.
#[tokio::test]
async fn an_at_least_once_worker_says_it_cannot_fence() {
    let mut p = Payment::start(false).await;
    let saga = Uuid::new_v4();
    p.send(&fence(saga)).await;
    let answer = p.answer().await.outcome;
    assert!(
        matches!(&answer, Outcome::Unfenceable { detail } if detail.contains("cannot fence")),
        "{answer:?}"
    );
    p.send(&charge(saga, 1, "ok")).await;
    let answer = p.answer().await.outcome;
    assert!(
        matches!(&answer, Outcome::Failure { retryable: false, error } if error.contains("without an inbox")),
        "{answer:?}"
    );
    p.stop().await;
}

/// A command the worker will not run is answered before it is dead-lettered, so its saga
/// does not wait for an answer that never comes. One it cannot read (a schema version it does
/// not read, a body that does not parse, too large) has its key fenced: the answer is
/// `fenced`, and a readable copy of it that comes later does not run. One for another service
/// is answered with a terminal failure (this inbox is not where its step is recorded).
#[tokio::test]
async fn a_refused_command_is_answered_then_dead_lettered() {
    let mut p = Payment::start(true).await;
    let queue = Destination::Service("payment".into());
    let sagas: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let mut future = charge(sagas[0], 1, "ok").to_envelope();
    future
        .message
        .headers
        .insert(headers::SCHEMA_VERSION.into(), "99".into());
    let mut garbled = charge(sagas[1], 1, "ok").to_envelope();
    garbled.message.body = b"{not json".to_vec();
    let mut huge = charge(sagas[2], 1, "ok").to_envelope();
    huge.message.body = vec![b' '; (1 << 20) + 1];
    let misrouted = Command {
        service: "shipping".into(),
        ..charge(sagas[3], 1, "ok")
    }
    .to_envelope();
    let misrouted = saga_core::Envelope {
        destination: queue.clone(),
        ..misrouted
    };
    for envelope in [future, garbled, huge, misrouted] {
        p.send_envelope(envelope).await;
    }
    for _ in 0..4 {
        let reply = p.answer().await;
        if reply.saga_id == sagas[3] {
            assert!(
                matches!(&reply.outcome, Outcome::Failure { retryable: false, error } if error.contains("cannot run this command")),
                "{reply:?}"
            );
        } else {
            assert!(
                matches!(&reply.outcome, Outcome::Fenced { .. }),
                "{reply:?}"
            );
        }
    }
    assert_eq!(p.transport.dead_letters(&queue).len(), 4);
    // A readable copy of a refused command finds the tombstone.
    p.send(&charge(sagas[0], 1, "ok")).await;
    assert!(matches!(p.answer().await.outcome, Outcome::Fenced { .. }));
    assert_eq!(p.runs.load(Ordering::SeqCst), 0);
    p.stop().await;
}

impl Payment {
    async fn send_envelope(&self, envelope: saga_core::Envelope) {
        self.transport.publish(vec![envelope]).await.unwrap();
    }
}

#[tokio::test]
async fn a_purge_forgets_old_records_but_never_takes_their_keys_for_new_ones() {
    let mut p = Payment::start(true).await;
    // A saga started two days ago (its id, a UUIDv7, holds its start) and one started now.
    let two_days_ago = chrono::Utc::now() - chrono::TimeDelta::days(2);
    let old = Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        two_days_ago.timestamp() as u64,
        0,
    ));
    let recent = Uuid::now_v7();
    for saga in [old, recent] {
        p.send(&charge(saga, 1, "ok")).await;
        assert_eq!(p.answer().await.outcome, ok("ch-1"));
    }
    // The old saga's record dates from its time.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".inbox SET created_at = $2 WHERE saga_id = $1",
        p.db.schema
    )))
    .bind(old)
    .bind(two_days_ago)
    .execute(&p.db.pool)
    .await
    .unwrap();
    let inbox = saga_core::Inbox::new(p.db.pool.clone(), &p.db.schema).unwrap();
    // A horizon that recent would refuse the sagas in flight.
    let refused = inbox.purge(chrono::Utc::now() - chrono::TimeDelta::hours(1));
    assert!(matches!(refused.await, Err(saga_core::Error::Config(_))));
    let purged = inbox
        .purge(chrono::Utc::now() - chrono::TimeDelta::days(1))
        .await
        .unwrap();
    assert_eq!(purged, 1);

    // A late delivery of the old saga's charge is not taken for a new one: it cannot tell.
    p.send(&charge(old, 2, "ok")).await;
    match p.answer().await.outcome {
        Outcome::Failure {
            retryable: true,
            error,
        } => assert!(error.contains("latest purge"), "{error}"),
        other => panic!("expected a retryable failure, got {other:?}"),
    }
    // Nor does a late fence write a tombstone: the step counts as applied.
    p.send(&fence(old)).await;
    assert!(matches!(
        p.answer().await.outcome,
        Outcome::Unfenceable { .. }
    ));
    assert_eq!(p.runs.load(Ordering::SeqCst), 2);
    assert_eq!(p.ledger(old).await, 1);

    // The recent saga's record stays; a saga started now runs as usual.
    p.send(&charge(recent, 2, "decline")).await;
    assert_eq!(p.answer().await.outcome, ok("ch-1"));
    p.send(&charge(Uuid::now_v7(), 1, "ok")).await;
    assert_eq!(p.answer().await.outcome, ok("ch-1"));
    assert_eq!(p.runs.load(Ordering::SeqCst), 3);
    p.stop().await;
}
