//! A testing kit for users: run sagas in memory on a virtual clock, with handlers as closures
//! or your workers themselves ([`TestEnv::worker`]), and injected failures. A saga that waits
//! 30 days for an approval runs in microseconds.
//!
//! Enabled by the `testing` feature:
//!
//! ```toml
//! [dev-dependencies]
//! saga-core = { version = "0.1", features = ["testing"] }
//! ```
//!
//! ```
//! use std::time::Duration;
//! use saga_core::testing::TestEnv;
//! use saga_core::{SagaDefinition, SagaStatus, StepError};
//!
//! let saga = SagaDefinition::<u64>::builder("expense", 1)
//!     .step("reserve", |s| {
//!         s.action("budget", "reserve", |ctx| Ok(*ctx.input()))
//!             .compensation("budget", "release", |ctx| Ok(*ctx.input()))
//!     })
//!     .step("approval", |s| {
//!         s.wait_for::<bool>("approval", |ok| if *ok { Ok(()) } else { Err("rejected".into()) })
//!             .timeout(Duration::from_secs(30 * 24 * 3600))
//!     })
//!     .step("pay", |s| s.pivot().action("payroll", "pay", |ctx| Ok(*ctx.input())))
//!     .build()
//!     .unwrap();
//!
//! let mut env = TestEnv::new();
//! env.register(&saga)
//!     .handle("budget", "reserve", |amount: u64| Ok::<_, StepError>(amount))
//!     .handle("budget", "release", |_: u64| Ok::<_, StepError>(()))
//!     .handle("payroll", "pay", |_: u64| Ok::<_, StepError>("paid"));
//!
//! let approved = env.start(&saga, &120);
//! env.advance(Duration::from_secs(5 * 24 * 3600));
//! env.signal(approved, "approval", &true);
//! assert_eq!(env.status(approved), SagaStatus::Completed);
//!
//! let forgotten = env.start(&saga, &80);
//! env.advance(Duration::from_secs(31 * 24 * 3600)); // no answer: the wait times out
//! assert_eq!(env.status(forgotten), SagaStatus::Compensated);
//! assert_eq!(env.commands(forgotten), ["budget.reserve", "budget.release"]);
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::decide::{Effect, Env, Input, Timer, Verdict, decide};
use crate::definition::{Definition, SagaDefinition};
use crate::event::{Event, RecordedEvent};
use crate::message::{Command, Reply};
use crate::state::{SagaState, SagaStatus, replay};
use crate::worker::StepError;

mod participant;

use participant::{Recorded, TestHandler};

/// What an injected fault does to the next delivery of a command.
///
/// Participants here keep an inbox, as a [`Worker`](crate::Worker) with one does: a step's
/// outcome is recorded under its idempotency key, a redelivery gets it back, and a fence of a
/// step whose outcome the saga does not know answers from it (or writes a tombstone).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The handler is not called; the attempt fails with this error (a terminal one is
    /// recorded in the env's inbox; a worker's own inbox records nothing, so a fence of the
    /// step finds it unapplied).
    Fail(StepError),
    /// The handler runs (its outcome is recorded) but the answer is lost: the attempt times
    /// out, and the saga learns the truth from a later attempt or a fence.
    LoseResult,
    /// The command is lost before it runs (a message that expired in its queue): the attempt
    /// times out, and a fence finds the step unapplied.
    LoseCommand,
}

struct TestSaga {
    definition: Arc<Definition>,
    state: SagaState,
    events: Vec<RecordedEvent>,
    commands: Vec<String>,
}

/// Sagas in memory on a virtual clock. Commands go straight to the registered closures or
/// workers; the saga's time (timeouts, backoffs, waits, deadlines) moves only when the test
/// calls [`TestEnv::advance`], while a worker's handler runs in real time.
pub struct TestEnv {
    now: DateTime<Utc>,
    definitions: HashMap<(String, u32), Arc<Definition>>,
    sagas: HashMap<Uuid, TestSaga>,
    timers: Vec<(Uuid, Timer, DateTime<Utc>)>,
    queue: VecDeque<Command>,
    handlers: HashMap<(String, String), TestHandler>,
    faults: HashMap<(String, String), VecDeque<Fault>>,
    inbox: HashMap<(String, String), Recorded>,
    /// Services served by a worker: commands without a closure take the worker's path.
    workers: HashMap<String, Arc<crate::Worker>>,
    /// Where handlers of workers run (made on first use).
    runtime: std::sync::OnceLock<tokio::runtime::Runtime>,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnv")
            .field("now", &self.now)
            .field("sagas", &self.sagas.len())
            .finish_non_exhaustive()
    }
}

