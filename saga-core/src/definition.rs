//! Saga definitions: a named, versioned list of steps, built and validated in code.
//!
//! Names are part of your durable contract: a saga's name and version, its step names, and the
//! service and command names of every action are written to the event log and to messages.
//! Renaming one strands the instances that were started under the old name; publish a new
//! version instead.

mod builder;
mod contracted;
mod error;
mod group;
mod retry;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use builder::{DEFAULT_STEP_TIMEOUT, SagaBuilder, StepBuilder};
pub use contracted::ContractStep;
pub use error::{DefinitionError, InputError};
pub use group::{GroupBuilder, GroupRecord, StepGroup};
pub use retry::RetryPolicy;

/// Where a step stands relative to the pivot, which decides what happens when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StepKind {
    /// May be undone by its compensation (the default). Stands before the pivot.
    #[default]
    Compensatable,
    /// The point of no return: once it has succeeded the saga only goes forward.
    Pivot,
    /// Comes after the pivot; retried until it succeeds (a terminal failure parks the saga).
    Retriable,
}

/// Builds a step's command payload from what the saga knows so far.
pub(crate) type BuildFn = Arc<dyn Fn(&RawContext<'_>) -> Result<Value, InputError> + Send + Sync>;

/// A command sent to a participant: which service runs it, its name, and how its input is made.
#[derive(Clone)]
pub struct Action {
    /// The participant service (the routing key of its queue).
    pub service: String,
    /// The command's name, which selects the handler inside the service.
    pub command: String,
    /// The type its input is built as, unless raw JSON.
    pub(crate) input_type: Option<&'static str>,
    pub(crate) build: BuildFn,
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Action")
            .field("service", &self.service)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// The code of a step's condition: over the saga's input and earlier outputs.
type Predicate = dyn Fn(&RawContext<'_>) -> Result<bool, InputError> + Send + Sync;

/// Decides whether a step runs, from the saga's input and earlier outputs.
#[derive(Clone)]
pub(crate) struct ConditionFn(pub(crate) Arc<Predicate>);

impl fmt::Debug for ConditionFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConditionFn")
    }
}

/// Checks a signal's payload; `Err` fails the wait step terminally with the reason.
pub(crate) type CheckFn = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// A wait for a named signal (a human approval, a webhook).
#[derive(Clone)]
pub struct SignalWait {
    /// The signal's name.
    pub name: String,
    pub(crate) check: CheckFn,
}

impl fmt::Debug for SignalWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalWait")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a step does going forward.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Work {
    /// Sends a command to a participant.
    Command(Action),
    /// Waits for a named signal; its payload is the step's output. The step's timeout bounds
    /// the wait.
    Signal(SignalWait),
    /// Waits a fixed time (a durable timer), then succeeds with no output.
    Delay(Duration),
}

/// One step of a definition, after validation.
#[derive(Debug, Clone)]
pub struct Step {
    /// The step's name, unique in its saga.
    pub name: String,
    /// Compensatable, pivot or retriable.
    pub kind: StepKind,
    /// What the step does going forward.
    pub work: Work,
    /// The command that undoes the action, if any.
    pub compensation: Option<Action>,
    /// How the action is retried.
    pub retry: RetryPolicy,
    /// How the compensation is retried.
    pub compensation_retry: RetryPolicy,
    /// How a fence of the action is retried while its service does not answer.
    pub fence_retry: RetryPolicy,
    /// How long one attempt (of the action, compensation or a fence) may take before it
    /// counts as failed; always set for a command step (the saga's default timeout when the
    /// step sets none). For a signal wait: how long it waits, if set.
    pub timeout: Option<Duration>,
    /// Runs the step only when this holds; see [`StepBuilder::when`](crate::StepBuilder::when).
    pub(crate) condition: Option<ConditionFn>,
}

impl Step {
    /// Whether the step runs only when a condition holds.
    pub fn is_conditional(&self) -> bool {
        self.condition.is_some()
    }
}

impl Step {
    /// The forward command, if the step sends one.
    pub fn action(&self) -> Option<&Action> {
        match &self.work {
            Work::Command(action) => Some(action),
            _ => None,
        }
    }
}

/// A validated definition with its types erased, as the engine and the registry hold it.
#[derive(Debug)]
pub struct Definition {
    name: String,
    version: u32,
    steps: Vec<Step>,
    groups: Vec<StepGroup>,
    deadline: Option<Duration>,
}

impl Definition {
    /// The saga's durable name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The definition's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// How long the whole saga may take before it is compensated (while before its pivot).
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The position of the pivot step, if there is one.
    pub fn pivot(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.kind == StepKind::Pivot)
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The position of the step with this name.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The parallel groups, in order.
    pub fn groups(&self) -> &[StepGroup] {
        &self.groups
    }

