//! The PostgreSQL store: the durable event log, instances, outbox and timers.
//!
//! The store's jobs live in modules of their own, each statement's SQL beside the code that
//! binds it: `starts` (with `start_queue`, which gathers starts into batches), `apply` (with
//! `write`, the statement that writes a decided batch), `timers`, `outbox`, `queries`, and
//! `pools`, the connections they use.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, SqlSafeStr, SqlStr};
use uuid::Uuid;

mod apply;
mod cache;
mod clock;
mod columns;
mod hosts;
mod notify;
mod outbox;
mod pools;
mod queries;
mod start_queue;
mod starts;
mod timers;
mod write;

use super::{Applied, LocalRelay, SagaStore, StartRequest, Started};
use crate::codec::Payloads;
use crate::decide::{Input, Timer};
use crate::error::Result;
use crate::registry::Registry;
use crate::schema;
use cache::StateCache;
use clock::DbClock;
pub use clock::LocalClock;
pub use hosts::{CHECK_EVERY, CHECK_TIMEOUT, PgHosts, Target};
use notify::listen;
use start_queue::StartQueue;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/store");

/// Sagas kept in PostgreSQL, in a schema of their own (default `saga`).
///
/// ```no_run
/// # async fn demo() -> saga_core::Result<()> {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
/// let store = saga_core::PgStore::builder(pool).schema("saga").build()?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Connections with `synchronous_commit = off`, opened on first use (see [`relaxed`]).
    relaxed: Arc<tokio::sync::OnceCell<PgPool>>,
    /// Connections that never scan a table, opened on first use (see [`by_key`]).
    by_key: Arc<tokio::sync::OnceCell<PgPool>>,
    schema: String,
    sql: Arc<Sql>,
    lease: Duration,
    /// Replayed states of sagas in progress, shared by the store's clones.
    cache: Arc<StateCache>,
    /// Starts waiting to be written together, shared by the store's clones.
    starts: Arc<StartQueue>,
    /// The relay of an orchestrator running on this store (or a clone) in this process.
    local_relay: Arc<Mutex<Option<LocalRelay>>>,
    /// The database's time, as this process reads it.
    clock: Arc<DbClock>,
    /// The codec applied to payloads on their way in and out.
    payloads: Payloads,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Configures a [`PgStore`].
pub struct PgStoreBuilder {
    pool: PgPool,
    schema: String,
    lease: Duration,
    cached_sagas: usize,
    local_clock: LocalClock,
    payloads: Payloads,
}

impl std::fmt::Debug for PgStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStoreBuilder")
            .field("schema", &self.schema)
            .field("lease", &self.lease)
            .field("cached_sagas", &self.cached_sagas)
            .finish_non_exhaustive()
    }
}

impl PgStoreBuilder {
    /// The schema that holds the saga tables.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// How long outbox rows handed to this process's relay stay claimed before another
    /// process's poller may publish them (after a crash, say).
    pub fn outbox_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How many sagas in progress keep their replayed state in memory between transactions
    /// (default [`PgStore::DEFAULT_CACHED_SAGAS`]; 0: read and replay the log every time). A
    /// kept state is used only while the saga's row shows no event was appended since.
    pub fn cached_sagas(mut self, sagas: usize) -> Self {
        self.cached_sagas = sagas;
        self
    }

    /// Where this process reads the time before its first reading of the database's clock
    /// (default: the system clock); after it, the database's time comes from that reading and
    /// the monotonic time elapsed since. For tests that run a process whose clock is off.
    pub fn local_clock(mut self, clock: LocalClock) -> Self {
        self.local_clock = clock;
        self
    }

    /// The codec for payloads (default: [`Payloads::plain`]). The store seals the payloads it
    /// writes (saga inputs, commands, outputs, signals) under the codec's key for new writes,
    /// and opens those it reads. A saga whose log or result holds a payload under a key the
    /// codec lacks waits here (its results are handed back and tried again, its timers
    /// postponed, an ERROR names the key), and queries return such payloads sealed. The
    /// workers must hold the same keys.
    pub fn payloads(mut self, payloads: Payloads) -> Self {
        self.payloads = payloads;
        self
    }

    /// Checks the schema name and builds the store; no I/O.
    pub fn build(self) -> Result<PgStore> {
        let quoted = schema::quoted(&self.schema)?;
        Ok(PgStore {
            pool: self.pool,
            relaxed: Arc::default(),
            by_key: Arc::default(),
            sql: Arc::new(Sql::new(&quoted)),
            schema: self.schema,
            lease: self.lease,
            cache: Arc::new(StateCache::new(self.cached_sagas)),
            starts: Arc::new(StartQueue::new()),
            local_relay: Arc::default(),
            clock: Arc::new(DbClock::new(self.local_clock)),
            payloads: self.payloads,
        })
    }
}

