//! The typed builder of saga definitions.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use serde_json::Value;

use super::group::{GroupBuilder, check_groups};
use super::{
    Action, BuildFn, CheckFn, ConditionFn, Definition, DefinitionError, InputError, RawContext,
    RetryPolicy, SagaDefinition, SignalWait, Step, StepContext, StepKind, Work,
};

/// Builds a [`SagaDefinition`]; see [`SagaDefinition::builder`].
pub struct SagaBuilder<I> {
    name: String,
    version: u32,
    steps: Vec<StepBuilder<I>>,
    /// Parallel groups: name, first member, member count.
    groups: Vec<(String, usize, usize)>,
    deadline: Option<Duration>,
    default_timeout: Duration,
}

/// How long an attempt of a command step may take when neither the step nor the saga sets a
/// timeout ([`StepBuilder::timeout`], [`SagaBuilder::default_timeout`]).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

impl<I> SagaBuilder<I>
where
    I: Serialize + DeserializeOwned + 'static,
{
    pub(super) fn new(name: String, version: u32) -> Self {
        Self {
            name,
            version,
            steps: Vec::new(),
            groups: Vec::new(),
            deadline: None,
            default_timeout: DEFAULT_STEP_TIMEOUT,
        }
    }

    /// How long an attempt of a command step (forward, compensation or fence) may take when
    /// the step sets no [`timeout`](StepBuilder::timeout) of its own (default
    /// [`DEFAULT_STEP_TIMEOUT`], a minute). Every command has such a deadline, so no saga
    /// waits forever for an answer that was lost.
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// How long the whole saga may take: past it, a saga that has not started its pivot is
    /// compensated (a durable timer; a saga past its pivot goes on).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Appends a step named `name`, configured by `configure` (which returns the step
    /// builder, or a [`ContractStep`](super::ContractStep) made from it).
    pub fn step<S: Into<StepBuilder<I>>>(
        mut self,
        name: impl Into<String>,
        configure: impl FnOnce(StepBuilder<I>) -> S,
    ) -> Self {
        self.steps.push(StepBuilder::configured(name, configure));
        self
    }

    /// Appends a parallel group named `name`: its members, added by `members` with
    /// [`GroupBuilder::step`], are dispatched together, and the saga goes on once every one
    /// succeeded. When a member fails for good, the members still in flight are fenced, then
    /// every member that applied compensates (one at a time, in reverse declaration order),
    /// then the earlier steps. Members are compensatable command steps (no pivot, no waits),
    /// and read the outputs of steps before the group, not each other's; later steps read
    /// each member's output by its step name.
    ///
    /// ```
    /// # use saga_core::SagaDefinition;
    /// let trip = SagaDefinition::<u64>::builder("trip", 1)
    ///     .parallel("book", |g| {
    ///         g.step("flight", |s| s.action("flights", "book", |ctx| Ok(*ctx.input()))
    ///             .compensation("flights", "cancel", |ctx| Ok(*ctx.input())))
    ///         .step("hotel", |s| s.action("hotels", "book", |ctx| Ok(*ctx.input()))
    ///             .compensation("hotels", "cancel", |ctx| Ok(*ctx.input())))
    ///     })
    ///     .step("confirm", |s| s.pivot().action("booking", "confirm", |ctx| Ok(*ctx.input())))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(trip.definition().groups()[0].members(), 0..2);
    /// ```
    pub fn parallel(
        mut self,
        name: impl Into<String>,
        members: impl FnOnce(GroupBuilder<I>) -> GroupBuilder<I>,
    ) -> Self {
        let group = members(GroupBuilder::new());
        let first = self.steps.len();
        self.groups.push((name.into(), first, group.steps.len()));
        self.steps.extend(group.steps);
        self
    }

    /// Validates the definition; the error names the offending step.
    pub fn build(self) -> Result<SagaDefinition<I>, DefinitionError> {
        let saga = self.name;
        if saga.trim().is_empty() {
            return Err(DefinitionError::EmptyName);
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps { saga });
        }
        if self.deadline == Some(Duration::ZERO) {
            return Err(DefinitionError::ZeroDeadline { saga });
        }
        if self.default_timeout == Duration::ZERO {
            return Err(DefinitionError::ZeroTimeout {
                saga,
                step: "(the saga's default)".to_owned(),
            });
        }
        let mut seen = HashSet::new();
        let mut pivot: Option<String> = None;
        let mut steps = Vec::with_capacity(self.steps.len());
        for (index, b) in self.steps.into_iter().enumerate() {
            let step = b.name.clone();
            if step.trim().is_empty() {
                return Err(DefinitionError::EmptyStepName { saga, index });
            }
            if !seen.insert(step.clone()) {
                return Err(DefinitionError::DuplicateStep { saga, step });
            }
            let Some(work) = b.work else {
                return Err(DefinitionError::MissingAction { saga, step });
            };
            if !matches!(work, Work::Command(_)) && b.compensation.is_some() {
                return Err(DefinitionError::CompensatedWait { saga, step });
            }
            let routes = match &work {
                Work::Command(action) => {
                    vec![("service", &action.service), ("command", &action.command)]
                }
                Work::Signal(wait) => vec![("signal name", &wait.name)],
                Work::Delay(_) => Vec::new(),
            };
            for (what, value) in routes
                .into_iter()
                .chain(b.compensation.iter().flat_map(|c| {
                    [
                        ("compensation service", &c.service),
                        ("compensation command", &c.command),
                    ]
                }))
            {
                if value.trim().is_empty() {
                    return Err(DefinitionError::EmptyRoute { saga, step, what });
                }
            }
            match (b.kind, &pivot) {
                (StepKind::Pivot, Some(first)) => {
                    let pivot = first.clone();
                    return Err(DefinitionError::SecondPivot { saga, step, pivot });
                }
                (StepKind::Pivot, None) if b.compensation.is_some() => {
                    return Err(DefinitionError::CompensatedPivot { saga, step });
                }
                (StepKind::Pivot, None) => pivot = Some(step.clone()),
                (StepKind::Retriable, None) => {
                    return Err(DefinitionError::RetriableBeforePivot { saga, step });
                }
                (StepKind::Retriable, Some(pivot)) if b.compensation.is_some() => {
                    let pivot = pivot.clone();
                    return Err(DefinitionError::CompensationAfterPivot { saga, step, pivot });
                }
                (StepKind::Compensatable, Some(pivot)) => {
                    let pivot = pivot.clone();
                    if b.compensation.is_some() {
                        return Err(DefinitionError::CompensationAfterPivot { saga, step, pivot });
                    }
                    return Err(DefinitionError::CompensatableAfterPivot { saga, step, pivot });
                }
                _ => {}
            }
            for policy in [&b.retry, &b.compensation_retry, &b.fence_retry] {
                if let Err(reason) = policy.validate() {
                    return Err(DefinitionError::InvalidRetry { saga, step, reason });
                }
            }
            if b.timeout == Some(Duration::ZERO) {
                return Err(DefinitionError::ZeroTimeout { saga, step });
            }
            let timeout = match work {
                Work::Command(_) => Some(b.timeout.unwrap_or(self.default_timeout)),
                _ => b.timeout,
            };
            steps.push(Step {
                name: step,
                kind: b.kind,
                work,
                compensation: b.compensation,
                retry: b.retry,
                compensation_retry: b.compensation_retry,
                fence_retry: b.fence_retry,
                timeout,
                condition: b.condition,
            });
        }
        let groups = check_groups(&saga, self.groups, &steps)?;
        Ok(SagaDefinition {
            inner: Arc::new(Definition {
                name: saga,
                version: self.version,
                steps,
                groups,
                deadline: self.deadline,
            }),
            _input: PhantomData,
        })
    }
}

