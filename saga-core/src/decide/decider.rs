//! The decider: applies one input to a copy of the state, emitting events and effects.

mod condition;
mod fence;
mod group;
mod operator;
mod reply;
mod timer;

use timer::humantime;

use serde_json::Value;
use uuid::Uuid;

use super::{Effect, Env, Timer, Verdict};
use crate::definition::{Definition, RawContext, StepKind, Work};
use crate::event::{Direction, Event, StepAttempt};
use crate::message::Command;
use crate::state::{ReplayError, SagaState, StepProgress};

pub(super) struct Decider<'d, 'e> {
    pub(super) definition: &'d Definition,
    pub(super) state: SagaState,
    pub(super) events: Vec<Event>,
    pub(super) effects: Vec<Effect>,
    pub(super) env: &'d mut Env<'e>,
}

type Step = Result<(), ReplayError>;

impl Decider<'_, '_> {
    fn emit(&mut self, event: Event) -> Step {
        self.state.apply(self.definition, &event)?;
        self.events.push(event);
        Ok(())
    }

    fn inactive(&self) -> Option<Verdict> {
        (!self.state.status.is_active())
            .then(|| Verdict::Ignored(format!("the saga is {}", self.state.status)))
    }

    pub(super) fn start(&mut self) -> Result<Verdict, ReplayError> {
        if self.state.events > 1 {
            return Ok(Verdict::Ignored("the saga has already started".into()));
        }
        if let Some(deadline) = self.definition.deadline() {
            let Some(due_at) = self.due(deadline) else {
                self.park_overflow(0, Direction::Forward, "deadline", deadline)?;
                return Ok(Verdict::Applied);
            };
            self.effects.push(Effect::SetTimer {
                timer: Timer::Deadline,
                due_at,
            });
        }
        self.enter(0)?;
        Ok(Verdict::Applied)
    }

    /// When `after` will have passed, or `None` if that is past the last date there is.
    fn due(&self, after: std::time::Duration) -> Option<chrono::DateTime<chrono::Utc>> {
        let after = chrono::TimeDelta::from_std(after).ok()?;
        self.env.now.checked_add_signed(after)
    }

    /// Parks the saga at `step` in `direction`: the definition's code cannot go on.
    fn park(&mut self, step: u32, direction: Direction, why: String) -> Step {
        let name = self.step_name(step).to_owned();
        self.emit(Event::Stuck {
            step,
            direction,
            reason: format!("the definition's code failed at step `{name}` ({direction}): {why}"),
        })
    }

    /// Parks the saga: a duration of the definition overflows the date.
    fn park_overflow(
        &mut self,
        step: u32,
        direction: Direction,
        what: &str,
        duration: std::time::Duration,
    ) -> Step {
        self.park(
            step,
            direction,
            format!("its {what} of {duration:?} reaches past the last date there is"),
        )
    }

    fn timeout_of(&self, step: u32) -> Option<std::time::Duration> {
        self.definition.steps()[step as usize].timeout
    }

    fn step_name(&self, step: u32) -> &str {
        &self.definition.steps()[step as usize].name
    }

    /// The next attempt number of `step` in `direction`: one past every one sent.
    fn next_attempt(&self, step: u32, direction: Direction) -> u32 {
        let held = self
            .state
            .held
            .get(&step)
            .filter(|h| h.at.direction == direction)
            .map(|h| h.at.attempt);
        self.state
            .last_attempt(step, direction)
            .max(held.unwrap_or(0))
            + 1
    }

    /// Drops the timer the saga's current work on `step` holds (an attempt's timeout, a
    /// retry's backoff): a late answer settled the step.
    fn drop_current_timer(&mut self, step: u32) {
        let Some(c) = self.state.current_of(step) else {
            return;
        };
        let timer = if c.command_id.is_some() {
            Timer::Timeout {
                step,
                direction: c.at.direction,
                attempt: c.at.attempt,
            }
        } else {
            Timer::Retry {
                step,
                direction: c.at.direction,
                attempt: c.at.attempt,
            }
        };
        self.effects.push(Effect::CancelTimer(timer));
    }

