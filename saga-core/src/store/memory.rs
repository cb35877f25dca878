//! A store in memory, for tests and the embedded mode. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::watch;
use uuid::Uuid;

use super::transition::{Loaded, Writes, apply_input, report};
use super::{Applied, OutboxRecord, OutboxStore, SagaStore, SagaSummary, StartRequest, Started};
use crate::decide::{Input, Timer, Verdict};
use crate::error::Result;
use crate::event::{Event, RecordedEvent};
use crate::message::Envelope;
use crate::registry::Registry;
use crate::state::{SagaState, replay};

struct Instance {
    summary: SagaSummary,
    events: Vec<RecordedEvent>,
    /// When the saga finished, for purge.
    finished_at: Option<DateTime<Utc>>,
}

struct PendingTimer {
    timer: Timer,
    due_at: DateTime<Utc>,
}

#[derive(Default)]
struct Inner {
    instances: HashMap<Uuid, Instance>,
    keys: HashMap<(String, String), Uuid>,
    outbox: BTreeMap<i64, (Envelope, DateTime<Utc>)>,
    next_outbox_id: i64,
    timers: BTreeMap<(Uuid, String), PendingTimer>,
}

/// Sagas kept in memory, with the same semantics as [`PgStore`](super::PgStore) within one
/// process. Clones share the same data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    outbox_signal: Arc<watch::Sender<u64>>,
    timer_signal: Arc<watch::Sender<u64>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            outbox_signal: Arc::new(watch::channel(0).0),
            timer_signal: Arc::new(watch::channel(0).0),
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("memory store lock")
    }
}

impl Inner {
    /// Whether `registry` holds the definition of saga `saga_id`.
    fn knows(&self, registry: &Registry, saga_id: &Uuid) -> bool {
        self.instances
            .get(saga_id)
            .is_some_and(|i| registry.get(&i.summary.saga, i.summary.version).is_some())
    }

    fn load(
        &self,
        registry: &Registry,
        saga_id: Uuid,
    ) -> Result<std::result::Result<(Arc<crate::Definition>, Loaded), Verdict>> {
        let Some(instance) = self.instances.get(&saga_id) else {
            return Ok(Err(Verdict::Rejected(format!("unknown saga {saga_id}"))));
        };
        let s = &instance.summary;
        let Some(definition) = registry.get(&s.saga, s.version) else {
            return Ok(Err(Verdict::Deferred(format!(
                "saga `{}` v{} is not registered in this process",
                s.saga, s.version
            ))));
        };
        let state = replay(definition, instance.events.iter().map(|e| &e.event))?;
        Ok(Ok((
            Arc::clone(definition),
            Loaded {
                state,
                last_seq: instance.events.len() as i64,
            },
        )))
    }

