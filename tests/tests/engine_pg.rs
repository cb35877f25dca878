//! The core engine against the real PostgreSQL, with the in-process transport.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use saga_core::orchestrator::OrchestratorConfig;
use saga_core::store::SagaSummary;
use saga_core::{
    Client, Destination, Direction, Event, InProcessTransport, Orchestrator, Outcome, QueryStore,
    Reply, SagaDefinition, SagaStatus, Transport, Worker,
};
use saga_tests::order::{self, Order};
use saga_tests::{TestDb, database, wait_until};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Harness {
    db: TestDb,
    client: Client,
    store: Arc<saga_core::PgStore>,
    transport: InProcessTransport,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<saga_core::Result<()>>,
    runs: Vec<(&'static str, Arc<std::sync::atomic::AtomicU32>)>,
}

fn config() -> OrchestratorConfig {
    OrchestratorConfig {
        poll_interval: Duration::from_millis(100),
        outbox_lease: Duration::from_secs(1),
        ..OrchestratorConfig::default()
    }
}

async fn harness() -> Harness {
    harness_with(&order::definition(), None).await.0
}

/// A harness running `definition`, with every participant but `held`'s, which it returns
/// unstarted.
async fn harness_with(
    definition: &SagaDefinition<Order>,
    held: Option<&str>,
) -> (Harness, Option<Worker>) {
    let db = database().await;
    let store = Arc::new(db.store_with_lease(Duration::from_secs(1)));
    let transport = InProcessTransport::new();
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let participants = order::participants(&db.pool, &db.schema).await;
    let mut kept = None;
    for worker in participants.workers {
        if Some(worker.service()) == held {
            kept = Some(worker);
        } else {
            tasks.spawn(worker.run(Arc::new(transport.clone()), shutdown.clone()));
        }
    }
    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(transport.clone()))
        .register(definition)
        .config(config())
        .build();
    tasks.spawn(orchestrator.run(shutdown.clone()));
    let harness = Harness {
        client: Client::new(store.clone()),
        db,
        store,
        transport,
        shutdown,
        tasks,
        runs: participants.runs,
    };
    (harness, kept)
}

impl Harness {
    async fn start(&self, order: Order) -> Uuid {
        self.client
            .start(&order::definition(), &order)
            .await
            .expect("start")
            .saga_id
    }

    async fn finished(&self, saga_id: Uuid) -> SagaSummary {
        let done = wait_until(Duration::from_secs(20), || async {
            let s = self.client.summary(saga_id).await.unwrap().unwrap();
            !s.status.is_active()
        })
        .await;
        let summary = self.client.summary(saga_id).await.unwrap().unwrap();
        assert!(done, "saga {saga_id} did not finish: {summary:?}");
        summary
    }

    async fn effects(&self, saga_id: Uuid) -> Vec<String> {
        order::effects(&self.db.pool, &self.db.schema, saga_id).await
    }

    fn runs(&self, action: &str) -> u32 {
        self.runs
            .iter()
            .find(|(a, _)| *a == action)
            .unwrap()
            .1
            .load(Ordering::SeqCst)
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(result) = self.tasks.join_next().await {
            result
                .expect("task did not panic")
                .expect("task ended cleanly");
        }
        assert_eq!(outbox_rows(&self.db).await, 0, "the outbox is drained");
        self.db.drop_schema().await;
    }
}

/// The rows left in the outbox of `db`'s schema.
async fn outbox_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".outbox",
        db.schema
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn kinds(history: &[saga_core::RecordedEvent]) -> Vec<(&'static str, Option<(u32, Direction)>)> {
    history
        .iter()
        .map(|r| {
            let at = match &r.event {
                Event::Dispatched {
                    step, direction, ..
                }
                | Event::Succeeded {
                    step, direction, ..
                } => Some((*step, *direction)),
                _ => None,
            };
            (r.event.kind(), at)
        })
        .collect()
}

