//! A transaction's rows as columns: one array per column, bound to `UNNEST` in one statement.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::decide::Timer;
use crate::event::Event;
use crate::store::transition::Writes;

/// The rows of [`Writes`], column by column, in the order of its lists.
#[derive(Default)]
pub(super) struct Columns {
    pub(super) event_sagas: Vec<Uuid>,
    pub(super) seqs: Vec<i64>,
    pub(super) kinds: Vec<&'static str>,
    pub(super) data: Vec<Json<Event>>,
    pub(super) cancelled_sagas: Vec<Uuid>,
    pub(super) cancelled_keys: Vec<String>,
    pub(super) timer_sagas: Vec<Uuid>,
    pub(super) keys: Vec<String>,
    pub(super) timers: Vec<Json<Timer>>,
    pub(super) due_ats: Vec<DateTime<Utc>>,
    pub(super) instances: Vec<Uuid>,
    pub(super) statuses: Vec<&'static str>,
    pub(super) last_seqs: Vec<i64>,
    pub(super) reasons: Vec<Option<String>>,
    pub(super) outbox_sagas: Vec<Uuid>,
    pub(super) destinations: Vec<String>,
    pub(super) message_ids: Vec<Uuid>,
    pub(super) headers: Vec<Json<BTreeMap<String, String>>>,
    pub(super) bodies: Vec<Vec<u8>>,
}

impl From<Writes> for Columns {
    fn from(writes: Writes) -> Self {
        let mut c = Columns::default();
        for row in writes.events {
            c.event_sagas.push(row.saga_id);
            c.seqs.push(row.seq);
            c.kinds.push(row.event.kind());
            c.data.push(Json(row.event));
        }
        for row in writes.timers_set {
            c.timer_sagas.push(row.saga_id);
            c.keys.push(row.timer.key());
            c.timers.push(Json(row.timer));
            c.due_ats.push(row.due_at);
        }
        // A timer cancelled and set again in one batch is replaced by the upsert; one statement
        // must not touch a row twice.
        let set: HashSet<(&Uuid, &String)> = c.timer_sagas.iter().zip(&c.keys).collect();
        let (sagas, keys) = writes
            .timers_cancelled
            .into_iter()
            .filter(|(saga, key)| !set.contains(&(saga, key)))
            .unzip();
        (c.cancelled_sagas, c.cancelled_keys) = (sagas, keys);
        for (id, update) in writes.instances {
            c.instances.push(id);
            c.statuses.push(update.status.as_str());
            c.last_seqs.push(update.last_seq);
            c.reasons.push(update.reason);
        }
        for (saga_id, envelope) in writes.outbox {
            c.outbox_sagas.push(saga_id);
            c.destinations.push(envelope.destination.encode());
            c.message_ids.push(envelope.message.id);
            c.headers.push(Json(envelope.message.headers));
            c.bodies.push(envelope.message.body);
        }
        c
    }
}
