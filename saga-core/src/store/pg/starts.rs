//! Starting sagas: queued starts written together in one statement, and starts inside the
//! caller's transaction.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row, SqlStr};
use uuid::Uuid;

use super::PgStore;
use super::columns::Columns;
use super::sql;
use super::start_queue::{Pending, PreparedStart, StartQueue, Writer, prepare_start};
use crate::batch::one_by_one;
use crate::error::{Error, Result};
use crate::store::{LocalRelay, OutboxRecord, StartRequest, Started};

/// The statements that start sagas.
pub(super) struct Statements {
    start: SqlStr,
    start_handed: SqlStr,
    start_conflict: SqlStr,
}

impl Statements {
    pub(super) fn new(s: &str) -> Self {
        Self {
            start: start(s, false),
            start_handed: start(s, true),
            start_conflict: sql(format!(
                "SELECT id FROM {s}.instances WHERE id = $1 \
                 UNION ALL SELECT id FROM {s}.instances WHERE saga = $2 AND business_key = $3 LIMIT 1"
            )),
        }
    }
}

/// Starts in one statement (one round trip, atomic without a transaction of its own), one row
/// per saga in each array: a saga's rows after its instance are written only if the instance
/// was (not when its business key was taken, by an earlier saga or one earlier in the arrays,
/// nor when its id was, by an earlier attempt of the same start). The outbox rows keep the
/// order of the arrays, which is the order of their ids. Returns `(saga_id, NULL, NULL)` for
/// each saga written and, when `handed`, `(saga_id, outbox id, message_id)` for each of its
/// outbox rows.
///
/// Not `handed`, the outbox rows are left unclaimed and the relays' pollers are woken (once:
/// notifications within a transaction are folded); `handed`, they are claimed until `$22` for
/// the relay they are handed to after the commit.
fn start(s: &str, handed: bool) -> SqlStr {
    let (claimed_until, returning, tail) = if handed {
        (
            "$22",
            " RETURNING saga_id, id, message_id",
            "SELECT i.id, NULL::int8, NULL::uuid FROM i \
             UNION ALL SELECT o.saga_id, o.id, o.message_id FROM o",
        )
    } else {
        (
            "$1",
            "",
            "SELECT i.id, NULL::int8, NULL::uuid, pg_notify($22, '') FROM i",
        )
    };
    sql(format!(
        "WITH i AS (INSERT INTO {s}.instances \
         (id, saga, version, status, business_key, last_seq, reason, created_at, updated_at, \
         finished_at) \
         SELECT u.id, u.saga, u.version, u.status, u.business_key, u.last_seq, u.reason, $1, $1, \
         CASE WHEN u.status IN ('completed', 'compensated', 'cancelled') THEN $1::timestamptz END \
         FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::int8[], $8::text[]) \
         AS u(id, saga, version, status, business_key, last_seq, reason) \
         ON CONFLICT DO NOTHING RETURNING id), \
         e AS (INSERT INTO {s}.events (saga_id, seq, kind, data, recorded_at) \
         SELECT u.saga_id, u.seq, u.kind, u.data, $1 \
         FROM UNNEST($9::uuid[], $10::int8[], $11::text[], $12::jsonb[]) AS u(saga_id, seq, kind, data) \
         WHERE u.saga_id IN (SELECT id FROM i)), \
         o AS (INSERT INTO {s}.outbox (saga_id, destination, message_id, headers, body, claimed_until) \
         SELECT u.saga_id, u.destination, u.message_id, u.headers, u.body, {claimed_until} \
         FROM UNNEST($13::uuid[], $14::text[], $15::uuid[], $16::jsonb[], $17::bytea[]) \
         WITH ORDINALITY AS u(saga_id, destination, message_id, headers, body, n) \
         WHERE u.saga_id IN (SELECT id FROM i) ORDER BY u.n{returning}), \
         t AS (INSERT INTO {s}.timers (saga_id, key, timer, set_at, due_at) \
         SELECT u.saga_id, u.key, u.timer, $1, u.due_at \
         FROM UNNEST($18::uuid[], $19::text[], $20::jsonb[], $21::timestamptz[]) AS u(saga_id, key, timer, due_at) \
         WHERE u.saga_id IN (SELECT id FROM i)) \
         {tail}"
    ))
}

impl PgStore {
    /// Queues a start to be written with the others that queue up meanwhile.
    pub(super) async fn start_queued(&self, request: StartRequest) -> Result<Started> {
        // Written with the starts that queue up meanwhile, in one statement atomic on its own
        // (no BEGIN and COMMIT round trips), by a task of its own: a caller that gives up
        // waiting does not take the others' starts down with it.
        let (reply, started) = tokio::sync::oneshot::channel();
        if let Some(writer) = self.starts.push(Pending { request, reply }) {
            tokio::spawn(self.clone().write_starts(writer));
        }
        match started.await {
            Ok(Ok(started)) => started,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            // The writer is gone without a word (its runtime shut down).
            Err(_) => Err(Error::Internal(
                "the task writing starts stopped before answering".into(),
            )),
        }
    }

