//! What operators and metrics read of the in-memory store, and its purge.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::MemoryStore;
use crate::error::Result;
use crate::event::RecordedEvent;
use crate::state::SagaStatus;
use crate::store::{ListFilter, QueryStore, SagaCount, SagaSummary};

#[async_trait]
impl QueryStore for MemoryStore {
    async fn summary(&self, saga_id: Uuid) -> Result<Option<SagaSummary>> {
        Ok(self
            .lock()
            .instances
            .get(&saga_id)
            .map(|i| i.summary.clone()))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaSummary>> {
        let inner = self.lock();
        let mut found: Vec<SagaSummary> = inner
            .instances
            .values()
            .map(|i| &i.summary)
            .filter(|s| filter.status.is_none_or(|st| s.status == st))
            .filter(|s| filter.saga.as_ref().is_none_or(|n| &s.saga == n))
            .filter(|s| filter.created_before.is_none_or(|t| s.created_at < t))
            .filter(|s| filter.created_after.is_none_or(|t| s.created_at > t))
            .filter(|s| {
                filter
                    .business_key
                    .as_ref()
                    .is_none_or(|k| s.business_key.as_ref() == Some(k))
            })
            .cloned()
            .collect();
        found.sort_by_key(|s| std::cmp::Reverse((s.created_at, s.id)));
        if filter.oldest_first {
            found.reverse();
        }
        Ok(found
            .into_iter()
            .skip(filter.offset as usize)
            .take(filter.limit.unwrap_or(50) as usize)
            .collect())
    }

    async fn stats(&self) -> Result<crate::store::StoreStats> {
        let now = Utc::now();
        let inner = self.lock();
        let mut counts: BTreeMap<(String, SagaStatus), u64> = BTreeMap::new();
        for i in inner.instances.values() {
            *counts
                .entry((i.summary.saga.clone(), i.summary.status))
                .or_default() += 1;
        }
        Ok(crate::store::StoreStats {
            sagas: counts
                .into_iter()
                .map(|((saga, status), n)| (saga, status, n))
                .collect(),
            outbox_backlog: inner.outbox.len() as u64,
            outbox_oldest_age_secs: 0.0,
            timers_due: inner.timers.values().filter(|t| t.due_at <= now).count() as u64,
            timers_pending: inner.timers.len() as u64,
        })
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64> {
        let mut inner = self.lock();
        let old: Vec<Uuid> = inner
            .instances
            .values()
            .filter(|i| i.finished_at.is_some_and(|at| at < before))
            .map(|i| i.summary.id)
            .collect();
        for id in &old {
            inner.instances.remove(id);
            inner.timers.retain(|(saga_id, _), _| saga_id != id);
        }
        inner.keys.retain(|_, id| !old.contains(id));
        Ok(old.len() as u64)
    }

    async fn history(&self, saga_id: Uuid) -> Result<Vec<RecordedEvent>> {
        Ok(self
            .lock()
            .instances
            .get(&saga_id)
            .map(|i| i.events.clone())
            .unwrap_or_default())
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>> {
        let mut counts = BTreeMap::new();
        for instance in self.lock().instances.values() {
            *counts.entry(instance.summary.status).or_default() += 1;
        }
        Ok(counts)
    }

    async fn counts(&self, finished_since: DateTime<Utc>) -> Result<Vec<SagaCount>> {
        let mut counts: BTreeMap<(String, SagaStatus), u64> = BTreeMap::new();
        for i in self.lock().instances.values() {
            let s = &i.summary;
            if i.finished_at.is_some_and(|at| at < finished_since) {
                continue;
            }
            *counts.entry((s.saga.clone(), s.status)).or_default() += 1;
        }
        Ok(counts
            .into_iter()
            .map(|((saga, status), count)| SagaCount {
                saga,
                status,
                count,
            })
            .collect())
    }
}