    /// The parallel group the step at `index` belongs to, if any.
    pub fn group_of(&self, index: usize) -> Option<&StepGroup> {
        self.groups.iter().find(|g| g.members().contains(&index))
    }

    /// The groups as the log's `started` event records them.
    pub fn group_records(&self) -> Vec<GroupRecord> {
        self.groups
            .iter()
            .map(|g| GroupRecord {
                name: g.name.clone(),
                steps: self.steps[g.members()]
                    .iter()
                    .map(|s| s.name.clone())
                    .collect(),
            })
            .collect()
    }

    /// The steps' names, in order, as the log's `started` event records them.
    pub fn step_names(&self) -> Vec<String> {
        self.steps.iter().map(|s| s.name.clone()).collect()
    }

    /// The services that this saga sends commands to, each once.
    pub fn services(&self) -> Vec<&str> {
        let mut services: Vec<&str> = self
            .steps
            .iter()
            .flat_map(|s| s.action().into_iter().chain(s.compensation.as_ref()))
            .map(|a| a.service.as_str())
            .collect();
        services.sort_unstable();
        services.dedup();
        services
    }
}

/// A validated saga definition whose input is `I`.
///
/// Cheap to clone. Build one with [`SagaDefinition::builder`].
pub struct SagaDefinition<I> {
    inner: Arc<Definition>,
    _input: PhantomData<fn(I)>,
}

impl<I> Clone for SagaDefinition<I> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _input: PhantomData,
        }
    }
}

impl<I> fmt::Debug for SagaDefinition<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl<I> SagaDefinition<I>
where
    I: serde::Serialize + DeserializeOwned + 'static,
{
    /// Starts a definition named `name` at `version`.
    ///
    /// ```
    /// use saga_core::{SagaDefinition, StepContext};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Order { sku: String, qty: u32 }
    /// #[derive(Serialize, Deserialize)]
    /// struct Reserved { reservation: String }
    ///
    /// let saga = SagaDefinition::<Order>::builder("order", 1)
    ///     .step("reserve", |s| {
    ///         s.action("inventory", "reserve", |ctx: &StepContext<'_, Order>| {
    ///             Ok(serde_json::json!({ "sku": ctx.input().sku, "qty": ctx.input().qty }))
    ///         })
    ///         .compensation("inventory", "release", |ctx| {
    ///             Ok(ctx.output::<Reserved>("reserve")?.reservation)
    ///         })
    ///     })
    ///     .step("ship", |s| s.pivot().action("shipping", "ship", |ctx| Ok(ctx.input().sku.clone())))
    ///     .build()
    ///     .expect("a valid definition");
    /// assert_eq!(saga.definition().steps().len(), 2);
    /// ```
    pub fn builder(name: impl Into<String>, version: u32) -> SagaBuilder<I> {
        SagaBuilder::new(name.into(), version)
    }
}

impl<I> SagaDefinition<I> {
    /// The erased definition, as registered with an orchestrator.
    pub fn definition(&self) -> &Arc<Definition> {
        &self.inner
    }

    /// The saga's durable name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The definition's version.
    pub fn version(&self) -> u32 {
        self.inner.version
    }
}

/// What an input builder sees, with the types erased.
pub(crate) struct RawContext<'a> {
    pub(crate) definition: &'a Definition,
    pub(crate) input: &'a Value,
    pub(crate) outputs: &'a [Option<Value>],
}

/// What a step's input builder sees: the saga input and the outputs of earlier steps.
pub struct StepContext<'a, I> {
    input: &'a I,
    raw: &'a RawContext<'a>,
}

impl<'a, I> StepContext<'a, I> {
    pub(crate) fn new(input: &'a I, raw: &'a RawContext<'a>) -> Self {
        Self { input, raw }
    }

    /// The saga's input.
    pub fn input(&self) -> &I {
        self.input
    }

    /// The output of step `step`, which must have succeeded.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, InputError> {
        self.try_output(step)?
            .ok_or_else(|| InputError::new(format!("step `{step}` has no output")))
    }

    /// The output of step `step`, or `None` if it has none (not run yet, or timed out).
    pub fn try_output<T: DeserializeOwned>(&self, step: &str) -> Result<Option<T>, InputError> {
        let index = self
            .raw
            .definition
            .step_index(step)
            .ok_or_else(|| InputError::new(format!("no step named `{step}`")))?;
        match self.raw.outputs.get(index).and_then(Option::as_ref) {
            Some(value) => serde_json::from_value(value.clone())
                .map(Some)
                .map_err(|e| {
                    let e = crate::codec::without_values(&e);
                    InputError::new(format!("output of step `{step}`: {e}"))
                }),
            None => Ok(None),
        }
    }
}

impl Action {
    pub(crate) fn build_input(&self, ctx: &RawContext<'_>) -> Result<Value, InputError> {
        (self.build)(ctx)
    }
}