/// Configures one step; see [`SagaBuilder::step`].
pub struct StepBuilder<I> {
    pub(super) name: String,
    kind: StepKind,
    work: Option<Work>,
    compensation: Option<Action>,
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
    fence_retry: RetryPolicy,
    timeout: Option<Duration>,
    condition: Option<ConditionFn>,
    _input: PhantomData<fn(I)>,
}

impl<I> StepBuilder<I>
where
    I: Serialize + DeserializeOwned + 'static,
{
    /// The step named `name`, as `configure` leaves it.
    pub(super) fn configured<S: Into<StepBuilder<I>>>(
        name: impl Into<String>,
        configure: impl FnOnce(StepBuilder<I>) -> S,
    ) -> Self {
        configure(Self::new(name.into())).into()
    }

    fn new(name: String) -> Self {
        Self {
            name,
            kind: StepKind::Compensatable,
            work: None,
            compensation: None,
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::patient(),
            fence_retry: RetryPolicy::patient(),
            timeout: None,
            condition: None,
            _input: PhantomData,
        }
    }

    /// The forward command: `command` on `service`, its input built by `input`.
    pub fn action<C, F>(mut self, service: &str, command: &str, input: F) -> Self
    where
        C: Serialize,
        F: Fn(&StepContext<'_, I>) -> Result<C, InputError> + Send + Sync + 'static,
    {
        self.work = Some(Work::Command(typed_action(service, command, input)));
        self
    }

    /// Makes this a wait for the signal `name` (see `Client::signal`): the payload, read as `T`,
    /// becomes the step's output, unless `accept` refuses it (say, a rejected approval), which
    /// fails the step terminally with its reason. The step's [`timeout`](Self::timeout) bounds
    /// the wait; past it the step fails terminally. A signal that arrives before the saga
    /// reaches the wait is kept until then.
    ///
    /// The payload's type is named once: `wait_for::<Approval>("approval", |a| ..)`, or by the
    /// closure's argument, `wait_for("approval", |a: &Approval| ..)`.
    pub fn wait_for<T: DeserializeOwned>(
        mut self,
        name: &str,
        accept: impl Fn(&T) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        let signal = name.to_owned();
        let check: CheckFn = Arc::new(move |payload: &Value| {
            let value: T = serde_json::from_value(payload.clone()).map_err(|e| {
                let e = crate::codec::without_values(&e);
                format!("signal `{signal}` has an invalid payload: {e}")
            })?;
            accept(&value)
        });
        self.work = Some(Work::Signal(SignalWait {
            name: name.to_owned(),
            check,
        }));
        self
    }

    /// Makes this a durable delay: the step succeeds (with no output) once `delay` has passed.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.work = Some(Work::Delay(delay));
        self
    }

    /// The command that undoes the action. Its input builder also sees this step's output.
    pub fn compensation<C, F>(mut self, service: &str, command: &str, input: F) -> Self
    where
        C: Serialize,
        F: Fn(&StepContext<'_, I>) -> Result<C, InputError> + Send + Sync + 'static,
    {
        self.compensation = Some(typed_action(service, command, input));
        self
    }

    /// Runs this step only when `condition` holds, over the saga's input and the outputs of
    /// earlier steps (a skipped step has none: read those with [`StepContext::try_output`]).
    /// It is asked when the saga reaches the step, and again only if the step's first
    /// command was held there (a pause) or an operator retries it, so it must depend on
    /// nothing else. A step it skips is recorded in the log as `skipped` (replay reads that
    /// and does not ask again), has no output, and is never compensated; the saga goes on to
    /// the next. A condition that panics parks the saga as `stuck`, naming the step.
    ///
    /// ```
    /// # use saga_core::SagaDefinition;
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Order { gift: bool, amount: u64 }
    /// let saga = SagaDefinition::<Order>::builder("order", 1)
    ///     .step("invoice", |s| {
    ///         s.action("billing", "invoice", |ctx| Ok(ctx.input().amount))
    ///             .when(|ctx| !ctx.input().gift)
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # let _ = saga;
    /// ```
    pub fn when(
        mut self,
        condition: impl Fn(&StepContext<'_, I>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.condition = Some(ConditionFn(Arc::new(move |raw: &RawContext<'_>| {
            let saga_input: I = serde_json::from_value(raw.input.clone()).map_err(|e| {
                InputError::new(format!("saga input: {}", crate::codec::without_values(&e)))
            })?;
            Ok(condition(&StepContext::new(&saga_input, raw)))
        })));
        self
    }

    /// Marks this step as the pivot.
    pub fn pivot(mut self) -> Self {
        self.kind = StepKind::Pivot;
        self
    }

    /// Marks this step as retriable: it comes after the pivot and is retried until it succeeds.
    pub fn retriable(mut self) -> Self {
        self.kind = StepKind::Retriable;
        self
    }

    /// How the action is retried (default [`RetryPolicy::default`]: 5 attempts).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How the compensation is retried (default [`RetryPolicy::patient`]: a day of retries
    /// before the saga parks as `stuck`).
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// How a fence of the action is retried while its service does not answer (default
    /// [`RetryPolicy::patient`]); once it gives up, the saga parks as `stuck`.
    pub fn fence_retry(mut self, policy: RetryPolicy) -> Self {
        self.fence_retry = policy;
        self
    }

    /// How long one attempt may take before it counts as a failed attempt (its outcome is
    /// then unknown). Default: the saga's [`default_timeout`](SagaBuilder::default_timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

fn typed_action<I, C, F>(service: &str, command: &str, input: F) -> Action
where
    I: DeserializeOwned + 'static,
    C: Serialize,
    F: Fn(&StepContext<'_, I>) -> Result<C, InputError> + Send + Sync + 'static,
{
    let build: BuildFn = Arc::new(move |raw: &RawContext<'_>| {
        let saga_input: I = serde_json::from_value(raw.input.clone()).map_err(|e| {
            InputError::new(format!("saga input: {}", crate::codec::without_values(&e)))
        })?;
        let payload = input(&StepContext::new(&saga_input, raw))?;
        Ok(serde_json::to_value(payload)?)
    });
    let input_type = std::any::type_name::<C>();
    Action {
        service: service.to_owned(),
        command: command.to_owned(),
        input_type: (input_type != std::any::type_name::<Value>()).then_some(input_type),
        build,
    }
}

#[cfg(test)]
mod tests;
