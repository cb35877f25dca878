//! Durable time and external events on the real PostgreSQL and RabbitMQ: approvals (signals
//! with a timeout), cancellation, delays across an orchestrator restart, timers shared by two
//! orchestrators.

use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Client, Direction, Error, Event, Orchestrator, PgStore, QueryStore, SagaDefinition, SagaStatus,
    Worker,
};
use saga_examples::Example;
use saga_examples::expense::{Approval, ExpenseSaga, definition_with};
use saga_examples::order::{Order, OrderSaga};
use saga_examples::participant::{Ledger, migrate, worker};
use saga_tests::amqp::{Broker, broker};
use saga_tests::harness::config;
use saga_tests::{FreshDatabase, fresh_database, wait_until};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Run {
    db: FreshDatabase,
    broker: Broker,
    store: Arc<PgStore>,
    client: Client,
    shutdown: CancellationToken,
    tasks: JoinSet<saga_core::Result<()>>,
    held: Vec<Worker>,
}

/// The participants of `E` (except `held`) and `orchestrators` orchestrators running `defs`.
async fn run<E: Example>(
    registry: saga_core::Registry,
    held: &[&str],
    orchestrators: usize,
) -> Run {
    let (db, broker) = (fresh_database().await, broker().await);
    let store = Arc::new(PgStore::builder(db.pool.clone()).build().unwrap());
    store.migrate().await.unwrap();
    migrate(&db.pool, &E::services()).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut waiting = Vec::new();
    for service in E::services() {
        let ledger = Ledger::pg(db.pool.clone(), service).unwrap();
        let w = worker::<E>(service, &ledger);
        if held.contains(&service) {
            waiting.push(w);
        } else {
            tasks.spawn(w.run(Arc::new(broker.transport().await), shutdown.clone()));
        }
    }
    for _ in 0..orchestrators {
        let o = Orchestrator::builder(store.clone(), Arc::new(broker.transport().await))
            .registry(registry.clone())
            .config(config())
            .build();
        tasks.spawn(o.run(shutdown.clone()));
    }
    Run {
        client: Client::new(store.clone()),
        db,
        broker,
        store,
        shutdown,
        tasks,
        held: waiting,
    }
}

impl Run {
    async fn release(&mut self, service: &str) {
        let i = self
            .held
            .iter()
            .position(|w| w.service() == service)
            .expect("held");
        let w = self.held.remove(i);
        self.tasks.spawn(w.run(
            Arc::new(self.broker.transport().await),
            self.shutdown.clone(),
        ));
    }

    async fn until<F>(&self, what: &str, condition: F)
    where
        F: AsyncFn(&Run) -> bool,
    {
        assert!(
            wait_until(Duration::from_secs(30), || condition(self)).await,
            "timed out waiting: {what}"
        );
    }

    async fn status(&self, id: Uuid) -> SagaStatus {
        self.client.summary(id).await.unwrap().unwrap().status
    }

