//! What operators, metrics and clients read, and the purge of finished sagas.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Row, SqlStr};
use uuid::Uuid;

use super::PgStore;
use super::sql;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent};
use crate::state::SagaStatus;
use crate::store::{ListFilter, QueryStore, SagaCount, SagaSummary, StoreStats};

/// The statements of the queries and the purge.
pub(super) struct Statements {
    summary: SqlStr,
    history: SqlStr,
    list: SqlStr,
    list_oldest: SqlStr,
    stats_sagas: SqlStr,
    stats_queues: SqlStr,
    purge: SqlStr,
    purge_events: SqlStr,
    purge_timers: SqlStr,
    count_by_status: SqlStr,
    counts: SqlStr,
}

/// The list, ordered by `created_at` in `order` (ASC or DESC), so that an index serves it.
fn list(s: &str, order: &str) -> SqlStr {
    sql(format!(
        "SELECT id, saga, version, status, business_key, reason, created_at, updated_at FROM {s}.instances \
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR saga = $2) \
         AND ($3::timestamptz IS NULL OR created_at < $3) AND ($4::timestamptz IS NULL OR created_at > $4) \
         AND ($7::text IS NULL OR business_key = $7) \
         ORDER BY created_at {order}, id {order} LIMIT $5 OFFSET $6"
    ))
}

impl Statements {
    pub(super) fn new(s: &str) -> Self {
        Self {
            summary: sql(format!(
                "SELECT id, saga, version, status, business_key, reason, created_at, updated_at \
                 FROM {s}.instances WHERE id = $1"
            )),
            history: sql(format!(
                "SELECT seq, data, recorded_at FROM {s}.events WHERE saga_id = $1 ORDER BY seq"
            )),
            list: list(s, "DESC"),
            list_oldest: list(s, "ASC"),
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
            // Two parts, each on its own partial index: the unfinished sagas, and those finished
            // since $1.
            counts: sql(format!(
                "SELECT saga, status, count(*) AS n FROM {s}.instances \
                 WHERE status NOT IN ('completed', 'compensated', 'cancelled') GROUP BY saga, status \
                 UNION ALL \
                 SELECT saga, status, count(*) AS n FROM {s}.instances \
                 WHERE finished_at IS NOT NULL AND finished_at >= $1 GROUP BY saga, status"
            )),
        }
    }
}

#[async_trait]
impl QueryStore for PgStore {
    async fn summary(&self, saga_id: Uuid) -> Result<Option<SagaSummary>> {
        // Unnamed: a plan cached while `instances` was small would scan it once it has grown.
        let row = sqlx::query(self.sql.queries.summary.clone())
            .persistent(false)
            .bind(saga_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(summary_from_row).transpose()
    }

    async fn history(&self, saga_id: Uuid) -> Result<Vec<RecordedEvent>> {
        let rows = sqlx::query(self.sql.queries.history.clone())
            .persistent(false)
            .bind(saga_id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let Json(mut event): Json<Event> = row.try_get("data")?;
                self.payloads.open_in_if_possible(&mut event);
                Ok(RecordedEvent {
                    seq: row.try_get("seq")?,
                    at: row.try_get("recorded_at")?,
                    event,
                })
            })
            .collect()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaSummary>> {
        // Unnamed, so each is planned for its own filter: a generic plan for every
        // combination of `$n IS NULL` would scan.
        let statement = if filter.oldest_first {
            &self.sql.queries.list_oldest
        } else {
            &self.sql.queries.list
        };
        let rows = sqlx::query(statement.clone())
            .persistent(false)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(&filter.saga)
            .bind(filter.created_before)
            .bind(filter.created_after)
            .bind(i64::from(filter.limit.unwrap_or(50)))
            .bind(i64::from(filter.offset))
            .bind(&filter.business_key)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64> {
        // In chunks, each its own transaction, so no lock is held long.
        const CHUNK: i64 = 10_000;
        let mut purged = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let ids: Vec<Uuid> = sqlx::query_scalar(self.sql.queries.purge.clone())
                .bind(before)
                .bind(CHUNK)
                .fetch_all(&mut *tx)
                .await?;
            for sql in [
                &self.sql.queries.purge_events,
                &self.sql.queries.purge_timers,
            ] {
                sqlx::query(sql.clone())
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            purged += ids.len() as u64;
            if (ids.len() as i64) < CHUNK {
                return Ok(purged);
            }
        }
    }

    async fn stats(&self) -> Result<StoreStats> {
        let rows = sqlx::query(self.sql.queries.stats_sagas.clone())
            .fetch_all(&self.pool)
            .await?;
        let mut sagas = Vec::with_capacity(rows.len());
        for row in rows {
            let status: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            sagas.push((
                row.try_get("saga")?,
                status.parse().map_err(Error::Internal)?,
                n as u64,
            ));
        }
        let (backlog, oldest, due, pending): (i64, f64, i64, i64) =
            sqlx::query_as(self.sql.queries.stats_queues.clone())
                .fetch_one(&self.pool)
                .await?;
        Ok(StoreStats {
            sagas,
            outbox_backlog: backlog as u64,
            outbox_oldest_age_secs: oldest,
            timers_due: due as u64,
            timers_pending: pending as u64,
        })
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>> {
        let rows = sqlx::query(self.sql.queries.count_by_status.clone())
            .fetch_all(&self.pool)
            .await?;
        let mut counts = BTreeMap::new();
        for row in rows {
            let status: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            counts.insert(status.parse().map_err(Error::Internal)?, n as u64);
        }
        Ok(counts)
    }

    async fn counts(&self, finished_since: DateTime<Utc>) -> Result<Vec<SagaCount>> {
        let rows = sqlx::query(self.sql.queries.counts.clone())
            .persistent(false)
            .bind(finished_since)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(SagaCount {
                    saga: row.try_get("saga")?,
                    status: status.parse().map_err(Error::Internal)?,
                    count: row.try_get::<i64, _>("n")? as u64,
                })
            })
            .collect()
    }
}

fn summary_from_row(row: &sqlx::postgres::PgRow) -> Result<SagaSummary> {
    let status: String = row.try_get("status")?;
    Ok(SagaSummary {
        id: row.try_get("id")?,
        saga: row.try_get("saga")?,
        version: row.try_get::<i32, _>("version")? as u32,
        status: status.parse().map_err(Error::Internal)?,
        business_key: row.try_get("business_key")?,
        reason: row.try_get("reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
