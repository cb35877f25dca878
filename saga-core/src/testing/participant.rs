//! The participants of a [`TestEnv`]: closures and workers, the env's inbox records, and the
//! runtime workers' handlers run on.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use serde_json::Value;

use super::{Fault, TestEnv};
use crate::event::Direction;
use crate::message::{Command, Outcome};
use crate::worker::{StepError, Worker};

/// A participant's answer to one command, as a closure registered on the env.
pub(super) type TestHandler = Box<dyn FnMut(&Command) -> Result<Value, StepError> + Send>;

/// What the env's inbox holds under a key, for participants without an inbox of their own.
#[derive(Debug, Clone)]
pub(super) enum Recorded {
    Ok(Value),
    Failed(String),
    Fenced,
}

impl TestEnv {
    /// Serves the commands of `worker`'s service with the worker itself: the `Handler`
    /// implementations production runs, async, on the path a delivery takes in production
    /// (unknown commands, panics and the worker's timeouts included).
    ///
    /// A worker with an [`Inbox`](crate::Inbox) runs each command in the inbox's transaction,
    /// so a handler's writes through [`CommandContext::transaction`](crate::CommandContext::transaction)
    /// commit with its recorded outcome, and redeliveries and fences are answered by that
    /// inbox: the database is real, the saga's log, the broker and the clock are the env's.
    /// A worker without one ([`Worker::at_least_once`]) gets the env's in-memory inbox.
    ///
    /// Handlers run on the env's own runtime while the test waits; a handler's pool (and the
    /// inbox's) must be made there too, with [`TestEnv::block_on`], or its connections
    /// would be driven by the test's runtime, which is blocked meanwhile.
    ///
    /// ```no_run
    /// # use saga_core::{Inbox, Worker, testing::TestEnv};
    /// # fn demo(url: String, worker_of: fn(Inbox) -> Worker) {
    /// let mut env = TestEnv::new();
    /// let inbox = env.block_on(async move {
    ///     let pool = sqlx::PgPool::connect(&url).await.expect("the test database");
    ///     let inbox = Inbox::new(pool, "payment").expect("a valid schema");
    ///     inbox.migrate().await.expect("the inbox's table");
    ///     inbox
    /// });
    /// env.worker(&worker_of(inbox));
    /// # }
    /// ```
    pub fn worker(&mut self, worker: &Worker) -> &mut Self {
        let worker = worker.shared();
        let service = worker.service().to_owned();
        // The last registration wins: closures of this service's commands go.
        self.handlers.retain(|(s, _), _| *s != service);
        if worker.has_inbox() {
            self.inboxed.insert(service, worker);
            return self;
        }
        self.inboxed.remove(&service);
        self.services.remove(&service);
        let runtime = self.runtime().handle().clone();
        let run: TestHandler = Box::new(move |command| {
            let (worker, command) = (Arc::clone(&worker), command.clone());
            match run_on(
                &runtime,
                async move { worker.attempt(&command, None).await },
            ) {
                Outcome::Success { output } => Ok(output),
                Outcome::Failure { error, retryable } if retryable => {
                    Err(StepError::retryable(error))
                }
                Outcome::Failure { error, .. } => Err(StepError::terminal(error)),
                other => Err(StepError::terminal(format!(
                    "a worker without an inbox answered {other:?}"
                ))),
            }
        });
        // One closure per service: the worker tells its commands apart itself.
        self.services.insert(service, run);
        self
    }

