//! A saga's state, rebuilt from its log: `replay(definition, events)`.
//!
//! Pure: no I/O, no clock. The engine decides from this state only.

mod apply;
mod status;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::Definition;
use crate::event::{Direction, Event, FenceThen, StepAttempt};

pub use status::SagaStatus;

/// What became of a step's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepProgress {
    /// Not dispatched yet.
    Pending,
    /// Dispatched, no result yet.
    InFlight,
    /// Succeeded; its output is recorded.
    Succeeded,
    /// Failed; the effect was not applied (a terminal failure, or a fence found it unapplied).
    Failed,
    /// Its outcome is unknown and its service cannot fence it (a worker without an inbox):
    /// it counts as applied, and is compensated.
    PossiblyApplied,
    /// Its condition did not hold: it did not run, and needs no compensation.
    Skipped,
}

/// The command the saga is working on, or the retry it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Current {
    /// The attempt (of an action or a compensation).
    pub at: StepAttempt,
    /// The outstanding command, or `None` while a retry timer is pending or the step waits.
    pub command_id: Option<Uuid>,
    /// Whether the step waits for a signal or a delay.
    pub waiting: bool,
}

/// A signal the saga received.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReceivedSignal {
    /// Its name.
    pub name: String,
    /// Its payload.
    pub payload: Value,
    /// Whether a wait step took it.
    pub consumed: bool,
}

/// Why a saga stops going forward before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stop {
    /// The reason recorded with the compensation.
    pub reason: String,
    /// A cancel (ends `cancelled`), not a deadline (ends `compensated`).
    pub cancelled: bool,
}

/// A command being fenced: the saga asks the step's service whether it applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fencing {
    /// The step's position.
    pub step: u32,
    /// The step's name.
    pub name: String,
    /// Why.
    pub reason: String,
    /// The command fenced: the action or the compensation.
    pub target: Direction,
    /// What the saga does once it knows.
    pub then: FenceThen,
}

/// A command the saga has dispatched, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SentCommand {
    /// The attempt it ran.
    pub at: StepAttempt,
    /// The generation of the idempotency key it was sent under (see
    /// [`SagaState::generations`]).
    pub generation: u32,
}

