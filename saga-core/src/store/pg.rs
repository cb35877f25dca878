//! The PostgreSQL store: the durable event log, instances, outbox and timers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

mod cache;
mod clock;
mod columns;
mod sql;
mod starts;

use super::transition::{Decided, Loaded, Writes, apply_input, report};
use super::{
    Applied, ListFilter, LocalRelay, OutboxRecord, SagaSummary, StartRequest, Started, Store,
};
use crate::decide::{Input, Timer, Verdict};
use crate::definition::Definition;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent};
use crate::message::{Destination, Envelope, Message};
use crate::registry::Registry;
use crate::schema;
use crate::state::{ReplayError, SagaState, SagaStatus, replay};
use cache::StateCache;
use clock::DbClock;
pub use clock::LocalClock;
use columns::Columns;
use sql::Sql;
use starts::{Pending, PreparedStart, StartQueue, Writer, prepare_start};

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
        }
    }

    /// Connects a pool of `max_connections` to `url` and builds a store in the default schema.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(url)
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

    /// Starts a saga inside the caller's transaction, so that it exists exactly when the
    /// caller's own writes commit (the transactional outbox from the caller's side).
    ///
    /// A business key started here is held until the transaction ends: starts of the same
    /// key elsewhere wait for it, and with them the other starts written in their statement
    /// (see [`Client::start`](crate::Client::start)). Keep such transactions short, and start
    /// several keyed sagas in one in the order of (saga name, key), the order in which shared
    /// statements take them, so that neither side can deadlock.
    ///
    /// ```no_run
    /// # async fn demo(store: saga_core::PgStore, def: saga_core::SagaDefinition<u32>) -> saga_core::Result<()> {
    /// let mut tx = store.pool().begin().await?;
    /// sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
    /// let started = store.start_using(&mut tx, &def, &42, Some("order-42".into())).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_using<I: serde::Serialize>(
        &self,
        conn: &mut PgConnection,
        definition: &crate::SagaDefinition<I>,
        input: &I,
        business_key: Option<String>,
    ) -> Result<Started> {
        let request = StartRequest {
            definition: Arc::clone(definition.definition()),
            input: serde_json::to_value(input)?,
            business_key,
        };
        let now = self.clock.now_synced_on(conn).await?;
        let start = prepare_start(request, now)?;
        // Not handed to a relay: the caller's transaction may yet roll back.
        let mut started = self
            .insert_starts(conn, std::slice::from_ref(&start), now, None)
            .await?;
        started.pop().expect("one start, one result")
    }

    /// Writes `starts` in one statement on `conn`, then looks up the sagas whose business key
    /// was taken. The error is the statement's; the results, each start's.
    ///
    /// With `relay` (an orchestrator of this process), the first commands are claimed for the
    /// store's lease and handed to it after the commit, and the new sagas' states are kept
    /// for the orchestrator's first transaction on them; without, the commands are left to
    /// the pollers, which the statement wakes.
    async fn insert_starts(
        &self,
        conn: &mut PgConnection,
        starts: &[PreparedStart],
        now: DateTime<Utc>,
        relay: Option<&LocalRelay>,
    ) -> Result<Vec<Result<Started>>> {
        let mut c = Columns::default();
        let (mut ids, mut names, mut versions, mut statuses) = (vec![], vec![], vec![], vec![]);
        let (mut keys, mut last_seqs, mut reasons) = (vec![], vec![], vec![]);
        for start in starts {
            ids.push(start.saga_id);
            names.push(start.definition.name());
            versions.push(start.definition.version() as i32);
            statuses.push(start.instance.status.as_str());
            keys.push(start.business_key.as_deref());
            last_seqs.push(start.instance.last_seq);
            reasons.push(start.instance.reason.as_deref());
            c.add(&start.writes);
        }
        let query = sqlx::query(if relay.is_some() {
            self.sql.start_handed.clone()
        } else {
            self.sql.start.clone()
        })
        .bind(now)
        .bind(&ids)
        .bind(&names)
        .bind(&versions)
        .bind(&statuses)
        .bind(&keys)
        .bind(&last_seqs)
        .bind(&reasons)
        .bind(c.event_sagas)
        .bind(c.seqs)
        .bind(c.kinds)
        .bind(c.data)
        .bind(c.outbox_sagas)
        .bind(c.destinations)
        .bind(c.message_ids)
        .bind(c.headers)
        .bind(c.bodies)
        .bind(c.timer_sagas)
        .bind(c.keys)
        .bind(c.timers)
        .bind(c.due_ats);
        let query = match relay {
            // From now, not from `now`: the batch may have waited for a connection.
            Some(_) => query.bind(self.clock.now() + self.lease),
            None => query.bind(self.notify_channel()),
        };
        let mut inserted = HashSet::with_capacity(starts.len());
        let mut outbox: HashMap<Uuid, i64> = HashMap::new();
        for row in query.fetch_all(&mut *conn).await? {
            let saga_id: Uuid = row.try_get(0)?;
            match (
                row.try_get::<Option<i64>, _>(1)?,
                row.try_get::<Option<Uuid>, _>(2)?,
            ) {
                (Some(id), Some(message_id)) => {
                    outbox.insert(message_id, id);
                }
                _ => {
                    inserted.insert(saga_id);
                }
            }
        }
        // `fetch_all` returns at `ReadyForQuery`, after the statement's implicit commit: what
        // is handed over is durable.
        if let Some(relay) = relay {
            self.hand_over_starts(relay, starts, &inserted, &outbox);
        }
        let mut started = Vec::with_capacity(starts.len());
        for start in starts {
            if inserted.contains(&start.saga_id) {
                started.push(Ok(Started {
                    saga_id: start.saga_id,
                    created: true,
                }));
                continue;
            }
            // Its own id when an earlier attempt of this very start was written; else the
            // saga that holds its business key. Unnamed, so planned with the table as it is
            // now, like the other lookups made outside the hot path's transactions.
            let existing = sqlx::query_scalar(self.sql.start_conflict.clone())
                .persistent(false)
                .bind(start.saga_id)
                .bind(start.definition.name())
                .bind(&start.business_key)
                .fetch_one(&mut *conn)
                .await;
            started.push(existing.map_err(Error::from).map(|saga_id| Started {
                saga_id,
                created: saga_id == start.saga_id,
            }));
        }
        Ok(started)
    }

    /// Writes queued starts, a batch at a time, until none is left (see [`starts`]).
    async fn write_starts(self, mut writer: Writer) {
        while let Some(batch) = StartQueue::next_batch(&mut writer) {
            let mut conn = match self.pool.acquire().await {
                Ok(conn) => conn,
                Err(e) => {
                    let shared = Arc::new(Error::from(e));
                    for Pending { reply, .. } in batch {
                        let _ = reply.send(Ok(Err(Error::Shared(Arc::clone(&shared)))));
                    }
                    continue;
                }
            };
            // Unread, the database being out of reach, the statement fails anyway.
            let now = match self.clock.now_synced_on(&mut conn).await {
                Ok(now) => now,
                Err(_) => self.clock.now(),
            };
            let mut ready = Vec::with_capacity(batch.len());
            for Pending { request, reply } in batch {
                // The definition's code runs here: a panic in it goes to its own caller.
                let prepared =
                    std::panic::catch_unwind(AssertUnwindSafe(|| prepare_start(request, now)));
                match prepared {
                    Ok(Ok(start)) => ready.push((start, reply)),
                    Ok(Err(e)) => {
                        let _ = reply.send(Ok(Err(e)));
                    }
                    Err(panic) => {
                        let _ = reply.send(Err(panic));
                    }
                }
            }
            if ready.is_empty() {
                continue;
            }
            // Business keys taken in one order by every writer, here and in other processes:
            // two statements waiting on each other's keys would deadlock.
            ready.sort_by(|(a, _), (b, _)| {
                (a.definition.name(), &a.business_key).cmp(&(b.definition.name(), &b.business_key))
            });
            let (prepared, replies): (Vec<_>, Vec<_>) = ready.into_iter().unzip();
            let relay = self.local_relay();
            let results = match self
                .insert_starts(&mut conn, &prepared, now, relay.as_ref())
                .await
            {
                Ok(started) => started,
                Err(e) if prepared.len() == 1 => vec![Err(e)],
                Err(e) => {
                    drop(conn);
                    tracing::debug!(error = %e, starts = prepared.len(), "a batch of starts failed; writing them one by one");
                    self.insert_one_by_one(&prepared, now, relay.as_ref()).await
                }
            };
            for (reply, started) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(started));
            }
        }
    }

    /// The starts of a failed statement, each again on its own: it was rolled back (a
    /// deadlock with another writer of the same business keys, say) or its fate is not known,
    /// and one start must not fail the rest. A start the statement did write finds its own
    /// id. Once the database cannot be reached (an error that is not its answer), the starts
    /// left get that error rather than wait for it one by one.
    async fn insert_one_by_one(
        &self,
        starts: &[PreparedStart],
        now: DateTime<Utc>,
        relay: Option<&LocalRelay>,
    ) -> Vec<Result<Started>> {
        let mut results = Vec::with_capacity(starts.len());
        let mut unreachable: Option<Arc<Error>> = None;
        for start in starts {
            if let Some(e) = &unreachable {
                results.push(Err(Error::Shared(Arc::clone(e))));
                continue;
            }
            match self
                .insert_on_pool(std::slice::from_ref(start), now, relay)
                .await
            {
                Ok(mut started) => results.push(started.pop().expect("one start, one result")),
                Err(e @ Error::Database(sqlx::Error::Database(_))) => results.push(Err(e)),
                Err(e) => {
                    let e = Arc::new(e);
                    results.push(Err(Error::Shared(Arc::clone(&e))));
                    unreachable = Some(e);
                }
            }
        }
        results
    }

    /// [`Self::insert_starts`] on a connection of the pool.
    async fn insert_on_pool(
        &self,
        starts: &[PreparedStart],
        now: DateTime<Utc>,
        relay: Option<&LocalRelay>,
    ) -> Result<Vec<Result<Started>>> {
        let mut conn = self.pool.acquire().await?;
        self.insert_starts(&mut conn, starts, now, relay).await
    }

    /// The relay attached by an orchestrator of this process, if one runs.
    fn local_relay(&self) -> Option<LocalRelay> {
        self.local_relay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After the commit of `starts`: keeps the states of the sagas written (`inserted`) for
    /// the orchestrator's first transaction on them, then hands their outbox rows (ids by
    /// message id) to its relay.
    fn hand_over_starts(
        &self,
        relay: &LocalRelay,
        starts: &[PreparedStart],
        inserted: &HashSet<Uuid>,
        outbox: &HashMap<Uuid, i64>,
    ) {
        let written = || starts.iter().filter(|s| inserted.contains(&s.saga_id));
        self.cache.put(written().map(|s| {
            (
                s.saga_id,
                s.definition.name().to_owned(),
                s.definition.version(),
                s.loaded.last_seq,
                s.loaded.state.clone(),
            )
        }));
        let records: Vec<OutboxRecord> = written()
            .flat_map(|s| &s.writes.outbox)
            .filter_map(|(_, envelope)| {
                outbox.get(&envelope.message.id).map(|&id| OutboxRecord {
                    id,
                    envelope: envelope.clone(),
                })
            })
            .collect();
        if !records.is_empty() && !relay.hand_over(records) {
            tracing::debug!("the local relay has stopped; started sagas wait for a poller");
        }
    }

    /// A small pool whose commits do not wait for the disk, for claiming and deleting outbox
    /// rows: if a crash loses one of those, the row is published again and the verdicts drop
    /// the duplicate. Saga state is never written through it.
    async fn relaxed(&self) -> Result<&PgPool> {
        // No ping before each use: a claim or delete on a connection a restart broke fails, is
        // retried by the relay, and the pool drops the connection.
        self.relaxed
            .get_or_try_init(|| {
                self.own_pool(
                    4,
                    &[
                        ("synchronous_commit", "off"),
                        ("plan_cache_mode", "force_custom_plan"),
                    ],
                )
            })
            .await
            .map_err(Error::from)
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
    async fn by_key(&self) -> Result<&PgPool> {
        // No ping before each use: a write on a connection a restart broke fails as transient,
        // its batch is applied again (deferred results come back after `defer_delay`), and the
        // pool drops the connection; each idle connection fails one batch that way.
        self.by_key
            .get_or_try_init(|| self.own_pool(8, &[("enable_seqscan", "off")]))
            .await
            .map_err(Error::from)
    }

    /// Begins a transaction of the hot path. Its statements are prepared once per connection
    /// (one round trip each, no parsing or planning per execution); plans made in it do not
    /// scan tables (`enable_seqscan` for this transaction only), so a plan cached while the
    /// tables were small still finds rows by key once they have grown.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin_with(sql::BEGIN_BY_KEY).await?)
    }

    fn notify_channel(&self) -> String {
        format!("{}_outbox", self.schema)
    }

    /// Locks the sagas of `candidates` that nobody else holds, claims their due timers and
    /// applies them, in one transaction.
    async fn fire_for(
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
        let rows = sqlx::query(self.sql.claim_timers.clone())
            .bind(&locked)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let saga_id: Uuid = row.try_get("saga_id")?;
            let Json(timer): Json<Timer> = row.try_get("timer")?;
            batch.push((saga_id, Input::Timer(timer)));
        }
        self.commit_decided(tx, loaded, &batch, now).await
    }

    /// Decides `batch` over the loaded sagas, writes, commits, and keeps the states for the
    /// next transaction.
    async fn commit_decided(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        mut loaded: LoadedSagas,
        batch: &[(Uuid, Input)],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>> {
        let (applied, stale) = self
            .decide_and_write(&mut tx, &mut loaded, batch, now)
            .await?;
        if let Some(id) = stale.iter().next() {
            // Cannot happen under the row lock; the transaction rolls back, the batch is retried.
            return Err(Error::Database(sqlx::Error::Protocol(format!(
                "saga {id} changed while its row was locked"
            ))));
        }
        tx.commit().await?;
        self.keep(loaded);
        Ok(applied)
    }

    /// Keeps the states of a committed transaction's sagas for the next one.
    fn keep(&self, loaded: LoadedSagas) {
        self.cache.put(loaded.into_iter().filter_map(|(id, l)| {
            let (definition, l) = l.ok()?;
            Some((
                id,
                definition.name().to_owned(),
                definition.version(),
                l.last_seq,
                l.state,
            ))
        }));
    }

    /// Locks and loads the sagas of `ids`; those not loaded get the verdict to return instead.
    async fn load(
        &self,
        conn: &mut PgConnection,
        registry: &Registry,
        ids: &[Uuid],
        skip_locked: bool,
    ) -> Result<LoadedSagas> {
        let sql = if skip_locked {
            self.sql.lock_instances_skip.clone()
        } else {
            self.sql.lock_instances.clone()
        };
        let rows = sqlx::query(sql).bind(ids).fetch_all(&mut *conn).await?;
        let mut out = HashMap::with_capacity(ids.len());
        let mut known = Vec::with_capacity(rows.len());
        let mut definitions = HashMap::new();
        for row in rows {
            let id: Uuid = row.try_get("id")?;
            let name: String = row.try_get("saga")?;
            let version = row.try_get::<i32, _>("version")? as u32;
            let last_seq: i64 = row.try_get("last_seq")?;
            match registry.get(&name, version) {
                Some(def) => match self.cache.get(id, &name, version, last_seq) {
                    Some(state) => {
                        out.insert(id, Ok((Arc::clone(def), Loaded { state, last_seq })));
                    }
                    None => {
                        definitions.insert(id, (Arc::clone(def), last_seq));
                        known.push(id);
                    }
                },
                None => {
                    out.insert(
                        id,
                        Err(Verdict::Deferred(
                            Error::UnknownDefinition { name, version }.to_string(),
                        )),
                    );
                }
            }
        }
        if !skip_locked {
            for id in ids {
                if !out.contains_key(id) && !definitions.contains_key(id) {
                    out.insert(*id, Err(Verdict::Rejected(format!("unknown saga {id}"))));
                }
            }
        }
        if known.is_empty() {
            return Ok(out);
        }
        let rows = sqlx::query(self.sql.load_events.clone())
            .bind(&known)
            .fetch_all(&mut *conn)
            .await?;
        let mut logs: HashMap<Uuid, Vec<Event>> = HashMap::new();
        for row in rows {
            let id: Uuid = row.try_get("saga_id")?;
            let Json(event): Json<Event> = row.try_get("data")?;
            logs.entry(id).or_default().push(event);
        }
        for (id, (definition, last_seq)) in definitions {
            let events = logs.remove(&id).unwrap_or_default();
            let state: SagaState = replay(&definition, &events)?;
            if events.len() as i64 != last_seq {
                // Events deleted or written around the store: the next events' numbers would not
                // follow the row's count. Not transient: the result is dead-lettered.
                return Err(ReplayError {
                    code: ReplayError::MISCOUNTED,
                    saga: definition.name().to_owned(),
                    version: definition.version(),
                    message: format!(
                        "saga {id}: the log holds {} events, its row counts {last_seq}",
                        events.len()
                    ),
                }
                .into());
            }
            out.insert(id, Ok((definition, Loaded { state, last_seq })));
        }
        Ok(out)
    }

    /// The kept states of all of `ids`, ready to decide from without reading or locking
    /// anything; `None` unless every one is kept and its definition registered here.
    fn kept(&self, registry: &Registry, ids: &[Uuid]) -> Option<LoadedSagas> {
        let states = self.cache.get_all(ids)?;
        ids.iter()
            .zip(states)
            .map(|(id, (saga, version, last_seq, state))| {
                let definition = Arc::clone(registry.get(&saga, version)?);
                Some((*id, Ok((definition, Loaded { state, last_seq }))))
            })
            .collect()
    }

    /// Applies `batch` under the row locks of its sagas (`ids`, from [`saga_ids`]), from their
    /// kept states or their logs, at the database's time (read on the transaction's own
    /// connection if the last reading is stale).
    async fn apply_locked(
        &self,
        registry: &Registry,
        batch: Vec<(Uuid, Input)>,
        ids: &[Uuid],
    ) -> Result<Vec<Applied>> {
        let mut tx = self.begin().await?;
        let now = self.clock.now_synced_on(&mut tx).await?;
        let loaded = self.load(&mut tx, registry, ids, false).await?;
        self.commit_decided(tx, loaded, &batch, now).await
    }

    /// Decides every input of `batch` over the loaded sagas, writes the rows of those whose
    /// row still shows the `last_seq` they were decided from, and reports. Returns the sagas
    /// another writer moved on (none under the row locks): nothing of theirs was written, their
    /// states are dropped from `loaded`, and their reports are placeholders to replace.
    async fn decide_and_write(
        &self,
        conn: &mut PgConnection,
        loaded: &mut LoadedSagas,
        batch: &[(Uuid, Input)],
        now: DateTime<Utc>,
    ) -> Result<(Vec<Applied>, HashSet<Uuid>)> {
        let seen: HashMap<Uuid, i64> = batch
            .iter()
            .filter_map(|(id, _)| match loaded.get(id) {
                Some(Ok((_, l))) => Some((*id, l.last_seq)),
                _ => None,
            })
            .collect();
        let mut writes = Writes::default();
        let mut decided: Vec<(Uuid, std::result::Result<Decided, Verdict>)> =
            Vec::with_capacity(batch.len());
        for (saga_id, input) in batch {
            match loaded.get_mut(saga_id) {
                Some(Ok((definition, saga))) => {
                    decided.push((
                        *saga_id,
                        Ok(apply_input(
                            definition,
                            *saga_id,
                            saga,
                            input,
                            now,
                            &mut writes,
                        )?),
                    ));
                }
                Some(Err(verdict)) => decided.push((*saga_id, Err(verdict.clone()))),
                None => decided.push((
                    *saga_id,
                    Err(Verdict::Rejected(format!("unknown saga {saga_id}"))),
                )),
            }
        }
        let written = self
            .write(conn, &writes, &seen, now, now + self.lease)
            .await?;
        for (id, d) in &mut decided {
            if written.stale.contains(id) {
                *d = Err(Verdict::Deferred(format!(
                    "saga {id} was moved on by another writer"
                )));
                loaded.remove(id);
            }
        }
        let mut envelopes: Vec<Option<Envelope>> =
            writes.outbox.into_iter().map(|(_, e)| Some(e)).collect();
        let applied = report(decided, |i| OutboxRecord {
            id: written.outbox_ids[i].expect("the rows of sagas that passed are written"),
            envelope: envelopes[i]
                .take()
                .expect("each outbox row is reported once"),
        });
        Ok((applied, written.stale))
    }

    /// Writes the rows of `writes` in one statement, for the sagas whose row still shows the
    /// `last_seq` in `seen` (every saga decided, with rows to write or not).
    async fn write(
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
        let rows = sqlx::query(self.sql.write.clone())
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

/// The sagas `batch` names, in id order (the order rows are locked in), each once.
fn saga_ids(batch: &[(Uuid, Input)]) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The sagas of a transaction, each loaded with its definition, or the verdict its inputs get
/// instead (an unknown saga or definition).
type LoadedSagas = HashMap<Uuid, std::result::Result<(Arc<Definition>, Loaded), Verdict>>;

/// What a write statement did.
struct Written {
    /// The outbox rows' ids, in the order of [`Writes::outbox`]; `None` for sagas in `stale`.
    outbox_ids: Vec<Option<i64>>,
    /// The sagas whose row had moved on from the `last_seq` they were decided from.
    stale: HashSet<Uuid>,
}

#[async_trait]
impl Store for PgStore {
    async fn start(&self, request: StartRequest) -> Result<Started> {
        // Written with the starts that queue up meanwhile, in one statement atomic on its own
        // (no BEGIN and COMMIT round trips), by a task of its own: a caller that gives up
        // waiting does not take the others' starts down with it.
        let (reply, started) = tokio::sync::oneshot::channel();
        if let Some(writer) = self.starts.push(Pending { request, reply }) {
            tokio::spawn(self.clone().write_starts(writer));
        }
        match started.await {
            Ok(Ok(started)) => started,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            // The writer is gone without a word (its runtime shut down).
            Err(_) => Err(Error::Database(sqlx::Error::WorkerCrashed)),
        }
    }

    /// When every saga of the batch has its state kept here (the usual case for an orchestrator
    /// that runs them), the batch is decided from those states and written without taking the
    /// row locks first: the write statement writes a saga's rows only if its row still shows
    /// the `last_seq` the state was kept at, and it is sent alone, atomic on its own, without
    /// `BEGIN` and `COMMIT`. The inputs of sagas another writer moved on meanwhile are applied
    /// again under their row locks, from their logs. Otherwise the batch
    /// locks its sagas' rows, reads the logs of those not kept, writes, and commits.
    async fn apply(&self, registry: &Registry, batch: Vec<(Uuid, Input)>) -> Result<Vec<Applied>> {
        let ids = saga_ids(&batch);
        let Some(mut loaded) = self.kept(registry, &ids) else {
            return self.apply_locked(registry, batch, &ids).await;
        };
        let mut conn = self.by_key().await?.acquire().await?;
        // On the connection the write goes through: never a wait for another.
        let now = self.clock.now_synced_on(&mut conn).await?;
        let (mut applied, stale) = self
            .decide_and_write(&mut conn, &mut loaded, &batch, now)
            .await?;
        drop(conn);
        self.keep(loaded);
        if !stale.is_empty() {
            self.cache.forget(stale.iter().copied());
            let (positions, again): (Vec<usize>, Vec<(Uuid, Input)>) = batch
                .into_iter()
                .enumerate()
                .filter(|(_, (id, _))| stale.contains(id))
                .unzip();
            let again_ids = saga_ids(&again);
            match self.apply_locked(registry, again, &again_ids).await {
                Ok(redone) => {
                    for (position, a) in positions.into_iter().zip(redone) {
                        applied[position] = a;
                    }
                }
                // The rest of the batch is committed and reported as such; these keep their
                // deferred verdicts, so their inputs are handed back and come again.
                Err(e) => tracing::warn!(
                    error = %e,
                    count = positions.len(),
                    "applying results again under the row lock failed; deferring them"
                ),
            }
        }
        Ok(applied)
    }

    async fn fire_due_timers(&self, registry: &Registry, limit: usize) -> Result<Vec<Applied>> {
        let (names, versions) = registered(registry);
        // By key, like the hot path: the loop asks this at every wake-up.
        let mut tx = self.begin().await?;
        let now = self.clock.now_synced_on(&mut tx).await?;
        let mut candidates: Vec<Uuid> = sqlx::query_scalar(self.sql.due_timer_sagas.clone())
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
                let mut applied = Vec::new();
                for saga_id in candidates {
                    match self.fire_for(registry, &[saga_id], now).await {
                        Ok(a) => applied.extend(a),
                        Err(e) if !e.is_transient() => {
                            tracing::error!(saga.id = %saga_id, error = %e, "a timer cannot be applied; postponing it");
                            sqlx::query(self.sql.postpone_timers.clone())
                                .persistent(false)
                                .bind(saga_id)
                                .bind(now)
                                .bind(now + crate::store::TIMER_FAILURE_BACKOFF)
                                .execute(&self.pool)
                                .await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(applied)
            }
            result => result,
        }
    }

    async fn next_timer_due(&self, registry: &Registry) -> Result<Option<DateTime<Utc>>> {
        let (names, versions) = registered(registry);
        let mut tx = self.begin().await?;
        let next = sqlx::query_scalar(self.sql.next_timer.clone())
            .bind(&names)
            .bind(&versions)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(next)
    }

    async fn enqueue(&self, saga_id: Uuid, timer: Timer) -> Result<()> {
        let mut tx = self.begin().await?;
        // Due at the database's `now()`, not this process's.
        let inserted = sqlx::query(self.sql.set_timers.clone())
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

    async fn timer_notifications(&self) -> Result<BoxStream<'static, ()>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(&format!("{}_timers", self.schema)).await?;
        Ok(listener.into_stream().map(|_| ()).boxed())
    }

    async fn claim_outbox(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxRecord>> {
        // Leases are read and set by the database's `now()`.
        let rows = sqlx::query(self.sql.claim_outbox.clone())
            .bind(lease.as_secs_f64())
            .bind(limit as i64)
            .fetch_all(self.relaxed().await?)
            .await?;
        rows.into_iter()
            .map(|row| {
                let destination: String = row.try_get("destination")?;
                let Json(headers): Json<BTreeMap<String, String>> = row.try_get("headers")?;
                Ok(OutboxRecord {
                    id: row.try_get("id")?,
                    envelope: Envelope {
                        destination: Destination::decode(&destination).ok_or_else(|| {
                            Error::Config(format!(
                                "outbox row has a bad destination `{destination}`"
                            ))
                        })?,
                        message: Message {
                            id: row.try_get("message_id")?,
                            headers,
                            body: row.try_get("body")?,
                        },
                    },
                })
            })
            .collect()
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<()> {
        sqlx::query(self.sql.delete_outbox.clone())
            .bind(ids)
            .execute(self.relaxed().await?)
            .await?;
        Ok(())
    }

    async fn outbox_notifications(&self) -> Result<BoxStream<'static, ()>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(&self.notify_channel()).await?;
        Ok(listener.into_stream().map(|_| ()).boxed())
    }

    async fn summary(&self, saga_id: Uuid) -> Result<Option<SagaSummary>> {
        // Unnamed: a plan cached while `instances` was small would scan it once it has grown.
        let row = sqlx::query(self.sql.summary.clone())
            .persistent(false)
            .bind(saga_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(summary_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaSummary>> {
        let rows = sqlx::query(self.sql.list.clone())
            .bind(filter.status.map(|s| s.as_str()))
            .bind(&filter.saga)
            .bind(filter.created_before)
            .bind(filter.created_after)
            .bind(i64::from(filter.limit.unwrap_or(50)))
            .bind(i64::from(filter.offset))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn stats(&self) -> Result<crate::store::StoreStats> {
        let rows = sqlx::query(self.sql.stats_sagas.clone())
            .fetch_all(&self.pool)
            .await?;
        let mut sagas = Vec::with_capacity(rows.len());
        for row in rows {
            let status: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            sagas.push((
                row.try_get("saga")?,
                status.parse().map_err(Error::Config)?,
                n as u64,
            ));
        }
        let (backlog, oldest, due, pending): (i64, f64, i64, i64) =
            sqlx::query_as(self.sql.stats_queues.clone())
                .fetch_one(&self.pool)
                .await?;
        Ok(crate::store::StoreStats {
            sagas,
            outbox_backlog: backlog as u64,
            outbox_oldest_age_secs: oldest,
            timers_due: due as u64,
            timers_pending: pending as u64,
        })
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64> {
        // In chunks, each its own transaction, so no lock is held long.
        const CHUNK: i64 = 10_000;
        let mut purged = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let ids: Vec<Uuid> = sqlx::query_scalar(self.sql.purge.clone())
                .bind(before)
                .bind(CHUNK)
                .fetch_all(&mut *tx)
                .await?;
            for sql in [&self.sql.purge_events, &self.sql.purge_timers] {
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

    async fn history(&self, saga_id: Uuid) -> Result<Vec<RecordedEvent>> {
        let rows = sqlx::query(self.sql.history.clone())
            .persistent(false)
            .bind(saga_id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let Json(event): Json<Event> = row.try_get("data")?;
                Ok(RecordedEvent {
                    seq: row.try_get("seq")?,
                    at: row.try_get("recorded_at")?,
                    event,
                })
            })
            .collect()
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

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>> {
        let rows = sqlx::query(self.sql.count_by_status.clone())
            .fetch_all(&self.pool)
            .await?;
        let mut counts = BTreeMap::new();
        for row in rows {
            let status: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            counts.insert(status.parse().map_err(Error::Config)?, n as u64);
        }
        Ok(counts)
    }
}

fn summary_from_row(row: &sqlx::postgres::PgRow) -> Result<SagaSummary> {
    let status: String = row.try_get("status")?;
    Ok(SagaSummary {
        id: row.try_get("id")?,
        saga: row.try_get("saga")?,
        version: row.try_get::<i32, _>("version")? as u32,
        status: status.parse().map_err(Error::Config)?,
        business_key: row.try_get("business_key")?,
        reason: row.try_get("reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The (name, version) pairs of the registry, as two arrays for `UNNEST`.
fn registered(registry: &Registry) -> (Vec<String>, Vec<i32>) {
    registry
        .iter()
        .map(|d| (d.name().to_owned(), d.version() as i32))
        .unzip()
}
