//! Fences: before it decides about a command whose outcome it does not know, the saga asks
//! the step's own service whether it applied (or has it made so that it never will), then
//! goes on from the answer. It fences an action it gives up on, and a command an operator
//! retries or resolves.

use super::{Decider, Step};
use crate::definition::StepKind;
use crate::event::{Direction, Event, FenceThen, StepAttempt};
use crate::message::Outcome;
use crate::state::Fencing;

/// What a fence learned about its command.
pub(super) enum Answer {
    /// It applied, with this output.
    Applied(serde_json::Value),
    /// It did not, and never will.
    NotApplied(String),
    /// Its service cannot fence (no inbox): it counts as applied.
    Unfenceable(String),
}

impl Answer {
    /// The definitive answer a reply to a fence carries; `None` for a failure (retryable, or
    /// a refusal of a worker that could not run the fence), after which it is tried again.
    pub(super) fn of(outcome: &Outcome) -> Option<Self> {
        match outcome {
            Outcome::Success { output } => Some(Answer::Applied(output.clone())),
            Outcome::Fenced { detail } => Some(Answer::NotApplied(detail.clone())),
            Outcome::Unfenceable { detail } => Some(Answer::Unfenceable(detail.clone())),
            Outcome::Failure { .. } => None,
        }
    }
}

impl Decider<'_, '_> {
    /// Gives up on `step`'s action: fences it first if its outcome is unknown, then goes on as
    /// the saga must (compensate, or stop for a cancel or a deadline).
    pub(super) fn give_up(&mut self, step: u32, reason: String) -> Step {
        let is_command = self.definition.steps()[step as usize].action().is_some();
        if is_command && self.state.doubt[step as usize] {
            self.start_fence(step, reason.clone())?;
            // The saga gives up on a group: its other members stop now, not at the answer.
            if let Some(group) = self.group_of(step) {
                self.wind_down(group, &reason)?;
            }
            return Ok(());
        }
        self.settle(step, reason)
    }

    /// The step's outcome is known (not applied, or applied and to be undone): compensate.
    fn settle(&mut self, step: u32, reason: String) -> Step {
        if let Some(group) = self.group_of(step) {
            return self.settle_member(step, group, reason);
        }
        if self.state.stop.is_some() {
            return self.stop_at(step);
        }
        self.emit(Event::CompensationStarted { step, reason })?;
        self.compensate_below(step + 1)
    }

    /// Starts fencing `step`'s action, given up on: the saga waits for the service's answer.
    pub(super) fn start_fence(&mut self, step: u32, reason: String) -> Step {
        self.fence(step, Direction::Forward, FenceThen::GiveUp, reason)
    }

    /// Starts fencing `step`'s `target` command, to do `then` once it is answered.
    pub(super) fn fence(
        &mut self,
        step: u32,
        target: Direction,
        then: FenceThen,
        reason: String,
    ) -> Step {
        self.emit(Event::FenceStarted {
            step,
            reason,
            target,
            then,
        })?;
        let attempt = self.next_attempt(step, Direction::Fence);
        self.dispatch(StepAttempt::new(step, Direction::Fence, attempt))
    }

    /// Records a fence's definitive answer (from any of its attempts), then goes on.
    pub(super) fn after_fence(&mut self, step: u32, attempt: u32, answer: Answer) -> Step {
        let Some(fencing) = self.state.fencing_of(step).cloned() else {
            return Ok(());
        };
        self.emit(match &answer {
            Answer::Applied(output) => Event::Succeeded {
                step,
                direction: Direction::Fence,
                attempt,
                output: output.clone(),
            },
            Answer::NotApplied(detail) => Event::Fenced {
                step,
                attempt,
                detail: detail.clone(),
            },
            Answer::Unfenceable(detail) => Event::Failed {
                step,
                direction: Direction::Fence,
                attempt,
                error: detail.clone(),
                retryable: false,
            },
        })?;
        self.go_on(step, fencing, &answer)
    }

    /// `fencing` is settled (by its answer, or by a late answer of the command it fenced,
    /// already recorded): the saga does what it fenced for.
    pub(super) fn go_on(&mut self, step: u32, fencing: Fencing, answer: &Answer) -> Step {
        let pivot = self.definition.steps()[step as usize].kind == StepKind::Pivot;
        // A cancel or a deadline that came during an operator's retry of an action: the saga
        // stops rather than run it again.
        let (then, reason) = match fencing.then {
            FenceThen::Retry
                if (self.state.stop.is_some() || self.member_given_up(step))
                    && fencing.target == Direction::Forward =>
            {
                // Compensation, if it starts here, says why the saga gave up, not "a retry".
                let why = self.giving_up_reason().unwrap_or(fencing.reason.clone());
                (FenceThen::GiveUp, why)
            }
            then => (then, fencing.reason.clone()),
        };
        match (then, answer) {
            (FenceThen::GiveUp, Answer::Unfenceable(detail)) if pivot => {
                // Never compensated past; an operator decides (a retry runs it again).
                self.emit(Event::Stuck {
                    step,
                    direction: Direction::Forward,
                    reason: format!(
                        "the outcome of pivot step `{}` is unknown and cannot be fenced \
                         ({detail}); the saga gave up on it: {}",
                        self.step_name(step),
                        fencing.reason
                    ),
                })
            }
            (FenceThen::GiveUp, Answer::Applied(_)) if pivot && self.state.stop.is_none() => {
                self.after_success(step, Direction::Forward)
            }
            (FenceThen::GiveUp, _) => self.settle(step, reason),
            (FenceThen::Retry, Answer::Applied(_)) => self.after_success(step, fencing.target),
            (FenceThen::Retry, _) => {
                let attempt = self.next_attempt(step, fencing.target);
                self.dispatch(StepAttempt::new(step, fencing.target, attempt))
            }
            (FenceThen::Resolve, _) => self.compensate_below(step),
        }
    }
}
