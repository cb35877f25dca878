//! A saga's state, rebuilt from its log: `replay(definition, events)`.
//!
//! Pure: no I/O, no clock. The engine decides from this state only.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::{Definition, Work};
use crate::event::{Direction, Event};

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Going forward.
    Running,
    /// A step failed for good; compensations are running.
    Compensating,
    /// Every step succeeded. Terminal.
    Completed,
    /// Every needed compensation succeeded. Terminal.
    Compensated,
    /// Needs an operator: a compensation (or a step after the pivot) failed for good.
    Stuck,
    /// Cancelled, and every needed compensation succeeded. Terminal.
    Cancelled,
}

impl SagaStatus {
    /// Why the saga compensated or got stuck, if it did.
    pub fn reason(state: &SagaState) -> Option<&str> {
        state
            .stuck_reason
            .as_deref()
            .or(state.failure.as_ref().map(|(_, reason)| reason.as_str()))
    }

    /// Every status, in a stable order.
    pub const ALL: [SagaStatus; 6] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Stuck,
        SagaStatus::Cancelled,
    ];

    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Stuck => "stuck",
            SagaStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the saga has finished (Completed, Compensated or Cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Cancelled
        )
    }

    /// Whether the engine still acts on the saga by itself.
    pub fn is_active(self) -> bool {
        matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }
}

impl std::fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SagaStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SagaStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown saga status `{s}`"))
    }
}

/// What became of a step's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepProgress {
    /// Not dispatched yet.
    Pending,
    /// Dispatched, no result yet.
    InFlight,
    /// Succeeded; its output is recorded.
    Succeeded,
    /// Failed; the effect was not applied.
    Failed,
    /// Its last attempt timed out: the effect may have been applied.
    PossiblyApplied,
}

/// The command the saga is working on, or the retry it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    /// The step's position.
    pub step: u32,
    /// Action or compensation.
    pub direction: Direction,
    /// The attempt.
    pub attempt: u32,
    /// The outstanding command, or `None` while a retry timer is pending or the step waits.
    pub command_id: Option<Uuid>,
    /// Whether the step waits for a signal or a delay.
    pub waiting: bool,
}

/// A signal the saga received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSignal {
    /// Its name.
    pub name: String,
    /// Its payload.
    pub payload: Value,
    /// Whether a wait step took it.
    pub consumed: bool,
}

/// Why a saga stops going forward before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// The reason recorded with the compensation.
    pub reason: String,
    /// A cancel (ends `cancelled`), not a deadline (ends `compensated`).
    pub cancelled: bool,
}

/// A command the saga has dispatched, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentCommand {
    /// The step's position.
    pub step: u32,
    /// Action or compensation.
    pub direction: Direction,
    /// The attempt.
    pub attempt: u32,
}

/// A saga's state: the fold of its events over its definition.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    /// The saga input.
    pub input: Value,
    /// The business key, if any.
    pub business_key: Option<String>,
    /// Where the saga stands.
    pub status: SagaStatus,
    /// Each step's progress.
    pub progress: Vec<StepProgress>,
    /// Each step's output, once it succeeded.
    pub outputs: Vec<Option<Value>>,
    /// Which steps have been compensated.
    pub compensated: Vec<bool>,
    /// What the saga is working on.
    pub current: Option<Current>,
    /// The step whose failure started compensation, and why.
    pub failure: Option<(u32, String)>,
    /// Why the saga is stuck.
    pub stuck_reason: Option<String>,
    /// Every command ever dispatched, by id.
    pub sent: HashMap<Uuid, SentCommand>,
    /// Signals received, in order.
    pub signals: Vec<ReceivedSignal>,
    /// A cancel or a passed deadline.
    pub stop: Option<Stop>,
    /// Paused by an operator: no new commands are sent.
    pub paused: bool,
    /// The command held back while paused, sent on resume.
    pub held: Option<Current>,
    /// The step and direction that got the saga stuck.
    pub stuck_at: Option<(u32, Direction)>,
    /// How many events have been applied.
    pub events: u64,
}

/// The log disagrees with the definition, or is malformed.
///
/// Carries a stable code, like `[SAGA-R001]`, to search for in the docs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[{code}] saga `{saga}` v{version}: {message}")]
pub struct ReplayError {
    /// The stable code.
    pub code: &'static str,
    /// The definition's name.
    pub saga: String,
    /// The definition's version.
    pub version: u32,
    /// What does not fit.
    pub message: String,
}