    fn dispatch(&mut self, at: StepAttempt) -> Step {
        let StepAttempt {
            step,
            direction,
            attempt,
        } = at;
        let def = &self.definition.steps()[step as usize];
        if direction == Direction::Forward && self.skipped_or_parked(step)? {
            return Ok(());
        }
        let fenced = match direction {
            Direction::Fence => self.state.fence_target(step),
            other => other,
        };
        let action = match (fenced, &def.work) {
            // A fence goes to the service of the command it fences.
            (Direction::Forward, Work::Command(action)) => action,
            (Direction::Forward, Work::Signal(wait)) => {
                let name = wait.name.clone();
                let until = match def.timeout {
                    Some(t) => match self.due(t) {
                        Some(until) => Some(until),
                        None => return self.park_overflow(step, direction, "timeout", t),
                    },
                    None => None,
                };
                self.emit(Event::Waiting {
                    step,
                    signal: Some(name.clone()),
                    until,
                })?;
                if let Some(due_at) = until {
                    self.effects.push(Effect::SetTimer {
                        timer: Timer::Timeout {
                            step,
                            direction,
                            attempt: 1,
                        },
                        due_at,
                    });
                }
                // A signal that came early was kept for this wait.
                if let Some(payload) = self.state.pending_signal(&name).cloned() {
                    self.take_signal(step, payload)?;
                }
                return Ok(());
            }
            (Direction::Forward, Work::Delay(delay)) => {
                let Some(due_at) = self.due(*delay) else {
                    return self.park_overflow(step, direction, "delay", *delay);
                };
                self.emit(Event::Waiting {
                    step,
                    signal: None,
                    until: Some(due_at),
                })?;
                self.effects.push(Effect::SetTimer {
                    timer: Timer::Delay { step },
                    due_at,
                });
                return Ok(());
            }
            (Direction::Compensation, _) => {
                def.compensation.as_ref().expect("checked by the caller")
            }
            (Direction::Fence, _) => unreachable!("a fence targets a command"),
        };
        if self.state.paused {
            return self.emit(Event::Held {
                step,
                direction,
                attempt,
            });
        }
        let payload = if direction == Direction::Fence {
            Value::Null
        } else {
            let outputs = self.outputs_for(step, direction);
            let ctx = RawContext {
                definition: self.definition,
                input: &self.state.input,
                outputs: &outputs,
            };
            match catch(|| action.build_input(&ctx)) {
                Err(panic) => {
                    return self.park(
                        step,
                        direction,
                        format!("its input builder panicked: {panic}"),
                    );
                }
                Ok(Ok(payload)) => payload,
                Ok(Err(e)) => {
                    let error = format!("cannot build the input of step `{}`: {e}", def.name);
                    self.emit(Event::Failed {
                        step,
                        direction,
                        attempt,
                        error: error.clone(),
                        retryable: false,
                    })?;
                    return self.failed_for_good(step, direction, error);
                }
            }
        };
        let timeout = match def.timeout {
            Some(timeout) => match self.due(timeout) {
                Some(due_at) => Some(due_at),
                None => return self.park_overflow(step, direction, "timeout", timeout),
            },
            None => None,
        };
        let command_id = (self.env.new_id)();
        let command = Command {
            command_id,
            saga_id: self.env.saga_id,
            saga: self.definition.name().to_owned(),
            step,
            step_name: def.name.clone(),
            direction,
            attempt,
            service: action.service.clone(),
            command: action.command.clone(),
            idempotency_key: self
                .state
                .idempotency_key(self.env.saga_id, step, direction),
            timeout_ms: def.timeout.map(|t| t.as_millis() as u64),
            input_type: (direction != Direction::Fence)
                .then_some(action.input_type)
                .flatten()
                .map(str::to_owned),
            payload: payload.clone(),
        };
        self.emit(Event::Dispatched {
            step,
            direction,
            attempt,
            command_id,
            payload,
            service: Some(action.service.clone()),
            command: Some(action.command.clone()),
        })?;
        if let Some(due_at) = timeout {
            self.effects.push(Effect::SetTimer {
                timer: Timer::Timeout {
                    step,
                    direction,
                    attempt,
                },
                due_at,
            });
        }
        self.effects.push(Effect::Dispatch(command));
        Ok(())
    }

    /// A wait step takes a signal: its payload is the output, unless the step refuses it.
    fn take_signal(&mut self, step: u32, payload: Value) -> Step {
        let def = &self.definition.steps()[step as usize];
        let Work::Signal(wait) = &def.work else {
            return Ok(());
        };
        if def.timeout.is_some() {
            self.effects.push(Effect::CancelTimer(Timer::Timeout {
                step,
                direction: Direction::Forward,
                attempt: 1,
            }));
        }
        let checked = match catch(|| (wait.check)(&payload)) {
            Ok(checked) => checked,
            Err(panic) => {
                let why = format!("its check of signal `{}` panicked: {panic}", wait.name);
                return self.park(step, Direction::Forward, why);
            }
        };
        match checked {
            Ok(()) => {
                self.emit(Event::Succeeded {
                    step,
                    direction: Direction::Forward,
                    attempt: 1,
                    output: payload,
                })?;
                self.after_success(step, Direction::Forward)
            }
            Err(error) => {
                let reason = format!(
                    "step `{}` refused signal `{}`: {error}",
                    def.name, wait.name
                );
                self.emit(Event::Failed {
                    step,
                    direction: Direction::Forward,
                    attempt: 1,
                    error,
                    retryable: false,
                })?;
                self.failed_for_good(step, Direction::Forward, reason)
            }
        }
    }

