//! `decide(definition, state, input) -> decision`: what a saga does next.
//!
//! Pure: no I/O. The clock reading and fresh ids come in through [`Env`]; whatever the decision
//! depends on is written into its events, so replaying the log gives the same state.

use std::panic::AssertUnwindSafe;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

mod decider;

use decider::Decider;

use crate::definition::Definition;
use crate::event::{Direction, Event, StepAttempt};
use crate::message::{Command, Reply};
use crate::state::{ReplayError, SagaState};

/// Something that happened to a saga, for the engine to act on.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Input {
    /// The saga was just started: dispatch its first step.
    Start,
    /// A participant's result arrived.
    Reply(Reply),
    /// A durable timer came due (or a queued signal or cancel request).
    Timer(Timer),
}

/// A durable timer's purpose. Its [`Timer::key`] is unique within a saga.
///
/// Signals and cancel requests are queued as timers due at once, so any orchestrator applies
/// them exactly once, under the saga's lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Timer {
    /// Dispatch `attempt` of a step once its backoff has passed.
    Retry {
        /// The step's position.
        step: u32,
        /// Action or compensation.
        direction: Direction,
        /// The attempt to dispatch.
        attempt: u32,
    },
    /// The attempt's time (or the wait's) is up.
    Timeout {
        /// The step's position.
        step: u32,
        /// Action or compensation.
        direction: Direction,
        /// The attempt that is timed.
        attempt: u32,
    },
    /// A delay step's time has passed.
    Delay {
        /// The step's position.
        step: u32,
    },
    /// The whole saga's deadline.
    Deadline,
    /// A signal for the saga.
    Signal {
        /// Makes the key unique.
        id: Uuid,
        /// The signal's name.
        name: String,
        /// Its payload.
        payload: Value,
    },
    /// A request to cancel the saga.
    Cancel {
        /// The request's id, recorded with the verdict.
        id: Uuid,
        /// Why.
        reason: String,
    },
    /// An operator's action on the saga.
    Operator {
        /// The request's id, recorded with the verdict.
        id: Uuid,
        /// What to do.
        action: OperatorAction,
    },
}

/// What an operator can do to a saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
#[non_exhaustive]
pub enum OperatorAction {
    /// Runs a stuck saga's failed step again (a new attempt).
    Retry,
    /// Marks the stuck compensation of `step` as done by hand; the saga compensates on.
    Resolve {
        /// The step's name.
        step: String,
        /// Why, and what was done (kept in the log).
        reason: String,
    },
    /// Stops sending new commands until resumed.
    Pause {
        /// Why.
        reason: String,
    },
    /// Sends what the pause held back, and goes on.
    Resume,
}

impl OperatorAction {
    /// `retry`, `resolve`, `pause` or `resume`.
    pub fn name(&self) -> &'static str {
        match self {
            OperatorAction::Retry => "retry",
            OperatorAction::Resolve { .. } => "resolve",
            OperatorAction::Pause { .. } => "pause",
            OperatorAction::Resume => "resume",
        }
    }
}

impl Timer {
    /// The attempt a retry or timeout timer is about.
    pub fn step_attempt(&self) -> Option<StepAttempt> {
        match self {
            Timer::Retry {
                step,
                direction,
                attempt,
            }
            | Timer::Timeout {
                step,
                direction,
                attempt,
            } => Some(StepAttempt::new(*step, *direction, *attempt)),
            _ => None,
        }
    }

    /// The timer's key within its saga, e.g. `retry:1:forward:2`.
    pub fn key(&self) -> String {
        match self {
            Timer::Retry {
                step,
                direction,
                attempt,
            } => format!("retry:{step}:{direction}:{attempt}"),
            Timer::Timeout {
                step,
                direction,
                attempt,
            } => format!("timeout:{step}:{direction}:{attempt}"),
            Timer::Delay { step } => format!("delay:{step}"),
            Timer::Deadline => "deadline".to_owned(),
            Timer::Signal { id, .. } => format!("signal:{id}"),
            Timer::Cancel { id, .. } => format!("cancel:{id}"),
            Timer::Operator { id, .. } => format!("operator:{id}"),
        }
    }
}

/// What the engine must do besides appending events, in the same transaction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Write this command to the outbox.
    Dispatch(Command),
    /// Set a durable timer.
    SetTimer {
        /// What it is for.
        timer: Timer,
        /// When it fires.
        due_at: DateTime<Utc>,
    },
    /// Remove a pending timer that no longer matters.
    CancelTimer(Timer),
}

/// Whether an input changed the saga.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// The input was applied.
    Applied,
    /// A duplicate or stale input: acknowledge it and drop it.
    Ignored(String),
    /// The input names nothing the saga sent: dead-letter it with this reason.
    Rejected(String),
    /// The saga's definition version is not registered in this process: hand the input back
    /// for a process that knows it. Never produced by the decision itself.
    Deferred(String),
}

