//! Durable time: due timers claimed and fired, the next due time, and timers queued now
//! (signals, cancel requests).

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Row, SqlStr};
use uuid::Uuid;

use super::PgStore;
use super::sql;
use crate::batch::one_by_one;
use crate::decide::{Input, Timer};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::store::{Applied, TIMER_FAILURE_BACKOFF};

/// The statements of timers.
pub(super) struct Statements {
    set_timers: SqlStr,
    due_timer_sagas: SqlStr,
    postpone_timers: SqlStr,
    claim_timers: SqlStr,
    next_timer: SqlStr,
}

impl Statements {
    pub(super) fn new(s: &str) -> Self {
        Self {
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
        }
    }
}

impl PgStore {
    /// Claims and applies up to `limit` due timers (see [`SagaStore::fire_due_timers`](crate::store::SagaStore::fire_due_timers)).
    pub(super) async fn fire_due(&self, registry: &Registry, limit: usize) -> Result<Vec<Applied>> {
        let (names, versions) = registered(registry);
        // By key, like the hot path: the loop asks this at every wake-up.
        let mut tx = self.begin().await?;
        let now = self.clock.now_synced_on(&mut tx).await?;
        let mut candidates: Vec<Uuid> = sqlx::query_scalar(self.sql.timers.due_timer_sagas.clone())
            .bind(now)
            .bind(limit as i64)
            .bind(&names)
            .bind(&versions)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        candidates.sort_unstable();
        candidates.dedup();
        match self.fire_for(registry, &candidates, now).await {
            Err(e) if !e.is_transient() => {
                tracing::warn!(error = %e, "a timer batch failed; firing saga by saga");
                self.fire_one_by_one(registry, candidates, now).await
            }
            result => result,
        }
    }

    /// Fires the timers of each of `candidates` alone, after their batch failed. A saga whose
    /// timers cannot be applied (an error that will not pass) has them postponed by
    /// [`TIMER_FAILURE_BACKOFF`], right away; one that failed for a reason that may pass keeps
    /// them due for the next round; once the database is out of reach, so do the sagas left,
    /// and what fired so far is returned (the error, if nothing fired).
    async fn fire_one_by_one(
        &self,
        registry: &Registry,
        candidates: Vec<Uuid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>> {
        let results = one_by_one(candidates.clone(), |saga_id| async move {
            match self.fire_for(registry, &[saga_id], now).await {
                Err(e) if !e.is_transient() => {
                    tracing::error!(saga.id = %saga_id, error = %e, "a timer cannot be applied; postponing it");
                    self.postpone(saga_id, now).await?;
                    Ok(Vec::new())
                }
                fired => fired,
            }
        })
        .await;
        let mut applied = Vec::new();
        let mut unreachable = None;
        for (saga_id, result) in candidates.into_iter().zip(results) {
            match result {
                Ok(a) => applied.extend(a),
                Err(e) if e.is_unreachable() => unreachable = Some(e),
                Err(e) => {
                    tracing::warn!(saga.id = %saga_id, error = %e, "firing a timer failed; it is tried again next round");
                }
            }
        }
        match unreachable {
            Some(e) if applied.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, "the database went out of reach while firing timers saga by saga");
                Ok(applied)
            }
            None => Ok(applied),
        }
    }

    /// Postpones the due timers of `saga_id` by [`TIMER_FAILURE_BACKOFF`].
    async fn postpone(&self, saga_id: Uuid, now: DateTime<Utc>) -> Result<()> {
        sqlx::query(self.sql.timers.postpone_timers.clone())
            .persistent(false)
            .bind(saga_id)
            .bind(now)
            .bind(now + TIMER_FAILURE_BACKOFF)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Locks the sagas of `candidates` that nobody else holds, claims their due timers and
    /// applies them, in one transaction.
    pub(super) async fn fire_for(
        &self,
        registry: &Registry,
        candidates: &[Uuid],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        // Sagas another process is working on are skipped; their timers stay due.
        let loaded = self.load(&mut tx, registry, candidates, true).await?;
        let locked: Vec<Uuid> = loaded
            .iter()
            .filter(|(_, l)| l.is_ok())
            .map(|(id, _)| *id)
            .collect();
        let rows = sqlx::query(self.sql.timers.claim_timers.clone())
            .bind(&locked)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let saga_id: Uuid = row.try_get("saga_id")?;
            let Json(mut timer): Json<Timer> = row.try_get("timer")?;
            self.payloads.open_in(&mut timer)?;
            batch.push((saga_id, Input::Timer(timer)));
        }
        self.commit_decided(tx, loaded, &batch, now).await
    }

    /// When the earliest pending timer of a saga `registry` holds is due.
    pub(super) async fn next_due(&self, registry: &Registry) -> Result<Option<DateTime<Utc>>> {
        let (names, versions) = registered(registry);
        let mut tx = self.begin().await?;
        let next = sqlx::query_scalar(self.sql.timers.next_timer.clone())
            .bind(&names)
            .bind(&versions)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(next)
    }

    /// Queues `timer` for `saga_id`, due now, and wakes the orchestrators.
    pub(super) async fn enqueue_timer(&self, saga_id: Uuid, mut timer: Timer) -> Result<()> {
        self.payloads.seal_in(&mut timer)?;
        let mut tx = self.begin().await?;
        // Due at the database's `now()`, not this process's.
        let inserted = sqlx::query(self.sql.timers.set_timers.clone())
            .bind(saga_id)
            .bind(timer.key())
            .bind(serde_json::to_value(&timer)?)
            .execute(&mut *tx)
            .await?;
        if inserted.rows_affected() == 0 {
            return Err(Error::UnknownSaga(saga_id));
        }
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(format!("{}_timers", self.schema))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The (name, version) pairs of the registry, as two arrays for `UNNEST`.
fn registered(registry: &Registry) -> (Vec<String>, Vec<i32>) {
    registry
        .iter()
        .map(|d| (d.name().to_owned(), d.version() as i32))
        .unzip()
}
