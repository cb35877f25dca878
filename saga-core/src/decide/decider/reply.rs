//! A participant's result: the outstanding command's answer, or a late one that still tells
//! the saga something it needs to know.

use super::fence::Answer;
use super::{Decider, Step};
use crate::SagaStatus;
use crate::decide::{Effect, Timer, Verdict};
use crate::event::{Direction, Event, FenceThen};
use crate::message::{Outcome, Reply};
use crate::state::{ReplayError, SentCommand};

impl Decider<'_, '_> {
    pub(in crate::decide) fn reply(&mut self, reply: &Reply) -> Result<Verdict, ReplayError> {
        let Some(sent) = self.state.sent.get(&reply.command_id).copied() else {
            return Ok(Verdict::Rejected(format!(
                "saga {} sent no command {}",
                self.env.saga_id, reply.command_id
            )));
        };
        if sent.at != reply.step_attempt() {
            return Ok(Verdict::Rejected(format!(
                "result for command {} names {}, but the command was {}",
                reply.command_id,
                reply.step_attempt(),
                sent.at
            )));
        }
        let outstanding = self.state.current_of(reply.step).and_then(|c| c.command_id);
        if outstanding != Some(reply.command_id) {
            return self.late_reply(reply, sent);
        }
        let (step, direction, attempt) = (reply.step, reply.direction, reply.attempt);
        if self.timeout_of(step).is_some() {
            self.effects.push(Effect::CancelTimer(Timer::Timeout {
                step,
                direction,
                attempt,
            }));
        }
        if direction == Direction::Fence {
            match Answer::of(&reply.outcome) {
                Some(answer) => self.after_fence(step, attempt, answer)?,
                None => self.failed_attempt(reply)?,
            }
            return Ok(Verdict::Applied);
        }
        match &reply.outcome {
            Outcome::Success { output } => {
                self.emit(Event::Succeeded {
                    step,
                    direction,
                    attempt,
                    output: output.clone(),
                })?;
                self.after_success(step, direction)?;
            }
            Outcome::Failure { .. } | Outcome::Fenced { .. } | Outcome::Unfenceable { .. } => {
                self.failed_attempt(reply)?
            }
        }
        Ok(Verdict::Applied)
    }

    /// An attempt that failed: retried by its policy, or failed for good. A delivery that
    /// found its step fenced did not apply and never will: a terminal failure. A failure in
    /// answer to a fence is no answer (the fence could not be made there and then, a worker
    /// refused the message, say): the fence is tried again.
    fn failed_attempt(&mut self, reply: &Reply) -> Step {
        let (error, retryable) = match &reply.outcome {
            Outcome::Failure { error, retryable } => (
                error.clone(),
                *retryable || reply.direction == Direction::Fence,
            ),
            Outcome::Fenced { detail } => (format!("the step was fenced: {detail}"), false),
            Outcome::Unfenceable { detail } => (detail.clone(), false),
            Outcome::Success { .. } => unreachable!("a success is not a failure"),
        };
        self.emit(Event::Failed {
            step: reply.step,
            direction: reply.direction,
            attempt: reply.attempt,
            error: error.clone(),
            retryable,
        })?;
        self.after_failure(
            reply.step,
            reply.direction,
            reply.attempt,
            retryable,
            &error,
            reply.command_id,
        )
    }

    /// A result for a command the saga no longer waits for: dropped, unless it settles what
    /// the saga still needs to know about its step. A success of an earlier attempt (or of
    /// an attempt whose timeout fired) is the command's success, and settles a fence of it; a
    /// fence's definitive answer from an earlier fence attempt is the fence's answer; a
    /// compensation's success settles a compensation being retried, or one that got the saga
    /// stuck.
    fn late_reply(&mut self, reply: &Reply, sent: SentCommand) -> Result<Verdict, ReplayError> {
        let stale = Verdict::Ignored(format!(
            "duplicate or stale result for step {} {} attempt {}",
            reply.step, reply.direction, reply.attempt
        ));
        let step = reply.step;
        if self.state.status.is_terminal() || !self.working_on(step, reply.direction) {
            return Ok(stale);
        }
        let fencing = self
            .state
            .fencing_of(step)
            .cloned()
            .filter(|f| reply.direction == Direction::Fence || f.target == reply.direction);
        // Only the fence running now answers for itself (not an earlier fence of the step,
        // perhaps of its other command), and "not applied" holds only for the key it fences
        // (not an earlier generation's, tombstoned by an earlier fence).
        let this_fence = reply.direction == Direction::Fence
            && reply.attempt > self.state.attempts_before_retry(step, Direction::Fence);
        let this_key = fencing
            .as_ref()
            .is_some_and(|f| sent.generation == self.state.generation(step, f.target));
        // An answer about the command's fence: from the fence (any attempt of this one), or
        // from the command itself, applied or (the only attempt in doubt) not.
        let (attempt, answer) = match (reply.direction, &reply.outcome, &fencing) {
            (Direction::Fence, _, Some(_)) if !this_fence => return Ok(stale),
            (Direction::Fence, outcome, Some(_)) => match Answer::of(outcome) {
                Some(answer) => (reply.attempt, answer),
                None => return Ok(stale),
            },
            (direction, Outcome::Success { output }, _) => {
                self.drop_current_timer(step);
                self.emit(Event::Succeeded {
                    step,
                    direction,
                    attempt: reply.attempt,
                    output: output.clone(),
                })?;
                match fencing {
                    Some(fencing) => self.go_on(step, fencing, &Answer::Applied(output.clone()))?,
                    None => self.after_success(step, direction)?,
                }
                return Ok(Verdict::Applied);
            }
            (_, Outcome::Fenced { detail }, Some(_)) if this_key => {
                let attempt = self.state.current_of(step).map_or(0, |c| c.at.attempt);
                (attempt, Answer::NotApplied(detail.clone()))
            }
            (
                Direction::Forward,
                Outcome::Failure {
                    retryable: false,
                    error,
                },
                Some(f),
            ) if f.then == FenceThen::GiveUp && !self.state.doubt[step as usize] && this_key => {
                let attempt = self.state.current_of(step).map_or(0, |c| c.at.attempt);
                let detail = format!("its attempt {} failed: {error}", reply.attempt);
                (attempt, Answer::NotApplied(detail))
            }
            _ => return Ok(stale),
        };
        self.drop_current_timer(step);
        self.after_fence(step, attempt, answer)?;
        Ok(Verdict::Applied)
    }

    /// Whether the saga still waits to learn how `step` went in `direction`: it works on it
    /// (another attempt, a backoff, a fence of that command), or is stuck there.
    fn working_on(&self, step: u32, direction: Direction) -> bool {
        let fenced = self.state.fencing_of(step).map(|f| f.target);
        let at = |d: Direction| {
            d == direction
                || (d == Direction::Fence && fenced == Some(direction))
                || (direction == Direction::Fence && d == Direction::Fence)
        };
        let current = self
            .state
            .current_of(step)
            .is_some_and(|c| !c.waiting && at(c.at.direction));
        let stuck = self.state.status == SagaStatus::Stuck
            && self.state.stuck.get(&step).is_some_and(|(d, _)| at(*d));
        current || stuck
    }
}
