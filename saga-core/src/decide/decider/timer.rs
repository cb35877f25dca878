//! Durable timers: retries, timeouts, delays, the deadline, and queued signals and cancels.

use serde_json::Value;

use super::{Decider, Step};
use crate::SagaStatus;
use crate::decide::{Effect, Timer, Verdict};
use crate::definition::Work;
use crate::event::{Direction, Event, StepAttempt};
use crate::state::{Current, ReplayError};

impl Decider<'_, '_> {
    pub(in crate::decide) fn timer(&mut self, timer: &Timer) -> Result<Verdict, ReplayError> {
        if let Timer::Operator { id, action } = timer {
            return self.operator(*id, action);
        }
        // A stuck saga is not over: a signal is kept for when an operator retries it, and a
        // deadline that passes is recorded, to stop the saga once it runs again.
        if self.state.status == SagaStatus::Stuck {
            match timer {
                Timer::Signal { name, payload, .. } => {
                    self.emit(Event::SignalReceived {
                        name: name.clone(),
                        payload: payload.clone(),
                    })?;
                    return Ok(Verdict::Applied);
                }
                Timer::Deadline if self.state.stop.is_none() && self.past_pivot().is_none() => {
                    self.emit(Event::DeadlineExceeded)?;
                    // A group's members still outstanding stop now.
                    if let Some(group) = self.current_group() {
                        let reason = self.stop_reason();
                        self.wind_down(group, &reason)?;
                    }
                    return Ok(Verdict::Applied);
                }
                _ => {}
            }
        }
        // A group member's retry or timeout still runs while another member is stuck.
        let member_due = timer
            .step_attempt()
            .is_some_and(|at| self.state.current_of(at.step).is_some());
        if let Some(verdict) = self.inactive().filter(|_| !member_due) {
            return Ok(verdict);
        }
        let stale = || Ok(Verdict::Ignored(format!("stale timer {}", timer.key())));
        match timer.clone() {
            Timer::Retry {
                step,
                direction,
                attempt,
            } => {
                let due = Current {
                    at: StepAttempt::new(step, direction, attempt),
                    command_id: None,
                    waiting: false,
                };
                if self.state.current_of(step) != Some(due)
                    || self.state.held.get(&step) == Some(&due)
                {
                    return stale();
                }
                if direction == Direction::Forward && self.member_given_up(step) {
                    // A deadline passed while another member was stuck: no new attempt.
                    let reason = self.giving_up_reason().unwrap_or_default();
                    self.give_up(step, reason)?;
                    return Ok(Verdict::Applied);
                }
                self.dispatch(StepAttempt::new(step, direction, attempt))?;
            }
            Timer::Timeout {
                step,
                direction,
                attempt,
            } => {
                let Some(c) = self.state.current_of(step).filter(|c| {
                    c.at == StepAttempt::new(step, direction, attempt)
                        && (c.command_id.is_some() || c.waiting)
                }) else {
                    return stale();
                };
                self.emit(Event::TimedOut {
                    step,
                    direction,
                    attempt,
                })?;
                let timeout = self.timeout_of(step).unwrap_or_default();
                match (c.command_id, &self.definition.steps()[step as usize].work) {
                    (Some(command_id), _) => {
                        let what = if direction == Direction::Fence {
                            "fence attempt"
                        } else {
                            "attempt"
                        };
                        let error = format!("{what} {attempt} timed out after {timeout:?}");
                        self.after_failure(step, direction, attempt, true, &error, command_id)?;
                    }
                    (None, Work::Signal(wait)) => {
                        let reason = format!("no signal `{}` within {timeout:?}", wait.name);
                        self.failed_for_good(step, direction, reason)?;
                    }
                    (None, _) => return stale(),
                }
            }
            Timer::Delay { step } => {
                if !self.state.current_of(step).is_some_and(|c| c.waiting) {
                    return stale();
                }
                self.emit(Event::Succeeded {
                    step,
                    direction: Direction::Forward,
                    attempt: 1,
                    output: Value::Null,
                })?;
                self.after_success(step, Direction::Forward)?;
            }
            Timer::Deadline => {
                if self.state.stop.is_some()
                    || self.state.status != SagaStatus::Running
                    || self.giving_up()
                {
                    return Ok(Verdict::Ignored("the saga is already stopping".into()));
                }
                if let Some(why) = self.past_pivot() {
                    return Ok(Verdict::Ignored(format!("deadline passed, but {why}")));
                }
                self.emit(Event::DeadlineExceeded)?;
                self.stop_now()?;
            }
            Timer::Signal { name, payload, .. } => {
                self.emit(Event::SignalReceived {
                    name: name.clone(),
                    payload: payload.clone(),
                })?;
                if let Some(c) = self.state.current.values().copied().find(|c| c.waiting)
                    && matches!(&self.definition.steps()[c.at.step as usize].work, Work::Signal(w) if w.name == name)
                {
                    self.take_signal(c.at.step, payload)?;
                }
            }
            Timer::Operator { .. } => unreachable!("handled before"),
            Timer::Cancel { id, reason } => {
                let why =
                    if self.state.stop.is_some() || self.state.status == SagaStatus::Compensating {
                        Some("the saga is already compensating".to_owned())
                    } else if let Some(f) = self.state.fencing.values().next() {
                        Some(format!(
                            "the saga is already giving up on step `{}`",
                            f.name
                        ))
                    } else {
                        self.past_pivot()
                    };
                if let Some(why) = why {
                    self.emit(Event::CancelRefused {
                        request: id,
                        reason,
                        why,
                    })?;
                } else {
                    self.emit(Event::CancelRequested {
                        request: id,
                        reason,
                    })?;
                    self.stop_now()?;
                }
            }
        }
        Ok(Verdict::Applied)
    }

    /// Whether the saga fences a step it gave up on (it compensates next, whatever the answer).
    fn giving_up(&self) -> bool {
        self.state
            .fencing
            .values()
            .any(|f| f.then == crate::event::FenceThen::GiveUp)
    }

    /// Why the saga can no longer be stopped, if its pivot has started.
    fn past_pivot(&self) -> Option<String> {
        let pivot = self.definition.pivot()?;
        (self.state.progress[pivot] != crate::state::StepProgress::Pending).then(|| {
            format!(
                "the saga has passed its pivot step `{}`",
                self.definition.steps()[pivot].name
            )
        })
    }

    /// After a cancel or a deadline: a wait or a backoff ends now; a command in flight (or
    /// one whose earlier attempts may yet apply) is fenced first; then the steps that applied
    /// compensate.
    fn stop_now(&mut self) -> Step {
        let Some(c) = self.state.first_current() else {
            return Ok(());
        };
        let reason = self.stop_reason();
        if let Some(group) = self.group_of(c.at.step) {
            self.wind_down(group.clone(), &reason)?;
            return self.pump(group);
        }
        if c.waiting {
            let timer = match self.definition.steps()[c.at.step as usize].work {
                Work::Delay(_) => Timer::Delay { step: c.at.step },
                _ => Timer::Timeout {
                    step: c.at.step,
                    direction: c.at.direction,
                    attempt: c.at.attempt,
                },
            };
            self.effects.push(Effect::CancelTimer(timer));
            return self.stop_at(c.at.step);
        }
        if c.at.direction != Direction::Forward {
            // A fence runs already (its answer decides with the stop in mind).
            return Ok(());
        }
        self.drop_current_timer(c.at.step);
        if c.command_id.is_some() {
            return self.start_fence(c.at.step, reason);
        }
        self.give_up(c.at.step, reason)
    }
}

/// A duration for people: `90s`, `25m`, `3h`.
pub(super) fn humantime(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}
