//! The database's clock, as this process reads it: due times, leases and the times recorded
//! in events follow the database, so a process whose own clock runs ahead or behind, or is
//! stepped, neither delays signals and cancels nor takes rows another process holds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::error::Result;

/// Reads this process's clock ([`LocalClock`]).
pub type LocalClock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The database's time read at a moment of this process's monotonic clock; the time now is
/// that reading plus the monotonic time elapsed since, read again once it is older than
/// [`DbClock::RESYNC`]. Before the first reading, the local clock stands in.
pub(crate) struct DbClock {
    local: LocalClock,
    /// The database's time, and when (monotonically) it was read.
    reading: Mutex<Option<(DateTime<Utc>, Instant)>>,
}

impl DbClock {
    /// How old a reading may get before the next use reads again.
    pub(crate) const RESYNC: Duration = Duration::from_secs(10);

    pub(crate) fn new(local: LocalClock) -> Self {
        Self {
            local,
            reading: Mutex::new(None),
        }
    }

    fn reading(&self) -> Option<(DateTime<Utc>, Instant)> {
        *self.reading.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The database's time now, from the last reading (the local clock before any).
    pub(crate) fn now(&self) -> DateTime<Utc> {
        match self.reading() {
            Some((db, at)) => db + at.elapsed(),
            None => (self.local)(),
        }
    }

    /// The database's time now, reading it first on `conn` (a connection the caller holds
    /// already, so no wait for one) if the last reading is stale: one round trip every
    /// [`DbClock::RESYNC`] at most.
    pub(crate) async fn now_synced_on(&self, conn: &mut PgConnection) -> Result<DateTime<Utc>> {
        if self.stale() {
            self.sync(conn).await?;
        }
        Ok(self.now())
    }

    fn stale(&self) -> bool {
        self.reading()
            .is_none_or(|(_, at)| at.elapsed() >= Self::RESYNC)
    }

    /// Reads the database's time, taken as of halfway through the round trip (the connection
    /// is held already, so waiting for one does not count).
    async fn sync(&self, conn: &mut PgConnection) -> Result<()> {
        let before = Instant::now();
        let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .persistent(false)
            .fetch_one(&mut *conn)
            .await?;
        let at = before + before.elapsed() / 2;
        *self.reading.lock().unwrap_or_else(|e| e.into_inner()) = Some((db, at));
        Ok(())
    }
}
