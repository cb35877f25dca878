//! Unknown outcomes on the real PostgreSQL (in-process transport): a step whose attempts time
//! out is fenced at its own service before the saga decides, so an order is never both
//! shipped and refunded, and no effect applies twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use saga_core::transport::{Delivery, PublishError, Source, TransportError};
use saga_core::{
    Destination, Direction, Envelope, InProcessTransport, QueryStore, Reply, SagaStatus, Transport,
};
use saga_tests::harness::run_definition;
use saga_tests::order::{self, definition_with_timeout};
use saga_tests::{database, wait_until};

/// The scenario, in one process: the shipping service is down (its worker not
/// started) while 20 orders run with 300 ms step timeouts. The pivot's attempts time out and
/// each saga fences `ship`, showing it (`fencing step ship`) instead of compensating at once.
/// When the service comes, its stale commands have expired; the fences find nothing applied,
/// write their tombstones, and every order compensates without shipping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pivot_service_down_past_its_timeouts_never_ships_a_compensated_order() {
    let db = database().await;
    let transport = InProcessTransport::new();
    let def = definition_with_timeout(Duration::from_millis(300));
    let (mut running, mut held) =
        run_definition(&db, || async { transport.clone() }, &def, &["shipping"]).await;
    let ids = running.start(20, 5).await;
    let fencing = running
        .all_show(&ids, "fencing step ship", Duration::from_secs(30))
        .await;
    assert!(fencing, "every saga shows that it fences its pivot");
    running.spawn(held.pop().unwrap(), transport.clone());
    let counts = running.settle(Duration::from_secs(60)).await;
    assert_eq!(
        counts.get(&SagaStatus::Compensated),
        Some(&20),
        "{counts:?}"
    );
    for id in &ids {
        assert_eq!(
            order::effects(&db.pool, &db.schema, *id).await,
            ["reserve", "charge", "refund", "release"],
            "saga {id}"
        );
    }
    let expired = transport.dead_letters(&Destination::Service("shipping".into()));
    assert!(
        expired.iter().all(|(_, why)| why == "expired"),
        "only expired commands are dead-lettered: {expired:?}"
    );
    running.stop().await;
    db.drop_schema().await;
}

/// A transport that loses the answers of the pivot's forward attempts: the shipments apply
/// (recorded in the inbox) but the orchestrator never hears of them.
#[derive(Clone)]
struct LosesShipments(InProcessTransport);

#[async_trait]
impl Transport for LosesShipments {
    async fn declare(&self, sources: &[Source]) -> Result<(), TransportError> {
        self.0.declare(sources).await
    }

    async fn publish(&self, batch: Vec<Envelope>) -> Result<(), PublishError> {
        let kept = batch
            .into_iter()
            .filter(|e| {
                let Ok(reply) = Reply::from_message(&e.message) else {
                    return true;
                };
                !(reply.step == 2 && reply.direction == Direction::Forward)
            })
            .collect();
        self.0.publish(kept).await
    }

    async fn consume(
        &self,
        source: &Source,
    ) -> Result<BoxStream<'static, Delivery>, TransportError> {
        self.0.consume(source).await
    }
}

/// The shipments apply but every answer is lost: the attempts time out, the saga fences the
/// pivot, the fence finds it applied (with its output), and the order completes: shipped once,
/// never refunded. The first order's shipment fails for good (its answer lost too): its fence
/// finds the failure recorded, and that order compensates, unshipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pivot_that_applied_but_whose_answers_were_lost_goes_forward() {
    let db = database().await;
    let transport = InProcessTransport::new();
    let def = definition_with_timeout(Duration::from_millis(300));
    let (mut running, mut held) =
        run_definition(&db, || async { transport.clone() }, &def, &["shipping"]).await;
    running.spawn(held.pop().unwrap(), LosesShipments(transport.clone()));
    let ids = running.start(10, 1_000).await;
    let counts = running.settle(Duration::from_secs(60)).await;
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&9), "{counts:?}");
    assert_eq!(counts.get(&SagaStatus::Compensated), Some(&1), "{counts:?}");
    assert_eq!(
        order::effects(&db.pool, &db.schema, ids[0]).await,
        ["reserve", "charge", "refund", "release"]
    );
    for id in &ids[1..] {
        assert_eq!(
            order::effects(&db.pool, &db.schema, *id).await,
            ["reserve", "charge", "ship"],
            "saga {id}"
        );
        let history = running.store.history(*id).await.unwrap();
        assert!(
            history.iter().any(|r| matches!(
                r.event,
                saga_core::Event::Succeeded {
                    direction: Direction::Fence,
                    ..
                }
            )),
            "the fence told the saga that {id} shipped"
        );
    }
    running.stop().await;
    db.drop_schema().await;
}

