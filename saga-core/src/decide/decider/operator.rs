//! An operator's actions on a saga: retry, resolve, pause, resume.

use uuid::Uuid;

use super::{Decider, Step};
use crate::SagaStatus;
use crate::decide::{OperatorAction, Verdict};
use crate::event::{Direction, Event, FenceThen, StepAttempt};
use crate::state::{Current, ReplayError};

impl Decider<'_, '_> {
    /// Whether a command of `step` in `direction` was ever sent (a command step's).
    fn was_sent(&self, step: u32, direction: Direction) -> bool {
        let is_command = self.definition.steps()[step as usize].action().is_some();
        is_command && self.state.last_attempt(step, direction) > 0
    }

    /// Runs the stuck `step` again in `direction`. A command sent before is fenced first: its
    /// last delivery may yet apply, or its key hold a recorded failure; what did not apply runs
    /// again under a fresh key. A member of a group the saga gives up on is not run forward
    /// again: it is fenced (if it was sent) and the group settles.
    fn retry_stuck(&mut self, step: u32, direction: Direction) -> Step {
        if direction == Direction::Forward
            && let Some(group) = self.group_of(step)
            && let Some(reason) = self.giving_up_reason()
        {
            if self.was_sent(step, direction) {
                self.start_fence(step, reason.clone())?;
            }
            self.wind_down(group.clone(), &reason)?;
            return self.pump(group);
        }
        if direction == Direction::Forward
            && self.state.stop.is_some()
            && !self.was_sent(step, direction)
        {
            // A cancel or deadline came while it was stuck before it ever ran: it never runs.
            let reason = self.stop_reason();
            return self.give_up(step, reason);
        }
        if self.was_sent(step, direction) && direction != Direction::Fence {
            return self.fence(
                step,
                direction,
                FenceThen::Retry,
                "an operator's retry".to_owned(),
            );
        }
        let attempt = self.next_attempt(step, direction);
        self.dispatch(StepAttempt::new(step, direction, attempt))
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
            OperatorAction::Retry if status == SagaStatus::Stuck => {
                // Every stuck point: one, or several members of a group.
                let stuck: Vec<(u32, Direction)> = self
                    .state
                    .stuck
                    .iter()
                    .map(|(s, (d, _))| (*s, *d))
                    .collect();
                for (step, direction) in stuck {
                    self.emit(Event::RetryRequested {
                        request,
                        step,
                        direction,
                    })?;
                    self.retry_stuck(step, direction)?;
                }
                return Ok(Verdict::Applied);
            }
            OperatorAction::Retry => refuse(format!(
                "only a stuck saga can be retried; this one is {status}"
            )),
            OperatorAction::Resolve { step, reason } => {
                let index = self.definition.step_index(step);
                match (index, self.state.stuck_at()) {
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
                    let held: Vec<Current> = self.state.held.values().copied().collect();
                    self.emit(Event::Resumed { request })?;
                    // Members held before the saga gave up on their group (a deadline while
                    // another member was stuck) do not go forward now.
                    if let Some(group) = self.current_group()
                        && let Some(reason) = self.giving_up_reason()
                    {
                        self.wind_down(group.clone(), &reason)?;
                        self.pump(group)?;
                    }
                    for h in held {
                        // A group's members are sent even while another member is stuck; a
                        // single step only once the saga is active.
                        let member = self.group_of(h.at.step).is_some();
                        // Not one that sending an earlier one settled (a member fenced when
                        // another failed).
                        let unchanged = self.state.current_of(h.at.step) == Some(h);
                        if unchanged && (member || status.is_active()) {
                            self.dispatch(h.at)?;
                        }
                    }
                    return Ok(Verdict::Applied);
                }
            }
        };
        self.emit(event)?;
        Ok(Verdict::Applied)
    }
}