impl PgStore {
    /// The default schema.
    pub const DEFAULT_SCHEMA: &'static str = "saga";
    /// The default outbox lease.
    pub const DEFAULT_OUTBOX_LEASE: Duration = Duration::from_secs(10);
    /// How many sagas keep their replayed state in memory by default.
    pub const DEFAULT_CACHED_SAGAS: usize = 10_000;

    /// Configures a store on `pool`.
    pub fn builder(pool: PgPool) -> PgStoreBuilder {
        PgStoreBuilder {
            pool,
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            lease: Self::DEFAULT_OUTBOX_LEASE,
            cached_sagas: Self::DEFAULT_CACHED_SAGAS,
            local_clock: Arc::new(Utc::now),
            payloads: Payloads::plain(),
        }
    }

    /// Connects a pool of `max_connections` to `url` and builds a store in the default schema.
    /// The URL may name several hosts, as libpq takes them ([`PgHosts`]): the pool then
    /// follows the primary through a failover.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let hosts: PgHosts = url.parse()?;
        let pool = hosts
            .connect(PgPoolOptions::new().max_connections(max_connections))
            .await?;
        Self::builder(pool).build()
    }

    /// Creates or upgrades the saga tables in the configured schema.
    pub async fn migrate(&self) -> Result<()> {
        schema::migrate(&self.pool, &self.schema, &MIGRATOR, "_saga_migrations").await
    }

    /// The pool this store was built with. The store also opens two small pools of its own on
    /// first use, with this pool's connection options and settings (docs/OPERATIONS.md); they
    /// close when the store and its clones are dropped.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema this store uses.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The codec this store applies to payloads.
    pub fn payloads(&self) -> &Payloads {
        &self.payloads
    }
}

impl PgStore {
    /// Opens the payload an input carries (a result's output, a signal's payload).
    fn open_input(&self, input: &mut Input) -> Result<()> {
        match input {
            Input::Reply(reply) => self.payloads.open_in(&mut reply.outcome)?,
            Input::Timer(timer) => self.payloads.open_in(timer)?,
            Input::Start => {}
        }
        Ok(())
    }
}

/// The store's statements, with the schema name formatted in once, by job.
struct Sql {
    starts: starts::Statements,
    apply: apply::Statements,
    write: write::Statements,
    timers: timers::Statements,
    outbox: outbox::Statements,
    queries: queries::Statements,
}

impl Sql {
    fn new(schema: &str) -> Self {
        Self {
            starts: starts::Statements::new(schema),
            apply: apply::Statements::new(schema),
            write: write::Statements::new(schema),
            timers: timers::Statements::new(schema),
            outbox: outbox::Statements::new(schema),
            queries: queries::Statements::new(schema),
        }
    }
}

/// A statement of the store, the schema name formatted in.
fn sql(text: String) -> SqlStr {
    // Only the schema name is interpolated, and it was checked to be a plain identifier.
    AssertSqlSafe(text).into_sql_str()
}

#[async_trait]
impl SagaStore for PgStore {
    async fn start(&self, request: StartRequest) -> Result<Started> {
        self.start_queued(request).await
    }

    /// When every saga of the batch has its state kept here (the usual case for an orchestrator
    /// that runs them), the batch is decided from those states and written without taking the
    /// row locks first: the write statement writes a saga's rows only if its row still shows
    /// the `last_seq` the state was kept at, and it is sent alone, atomic on its own, without
    /// `BEGIN` and `COMMIT`. The inputs of sagas another writer moved on meanwhile are applied
    /// again under their row locks, from their logs. Otherwise the batch
    /// locks its sagas' rows, reads the logs of those not kept, writes, and commits.
    async fn apply(
        &self,
        registry: &Registry,
        mut batch: Vec<(Uuid, Input)>,
    ) -> Result<Vec<Applied>> {
        for (_, input) in &mut batch {
            self.open_input(input)?;
        }
        self.apply_batch(registry, batch).await
    }

    async fn fire_due_timers(&self, registry: &Registry, limit: usize) -> Result<Vec<Applied>> {
        self.fire_due(registry, limit).await
    }

    async fn next_timer_due(&self, registry: &Registry) -> Result<Option<DateTime<Utc>>> {
        self.next_due(registry).await
    }

    async fn enqueue(&self, saga_id: Uuid, timer: Timer) -> Result<()> {
        self.enqueue_timer(saga_id, timer).await
    }

    async fn timer_notifications(&self) -> Result<BoxStream<'static, ()>> {
        listen(&self.pool, &format!("{}_timers", self.schema)).await
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn attach_relay(&self, relay: LocalRelay) {
        *self.local_relay.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay);
    }

    fn detach_relay(&self, relay: &LocalRelay) {
        let mut attached = self.local_relay.lock().unwrap_or_else(|e| e.into_inner());
        if attached.as_ref().is_some_and(|a| a.same_relay(relay)) {
            *attached = None;
        }
    }
}
