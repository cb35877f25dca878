//! The decider: applies one input to a copy of the state, emitting events and effects.

use serde_json::Value;
use uuid::Uuid;

use super::{Effect, Env, OperatorAction, Timer, Verdict};
use crate::definition::{Definition, RawContext, StepKind, Work};
use crate::event::{Direction, Event};
use crate::message::{Command, Outcome, Reply};
use crate::state::{Current, ReplayError, SagaState, StepProgress};

pub(super) struct Decider<'d, 'e> {
    pub(super) definition: &'d Definition,
    pub(super) state: SagaState,
    pub(super) events: Vec<Event>,
    pub(super) effects: Vec<Effect>,
    pub(super) env: &'d mut Env<'e>,
}

impl Decider<'_, '_> {
    fn emit(&mut self, event: Event) -> Result<(), ReplayError> {
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
            self.effects.push(Effect::SetTimer {
                timer: Timer::Deadline,
                due_at: self.env.now + deadline,
            });
        }
        self.dispatch(0, Direction::Forward, 1)?;
        Ok(Verdict::Applied)
    }

    pub(super) fn reply(&mut self, reply: &Reply) -> Result<Verdict, ReplayError> {
        let Some(sent) = self.state.sent.get(&reply.command_id).copied() else {
            return Ok(Verdict::Rejected(format!(
                "saga {} sent no command {}",
                self.env.saga_id, reply.command_id
            )));
        };
        if (sent.step, sent.direction, sent.attempt) != (reply.step, reply.direction, reply.attempt)
        {
            return Ok(Verdict::Rejected(format!(
                "result for command {} names step {} {} attempt {}, but the command was step {} {} attempt {}",
                reply.command_id,
                reply.step,
                reply.direction,
                reply.attempt,
                sent.step,
                sent.direction,
                sent.attempt
            )));
        }
        let outstanding = self.state.current.and_then(|c| c.command_id);
        if outstanding != Some(reply.command_id) {
            return Ok(Verdict::Ignored(format!(
                "duplicate or stale result for step {} {} attempt {}",
                reply.step, reply.direction, reply.attempt
            )));
        }
        let (step, direction, attempt) = (reply.step, reply.direction, reply.attempt);
        if self.timeout_of(step).is_some() {
            self.effects.push(Effect::CancelTimer(Timer::Timeout {
                step,
                direction,
                attempt,
            }));
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
            Outcome::Failure { error, retryable } => {
                self.emit(Event::Failed {
                    step,
                    direction,
                    attempt,
                    error: error.clone(),
                    retryable: *retryable,
                })?;
                self.after_failure(
                    step,
                    direction,
                    attempt,
                    *retryable,
                    error,
                    reply.command_id,
                )?;
            }
        }
        Ok(Verdict::Applied)
    }

    pub(super) fn timer(&mut self, timer: &Timer) -> Result<Verdict, ReplayError> {
        if let Timer::Operator { id, action } = timer {
            return self.operator(*id, action);
        }
        // A stuck saga is not over: a signal is kept for when an operator retries it.
        if let Timer::Signal { name, payload, .. } = timer
            && self.state.status == crate::SagaStatus::Stuck
        {
            self.emit(Event::SignalReceived {
                name: name.clone(),
                payload: payload.clone(),
            })?;
            return Ok(Verdict::Applied);
        }
        if let Some(verdict) = self.inactive() {
            return Ok(verdict);
        }
        let current = self.state.current;
        let stale = || Ok(Verdict::Ignored(format!("stale timer {}", timer.key())));
        match timer.clone() {
            Timer::Retry {
                step,
                direction,
                attempt,
            } => {
                let due = Current {
                    step,
                    direction,
                    attempt,
                    command_id: None,
                    waiting: false,
                };
                if current != Some(due) {
                    return stale();
                }
                self.dispatch(step, direction, attempt)?;
            }
            Timer::Timeout {
                step,
                direction,
                attempt,
            } => {
                let Some(c) = current.filter(|c| {
                    (c.step, c.direction, c.attempt) == (step, direction, attempt)
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
                        let error = format!("attempt {attempt} timed out after {timeout:?}");
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
                if !current.is_some_and(|c| c.step == step && c.waiting) {
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
                if self.state.stop.is_some() || self.state.status != crate::SagaStatus::Running {
                    return Ok(Verdict::Ignored("the saga is already stopping".into()));
                }
                if let Some(why) = self.past_pivot() {
                    return Ok(Verdict::Ignored(format!("deadline passed, but {why}")));
                }
                self.emit(Event::DeadlineExceeded)?;
                self.stop_if_idle()?;
            }
            Timer::Signal { name, payload, .. } => {
                self.emit(Event::SignalReceived {
                    name: name.clone(),
                    payload: payload.clone(),
                })?;
                if let Some(c) = current.filter(|c| c.waiting)
                    && matches!(&self.definition.steps()[c.step as usize].work, Work::Signal(w) if w.name == name)
                {
                    self.take_signal(c.step, payload)?;
                }
            }
            Timer::Operator { .. } => unreachable!("handled before"),
            Timer::Cancel { id, reason } => {
                let why = if self.state.stop.is_some()
                    || self.state.status == crate::SagaStatus::Compensating
                {
                    Some("the saga is already compensating".to_owned())
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
                    self.stop_if_idle()?;
                }
            }
        }
        Ok(Verdict::Applied)
    }

    fn operator(&mut self, request: Uuid, action: &OperatorAction) -> Result<Verdict, ReplayError> {
        let status = self.state.status;
        let refuse = |why: String| Event::ActionRefused {
            request,
            action: action.name().to_owned(),
            why,
        };
        let event = match action {
            OperatorAction::Retry => match self.state.stuck_at {
                Some((step, direction)) if status == crate::SagaStatus::Stuck => {
                    self.emit(Event::RetryRequested {
                        request,
                        step,
                        direction,
                    })?;
                    let last = self
                        .state
                        .sent
                        .values()
                        .filter(|s| s.step == step && s.direction == direction)
                        .map(|s| s.attempt)
                        .max()
                        .unwrap_or(0);
                    self.dispatch(step, direction, last + 1)?;
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
                        if status == crate::SagaStatus::Stuck && at as usize == i =>
                    {
                        self.emit(Event::Resolved {
                            request,
                            step: at,
                            reason: reason.clone(),
                        })?;
                        self.compensate_below(at)?;
                        return Ok(Verdict::Applied);
                    }
                    (Some(_), Some((at, direction))) if status == crate::SagaStatus::Stuck => {
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
                    let held = self.state.held;
                    self.emit(Event::Resumed { request })?;
                    if let Some(h) = held {
                        self.dispatch(h.step, h.direction, h.attempt)?;
                    }
                    return Ok(Verdict::Applied);
                }
            }
        };
        self.emit(event)?;
        Ok(Verdict::Applied)
    }

    /// Why the saga can no longer be stopped, if its pivot has started.
    fn past_pivot(&self) -> Option<String> {
        let pivot = self.definition.pivot()?;
        (self.state.progress[pivot] != StepProgress::Pending).then(|| {
            format!(
                "the saga has passed its pivot step `{}`",
                self.definition.steps()[pivot].name
            )
        })
    }

    /// After a cancel or a deadline: compensate now, unless a command is in flight (its result,
    /// or its timeout, comes first).
    fn stop_if_idle(&mut self) -> Result<(), ReplayError> {
        let Some(c) = self.state.current else {
            return Ok(());
        };
        if c.command_id.is_some() {
            return Ok(());
        }
        let timer = if c.waiting {
            match self.definition.steps()[c.step as usize].work {
                Work::Delay(_) => Timer::Delay { step: c.step },
                _ => Timer::Timeout {
                    step: c.step,
                    direction: c.direction,
                    attempt: c.attempt,
                },
            }
        } else {
            Timer::Retry {
                step: c.step,
                direction: c.direction,
                attempt: c.attempt,
            }
        };
        self.effects.push(Effect::CancelTimer(timer));
        self.stop_at(c.step)
    }

    fn stop_at(&mut self, step: u32) -> Result<(), ReplayError> {
        let reason = self
            .state
            .stop
            .as_ref()
            .map(|s| s.reason.clone())
            .unwrap_or_default();
        self.emit(Event::CompensationStarted { step, reason })?;
        self.compensate_below(step + 1)
    }

    fn timeout_of(&self, step: u32) -> Option<std::time::Duration> {
        self.definition.steps()[step as usize].timeout
    }

    fn dispatch(
        &mut self,
        step: u32,
        direction: Direction,
        attempt: u32,
    ) -> Result<(), ReplayError> {
        let def = &self.definition.steps()[step as usize];
        let action = match (direction, &def.work) {
            (Direction::Forward, Work::Command(action)) => action,
            (Direction::Forward, Work::Signal(wait)) => {
                let name = wait.name.clone();
                let until = def.timeout.map(|t| self.env.now + t);
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
                let due_at = self.env.now + *delay;
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
        };
        if self.state.paused {
            return self.emit(Event::Held {
                step,
                direction,
                attempt,
            });
        }
        let ctx = RawContext {
            definition: self.definition,
            input: &self.state.input,
            outputs: &self.state.outputs,
        };
        let payload = match action.build_input(&ctx) {
            Ok(payload) => payload,
            Err(e) => {
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
            idempotency_key: Command::idempotency_key_for(self.env.saga_id, step, direction),
            timeout_ms: def.timeout.map(|t| t.as_millis() as u64),
            payload: payload.clone(),
        };
        self.emit(Event::Dispatched {
            step,
            direction,
            attempt,
            command_id,
            payload,
        })?;
        if let Some(timeout) = def.timeout {
            self.effects.push(Effect::SetTimer {
                timer: Timer::Timeout {
                    step,
                    direction,
                    attempt,
                },
                due_at: self.env.now + timeout,
            });
        }
        self.effects.push(Effect::Dispatch(command));
        Ok(())
    }

    /// A wait step takes a signal: its payload is the output, unless the step refuses it.
    fn take_signal(&mut self, step: u32, payload: Value) -> Result<(), ReplayError> {
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
        match (wait.check)(&payload) {
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

    fn after_success(&mut self, step: u32, direction: Direction) -> Result<(), ReplayError> {
        match direction {
            // A cancel or a deadline waited for this step: undo it too.
            Direction::Forward if self.state.stop.is_some() => self.stop_at(step),
            Direction::Forward if (step as usize) + 1 < self.definition.steps().len() => {
                self.dispatch(step + 1, Direction::Forward, 1)
            }
            Direction::Forward => self.emit(Event::Completed),
            Direction::Compensation => self.compensate_below(step),
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
    ) -> Result<(), ReplayError> {
        let def = &self.definition.steps()[step as usize];
        let (policy, unbounded) = match direction {
            Direction::Forward => (&def.retry, def.kind == StepKind::Retriable),
            Direction::Compensation => (&def.compensation_retry, false),
        };
        let stopping = direction == Direction::Forward && self.state.stop.is_some();
        if retryable && !stopping && (unbounded || attempt < policy.max_attempts) {
            let delay = policy.delay(attempt, unit_draw(command_id));
            let due_at = self.env.now + delay;
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
            return self.stop_at(step);
        }
        let reason = if retryable {
            format!(
                "step `{}` {direction} failed after {attempt} attempts: {error}",
                def.name
            )
        } else {
            format!("step `{}` {direction} failed: {error}", def.name)
        };
        self.failed_for_good(step, direction, reason)
    }

    fn failed_for_good(
        &mut self,
        step: u32,
        direction: Direction,
        reason: String,
    ) -> Result<(), ReplayError> {
        let kind = self.definition.steps()[step as usize].kind;
        if direction == Direction::Compensation || kind == StepKind::Retriable {
            return self.emit(Event::Stuck {
                step,
                direction,
                reason,
            });
        }
        self.emit(Event::CompensationStarted { step, reason })?;
        // A step whose last attempt timed out may have been applied: it is compensated too.
        self.compensate_below(step + 1)
    }

    /// Dispatches the compensation of the highest step below `bound` that needs undoing.
    fn compensate_below(&mut self, bound: u32) -> Result<(), ReplayError> {
        let next = (0..bound).rev().find(|&j| {
            let i = j as usize;
            matches!(
                self.state.progress[i],
                StepProgress::Succeeded | StepProgress::PossiblyApplied
            ) && !self.state.compensated[i]
                && self.definition.steps()[i].compensation.is_some()
        });
        match next {
            Some(j) => self.dispatch(j, Direction::Compensation, 1),
            None if self.state.stop.as_ref().is_some_and(|s| s.cancelled) => {
                self.emit(Event::Cancelled)
            }
            None => self.emit(Event::Compensated),
        }
    }
}

/// A number in `0.0..1.0` drawn from a command id's random bits.
fn unit_draw(id: Uuid) -> f64 {
    let bits = u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}