#[tokio::test]
async fn happy_path_completes_with_each_step_once() {
    let h = harness().await;
    let id = h
        .start(Order {
            id: 1,
            ..Order::default()
        })
        .await;
    assert_eq!(h.finished(id).await.status, SagaStatus::Completed);
    let history = h.client.history(id).await.unwrap();
    use Direction::Forward as F;
    assert_eq!(
        kinds(&history),
        [
            ("started", None),
            ("dispatched", Some((0, F))),
            ("succeeded", Some((0, F))),
            ("dispatched", Some((1, F))),
            ("succeeded", Some((1, F))),
            ("dispatched", Some((2, F))),
            ("succeeded", Some((2, F))),
            ("completed", None),
        ]
    );
    assert_eq!(
        history.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(h.effects(id).await, ["reserve", "charge", "ship"]);
    h.stop().await;
}

#[tokio::test]
async fn terminal_failure_compensates_in_reverse_order() {
    let h = harness().await;
    let id = h
        .start(Order {
            id: 2,
            fail_ship: true,
            ..Order::default()
        })
        .await;
    let summary = h.finished(id).await;
    assert_eq!(summary.status, SagaStatus::Compensated);
    assert!(summary.reason.unwrap().contains("address undeliverable"));
    assert_eq!(
        h.effects(id).await,
        ["reserve", "charge", "refund", "release"]
    );
    let compensations: Vec<u32> = h
        .client
        .history(id)
        .await
        .unwrap()
        .iter()
        .filter_map(|r| match r.event {
            Event::Succeeded {
                step,
                direction: Direction::Compensation,
                ..
            } => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(compensations, [1, 0]);
    h.stop().await;
}

async fn retry_delays(h: &Harness, saga_id: Uuid) -> Vec<(String, Duration)> {
    let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT key, set_at, due_at FROM \"{}\".timers WHERE saga_id = $1 AND key LIKE 'retry:%' ORDER BY set_at",
        h.db.schema
    )))
    .bind(saga_id)
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(key, set_at, due_at)| (key, (due_at - set_at).to_std().unwrap()))
        .collect()
}

#[tokio::test]
async fn retryable_failure_backs_off_by_the_policy_then_succeeds() {
    let h = harness().await;
    let id = h
        .start(Order {
            id: 3,
            flaky_charge: 2,
            ..Order::default()
        })
        .await;
    assert_eq!(h.finished(id).await.status, SagaStatus::Completed);
    let delays = retry_delays(&h, id).await;
    let keys: Vec<&str> = delays.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["retry:1:forward:2", "retry:1:forward:3"]);
    let policy = order::retry();
    for (failed_attempt, (_, delay)) in (1..).zip(&delays) {
        let (low, high) = policy.delay_bounds(failed_attempt);
        assert!(
            low <= *delay && *delay <= high,
            "attempt {failed_attempt}: {delay:?} outside {low:?}..={high:?}"
        );
    }
    assert_eq!(h.effects(id).await, ["reserve", "charge", "ship"]);
    assert_eq!(h.runs("charge"), 3);
    h.stop().await;
}

