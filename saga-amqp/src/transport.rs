//! [`AmqpTransport`]: saga's transport on RabbitMQ.

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use saga_core::message::headers;
use saga_core::transport::{
    Delivery, PublishError, QueueStatus, Source, Transport, TransportError,
};
use saga_core::{Envelope, Message};

use crate::config::AmqpConfig;
use crate::consumer::{self, Subscription};
use crate::convert::message;
use crate::link::{Link, Role, amqp_error};
use crate::publisher;
use crate::topology::declare_source;

/// The RabbitMQ transport: durable exchanges and quorum queues named from a prefix, persistent
/// messages published with confirms and the mandatory flag, manual acks, dead-letter queues
/// with the reason in `x-saga-reject-reason`, and reconnection.
///
/// Publishing and consuming use separate connections, so a memory alarm that blocks
/// publishers does not stop result consumption.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use saga_amqp::{AmqpConfig, AmqpTransport};
///
/// let transport = AmqpTransport::connect(AmqpConfig::from_env()?).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AmqpTransport {
    config: Arc<AmqpConfig>,
    publish: Arc<Link>,
    consume: Arc<Link>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AmqpTransport {
    /// Connects both connections and declares the exchanges; fails if the broker is not
    /// reachable (the error shows the URL without its password).
    pub async fn connect(config: AmqpConfig) -> Result<Self, TransportError> {
        let config = Arc::new(config);
        let transport = Self {
            publish: Arc::new(Link::new(Arc::clone(&config), Role::Publish)),
            consume: Arc::new(Link::new(Arc::clone(&config), Role::Consume)),
            config,
        };
        transport.publish.channel().await?;
        transport.consume.channel().await?;
        Ok(transport)
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    /// Deletes the queues of `sources` (their dead-letter queues and hand-back exchanges too)
    /// and the exchanges: for
    /// benchmarks and tests that made a topology of their own.
    pub async fn delete_topology(&self, sources: &[Source]) -> Result<(), TransportError> {
        let channel = self.consume.extra_channel().await?;
        for source in sources {
            for queue in [self.config.queue(source), self.config.dead_queue(source)] {
                channel
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await
                    .map_err(amqp_error)?;
            }
            channel
                .exchange_delete(
                    self.config.requeue_exchange(source).into(),
                    ExchangeDeleteOptions::default(),
                )
                .await
                .map_err(amqp_error)?;
        }
        for exchange in [
            self.config.commands_exchange(),
            self.config.results_exchange(),
            self.config.dead_exchange(),
        ] {
            channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await
                .map_err(amqp_error)?;
        }
        let _ = channel.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Takes every message now in `source`'s dead-letter queue, with its reason (empty when
    /// the broker dead-lettered it by itself, e.g. past the delivery limit).
    pub async fn drain_dead_letters(
        &self,
        source: &Source,
    ) -> Result<Vec<(Message, String)>, TransportError> {
        let channel = self.consume.extra_channel().await?;
        let queue = self.config.dead_queue(source);
        let mut letters = Vec::new();
        while let Some(got) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .map_err(amqp_error)?
        {
            let d = got.delivery;
            let m = message(&d.properties, d.data);
            let reason = m
                .headers
                .get(headers::REJECT_REASON)
                .cloned()
                .unwrap_or_default();
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(amqp_error)?;
            letters.push((m, reason));
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(letters)
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn declare(&self, sources: &[Source]) -> Result<(), TransportError> {
        let channel = self.consume.extra_channel().await?;
        for source in sources {
            declare_source(&channel, &self.config, source)
                .await
                .map_err(|e| {
                    let queue = self.config.queue(source);
                    TransportError::new(if self.config.declare {
                        format!("declaring {queue}: {e}")
                    } else {
                        format!(
                            "checking {queue} (not declaring: declare is false): {e}; an \
                             orchestrator declares the topology when it starts"
                        )
                    })
                })?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    async fn publish(&self, batch: Vec<Envelope>) -> Result<(), PublishError> {
        publisher::publish(&self.publish, &self.config, batch).await
    }

    async fn consume(
        &self,
        source: &Source,
    ) -> Result<BoxStream<'static, Delivery>, TransportError> {
        Ok(consumer::stream(Subscription {
            config: Arc::clone(&self.config),
            consume: Arc::clone(&self.consume),
            publish: Arc::clone(&self.publish),
            source: source.clone(),
        }))
    }

    fn take_late_returns(&self) -> Vec<Envelope> {
        self.publish.returns().take_late()
    }

    /// A passive declare of the queue: its ready messages and its consumers.
    async fn queue_status(&self, source: &Source) -> Result<Option<QueueStatus>, TransportError> {
        let channel = self.consume.extra_channel().await?;
        let declared = channel
            .queue_declare(
                self.config.queue(source).into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "looked".into()).await;
        let queue = declared.map_err(amqp_error)?;
        Ok(Some(QueueStatus {
            messages: u64::from(queue.message_count()),
            consumers: u64::from(queue.consumer_count()),
        }))
    }
}
