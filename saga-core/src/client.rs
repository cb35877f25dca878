//! The client: start sagas, and read their status and history.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use uuid::Uuid;

use crate::definition::SagaDefinition;
use crate::error::Result;
use crate::event::RecordedEvent;
use crate::state::SagaStatus;
use crate::store::{SagaSummary, StartRequest, Started, Store};

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
    /// A client of `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Starts a saga. Once this returns, the saga runs to its end through any crash.
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

    /// One saga's status, or `None` if there is no such saga.
    pub async fn summary(&self, saga_id: Uuid) -> Result<Option<SagaSummary>> {
        self.store.summary(saga_id).await
    }

    /// One saga's whole log, oldest event first.
    pub async fn history(&self, saga_id: Uuid) -> Result<Vec<RecordedEvent>> {
        self.store.history(saga_id).await
    }

    /// How many sagas are in each status.
    pub async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>> {
        self.store.count_by_status().await
    }
}
