//! The seam to the message broker: publish batches with confirms, consume with explicit acks.
//!
//! `saga-amqp` implements it on RabbitMQ; [`InProcessTransport`] implements it in memory for
//! tests and the embedded mode.

mod in_process;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use crate::message::{Destination, Envelope, Message};

pub use in_process::InProcessTransport;

/// A queue to consume from.
pub type Source = Destination;

/// Why a publish failed. Hands back the envelopes that were not confirmed, so they can be
/// retried or failed explicitly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No queue is bound for these envelopes' destinations; they would be dropped.
    #[error("{} message(s) unroutable, first to {}", .0.len(), .0.first().map(|e| e.destination.encode()).unwrap_or_default())]
    Unroutable(Vec<Envelope>),
    /// The broker did not confirm these envelopes (connection lost, nack, timeout).
    #[error("publish not confirmed: {reason}")]
    NotConfirmed {
        /// What went wrong.
        reason: String,
        /// The envelopes that may not have reached the broker, routable ones included.
        envelopes: Vec<Envelope>,
        /// Envelopes that were returned as unroutable, if any were seen before the failure.
        unroutable: Vec<Envelope>,
    },
}

/// How many messages wait in a queue, and how many consumers read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStatus {
    /// Messages ready to be delivered (not counting those delivered and not yet settled).
    pub messages: u64,
    /// Consumers subscribed to the queue.
    pub consumers: u64,
}

/// A transport failure other than a publish: what failed, and the broker client's error as
/// its source when there is one.
#[derive(Debug, thiserror::Error)]
#[error("transport: {message}")]
pub struct TransportError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl TransportError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A failure described by `message`, caused by `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// What failed.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Settles one delivery. Dropping a delivery without settling it hands it back to the queue.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message was handled; remove it.
    async fn ack(self: Box<Self>) -> Result<(), TransportError>;
    /// Put the message back for another consumer (or this one) to retry.
    async fn requeue(self: Box<Self>) -> Result<(), TransportError>;
    /// Move the message to the source's dead-letter queue with `reason`.
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), TransportError>;
}

/// A message received from a queue, to be settled explicitly.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message.id)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery settled through `acker`.
    pub fn new(message: Message, redelivered: bool, acker: Box<dyn Acker>) -> Self {
        Self {
            message,
            redelivered,
            acker,
        }
    }

    /// Acknowledges the message: it is done with.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.acker.ack().await
    }

    /// Hands the message back to the queue.
    pub async fn requeue(self) -> Result<(), TransportError> {
        self.acker.requeue().await
    }

    /// Moves the message to the dead-letter queue, recording `reason`.
    pub async fn dead_letter(self, reason: &str) -> Result<(), TransportError> {
        self.acker.dead_letter(reason).await
    }
}

/// A message broker, as the orchestrator and the workers use it.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Makes sure the queues for these sources exist (idempotent).
    async fn declare(&self, sources: &[Source]) -> Result<(), TransportError>;

    /// Publishes a batch; returns once the broker has confirmed every message.
    async fn publish(&self, batch: Vec<Envelope>) -> Result<(), PublishError>;

    /// Consumes `source`; each delivery must be settled. The stream ends only on shutdown.
    async fn consume(
        &self,
        source: &Source,
    ) -> Result<BoxStream<'static, Delivery>, TransportError>;

    /// Takes the commands the broker returned as unroutable after their publish had finished
    /// and reported them confirmed. A transport whose publishes share a channel may learn of
    /// a return only from another publish's confirms, sometimes after the first publish
    /// finished; the relay then fails the command's step, as for
    /// [`PublishError::Unroutable`]. The default has none.
    fn take_late_returns(&self) -> Vec<Envelope> {
        Vec::new()
    }

    /// How many messages wait in `source`'s queue and how many consumers read it, if the
    /// transport can tell (the orchestrator reports a service's queue that holds commands
    /// with nobody to consume them). The default cannot: `None`.
    async fn queue_status(&self, source: &Source) -> Result<Option<QueueStatus>, TransportError> {
        let _ = source;
        Ok(None)
    }
}
