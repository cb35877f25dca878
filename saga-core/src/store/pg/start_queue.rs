//! Starts gathered into batches: those that arrive while earlier ones are being written go
//! into one statement and one commit (group commit), so a busy service pays one round trip
//! and one disk flush for many starts, and a lone start waits for nothing.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use uuid::Uuid;

use crate::codec::Payloads;
use crate::decide::Input;
use crate::definition::Definition;
use crate::error::{Error, Result};
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
    /// The saga as its rows leave it: what replaying them gives.
    pub(super) loaded: Loaded,
}

/// Decides a start at `now`: the `Started` event, and what the definition does first, their
/// payloads sealed by `payloads`.
pub(super) fn prepare_start(
    request: StartRequest,
    now: DateTime<Utc>,
    payloads: &Payloads,
) -> Result<PreparedStart> {
    crate::codec::refuse_sealed_shape(&request.input, "the saga input")?;
    let definition = request.definition;
    let saga_id = Uuid::now_v7();
    let business_key = request.business_key.clone();
    let started = Event::Started {
        saga: definition.name().to_owned(),
        version: definition.version(),
        input: request.input,
        business_key: request.business_key,
        steps: definition.step_names(),
        groups: definition.group_records(),
    };
    // Decided first, so the instance row is inserted once with its final status.
    let mut loaded = Loaded {
        state: replay(&definition, [&started])?,
        last_seq: 1,
    };
    let mut writes = Writes::default();
    let mut event = started;
    payloads.seal_in(&mut event)?;
    writes.events.push(EventRow {
        saga_id,
        seq: 1,
        event,
        at: now,
    });
    apply_input(
        &definition,
        saga_id,
        &mut loaded,
        &Input::Start,
        now,
        &mut writes,
        payloads,
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
        loaded,
    })
}

/// What a start's caller gets: its result, or the panic of the definition's code that ran
/// for it (resumed in the caller, as if the start had run there).
pub(super) type Reply = std::thread::Result<Result<Started>>;

/// A start waiting for its batch, and where its result goes.
pub(super) struct Pending {
    pub(super) request: StartRequest,
    pub(super) reply: oneshot::Sender<Reply>,
}

/// The starts waiting to be written, and the permits of the tasks writing them.
pub(super) struct StartQueue {
    pending: Mutex<Vec<Pending>>,
    writers: Arc<Semaphore>,
}

/// A writer's permit. A writer that ends before the queue is empty (it panicked, or its
/// runtime dropped it) answers the starts still queued with an error as it goes, so none
/// waits for a writer that may never come.
pub(super) struct Writer {
    queue: Arc<StartQueue>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.permit.take().is_some() {
            let stranded: Vec<Pending> = self.queue.lock().drain(..).collect();
            for pending in stranded {
                let _ = pending.reply.send(Ok(Err(Error::Internal(
                    "the task writing starts stopped before answering".into(),
                ))));
            }
        }
    }
}

impl StartQueue {
    /// Batches written at once, each on its own connection.
    const WRITERS: usize = 2;
    /// Starts in one statement at most.
    const BATCH: usize = 256;

    pub(super) fn new() -> Self {
        Self {
            pending: Mutex::new(Vec::new()),
            writers: Arc::new(Semaphore::new(Self::WRITERS)),
        }
    }

    /// Queues a start; returns a writer's permit when the caller is to spawn one, because
    /// fewer than [`Self::WRITERS`] are running.
    pub(super) fn push(self: &Arc<Self>, pending: Pending) -> Option<Writer> {
        self.lock().push(pending);
        self.writer()
    }

    fn writer(self: &Arc<Self>) -> Option<Writer> {
        let permit = Arc::clone(&self.writers).try_acquire_owned().ok()?;
        Some(Writer {
            queue: Arc::clone(self),
            permit: Some(permit),
        })
    }

    /// The next batch for `writer`; `None` once the queue is empty, its permit then given
    /// back. A start queued after the writer looked finds the permit free and spawns a
    /// writer, or is seen by the writer's second look: none is left behind.
    pub(super) fn next_batch(writer: &mut Writer) -> Option<Vec<Pending>> {
        let queue = Arc::clone(&writer.queue);
        while writer.permit.is_some() {
            {
                let mut pending = queue.lock();
                if !pending.is_empty() {
                    let n = pending.len().min(Self::BATCH);
                    return Some(pending.drain(..n).collect());
                }
            }
            drop(writer.permit.take());
            if queue.lock().is_empty() {
                return None;
            }
            writer.permit = Arc::clone(&queue.writers).try_acquire_owned().ok();
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        // A panic while the lock was held cannot leave the list half-changed: push and drain.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}
