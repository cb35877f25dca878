//! The store's connections: the given pool, and two small pools of its own.

use sqlx::PgPool;

use super::PgStore;
use crate::error::Result;

/// Begins a transaction of the hot path, whose statements find rows by key only: their plans,
/// cached per connection, must not scan a table that was small when they were made (it may
/// hold millions of rows by the time autovacuum's `ANALYZE` has the plan made again). One
/// simple query, so no extra round trip.
const BEGIN_BY_KEY: &str = "BEGIN; SET LOCAL enable_seqscan = off";

/// The sessions of [`PgStore::relaxed`].
const RELAXED: &[(&str, &str)] = &[
    ("synchronous_commit", "off"),
    ("plan_cache_mode", "force_custom_plan"),
];

/// The sessions of [`PgStore::by_key`].
const BY_KEY: &[(&str, &str)] = &[("enable_seqscan", "off")];

impl PgStore {
    /// A small pool whose commits do not wait for the disk, for claiming and deleting outbox
    /// rows: if a crash loses one of those, the row is published again and the verdicts drop
    /// the duplicate. Saga state is never written through it.
    pub(super) async fn relaxed(&self) -> Result<&PgPool> {
        // No ping before each use: a claim or delete on a connection a restart broke fails, is
        // retried by the relay, and the pool drops the connection.
        self.own(&self.relaxed, 4, RELAXED).await
    }

    /// The own pool in `cell` (opened on first use, see [`Self::own_pool`]), its new
    /// connections on the given pool's host now.
    async fn own<'a>(
        &'a self,
        cell: &'a tokio::sync::OnceCell<PgPool>,
        max: u32,
        settings: &[(&str, &str)],
    ) -> Result<&'a PgPool> {
        let pool = cell
            .get_or_try_init(|| self.own_pool(max, settings))
            .await?;
        self.follow(pool, settings);
        Ok(pool)
    }

    /// A pool of the store's own, of at most `max` connections opened on demand, with the
    /// given pool's connection options and settings (its `after_connect` hook, timeouts and
    /// lifetimes) and the session `settings` on top, sent as startup options. Connections are
    /// not pinged before use.
    async fn own_pool(&self, max: u32, settings: &[(&str, &str)]) -> sqlx::Result<PgPool> {
        let options = self
            .pool
            .connect_options()
            .as_ref()
            .clone()
            .options(settings.iter().copied());
        self.pool
            .options()
            .clone()
            .max_connections(max)
            .min_connections(0)
            .test_before_acquire(false)
            .connect_with(options)
            .await
    }

    /// A small pool whose sessions never scan a table (`enable_seqscan = off` for the session),
    /// for the write of a batch decided from kept states. That write is one statement, atomic
    /// on its own, so it is sent without `BEGIN` and `COMMIT` (two round trips fewer); being
    /// outside a transaction, it cannot be protected by `SET LOCAL` (see [`Self::begin`]), so
    /// its sessions are. Nothing else runs on it.
    pub(super) async fn by_key(&self) -> Result<&PgPool> {
        // No ping before each use: a write on a connection a restart broke fails as transient,
        // its batch is applied again (deferred results come back after `defer_delay`), and the
        // pool drops the connection; each idle connection fails one batch that way.
        self.own(&self.by_key, 8, BY_KEY).await
    }

    /// Points an own pool's new connections at the host of the given pool, if that moved (a
    /// pool on several hosts follows the primary through a failover: [`super::PgHosts`]).
    fn follow(&self, own: &PgPool, settings: &[(&str, &str)]) {
        let main = self.pool.connect_options();
        let theirs = own.connect_options();
        if main.get_host() != theirs.get_host() || main.get_port() != theirs.get_port() {
            own.set_connect_options(main.as_ref().clone().options(settings.iter().copied()));
        }
    }

    /// Begins a transaction of the hot path. Its statements are prepared once per connection
    /// (one round trip each, no parsing or planning per execution); plans made in it do not
    /// scan tables (`enable_seqscan` for this transaction only), so a plan cached while the
    /// tables were small still finds rows by key once they have grown.
    pub(super) async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin_with(BEGIN_BY_KEY).await?)
    }

    pub(super) fn notify_channel(&self) -> String {
        format!("{}_outbox", self.schema)
    }
}
