//! Starts gathered into batches: those that arrive while earlier ones are being written go
//! into one statement and one commit (group commit), so a busy service pays one round trip
//! and one disk flush for many starts, and a lone start waits for nothing.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use uuid::Uuid;

use crate::decide::Input;
use crate::definition::Definition;
use crate::error::Result;
use crate::event::Event;
use crate::state::replay;
use crate::store::transition::{EventRow, InstanceUpdate, Loaded, Writes, apply_input};
use crate::store::{StartRequest, Started};

/// A start decided in memory: its saga's first row and the rows that follow it.
pub(super) struct PreparedStart {
    pub(super) saga_id: Uuid,
    pub(super) definition: Arc<Definition>,
    pub(super) business_key: Option<String>,
    pub(super) instance: InstanceUpdate,
    pub(super) writes: Writes,
}

/// Decides a start at `now`: the `Started` event, and what the definition does first.
pub(super) fn prepare_start(request: StartRequest, now: DateTime<Utc>) -> Result<PreparedStart> {
    let definition = request.definition;
    let saga_id = Uuid::now_v7();
    let business_key = request.business_key.clone();
    let started = Event::Started {
        saga: definition.name().to_owned(),
        version: definition.version(),
        input: request.input,
        business_key: request.business_key,
    };
    // Decided first, so the instance row is inserted once with its final status.
    let mut loaded = Loaded {
        state: replay(&definition, [&started])?,
        last_seq: 1,
    };
    let mut writes = Writes::default();
    writes.events.push(EventRow {
        saga_id,
        seq: 1,
        event: started,
        at: now,
    });
    apply_input(
        &definition,
        saga_id,
        &mut loaded,
        &Input::Start,
        now,
        &mut writes,
    )?;
    let instance = writes
        .instances
        .remove(&saga_id)
        .expect("the start updates the instance");
    debug_assert!(
        writes.timers_cancelled.is_empty(),
        "a start cancels no timer"
    );
    Ok(PreparedStart {
        saga_id,
        definition,
        business_key,
        instance,
        writes,
    })
}

/// A start waiting for its batch, and where its result goes.
pub(super) struct Pending {
    pub(super) request: StartRequest,
    pub(super) reply: oneshot::Sender<Result<Started>>,
}

/// The starts waiting to be written, and the permits of the tasks writing them.
pub(super) struct StartQueue {
    pending: Mutex<Vec<Pending>>,
    writers: Arc<Semaphore>,
}

impl StartQueue {
    /// Batches written at once, each on its own connection.
    const WRITERS: usize = 4;
    /// Starts in one statement at most.
    const BATCH: usize = 256;

    pub(super) fn new() -> Self {
        Self {
            pending: Mutex::new(Vec::new()),
            writers: Arc::new(Semaphore::new(Self::WRITERS)),
        }
    }

    /// Queues a start; returns a permit when the caller is to spawn a writer, because fewer
    /// than [`Self::WRITERS`] are running.
    pub(super) fn push(&self, pending: Pending) -> Option<OwnedSemaphorePermit> {
        self.lock().push(pending);
        Arc::clone(&self.writers).try_acquire_owned().ok()
    }

    /// The next batch for the writer holding `permit`; `None` once the queue is empty, the
    /// permit then given back. A start queued after the writer looked finds the permit free
    /// and spawns a writer, or is seen by the writer's second look: none is left behind.
    pub(super) fn next_batch(
        &self,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<Vec<Pending>> {
        while permit.is_some() {
            {
                let mut pending = self.lock();
                if !pending.is_empty() {
                    let n = pending.len().min(Self::BATCH);
                    return Some(pending.drain(..n).collect());
                }
            }
            drop(permit.take());
            if self.lock().is_empty() {
                return None;
            }
            *permit = Arc::clone(&self.writers).try_acquire_owned().ok();
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        // A panic while the lock was held cannot leave the list half-changed: push and drain.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}
