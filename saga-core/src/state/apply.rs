//! How each event changes a saga's state.

use super::{Current, Fencing, ReceivedSignal, ReplayError, SagaState, SagaStatus, SentCommand};
use super::{StepProgress, Stop};
use crate::definition::{Definition, Work};
use crate::event::{Direction, Event, FenceThen, StepAttempt};

impl SagaState {
    /// Applies one more event. Replaying a prefix and then the rest equals replaying the whole.
    pub(crate) fn apply(
        &mut self,
        definition: &Definition,
        event: &Event,
    ) -> Result<(), ReplayError> {
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
                self.current.insert(
                    *step,
                    Current {
                        at: StepAttempt::new(*step, *direction, *attempt),
                        command_id: Some(*command_id),
                        waiting: false,
                    },
                );
                let keyed = match direction {
                    Direction::Fence => self.fence_target(*step),
                    other => *other,
                };
                let generation = self.generation(*step, keyed);
                self.sent.insert(
                    *command_id,
                    SentCommand {
                        at: StepAttempt::new(*step, *direction, *attempt),
                        generation,
                    },
                );
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
                self.revive(*step);
                self.settled(*step);
                // A fence found its command applied: the action's or the compensation's.
                let done = match direction {
                    Direction::Fence => self.fence_target(*step),
                    other => *other,
                };
                match done {
                    Direction::Compensation => self.compensated[i] = true,
                    _ => {
                        self.progress[i] = StepProgress::Succeeded;
                        self.outputs[i] = Some(output.clone());
                        self.consume_signal(definition, i);
                    }
                }
                self.end_fence(*step, done);
            }
            Event::Failed {
                step,
                direction,
                retryable,
                ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current.remove(step);
                match (direction, retryable) {
                    // Another delivery may still apply it: the outcome is unknown.
                    (Direction::Forward, true) => self.doubt[i] = true,
                    (Direction::Forward, false) => {
                        self.progress[i] = StepProgress::Failed;
                        // A refused signal is used up.
                        self.consume_signal(definition, i);
                    }
                    // The service cannot fence: a forward step given up on counts as applied.
                    (Direction::Fence, false) => {
                        self.revive(*step);
                        if self.fence_target(*step) == Direction::Forward {
                            self.progress[i] = StepProgress::PossiblyApplied;
                        }
                        self.settled(*step);
                        let target = self.fence_target(*step);
                        self.end_fence(*step, target);
                    }
                    (Direction::Fence, true) | (Direction::Compensation, _) => {}
                }
            }
            Event::TimedOut {
                step, direction, ..
            } => {
                let i = self.check_step(definition, *step, *direction)?;
                self.current.remove(step);
                if *direction == Direction::Forward {
                    // A command that timed out may yet apply; a wait has no effect.
                    match definition.steps()[i].work {
                        Work::Command(_) => self.doubt[i] = true,
                        _ => self.progress[i] = StepProgress::Failed,
                    }
                }
            }
            Event::FenceStarted {
                step,
                reason,
                target,
                then,
            } => {
                let target = match target {
                    Direction::Compensation => Direction::Compensation,
                    _ => Direction::Forward,
                };
                let check = match target {
                    Direction::Compensation => Direction::Compensation,
                    _ => Direction::Fence,
                };
                let i = self.check_step(definition, *step, check)?;
                self.revive(*step);
                // A fence's retry policy counts this fence's attempts, from now.
                self.restart_retries(*step, Direction::Fence);
                self.fencing.insert(
                    *step,
                    Fencing {
                        step: *step,
                        name: definition.steps()[i].name.clone(),
                        reason: reason.clone(),
                        target,
                        then: *then,
                    },
                );
            }
            Event::Fenced { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Fence)?;
                self.revive(*step);
                self.settled(*step);
                let target = self.fence_target(*step);
                if target == Direction::Forward {
                    self.progress[i] = StepProgress::Failed;
                }
                // An operator's retry runs under a fresh key: the old one holds the tombstone.
                if self
                    .fencing_of(*step)
                    .is_some_and(|f| f.then == FenceThen::Retry)
                {
                    *self.generations.entry((*step, target)).or_default() += 1;
                }
                self.end_fence(*step, target);
            }
            Event::Skipped { step } => {
                let i = self.check_step(definition, *step, Direction::Forward)?;
                self.progress[i] = StepProgress::Skipped;
                // A group member held by a pause and never sent, withdrawn.
                self.current.remove(step);
                self.held.remove(step);
            }
            Event::Waiting { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Forward)?;
                self.current.insert(
                    *step,
                    Current {
                        at: StepAttempt::new(*step, Direction::Forward, 1),
                        command_id: None,
                        waiting: true,
                    },
                );
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
                step, direction, ..
            } => {
                self.check_step(definition, *step, *direction)?;
                self.revive(*step);
                self.restart_retries(*step, *direction);
            }
            Event::Resolved { step, .. } => {
                let i = self.check_step(definition, *step, Direction::Compensation)?;
                self.compensated[i] = true;
                self.status = SagaStatus::Compensating;
                self.stuck_reason = None;
                self.stuck.clear();
            }
            Event::Paused { .. } => self.paused = true,
            Event::Resumed { .. } => {
                self.paused = false;
                self.held.clear();
            }
            Event::Held {
                step,
                direction,
                attempt,
            } => {
                self.check_step(definition, *step, *direction)?;
                let held = Current {
                    at: StepAttempt::new(*step, *direction, *attempt),
                    command_id: None,
                    waiting: false,
                };
                self.held.insert(*step, held);
                self.current.insert(*step, held);
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
                self.current.insert(
                    *step,
                    Current {
                        at: StepAttempt::new(*step, *direction, *attempt),
                        command_id: None,
                        waiting: false,
                    },
                );
                let failed_at = *due_at - chrono::Duration::milliseconds(*delay_ms as i64);
                self.retrying
                    .entry((*step, *direction))
                    .or_insert(failed_at);
            }
            Event::CompensationStarted { step, reason } => {
                self.check_step(definition, *step, Direction::Forward)?;
                // A group member stuck meanwhile keeps the saga stuck until it is answered.
                if self.status != SagaStatus::Stuck {
                    self.status = SagaStatus::Compensating;
                }
                self.failure = Some((*step, reason.clone()));
                // The step given up on is no longer worked on (a backoff, a held command).
                self.current.remove(step);
                self.held.remove(step);
            }
            Event::Completed => self.finish(SagaStatus::Completed),
            Event::Compensated => self.finish(SagaStatus::Compensated),
            Event::Stuck {
                step,
                direction,
                reason,
            } => {
                self.check_step(definition, *step, *direction)?;
                self.status = SagaStatus::Stuck;
                // Only the step's own work stops while a group is under way: the other
                // members still settle.
                let in_group = |s: u32| definition.group_of(s as usize).is_some();
                match in_group(*step) || self.current.keys().any(|s| in_group(*s)) {
                    true => _ = self.current.remove(step),
                    false => {
                        self.current.clear();
                        self.stuck.clear();
                    }
                }
                self.stuck_reason = Some(reason.clone());
                self.stuck.insert(*step, (*direction, reason.clone()));
            }
        }
        self.events += 1;
        Ok(())
    }

    /// The retry policy of `step` in `direction` starts again: it counts the attempts from
    /// now, and its patience from the next failure.
    fn restart_retries(&mut self, step: u32, direction: Direction) {
        self.retrying.remove(&(step, direction));
        let sent = self.last_attempt(step, direction);
        self.attempts_before_retry.insert((step, direction), sent);
    }

    /// A stuck saga that an answer about the step it is stuck at (or an operator) moves on
    /// is active again.
    fn revive(&mut self, step: u32) {
        if self.status == SagaStatus::Stuck && self.stuck.remove(&step).is_some() {
            if let Some((_, why)) = self.stuck.values().next() {
                // Another member of its group is still stuck.
                self.stuck_reason = Some(why.clone());
                return;
            }
            self.status = if self.failure.is_some() || self.stop.is_some() {
                SagaStatus::Compensating
            } else {
                SagaStatus::Running
            };
            self.stuck_reason = None;
        }
    }

    /// The saga's work on `step` has its answer: nothing is outstanding or held for it.
    fn settled(&mut self, step: u32) {
        self.current.remove(&step);
        self.held.remove(&step);
    }

    /// The command a fence of `step` targets (the action, unless the fence running says the
    /// compensation).
    pub(crate) fn fence_target(&self, step: u32) -> Direction {
        self.fencing_of(step)
            .map_or(Direction::Forward, |f| f.target)
    }

    /// The fence of `step`'s `target` command, if one runs, has its answer.
    fn end_fence(&mut self, step: u32, target: Direction) {
        if self.fencing_of(step).is_some_and(|f| f.target == target) {
            self.fencing.remove(&step);
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
        self.current.clear();
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