    /// Starts a saga inside the caller's transaction, so that it exists exactly when the
    /// caller's own writes commit (the transactional outbox from the caller's side).
    ///
    /// A business key started here is held until the transaction ends: starts of the same
    /// key elsewhere wait for it, and with them the other starts written in their statement
    /// (see [`Client::start`](crate::Client::start)). Keep such transactions short, and start
    /// several keyed sagas in one in the order of (saga name, key), the order in which shared
    /// statements take them, so that neither side can deadlock.
    ///
    /// ```no_run
    /// # async fn demo(store: saga_core::PgStore, def: saga_core::SagaDefinition<u32>) -> saga_core::Result<()> {
    /// let mut tx = store.pool().begin().await?;
    /// sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
    /// let started = store.start_using(&mut tx, &def, &42, Some("order-42".into())).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_using<I: serde::Serialize>(
        &self,
        conn: &mut PgConnection,
        definition: &crate::SagaDefinition<I>,
        input: &I,
        business_key: Option<String>,
    ) -> Result<Started> {
        let request = StartRequest {
            definition: Arc::clone(definition.definition()),
            input: serde_json::to_value(input)?,
            business_key,
        };
        let now = self.clock.now_synced_on(conn).await?;
        let start = prepare_start(request, now, &self.payloads)?;
        // Not handed to a relay: the caller's transaction may yet roll back.
        let mut started = self
            .insert_starts(conn, std::slice::from_ref(&start), now, None)
            .await?;
        started.pop().expect("one start, one result")
    }

    /// Writes `starts` in one statement on `conn`, then looks up the sagas whose business key
    /// was taken. The error is the statement's; the results, each start's.
    ///
    /// With `relay` (an orchestrator of this process), the first commands are claimed for the
    /// store's lease and handed to it after the commit, and the new sagas' states are kept
    /// for the orchestrator's first transaction on them; without, the commands are left to
    /// the pollers, which the statement wakes.
    pub(super) async fn insert_starts(
        &self,
        conn: &mut PgConnection,
        starts: &[PreparedStart],
        now: DateTime<Utc>,
        relay: Option<&LocalRelay>,
    ) -> Result<Vec<Result<Started>>> {
        let mut c = Columns::default();
        let (mut ids, mut names, mut versions, mut statuses) = (vec![], vec![], vec![], vec![]);
        let (mut keys, mut last_seqs, mut reasons) = (vec![], vec![], vec![]);
        for start in starts {
            ids.push(start.saga_id);
            names.push(start.definition.name());
            versions.push(start.definition.version() as i32);
            statuses.push(start.instance.status.as_str());
            keys.push(start.business_key.as_deref());
            last_seqs.push(start.instance.last_seq);
            reasons.push(start.instance.reason.as_deref());
            c.add(&start.writes);
        }
        let query = sqlx::query(if relay.is_some() {
            self.sql.starts.start_handed.clone()
        } else {
            self.sql.starts.start.clone()
        })
        .bind(now)
        .bind(&ids)
        .bind(&names)
        .bind(&versions)
        .bind(&statuses)
        .bind(&keys)
        .bind(&last_seqs)
        .bind(&reasons)
        .bind(c.event_sagas)
        .bind(c.seqs)
        .bind(c.kinds)
        .bind(c.data)
        .bind(c.outbox_sagas)
        .bind(c.destinations)
        .bind(c.message_ids)
        .bind(c.headers)
        .bind(c.bodies)
        .bind(c.timer_sagas)
        .bind(c.keys)
        .bind(c.timers)
        .bind(c.due_ats);
        let query = match relay {
            // From now, not from `now`: the batch may have waited for a connection.
            Some(_) => query.bind(self.clock.now() + self.lease),
            None => query.bind(self.notify_channel()),
        };
        let mut inserted = HashSet::with_capacity(starts.len());
        let mut outbox: HashMap<Uuid, i64> = HashMap::new();
        for row in query.fetch_all(&mut *conn).await? {
            let saga_id: Uuid = row.try_get(0)?;
            match (
                row.try_get::<Option<i64>, _>(1)?,
                row.try_get::<Option<Uuid>, _>(2)?,
            ) {
                (Some(id), Some(message_id)) => {
                    outbox.insert(message_id, id);
                }
                _ => {
                    inserted.insert(saga_id);
                }
            }
        }
        // `fetch_all` returns at `ReadyForQuery`, after the statement's implicit commit: what
        // is handed over is durable.
        if let Some(relay) = relay {
            self.hand_over_starts(relay, starts, &inserted, &outbox);
        }
        let mut started = Vec::with_capacity(starts.len());
        for start in starts {
            if inserted.contains(&start.saga_id) {
                started.push(Ok(Started {
                    saga_id: start.saga_id,
                    created: true,
                }));
                continue;
            }
            // Its own id when an earlier attempt of this very start was written; else the
            // saga that holds its business key. Unnamed, so planned with the table as it is
            // now, like the other lookups made outside the hot path's transactions.
            let existing = sqlx::query_scalar(self.sql.starts.start_conflict.clone())
                .persistent(false)
                .bind(start.saga_id)
                .bind(start.definition.name())
                .bind(&start.business_key)
                .fetch_one(&mut *conn)
                .await;
            started.push(existing.map_err(Error::from).map(|saga_id| Started {
                saga_id,
                created: saga_id == start.saga_id,
            }));
        }
        Ok(started)
    }

    /// Writes queued starts, a batch at a time, until none is left (see [`StartQueue`]).
    async fn write_starts(self, mut writer: Writer) {
        while let Some(batch) = StartQueue::next_batch(&mut writer) {
            let mut conn = match self.pool.acquire().await {
                Ok(conn) => conn,
                Err(e) => {
                    let shared = Arc::new(Error::from(e));
                    for Pending { reply, .. } in batch {
                        let _ = reply.send(Ok(Err(Error::Shared(Arc::clone(&shared)))));
                    }
                    continue;
                }
            };
            // Unread, the database being out of reach, the statement fails anyway.
            let now = match self.clock.now_synced_on(&mut conn).await {
                Ok(now) => now,
                Err(_) => self.clock.now(),
            };
            let mut ready = Vec::with_capacity(batch.len());
            for Pending { request, reply } in batch {
                // The definition's code runs here: a panic in it goes to its own caller.
                let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    prepare_start(request, now, &self.payloads)
                }));
                match prepared {
                    Ok(Ok(start)) => ready.push((start, reply)),
                    Ok(Err(e)) => {
                        let _ = reply.send(Ok(Err(e)));
                    }
                    Err(panic) => {
                        let _ = reply.send(Err(panic));
                    }
                }
            }
            if ready.is_empty() {
                continue;
            }
            // Business keys taken in one order by every writer, here and in other processes:
            // two statements waiting on each other's keys would deadlock.
            ready.sort_by(|(a, _), (b, _)| {
                (a.definition.name(), &a.business_key).cmp(&(b.definition.name(), &b.business_key))
            });
            let (prepared, replies): (Vec<_>, Vec<_>) = ready.into_iter().unzip();
            let relay = self.local_relay();
            let results = match self
                .insert_starts(&mut conn, &prepared, now, relay.as_ref())
                .await
            {
                Ok(started) => started,
                Err(e) if prepared.len() == 1 => vec![Err(e)],
                Err(e) => {
                    drop(conn);
                    tracing::debug!(error = %e, starts = prepared.len(), "a batch of starts failed; writing them one by one");
                    self.insert_one_by_one(&prepared, now, relay.as_ref()).await
                }
            };
            for (reply, started) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(started));
            }
        }
    }

    /// The starts of a failed statement, each again on its own: it was rolled back (a
    /// deadlock with another writer of the same business keys, say) or its fate is not known,
    /// and one start must not fail the rest. A start the statement did write finds its own
    /// id. Once the database cannot be reached (an error that is not its answer), the starts
    /// left get that error rather than wait for it one by one.
    async fn insert_one_by_one(
        &self,
        starts: &[PreparedStart],
        now: DateTime<Utc>,
        relay: Option<&LocalRelay>,
    ) -> Vec<Result<Started>> {
        let results = one_by_one(starts, |start| async move {
            self.insert_on_pool(std::slice::from_ref(start), now, relay)
                .await
                .map(|mut started| started.pop().expect("one start, one result"))
        })
        .await;
        // The statement's error, or the start's own (its key's holder looked up).
        results.into_iter().map(|r| r.and_then(|s| s)).collect()
    }

    /// [`Self::insert_starts`] on a connection of the pool.
    async fn insert_on_pool(
        &self,
        starts: &[PreparedStart],
        now: DateTime<Utc>,
        relay: Option<&LocalRelay>,
    ) -> Result<Vec<Result<Started>>> {
        let mut conn = self.pool.acquire().await?;
        self.insert_starts(&mut conn, starts, now, relay).await
    }

    /// The relay attached by an orchestrator of this process, if one runs.
    fn local_relay(&self) -> Option<LocalRelay> {
        self.local_relay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After the commit of `starts`: keeps the states of the sagas written (`inserted`) for
    /// the orchestrator's first transaction on them, then hands their outbox rows (ids by
    /// message id) to its relay.
    fn hand_over_starts(
        &self,
        relay: &LocalRelay,
        starts: &[PreparedStart],
        inserted: &HashSet<Uuid>,
        outbox: &HashMap<Uuid, i64>,
    ) {
        let written = || starts.iter().filter(|s| inserted.contains(&s.saga_id));
        self.cache.put(written().map(|s| {
            (
                s.saga_id,
                s.definition.name().to_owned(),
                s.definition.version(),
                s.loaded.last_seq,
                s.loaded.state.clone(),
            )
        }));
        let records: Vec<OutboxRecord> = written()
            .flat_map(|s| &s.writes.outbox)
            .filter_map(|(_, envelope)| {
                outbox.get(&envelope.message.id).map(|&id| OutboxRecord {
                    id,
                    envelope: envelope.clone(),
                })
            })
            .collect();
        if !records.is_empty() && !relay.hand_over(records) {
            tracing::debug!("the local relay has stopped; started sagas wait for a poller");
        }
    }
}
