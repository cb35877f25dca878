//! Applying inputs: sagas loaded under their row locks or from their kept states, decided,
//! written and committed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, Row, SqlStr};
use uuid::Uuid;

use super::PgStore;
use super::sql;
use crate::decide::{Input, Verdict};
use crate::definition::Definition;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::message::Envelope;
use crate::registry::Registry;
use crate::state::{ReplayError, SagaState, replay};
use crate::store::transition::{Decided, Loaded, Writes, apply_input, report};
use crate::store::{Applied, OutboxRecord};

/// The statements that lock and load sagas.
pub(super) struct Statements {
    lock_instances: SqlStr,
    lock_instances_skip: SqlStr,
    load_events: SqlStr,
}

impl Statements {
    pub(super) fn new(s: &str) -> Self {
        Self {
            lock_instances: sql(format!(
                "SELECT id, saga, version, last_seq FROM {s}.instances WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            )),
            lock_instances_skip: sql(format!(
                "SELECT id, saga, version, last_seq FROM {s}.instances WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED"
            )),
            load_events: sql(format!(
                "SELECT saga_id, data FROM {s}.events WHERE saga_id = ANY($1) ORDER BY saga_id, seq"
            )),
        }
    }
}

impl PgStore {
    /// Applies `batch` from the kept states of its sagas without their row locks, or under
    /// them (see [`SagaStore::apply`](crate::store::SagaStore::apply) for [`PgStore`]).
    pub(super) async fn apply_batch(
        &self,
        registry: &Registry,
        batch: Vec<(Uuid, Input)>,
    ) -> Result<Vec<Applied>> {
        let ids = saga_ids(&batch);
        let Some(mut loaded) = self.kept(registry, &ids) else {
            return self.apply_locked(registry, batch, &ids).await;
        };
        let mut conn = self.by_key().await?.acquire().await?;
        // On the connection the write goes through: never a wait for another.
        let now = self.clock.now_synced_on(&mut conn).await?;
        let (mut applied, stale) = self
            .decide_and_write(&mut conn, &mut loaded, &batch, now)
            .await?;
        drop(conn);
        self.keep(loaded);
        if !stale.is_empty() {
            self.cache.forget(stale.iter().copied());
            let (positions, again): (Vec<usize>, Vec<(Uuid, Input)>) = batch
                .into_iter()
                .enumerate()
                .filter(|(_, (id, _))| stale.contains(id))
                .unzip();
            let again_ids = saga_ids(&again);
            match self.apply_locked(registry, again, &again_ids).await {
                Ok(redone) => {
                    for (position, a) in positions.into_iter().zip(redone) {
                        applied[position] = a;
                    }
                }
                // The rest of the batch is committed and reported as such; these keep their
                // deferred verdicts, so their inputs are handed back and come again.
                Err(e) => tracing::warn!(
                    error = %e,
                    count = positions.len(),
                    "applying results again under the row lock failed; deferring them"
                ),
            }
        }
        Ok(applied)
    }

    /// Applies `batch` under the row locks of its sagas (`ids`, from [`saga_ids`]), from their
    /// kept states or their logs, at the database's time (read on the transaction's own
    /// connection if the last reading is stale).
    pub(super) async fn apply_locked(
        &self,
        registry: &Registry,
        batch: Vec<(Uuid, Input)>,
        ids: &[Uuid],
    ) -> Result<Vec<Applied>> {
        let mut tx = self.begin().await?;
        let now = self.clock.now_synced_on(&mut tx).await?;
        let loaded = self.load(&mut tx, registry, ids, false).await?;
        self.commit_decided(tx, loaded, &batch, now).await
    }

    /// Decides `batch` over the loaded sagas, writes, commits, and keeps the states for the
    /// next transaction.
    pub(super) async fn commit_decided(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        mut loaded: LoadedSagas,
        batch: &[(Uuid, Input)],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>> {
        let (applied, stale) = self
            .decide_and_write(&mut tx, &mut loaded, batch, now)
            .await?;
        if let Some(id) = stale.iter().next() {
            // Cannot happen under the row lock; the transaction rolls back, the batch is retried.
            return Err(Error::Internal(format!(
                "saga {id} changed while its row was locked"
            )));
        }
        tx.commit().await?;
        self.keep(loaded);
        Ok(applied)
    }

    /// Keeps the states of a committed transaction's sagas for the next one.
    pub(super) fn keep(&self, loaded: LoadedSagas) {
        self.cache.put(loaded.into_iter().filter_map(|(id, l)| {
            let (definition, l) = l.ok()?;
            Some((
                id,
                definition.name().to_owned(),
                definition.version(),
                l.last_seq,
                l.state,
            ))
        }));
    }

    /// Locks and loads the sagas of `ids`; those not loaded get the verdict to return instead.
    pub(super) async fn load(
        &self,
        conn: &mut PgConnection,
        registry: &Registry,
        ids: &[Uuid],
        skip_locked: bool,
    ) -> Result<LoadedSagas> {
        let sql = if skip_locked {
            self.sql.apply.lock_instances_skip.clone()
        } else {
            self.sql.apply.lock_instances.clone()
        };
        let rows = sqlx::query(sql).bind(ids).fetch_all(&mut *conn).await?;
        let mut out = HashMap::with_capacity(ids.len());
        let mut known = Vec::with_capacity(rows.len());
        let mut definitions = HashMap::new();
        for row in rows {
            let id: Uuid = row.try_get("id")?;
            let name: String = row.try_get("saga")?;
            let version = row.try_get::<i32, _>("version")? as u32;
            let last_seq: i64 = row.try_get("last_seq")?;
            match registry.get(&name, version) {
                Some(def) => match self.cache.get(id, &name, version, last_seq) {
                    Some(state) => {
                        out.insert(id, Ok((Arc::clone(def), Loaded { state, last_seq })));
                    }
                    None => {
                        definitions.insert(id, (Arc::clone(def), last_seq));
                        known.push(id);
                    }
                },
                None => {
                    out.insert(
                        id,
                        Err(Verdict::Deferred(
                            Error::UnknownDefinition { name, version }.to_string(),
                        )),
                    );
                }
            }
        }
        if !skip_locked {
            for id in ids {
                if !out.contains_key(id) && !definitions.contains_key(id) {
                    out.insert(*id, Err(Verdict::Rejected(format!("unknown saga {id}"))));
                }
            }
        }
        if known.is_empty() {
            return Ok(out);
        }
        let rows = sqlx::query(self.sql.apply.load_events.clone())
            .bind(&known)
            .fetch_all(&mut *conn)
            .await?;
        let mut logs: HashMap<Uuid, Vec<Event>> = HashMap::new();
        for row in rows {
            let id: Uuid = row.try_get("saga_id")?;
            let Json(mut event): Json<Event> = row.try_get("data")?;
            self.payloads.open_in(&mut event)?;
            logs.entry(id).or_default().push(event);
        }
        for (id, (definition, last_seq)) in definitions {
            let events = logs.remove(&id).unwrap_or_default();
            let state: SagaState = replay(&definition, &events)?;
            if events.len() as i64 != last_seq {
                // Events deleted or written around the store: the next events' numbers would not
                // follow the row's count. Not transient: the result is dead-lettered.
                return Err(ReplayError {
                    code: ReplayError::MISCOUNTED,
                    saga: definition.name().to_owned(),
                    version: definition.version(),
                    message: format!(
                        "saga {id}: the log holds {} events, its row counts {last_seq}",
                        events.len()
                    ),
                }
                .into());
            }
            out.insert(id, Ok((definition, Loaded { state, last_seq })));
        }
        Ok(out)
    }

    /// The kept states of all of `ids`, ready to decide from without reading or locking
    /// anything; `None` unless every one is kept and its definition registered here.
    pub(super) fn kept(&self, registry: &Registry, ids: &[Uuid]) -> Option<LoadedSagas> {
        let states = self.cache.get_all(ids)?;
        ids.iter()
            .zip(states)
            .map(|(id, (saga, version, last_seq, state))| {
                let definition = Arc::clone(registry.get(&saga, version)?);
                Some((*id, Ok((definition, Loaded { state, last_seq }))))
            })
            .collect()
    }

    /// Decides every input of `batch` over the loaded sagas, writes the rows of those whose
    /// row still shows the `last_seq` they were decided from, and reports. Returns the sagas
    /// another writer moved on (none under the row locks): nothing of theirs was written, their
    /// states are dropped from `loaded`, and their reports are placeholders to replace.
    pub(super) async fn decide_and_write(
        &self,
        conn: &mut PgConnection,
        loaded: &mut LoadedSagas,
        batch: &[(Uuid, Input)],
        now: DateTime<Utc>,
    ) -> Result<(Vec<Applied>, HashSet<Uuid>)> {
        let seen: HashMap<Uuid, i64> = batch
            .iter()
            .filter_map(|(id, _)| match loaded.get(id) {
                Some(Ok((_, l))) => Some((*id, l.last_seq)),
                _ => None,
            })
            .collect();
        let mut writes = Writes::default();
        let mut decided: Vec<(Uuid, std::result::Result<Decided, Verdict>)> =
            Vec::with_capacity(batch.len());
        for (saga_id, input) in batch {
            match loaded.get_mut(saga_id) {
                Some(Ok((definition, saga))) => {
                    decided.push((
                        *saga_id,
                        Ok(apply_input(
                            definition,
                            *saga_id,
                            saga,
                            input,
                            now,
                            &mut writes,
                            &self.payloads,
                        )?),
                    ));
                }
                Some(Err(verdict)) => decided.push((*saga_id, Err(verdict.clone()))),
                None => decided.push((
                    *saga_id,
                    Err(Verdict::Rejected(format!("unknown saga {saga_id}"))),
                )),
            }
        }
        let written = self
            .write(conn, &writes, &seen, now, now + self.lease)
            .await?;
        for (id, d) in &mut decided {
            if written.stale.contains(id) {
                *d = Err(Verdict::Deferred(format!(
                    "saga {id} was moved on by another writer"
                )));
                loaded.remove(id);
            }
        }
        let mut envelopes: Vec<Option<Envelope>> =
            writes.outbox.into_iter().map(|(_, e)| Some(e)).collect();
        let applied = report(decided, |i| OutboxRecord {
            id: written.outbox_ids[i].expect("the rows of sagas that passed are written"),
            envelope: envelopes[i]
                .take()
                .expect("each outbox row is reported once"),
        });
        Ok((applied, written.stale))
    }
}

/// The sagas `batch` names, in id order (the order rows are locked in), each once.
fn saga_ids(batch: &[(Uuid, Input)]) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The sagas of a transaction, each loaded with its definition, or the verdict its inputs get
/// instead (an unknown saga or definition).
pub(super) type LoadedSagas =
    HashMap<Uuid, std::result::Result<(Arc<Definition>, Loaded), Verdict>>;