    fn after_success(&mut self, step: u32, direction: Direction) -> Step {
        if direction == Direction::Forward
            && let Some(group) = self.group_of(step)
        {
            return self.pump(group);
        }
        match direction {
            // A cancel or a deadline waited for this step: undo it too.
            Direction::Forward if self.state.stop.is_some() => self.stop_at(step),
            Direction::Forward if (step as usize) + 1 < self.definition.steps().len() => {
                self.enter(step + 1)
            }
            Direction::Forward => self.emit(Event::Completed),
            Direction::Compensation => self.compensate_below(step),
            Direction::Fence => unreachable!("a fence's answer goes to after_fence"),
        }
    }

    fn after_failure(
        &mut self,
        step: u32,
        direction: Direction,
        attempt: u32,
        retryable: bool,
        error: &str,
        command_id: Uuid,
    ) -> Step {
        let def = &self.definition.steps()[step as usize];
        let (policy, unbounded) = match direction {
            Direction::Forward => (&def.retry, def.kind == StepKind::Retriable),
            Direction::Compensation => (&def.compensation_retry, false),
            Direction::Fence => (&def.fence_retry, false),
        };
        let stopping = direction == Direction::Forward
            && (self.state.stop.is_some() || self.member_given_up(step));
        let elapsed = self.retrying_for(step, direction);
        // After an operator's retry, the policy counts afresh.
        let before = self.state.attempts_before_retry(step, direction);
        let counted = attempt.saturating_sub(before).max(1);
        if retryable && !stopping && (unbounded || policy.allows_another(counted, elapsed)) {
            let delay = policy.delay(counted, unit_draw(command_id));
            let Some(due_at) = self.due(delay) else {
                return self.park_overflow(step, direction, "retry backoff", delay);
            };
            let next = attempt + 1;
            self.emit(Event::RetryScheduled {
                step,
                direction,
                attempt: next,
                delay_ms: delay.as_millis() as u64,
                due_at,
            })?;
            self.effects.push(Effect::SetTimer {
                timer: Timer::Retry {
                    step,
                    direction,
                    attempt: next,
                },
                due_at,
            });
            return Ok(());
        }
        if stopping {
            let reason = self.giving_up_reason().unwrap_or_default();
            return self.give_up(step, reason);
        }
        let what = match direction {
            Direction::Fence => "fence".to_owned(),
            other => other.to_string(),
        };
        let reason = match (retryable, direction) {
            (true, Direction::Fence) => format!(
                "fencing step `{}` gave up after {counted} attempts over {}: {error}",
                def.name,
                humantime(elapsed)
            ),
            (true, _) => format!(
                "step `{}` {what} failed after {counted} attempts: {error}",
                def.name
            ),
            (false, _) => format!("step `{}` {what} failed: {error}", def.name),
        };
        self.failed_for_good(step, direction, reason)
    }

    /// How long `step` has been retried in `direction`, from its first failure.
    fn retrying_for(&self, step: u32, direction: Direction) -> std::time::Duration {
        match self.state.retrying.get(&(step, direction)) {
            Some(since) => (self.env.now - *since).to_std().unwrap_or_default(),
            None => std::time::Duration::ZERO,
        }
    }

    fn failed_for_good(&mut self, step: u32, direction: Direction, reason: String) -> Step {
        let kind = self.definition.steps()[step as usize].kind;
        if direction != Direction::Forward || kind == StepKind::Retriable {
            return self.emit(Event::Stuck {
                step,
                direction,
                reason,
            });
        }
        self.give_up(step, reason)
    }

    /// After a cancel or a deadline, the saga stops at `step`: the steps that applied, from
    /// `step` down, compensate.
    fn stop_at(&mut self, step: u32) -> Step {
        let reason = self.stop_reason();
        self.emit(Event::CompensationStarted { step, reason })?;
        self.compensate_below(step + 1)
    }

    fn stop_reason(&self) -> String {
        self.state
            .stop
            .as_ref()
            .map(|s| s.reason.clone())
            .unwrap_or_default()
    }

    /// Dispatches the compensation of the highest step below `bound` that needs undoing.
    fn compensate_below(&mut self, bound: u32) -> Step {
        let next = (0..bound).rev().find(|&j| {
            let i = j as usize;
            matches!(
                self.state.progress[i],
                StepProgress::Succeeded | StepProgress::PossiblyApplied
            ) && !self.state.compensated[i]
                && self.definition.steps()[i].compensation.is_some()
        });
        match next {
            Some(j) => {
                let attempt = self.next_attempt(j, Direction::Compensation);
                self.dispatch(StepAttempt::new(j, Direction::Compensation, attempt))
            }
            None if self.state.stop.as_ref().is_some_and(|s| s.cancelled) => {
                self.emit(Event::Cancelled)
            }
            None => self.emit(Event::Compensated),
        }
    }
}

/// Runs the definition's code `f`; a panic comes back as its message.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|panic| super::panic_message(panic.as_ref()))
}

/// A number in `0.0..1.0` drawn from a command id's random bits.
fn unit_draw(id: Uuid) -> f64 {
    let bits = u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}