    /// Runs `future` on the env's runtime, where workers' handlers run, and waits for it:
    /// make the pools that handlers and inboxes use here. Callable from a plain `#[test]` or
    /// from async code (it blocks the calling thread until `future` ends).
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        run_on(self.runtime().handle(), future)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("saga-test-env")
                .enable_all()
                .build()
                .expect("a runtime for the test env's handlers")
        })
    }

    /// What the participant answers to `command`, or `None` if the answer is lost.
    pub(super) fn deliver(&mut self, command: &Command) -> Option<Outcome> {
        let route = (command.service.clone(), command.command.clone());
        if !self.handlers.contains_key(&route)
            && let Some(worker) = self.inboxed.get(&command.service).cloned()
        {
            return self.deliver_to_inbox(worker, command);
        }
        let key = (command.service.clone(), command.idempotency_key.clone());
        if command.direction == Direction::Fence {
            let recorded = self.inbox.entry(key).or_insert(Recorded::Fenced);
            return Some(answer(recorded, true));
        }
        if let Some(recorded) = self.inbox.get(&key) {
            return Some(answer(recorded, false));
        }
        let fault = self.fault(command);
        let lost = fault == Some(Fault::LoseResult);
        let result = match fault {
            Some(Fault::LoseCommand) => return None,
            Some(Fault::Fail(error)) => Err(error),
            _ => {
                let handler = match self.handlers.get_mut(&route) {
                    Some(handler) => handler,
                    None => self.services.get_mut(&route.0).unwrap_or_else(|| {
                        panic!(
                            "no handler for {}.{}; register one with TestEnv::handle or TestEnv::worker",
                            route.0, route.1
                        )
                    }),
                };
                handler(command)
            }
        };
        match &result {
            Ok(output) => {
                self.inbox.insert(key, Recorded::Ok(output.clone()));
            }
            Err(e) if !e.is_retryable() => {
                self.inbox
                    .insert(key, Recorded::Failed(e.message().to_owned()));
            }
            Err(_) => {}
        }
        if lost {
            return None;
        }
        Some(match result {
            Ok(output) => Outcome::Success { output },
            Err(e) => Outcome::Failure {
                error: e.message().to_owned(),
                retryable: e.is_retryable(),
            },
        })
    }

    /// A command of a service whose worker keeps its own inbox: the worker's attempt or
    /// fence, in the inbox's transaction.
    fn deliver_to_inbox(&mut self, worker: Arc<Worker>, command: &Command) -> Option<Outcome> {
        let runtime = self.runtime().handle().clone();
        let owned = command.clone();
        if command.direction == Direction::Fence {
            return Some(run_on(&runtime, async move { worker.fence(&owned).await }));
        }
        let fault = self.fault(command);
        match fault {
            Some(Fault::LoseCommand) => None,
            Some(Fault::Fail(error)) => Some(Outcome::Failure {
                error: error.message().to_owned(),
                retryable: error.is_retryable(),
            }),
            lost => {
                let outcome = run_on(&runtime, async move { worker.attempt(&owned, None).await });
                (lost != Some(Fault::LoseResult)).then_some(outcome)
            }
        }
    }

    fn fault(&mut self, command: &Command) -> Option<Fault> {
        let route = (command.service.clone(), command.command.clone());
        self.faults.get_mut(&route).and_then(VecDeque::pop_front)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Without waiting: an env may be dropped inside async code, where blocking is refused.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on `runtime` and waits for it on this thread.
fn run_on<F>(runtime: &tokio::runtime::Handle, future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (done, result) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = done.send(future.await);
    });
    match result.recv() {
        Ok(output) => output,
        Err(_) => panic!("a future run on the test env's runtime panicked"),
    }
}

/// The answer a recorded outcome gives to a redelivery, or to a `fence`.
fn answer(recorded: &Recorded, fence: bool) -> Outcome {
    match recorded {
        Recorded::Ok(output) => Outcome::Success {
            output: output.clone(),
        },
        Recorded::Failed(error) if fence => Outcome::Fenced {
            detail: format!("its failure is recorded: {error}"),
        },
        Recorded::Failed(error) => Outcome::Failure {
            error: error.clone(),
            retryable: false,
        },
        Recorded::Fenced => Outcome::Fenced {
            detail: "fenced before any delivery applied it".into(),
        },
    }
}