    /// Applies inputs under the lock; all or nothing, like a transaction.
    fn apply(
        &mut self,
        registry: &Registry,
        batch: &[(Uuid, Input)],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>> {
        let mut writes = Writes::default();
        let mut loaded: HashMap<Uuid, (Arc<crate::Definition>, Loaded)> = HashMap::new();
        let mut decided = Vec::with_capacity(batch.len());
        for (saga_id, input) in batch {
            if !loaded.contains_key(saga_id) {
                match self.load(registry, *saga_id)? {
                    Ok(entry) => {
                        loaded.insert(*saga_id, entry);
                    }
                    Err(verdict) => {
                        decided.push((*saga_id, Err(verdict)));
                        continue;
                    }
                }
            }
            let (definition, saga) = loaded.get_mut(saga_id).expect("loaded above");
            decided.push((
                *saga_id,
                Ok(apply_input(
                    definition,
                    *saga_id,
                    saga,
                    input,
                    now,
                    &mut writes,
                    &crate::codec::Payloads::plain(),
                )?),
            ));
        }
        Ok(self.write(writes, decided, now))
    }

    fn write(
        &mut self,
        writes: Writes,
        decided: Vec<(
            Uuid,
            std::result::Result<super::transition::Decided, Verdict>,
        )>,
        now: DateTime<Utc>,
    ) -> Vec<Applied> {
        for row in writes.events {
            let instance = self
                .instances
                .get_mut(&row.saga_id)
                .expect("locked instance");
            instance.events.push(RecordedEvent {
                seq: row.seq,
                at: row.at,
                event: row.event,
            });
        }
        for (saga_id, update) in writes.instances {
            let instance = self.instances.get_mut(&saga_id).expect("locked instance");
            instance.summary.status = update.status;
            instance.summary.reason = update.reason;
            instance.summary.updated_at = now;
            if update.status.is_terminal() {
                instance.finished_at.get_or_insert(now);
            }
        }
        for (saga_id, key) in writes.timers_cancelled {
            self.timers.remove(&(saga_id, key));
        }
        for row in writes.timers_set {
            self.timers.insert(
                (row.saga_id, row.timer.key()),
                PendingTimer {
                    timer: row.timer,
                    due_at: row.due_at,
                },
            );
        }
        let claimed_until = now + Duration::from_secs(3600);
        let ids: Vec<i64> = writes
            .outbox
            .into_iter()
            .map(|(_, envelope)| {
                self.next_outbox_id += 1;
                self.outbox
                    .insert(self.next_outbox_id, (envelope, claimed_until));
                self.next_outbox_id
            })
            .collect();
        let outbox = &self.outbox;
        report(decided, |i| OutboxRecord {
            id: ids[i],
            envelope: outbox[&ids[i]].0.clone(),
        })
    }
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn start(&self, request: StartRequest) -> Result<Started> {
        let now = Utc::now();
        let definition = request.definition;
        let name = definition.name().to_owned();
        let mut inner = self.lock();
        if let Some(id) = request
            .business_key
            .as_ref()
            .and_then(|key| inner.keys.get(&(name.clone(), key.clone())))
        {
            return Ok(Started {
                saga_id: *id,
                created: false,
            });
        }
        let saga_id = Uuid::now_v7();
        let started = Event::Started {
            saga: name.clone(),
            version: definition.version(),
            input: request.input,
            business_key: request.business_key.clone(),
            steps: definition.step_names(),
            groups: definition.group_records(),
        };
        let state: SagaState = replay(&definition, [&started])?;
        inner.instances.insert(
            saga_id,
            Instance {
                summary: SagaSummary {
                    id: saga_id,
                    saga: name.clone(),
                    version: definition.version(),
                    status: state.status,
                    business_key: request.business_key.clone(),
                    reason: None,
                    created_at: now,
                    updated_at: now,
                },
                events: vec![RecordedEvent {
                    seq: 1,
                    at: now,
                    event: started,
                }],
                finished_at: None,
            },
        );
        if let Some(key) = request.business_key {
            inner.keys.insert((name, key), saga_id);
        }
        let mut registry = Registry::new();
        registry.insert(definition);
        let applied = inner.apply(&registry, &[(saga_id, Input::Start)], now)?;
        // Rows written by a start are left for the relay's poller, as with a PostgreSQL store
        // that no orchestrator of this process runs on.
        for record in applied.iter().flat_map(|a| &a.outbox) {
            if let Some(row) = inner.outbox.get_mut(&record.id) {
                row.1 = now;
            }
        }
        drop(inner);
        self.outbox_signal.send_modify(|n| *n += 1);
        Ok(Started {
            saga_id,
            created: true,
        })
    }

    async fn apply(&self, registry: &Registry, batch: Vec<(Uuid, Input)>) -> Result<Vec<Applied>> {
        self.lock().apply(registry, &batch, Utc::now())
    }

    async fn fire_due_timers(&self, registry: &Registry, limit: usize) -> Result<Vec<Applied>> {
        let now = Utc::now();
        let mut inner = self.lock();
        let mut due: Vec<(DateTime<Utc>, Uuid, String, Timer)> = inner
            .timers
            .iter()
            .filter(|((saga_id, _), t)| t.due_at <= now && inner.knows(registry, saga_id))
            .map(|((saga_id, key), t)| (t.due_at, *saga_id, key.clone(), t.timer.clone()))
            .collect();
        due.sort_by_key(|(due_at, ..)| *due_at);
        due.truncate(limit);
        let mut applied = Vec::with_capacity(due.len());
        // One timer at a time: the lock makes each its own transaction, so a saga whose timer
        // cannot be applied is postponed without holding back the others.
        for (_, saga_id, key, timer) in due {
            match inner.apply(registry, &[(saga_id, Input::Timer(timer))], now) {
                Ok(a) => {
                    inner.timers.remove(&(saga_id, key));
                    applied.extend(a);
                }
                Err(e) => {
                    tracing::error!(saga.id = %saga_id, error = %e, "a timer cannot be applied; postponing it");
                    if let Some(t) = inner.timers.get_mut(&(saga_id, key)) {
                        t.due_at = now + super::TIMER_FAILURE_BACKOFF;
                    }
                }
            }
        }
        Ok(applied)
    }

    async fn next_timer_due(&self, registry: &Registry) -> Result<Option<DateTime<Utc>>> {
        let inner = self.lock();
        Ok(inner
            .timers
            .iter()
            .filter(|((saga_id, _), _)| inner.knows(registry, saga_id))
            .map(|(_, t)| t.due_at)
            .min())
    }

    async fn enqueue(&self, saga_id: Uuid, timer: Timer) -> Result<()> {
        let mut inner = self.lock();
        if !inner.instances.contains_key(&saga_id) {
            return Err(crate::Error::UnknownSaga(saga_id));
        }
        inner.timers.insert(
            (saga_id, timer.key()),
            PendingTimer {
                timer,
                due_at: Utc::now(),
            },
        );
        drop(inner);
        self.timer_signal.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn timer_notifications(&self) -> Result<BoxStream<'static, ()>> {
        Ok(tokio_stream_from_watch(self.timer_signal.subscribe()))
    }
}

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn claim_outbox(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxRecord>> {
        let now = Utc::now();
        let mut inner = self.lock();
        let mut claimed = Vec::new();
        for (id, (envelope, claimed_until)) in inner.outbox.iter_mut() {
            if claimed.len() >= limit {
                break;
            }
            if *claimed_until <= now {
                *claimed_until = now + lease;
                claimed.push(OutboxRecord {
                    id: *id,
                    envelope: envelope.clone(),
                });
            }
        }
        Ok(claimed)
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<()> {
        let mut inner = self.lock();
        for id in ids {
            inner.outbox.remove(id);
        }
        Ok(())
    }

    async fn outbox_notifications(&self) -> Result<BoxStream<'static, ()>> {
        let rx = self.outbox_signal.subscribe();
        Ok(tokio_stream_from_watch(rx))
    }
}

fn tokio_stream_from_watch(rx: watch::Receiver<u64>) -> BoxStream<'static, ()> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
    .boxed()
}

mod queries;
