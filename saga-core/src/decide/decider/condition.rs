//! Conditional steps: asked when the saga reaches them, until their first command is sent.

use super::{Decider, Step, catch};
use crate::definition::RawContext;
use crate::event::{Direction, Event};
use crate::state::StepProgress;

impl Decider<'_, '_> {
    /// Asks `step`'s condition, if it has one and the saga reaches it for the first time.
    /// `true`: the step was skipped (and the saga moved on), or the condition failed and the
    /// saga parked; either way the step is not dispatched.
    pub(super) fn skipped_or_parked(
        &mut self,
        step: u32,
    ) -> Result<bool, crate::state::ReplayError> {
        let def = &self.definition.steps()[step as usize];
        let Some(condition) = &def.condition else {
            return Ok(false);
        };
        if self.state.progress[step as usize] != StepProgress::Pending {
            return Ok(false);
        }
        let outputs = self.outputs_for(step, Direction::Forward);
        let ctx = RawContext {
            definition: self.definition,
            input: &self.state.input,
            outputs: &outputs,
        };
        let done: Step = match catch(|| (condition.0)(&ctx)) {
            Ok(Ok(true)) => return Ok(false),
            Ok(Ok(false)) => self
                .emit(Event::Skipped { step })
                .and_then(|()| self.after_success(step, Direction::Forward)),
            Ok(Err(e)) => {
                let why = format!("its condition cannot be evaluated: {e}");
                self.park(step, Direction::Forward, why)
            }
            Err(panic) => {
                let why = format!("its condition panicked: {panic}");
                self.park(step, Direction::Forward, why)
            }
        };
        done.map(|()| true)
    }
}
