//! The client: start sagas, and read their status and history.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use uuid::Uuid;

use std::time::Duration;

use crate::decide::{OperatorAction, Timer};
use crate::definition::SagaDefinition;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent};
use crate::state::SagaStatus;
use crate::store::{ListFilter, SagaSummary, StartRequest, Started, Store};

mod outcome;

pub use outcome::SagaOutcome;

/// Starts sagas and reads them back. Cheap to clone.
///
/// ```no_run
/// # async fn demo(def: saga_core::SagaDefinition<u32>, store: saga_core::PgStore) -> saga_core::Result<()> {
/// let client = saga_core::Client::new(std::sync::Arc::new(store));
/// let started = client.start_with_key(&def, &42, "order-42").await?;
/// let summary = client.summary(started.saga_id).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// How long [`Client::cancel`] waits for an orchestrator's answer.
    pub const CANCEL_WAIT: Duration = Duration::from_secs(10);

    /// A client of `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Starts a saga. Once this returns, the saga runs to its end through any crash.
    ///
    /// On [`PgStore`](crate::PgStore), starts made at the same time (from many tasks) share
    /// one statement and one commit; a lone start is written at once. Through the store (or a
    /// clone of it) an [`Orchestrator`](crate::Orchestrator) of this process runs on, the
    /// saga's first command goes to that orchestrator's relay right after the commit, and its
    /// state is kept in memory for its first result (among the store's
    /// [`cached_sagas`](crate::store::PgStoreBuilder::cached_sagas)); through any other store, the
    /// relays' pollers are woken to publish it.
    pub async fn start<I: Serialize>(
        &self,
        definition: &SagaDefinition<I>,
        input: &I,
    ) -> Result<Started> {
        self.start_request(definition, input, None).await
    }

    /// Starts a saga at most once per `business_key`: a second call with the same key (for the
    /// same saga name) returns the first saga's id with `created: false`.
    pub async fn start_with_key<I: Serialize>(
        &self,
        definition: &SagaDefinition<I>,
        input: &I,
        business_key: impl Into<String>,
    ) -> Result<Started> {
        self.start_request(definition, input, Some(business_key.into()))
            .await
    }

    async fn start_request<I: Serialize>(
        &self,
        definition: &SagaDefinition<I>,
        input: &I,
        business_key: Option<String>,
    ) -> Result<Started> {
        let started = self
            .store
            .start(StartRequest {
                definition: Arc::clone(definition.definition()),
                input: serde_json::to_value(input)?,
                business_key,
            })
            .await?;
        tracing::debug!(saga.id = %started.saga_id, saga.name = definition.name(), created = started.created, "saga started");
        Ok(started)
    }

    /// Waits until the saga ends (`completed`, `compensated` or `cancelled`) or parks as
    /// `stuck`, for at most `timeout`, and returns how, with its steps' outputs.
    ///
    /// It reads the saga's status (a lookup by primary key) at growing intervals, from 10 ms
    /// up to half a second, and its log once, when it has settled. Fails with
    /// [`Error::StillRunning`] if the saga is still running when `timeout` has passed (it goes
    /// on), and with [`Error::UnknownSaga`] if there is no such saga.
    ///
    /// ```no_run
    /// # async fn demo(client: saga_core::Client, def: saga_core::SagaDefinition<u32>) -> saga_core::Result<()> {
    /// use std::time::Duration;
    ///
    /// let started = client.start(&def, &42).await?;
    /// let outcome = client.outcome(started.saga_id, Duration::from_secs(30)).await?;
    /// if outcome.is_completed() {
    ///     let receipt: Option<String> = outcome.output("charge")?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn outcome(&self, saga_id: Uuid, timeout: Duration) -> Result<SagaOutcome> {
        const FIRST_PAUSE: Duration = Duration::from_millis(10);
        const LONGEST_PAUSE: Duration = Duration::from_millis(500);
        // `None`: a wait too long to count is a wait without end.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let mut pause = FIRST_PAUSE;
        loop {
            let summary = self.existing(saga_id).await?;
            if !summary.status.is_active() {
                let history = self.store.history(saga_id).await?;
                if history.is_empty() {
                    // Purged between the two reads.
                    return Err(Error::UnknownSaga(saga_id));
                }
                return Ok(SagaOutcome::from_log(
                    saga_id,
                    summary.status,
                    summary.reason,
                    &history,
                ));
            }
            let left = deadline.map_or(LONGEST_PAUSE, |d| {
                d.saturating_duration_since(tokio::time::Instant::now())
            });
            if left.is_zero() {
                return Err(Error::StillRunning {
                    saga_id,
                    status: summary.status,
                    waited: timeout,
                });
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }

    /// The saga's summary; [`Error::UnknownSaga`] if there is no such saga.
    async fn existing(&self, saga_id: Uuid) -> Result<SagaSummary> {
        self.store
            .summary(saga_id)
            .await?
            .ok_or(Error::UnknownSaga(saga_id))
    }

    /// Sends the signal `name` to a saga. It is recorded durably and applied by an
    /// orchestrator: a wait step for `name` takes its payload as the step's output. A signal
    /// that arrives before the saga reaches its wait is kept until then; one that arrives after
    /// the saga ended is dropped.
    pub async fn signal<T: Serialize>(&self, saga_id: Uuid, name: &str, payload: &T) -> Result<()> {
        let payload = serde_json::to_value(payload)?;
        crate::codec::refuse_sealed_shape(&payload, "the signal's payload")?;
        let timer = Timer::Signal {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            payload,
        };
        self.store.enqueue(saga_id, timer).await
    }

    /// Cancels a saga: the step in flight settles (or times out), then the completed steps
    /// compensate in reverse and the saga ends `cancelled`. Refused, with
    /// [`Error::CancelRefused`] saying why, once the saga has started its pivot, or if it
    /// already ended or compensates. Waits up to [`Client::CANCEL_WAIT`] for an orchestrator to
    /// decide.
    pub async fn cancel(&self, saga_id: Uuid, reason: &str) -> Result<()> {
        let summary = self.existing(saga_id).await?;
        if !summary.status.is_active() {
            return Err(Error::CancelRefused {
                saga_id,
                why: format!("the saga is {}", summary.status),
            });
        }
        let id = Uuid::now_v7();
        let timer = Timer::Cancel {
            id,
            reason: reason.to_owned(),
        };
        self.request(saga_id, id, timer, "cancel")
            .await
            .map_err(|e| match e {
                Error::ActionRefused { why, .. } => Error::CancelRefused { saga_id, why },
                other => other,
            })
    }

    /// Runs an operator's action on a saga (retry a stuck step, resolve a stuck compensation
    /// by hand, pause, resume) and waits up to [`Client::CANCEL_WAIT`] for an orchestrator to
    /// apply it. A refusal is [`Error::ActionRefused`] with the reason.
    pub async fn act(&self, saga_id: Uuid, action: OperatorAction) -> Result<()> {
        self.store
            .summary(saga_id)
            .await?
            .ok_or(Error::UnknownSaga(saga_id))?;
        let id = Uuid::now_v7();
        let name = action.name();
        self.request(saga_id, id, Timer::Operator { id, action }, name)
            .await
    }

    /// Queues a request and waits for its verdict in the log.
    async fn request(
        &self,
        saga_id: Uuid,
        id: Uuid,
        timer: Timer,
        what: &'static str,
    ) -> Result<()> {
        self.store.enqueue(saga_id, timer).await?;
        let refused = |why: String| Error::ActionRefused {
            saga_id,
            action: what,
            why,
        };
        let deadline = tokio::time::Instant::now() + Self::CANCEL_WAIT;
        loop {
            for record in self.store.history(saga_id).await? {
                match record.event {
                    Event::CancelRequested { request, .. }
                    | Event::RetryRequested { request, .. }
                    | Event::Resolved { request, .. }
                    | Event::Paused { request, .. }
                    | Event::Resumed { request }
                        if request == id =>
                    {
                        return Ok(());
                    }
                    Event::CancelRefused { request, why, .. }
                    | Event::ActionRefused { request, why, .. }
                        if request == id =>
                    {
                        return Err(refused(why));
                    }
                    _ => {}
                }
            }
            if what == "cancel" {
                let status = self.store.summary(saga_id).await?.map(|s| s.status);
                if let Some(status) = status.filter(|s| !s.is_active()) {
                    // It may have ended by this very cancel, between the two reads.
                    let history = self.store.history(saga_id).await?;
                    let accepted = history.iter().any(
                        |r| matches!(r.event, Event::CancelRequested { request, .. } if request == id),
                    );
                    return if accepted {
                        Ok(())
                    } else {
                        Err(refused(format!("the saga is {status}")))
                    };
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotAnswered {
                    saga_id,
                    what,
                    waited: Self::CANCEL_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sagas matching `filter`, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaSummary>> {
        self.store.list(filter).await
    }

    /// Deletes sagas that finished (completed, compensated, cancelled) before `before`, with
    /// their logs and timers; returns how many.
    pub async fn purge(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        self.store.purge(before).await
    }

    /// One saga's status, or `None` if there is no such saga.
    pub async fn summary(&self, saga_id: Uuid) -> Result<Option<SagaSummary>> {
        self.store.summary(saga_id).await
    }

    /// One saga's whole log, oldest event first.
    pub async fn history(&self, saga_id: Uuid) -> Result<Vec<RecordedEvent>> {
        self.store.history(saga_id).await
    }

    /// Sagas by name and status: every unfinished one, and those finished since
    /// `finished_since`.
    pub async fn counts(
        &self,
        finished_since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<crate::store::SagaCount>> {
        self.store.counts(finished_since).await
    }

    /// How many sagas are in each status.
    pub async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>> {
        self.store.count_by_status().await
    }
}