/// Results applied while the database refuses the saga tables' locks for a while (SQLSTATE
/// 55P03, `lock_timeout`): the batch is handed back and applied once the lock is gone, not
/// dead-lettered, so no saga waits for an answer it already got.
#[tokio::test(flavor = "current_thread")]
async fn results_that_meet_a_lock_timeout_are_applied_later_not_dead_lettered() {
    let (errors, _logs) = saga_tests::logs::Errors::capture();
    let db = database().await;
    let transport = InProcessTransport::new();
    // The orchestrator's sessions give up on a lock after 100 ms.
    let options = (*db.pool.connect_options())
        .clone()
        .options([("lock_timeout", "100")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .unwrap();
    let store = Arc::new(
        saga_core::PgStore::builder(pool)
            .schema(&db.schema)
            .build()
            .unwrap(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let participants = order::participants(&db.pool, &db.schema).await;
    let ships = participants
        .runs
        .iter()
        .find(|(action, _)| *action == "ship")
        .map(|(_, runs)| Arc::clone(runs))
        .unwrap();
    let mut shipping = None;
    for worker in participants.workers {
        if worker.service() == "shipping" {
            shipping = Some(worker);
        } else {
            tasks.spawn(worker.run(Arc::new(transport.clone()), shutdown.clone()));
        }
    }
    let def = order::definition();
    tasks.spawn(
        saga_core::Orchestrator::builder(store.clone(), Arc::new(transport.clone()))
            .register(&def)
            .config(saga_core::orchestrator::OrchestratorConfig {
                defer_delay: Duration::from_millis(200),
                ..saga_tests::harness::config()
            })
            .build()
            .run(shutdown.clone()),
    );
    let client = saga_core::Client::new(store.clone());
    let mut ids = Vec::new();
    for id in 0..5 {
        let order = order::Order {
            id,
            ..order::Order::default()
        };
        ids.push(client.start(&def, &order).await.unwrap().saga_id);
    }
    let shipping_queue = Destination::Service("shipping".into());
    let waiting = wait_until(Duration::from_secs(30), || async {
        transport.depth(&shipping_queue) == 5
    })
    .await;
    assert!(waiting, "every order waits for its shipment");
    // Another session holds the saga tables while the shipments' results come back.
    let mut locker = db.pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE \"{}\".instances IN ACCESS EXCLUSIVE MODE",
        db.schema
    )))
    .execute(&mut *locker)
    .await
    .unwrap();
    tasks.spawn(
        shipping
            .unwrap()
            .run(Arc::new(transport.clone()), shutdown.clone()),
    );
    let shipped = wait_until(Duration::from_secs(30), || async {
        ships.load(std::sync::atomic::Ordering::SeqCst) == 5
    })
    .await;
    assert!(shipped);
    // The results meet the lock (each try gives up after 100 ms): the batch is handed back.
    let handed_back = wait_until(Duration::from_secs(30), || async {
        errors.contain("handing them back") && errors.contain("lock timeout")
    })
    .await;
    assert!(handed_back, "{:?}", errors.lines());
    locker.rollback().await.unwrap();
    let done = wait_until(Duration::from_secs(30), || async {
        let counts = store.count_by_status().await.unwrap();
        counts.get(&SagaStatus::Completed) == Some(&5)
    })
    .await;
    assert!(done, "{:?}", store.count_by_status().await.unwrap());
    assert!(
        transport.dead_letters(&Destination::Results).is_empty(),
        "{:?}",
        transport.dead_letters(&Destination::Results)
    );
    for id in ids {
        assert_eq!(
            order::effects(&db.pool, &db.schema, id).await,
            ["reserve", "charge", "ship"]
        );
    }
    shutdown.cancel();
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    db.drop_schema().await;
}
