//! The event vocabulary: every fact the log records about a saga.
//!
//! Events are stored as JSON, tagged by `type`; their shape is part of the durable contract.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// What a command does to its step: move it forward, undo it, or settle an unknown outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Direction {
    /// The step's action.
    #[default]
    Forward,
    /// The step's compensation.
    Compensation,
    /// A fence of one of the step's commands (its action, or its compensation): the service
    /// that runs it answers from its inbox whether it applied (with the output), or writes a
    /// tombstone under its idempotency key so that no delivery of any attempt can apply it any
    /// more.
    Fence,
}

impl Direction {
    /// `forward`, `compensation` or `fence`, as written in headers and keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Compensation => "compensation",
            Direction::Fence => "fence",
        }
    }
}

impl Direction {
    /// Whether this is [`Direction::Forward`].
    pub fn is_forward(&self) -> bool {
        *self == Direction::Forward
    }
}

/// One attempt of a step in one direction: what a command, its result, its timers and their
/// events are about. The log and the messages keep its three fields side by side (their
/// format is part of the contract); [`Event::step_attempt`],
/// [`Command::step_attempt`](crate::Command::step_attempt),
/// [`Reply::step_attempt`](crate::Reply::step_attempt) and
/// [`Timer::step_attempt`](crate::Timer::step_attempt) read them as one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepAttempt {
    /// The step's position.
    pub step: u32,
    /// Action, compensation or fence.
    pub direction: Direction,
    /// The attempt, from 1 (fences count their own attempts).
    pub attempt: u32,
}

impl StepAttempt {
    /// Attempt `attempt` of `step` in `direction`.
    pub fn new(step: u32, direction: Direction, attempt: u32) -> Self {
        Self {
            step,
            direction,
            attempt,
        }
    }
}

impl std::fmt::Display for StepAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {} {} attempt {}",
            self.step, self.direction, self.attempt
        )
    }
}

/// What a saga does once a fence has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FenceThen {
    /// It gives up on the step's action: an action that applied is compensated (a pivot goes
    /// forward), one that did not needs nothing.
    #[default]
    GiveUp,
    /// An operator's retry: a command that applied counts as done; one that did not runs
    /// again under a fresh idempotency key (the old one holds the tombstone).
    Retry,
    /// An operator resolved the compensation by hand: whatever the answer, no delivery of it
    /// can apply any more, and the saga compensates on.
    Resolve,
}

impl FenceThen {
    /// Whether this is [`FenceThen::GiveUp`].
    pub fn is_give_up(&self) -> bool {
        *self == FenceThen::GiveUp
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Direction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "forward" => Ok(Direction::Forward),
            "compensation" => Ok(Direction::Compensation),
            "fence" => Ok(Direction::Fence),
            other => Err(format!("unknown direction `{other}`")),
        }
    }
}

