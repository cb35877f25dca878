//! The store's SQL, with the schema name formatted in once.

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// The store's statements, with the schema filled in once.
pub(super) struct Sql {
    pub(super) insert_instance: SqlStr,
    pub(super) instance_by_key: SqlStr,
    pub(super) lock_instances: SqlStr,
    pub(super) lock_instances_skip: SqlStr,
    pub(super) load_events: SqlStr,
    pub(super) insert_events: SqlStr,
    pub(super) insert_outbox: SqlStr,
    pub(super) cancel_timers: SqlStr,
    pub(super) set_timers: SqlStr,
    pub(super) update_instances: SqlStr,
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
    pub(super) stats_sagas: SqlStr,
    pub(super) stats_queues: SqlStr,
}

impl Sql {
    pub(super) fn new(s: &str) -> Self {
        Self {
            insert_instance: sql(format!(
                "INSERT INTO {s}.instances (id, saga, version, status, business_key, last_seq, reason, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $7, $8, $6, $6) \
                 ON CONFLICT (saga, business_key) WHERE business_key IS NOT NULL DO NOTHING RETURNING id"
            )),
            instance_by_key: sql(format!(
                "SELECT id FROM {s}.instances WHERE saga = $1 AND business_key = $2"
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
            insert_events: sql(format!(
                "INSERT INTO {s}.events (saga_id, seq, kind, data, recorded_at) \
                 SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::jsonb[], $5::timestamptz[])"
            )),
            insert_outbox: sql(format!(
                "INSERT INTO {s}.outbox (saga_id, destination, message_id, headers, body, claimed_until) \
                 SELECT u.*, $6 FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::jsonb[], $5::bytea[]) AS u \
                 RETURNING id, message_id"
            )),
            cancel_timers: sql(format!(
                "DELETE FROM {s}.timers t USING UNNEST($1::uuid[], $2::text[]) AS c(saga_id, key) \
                 WHERE t.saga_id = c.saga_id AND t.key = c.key AND t.fired_at IS NULL"
            )),
            set_timers: sql(format!(
                "INSERT INTO {s}.timers (saga_id, key, timer, set_at, due_at) \
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::timestamptz[], $5::timestamptz[]) \
                 ON CONFLICT (saga_id, key) DO UPDATE SET timer = EXCLUDED.timer, set_at = EXCLUDED.set_at, \
                 due_at = EXCLUDED.due_at, fired_at = NULL"
            )),
            update_instances: sql(format!(
                "UPDATE {s}.instances i SET status = u.status, last_seq = u.last_seq, reason = u.reason, updated_at = $5 \
                 FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[]) AS u(id, status, last_seq, reason) \
                 WHERE i.id = u.id"
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
            next_timer: sql(format!(
                "SELECT min(t.due_at) FROM {s}.timers t JOIN {s}.instances i ON i.id = t.saga_id \
                 WHERE t.fired_at IS NULL \
                 AND (i.saga, i.version) IN (SELECT * FROM UNNEST($1::text[], $2::int4[]))"
            )),
            claim_outbox: sql(format!(
                "UPDATE {s}.outbox SET claimed_until = $2 WHERE id IN \
                 (SELECT id FROM {s}.outbox WHERE claimed_until <= $1 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
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
                 coalesce((SELECT extract(epoch FROM $1 - min(created_at)) FROM {s}.outbox), 0)::float8, \
                 (SELECT count(*) FROM {s}.timers WHERE fired_at IS NULL AND due_at <= $1), \
                 (SELECT count(*) FROM {s}.timers WHERE fired_at IS NULL)"
            )),
            purge: sql(format!(
                "DELETE FROM {s}.instances WHERE status IN ('completed', 'compensated', 'cancelled') AND updated_at < $1"
            )),
            count_by_status: sql(format!(
                "SELECT status, count(*) AS n FROM {s}.instances GROUP BY status"
            )),
        }
    }
}

fn sql(text: String) -> SqlStr {
    // Only the schema name is interpolated, and it was checked to be a plain identifier.
    AssertSqlSafe(text).into_sql_str()
}
