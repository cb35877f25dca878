//! A saga's outcome as a value: `Client::outcome` waits for the saga's end on the real
//! PostgreSQL and returns its status, its reason and its steps' outputs, typed.

use std::sync::Arc;
use std::time::Duration;

use saga_core::{Client, Error, InProcessTransport, Orchestrator, SagaStatus};
use saga_tests::database;
use saga_tests::harness::config;
use saga_tests::order::{self, Order};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outcome_of_a_completed_and_of_a_compensated_saga() {
    let db = database().await;
    let store = Arc::new(db.store());
    let transport = InProcessTransport::new();
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in order::participants(&db.pool, &db.schema).await.workers {
        tasks.spawn(worker.run(Arc::new(transport.clone()), shutdown.clone()));
    }
    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(transport.clone()))
        .register(&order::definition())
        .config(config())
        .build();
    tasks.spawn(orchestrator.run(shutdown.clone()));
    let client = Client::new(store.clone());
    let start = |order: Order| {
        let client = client.clone();
        async move {
            client
                .start(&order::definition(), &order)
                .await
                .unwrap()
                .saga_id
        }
    };

    let shipped = start(Order {
        id: 1,
        ..Order::default()
    })
    .await;
    let outcome = client
        .outcome(shipped, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(outcome.saga_id, shipped);
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert!(outcome.is_completed());
    assert_eq!(outcome.reason, None);
    // The test participants answer `ACTION:SAGA_ID`.
    for step in ["reserve", "charge", "ship"] {
        assert_eq!(
            outcome.output::<String>(step).unwrap(),
            Some(format!("{step}:{shipped}")),
            "{step}"
        );
    }

    let refunded = start(Order {
        id: 2,
        fail_ship: true,
        ..Order::default()
    })
    .await;
    let outcome = client
        .outcome(refunded, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(outcome.reason.is_some(), "a compensated saga says why");
    let applied: Vec<&str> = outcome.outputs().map(|(step, _)| step).collect();
    assert_eq!(applied, ["reserve", "charge"], "the pivot never succeeded");
    assert_eq!(outcome.output::<String>("ship").unwrap(), None);
    assert!(
        matches!(
            outcome.output::<u64>("charge"),
            Err(Error::Serialization(_))
        ),
        "an output read as the wrong type fails"
    );

    shutdown.cancel();
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    db.drop_schema().await;
}

#[tokio::test]
async fn waiting_for_a_saga_that_does_not_end_in_time_fails_and_it_goes_on() {
    let db = database().await;
    let store = Arc::new(db.store());
    let client = Client::new(store);
    // No orchestrator runs: the saga stays at its first step.
    let id = client
        .start(&order::definition(), &Order::default())
        .await
        .unwrap()
        .saga_id;
    let waited = Duration::from_millis(100);
    match client.outcome(id, waited).await {
        Err(Error::StillRunning {
            saga_id,
            status,
            waited: w,
        }) => {
            assert_eq!((saga_id, status, w), (id, SagaStatus::Running, waited));
        }
        other => panic!("expected StillRunning, got {other:?}"),
    }
    let unknown = uuid::Uuid::now_v7();
    assert!(matches!(
        client.outcome(unknown, waited).await,
        Err(Error::UnknownSaga(u)) if u == unknown
    ));
    db.drop_schema().await;
}
