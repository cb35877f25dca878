//! A compensation whose handler hangs, and a command no handler knows, on the real PostgreSQL
//! (with the in-process transport): the first gets the saga stuck with its reason until the
//! fault is fixed and an operator retries it; the second fails its step for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use saga_core::worker::{StepError, handler_fn};
use saga_core::{
    Client, CommandContext, InProcessTransport, OperatorAction, Orchestrator, RetryPolicy,
    SagaDefinition, SagaStatus, Worker,
};
use saga_tests::{database, wait_until};
use tokio_util::sync::CancellationToken;

fn quick() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
        ..RetryPolicy::default()
    }
}

/// reserve (release) -> charge (the pivot, declined).
fn definition() -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("hangs", 1)
        .step("reserve", |s| {
            s.action("svc", "reserve", |c| Ok(*c.input()))
                .compensation("svc", "release", |c| Ok(*c.input()))
                .retry(quick())
                .compensation_retry(quick())
                .timeout(Duration::from_millis(300))
        })
        .step("charge", |s| {
            s.pivot()
                .action("svc", "charge", |c| Ok(*c.input()))
                .retry(quick())
        })
        .build()
        .expect("valid definition")
}

/// `worker` and an orchestrator running on the test's schema; one saga started.
struct Running {
    client: Client,
    id: uuid::Uuid,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<saga_core::Result<()>>>,
}

async fn run(db: &saga_tests::TestDb, worker: Worker) -> Running {
    let store = Arc::new(db.store());
    let transport = Arc::new(InProcessTransport::new());
    let def = definition();
    let shutdown = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(worker.run(transport.clone(), shutdown.clone())),
        tokio::spawn(
            Orchestrator::builder(store.clone(), transport)
                .register(&def)
                .config(saga_tests::harness::config())
                .build()
                .run(shutdown.clone()),
        ),
    ];
    let client = Client::new(store);
    let id = client.start(&def, &7).await.unwrap().saga_id;
    Running {
        client,
        id,
        shutdown,
        tasks,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap().unwrap();
        }
    }
}

async fn status(client: &Client, id: uuid::Uuid) -> (SagaStatus, String) {
    let summary = client.summary(id).await.unwrap().unwrap();
    (summary.status, summary.reason.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_compensation_is_stuck_until_fixed_and_retried() {
    let db = database().await;
    let hang = Arc::new(AtomicBool::new(true));
    let hanging = Arc::clone(&hang);
    let ok = |n: u32, _: CommandContext| async move { Ok::<_, StepError>(n) };
    let worker = Worker::builder("svc", db.inbox().await)
        .handler("reserve", handler_fn(ok))
        .handler(
            "charge",
            handler_fn(|_: u32, _: CommandContext| async move {
                Err::<u32, _>(StepError::terminal("card declined"))
            }),
        )
        .handler(
            "release",
            handler_fn(move |n: u32, _: CommandContext| {
                let hanging = hanging.load(Ordering::SeqCst);
                async move {
                    if hanging {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, StepError>(n)
                }
            }),
        )
        .build();
    let running = run(&db, worker).await;
    let (client, id) = (&running.client, running.id);

    // The release hangs past its timeout on every attempt: the saga is stuck, and says why.
    let stuck = wait_until(Duration::from_secs(20), || async {
        status(client, id).await.0 == SagaStatus::Stuck
    })
    .await;
    let (state, reason) = status(client, id).await;
    assert!(stuck, "stuck, not {state}: {reason}");
    assert!(reason.contains("timed out"), "{reason}");

    // Fixed, then retried by an operator: the compensation runs again and the saga ends.
    hang.store(false, Ordering::SeqCst);
    client.act(id, OperatorAction::Retry).await.unwrap();
    let compensated = wait_until(Duration::from_secs(20), || async {
        status(client, id).await.0 == SagaStatus::Compensated
    })
    .await;
    assert!(compensated, "{:?}", status(client, id).await);
    running.stop().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_no_handler_knows_fails_its_step_for_good() {
    let db = database().await;
    let ok = |n: u32, _: CommandContext| async move { Ok::<_, StepError>(n) };
    // This build of the service knows `reserve` and `release`, not `charge`.
    let worker = Worker::builder("svc", db.inbox().await)
        .handler("reserve", handler_fn(ok))
        .handler("release", handler_fn(ok))
        .build();
    let running = run(&db, worker).await;
    let (client, id) = (&running.client, running.id);
    let done = wait_until(Duration::from_secs(20), || async {
        status(client, id).await.0 == SagaStatus::Compensated
    })
    .await;
    let (state, reason) = status(client, id).await;
    assert!(done, "compensated, not {state}: {reason}");
    assert!(
        reason.contains("service `svc` has no handler for command `charge`"),
        "{reason}"
    );
    running.stop().await;
    db.drop_schema().await;
}
