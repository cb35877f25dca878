//! The seam to durable storage: the event log, instances, the outbox and timers.
//!
//! [`PgStore`] keeps them in PostgreSQL; [`MemoryStore`] keeps them in memory for tests and the
//! embedded mode. Both decide through the same pure core (`replay` + `decide`).

mod memory;
mod pg;
mod transition;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::decide::{Input, Timer, Verdict};
use crate::definition::Definition;
use crate::error::Result;
use crate::event::RecordedEvent;
use crate::message::Envelope;
use crate::registry::Registry;
use crate::state::SagaStatus;

pub use memory::MemoryStore;
pub use pg::{CHECK_EVERY, CHECK_TIMEOUT, LocalClock, PgHosts, PgStore, PgStoreBuilder, Target};

/// How long the timers of a saga that cannot be applied wait before the next try.
pub const TIMER_FAILURE_BACKOFF: Duration = Duration::from_secs(30);

/// A committed outbox row, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// The row's id, to delete it once published.
    pub id: i64,
    /// What to publish.
    pub envelope: Envelope,
}

/// The relay of an orchestrator that runs in this process: committed outbox rows handed to
/// it are published at once, without waiting for a poller. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalRelay(mpsc::UnboundedSender<Vec<OutboxRecord>>);

impl LocalRelay {
    /// A relay fed through `sender`.
    pub fn new(sender: mpsc::UnboundedSender<Vec<OutboxRecord>>) -> Self {
        Self(sender)
    }

    /// Hands over committed rows, claimed for the hand-over; false if the relay has stopped
    /// (the rows are then published by a poller once their claim lapses, up to a lease
    /// later).
    pub fn hand_over(&self, records: Vec<OutboxRecord>) -> bool {
        self.0.send(records).is_ok()
    }

    /// Whether `self` and `other` feed the same relay.
    pub fn same_relay(&self, other: &LocalRelay) -> bool {
        self.0.same_channel(&other.0)
    }
}

/// What applying one input did, after the commit.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Applied {
    /// The saga the input was for.
    pub saga_id: Uuid,
    /// Whether the input was applied, ignored, rejected or deferred.
    pub verdict: Verdict,
    /// The outbox rows written, claimed by the caller for publishing.
    pub outbox: Vec<OutboxRecord>,
    /// The earliest timer set, if any, so the timer loop can wake in time.
    pub wake_at: Option<DateTime<Utc>>,
    /// The saga's status after the input, if the saga was loaded.
    pub status: Option<SagaStatus>,
    /// Whether this input moved the saga out of running or compensating.
    pub settled: bool,
    /// Why the saga is stuck (or compensated), when this input settled it.
    pub reason: Option<String>,
    /// The saga's definition name, if the saga was loaded.
    pub saga: Option<String>,
    /// How many retries the input scheduled.
    pub retries: u32,
}

/// Figures read from the store when metrics are scraped.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Sagas per (name, status).
    pub sagas: Vec<(String, SagaStatus, u64)>,
    /// Outbox rows not yet published.
    pub outbox_backlog: u64,
    /// Age of the oldest outbox row, in seconds.
    pub outbox_oldest_age_secs: f64,
    /// Timers due and not fired.
    pub timers_due: u64,
    /// Timers not fired yet (due or not).
    pub timers_pending: u64,
}

/// What starting a saga did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The saga's id.
    pub saga_id: Uuid,
    /// False when a saga with the same business key already existed (its id is returned).
    pub created: bool,
}

/// One saga instance, without its log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaSummary {
    /// The saga's id.
    pub id: Uuid,
    /// The definition's name.
    pub saga: String,
    /// The definition's version.
    pub version: u32,
    /// Where it stands.
    pub status: SagaStatus,
    /// Its business key, if any.
    pub business_key: Option<String>,
    /// Why it compensated or got stuck, if it did.
    pub reason: Option<String>,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// Which sagas [`QueryStore::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<SagaStatus>,
    /// Only this saga name.
    pub saga: Option<String>,
    /// Only sagas created before this.
    pub created_before: Option<DateTime<Utc>>,
    /// Only sagas created after this.
    pub created_after: Option<DateTime<Utc>>,
    /// Only sagas with this business key.
    pub business_key: Option<String>,
    /// Oldest first instead of newest first.
    pub oldest_first: bool,
    /// At most this many (default 50).
    pub limit: Option<u32>,
    /// Skip this many (pagination).
    pub offset: u32,
}

/// A request to start a saga.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The definition to run.
    pub definition: Arc<Definition>,
    /// The saga input, as JSON.
    pub input: Value,
    /// Makes the start idempotent: the same key (for the same saga name) gives the same id.
    pub business_key: Option<String>,
}