/// The outcome of [`decide`]: events to append, effects to perform, and the verdict.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    /// Events to append, in order.
    pub events: Vec<Event>,
    /// Outbox rows and timers to write with them.
    pub effects: Vec<Effect>,
    /// Whether the input was applied.
    pub verdict: Verdict,
    /// The state after the events.
    pub state: SagaState,
}

/// What [`decide`] needs from outside: the saga id, the time, and fresh ids.
pub(crate) struct Env<'a> {
    /// The saga instance.
    pub saga_id: Uuid,
    /// The current time, recorded in the events that need it.
    pub now: DateTime<Utc>,
    /// Makes a fresh, unpredictable command id.
    pub new_id: &'a mut dyn FnMut() -> Uuid,
}

/// Decides what `input` does to a saga in `state`.
///
/// Returns an error only if the state and the definition disagree (see [`ReplayError`]). A
/// panic in the definition's code (an input builder, a signal's `accept`) or a duration that
/// overflows a date parks the saga as `stuck` at that step, with the message, once what the
/// input brought is recorded; any other panic inside `decide` parks it at the step the input
/// concerns (a signal is kept for a retry). Either way the other sagas go on.
pub(crate) fn decide(
    definition: &Definition,
    state: &SagaState,
    input: &Input,
    env: &mut Env<'_>,
) -> Result<Decision, ReplayError> {
    let decided = std::panic::catch_unwind(AssertUnwindSafe(|| {
        decide_inner(definition, state, input, env)
    }));
    match decided {
        Ok(decision) => decision,
        Err(panic) => parked(definition, state, input, &panic_message(panic.as_ref())),
    }
}

fn decide_inner(
    definition: &Definition,
    state: &SagaState,
    input: &Input,
    env: &mut Env<'_>,
) -> Result<Decision, ReplayError> {
    let mut d = Decider {
        definition,
        state: state.clone(),
        events: Vec::new(),
        effects: Vec::new(),
        env,
    };
    let verdict = match input {
        Input::Start => d.start()?,
        Input::Reply(reply) => d.reply(reply)?,
        Input::Timer(timer) => d.timer(timer)?,
    };
    // A saga that ends here no longer needs its deadline: the timer goes with the end, rather
    // than stay pending until it fires for nothing. (A stuck saga keeps it: an operator's retry
    // runs it on.)
    if !state.status.is_terminal()
        && d.state.status.is_terminal()
        && definition.deadline().is_some()
        && !matches!(input, Input::Timer(Timer::Deadline))
    {
        d.effects.push(Effect::CancelTimer(Timer::Deadline));
    }
    Ok(Decision {
        events: d.events,
        effects: d.effects,
        verdict,
        state: d.state,
    })
}

/// The decision for an input whose handling panicked in the definition's code: the saga parks
/// as `stuck` at the step the input concerns, with the panic's message.
fn parked(
    definition: &Definition,
    state: &SagaState,
    input: &Input,
    message: &str,
) -> Result<Decision, ReplayError> {
    if state.status.is_terminal() {
        return Ok(Decision {
            events: Vec::new(),
            effects: Vec::new(),
            verdict: Verdict::Ignored(format!("the saga is {}", state.status)),
            state: state.clone(),
        });
    }
    let (step, direction) = concerned_step(state, input);
    let fits = definition
        .steps()
        .get(step as usize)
        .is_some_and(|s| match direction {
            Direction::Forward => true,
            Direction::Compensation => s.compensation.is_some(),
            Direction::Fence => s.action().is_some(),
        });
    let (step, direction) = if fits {
        (step, direction)
    } else {
        (0, Direction::Forward)
    };
    let mut events = Vec::new();
    if let Input::Timer(Timer::Signal { name, payload, .. }) = input {
        // Kept for the wait an operator's retry runs again.
        events.push(Event::SignalReceived {
            name: name.clone(),
            payload: payload.clone(),
        });
    }
    events.push(Event::Stuck {
        step,
        direction,
        reason: format!(
            "the definition's code panicked at step `{}` ({direction}): {message}",
            definition
                .steps()
                .get(step as usize)
                .map_or("?", |s| s.name.as_str())
        ),
    });
    let mut after = state.clone();
    for event in &events {
        after.apply(definition, event)?;
    }
    Ok(Decision {
        events,
        effects: Vec::new(),
        verdict: Verdict::Applied,
        state: after,
    })
}

/// The step (and direction) an input is about, or else the one the saga works on.
fn concerned_step(state: &SagaState, input: &Input) -> (u32, Direction) {
    let named = match input {
        Input::Reply(reply) => Some((reply.step, reply.direction)),
        Input::Timer(
            Timer::Retry {
                step, direction, ..
            }
            | Timer::Timeout {
                step, direction, ..
            },
        ) => Some((*step, *direction)),
        Input::Timer(Timer::Delay { step }) => Some((*step, Direction::Forward)),
        _ => None,
    };
    named
        .or(state.first_current().map(|c| (c.at.step, c.at.direction)))
        .or(state.stuck_at())
        .or(state
            .failure
            .as_ref()
            .map(|(step, _)| (*step, Direction::Forward)))
        .unwrap_or((0, Direction::Forward))
}

/// The text of a panic's payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
