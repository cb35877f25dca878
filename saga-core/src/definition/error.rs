//! Errors found when a definition is built, and when a step's input is built.

/// A saga definition that cannot run, found by [`SagaBuilder::build`](super::SagaBuilder::build).
///
/// Every variant that concerns one step names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The saga has no name.
    #[error("saga name must not be empty")]
    EmptyName,
    /// The saga has no steps.
    #[error("saga `{saga}` has no steps")]
    NoSteps {
        /// The saga's name.
        saga: String,
    },
    /// A step has no name.
    #[error("saga `{saga}`: step #{index} has an empty name")]
    EmptyStepName {
        /// The saga's name.
        saga: String,
        /// The step's position, from 0.
        index: usize,
    },
    /// Two steps share a name.
    #[error("saga `{saga}`: step `{step}` is defined twice")]
    DuplicateStep {
        /// The saga's name.
        saga: String,
        /// The repeated name.
        step: String,
    },
    /// A step was declared without an action.
    #[error("saga `{saga}`: step `{step}` has no action")]
    MissingAction {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
    },
    /// A service or command name is empty.
    #[error("saga `{saga}`: step `{step}` has an empty {what}")]
    EmptyRoute {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
        /// Which name is empty.
        what: &'static str,
    },
    /// More than one step is marked as the pivot.
    #[error("saga `{saga}`: step `{step}` is a second pivot (the pivot is `{pivot}`)")]
    SecondPivot {
        /// The saga's name.
        saga: String,
        /// The second pivot.
        step: String,
        /// The first pivot.
        pivot: String,
    },
    /// A step after the pivot has a compensation, which could never run.
    #[error(
        "saga `{saga}`: step `{step}` comes after the pivot `{pivot}` and cannot have a compensation"
    )]
    CompensationAfterPivot {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
        /// The pivot.
        pivot: String,
    },
    /// A retriable step stands before the pivot, or in a saga without one.
    #[error("saga `{saga}`: retriable step `{step}` must come after a pivot step")]
    RetriableBeforePivot {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
    },
    /// A step after the pivot is not marked retriable.
    #[error("saga `{saga}`: step `{step}` comes after the pivot `{pivot}` and must be retriable")]
    CompensatableAfterPivot {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
        /// The pivot.
        pivot: String,
    },
    /// A pivot step has a compensation; a pivot is never undone.
    #[error("saga `{saga}`: pivot step `{step}` cannot have a compensation")]
    CompensatedPivot {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
    },
    /// A retry policy is out of range.
    #[error("saga `{saga}`: step `{step}` has an invalid retry policy: {reason}")]
    InvalidRetry {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// A wait or delay step has a compensation: it has no effect to undo.
    #[error("saga `{saga}`: step `{step}` waits and cannot have a compensation")]
    CompensatedWait {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
    },
    /// A deadline of zero.
    #[error("saga `{saga}` has a zero deadline")]
    ZeroDeadline {
        /// The saga's name.
        saga: String,
    },
    /// A pivot step stands inside a parallel group.
    #[error("saga `{saga}`: pivot step `{step}` cannot be inside parallel group `{group}`")]
    PivotInGroup {
        /// The saga's name.
        saga: String,
        /// The group.
        group: String,
        /// The pivot.
        step: String,
    },
    /// A parallel group that cannot run as declared.
    #[error("saga `{saga}`: parallel group `{group}`: {reason}")]
    InvalidGroup {
        /// The saga's name.
        saga: String,
        /// The group.
        group: String,
        /// What is wrong.
        reason: String,
    },
    /// A timeout of zero.
    #[error("saga `{saga}`: step `{step}` has a zero timeout")]
    ZeroTimeout {
        /// The saga's name.
        saga: String,
        /// The step.
        step: String,
    },
}

/// A step's input could not be built from the saga input and earlier outputs.
///
/// The engine treats it as a terminal failure of the step (or, for a compensation, parks the
/// saga as stuck): it is a bug in the definition that no retry can fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

impl InputError {
    /// An input error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl From<serde_json::Error> for InputError {
    /// The error's message, without the value it quotes (see
    /// [`codec::without_values`](crate::codec::without_values)).
    fn from(error: serde_json::Error) -> Self {
        Self(crate::codec::without_values(&error))
    }
}
