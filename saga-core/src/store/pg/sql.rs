//! The store's SQL, with the schema name formatted in once.

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// Begins a transaction of the hot path, whose statements find rows by key only: their plans,
/// cached per connection, must not scan a table that was small when they were made (it may
/// hold millions of rows by the time autovacuum's `ANALYZE` has the plan made again). One
/// simple query, so no extra round trip.
pub(super) const BEGIN_BY_KEY: &str = "BEGIN; SET LOCAL enable_seqscan = off";

/// The store's statements, with the schema filled in once.
pub(super) struct Sql {
    pub(super) start: SqlStr,
    pub(super) start_handed: SqlStr,
    pub(super) start_conflict: SqlStr,
    pub(super) lock_instances: SqlStr,
    pub(super) lock_instances_skip: SqlStr,
    pub(super) load_events: SqlStr,
    pub(super) write: SqlStr,
    pub(super) set_timers: SqlStr,
    pub(super) due_timer_sagas: SqlStr,
    pub(super) postpone_timers: SqlStr,
    pub(super) claim_timers: SqlStr,
    pub(super) next_timer: SqlStr,
    pub(super) claim_outbox: SqlStr,
    pub(super) delete_outbox: SqlStr,
    pub(super) summary: SqlStr,
    pub(super) history: SqlStr,
    pub(super) count_by_status: SqlStr,
    pub(super) list: SqlStr,
    pub(super) purge: SqlStr,
    pub(super) purge_events: SqlStr,
    pub(super) purge_timers: SqlStr,
    pub(super) stats_sagas: SqlStr,
    pub(super) stats_queues: SqlStr,
}

impl Sql {
    pub(super) fn new(s: &str) -> Self {
        Self {
            start: start(s, false),
            start_handed: start(s, true),
            start_conflict: sql(format!(
                "SELECT id FROM {s}.instances WHERE id = $1 \
                 UNION ALL SELECT id FROM {s}.instances WHERE saga = $2 AND business_key = $3 LIMIT 1"
            )),
            lock_instances: sql(format!(
                "SELECT id, saga, version, last_seq FROM {s}.instances WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            )),
            lock_instances_skip: sql(format!(
                "SELECT id, saga, version, last_seq FROM {s}.instances WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED"
            )),
            load_events: sql(format!(
                "SELECT saga_id, data FROM {s}.events WHERE saga_id = ANY($1) ORDER BY saga_id, seq"
            )),
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
            // Only for a saga that exists; its row is share-locked, so a purge that takes the saga
            // waits for this transaction and then deletes the timer with it.
            set_timers: sql(format!(
                "INSERT INTO {s}.timers (saga_id, key, timer, set_at, due_at) \
                 SELECT i.id, $2, $3, now(), now() FROM {s}.instances i WHERE i.id = $1 FOR KEY SHARE \
                 ON CONFLICT (saga_id, key) DO UPDATE SET timer = EXCLUDED.timer, set_at = EXCLUDED.set_at, \
                 due_at = EXCLUDED.due_at, fired_at = NULL"
            )),
            due_timer_sagas: sql(format!(
                "SELECT t.saga_id FROM {s}.timers t JOIN {s}.instances i ON i.id = t.saga_id \
                 WHERE t.fired_at IS NULL AND t.due_at <= $1 \
                 AND (i.saga, i.version) IN (SELECT * FROM UNNEST($3::text[], $4::int4[])) \
                 ORDER BY t.due_at LIMIT $2"
            )),
            postpone_timers: sql(format!(
                "UPDATE {s}.timers SET due_at = $3 WHERE saga_id = $1 AND fired_at IS NULL AND due_at <= $2"
            )),
            // Applied in the order they were set: signals and requests queued together keep
            // their order.
            claim_timers: sql(format!(
                "WITH claimed AS (UPDATE {s}.timers SET fired_at = $2 \
                 WHERE saga_id = ANY($1) AND fired_at IS NULL AND due_at <= $2 \
                 RETURNING saga_id, key, timer, due_at, set_at) \
                 SELECT saga_id, timer FROM claimed ORDER BY due_at, set_at, key"
            )),
            // The first pending timer in due order whose saga this process runs: a walk of
            // `timers_pending` that stops at the first match.
            next_timer: sql(format!(
                "SELECT t.due_at FROM {s}.timers t JOIN {s}.instances i ON i.id = t.saga_id \
                 WHERE t.fired_at IS NULL \
                 AND (i.saga, i.version) IN (SELECT * FROM UNNEST($1::text[], $2::int4[])) \
                 ORDER BY t.due_at LIMIT 1"
            )),
            claim_outbox: sql(format!(
                "UPDATE {s}.outbox SET claimed_until = now() + make_interval(secs => $1) WHERE id IN \
                 (SELECT id FROM {s}.outbox WHERE claimed_until <= now() ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, destination, message_id, headers, body"
            )),
            delete_outbox: sql(format!("DELETE FROM {s}.outbox WHERE id = ANY($1)")),
            summary: sql(format!(
                "SELECT id, saga, version, status, business_key, reason, created_at, updated_at \
                 FROM {s}.instances WHERE id = $1"
            )),
            history: sql(format!(
                "SELECT seq, data, recorded_at FROM {s}.events WHERE saga_id = $1 ORDER BY seq"
            )),
            list: sql(format!(
                "SELECT id, saga, version, status, business_key, reason, created_at, updated_at FROM {s}.instances \
                 WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR saga = $2) \
                 AND ($3::timestamptz IS NULL OR created_at < $3) AND ($4::timestamptz IS NULL OR created_at > $4) \
                 ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6"
            )),
            stats_sagas: sql(format!(
                "SELECT saga, status, count(*) AS n FROM {s}.instances GROUP BY saga, status"
            )),
            stats_queues: sql(format!(
                "SELECT (SELECT count(*) FROM {s}.outbox), \
                 coalesce((SELECT extract(epoch FROM now() - min(created_at)) FROM {s}.outbox), 0)::float8, \
                 (SELECT count(*) FROM {s}.timers WHERE fired_at IS NULL AND due_at <= now()), \
                 (SELECT count(*) FROM {s}.timers WHERE fired_at IS NULL)"
            )),
            // A chunk of finished sagas; their events and timers are deleted by the next two
            // statements of the same transaction, whose snapshots see every row written under
            // the sagas' locks before they went.
            purge: sql(format!(
                "DELETE FROM {s}.instances WHERE id IN \
                 (SELECT id FROM {s}.instances WHERE finished_at < $1 ORDER BY finished_at LIMIT $2) \
                 RETURNING id"
            )),
            purge_events: sql(format!("DELETE FROM {s}.events WHERE saga_id = ANY($1)")),
            purge_timers: sql(format!("DELETE FROM {s}.timers WHERE saga_id = ANY($1)")),
            count_by_status: sql(format!(
                "SELECT status, count(*) AS n FROM {s}.instances GROUP BY status"
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

fn sql(text: String) -> SqlStr {
    // Only the schema name is interpolated, and it was checked to be a plain identifier.
    AssertSqlSafe(text).into_sql_str()
}
