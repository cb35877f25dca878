//! Parallel groups: consecutive steps dispatched together, declared with
//! [`SagaBuilder::parallel`](super::SagaBuilder::parallel).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{DefinitionError, Step, StepBuilder, StepKind, Work};

/// A parallel group of a validated definition: the steps `first..first + len`, dispatched
/// together. The group succeeds when every member succeeded; when one fails for good, the
/// members still in flight are fenced, and every member that applied compensates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepGroup {
    /// The group's name, unique among the saga's steps and groups.
    pub name: String,
    /// The position of its first member.
    pub first: usize,
    /// How many members it has (two or more).
    pub len: usize,
}

impl StepGroup {
    /// The positions of its members.
    pub fn members(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.len
    }
}

/// A group as the log's `started` event records it: its name and its members' names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The group's name.
    pub name: String,
    /// Its members' names, in declaration order.
    pub steps: Vec<String>,
}

/// Configures the members of a parallel group; see
/// [`SagaBuilder::parallel`](super::SagaBuilder::parallel).
pub struct GroupBuilder<I> {
    pub(super) steps: Vec<StepBuilder<I>>,
}

impl<I> GroupBuilder<I>
where
    I: Serialize + DeserializeOwned + 'static,
{
    pub(super) fn new() -> Self {
        Self { steps: Vec::new() }
    }

    /// Adds a member named `name`, configured as [`SagaBuilder::step`](super::SagaBuilder::step)
    /// configures a step.
    pub fn step<S: Into<StepBuilder<I>>>(
        mut self,
        name: impl Into<String>,
        configure: impl FnOnce(StepBuilder<I>) -> S,
    ) -> Self {
        self.steps.push(StepBuilder::configured(name, configure));
        self
    }
}

/// Checks the groups declared (name and member range) against the validated steps.
pub(super) fn check_groups(
    saga: &str,
    declared: Vec<(String, usize, usize)>,
    steps: &[Step],
) -> Result<Vec<StepGroup>, DefinitionError> {
    let mut groups = Vec::with_capacity(declared.len());
    for (name, first, len) in declared {
        let err = |reason: String| DefinitionError::InvalidGroup {
            saga: saga.to_owned(),
            group: name.clone(),
            reason,
        };
        if name.trim().is_empty() {
            return Err(err("its name is empty".into()));
        }
        if steps.iter().any(|s| s.name == name) || groups.iter().any(|g: &StepGroup| g.name == name)
        {
            return Err(err("its name is already a step's or a group's".into()));
        }
        if len < 2 {
            return Err(err(format!(
                "it has {len} member(s); a group needs two or more (one step is a step)"
            )));
        }
        for step in &steps[first..first + len] {
            match (step.kind, &step.work) {
                (StepKind::Pivot, _) => {
                    return Err(DefinitionError::PivotInGroup {
                        saga: saga.to_owned(),
                        group: name,
                        step: step.name.clone(),
                    });
                }
                (StepKind::Retriable, _) => {
                    return Err(err(format!(
                        "member `{}` is retriable; a group stands before the pivot, \
                         its members compensatable",
                        step.name
                    )));
                }
                (_, Work::Command(_)) => {}
                (_, _) => {
                    return Err(err(format!(
                        "member `{}` waits (for a signal or a delay); group members send commands",
                        step.name
                    )));
                }
            }
        }
        groups.push(StepGroup { name, first, len });
    }
    Ok(groups)
}