#[tokio::test]
async fn exhausted_retries_compensate() {
    let h = harness().await;
    let id = h
        .start(Order {
            id: 4,
            flaky_charge: 5,
            ..Order::default()
        })
        .await;
    let summary = h.finished(id).await;
    assert_eq!(summary.status, SagaStatus::Compensated);
    assert!(summary.reason.unwrap().contains("failed after 3 attempts"));
    assert_eq!(retry_delays(&h, id).await.len(), 2);
    assert_eq!(h.effects(id).await, ["reserve", "release"]);
    h.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_failed_attempt() {
    let h = harness().await;
    let id = h
        .start(Order {
            id: 5,
            panic_reserve: true,
            ..Order::default()
        })
        .await;
    assert_eq!(h.finished(id).await.status, SagaStatus::Completed);
    let failed = h
        .client
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .find_map(|r| match r.event {
            Event::Failed {
                error, retryable, ..
            } => Some((error, retryable)),
            _ => None,
        });
    assert_eq!(
        failed,
        Some(("handler panicked: inventory handler bug".to_owned(), true))
    );
    assert_eq!(h.effects(id).await, ["reserve", "charge", "ship"]);
    h.stop().await;
}

#[tokio::test]
async fn duplicate_results_are_dropped_and_unknown_ones_dead_lettered() {
    let h = harness().await;
    let id = h
        .start(Order {
            id: 6,
            ..Order::default()
        })
        .await;
    h.finished(id).await;
    let history = h.client.history(id).await.unwrap();
    let Some((step, attempt, command_id)) = history.iter().find_map(|r| match r.event {
        Event::Dispatched {
            step,
            attempt,
            command_id,
            ..
        } => Some((step, attempt, command_id)),
        _ => None,
    }) else {
        panic!("no dispatch in {history:?}")
    };
    let duplicate = Reply {
        saga_id: id,
        step,
        direction: Direction::Forward,
        attempt,
        command_id,
        outcome: Outcome::Success {
            output: serde_json::json!("again"),
        },
    };
    let unknown_saga = Reply {
        saga_id: Uuid::new_v4(),
        ..duplicate.clone()
    };
    let unknown_command = Reply {
        command_id: Uuid::new_v4(),
        ..duplicate.clone()
    };
    let mut malformed = duplicate.to_envelope();
    malformed.message.body = b"{not json".to_vec();
    h.transport
        .publish(vec![
            duplicate.to_envelope(),
            unknown_saga.to_envelope(),
            unknown_command.to_envelope(),
            malformed,
        ])
        .await
        .unwrap();
    let dead = wait_until(Duration::from_secs(10), || async {
        h.transport.dead_letters(&Destination::Results).len() == 3
            && h.transport.depth(&Destination::Results) == 0
    })
    .await;
    let letters = h.transport.dead_letters(&Destination::Results);
    assert!(dead, "three results dead-lettered: {letters:?}");
    let reasons: Vec<&str> = letters.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("unknown saga")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("sent no command")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("invalid result")),
        "{reasons:?}"
    );
    // The duplicate was acknowledged and dropped: the log did not change.
    assert_eq!(h.client.history(id).await.unwrap(), history);
    assert_eq!(h.effects(id).await, ["reserve", "charge", "ship"]);
    h.stop().await;
}

#[tokio::test]
async fn a_business_key_starts_one_saga() {
    let h = harness().await;
    let def = order::definition();
    let first = h
        .client
        .start_with_key(
            &def,
            &Order {
                id: 7,
                ..Order::default()
            },
            "order-7",
        )
        .await
        .unwrap();
    let second = h
        .client
        .start_with_key(
            &def,
            &Order {
                id: 7,
                ..Order::default()
            },
            "order-7",
        )
        .await
        .unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.saga_id, second.saga_id);
    h.finished(first.saga_id).await;
    let counts = h.store.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 1);
    assert_eq!(
        h.effects(first.saga_id).await,
        ["reserve", "charge", "ship"]
    );
    h.stop().await;
}

#[tokio::test]
async fn start_joins_the_callers_transaction() {
    let h = harness().await;
    let def = order::definition();
    let mut tx = h.db.pool.begin().await.unwrap();
    let rolled_back = h
        .store
        .start_using(&mut tx, &def, &Order::default(), None)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(h.client.summary(rolled_back.saga_id).await.unwrap(), None);

    let mut tx = h.db.pool.begin().await.unwrap();
    let committed = h
        .store
        .start_using(&mut tx, &def, &Order::default(), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        h.finished(committed.saga_id).await.status,
        SagaStatus::Completed
    );
    h.stop().await;
}