impl TestEnv {
    /// An empty environment whose clock reads 2030-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self {
            now: Utc
                .with_ymd_and_hms(2030, 1, 1, 0, 0, 0)
                .single()
                .expect("a valid date"),
            definitions: HashMap::new(),
            sagas: HashMap::new(),
            timers: Vec::new(),
            queue: VecDeque::new(),
            handlers: HashMap::new(),
            faults: HashMap::new(),
            inbox: HashMap::new(),
            workers: HashMap::new(),
            runtime: std::sync::OnceLock::new(),
        }
    }

    /// Registers a definition.
    pub fn register<I>(&mut self, definition: &SagaDefinition<I>) -> &mut Self {
        let def = Arc::clone(definition.definition());
        self.definitions
            .insert((def.name().to_owned(), def.version()), def);
        self
    }

    /// Handles `command` of `service` with a closure from the step input to its output.
    pub fn handle<In, Out, F>(&mut self, service: &str, command: &str, mut f: F) -> &mut Self
    where
        In: DeserializeOwned,
        Out: Serialize,
        F: FnMut(In) -> Result<Out, StepError> + Send + 'static,
    {
        let name = format!("{service}.{command}");
        let handler: TestHandler = Box::new(move |command| {
            let input: In = serde_json::from_value(command.payload.clone()).map_err(|e| {
                let sent = match &command.input_type {
                    Some(sent) => format!("; the saga built it as a `{sent}`"),
                    None => String::new(),
                };
                StepError::terminal(format!(
                    "the input of {name} is not a `{}` (what its handler reads){sent}: {}",
                    std::any::type_name::<In>(),
                    crate::codec::without_values(&e)
                ))
            })?;
            let output = f(input)?;
            serde_json::to_value(output).map_err(|e| StepError::terminal(e.to_string()))
        });
        self.handlers
            .insert((service.to_owned(), command.to_owned()), handler);
        self
    }

    /// Handles the contract `C` ([`mod@crate::contract`]) with a closure from its input to its
    /// output, typed as the contract says.
    pub fn serve<C: crate::Contract>(
        &mut self,
        f: impl FnMut(C::Input) -> Result<C::Output, StepError> + Send + 'static,
    ) -> &mut Self {
        self.handle(<C::Service as crate::Service>::NAME, C::COMMAND, f)
    }

    /// Makes the next delivery of `command` of `service` suffer `fault` (faults queue up).
    pub fn inject(&mut self, service: &str, command: &str, fault: Fault) -> &mut Self {
        self.faults
            .entry((service.to_owned(), command.to_owned()))
            .or_default()
            .push_back(fault);
        self
    }

    /// The virtual time.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Starts a saga and runs it until it waits for time, a signal, or has ended.
    pub fn start<I: Serialize>(&mut self, definition: &SagaDefinition<I>, input: &I) -> Uuid {
        self.register(definition);
        let def = Arc::clone(definition.definition());
        let saga_id = Uuid::new_v4();
        let started = Event::Started {
            saga: def.name().to_owned(),
            version: def.version(),
            input: serde_json::to_value(input).expect("the input serializes"),
            business_key: None,
            steps: def.step_names(),
            groups: def.group_records(),
        };
        let state = replay(&def, [&started]).expect("a fresh log replays");
        let record = RecordedEvent {
            seq: 1,
            at: self.now,
            event: started,
        };
        self.sagas.insert(
            saga_id,
            TestSaga {
                definition: def,
                state,
                events: vec![record],
                commands: Vec::new(),
            },
        );
        self.apply(saga_id, Input::Start);
        self.run_until_idle();
        saga_id
    }

    /// Sends a signal and runs the saga on.
    pub fn signal<T: Serialize>(&mut self, saga_id: Uuid, name: &str, payload: &T) {
        let timer = Timer::Signal {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            payload: serde_json::to_value(payload).expect("the payload serializes"),
        };
        self.apply(saga_id, Input::Timer(timer));
        self.run_until_idle();
    }

    /// Asks to cancel a saga; `Err` says why it was refused.
    pub fn cancel(&mut self, saga_id: Uuid, reason: &str) -> Result<(), String> {
        let id = Uuid::new_v4();
        let verdict = self.apply(
            saga_id,
            Input::Timer(Timer::Cancel {
                id,
                reason: reason.to_owned(),
            }),
        );
        self.run_until_idle();
        if let Verdict::Ignored(why) = verdict {
            return Err(why);
        }
        let saga = &self.sagas[&saga_id];
        for record in &saga.events {
            match &record.event {
                Event::CancelRequested { request, .. } if *request == id => return Ok(()),
                Event::CancelRefused { request, why, .. } if *request == id => {
                    return Err(why.clone());
                }
                _ => {}
            }
        }
        Err("the cancel was not recorded".to_owned())
    }

    /// Moves the clock forward by `by`, firing every timer that comes due, in order.
    pub fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        loop {
            let next = self
                .timers
                .iter()
                .enumerate()
                .filter(|(_, (_, _, due))| *due <= target)
                .min_by_key(|(_, (_, _, due))| *due)
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            let (saga_id, timer, due) = self.timers.remove(i);
            self.now = self.now.max(due);
            self.apply(saga_id, Input::Timer(timer));
            self.run_until_idle();
        }
        self.now = target;
    }

    /// A saga's status.
    pub fn status(&self, saga_id: Uuid) -> SagaStatus {
        self.saga(saga_id).state.status
    }

    /// A saga's state (outputs, failure reason, signals).
    pub fn state(&self, saga_id: Uuid) -> &SagaState {
        &self.saga(saga_id).state
    }

    /// A saga's log.
    pub fn history(&self, saga_id: Uuid) -> &[RecordedEvent] {
        &self.saga(saga_id).events
    }

    /// The commands a saga sent, as `service.command`, in order (retries included).
    pub fn commands(&self, saga_id: Uuid) -> &[String] {
        &self.saga(saga_id).commands
    }

    fn saga(&self, saga_id: Uuid) -> &TestSaga {
        self.sagas
            .get(&saga_id)
            .unwrap_or_else(|| panic!("no saga {saga_id} in this TestEnv"))
    }

    fn apply(&mut self, saga_id: Uuid, input: Input) -> Verdict {
        let saga = self.sagas.get_mut(&saga_id).expect("a saga of this env");
        let mut new_id = Uuid::new_v4;
        let mut env = Env {
            saga_id,
            now: self.now,
            new_id: &mut new_id,
        };
        let decision = decide(&saga.definition, &saga.state, &input, &mut env)
            .unwrap_or_else(|e| panic!("saga {saga_id}: {e}"));
        for event in decision.events {
            let seq = saga.events.len() as i64 + 1;
            saga.events.push(RecordedEvent {
                seq,
                at: self.now,
                event,
            });
        }
        saga.state = decision.state;
        for effect in decision.effects {
            match effect {
                Effect::Dispatch(command) => {
                    saga.commands
                        .push(format!("{}.{}", command.service, command.command));
                    self.queue.push_back(command);
                }
                Effect::SetTimer { timer, due_at } => {
                    let key = timer.key();
                    self.timers
                        .retain(|(s, t, _)| !(*s == saga_id && t.key() == key));
                    self.timers.push((saga_id, timer, due_at));
                }
                Effect::CancelTimer(timer) => {
                    let key = timer.key();
                    self.timers
                        .retain(|(s, t, _)| !(*s == saga_id && t.key() == key));
                }
            }
        }
        decision.verdict
    }

    /// Delivers every queued command to its participant and applies the results.
    fn run_until_idle(&mut self) {
        while let Some(command) = self.queue.pop_front() {
            if let Some(outcome) = self.deliver(&command) {
                self.apply(command.saga_id, Input::Reply(Reply::to(&command, outcome)));
            }
        }
    }
}
