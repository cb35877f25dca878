//! An operator's actions on a saga: retry, resolve, pause, resume.

use uuid::Uuid;

use super::Decider;
use crate::SagaStatus;
use crate::decide::{OperatorAction, Verdict};
use crate::event::{Direction, Event, FenceThen, StepAttempt};
use crate::state::ReplayError;

impl Decider<'_, '_> {
    /// Whether a command of `step` in `direction` was ever sent (a command step's).
    fn was_sent(&self, step: u32, direction: Direction) -> bool {
        let is_command = self.definition.steps()[step as usize].action().is_some();
        is_command && self.state.last_attempt(step, direction) > 0
    }

    pub(super) fn operator(
        &mut self,
        request: Uuid,
        action: &OperatorAction,
    ) -> Result<Verdict, ReplayError> {
        let status = self.state.status;
        let refuse = |why: String| Event::ActionRefused {
            request,
            action: action.name().to_owned(),
            why,
        };
        let event = match action {
            OperatorAction::Retry => match self.state.stuck_at {
                Some((step, direction)) if status == SagaStatus::Stuck => {
                    self.emit(Event::RetryRequested {
                        request,
                        step,
                        direction,
                    })?;
                    if self.was_sent(step, direction) && direction != Direction::Fence {
                        // Its last delivery may yet apply, or its key hold a recorded failure:
                        // fence it; what did not apply runs again under a fresh key.
                        self.fence(
                            step,
                            direction,
                            FenceThen::Retry,
                            "an operator's retry".to_owned(),
                        )?;
                    } else {
                        let attempt = self.next_attempt(step, direction);
                        self.dispatch(StepAttempt::new(step, direction, attempt))?;
                    }
                    return Ok(Verdict::Applied);
                }
                _ => refuse(format!(
                    "only a stuck saga can be retried; this one is {status}"
                )),
            },
            OperatorAction::Resolve { step, reason } => {
                let index = self.definition.step_index(step);
                match (index, self.state.stuck_at) {
                    (None, _) => refuse(format!("the saga has no step `{step}`")),
                    (Some(i), Some((at, Direction::Compensation)))
                        if status == SagaStatus::Stuck && at as usize == i =>
                    {
                        self.emit(Event::Resolved {
                            request,
                            step: at,
                            reason: reason.clone(),
                        })?;
                        if self.was_sent(at, Direction::Compensation) {
                            // No delivery of the compensation may apply after the fix by hand.
                            self.fence(
                                at,
                                Direction::Compensation,
                                FenceThen::Resolve,
                                format!("resolved by hand: {reason}"),
                            )?;
                        } else {
                            self.compensate_below(at)?;
                        }
                        return Ok(Verdict::Applied);
                    }
                    (Some(_), Some((at, direction))) if status == SagaStatus::Stuck => {
                        refuse(format!(
                            "the saga is stuck at step `{}` ({direction}), not at the compensation of `{step}`",
                            self.definition.steps()[at as usize].name
                        ))
                    }
                    _ => refuse(format!(
                        "only a stuck compensation can be resolved; the saga is {status}"
                    )),
                }
            }
            OperatorAction::Pause { reason } => {
                if !status.is_active() {
                    refuse(format!("the saga is {status}"))
                } else if self.state.paused {
                    refuse("the saga is already paused".to_owned())
                } else {
                    Event::Paused {
                        request,
                        reason: reason.clone(),
                    }
                }
            }
            OperatorAction::Resume => {
                if status.is_terminal() {
                    refuse(format!("the saga is {status}"))
                } else if !self.state.paused {
                    refuse("the saga is not paused".to_owned())
                } else {
                    let held: Vec<_> = match status.is_active() {
                        true => self.state.held.values().copied().collect(),
                        false => Vec::new(),
                    };
                    self.emit(Event::Resumed { request })?;
                    for h in held {
                        self.dispatch(h.at)?;
                    }
                    return Ok(Verdict::Applied);
                }
            }
        };
        self.emit(event)?;
        Ok(Verdict::Applied)
    }
}