/// A saga's state: the fold of its events over its definition.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    /// The saga input.
    pub(crate) input: Value,
    /// The business key, if any.
    pub(crate) business_key: Option<String>,
    /// Where the saga stands.
    pub(crate) status: SagaStatus,
    /// Each step's progress.
    pub(crate) progress: Vec<StepProgress>,
    /// Each step's output, once it succeeded.
    pub(crate) outputs: Vec<Option<Value>>,
    /// Which steps have been compensated.
    pub(crate) compensated: Vec<bool>,
    /// What the saga is working on, per step: one step at a time, or the members of a
    /// parallel group.
    pub(crate) current: BTreeMap<u32, Current>,
    /// The step whose failure started compensation, and why.
    pub(crate) failure: Option<(u32, String)>,
    /// Why the saga is stuck.
    pub(crate) stuck_reason: Option<String>,
    /// Every command ever dispatched, by id.
    pub(crate) sent: HashMap<Uuid, SentCommand>,
    /// Signals received, in order.
    pub(crate) signals: Vec<ReceivedSignal>,
    /// A cancel or a passed deadline.
    pub(crate) stop: Option<Stop>,
    /// Paused by an operator: no new commands are sent.
    pub(crate) paused: bool,
    /// The commands held back while paused, per step, sent on resume.
    pub(crate) held: BTreeMap<u32, Current>,
    /// The steps, with their direction, that got the saga stuck: one, or several members of
    /// a parallel group. The saga is active again once none is left.
    pub(crate) stuck: BTreeMap<u32, (Direction, String)>,
    /// Per step: an attempt of its action ended without a definitive answer (it timed out,
    /// or failed retryably, and another delivery may still apply it), so giving up on the
    /// step needs a fence first.
    pub(crate) doubt: Vec<bool>,
    /// The steps being fenced.
    pub(crate) fencing: BTreeMap<u32, Fencing>,
    /// Operator retries under a fresh idempotency key, per step and direction.
    pub(crate) generations: HashMap<(u32, Direction), u32>,
    /// The steps and directions being retried, with when their first failure was (for
    /// [`RetryPolicy::max_elapsed`](crate::RetryPolicy::max_elapsed)).
    pub(crate) retrying: HashMap<(u32, Direction), DateTime<Utc>>,
    /// Attempts sent before an operator's last retry, per step and direction: the retry
    /// policy counts the attempts after it.
    pub(crate) attempts_before_retry: HashMap<(u32, Direction), u32>,
    /// How many events have been applied.
    pub(crate) events: u64,
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
    /// The log names other steps or parallel groups than the definition (a step renamed,
    /// added, removed, moved or grouped differently without a new version).
    pub const RENAMED: &'static str = "SAGA-R006";

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
/// let events = [Event::Started { saga: "demo".into(), version: 1, input: 7.into(), business_key: None, steps: vec!["a".into()], groups: vec![] }];
/// let state = replay(def.definition(), &events).unwrap();
/// assert_eq!(state.status(), SagaStatus::Running);
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
    /// Where the saga stands.
    pub fn status(&self) -> SagaStatus {
        self.status
    }

    /// The saga's input, as JSON.
    pub fn input(&self) -> &Value {
        &self.input
    }

    /// The saga's business key, if it was started with one.
    pub fn business_key(&self) -> Option<&str> {
        self.business_key.as_deref()
    }

    /// The output of the step at `index` (in definition order), once it succeeded.
    pub fn output(&self, index: usize) -> Option<&Value> {
        self.outputs.get(index)?.as_ref()
    }

    /// Why the saga compensates (or compensated): the reason of the failure, cancel or
    /// deadline that started it.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_ref().map(|(_, why)| why.as_str())
    }

    /// Why the saga is stuck, while it is.
    pub fn stuck_reason(&self) -> Option<&str> {
        self.stuck_reason.as_deref()
    }

    /// The state after the log's first event, which must be `started`.
    pub(crate) fn started(definition: &Definition, event: &Event) -> Result<Self, ReplayError> {
        let Event::Started {
            saga,
            version,
            input,
            business_key,
            steps: names,
            groups,
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
        if !names.is_empty() && *names != definition.step_names() {
            return Err(ReplayError::new(
                definition,
                ReplayError::RENAMED,
                format!(
                    "the saga started with the steps {names:?}, the definition has {:?}; \
                     a definition whose steps change needs a new version",
                    definition.step_names()
                ),
            ));
        }
        if !names.is_empty() && *groups != definition.group_records() {
            return Err(ReplayError::new(
                definition,
                ReplayError::RENAMED,
                format!(
                    "the saga started with the parallel groups {groups:?}, the definition has \
                     {:?}; a definition whose groups change needs a new version",
                    definition.group_records()
                ),
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
            current: BTreeMap::new(),
            failure: None,
            stuck_reason: None,
            sent: HashMap::new(),
            signals: Vec::new(),
            stop: None,
            paused: false,
            held: BTreeMap::new(),
            stuck: BTreeMap::new(),
            doubt: vec![false; steps],
            fencing: BTreeMap::new(),
            generations: HashMap::new(),
            retrying: HashMap::new(),
            attempts_before_retry: HashMap::new(),
            events: 1,
        })
    }

    /// The idempotency key of `step` in `direction` (a fence uses the key of the command it
    /// fences).
    pub(crate) fn idempotency_key(&self, saga_id: Uuid, step: u32, direction: Direction) -> String {
        let direction = match direction {
            Direction::Fence => self.fence_target(step),
            other => other,
        };
        let generation = self.generation(step, direction);
        crate::message::Command::idempotency_key_at(saga_id, step, direction, generation)
    }

    /// The generation of `step`'s key in `direction` now (see [`SagaState::generations`]).
    pub(crate) fn generation(&self, step: u32, direction: Direction) -> u32 {
        self.generations
            .get(&(step, direction))
            .copied()
            .unwrap_or(0)
    }

    /// The highest attempt of `step` in `direction` sent so far (0: none).
    pub(crate) fn last_attempt(&self, step: u32, direction: Direction) -> u32 {
        self.sent
            .values()
            .filter(|s| (s.at.step, s.at.direction) == (step, direction))
            .map(|s| s.at.attempt)
            .max()
            .unwrap_or(0)
    }

    /// Attempts of `step` in `direction` sent before its retry policy began counting afresh
    /// (an operator's retry, a new fence).
    pub(crate) fn attempts_before_retry(&self, step: u32, direction: Direction) -> u32 {
        self.attempts_before_retry
            .get(&(step, direction))
            .copied()
            .unwrap_or(0)
    }

    /// The (first) step and direction the saga is stuck at.
    pub(crate) fn stuck_at(&self) -> Option<(u32, Direction)> {
        self.stuck.iter().next().map(|(s, (d, _))| (*s, *d))
    }

    /// The saga's work on `step`, if any.
    pub(crate) fn current_of(&self, step: u32) -> Option<Current> {
        self.current.get(&step).copied()
    }

    /// The saga's work on its lowest step in progress (its only one, outside a group).
    pub(crate) fn first_current(&self) -> Option<Current> {
        self.current.values().next().copied()
    }

    /// The fence running on `step`, if any.
    pub(crate) fn fencing_of(&self, step: u32) -> Option<&Fencing> {
        self.fencing.get(&step)
    }

    /// Whether anything is outstanding: a command, a backoff, a wait or a fence.
    pub(crate) fn busy(&self) -> bool {
        !self.current.is_empty() || !self.fencing.is_empty()
    }

    /// The oldest unused signal named `name`.
    pub(crate) fn pending_signal(&self, name: &str) -> Option<&Value> {
        self.signals
            .iter()
            .find(|s| !s.consumed && s.name == name)
            .map(|s| &s.payload)
    }
}