/// Durable storage of sagas: the engine's part, the outbox's and the operators' queries,
/// which any store implements together (a blanket impl), so `Arc<dyn Store>` serves them all.
pub trait Store: SagaStore + OutboxStore + QueryStore {}

impl<T: SagaStore + OutboxStore + QueryStore + ?Sized> Store for T {}

/// What the engine needs of a store: starting sagas, applying inputs, and durable time.
///
/// Every method that changes a saga does so in one transaction: it locks the instance, replays
/// its log, decides, and appends events, outbox rows and timers together.
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Creates the instance, appends `started`, and dispatches the first step.
    async fn start(&self, request: StartRequest) -> Result<Started>;

    /// Applies a batch of inputs in one transaction; returns one [`Applied`] per input, in order.
    async fn apply(&self, registry: &Registry, batch: Vec<(Uuid, Input)>) -> Result<Vec<Applied>>;

    /// Claims up to `limit` due timers of sagas whose definition `registry` holds (skipping
    /// those another process holds) and applies them. A saga whose timer cannot be applied (its
    /// log does not replay) has its due timers postponed by [`TIMER_FAILURE_BACKOFF`], with an
    /// error logged, so it does not hold back the others. If the database goes out of reach
    /// partway, returns what fired so far (the error, if nothing fired); the rest stays due.
    async fn fire_due_timers(&self, registry: &Registry, limit: usize) -> Result<Vec<Applied>>;

    /// When the earliest pending timer of a saga whose definition `registry` holds is due.
    async fn next_timer_due(&self, registry: &Registry) -> Result<Option<DateTime<Utc>>>;

    /// Queues `timer` for `saga_id`, due now (a signal, a cancel request), and wakes the
    /// orchestrators. Fails with [`Error::UnknownSaga`](crate::Error::UnknownSaga).
    async fn enqueue(&self, saga_id: Uuid, timer: Timer) -> Result<()>;

    /// A stream that yields when timers may have been queued by someone else.
    async fn timer_notifications(&self) -> Result<BoxStream<'static, ()>>;

    /// The time as this store keeps it (for [`PgStore`], the database's clock, as this process
    /// last measured it): the orchestrator sleeps until due times by it.
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    /// Called by an orchestrator that runs on this store, in this process, with its relay. The
    /// store may then hand the first commands of the sagas started through it to that relay
    /// right after their commit, instead of leaving them to a poller. One relay at a time: a
    /// second orchestrator's replaces the first's, and once it is detached, starts go to the
    /// pollers again. Ignored by default.
    fn attach_relay(&self, relay: LocalRelay) {
        let _ = relay;
    }

    /// Undoes [`SagaStore::attach_relay`] for `relay` (a relay attached since is kept).
    fn detach_relay(&self, relay: &LocalRelay) {
        let _ = relay;
    }
}

/// What the relay needs of a store: the committed commands waiting to be published.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Claims up to `limit` outbox rows that nobody holds, for `lease`.
    async fn claim_outbox(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxRecord>>;

    /// Deletes published outbox rows.
    async fn delete_outbox(&self, ids: &[i64]) -> Result<()>;

    /// A stream that yields when new outbox rows may have been committed by someone else.
    async fn outbox_notifications(&self) -> Result<BoxStream<'static, ()>>;
}

/// What operators, metrics and clients read: sagas, their logs, counts, and the purge.
#[async_trait]
pub trait QueryStore: Send + Sync + 'static {
    /// One saga, without its log.
    async fn summary(&self, saga_id: Uuid) -> Result<Option<SagaSummary>>;

    /// A saga's whole log.
    async fn history(&self, saga_id: Uuid) -> Result<Vec<RecordedEvent>>;

    /// Sagas matching `filter`, newest first (or oldest first, as the filter says).
    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaSummary>>;

    /// Deletes sagas that finished (completed, compensated, cancelled) before `before`, with
    /// their logs and timers; returns how many.
    async fn purge(&self, before: DateTime<Utc>) -> Result<u64>;

    /// Figures for metrics: sagas by name and status, outbox backlog, timers.
    async fn stats(&self) -> Result<StoreStats>;

    /// How many sagas are in each status (statuses with none are left out).
    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>>;

    /// Sagas by name and status: every unfinished one, and those that finished at or after
    /// `finished_since` (counting every finished saga of a long log would read all of it).
    async fn counts(&self, finished_since: DateTime<Utc>) -> Result<Vec<SagaCount>>;
}

/// How many sagas of one name are in one status (see [`QueryStore::counts`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaCount {
    /// The definition's name.
    pub saga: String,
    /// The status.
    pub status: SagaStatus,
    /// How many.
    pub count: u64,
}