impl ReplayError {
    /// The log does not start with `started`, or has a second one.
    pub const BAD_START: &'static str = "SAGA-R001";
    /// An event names a step or compensation the definition lacks.
    pub const UNKNOWN_STEP: &'static str = "SAGA-R002";
    /// An event follows a terminal event.
    pub const AFTER_END: &'static str = "SAGA-R003";
    /// The log was written by another definition.
    pub const WRONG_DEFINITION: &'static str = "SAGA-R004";
    /// The log holds more or fewer events than the saga's row counts (events deleted or
    /// written around the store).
    pub const MISCOUNTED: &'static str = "SAGA-R005";

    fn new(def: &Definition, code: &'static str, message: String) -> Self {
        Self {
            code,
            saga: def.name().to_owned(),
            version: def.version(),
            message,
        }
    }
}

/// Rebuilds a saga's state from its whole log.
///
/// ```
/// # use saga_core::{replay, Event, SagaDefinition, SagaStatus};
/// # let def = SagaDefinition::<u32>::builder("demo", 1)
/// #     .step("a", |s| s.action("svc", "a", |ctx| Ok(*ctx.input())))
/// #     .build().unwrap();
/// let events = [Event::Started { saga: "demo".into(), version: 1, input: 7.into(), business_key: None }];
/// let state = replay(def.definition(), &events).unwrap();
/// assert_eq!(state.status, SagaStatus::Running);
/// ```
pub fn replay<'e>(
    definition: &Definition,
    events: impl IntoIterator<Item = &'e Event>,
) -> Result<SagaState, ReplayError> {
    let mut events = events.into_iter();
    let first = events.next().ok_or_else(|| {
        ReplayError::new(
            definition,
            ReplayError::BAD_START,
            "the log is empty".into(),
        )
    })?;
    let mut state = SagaState::started(definition, first)?;
    for event in events {
        state.apply(definition, event)?;
    }
    Ok(state)
}

impl SagaState {
    /// The state after the log's first event, which must be `started`.
    pub fn started(definition: &Definition, event: &Event) -> Result<Self, ReplayError> {
        let Event::Started {
            saga,
            version,
            input,
            business_key,
        } = event
        else {
            return Err(ReplayError::new(
                definition,
                ReplayError::BAD_START,
                format!("the log starts with `{}`, not `started`", event.kind()),
            ));
        };
        if saga != definition.name() || *version != definition.version() {
            return Err(ReplayError::new(
                definition,
                ReplayError::WRONG_DEFINITION,
                format!("the log belongs to `{saga}` v{version}"),
            ));
        }
        let steps = definition.steps().len();
        Ok(Self {
            input: input.clone(),
            business_key: business_key.clone(),
            status: SagaStatus::Running,
            progress: vec![StepProgress::Pending; steps],
            outputs: vec![None; steps],
            compensated: vec![false; steps],
            current: None,
            failure: None,
            stuck_reason: None,
            sent: HashMap::new(),
            signals: Vec::new(),
            stop: None,
            paused: false,
            held: None,
            stuck_at: None,
            events: 1,
        })
    }

