//! Giving up on a step whose outcome is unknown: fence it at its own service, then decide
//! from the answer (applied, not applied, or cannot be fenced).

use super::{Decider, Step};
use crate::definition::StepKind;
use crate::event::{Direction, Event};
use crate::message::Outcome;

/// What a fence learned about a step's action.
pub(super) enum Answer {
    /// It applied, with this output.
    Applied(serde_json::Value),
    /// It did not, and never will.
    NotApplied(String),
    /// Its service cannot fence (no inbox): it counts as applied.
    Unfenceable(String),
}

impl Answer {
    /// The definitive answer a reply to a fence carries; `None` for a retryable failure.
    pub(super) fn of(outcome: &Outcome) -> Option<Self> {
        match outcome {
            Outcome::Success { output } => Some(Answer::Applied(output.clone())),
            Outcome::Fenced { detail } => Some(Answer::NotApplied(detail.clone())),
            Outcome::Failure {
                error,
                retryable: false,
            } => Some(Answer::Unfenceable(error.clone())),
            Outcome::Failure {
                retryable: true, ..
            } => None,
        }
    }
}

impl Decider<'_, '_> {
    /// Gives up on `step`'s action: fences it first if its outcome is unknown, then goes on as
    /// the saga must (compensate, or stop for a cancel or a deadline).
    pub(super) fn give_up(&mut self, step: u32, reason: String) -> Step {
        let is_command = self.definition.steps()[step as usize].action().is_some();
        if is_command && self.state.doubt[step as usize] {
            return self.start_fence(step, reason);
        }
        self.settle(step, reason)
    }

    /// The step's outcome is known (not applied, or applied and to be undone): compensate.
    fn settle(&mut self, step: u32, reason: String) -> Step {
        if self.state.stop.is_some() {
            return self.stop_at(step);
        }
        self.emit(Event::CompensationStarted { step, reason })?;
        self.compensate_below(step + 1)
    }

    /// Starts fencing `step`: the saga waits for its service's answer before it decides.
    pub(super) fn start_fence(&mut self, step: u32, reason: String) -> Step {
        self.emit(Event::FenceStarted { step, reason })?;
        let attempt = self.next_attempt(step, Direction::Fence);
        self.dispatch(step, Direction::Fence, attempt)
    }

    /// Applies a fence's definitive answer (from any of its attempts), then decides.
    pub(super) fn after_fence(&mut self, step: u32, attempt: u32, answer: Answer) -> Step {
        let reason = self
            .state
            .fencing
            .as_ref()
            .map(|f| f.reason.clone())
            .unwrap_or_default();
        let pivot = self.definition.steps()[step as usize].kind == StepKind::Pivot;
        match answer {
            Answer::Applied(output) => {
                self.emit(Event::Succeeded {
                    step,
                    direction: Direction::Fence,
                    attempt,
                    output,
                })?;
                self.after_applied(step, reason, pivot)
            }
            Answer::NotApplied(detail) => {
                self.emit(Event::Fenced {
                    step,
                    attempt,
                    detail,
                })?;
                self.settle(step, reason)
            }
            Answer::Unfenceable(error) => {
                self.emit(Event::Failed {
                    step,
                    direction: Direction::Fence,
                    attempt,
                    error: error.clone(),
                    retryable: false,
                })?;
                if pivot {
                    // Never compensated past; an operator decides (a retry runs it again).
                    return self.emit(Event::Stuck {
                        step,
                        direction: Direction::Forward,
                        reason: format!(
                            "the outcome of pivot step `{}` is unknown and cannot be fenced \
                             ({error}); the saga gave up on it: {reason}",
                            self.step_name(step)
                        ),
                    });
                }
                self.settle(step, reason)
            }
        }
    }

    /// The step's action applied: a pivot goes forward, any other step is compensated with
    /// those before it.
    pub(super) fn after_applied(&mut self, step: u32, reason: String, pivot: bool) -> Step {
        if pivot && self.state.stop.is_none() {
            return self.after_success(step, Direction::Forward);
        }
        self.settle(step, reason)
    }
}
