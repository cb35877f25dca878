//! The database's clock, as this process reads it: due times, leases and the times recorded
//! in events follow the database, so a process whose own clock runs ahead or behind neither
//! delays signals and cancels nor takes rows another process holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::error::Result;

/// Reads this process's clock ([`LocalClock`]).
pub type LocalClock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The local clock plus the offset last measured against the database's `clock_timestamp()`,
/// measured again once it is older than [`DbClock::RESYNC`].
pub(crate) struct DbClock {
    local: LocalClock,
    /// Database time minus local time, in microseconds.
    offset_us: AtomicI64,
    /// When the offset was measured, in milliseconds since `epoch` (0: never).
    synced_ms: AtomicI64,
    epoch: Instant,
}

impl DbClock {
    /// How old a measurement may get before the next use measures again.
    pub(crate) const RESYNC: Duration = Duration::from_secs(10);

    pub(crate) fn new(local: LocalClock) -> Self {
        Self {
            local,
            offset_us: AtomicI64::new(0),
            synced_ms: AtomicI64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The database's time now, as last measured.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        (self.local)() + chrono::Duration::microseconds(self.offset_us.load(Ordering::Relaxed))
    }

    /// The database's time now, measuring the offset first if it is stale (one round trip
    /// every [`DbClock::RESYNC`] at most).
    pub(crate) async fn now_synced(&self, pool: &PgPool) -> Result<DateTime<Utc>> {
        let synced = self.synced_ms.load(Ordering::Relaxed);
        let age = self.epoch.elapsed().as_millis() as i64 - synced;
        if synced == 0 || age >= Self::RESYNC.as_millis() as i64 {
            self.sync(pool).await?;
        }
        Ok(self.now())
    }

    /// Measures the offset: the database's time against the local reading halfway through
    /// the round trip.
    pub(crate) async fn sync(&self, pool: &PgPool) -> Result<()> {
        let before = (self.local)();
        let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .persistent(false)
            .fetch_one(pool)
            .await?;
        let after = (self.local)();
        let local = before + (after - before) / 2;
        let offset = (db - local).num_microseconds().unwrap_or(0);
        self.offset_us.store(offset, Ordering::Relaxed);
        let now_ms = (self.epoch.elapsed().as_millis() as i64).max(1);
        self.synced_ms.store(now_ms, Ordering::Relaxed);
        Ok(())
    }
}
