//! The write of a decided batch: its events, timers, instance updates and outbox rows in one
//! statement.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row, SqlStr};
use uuid::Uuid;

use super::PgStore;
use super::columns::Columns;
use super::sql;
use crate::error::Result;
use crate::store::transition::Writes;

/// The statement that writes a decided batch.
pub(super) struct Statements {
    write: SqlStr,
}

impl Statements {
    pub(super) fn new(s: &str) -> Self {
        Self {
            // A transaction's rows in one statement, written only for the sagas whose row still
            // shows the `last_seq` their state was decided from (`i`, which every saga with rows
            // has): its events, timers cancelled and set (no key in both: the writer drops a
            // cancellation its own upsert replaces), instance updates, and outbox rows. Sagas
            // decided with nothing to write are checked the same way (`r`). Returns the outbox
            // rows' ids and the sagas that passed. Under the row locks every saga passes; written
            // from states kept in memory without the locks, it reports the sagas another writer
            // moved on (the update waits for a writer holding the row, then checks again).
            // Cancelled timers are found by primary key: `(fired_at IS NULL) IS TRUE` keeps the
            // planner off `timers_pending`, which holds every pending timer and, between
            // vacuums, the dead entries of the cancelled ones. Each join with the arrays also
            // names its keys with `= ANY`, an index condition whatever the join order: a table
            // last analyzed nearly empty (`timers` often is, between loads) otherwise gets a
            // plan that walks its whole primary key for every batch. The cancellations are no
            // join at all, but one scan by `saga_id = ANY($6)` that keeps the rows named in `$7`
            // (`saga_id/key`) of sagas that passed (a filter, `IS TRUE`): as the inner side of
            // a join, an `= ANY` scan sorts its array again for every outer row, which made
            // each batch's cost grow with the square of its cancellations.
            write: sql(format!(
                "WITH i AS (UPDATE {s}.instances i SET status = u.status, last_seq = u.last_seq, reason = u.reason, \
                 updated_at = $1, finished_at = CASE WHEN u.status IN ('completed', 'compensated', 'cancelled') \
                 THEN coalesce(i.finished_at, $1) END \
                 FROM UNNEST($12::uuid[], $13::text[], $14::int8[], $15::text[], $22::int8[]) AS u(id, status, last_seq, reason, seen) \
                 WHERE i.id = ANY($12) AND i.id = u.id AND i.last_seq = u.seen RETURNING i.id), \
                 e AS (INSERT INTO {s}.events (saga_id, seq, kind, data, recorded_at) \
                 SELECT u.*, $1 FROM UNNEST($2::uuid[], $3::int8[], $4::text[], $5::jsonb[]) AS u(saga_id, seq, kind, data) \
                 WHERE u.saga_id IN (SELECT id FROM i)), \
                 c AS (DELETE FROM {s}.timers t WHERE t.saga_id = ANY($6) \
                 AND (t.saga_id::text || '/' || t.key) = ANY($7::text[]) \
                 AND (t.fired_at IS NULL) IS TRUE \
                 AND (t.saga_id = ANY(ARRAY(SELECT id FROM i))) IS TRUE), \
                 t AS (INSERT INTO {s}.timers (saga_id, key, timer, set_at, due_at) \
                 SELECT u.saga_id, u.key, u.timer, $1, u.due_at \
                 FROM UNNEST($8::uuid[], $9::text[], $10::jsonb[], $11::timestamptz[]) AS u(saga_id, key, timer, due_at) \
                 WHERE u.saga_id IN (SELECT id FROM i) \
                 ON CONFLICT (saga_id, key) DO UPDATE SET timer = EXCLUDED.timer, set_at = EXCLUDED.set_at, \
                 due_at = EXCLUDED.due_at, fired_at = NULL), \
                 o AS (INSERT INTO {s}.outbox (saga_id, destination, message_id, headers, body, claimed_until) \
                 SELECT u.*, $16 FROM UNNEST($17::uuid[], $18::text[], $19::uuid[], $20::jsonb[], $21::bytea[]) \
                 AS u(saga_id, destination, message_id, headers, body) WHERE u.saga_id IN (SELECT id FROM i) \
                 RETURNING id, message_id), \
                 r AS (SELECT x.id FROM {s}.instances x JOIN UNNEST($23::uuid[], $24::int8[]) AS g(id, seen) \
                 ON x.id = g.id AND x.last_seq = g.seen WHERE x.id = ANY($23)) \
                 SELECT id, message_id, NULL::uuid AS saga_id FROM o \
                 UNION ALL SELECT NULL, NULL, id FROM i UNION ALL SELECT NULL, NULL, id FROM r"
            )),
        }
    }
}

impl PgStore {
    /// Writes the rows of `writes` in one statement, for the sagas whose row still shows the
    /// `last_seq` in `seen` (every saga decided, with rows to write or not).
    pub(super) async fn write(
        &self,
        conn: &mut PgConnection,
        writes: &Writes,
        seen: &HashMap<Uuid, i64>,
        now: DateTime<Utc>,
        claimed_until: DateTime<Utc>,
    ) -> Result<Written> {
        let c = Columns::from(writes);
        let seen_by_update: Vec<i64> = c.instances.iter().map(|id| seen[id]).collect();
        let (checked, checked_seqs): (Vec<Uuid>, Vec<i64>) = seen
            .iter()
            .filter(|(id, _)| !writes.instances.contains_key(id))
            .map(|(id, seq)| (*id, *seq))
            .unzip();
        let rows = sqlx::query(self.sql.write.write.clone())
            .bind(now)
            .bind(c.event_sagas)
            .bind(c.seqs)
            .bind(c.kinds)
            .bind(c.data)
            .bind(c.cancelled_sagas)
            .bind(c.cancelled)
            .bind(c.timer_sagas)
            .bind(c.keys)
            .bind(c.timers)
            .bind(c.due_ats)
            .bind(c.instances)
            .bind(c.statuses)
            .bind(c.last_seqs)
            .bind(c.reasons)
            .bind(claimed_until)
            .bind(c.outbox_sagas)
            .bind(c.destinations)
            .bind(&c.message_ids)
            .bind(c.headers)
            .bind(c.bodies)
            .bind(seen_by_update)
            .bind(checked)
            .bind(checked_seqs)
            .fetch_all(&mut *conn)
            .await?;
        let mut by_message: HashMap<Uuid, i64> = HashMap::with_capacity(rows.len());
        let mut passed: HashSet<Uuid> = HashSet::with_capacity(seen.len());
        for row in rows {
            match row.try_get::<Option<Uuid>, _>("saga_id")? {
                Some(saga_id) => {
                    passed.insert(saga_id);
                }
                None => {
                    by_message.insert(row.try_get("message_id")?, row.try_get("id")?);
                }
            }
        }
        Ok(Written {
            outbox_ids: c
                .message_ids
                .iter()
                .map(|m| by_message.get(m).copied())
                .collect(),
            stale: seen
                .keys()
                .filter(|id| !passed.contains(id))
                .copied()
                .collect(),
        })
    }
}

/// What a write statement did.
pub(super) struct Written {
    /// The outbox rows' ids, in the order of [`Writes::outbox`]; `None` for sagas in `stale`.
    pub(super) outbox_ids: Vec<Option<i64>>,
    /// The sagas whose row had moved on from the `last_seq` they were decided from.
    pub(super) stale: HashSet<Uuid>,
}
