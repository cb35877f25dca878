//! Replayed saga states kept between transactions, so applying a result does not read and
//! replay the saga's whole log again.
//!
//! An entry is used only when it is proven equal to a replay: the saga's row, locked by the
//! transaction, has the same definition and the same `last_seq` as when the entry was made.
//! Every append of events raises `last_seq` in the same transaction, so an entry made before
//! any other writer (another orchestrator, a client's signal, an operator) touched the saga
//! is exactly what replaying its log gives; after one, it no longer matches and the log is
//! read again.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

use crate::state::SagaState;

/// A state, and what it is valid for.
#[derive(Debug)]
struct Entry {
    saga: String,
    version: u32,
    last_seq: i64,
    state: SagaState,
}

/// A bounded map of saga id to replayed state.
#[derive(Debug)]
pub(super) struct StateCache {
    entries: Mutex<HashMap<Uuid, Entry>>,
    capacity: usize,
}

impl StateCache {
    /// Holds at most `capacity` sagas (0 disables it).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The state of `id` if it was made for this definition at this `last_seq`.
    pub(super) fn get(
        &self,
        id: Uuid,
        saga: &str,
        version: u32,
        last_seq: i64,
    ) -> Option<SagaState> {
        let entries = self.entries.lock().expect("state cache lock");
        entries
            .get(&id)
            .filter(|e| e.last_seq == last_seq && e.version == version && e.saga == saga)
            .map(|e| e.state.clone())
    }

    /// The kept states of all of `ids`, with their definitions and `last_seq`s; `None` unless
    /// every one is kept.
    pub(super) fn get_all(&self, ids: &[Uuid]) -> Option<Vec<(String, u32, i64, SagaState)>> {
        let entries = self.entries.lock().expect("state cache lock");
        ids.iter()
            .map(|id| {
                let e = entries.get(id)?;
                Some((e.saga.clone(), e.version, e.last_seq, e.state.clone()))
            })
            .collect()
    }

    /// Drops the states of `ids` (another writer moved those sagas on).
    pub(super) fn forget(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut entries = self.entries.lock().expect("state cache lock");
        for id in ids {
            entries.remove(&id);
        }
    }

    /// Keeps the states of sagas still in progress (after their transaction committed); drops
    /// those that finished.
    pub(super) fn put(
        &self,
        states: impl IntoIterator<Item = (Uuid, String, u32, i64, SagaState)>,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().expect("state cache lock");
        for (id, saga, version, last_seq, state) in states {
            if !state.status.is_active() {
                entries.remove(&id);
                continue;
            }
            if entries.len() >= self.capacity && !entries.contains_key(&id) {
                // Any victim will do: a miss only costs a read of the log.
                if let Some(victim) = entries.keys().next().copied() {
                    entries.remove(&victim);
                }
            }
            entries.insert(
                id,
                Entry {
                    saga,
                    version,
                    last_seq,
                    state,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SagaStatus;

    fn state(status: SagaStatus) -> SagaState {
        let saga = crate::SagaDefinition::<u32>::builder("order", 1)
            .step("only", |s| s.action("svc", "only", |c| Ok(*c.input())))
            .build()
            .unwrap();
        let started = crate::Event::Started {
            saga: "order".into(),
            version: 1,
            input: serde_json::json!(1),
            business_key: None,
            steps: Vec::new(),
            groups: Vec::new(),
        };
        let mut state = SagaState::started(saga.definition(), &started).unwrap();
        state.status = status;
        state
    }

    #[test]
    fn an_entry_serves_only_its_definition_and_sequence() {
        let cache = StateCache::new(2);
        let id = Uuid::new_v4();
        cache.put([(id, "order".into(), 1, 3, state(SagaStatus::Running))]);
        assert!(cache.get(id, "order", 1, 3).is_some());
        assert!(
            cache.get(id, "order", 1, 4).is_none(),
            "another writer appended"
        );
        assert!(cache.get(id, "order", 2, 3).is_none());
        assert!(cache.get(id, "payment", 1, 3).is_none());
        cache.put([(id, "order".into(), 1, 5, state(SagaStatus::Completed))]);
        assert!(
            cache.get(id, "order", 1, 5).is_none(),
            "finished sagas are dropped"
        );
    }

    #[test]
    fn it_stays_within_its_capacity() {
        let cache = StateCache::new(2);
        for _ in 0..5 {
            cache.put([(
                Uuid::new_v4(),
                "order".into(),
                1,
                1,
                state(SagaStatus::Running),
            )]);
        }
        assert_eq!(cache.entries.lock().unwrap().len(), 2);
        let off = StateCache::new(0);
        off.put([(
            Uuid::new_v4(),
            "order".into(),
            1,
            1,
            state(SagaStatus::Running),
        )]);
        assert!(off.entries.lock().unwrap().is_empty());
    }
}
