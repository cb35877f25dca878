//! Parallel groups: the members are dispatched together; once none is outstanding, the saga
//! goes past the group (every member succeeded or was skipped) or compensates (a member
//! failed for good, or a cancel or deadline came).
//!
//! Every decision here is made from the members' state, not from the event that arrived, so
//! any order of their results gives the same outcome, and calling [`Decider::pump`] again
//! does nothing new.

use std::borrow::Cow;
use std::ops::Range;

use serde_json::Value;

use super::{Decider, Step};
use crate::SagaStatus;
use crate::event::{Direction, Event, FenceThen, StepAttempt};
use crate::state::StepProgress;

impl Decider<'_, '_> {
    /// The members of the group `step` belongs to, if it is in one.
    pub(super) fn group_of(&self, step: u32) -> Option<Range<u32>> {
        let group = self.definition.group_of(step as usize)?;
        Some(group.first as u32..(group.first + group.len) as u32)
    }

    /// The outputs `step`'s code sees in `direction`: a member going forward sees those of the
    /// steps before its group, never its siblings' (which may or may not have arrived); a
    /// compensation sees every output.
    pub(super) fn outputs_for(&self, step: u32, direction: Direction) -> Cow<'_, [Option<Value>]> {
        match self.group_of(step) {
            Some(group) if direction == Direction::Forward => {
                let mut outputs = self.state.outputs.clone();
                for k in group {
                    outputs[k as usize] = None;
                }
                Cow::Owned(outputs)
            }
            _ => Cow::Borrowed(&self.state.outputs),
        }
    }

    /// Goes forward to `step`: dispatches it, or every member of the group it starts.
    pub(super) fn enter(&mut self, step: u32) -> Step {
        match self.group_of(step) {
            Some(group) => self.pump(group),
            None => self.dispatch(StepAttempt::new(step, Direction::Forward, 1)),
        }
    }

    /// Drives `group` on: while the saga goes forward, dispatches the members not sent yet;
    /// once nothing is outstanding, goes past the group when every member succeeded or was
    /// skipped, or compensates, from the last member down, when the saga stops.
    pub(super) fn pump(&mut self, group: Range<u32>) -> Step {
        for k in group.clone() {
            if !self.going_forward() {
                break;
            }
            // Not a member waiting for an operator (its definition code failed).
            let pending = self.state.progress[k as usize] == StepProgress::Pending
                && !self.state.stuck.contains_key(&k);
            if pending && self.state.current_of(k).is_none() {
                self.dispatch(StepAttempt::new(k, Direction::Forward, 1))?;
            }
        }
        if !self.state.status.is_active() || self.state.busy() {
            return Ok(());
        }
        if self.state.failure.is_none() && self.state.stop.is_some() {
            let reason = self.stop_reason();
            self.emit(Event::CompensationStarted {
                step: group.end - 1,
                reason,
            })?;
        }
        if self.state.failure.is_some() {
            return self.compensate_below(group.end);
        }
        let done = group.clone().all(|k| {
            matches!(
                self.state.progress[k as usize],
                StepProgress::Succeeded | StepProgress::Skipped
            )
        });
        match done {
            true if (group.end as usize) < self.definition.steps().len() => self.enter(group.end),
            true => self.emit(Event::Completed),
            false => Ok(()),
        }
    }

    /// A member's outcome is known and the saga gives up on the group (the member did not
    /// apply, or applied and is to be undone): the first such member starts compensation,
    /// the members still in flight are fenced, and the group compensates once they settle.
    pub(super) fn settle_member(&mut self, step: u32, group: Range<u32>, reason: String) -> Step {
        if self.state.failure.is_none() && self.state.stop.is_none() {
            self.emit(Event::CompensationStarted {
                step,
                reason: reason.clone(),
            })?;
        }
        self.wind_down(group.clone(), &reason)?;
        self.pump(group)
    }

    /// No member of `group` goes on: each one still outstanding (in flight, in a backoff, or
    /// a retry held by a pause) is fenced, so that it settles as applied or never applies; one
    /// held by a pause and never sent is withdrawn (recorded as skipped).
    pub(super) fn wind_down(&mut self, group: Range<u32>, reason: &str) -> Step {
        for k in group {
            if self.state.fencing_of(k).is_some() {
                continue;
            }
            let Some(c) = self.state.current_of(k) else {
                continue;
            };
            if c.at.direction != Direction::Forward {
                continue;
            }
            // Held before it was ever sent: nothing of it can apply.
            if self.state.last_attempt(k, Direction::Forward) == 0 {
                self.emit(Event::Skipped { step: k })?;
                continue;
            }
            self.drop_current_timer(k);
            self.start_fence(k, reason.to_owned())?;
        }
        Ok(())
    }

    /// The group of the members the saga works on, if it works on a group.
    pub(super) fn current_group(&self) -> Option<Range<u32>> {
        self.state
            .current
            .keys()
            .chain(self.state.fencing.keys())
            .find_map(|step| self.group_of(*step))
    }

    /// Whether the saga still goes forward: no failure, cancel or deadline (a stuck member
    /// does not keep the others from being sent).
    fn going_forward(&self) -> bool {
        matches!(self.state.status, SagaStatus::Running | SagaStatus::Stuck)
            && self.giving_up_reason().is_none()
    }

    /// Why the saga gives up going forward, if it does: the failure that started
    /// compensation, or a cancel or deadline.
    pub(super) fn giving_up_reason(&self) -> Option<String> {
        match (&self.state.failure, &self.state.stop) {
            (Some((_, why)), _) => Some(why.clone()),
            (None, Some(stop)) => Some(stop.reason.clone()),
            // A member given up on is being fenced: compensation follows whatever it says.
            (None, None) => self
                .state
                .fencing
                .values()
                .find(|f| f.then == FenceThen::GiveUp && self.group_of(f.step).is_some())
                .map(|f| f.reason.clone()),
        }
    }

    /// Whether `step` is a member of a group the saga gives up on: it must not go forward.
    pub(super) fn member_given_up(&self, step: u32) -> bool {
        self.group_of(step).is_some() && self.giving_up_reason().is_some()
    }
}