#[tokio::test]
async fn an_unroutable_command_fails_its_step() {
    let db = database().await;
    // The transport declares no queue for `nowhere`, so the command cannot be routed.
    let transport = UndeclaredTransport(Arc::new(InProcessTransport::new()));
    a_call_to_nowhere_compensates(&db, Arc::new(transport)).await;
    db.drop_schema().await;
}

/// Runs a saga whose one step calls service `nowhere` over `transport`, with no step timeout,
/// until it compensates, and asserts the reason: no queue is bound for `nowhere`.
async fn a_call_to_nowhere_compensates(db: &TestDb, transport: Arc<dyn Transport>) {
    let store = Arc::new(db.store());
    let def = saga_core::SagaDefinition::<u32>::builder("lost", 1)
        .step("call", |s| {
            s.action("nowhere", "call", |ctx| Ok(*ctx.input()))
        })
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let orchestrator = Orchestrator::builder(store.clone(), transport)
        .register(&def)
        .config(config())
        .build();
    let run = tokio::spawn(orchestrator.run(shutdown.clone()));
    let client = Client::new(store.clone());
    let id = client.start(&def, &1).await.unwrap().saga_id;
    let done = wait_until(Duration::from_secs(10), || async {
        client.summary(id).await.unwrap().unwrap().status == SagaStatus::Compensated
    })
    .await;
    let summary = client.summary(id).await.unwrap().unwrap();
    assert!(done, "{summary:?}");
    assert!(
        summary
            .reason
            .unwrap()
            .contains("no queue is bound for service `nowhere`")
    );
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_command_returned_after_its_publish_succeeded_fails_its_step() {
    let db = database().await;
    let transport = Arc::new(LateReturnTransport {
        inner: InProcessTransport::new(),
        late: std::sync::Mutex::new(Vec::new()),
        refused_results: std::sync::atomic::AtomicU32::new(0),
    });
    // No step timeout: if the relay ignored the late return, the saga would wait forever.
    a_call_to_nowhere_compensates(&db, transport.clone()).await;
    assert_eq!(
        transport.refused_results.load(Ordering::SeqCst),
        2,
        "the failure was sent again, once, after the broker refused it"
    );
    assert_eq!(
        outbox_rows(&db).await,
        0,
        "the returned command's row was deleted as published"
    );
    db.drop_schema().await;
}

/// Confirms every publish, and hands commands for `nowhere` back later as returned, as the
/// AMQP transport does when a return reaches another publish after the message's own
/// publish finished. Refuses the first publish to the results queue (the relay's failure of
/// the late command).
struct LateReturnTransport {
    inner: InProcessTransport,
    late: std::sync::Mutex<Vec<saga_core::Envelope>>,
    /// Publishes to the results queue so far, the first refused.
    refused_results: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Transport for LateReturnTransport {
    async fn declare(
        &self,
        sources: &[Destination],
    ) -> Result<(), saga_core::transport::TransportError> {
        self.inner.declare(sources).await
    }
    async fn publish(
        &self,
        batch: Vec<saga_core::Envelope>,
    ) -> Result<(), saga_core::transport::PublishError> {
        let to_results = batch.iter().any(|e| e.destination == Destination::Results);
        if to_results && self.refused_results.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(saga_core::transport::PublishError::NotConfirmed {
                reason: "refused once by the test".into(),
                envelopes: batch,
                unroutable: Vec::new(),
            });
        }
        let nowhere = Destination::Service("nowhere".into());
        let (lost, routed): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|e| e.destination == nowhere);
        self.late.lock().unwrap().extend(lost);
        self.inner.publish(routed).await
    }
    async fn consume(
        &self,
        source: &Destination,
    ) -> Result<
        futures_util::stream::BoxStream<'static, saga_core::Delivery>,
        saga_core::transport::TransportError,
    > {
        self.inner.consume(source).await
    }
    fn take_late_returns(&self) -> Vec<saga_core::Envelope> {
        std::mem::take(&mut *self.late.lock().unwrap())
    }
}