    /// Applies one more event. Replaying a prefix and then the rest equals replaying the whole.
    pub fn apply(&mut self, definition: &Definition, event: &Event) -> Result<(), ReplayError> {
        // A refused request is recorded even after the end: it changes nothing.
        let audit_only = matches!(
            event,
            Event::ActionRefused { .. } | Event::CancelRefused { .. }
        );
        if self.status.is_terminal() && !audit_only {
            return Err(ReplayError::new(
                definition,
                ReplayError::AFTER_END,
                format!("`{}` after the saga ended {}", event.kind(), self.status),
            ));
        }
        match event {
            Event::Started { .. } => {
                return Err(ReplayError::new(
                    definition,
                    ReplayError::BAD_START,
                    "a second `started` event".into(),
                ));
            }
            Event::Dispatched {
                step,
                direction,
                attempt,
                command_id,
                ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current = Some(Current {
                    step: *step,
                    direction: *direction,
                    attempt: *attempt,
                    command_id: Some(*command_id),
                    waiting: false,
                });
                self.sent.insert(
                    *command_id,
                    SentCommand {
                        step: *step,
                        direction: *direction,
                        attempt: *attempt,
                    },
                );
                if *direction == Direction::Forward {
                    self.progress[i] = StepProgress::InFlight;
                }
            }
            Event::Succeeded {
                step,
                direction,
                output,
                ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current = None;
                match direction {
                    Direction::Forward => {
                        self.progress[i] = StepProgress::Succeeded;
                        self.outputs[i] = Some(output.clone());
                        self.consume_signal(definition, i);
                    }
                    Direction::Compensation => self.compensated[i] = true,
                }
            }
            Event::Failed {
                step, direction, ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current = None;
                if *direction == Direction::Forward {
                    self.progress[i] = StepProgress::Failed;
                    // A refused signal is used up.
                    self.consume_signal(definition, i);
                }
            }
            Event::TimedOut {
                step, direction, ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current = None;
                if *direction == Direction::Forward {
                    // A command that timed out may have been applied; a wait has no effect.
                    self.progress[i] = match definition.steps()[i].work {
                        Work::Command(_) => StepProgress::PossiblyApplied,
                        _ => StepProgress::Failed,
                    };
                }
            }
            Event::Waiting { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Forward)?;
                self.current = Some(Current {
                    step: *step,
                    direction: Direction::Forward,
                    attempt: 1,
                    command_id: None,
                    waiting: true,
                });
                self.progress[i] = StepProgress::InFlight;
            }
            Event::SignalReceived { name, payload } => self.signals.push(ReceivedSignal {
                name: name.clone(),
                payload: payload.clone(),
                consumed: false,
            }),
            Event::CancelRequested { reason, .. } => {
                self.stop = Some(Stop {
                    reason: format!("cancelled: {reason}"),
                    cancelled: true,
                });
            }
            Event::CancelRefused { .. } => {}
            Event::DeadlineExceeded => {
                let deadline = definition.deadline().unwrap_or_default();
                self.stop = Some(Stop {
                    reason: format!("the saga's deadline of {deadline:?} passed"),
                    cancelled: false,
                });
            }
            Event::Cancelled => self.finish(SagaStatus::Cancelled),
            Event::RetryRequested { .. } => {
                self.status = if self.failure.is_some() || self.stop.is_some() {
                    SagaStatus::Compensating
                } else {
                    SagaStatus::Running
                };
                self.stuck_reason = None;
                self.stuck_at = None;
            }
            Event::Resolved { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Compensation)?;
                self.compensated[i] = true;
                self.status = SagaStatus::Compensating;
                self.stuck_reason = None;
                self.stuck_at = None;
            }
            Event::Paused { .. } => self.paused = true,
            Event::Resumed { .. } => {
                self.paused = false;
                self.held = None;
            }
            Event::Held {
                step,
                direction,
                attempt,
            } => {
                self.check_step(definition, *step, *direction)?;
                let held = Current {
                    step: *step,
                    direction: *direction,
                    attempt: *attempt,
                    command_id: None,
                    waiting: false,
                };
                self.held = Some(held);
                self.current = Some(held);
            }
            Event::ActionRefused { .. } => {}
            Event::RetryScheduled {
                step,
                direction,
                attempt,
                ..
            } => {
                self.check_step(definition, *step, *direction)?;
                self.current = Some(Current {
                    step: *step,
                    direction: *direction,
                    attempt: *attempt,
                    command_id: None,
                    waiting: false,
                });
            }
            Event::CompensationStarted { step, reason } => {
                self.check_step(definition, *step, Direction::Forward)?;
                self.status = SagaStatus::Compensating;
                self.failure = Some((*step, reason.clone()));
            }
            Event::Completed => self.finish(SagaStatus::Completed),
            Event::Compensated => self.finish(SagaStatus::Compensated),
            Event::Stuck {
                step,
                direction,
                reason,
            } => {
                self.check_step(definition, *step, *direction)?;
                self.finish(SagaStatus::Stuck);
                self.stuck_reason = Some(reason.clone());
                self.stuck_at = Some((*step, *direction));
            }
        }
        self.events += 1;
        Ok(())
    }

    /// Marks the oldest unused signal that step `i` waits for as used.
    fn consume_signal(&mut self, definition: &Definition, i: usize) {
        if let Work::Signal(wait) = &definition.steps()[i].work
            && let Some(signal) = self
                .signals
                .iter_mut()
                .find(|s| !s.consumed && s.name == wait.name)
        {
            signal.consumed = true;
        }
    }

    /// The oldest unused signal named `name`.
    pub fn pending_signal(&self, name: &str) -> Option<&Value> {
        self.signals
            .iter()
            .find(|s| !s.consumed && s.name == name)
            .map(|s| &s.payload)
    }

    fn finish(&mut self, status: SagaStatus) {
        self.status = status;
        self.current = None;
    }

    fn check_step(
        &self,
        definition: &Definition,
        step: u32,
        direction: Direction,
    ) -> Result<usize, ReplayError> {
        let i = step as usize;
        let Some(def) = definition.steps().get(i) else {
            return Err(ReplayError::new(
                definition,
                ReplayError::UNKNOWN_STEP,
                format!(
                    "the log names step #{step}, the definition has {}",
                    definition.steps().len()
                ),
            ));
        };
        if direction == Direction::Compensation && def.compensation.is_none() {
            return Err(ReplayError::new(
                definition,
                ReplayError::UNKNOWN_STEP,
                format!(
                    "the log compensates step `{}`, which has no compensation",
                    def.name
                ),
            ));
        }
        Ok(i)
    }
}
