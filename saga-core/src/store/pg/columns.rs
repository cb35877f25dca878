//! A transaction's rows as columns: one array per column, bound to `UNNEST` in one statement.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::decide::Timer;
use crate::event::Event;
use crate::store::transition::Writes;

/// The rows of one or more [`Writes`], column by column, in the order of their lists;
/// borrowed, so the rows stay with their owner.
#[derive(Default)]
pub(super) struct Columns<'a> {
    pub(super) event_sagas: Vec<Uuid>,
    pub(super) seqs: Vec<i64>,
    pub(super) kinds: Vec<&'static str>,
    pub(super) data: Vec<Json<&'a Event>>,
    pub(super) cancelled_sagas: Vec<Uuid>,
    /// `saga_id/key` of each cancelled timer (a uuid's text has a fixed length, so the pair
    /// is unambiguous whatever the key holds).
    pub(super) cancelled: Vec<String>,
    pub(super) timer_sagas: Vec<Uuid>,
    pub(super) keys: Vec<String>,
    pub(super) timers: Vec<Json<&'a Timer>>,
    pub(super) due_ats: Vec<DateTime<Utc>>,
    pub(super) instances: Vec<Uuid>,
    pub(super) statuses: Vec<&'static str>,
    pub(super) last_seqs: Vec<i64>,
    pub(super) reasons: Vec<Option<&'a str>>,
    pub(super) outbox_sagas: Vec<Uuid>,
    pub(super) destinations: Vec<String>,
    pub(super) message_ids: Vec<Uuid>,
    pub(super) headers: Vec<Json<&'a BTreeMap<String, String>>>,
    pub(super) bodies: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    /// Appends the rows of `writes`.
    pub(super) fn add(&mut self, writes: &'a Writes) {
        for row in &writes.events {
            self.event_sagas.push(row.saga_id);
            self.seqs.push(row.seq);
            self.kinds.push(row.event.kind());
            self.data.push(Json(&row.event));
        }
        let first_set = self.timer_sagas.len();
        for row in &writes.timers_set {
            self.timer_sagas.push(row.saga_id);
            self.keys.push(row.timer.key());
            self.timers.push(Json(&row.timer));
            self.due_ats.push(row.due_at);
        }
        // A timer cancelled and set again in one batch is replaced by the upsert; one statement
        // must not touch a row twice.
        let set: HashSet<(&Uuid, &String)> = self.timer_sagas[first_set..]
            .iter()
            .zip(&self.keys[first_set..])
            .collect();
        let cancelled: Vec<(Uuid, &str)> = writes
            .timers_cancelled
            .iter()
            .filter(|(saga, key)| !set.contains(&(saga, key)))
            .map(|(saga, key)| (*saga, key.as_str()))
            .collect();
        for (saga, key) in cancelled {
            self.cancelled_sagas.push(saga);
            self.cancelled.push(format!("{saga}/{key}"));
        }
        // In id order, as the row locks are taken: writers that lock while updating do not
        // deadlock on sagas they share.
        let mut instances: Vec<_> = writes.instances.iter().collect();
        instances.sort_unstable_by_key(|(id, _)| **id);
        for (id, update) in instances {
            self.instances.push(*id);
            self.statuses.push(update.status.as_str());
            self.last_seqs.push(update.last_seq);
            self.reasons.push(update.reason.as_deref());
        }
        for (saga_id, envelope) in &writes.outbox {
            self.outbox_sagas.push(*saga_id);
            self.destinations.push(envelope.destination.encode());
            self.message_ids.push(envelope.message.id);
            self.headers.push(Json(&envelope.message.headers));
            self.bodies.push(&envelope.message.body);
        }
    }
}

impl<'a> From<&'a Writes> for Columns<'a> {
    fn from(writes: &'a Writes) -> Self {
        let mut c = Columns::default();
        c.add(writes);
        c
    }
}
