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
    /// Serves the commands of `worker`'s service with the worker itself: its `Handler`
    /// implementations, async, through the worker's own run of a command (its inbox, unknown
    /// commands, panics and its timeouts; the broker's part, such as size limits, is not
    /// played). A closure registered with [`handle`](Self::handle) for one of the worker's
    /// commands is replaced; closures for its other commands stay and win.
    ///
    /// A worker with an [`Inbox`](crate::Inbox) runs each command in the inbox's transaction,
    /// so a handler's writes through [`CommandContext::transaction`](crate::CommandContext::transaction)
    /// commit with its recorded outcome, and redeliveries and fences are answered by that
    /// inbox: the database is real, the saga's log, the broker and the clock are the env's.
    /// A worker without one ([`Worker::at_least_once`]) runs a redelivery again and answers a
    /// fence `unfenceable`, as in production. Outputs a worker seals with its
    /// [`Payloads`](crate::Payloads) are opened for the env.
    ///
    /// Handlers run on the env's own runtime while the test waits, in real time (a handler
    /// that hangs holds the test for the worker's timeout). A handler's pool (and the
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
        for command in worker.commands() {
            self.handlers.remove(&(service.clone(), command.clone()));
        }
        self.workers.insert(service, worker);
        self
    }

    /// Runs `future` on the env's runtime, where workers' handlers run, and waits for it:
    /// make the pools that handlers and inboxes use here. Callable from a plain `#[test]` or
    /// from async code (it blocks the calling thread until `future` ends); a panic in
    /// `future` is raised again here.
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
            && let Some(worker) = self.workers.get(&command.service).cloned()
        {
            return self.deliver_to_worker(worker, command);
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
                let handler = self.handlers.get_mut(&route).unwrap_or_else(|| {
                    panic!(
                        "no handler for {}.{}; register one with TestEnv::handle or TestEnv::worker",
                        route.0, route.1
                    )
                });
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

    /// A command of a service served by a worker: its run of the command, or its fence.
    /// Faults apply, as with closures, only to a delivery whose outcome is not recorded.
    fn deliver_to_worker(&mut self, worker: Arc<Worker>, command: &Command) -> Option<Outcome> {
        let runtime = self.runtime().handle().clone();
        let owned = command.clone();
        let shared = Arc::clone(&worker);
        let recorded = match worker.inbox().cloned() {
            Some(inbox) if command.direction != Direction::Fence => {
                let key = command.idempotency_key.clone();
                run_on(&runtime, async move { inbox.settles(&key).await })
                    .unwrap_or_else(|e| panic!("the test env cannot read the worker's inbox: {e}"))
            }
            _ => false,
        };
        let fault = match (command.direction, recorded) {
            (Direction::Fence, _) | (_, true) => None,
            _ => self.fault(command),
        };
        let mut outcome = match fault {
            Some(Fault::LoseCommand) => return None,
            Some(Fault::Fail(error)) => {
                return Some(Outcome::Failure {
                    error: error.message().to_owned(),
                    retryable: error.is_retryable(),
                });
            }
            _ if command.direction == Direction::Fence => {
                run_on(&runtime, async move { shared.fence(&owned).await })
            }
            _ => run_on(&runtime, async move { shared.attempt(&owned, None).await }),
        };
        // The env's saga reads outputs as the orchestrator would after opening them.
        worker.payloads().open_in_if_possible(&mut outcome);
        (fault != Some(Fault::LoseResult)).then_some(outcome)
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

/// Runs `future` on `runtime` and waits for it on this thread; its panic is raised here.
fn run_on<F>(runtime: &tokio::runtime::Handle, future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (done, result) = std::sync::mpsc::sync_channel(1);
    let task = runtime.spawn(future);
    runtime.spawn(async move {
        let _ = done.send(task.await);
    });
    let patience = std::time::Duration::from_secs(20);
    let ended = match result.recv_timeout(patience) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            eprintln!(
                "saga TestEnv: still waiting for a handler after {patience:?}. A pool made outside \
                 TestEnv::block_on (on the test's own runtime) cannot be driven while the test \
                 waits: make it with env.block_on."
            );
            result.recv()
        }
        other => other.map_err(|_| std::sync::mpsc::RecvError),
    };
    match ended {
        Ok(Ok(output)) => output,
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        _ => panic!("the test env's runtime stopped before the future ended"),
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
