//! Retention of the inbox: old records deleted, and the horizon that keeps a purge from
//! being mistaken for a key never seen.
//!
//! A record answers redeliveries and fences: without it, a late delivery would run its
//! handler again, and a late fence would write a tombstone and report a step that applied as
//! fenced. So a purge keeps its horizon (the latest `before` it was given), and a key with no
//! record whose saga started before the horizon (its id, a UUIDv7, holds its start time; a
//! margin covers clocks that differ) is answered "cannot tell": a retryable failure for a
//! delivery (nothing recorded), `unfenceable` for a fence (the step counts as applied, as
//! with a worker without an inbox: it is compensated, a pivot parks its saga).

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use super::Inbox;
use crate::error::Result;

/// How far the clocks of the processes that start sagas and of the participant's database
/// may differ.
const CLOCK_MARGIN: TimeDelta = TimeDelta::hours(1);

/// How many rows one statement of a purge deletes.
const PURGE_BATCH: i64 = 10_000;

/// How recent a purge's `before` may be, at most: a purge refuses the commands of sagas that
/// started before `before` and [`CLOCK_MARGIN`], so a recent one would refuse sagas in flight.
const MIN_AGE: TimeDelta = TimeDelta::days(1);

/// How long a purge waits between committing its horizon and deleting: a claim whose
/// statement began before the horizon was visible (its snapshot older) has ended by then, so
/// it either found the record or ran before any was deleted.
const HORIZON_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// The time a purge must be after for `saga_id`'s records to be safe from it: the saga's
/// start (from its UUIDv7) less [`CLOCK_MARGIN`]; for an id of another version, the epoch
/// (any purge may have removed its records).
pub(super) fn horizon_of(saga_id: Uuid) -> DateTime<Utc> {
    saga_id
        .get_timestamp()
        .filter(|_| saga_id.get_version_num() == 7)
        .and_then(|ts| {
            let (secs, nanos) = ts.to_unix();
            DateTime::from_timestamp(secs as i64, nanos)
        })
        .map_or(DateTime::UNIX_EPOCH, |started| started - CLOCK_MARGIN)
}

/// Why a command of `saga_id` is not answered from the inbox.
pub(super) fn too_old(saga_id: Uuid) -> String {
    format!(
        "saga {saga_id} started before the inbox's latest purge: its records may have been \
         deleted, so whether this step applied cannot be told"
    )
}

impl Inbox {
    /// Deletes the records of commands received before `before` (in batches of short
    /// transactions), and returns how many. Choose `before` later than the start of every saga
    /// that can still send this service a command or a fence (for instance, older than the
    /// longest a saga runs, stuck ones included, and the orchestrators' `saga purge`
    /// retention): such a command is answered "cannot tell" instead (see the module's docs).
    /// `before` must be a day ago at least; the purge waits two seconds between recording its
    /// horizon and deleting.
    ///
    /// ```no_run
    /// # async fn demo(inbox: saga_core::Inbox) -> saga_core::Result<()> {
    /// let purged = inbox.purge(chrono::Utc::now() - chrono::TimeDelta::days(30)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge(&self, before: DateTime<Utc>) -> Result<u64> {
        if before > Utc::now() - MIN_AGE {
            return Err(crate::Error::Config(format!(
                "an inbox purge deletes records older than a day at least (asked: before \
                 {before}): the commands of sagas started before its horizon are refused"
            )));
        }
        // The horizon first: from its commit on, no key of an older saga is taken for new.
        sqlx::query(self.sql.purge_horizon.clone())
            .bind(before)
            .execute(&self.pool)
            .await?;
        tokio::time::sleep(HORIZON_SETTLE).await;
        let mut purged = 0;
        loop {
            let deleted = sqlx::query(self.sql.purge_rows.clone())
                .bind(before)
                .bind(PURGE_BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected();
            purged += deleted;
            if deleted < PURGE_BATCH as u64 {
                return Ok(purged);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_is_safe_from_purges_before_its_start_less_the_margin() {
        let id = Uuid::now_v7();
        let horizon = horizon_of(id);
        let behind = Utc::now() - horizon;
        assert!(
            behind >= CLOCK_MARGIN && behind < CLOCK_MARGIN + TimeDelta::seconds(5),
            "{behind}"
        );
        assert_eq!(horizon_of(Uuid::new_v4()), DateTime::UNIX_EPOCH);
    }
}
