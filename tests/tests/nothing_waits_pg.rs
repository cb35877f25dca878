//! Nothing waits without a reason, on the real PostgreSQL: a loop of the orchestrator that
//! ends makes it stop with an error; a saga that parks is logged at ERROR and counted; a
//! service's queue that no worker consumes is reported.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use saga_core::transport::{Delivery, PublishError, Source, TransportError};
use saga_core::worker::{CommandContext, StepError, handler_fn};
use saga_core::{
    Client, Destination, Envelope, Error, InProcessTransport, Metrics, Orchestrator, QueryStore,
    RetryPolicy, SagaDefinition, SagaStatus, Transport, Worker,
};
use saga_tests::logs::Errors;
use saga_tests::{database, wait_until};
use tokio_util::sync::CancellationToken;

/// A transport whose results stream ends at once, as if the broker had gone for good.
struct EndingResults(InProcessTransport);

#[async_trait]
impl Transport for EndingResults {
    async fn declare(&self, sources: &[Source]) -> Result<(), TransportError> {
        self.0.declare(sources).await
    }

    async fn publish(&self, batch: Vec<Envelope>) -> Result<(), PublishError> {
        self.0.publish(batch).await
    }

    async fn consume(
        &self,
        source: &Source,
    ) -> Result<BoxStream<'static, Delivery>, TransportError> {
        match source {
            Destination::Results => Ok(Box::pin(futures_util::stream::empty())),
            other => self.0.consume(other).await,
        }
    }
}

/// An orchestrator whose results consumer ends before shutdown stops its other loops and
/// returns an error naming it, so its process exits (and its health turns false) instead of
/// running half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_whose_loop_ends_stops_with_an_error() {
    let db = database().await;
    let def = definition();
    let orchestrator = Orchestrator::builder(
        Arc::new(db.store()),
        Arc::new(EndingResults(InProcessTransport::new())),
    )
    .register(&def)
    .build();
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        orchestrator.run(CancellationToken::new()),
    )
    .await
    .expect("run returns");
    match ended {
        Err(Error::LoopEnded(what)) => assert!(what.contains("results consumer"), "{what}"),
        other => panic!("{other:?}"),
    }
    db.drop_schema().await;
}

/// reserve (release, which fails for good) -> charge (pivot, declined).
fn definition() -> SagaDefinition<u32> {
    let once = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    SagaDefinition::<u32>::builder("parks", 1)
        .step("reserve", |s| {
            s.action("payment", "reserve", |c| Ok(*c.input()))
                .compensation("payment", "release", |c| Ok(*c.input()))
                .compensation_retry(once.clone())
                .timeout(Duration::from_millis(400))
        })
        .step("charge", |s| {
            s.pivot()
                .action("payment", "charge", |c| Ok(*c.input()))
                .retry(once.clone())
                .timeout(Duration::from_millis(400))
        })
        .build()
        .unwrap()
}

fn worker(service: &str, inbox: saga_core::Inbox) -> Worker {
    let ok = |n: u32, _: CommandContext| async move { Ok::<_, StepError>(n) };
    Worker::builder(service, inbox)
        .handler("reserve", handler_fn(ok))
        .handler(
            "charge",
            handler_fn(|_: u32, _: CommandContext| async {
                Err::<u32, _>(StepError::terminal("declined"))
            }),
        )
        .handler(
            "release",
            handler_fn(|_: u32, _: CommandContext| async {
                Err::<u32, _>(StepError::terminal("release refused"))
            }),
        )
        .build()
}

/// A saga whose compensation fails for good parks as stuck: logged at ERROR with its reason,
/// and counted (`saga_settled_total{status="stuck"}`). A worker started under a misspelt
/// service name leaves the real service's queue with commands and no consumer: past the
/// step's timeout that is logged at ERROR and shown by `saga_service_unconsumed_seconds`;
/// once the right worker runs, the gauge is 0 again.
#[tokio::test(flavor = "current_thread")]
async fn stuck_sagas_and_unconsumed_queues_are_reported() {
    let (errors, _logs) = Errors::capture();
    let db = database().await;
    let def = definition();
    let store = Arc::new(db.store());
    let transport = InProcessTransport::new();
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        Orchestrator::builder(store.clone(), Arc::new(transport.clone()))
            .register(&def)
            .config(saga_tests::harness::config())
            .metrics(metrics.clone())
            .build()
            .run(shutdown.clone()),
    );
    tasks.spawn(
        worker("paymnet", db.inbox().await).run(Arc::new(transport.clone()), shutdown.clone()),
    );
    let id = Client::new(store.clone())
        .start(&def, &7)
        .await
        .unwrap()
        .saga_id;
    let gauge = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("saga_service_unconsumed_seconds{service=\"payment\"}"))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let reported = wait_until(Duration::from_secs(10), || async {
        errors.contain("service=payment")
    })
    .await;
    assert!(reported, "{:?}", errors.lines());
    assert!(gauge(&metrics.render(None)).is_some_and(|s| s >= 0.4));
    tasks.spawn(
        worker("payment", db.inbox().await).run(Arc::new(transport.clone()), shutdown.clone()),
    );
    let stuck = wait_until(Duration::from_secs(30), || async {
        store.summary(id).await.unwrap().unwrap().status == SagaStatus::Stuck
    })
    .await;
    assert!(stuck, "{:?}", store.summary(id).await.unwrap());
    let reason = store.summary(id).await.unwrap().unwrap().reason.unwrap();
    // Logged after the commit that parked it, so possibly a moment after the status shows.
    let logged = wait_until(Duration::from_secs(5), || async {
        errors
            .lines()
            .iter()
            .any(|l| l.contains("saga stuck") && l.contains(&reason))
    })
    .await;
    assert!(logged, "{:?}", errors.lines());
    let text = metrics.render(None);
    assert!(
        text.contains("saga_settled_total{saga=\"parks\",status=\"stuck\"} 1"),
        "{text}"
    );
    let consumed = wait_until(Duration::from_secs(10), || async {
        gauge(&metrics.render(None)) == Some(0.0)
    })
    .await;
    assert!(consumed, "{}", metrics.render(None));
    shutdown.cancel();
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    db.drop_schema().await;
}
