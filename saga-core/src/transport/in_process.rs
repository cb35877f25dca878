//! A transport inside one process: queues in memory, for tests and the embedded mode.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream};
use tokio::sync::Notify;

use super::{Acker, Delivery, PublishError, QueueStatus, Source, Transport, TransportError};
use crate::message::{Envelope, Message};

#[derive(Default)]
struct Queue {
    /// Messages, whether redelivered, and when each expires (a command's time to live).
    ready: Mutex<VecDeque<(Message, bool, Option<Instant>)>>,
    dead: Mutex<Vec<(Message, String)>>,
    notify: Notify,
    consumers: std::sync::atomic::AtomicU64,
}

impl Queue {
    /// The next message that has not expired; expired ones are dead-lettered on the way, as
    /// the broker does with a message whose time to live has passed.
    fn next_ready(&self) -> Option<(Message, bool)> {
        let mut ready = self.ready.lock().expect("queue lock");
        while let Some((message, redelivered, expires)) = ready.pop_front() {
            if expires.is_some_and(|at| at <= Instant::now()) && !redelivered {
                self.dead
                    .lock()
                    .expect("dead lock")
                    .push((message, "expired".to_owned()));
                continue;
            }
            return Some((message, redelivered));
        }
        None
    }
}

/// A consumer of a queue, counted while its stream lives.
struct Consumer(Arc<Queue>);

impl Consumer {
    fn new(queue: Arc<Queue>) -> Self {
        queue
            .consumers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(queue)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.0
            .consumers
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Queue {
    fn push(&self, message: Message, redelivered: bool) {
        let expires = message
            .headers
            .get(crate::message::headers::TTL_MS)
            .and_then(|ms| ms.parse().ok())
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let mut ready = self.ready.lock().expect("queue lock");
        if redelivered {
            ready.push_front((message, true, expires));
        } else {
            ready.push_back((message, false, expires));
        }
        drop(ready);
        // Every waiting consumer looks; those that find nothing wait again.
        self.notify.notify_waiters();
        self.notify.notify_one();
    }
}

/// Queues in memory with the semantics of the broker: competing consumers, explicit acks,
/// requeue on drop, dead letters with a reason, commands that expire unconsumed after their
/// time to live, and unroutable publishes to undeclared queues.
///
/// Clones share the same queues.
#[derive(Clone, Default)]
pub struct InProcessTransport {
    queues: Arc<Mutex<HashMap<Source, Arc<Queue>>>>,
}

impl std::fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessTransport").finish_non_exhaustive()
    }
}

impl InProcessTransport {
    /// A transport with no queues declared.
    pub fn new() -> Self {
        Self::default()
    }

    fn queue(&self, source: &Source) -> Option<Arc<Queue>> {
        self.queues
            .lock()
            .expect("queues lock")
            .get(source)
            .cloned()
    }

    fn declared(&self, source: &Source) -> Arc<Queue> {
        Arc::clone(
            self.queues
                .lock()
                .expect("queues lock")
                .entry(source.clone())
                .or_default(),
        )
    }

    /// The messages dead-lettered from `source`, with their reasons.
    pub fn dead_letters(&self, source: &Source) -> Vec<(Message, String)> {
        self.queue(source)
            .map(|q| q.dead.lock().expect("dead lock").clone())
            .unwrap_or_default()
    }

    /// How many messages wait in `source`, not counting unsettled deliveries.
    pub fn depth(&self, source: &Source) -> usize {
        self.queue(source)
            .map(|q| q.ready.lock().expect("queue lock").len())
            .unwrap_or(0)
    }
}

#[async_trait]
impl Transport for InProcessTransport {
    async fn declare(&self, sources: &[Source]) -> Result<(), TransportError> {
        for source in sources {
            self.declared(source);
        }
        Ok(())
    }

    async fn publish(&self, batch: Vec<Envelope>) -> Result<(), PublishError> {
        let mut unroutable = Vec::new();
        for envelope in batch {
            match self.queue(&envelope.destination) {
                Some(queue) => queue.push(envelope.message, false),
                None => unroutable.push(envelope),
            }
        }
        if unroutable.is_empty() {
            Ok(())
        } else {
            Err(PublishError::Unroutable(unroutable))
        }
    }

    async fn consume(
        &self,
        source: &Source,
    ) -> Result<BoxStream<'static, Delivery>, TransportError> {
        let consumer = Consumer::new(self.declared(source));
        Ok(Box::pin(stream::unfold(consumer, |consumer| async move {
            let queue = &consumer.0;
            let (message, redelivered) = loop {
                // Registered before the check, so a push in between is not missed.
                let notified = queue.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(next) = queue.next_ready() {
                    break next;
                }
                notified.await;
            };
            let acker = InProcessAcker {
                queue: Arc::clone(queue),
                message: Some(message.clone()),
            };
            Some((
                Delivery::new(message, redelivered, Box::new(acker)),
                consumer,
            ))
        })))
    }

    async fn queue_status(&self, source: &Source) -> Result<Option<QueueStatus>, TransportError> {
        // A queue not declared holds nothing.
        Ok(Some(self.queue(source).map_or_else(
            QueueStatus::default,
            |q| QueueStatus {
                messages: q.ready.lock().expect("queue lock").len() as u64,
                consumers: q.consumers.load(std::sync::atomic::Ordering::SeqCst),
            },
        )))
    }
}

struct InProcessAcker {
    queue: Arc<Queue>,
    message: Option<Message>,
}

#[async_trait]
impl Acker for InProcessAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        self.message = None;
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), TransportError> {
        if let Some(message) = self.message.take() {
            self.queue.push(message, true);
        }
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), TransportError> {
        if let Some(message) = self.message.take() {
            self.queue
                .dead
                .lock()
                .expect("dead lock")
                .push((message, reason.to_owned()));
        }
        Ok(())
    }
}

impl Drop for InProcessAcker {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            self.queue.push(message, true);
        }
    }
}
