//! A compensation whose handler hangs, and a command no handler knows, on the real PostgreSQL
//! (with the in-process transport): the first gets the saga stuck with its reason until the
//! fault is fixed and an operator retries it; the second is retried (a build with the handler
//! may take a retry), then fenced, and its step fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use saga_core::worker::{StepError, handler_fn};
use saga_core::{
    Client, CommandContext, Direction, Event, InProcessTransport, OperatorAction, Orchestrator,
    RetryPolicy, SagaDefinition, SagaStatus, Worker,
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
    definition_retrying(quick())
}

/// [`definition`], with `charge` retried by `retry`.
fn definition_retrying(retry: RetryPolicy) -> SagaDefinition<u32> {
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
                .retry(retry)
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
    run_definition(db, worker, definition()).await
}

/// [`run`], with `def` for the saga.
async fn run_definition(
    db: &saga_tests::TestDb,
    worker: Worker,
    def: SagaDefinition<u32>,
) -> Running {
    let store = Arc::new(db.store());
    let transport = Arc::new(InProcessTransport::new());
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

/// A build of the service that knows `reserve` and `release`, not `charge`.
async fn without_charge(db: &saga_tests::TestDb) -> Worker {
    let ok = |n: u32, _: CommandContext| async move { Ok::<_, StepError>(n) };
    Worker::builder("svc", db.inbox().await)
        .handler("reserve", handler_fn(ok))
        .handler("release", handler_fn(ok))
        .build()
}

/// How many `charge` commands (step 1) went out in `direction`.
fn charges(history: &[saga_core::RecordedEvent], direction: Direction) -> usize {
    history
        .iter()
        .filter(|r| matches!(&r.event, Event::Dispatched { step: 1, direction: d, .. } if *d == direction))
        .count()
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
    // Whichever sees the hang first says so: the orchestrator's timer (the attempt timed out)
    // or the worker's (the handler did not finish within the attempt's timeout).
    assert!(
        reason.contains("timed out") || reason.contains("handler did not finish within"),
        "{reason}"
    );

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
async fn a_command_no_handler_knows_is_retried_then_fenced_and_its_step_fails() {
    let db = database().await;
    let running = run(&db, without_charge(&db).await).await;
    let (client, id) = (&running.client, running.id);
    let done = wait_until(Duration::from_secs(20), || async {
        status(client, id).await.0 == SagaStatus::Compensated
    })
    .await;
    let (state, reason) = status(client, id).await;
    assert!(done, "compensated, not {state}: {reason}");
    assert!(
        reason.contains(
            "service `svc` has no handler for command `charge` (this build handles: release, reserve)"
        ),
        "{reason}"
    );
    // Each attempt the policy allows, then a fence before the saga gives up on the step.
    let history = client.history(id).await.unwrap();
    assert_eq!(
        charges(&history, Direction::Forward),
        2,
        "both attempts of charge"
    );
    assert_eq!(charges(&history, Direction::Fence), 1, "charge fenced once");
    running.stop().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_no_handler_knows_is_recorded_failed_after_two_retryable_answers() {
    let db = database().await;
    let worker = without_charge(&db).await;
    // More attempts than an unknown command is answered retryable for.
    let def = definition_retrying(RetryPolicy {
        max_attempts: 5,
        ..quick()
    });
    let running = run_definition(&db, worker, def).await;
    let (client, id) = (&running.client, running.id);
    let outcome = client.outcome(id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        outcome.status,
        SagaStatus::Compensated,
        "{:?}",
        outcome.reason
    );
    let history = client.history(id).await.unwrap();
    // Two retryable answers, then the third attempt is recorded as failed; the step is
    // fenced before the saga gives up on it (an earlier attempt, answered retryable, might
    // yet have applied), and the fence finds the recorded failure.
    assert_eq!(charges(&history, Direction::Forward), 3);
    assert_eq!(charges(&history, Direction::Fence), 1);
    assert!(
        outcome
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("has no handler for command `charge`"),
        "{:?}",
        outcome.reason
    );
    running.stop().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_with_the_handler_takes_the_retry_of_a_command_an_older_build_lacked() {
    let db = database().await;
    let ok = |n: u32, _: CommandContext| async move { Ok::<_, StepError>(n) };
    let store = Arc::new(db.store());
    let transport = Arc::new(InProcessTransport::new());
    let def = definition_retrying(RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_millis(500),
        ..RetryPolicy::default()
    });
    let shutdown = CancellationToken::new();
    let orchestrator = tokio::spawn(
        Orchestrator::builder(store.clone(), transport.clone())
            .register(&def)
            .config(saga_tests::harness::config())
            .build()
            .run(shutdown.clone()),
    );
    // The old build, without `charge`.
    let old = without_charge(&db).await;
    let old_stop = CancellationToken::new();
    let old_run = tokio::spawn(old.run(transport.clone(), old_stop.clone()));
    let client = Client::new(store);
    let id = client.start(&def, &7).await.unwrap().saga_id;
    let failed_once = wait_until(Duration::from_secs(10), || async {
        client.history(id).await.unwrap().iter().any(|r| {
            matches!(
                &r.event,
                Event::Failed {
                    step: 1,
                    retryable: true,
                    ..
                }
            )
        })
    })
    .await;
    assert!(failed_once, "the old build answered the first charge");
    // The rolling deploy: the old build stops, the new one (with `charge`) takes the retry.
    old_stop.cancel();
    old_run.await.unwrap().unwrap();
    let charged = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = Arc::clone(&charged);
    let new = Worker::builder("svc", db.inbox().await)
        .handler("reserve", handler_fn(ok))
        .handler("release", handler_fn(ok))
        .handler(
            "charge",
            handler_fn(move |n: u32, _: CommandContext| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, StepError>(n) }
            }),
        )
        .build();
    let new_run = tokio::spawn(new.run(transport.clone(), shutdown.clone()));
    let outcome = client.outcome(id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        outcome.status,
        SagaStatus::Completed,
        "{:?}",
        outcome.reason
    );
    assert_eq!(charged.load(Ordering::SeqCst), 1, "charged once");
    shutdown.cancel();
    orchestrator.await.unwrap().unwrap();
    new_run.await.unwrap().unwrap();
    db.drop_schema().await;
}