/// Declares only the results queue, as a broker would where no service queue was set up.
struct UndeclaredTransport(Arc<InProcessTransport>);

#[async_trait::async_trait]
impl Transport for UndeclaredTransport {
    async fn declare(
        &self,
        sources: &[Destination],
    ) -> Result<(), saga_core::transport::TransportError> {
        let results: Vec<_> = sources
            .iter()
            .filter(|s| **s == Destination::Results)
            .cloned()
            .collect();
        self.0.declare(&results).await
    }
    async fn publish(
        &self,
        batch: Vec<saga_core::Envelope>,
    ) -> Result<(), saga_core::transport::PublishError> {
        self.0.publish(batch).await
    }
    async fn consume(
        &self,
        source: &Destination,
    ) -> Result<
        futures_util::stream::BoxStream<'static, saga_core::Delivery>,
        saga_core::transport::TransportError,
    > {
        self.0.consume(source).await
    }
}

#[tokio::test]
async fn an_unregistered_version_is_left_untouched() {
    let h = harness().await;
    let v2 = saga_core::SagaDefinition::<Order>::builder("order", 2)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |ctx| Ok(ctx.input().clone()))
        })
        .build()
        .unwrap();
    let id = h
        .client
        .start(&v2, &Order::default())
        .await
        .unwrap()
        .saga_id;
    // Its first command runs; its result cannot be applied by an orchestrator that only knows v1.
    let ran = wait_until(Duration::from_secs(10), || async { h.runs("reserve") == 1 }).await;
    assert!(ran);
    let summary = h.client.summary(id).await.unwrap().unwrap();
    assert_eq!(summary.status, SagaStatus::Running);
    assert_eq!(
        h.client.history(id).await.unwrap().len(),
        2,
        "started and dispatched only"
    );
    h.shutdown.cancel();
    let mut h = h;
    while let Some(result) = h.tasks.join_next().await {
        result.unwrap().unwrap();
    }
    h.db.drop_schema().await;
}

/// Keys of the saga's pending timers, sorted.
async fn pending_timers(db: &TestDb, saga_id: Uuid) -> Vec<String> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT key FROM \"{}\".timers WHERE saga_id = $1 AND fired_at IS NULL ORDER BY key",
        db.schema
    )))
    .bind(saga_id)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn each_result_cancels_its_steps_timer_and_keeps_the_sagas_others() {
    let def = order::definition_timed(Some(Duration::from_secs(3600)));
    // Shipping waits: every saga stops at its last step, with that step's timeout pending.
    let (mut h, shipping) = harness_with(&def, Some("shipping")).await;
    // Started together, so that results of many sagas share a batch.
    let mut ids = Vec::new();
    for id in 0..40 {
        let order = Order {
            id,
            ..Order::default()
        };
        ids.push(h.client.start(&def, &order).await.unwrap().saga_id);
    }

    let waiting = vec![
        "deadline".to_owned(),
        format!("timeout:2:{}:1", Direction::Forward),
    ];
    let all_waiting = wait_until(Duration::from_secs(20), || async {
        for id in &ids {
            if pending_timers(&h.db, *id).await != waiting {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        all_waiting,
        "each saga keeps its deadline and its last step's timeout, the first two steps' are \
         gone: {:?}",
        pending_timers(&h.db, ids[0]).await
    );

    let shipping = shipping.expect("the shipping worker was held");
    h.tasks
        .spawn(shipping.run(Arc::new(h.transport.clone()), h.shutdown.clone()));
    let all_done = wait_until(Duration::from_secs(20), || async {
        for id in &ids {
            let s = h.client.summary(*id).await.unwrap().unwrap();
            if s.status != SagaStatus::Completed || !pending_timers(&h.db, *id).await.is_empty() {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        all_done,
        "every saga completed with no timer left pending: {:?}",
        pending_timers(&h.db, ids[0]).await
    );
    h.stop().await;
}