    async fn effects(&self, id: Uuid) -> Vec<String> {
        sqlx::query_scalar("SELECT action FROM example_effects WHERE saga_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    async fn has_event(&self, id: Uuid, matches: impl Fn(&Event) -> bool) -> bool {
        self.client
            .history(id)
            .await
            .unwrap()
            .iter()
            .any(|r| matches(&r.event))
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(r) = self.tasks.join_next().await {
            r.unwrap().unwrap();
        }
        self.broker.cleanup().await;
        self.db.drop_database().await;
    }
}

fn registry<I>(def: &SagaDefinition<I>) -> saga_core::Registry {
    let mut registry = saga_core::Registry::new();
    registry.register(def);
    registry
}

fn approval(approved: bool) -> Approval {
    Approval {
        approved,
        approver: "maria".into(),
        comment: "no receipt".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_approved_rejected_and_timed_out() {
    let def = definition_with(Duration::from_secs(2), Duration::from_secs(600));
    let run = run::<ExpenseSaga>(registry(&def), &[], 1).await;
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(
            run.client
                .start(&def, &ExpenseSaga::input(n, false))
                .await
                .unwrap()
                .saga_id,
        );
    }
    let (approved, rejected, forgotten) = (ids[0], ids[1], ids[2]);
    // The approval of the first is sent at once: if it comes before the wait, it is kept.
    run.client
        .signal(approved, "approval", &approval(true))
        .await
        .unwrap();
    run.until("the second waits", async |r| {
        r.has_event(rejected, |e| matches!(e, Event::Waiting { .. }))
            .await
    })
    .await;
    run.client
        .signal(rejected, "approval", &approval(false))
        .await
        .unwrap();
    run.until("all settle", async |r| {
        let mut settled = true;
        for id in [approved, rejected, forgotten] {
            settled &= !r.status(id).await.is_active();
        }
        settled
    })
    .await;
    assert_eq!(run.status(approved).await, SagaStatus::Completed);
    assert_eq!(run.effects(approved).await, ["reserve", "pay"]);
    assert_eq!(run.status(rejected).await, SagaStatus::Compensated);
    assert_eq!(run.effects(rejected).await, ["reserve", "release"]);
    let reason = run
        .client
        .summary(rejected)
        .await
        .unwrap()
        .unwrap()
        .reason
        .unwrap();
    assert!(reason.contains("rejected by maria: no receipt"), "{reason}");
    assert_eq!(run.status(forgotten).await, SagaStatus::Compensated);
    assert_eq!(run.effects(forgotten).await, ["reserve", "release"]);
    let reason = run
        .client
        .summary(forgotten)
        .await
        .unwrap()
        .unwrap()
        .reason
        .unwrap();
    assert!(
        reason.contains("no signal `approval` within 2s"),
        "{reason}"
    );
    // A signal for a saga that does not exist is an error.
    let unknown = run
        .client
        .signal(Uuid::new_v4(), "approval", &approval(true))
        .await;
    assert!(matches!(unknown, Err(Error::UnknownSaga(_))), "{unknown:?}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_compensates_before_the_pivot_and_is_refused_after_it() {
    let def = OrderSaga::definition();
    let mut run = run::<OrderSaga>(registry(&def), &["payment", "shipping"], 1).await;
    let order = |n| Order {
        order_no: n,
        ..OrderSaga::input(n, false)
    };
    let a = run.client.start(&def, &order(1)).await.unwrap().saga_id;
    let b = run.client.start(&def, &order(2)).await.unwrap().saga_id;
    let charging = |id: Uuid| {
        async move |r: &Run| {
            r.has_event(id, |e| {
                matches!(
                    e,
                    Event::Dispatched {
                        step: 1,
                        direction: Direction::Forward,
                        ..
                    }
                )
            })
            .await
        }
    };
    run.until("A is charging", charging(a)).await;
    run.until("B is charging", charging(b)).await;
    // A's charge is in flight: the cancel is accepted and the charge fenced; whichever of the
    // charge and its fence the payment service runs first decides whether it applied.
    run.client
        .cancel(a, "customer changed their mind")
        .await
        .unwrap();
    run.release("payment").await;
    run.until("A is cancelled", async |r| {
        r.status(a).await == SagaStatus::Cancelled
    })
    .await;
    let effects = run.effects(a).await;
    assert!(
        effects == ["reserve", "charge", "refund", "release"] || effects == ["reserve", "release"],
        "whatever applied is undone: {effects:?}"
    );
    // B reaches its pivot (shipping is held): too late to cancel.
    run.until("B is shipping", async |r| {
        r.has_event(b, |e| matches!(e, Event::Dispatched { step: 2, .. }))
            .await
    })
    .await;
    let refused = run.client.cancel(b, "too late").await.unwrap_err();
    assert!(
        matches!(&refused, Error::CancelRefused { why, .. } if why == "the saga has passed its pivot step `ship`"),
        "{refused}"
    );
    run.release("shipping").await;
    run.until("B completes", async |r| {
        r.status(b).await == SagaStatus::Completed
    })
    .await;
    assert_eq!(run.effects(b).await, ["reserve", "charge", "ship"]);
    run.stop().await;
}

/// reserve -> a durable delay -> ship (pivot).
fn delayed(delay: Duration) -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder("delayed-order", 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |ctx| Ok(ctx.input().clone()))
                .compensation("inventory", "release", |ctx| Ok(ctx.input().clone()))
        })
        .step("cool_off", |s| s.delay(delay))
        .step("ship", |s| {
            s.pivot()
                .action("shipping", "ship", |ctx| Ok(ctx.input().clone()))
        })
        .build()
        .unwrap()
}