/// One fact in a saga's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The saga was started with this input.
    Started {
        /// The definition's name.
        saga: String,
        /// The definition's version.
        version: u32,
        /// The saga input, as JSON.
        input: Value,
        /// The business key that makes the start idempotent, if any.
        business_key: Option<String>,
        /// The definition's step names, in order: replay fails loudly
        /// ([`ReplayError::RENAMED`](crate::ReplayError::RENAMED)) under a definition whose
        /// steps differ. Empty in logs written before the names were recorded.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        steps: Vec<String>,
        /// The definition's parallel groups, checked on replay like the step names. Absent
        /// when it has none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        groups: Vec<crate::definition::GroupRecord>,
    },
    /// A command was written to the outbox.
    Dispatched {
        /// The step's position.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
        /// The attempt, from 1 (fences count their own attempts).
        attempt: u32,
        /// The command's id; a result must carry it.
        command_id: Uuid,
        /// The command's input (`null` for a fence).
        payload: Value,
        /// The service the command went to (absent in older logs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        /// The command's name (absent in older logs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        command: Option<String>,
    },
    /// The participant reported success.
    Succeeded {
        /// The step's position.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
        /// The attempt.
        attempt: u32,
        /// The step's output.
        output: Value,
    },
    /// The attempt failed: the participant said so, or its input could not be built.
    Failed {
        /// The step's position.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
        /// The attempt.
        attempt: u32,
        /// Why.
        error: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// No result came within the step's timeout; the effect may have been applied.
    TimedOut {
        /// The step's position.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
        /// The attempt.
        attempt: u32,
    },
    /// Another attempt will be dispatched when the timer fires.
    RetryScheduled {
        /// The step's position.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
        /// The attempt that will be dispatched.
        attempt: u32,
        /// The backoff chosen, in milliseconds.
        delay_ms: u64,
        /// When the attempt is due.
        due_at: DateTime<Utc>,
    },
    /// Before it decides, the saga fences a command of a step whose outcome it does not
    /// know, at the service that runs it (commands in the [`Direction::Fence`] direction): it
    /// gives up on the action (an attempt timed out or failed retryably, a cancel came while
    /// it ran), or an operator retries or resolves the step.
    FenceStarted {
        /// The step's position.
        step: u32,
        /// Why.
        reason: String,
        /// The command fenced: the action (absent in the log) or the compensation.
        #[serde(default, skip_serializing_if = "Direction::is_forward")]
        target: Direction,
        /// What the saga does once it knows.
        #[serde(default, skip_serializing_if = "FenceThen::is_give_up")]
        then: FenceThen,
    },
    /// The step's service fenced it: the fenced command did not apply, and no delivery of
    /// any attempt can apply it any more.
    Fenced {
        /// The step's position.
        step: u32,
        /// The fence's attempt.
        attempt: u32,
        /// What the service found (a tombstone written, a failure recorded).
        detail: String,
    },
    /// A step failed for good; completed steps are undone from here.
    CompensationStarted {
        /// The step that failed.
        step: u32,
        /// Why it failed.
        reason: String,
    },
    /// The step did not run, has no output, and is never compensated: its condition did not
    /// hold, or it was a group member held by a pause, never sent, when the saga gave up on
    /// the group.
    Skipped {
        /// The step's position.
        step: u32,
    },
    /// The saga waits at a step: for a signal, or until a delay has passed.
    Waiting {
        /// The step's position.
        step: u32,
        /// The signal it waits for; `None` for a delay.
        signal: Option<String>,
        /// When the wait ends (the delay), or times out (the signal).
        until: Option<DateTime<Utc>>,
    },
    /// A signal arrived; it is kept until a wait step for its name takes it.
    SignalReceived {
        /// The signal's name.
        name: String,
        /// Its payload.
        payload: Value,
    },
    /// A cancel was accepted: the in-flight step settles, then the completed steps compensate.
    CancelRequested {
        /// The request's id.
        request: Uuid,
        /// Why the caller cancels.
        reason: String,
    },
    /// A cancel was refused.
    CancelRefused {
        /// The request's id.
        request: Uuid,
        /// Why the caller wanted to cancel.
        reason: String,
        /// Why it cannot be done.
        why: String,
    },
    /// The saga's deadline passed before its pivot: the completed steps compensate.
    DeadlineExceeded,
    /// An operator asked to run a stuck saga's failed step again.
    RetryRequested {
        /// The request's id.
        request: Uuid,
        /// The step to run again.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
    },
    /// An operator marked a stuck compensation as done by hand (audited).
    Resolved {
        /// The request's id.
        request: Uuid,
        /// The step whose compensation was done by hand.
        step: u32,
        /// Why, and what was done.
        reason: String,
    },
    /// An operator paused the saga: it sends no new commands until resumed.
    Paused {
        /// The request's id.
        request: Uuid,
        /// Why.
        reason: String,
    },
    /// An operator resumed a paused saga.
    Resumed {
        /// The request's id.
        request: Uuid,
    },
    /// A command was not sent because the saga is paused; it is sent on resume.
    Held {
        /// The step's position.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
        /// The attempt.
        attempt: u32,
    },
    /// An operator's request was refused.
    ActionRefused {
        /// The request's id.
        request: Uuid,
        /// What was asked.
        action: String,
        /// Why it cannot be done.
        why: String,
    },
    /// Every step succeeded.
    Completed,
    /// Every compensation that had to run succeeded.
    Compensated,
    /// Cancelled: every compensation that had to run succeeded.
    Cancelled,
    /// The saga cannot go on without an operator.
    Stuck {
        /// The step that could not finish.
        step: u32,
        /// Action, compensation or fence.
        direction: Direction,
        /// Why.
        reason: String,
    },
}

impl Event {
    /// The attempt this event is about: for `dispatched`, `succeeded`, `failed`,
    /// `timed_out`, `retry_scheduled` and `held`.
    pub fn step_attempt(&self) -> Option<StepAttempt> {
        match self {
            Event::Dispatched {
                step,
                direction,
                attempt,
                ..
            }
            | Event::Succeeded {
                step,
                direction,
                attempt,
                ..
            }
            | Event::Failed {
                step,
                direction,
                attempt,
                ..
            }
            | Event::TimedOut {
                step,
                direction,
                attempt,
            }
            | Event::RetryScheduled {
                step,
                direction,
                attempt,
                ..
            }
            | Event::Held {
                step,
                direction,
                attempt,
            } => Some(StepAttempt::new(*step, *direction, *attempt)),
            _ => None,
        }
    }

    /// The event's `type` tag, as stored in the log's `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Dispatched { .. } => "dispatched",
            Event::Succeeded { .. } => "succeeded",
            Event::Failed { .. } => "failed",
            Event::TimedOut { .. } => "timed_out",
            Event::RetryScheduled { .. } => "retry_scheduled",
            Event::FenceStarted { .. } => "fence_started",
            Event::Fenced { .. } => "fenced",
            Event::CompensationStarted { .. } => "compensation_started",
            Event::Skipped { .. } => "skipped",
            Event::Waiting { .. } => "waiting",
            Event::SignalReceived { .. } => "signal_received",
            Event::CancelRequested { .. } => "cancel_requested",
            Event::CancelRefused { .. } => "cancel_refused",
            Event::DeadlineExceeded => "deadline_exceeded",
            Event::RetryRequested { .. } => "retry_requested",
            Event::Resolved { .. } => "resolved",
            Event::Paused { .. } => "paused",
            Event::Resumed { .. } => "resumed",
            Event::Held { .. } => "held",
            Event::ActionRefused { .. } => "action_refused",
            Event::Completed => "completed",
            Event::Compensated => "compensated",
            Event::Cancelled => "cancelled",
            Event::Stuck { .. } => "stuck",
        }
    }
}

/// An event as read back from the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// Position in the saga's log, from 1.
    pub seq: i64,
    /// When it was appended.
    pub at: DateTime<Utc>,
    /// The event.
    pub event: Event,
}
