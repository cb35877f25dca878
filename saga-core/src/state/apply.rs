//! How each event changes a saga's state.

use super::{Current, Fencing, ReceivedSignal, ReplayError, SagaState, SagaStatus, SentCommand};
use super::{StepProgress, Stop};
use crate::definition::{Definition, Work};
use crate::event::{Direction, Event};

impl SagaState {
    /// Applies one more event. Replaying a prefix and then the rest equals replaying the whole.
    pub fn apply(&mut self, definition: &Definition, event: &Event) -> Result<(), ReplayError> {
        // A refused request is recorded even after the end: it changes nothing.
        let audit_only = matches!(
            event,
            Event::ActionRefused { .. } | Event::CancelRefused { .. }
        );
        if self.status.is_terminal() && !audit_only {
            return Err(ReplayError::new(
                definition,
                ReplayError::AFTER_END,
                format!("`{}` after the saga ended {}", event.kind(), self.status),
            ));
        }
        match event {
            Event::Started { .. } => {
                return Err(ReplayError::new(
                    definition,
                    ReplayError::BAD_START,
                    "a second `started` event".into(),
                ));
            }
            Event::Dispatched {
                step,
                direction,
                attempt,
                command_id,
                ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current = Some(Current {
                    step: *step,
                    direction: *direction,
                    attempt: *attempt,
                    command_id: Some(*command_id),
                    waiting: false,
                });
                self.sent.insert(
                    *command_id,
                    SentCommand {
                        step: *step,
                        direction: *direction,
                        attempt: *attempt,
                    },
                );
                self.last_terminal = None;
                if *direction == Direction::Forward {
                    self.progress[i] = StepProgress::InFlight;
                }
            }
            Event::Succeeded {
                step,
                direction,
                output,
                ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.revive();
                self.settled(*step);
                match direction {
                    // A fence that found the action applied, or a late success of it.
                    Direction::Forward | Direction::Fence => {
                        self.progress[i] = StepProgress::Succeeded;
                        self.outputs[i] = Some(output.clone());
                        self.consume_signal(definition, i);
                        self.end_fence(*step);
                    }
                    Direction::Compensation => self.compensated[i] = true,
                }
            }
            Event::Failed {
                step,
                direction,
                retryable,
                ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current = None;
                match (direction, retryable) {
                    // Another delivery may still apply it: the outcome is unknown.
                    (Direction::Forward, true) => self.doubt[i] = true,
                    (Direction::Forward, false) => {
                        self.progress[i] = StepProgress::Failed;
                        // A refused signal is used up.
                        self.consume_signal(definition, i);
                    }
                    // The service cannot fence: the step counts as applied.
                    (Direction::Fence, false) => {
                        self.progress[i] = StepProgress::PossiblyApplied;
                        self.end_fence(*step);
                    }
                    (Direction::Fence, true) | (Direction::Compensation, _) => {}
                }
                if !retryable && *direction != Direction::Fence {
                    self.last_terminal = Some((*step, *direction));
                }
            }
            Event::TimedOut {
                step, direction, ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current = None;
                if *direction == Direction::Forward {
                    // A command that timed out may yet apply; a wait has no effect.
                    match definition.steps()[i].work {
                        Work::Command(_) => self.doubt[i] = true,
                        _ => self.progress[i] = StepProgress::Failed,
                    }
                }
            }
            Event::FenceStarted { step, reason } => {
                let i = self.check_step(definition, *step, Direction::Fence)?;
                self.revive();
                self.fencing = Some(Fencing {
                    step: *step,
                    name: definition.steps()[i].name.clone(),
                    reason: reason.clone(),
                });
            }
            Event::Fenced { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Fence)?;
                self.revive();
                self.settled(*step);
                self.progress[i] = StepProgress::Failed;
                self.end_fence(*step);
            }
            Event::Waiting { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Forward)?;
                self.current = Some(Current {
                    step: *step,
                    direction: Direction::Forward,
                    attempt: 1,
                    command_id: None,
                    waiting: true,
                });
                self.progress[i] = StepProgress::InFlight;
            }
            Event::SignalReceived { name, payload } => self.signals.push(ReceivedSignal {
                name: name.clone(),
                payload: payload.clone(),
                consumed: false,
            }),
            Event::CancelRequested { reason, .. } => {
                self.stop = Some(Stop {
                    reason: format!("cancelled: {reason}"),
                    cancelled: true,
                });
            }
            Event::CancelRefused { .. } => {}
            Event::DeadlineExceeded => {
                let deadline = definition.deadline().unwrap_or_default();
                self.stop = Some(Stop {
                    reason: format!("the saga's deadline of {deadline:?} passed"),
                    cancelled: false,
                });
            }
            Event::Cancelled => self.finish(SagaStatus::Cancelled),
            Event::RetryRequested {
                step,
                direction,
                fresh_key,
                ..
            } => {
                self.check_step(definition, *step, *direction)?;
                self.revive();
                // Patience starts again.
                self.retrying = None;
                if *fresh_key {
                    *self.generations.entry((*step, *direction)).or_default() += 1;
                }
            }
            Event::Resolved { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Compensation)?;
                self.compensated[i] = true;
                self.status = SagaStatus::Compensating;
                self.stuck_reason = None;
                self.stuck_at = None;
            }
            Event::Paused { .. } => self.paused = true,
            Event::Resumed { .. } => {
                self.paused = false;
                self.held = None;
            }
            Event::Held {
                step,
                direction,
                attempt,
            } => {
                self.check_step(definition, *step, *direction)?;
                let held = Current {
                    step: *step,
                    direction: *direction,
                    attempt: *attempt,
                    command_id: None,
                    waiting: false,
                };
                self.held = Some(held);
                self.current = Some(held);
            }
            Event::ActionRefused { .. } => {}
            Event::RetryScheduled {
                step,
                direction,
                attempt,
                delay_ms,
                due_at,
            } => {
                self.check_step(definition, *step, *direction)?;
                self.current = Some(Current {
                    step: *step,
                    direction: *direction,
                    attempt: *attempt,
                    command_id: None,
                    waiting: false,
                });
                if !matches!(self.retrying, Some((s, d, _)) if (s, d) == (*step, *direction)) {
                    let failed_at = *due_at - chrono::Duration::milliseconds(*delay_ms as i64);
                    self.retrying = Some((*step, *direction, failed_at));
                }
            }
            Event::CompensationStarted { step, reason } => {
                self.check_step(definition, *step, Direction::Forward)?;
                self.status = SagaStatus::Compensating;
                self.failure = Some((*step, reason.clone()));
            }
            Event::Completed => self.finish(SagaStatus::Completed),
            Event::Compensated => self.finish(SagaStatus::Compensated),
            Event::Stuck {
                step,
                direction,
                reason,
            } => {
                self.check_step(definition, *step, *direction)?;
                self.finish(SagaStatus::Stuck);
                self.stuck_reason = Some(reason.clone());
                self.stuck_at = Some((*step, *direction));
            }
        }
        self.events += 1;
        Ok(())
    }

    /// A stuck saga that an answer (or an operator) moves on is active again.
    fn revive(&mut self) {
        if self.status == SagaStatus::Stuck {
            self.status = if self.failure.is_some() || self.stop.is_some() {
                SagaStatus::Compensating
            } else {
                SagaStatus::Running
            };
            self.stuck_reason = None;
            self.stuck_at = None;
        }
    }

    /// The saga's work on `step` has its answer: nothing is outstanding or held for it.
    fn settled(&mut self, step: u32) {
        self.current = None;
        if self.held.is_some_and(|h| h.step == step) {
            self.held = None;
        }
    }

    /// The fence of `step`, if one runs, has its answer.
    fn end_fence(&mut self, step: u32) {
        if self.fencing.as_ref().is_some_and(|f| f.step == step) {
            self.fencing = None;
        }
    }

    /// Marks the oldest unused signal that step `i` waits for as used.
    fn consume_signal(&mut self, definition: &Definition, i: usize) {
        if let Work::Signal(wait) = &definition.steps()[i].work
            && let Some(signal) = self
                .signals
                .iter_mut()
                .find(|s| !s.consumed && s.name == wait.name)
        {
            signal.consumed = true;
        }
    }

    fn finish(&mut self, status: SagaStatus) {
        self.status = status;
        self.current = None;
    }

    fn check_step(
        &self,
        definition: &Definition,
        step: u32,
        direction: Direction,
    ) -> Result<usize, ReplayError> {
        let i = step as usize;
        let Some(def) = definition.steps().get(i) else {
            return Err(ReplayError::new(
                definition,
                ReplayError::UNKNOWN_STEP,
                format!(
                    "the log names step #{step}, the definition has {}",
                    definition.steps().len()
                ),
            ));
        };
        let missing = match direction {
            Direction::Forward => None,
            Direction::Compensation => def.compensation.is_none().then_some("no compensation"),
            Direction::Fence => def.action().is_none().then_some("no action to fence"),
        };
        if let Some(missing) = missing {
            return Err(ReplayError::new(
                definition,
                ReplayError::UNKNOWN_STEP,
                format!(
                    "the log {} step `{}`, which has {missing}",
                    match direction {
                        Direction::Fence => "fences",
                        _ => "compensates",
                    },
                    def.name
                ),
            ));
        }
        Ok(i)
    }
}
