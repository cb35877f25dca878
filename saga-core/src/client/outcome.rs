//! How a saga ended: [`SagaOutcome`], as [`Client::outcome`](crate::Client::outcome) awaits it.

use std::collections::{BTreeMap, HashMap};

use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use crate::error::Result;
use crate::event::{Direction, Event, RecordedEvent};
use crate::state::SagaStatus;

/// How a saga ended, or that it waits for an operator, with the outputs of its steps.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SagaOutcome {
    /// The saga.
    pub saga_id: Uuid,
    /// `completed`, `compensated` or `cancelled`; or `stuck`, waiting for an operator (a
    /// late answer or an operator's action may still move it on).
    pub status: SagaStatus,
    /// Why it compensated, was cancelled, or is stuck.
    pub reason: Option<String>,
    /// The steps that succeeded, by name, with their outputs, in step order.
    outputs: Vec<(String, Value)>,
}

impl SagaOutcome {
    /// Whether every step succeeded.
    pub fn is_completed(&self) -> bool {
        self.status == SagaStatus::Completed
    }

    /// The output of the step named `step`, as a `T`: its action's (a compensated step keeps
    /// the output its action had), a wait step's signal payload, a delay step's `null`;
    /// `None` if the step did not succeed. Fails with
    /// [`Error::Serialization`](crate::Error::Serialization) if the output is not a `T`, and
    /// with [`Error::Payload`](crate::Error::Payload) if it is encrypted under a key the
    /// client's store does not hold. Logs
    /// written before step names were recorded name their steps `#0`, `#1`, ...
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<Option<T>> {
        match self.outputs.iter().find(|(name, _)| name == step) {
            Some((_, output)) => {
                if let Some(key) = crate::codec::Payloads::sealed_key(output) {
                    // The store that read the log does not hold the key.
                    return Err(crate::codec::CodecError::UnknownKey {
                        key: key.to_owned(),
                    }
                    .into());
                }
                Ok(Some(T::deserialize(output)?))
            }
            None => Ok(None),
        }
    }

    /// The steps that succeeded, and their outputs as JSON, in step order.
    pub fn outputs(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.outputs
            .iter()
            .map(|(name, output)| (name.as_str(), output))
    }

    /// The outcome a settled saga's log records.
    pub(crate) fn from_log(
        saga_id: Uuid,
        status: SagaStatus,
        reason: Option<String>,
        history: &[RecordedEvent],
    ) -> Self {
        let mut names = Vec::new();
        let mut fenced: HashMap<u32, Direction> = HashMap::new();
        let mut outputs: BTreeMap<u32, Value> = BTreeMap::new();
        for record in history {
            match &record.event {
                Event::Started { steps, .. } => names.clone_from(steps),
                Event::FenceStarted { step, target, .. } => {
                    // As replay reads it: a fence targets the compensation or the action.
                    let target = match target {
                        Direction::Compensation => Direction::Compensation,
                        _ => Direction::Forward,
                    };
                    fenced.insert(*step, target);
                }
                Event::Succeeded {
                    step,
                    direction,
                    output,
                    ..
                } => {
                    // A fence that found its command applied answers with that command's
                    // output: the action's, unless it fenced the compensation.
                    let done = match direction {
                        Direction::Fence => fenced.get(step).copied().unwrap_or_default(),
                        other => *other,
                    };
                    if done == Direction::Forward {
                        outputs.insert(*step, output.clone());
                    }
                }
                _ => {}
            }
        }
        let name = |step: u32| {
            names
                .get(step as usize)
                .cloned()
                .unwrap_or_else(|| format!("#{step}"))
        };
        Self {
            saga_id,
            status,
            reason,
            outputs: outputs
                .into_iter()
                .map(|(step, output)| (name(step), output))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;

    use super::*;

    fn recorded(events: Vec<Event>) -> Vec<RecordedEvent> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, event)| RecordedEvent {
                seq: i as i64 + 1,
                at: Utc::now(),
                event,
            })
            .collect()
    }

    fn succeeded(step: u32, direction: Direction, output: Value) -> Event {
        Event::Succeeded {
            step,
            direction,
            attempt: 1,
            output,
        }
    }

    #[test]
    fn outputs_are_the_actions_by_step_name_including_a_fence_that_found_one_applied() {
        let history = recorded(vec![
            Event::Started {
                saga: "order".into(),
                version: 1,
                input: json!(1),
                business_key: None,
                steps: vec!["reserve".into(), "charge".into(), "ship".into()],
                groups: Vec::new(),
            },
            succeeded(0, Direction::Forward, json!("r-1")),
            Event::FenceStarted {
                step: 1,
                reason: "timed out".into(),
                target: Direction::Forward,
                then: Default::default(),
            },
            succeeded(1, Direction::Fence, json!({ "charge_id": "c-1" })),
            succeeded(0, Direction::Compensation, json!(null)),
        ]);
        let outcome = SagaOutcome::from_log(
            Uuid::nil(),
            SagaStatus::Compensated,
            Some("ship failed".into()),
            &history,
        );
        assert_eq!(
            outcome.output::<String>("reserve").unwrap().as_deref(),
            Some("r-1")
        );
        assert_eq!(
            outcome.output::<Value>("charge").unwrap(),
            Some(json!({ "charge_id": "c-1" }))
        );
        assert_eq!(outcome.output::<Value>("ship").unwrap(), None);
        assert!(outcome.output::<u32>("reserve").is_err(), "not a number");
        let names: Vec<&str> = outcome.outputs().map(|(name, _)| name).collect();
        assert_eq!(names, ["reserve", "charge"]);
        assert!(!outcome.is_completed());
    }
}
