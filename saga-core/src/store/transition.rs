//! The part of applying an input that both stores share: decide, then collect the rows to write.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::codec::Payloads;
use crate::decide::{Effect, Env, Input, Timer, Verdict, decide};
use crate::definition::Definition;
use crate::error::Result;
use crate::event::Event;
use crate::message::Envelope;
use crate::state::{SagaState, SagaStatus};

/// Rows that one transaction will write.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    pub(crate) events: Vec<EventRow>,
    pub(crate) outbox: Vec<(Uuid, Envelope)>,
    pub(crate) timers_set: Vec<TimerRow>,
    pub(crate) timers_cancelled: Vec<(Uuid, String)>,
    pub(crate) instances: HashMap<Uuid, InstanceUpdate>,
}

#[derive(Debug)]
pub(crate) struct EventRow {
    pub(crate) saga_id: Uuid,
    pub(crate) seq: i64,
    pub(crate) event: Event,
    pub(crate) at: DateTime<Utc>,
}

#[derive(Debug)]
pub(crate) struct TimerRow {
    pub(crate) saga_id: Uuid,
    pub(crate) timer: Timer,
    pub(crate) due_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub(crate) struct InstanceUpdate {
    pub(crate) status: SagaStatus,
    pub(crate) last_seq: i64,
    pub(crate) reason: Option<String>,
}

/// What one input decided, with the positions of its outbox rows in [`Writes::outbox`].
#[derive(Debug)]
pub(crate) struct Decided {
    pub(crate) verdict: Verdict,
    pub(crate) status: SagaStatus,
    pub(crate) settled: bool,
    pub(crate) reason: Option<String>,
    pub(crate) saga: String,
    pub(crate) retries: u32,
    pub(crate) outbox: Vec<usize>,
    pub(crate) wake_at: Option<DateTime<Utc>>,
}

/// A saga loaded (and locked) for the current transaction.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) state: SagaState,
    pub(crate) last_seq: i64,
}

/// Decides `input` for a loaded saga, updates it, and queues the rows to write, their
/// payloads sealed by `payloads` (the state keeps them open).
pub(crate) fn apply_input(
    definition: &Definition,
    saga_id: Uuid,
    loaded: &mut Loaded,
    input: &Input,
    now: DateTime<Utc>,
    writes: &mut Writes,
    payloads: &Payloads,
) -> Result<Decided> {
    let mut new_id = Uuid::new_v4;
    let mut env = Env {
        saga_id,
        now,
        new_id: &mut new_id,
    };
    let decision = decide(definition, &loaded.state, input, &mut env)?;
    let settled = loaded.state.status.is_active() && !decision.state.status.is_active();
    let mut decided = Decided {
        verdict: decision.verdict,
        status: decision.state.status,
        settled,
        reason: settled
            .then(|| SagaStatus::reason(&decision.state))
            .flatten(),
        saga: definition.name().to_owned(),
        retries: decision
            .events
            .iter()
            .filter(|e| matches!(e, Event::RetryScheduled { .. }))
            .count() as u32,
        outbox: Vec::new(),
        wake_at: None,
    };
    if decision.events.is_empty() {
        return Ok(decided);
    }
    for mut event in decision.events {
        payloads.seal_in(&mut event)?;
        loaded.last_seq += 1;
        writes.events.push(EventRow {
            saga_id,
            seq: loaded.last_seq,
            event,
            at: now,
        });
    }
    for effect in decision.effects {
        match effect {
            Effect::Dispatch(mut command) => {
                payloads.seal_in(&mut command)?;
                decided.outbox.push(writes.outbox.len());
                writes.outbox.push((saga_id, command.to_envelope()));
            }
            Effect::SetTimer { mut timer, due_at } => {
                payloads.seal_in(&mut timer)?;
                decided.wake_at = Some(decided.wake_at.map_or(due_at, |w| w.min(due_at)));
                writes.timers_set.push(TimerRow {
                    saga_id,
                    timer,
                    due_at,
                });
            }
            Effect::CancelTimer(timer) => {
                let key = timer.key();
                // A timer set earlier in the same batch is simply not written.
                writes
                    .timers_set
                    .retain(|t| !(t.saga_id == saga_id && t.timer.key() == key));
                writes.timers_cancelled.push((saga_id, key));
            }
        }
    }
    loaded.state = decision.state;
    writes.instances.insert(
        saga_id,
        InstanceUpdate {
            status: loaded.state.status,
            last_seq: loaded.last_seq,
            reason: SagaStatus::reason(&loaded.state),
        },
    );
    Ok(decided)
}

/// What each input did, once its rows are written: `record(i)` gives the written outbox row
/// at position `i` of [`Writes::outbox`].
pub(crate) fn report(
    decided: Vec<(Uuid, std::result::Result<Decided, Verdict>)>,
    mut record: impl FnMut(usize) -> crate::store::OutboxRecord,
) -> Vec<crate::store::Applied> {
    decided
        .into_iter()
        .map(|(saga_id, d)| match d {
            Err(verdict) => crate::store::Applied {
                saga_id,
                verdict,
                outbox: Vec::new(),
                wake_at: None,
                status: None,
                settled: false,
                reason: None,
                saga: None,
                retries: 0,
            },
            Ok(d) => crate::store::Applied {
                saga_id,
                verdict: d.verdict,
                outbox: d.outbox.into_iter().map(&mut record).collect(),
                wake_at: d.wake_at,
                status: Some(d.status),
                settled: d.settled,
                reason: d.reason,
                saga: Some(d.saga),
                retries: d.retries,
            },
        })
        .collect()
}