fn fired_once(history: &[saga_core::RecordedEvent]) -> bool {
    let delay_done = history
        .iter()
        .filter(|r| matches!(r.event, Event::Succeeded { step: 1, .. }))
        .count();
    let shipped = history
        .iter()
        .filter(|r| matches!(r.event, Event::Dispatched { step: 2, .. }))
        .count();
    delay_done == 1 && shipped == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_survives_an_orchestrator_restart_and_fires_once() {
    let def = delayed(Duration::from_millis(1500));
    let run = run::<OrderSaga>(registry(&def), &[], 0).await;
    let first = CancellationToken::new();
    let orchestrator = |shutdown: CancellationToken| {
        let (store, broker_config) = (run.store.clone(), run.broker.config.clone());
        let def = def.clone();
        async move {
            let transport = saga_amqp::AmqpTransport::connect(broker_config)
                .await
                .unwrap();
            Orchestrator::builder(store, Arc::new(transport))
                .register(&def)
                .config(config())
                .build()
                .run(shutdown)
                .await
        }
    };
    let one = tokio::spawn(orchestrator(first.clone()));
    let id = run
        .client
        .start(&def, &OrderSaga::input(1, false))
        .await
        .unwrap()
        .saga_id;
    run.until("the saga waits", async |r| {
        r.has_event(id, |e| matches!(e, Event::Waiting { .. }))
            .await
    })
    .await;
    first.cancel();
    one.await.unwrap().unwrap();
    // Nobody runs while the delay passes.
    let due: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT due_at FROM saga.timers WHERE saga_id = $1 AND key = 'delay:1'")
            .bind(id)
            .fetch_one(&run.db.pool)
            .await
            .unwrap();
    while chrono::Utc::now() < due {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run.status(id).await, SagaStatus::Running);
    let second = CancellationToken::new();
    let two = tokio::spawn(orchestrator(second.clone()));
    run.until("the saga completes", async |r| {
        r.status(id).await == SagaStatus::Completed
    })
    .await;
    assert!(fired_once(&run.client.history(id).await.unwrap()));
    assert_eq!(run.effects(id).await, ["reserve", "ship"]);
    second.cancel();
    two.await.unwrap().unwrap();
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_fire_each_timer_once() {
    let def = delayed(Duration::from_millis(300));
    let run = run::<OrderSaga>(registry(&def), &[], 2).await;
    let mut ids = Vec::new();
    for n in 1..=100 {
        ids.push(
            run.client
                .start(&def, &OrderSaga::input(n, false))
                .await
                .unwrap()
                .saga_id,
        );
    }
    run.until("all complete", async |r| {
        let counts = r.store.count_by_status().await.unwrap();
        counts.get(&SagaStatus::Completed) == Some(&100)
    })
    .await;
    for id in ids {
        assert!(
            fired_once(&run.client.history(id).await.unwrap()),
            "saga {id}"
        );
        assert_eq!(run.effects(id).await, ["reserve", "ship"]);
    }
    let fired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga.timers WHERE key = 'delay:1' AND fired_at IS NOT NULL",
    )
    .fetch_one(&run.db.pool)
    .await
    .unwrap();
    assert_eq!(fired, 100);
    run.stop().await;
}
