//! Consuming a queue with manual acks, re-subscribing after the broker cancels the consumer or
//! the connection drops.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ConnectionStatus};
use saga_core::message::headers;
use saga_core::transport::{Acker, Delivery, TransportError};
use saga_core::{Destination, Envelope};
use tracing::{info, warn};

use crate::config::AmqpConfig;
use crate::convert::message;
use crate::link::{Link, amqp_error};
use crate::publisher::{Outgoing, publish_outgoing};
use crate::topology::declare_source;

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// What a consumer needs to (re)subscribe and to dead-letter.
pub(crate) struct Subscription {
    pub(crate) config: Arc<AmqpConfig>,
    pub(crate) consume: Arc<Link>,
    pub(crate) publish: Arc<Link>,
    pub(crate) source: Destination,
}

struct Active {
    channel: Channel,
    connection: ConnectionStatus,
    consumer: lapin::Consumer,
    /// Ticks every [`WATCH_EVERY`], to check that the channel is still open.
    watch: tokio::time::Interval,
}

impl Active {
    /// Whether the consumer can still deliver: its channel and connection are open.
    fn open(&self) -> bool {
        self.channel.status().connected() && self.connection.connected()
    }
}

/// How often a consumer checks its channel. A consumer whose channel or connection closed
/// without ending its stream would otherwise wait for deliveries forever.
const WATCH_EVERY: Duration = Duration::from_secs(5);

struct State {
    sub: Arc<Subscription>,
    active: Option<Active>,
    backoff: Duration,
}

impl Drop for State {
    fn drop(&mut self) {
        // Stop new deliveries; unsettled ones stay with their ackers.
        if let (Some(active), Ok(handle)) =
            (self.active.take(), tokio::runtime::Handle::try_current())
        {
            handle.spawn(async move {
                let tag = active.consumer.tag();
                let _ = active
                    .channel
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await;
            });
        }
    }
}

impl Subscription {
    /// Opens a channel and consumes the queue; fails after the setup timeout rather than wait
    /// for a broker that stopped answering. A timed-out channel is closed, so a consumer the
    /// broker registers late gives its deliveries back instead of holding them unread, and
    /// the link connects afresh for the next attempt.
    async fn subscribe(&self) -> Result<Active, TransportError> {
        let (channel, connection) = self.consume.watched_channel().await?;
        let consumed = self
            .consume
            .within_setup_timeout("subscribing", self.consume_on(&channel))
            .await;
        match consumed {
            Ok(consumer) => {
                let mut watch = tokio::time::interval_at(
                    tokio::time::Instant::now() + WATCH_EVERY,
                    WATCH_EVERY,
                );
                watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                Ok(Active {
                    channel,
                    connection,
                    consumer,
                    watch,
                })
            }
            Err(e) => {
                tokio::spawn(async move {
                    let _ = channel.close(200, "subscribing failed".into()).await;
                });
                Err(e)
            }
        }
    }

    async fn consume_on(&self, channel: &Channel) -> Result<lapin::Consumer, TransportError> {
        let queue = self.config.queue(&self.source);
        declare_source(channel, &self.config, &self.source)
            .await
            .map_err(amqp_error)?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp_error)?;
        channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error)
    }
}

/// The deliveries of `sub`'s queue, forever: failures re-subscribe with backoff.
pub(crate) fn stream(sub: Subscription) -> BoxStream<'static, Delivery> {
    let state = State {
        sub: Arc::new(sub),
        active: None,
        backoff: MIN_BACKOFF,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if state.active.is_none() {
                match state.sub.subscribe().await {
                    Ok(active) => {
                        info!(queue = %state.sub.config.queue(&state.sub.source), "consuming");
                        state.active = Some(active);
                    }
                    Err(e) => {
                        warn!(error = %e, retry_in = ?state.backoff, "subscribing failed");
                        tokio::time::sleep(state.backoff).await;
                        state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let active = state.active.as_mut().expect("subscribed above");
            let next = tokio::select! {
                next = active.consumer.next() => next,
                _ = active.watch.tick() => {
                    if !active.open() {
                        warn!(
                            queue = %state.sub.config.queue(&state.sub.source),
                            "the consumer's channel closed without ending it; re-subscribing"
                        );
                        state.active = None;
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(d)) => {
                    state.backoff = MIN_BACKOFF;
                    let delivery = Delivery::new(
                        message(&d.properties, d.data.clone()),
                        d.redelivered,
                        Box::new(AmqpAcker {
                            acker: Some(d.acker),
                            properties: d.properties,
                            body: d.data,
                            sub: Arc::clone(&state.sub),
                        }),
                    );
                    return Some((delivery, state));
                }
                Some(Err(e)) => {
                    warn!(error = %e, "consumer failed; re-subscribing");
                    state.active = None;
                }
                None => {
                    info!("the broker ended the consumer; re-subscribing");
                    state.active = None;
                }
            }
        }
    })
    .boxed()
}

struct AmqpAcker {
    acker: Option<lapin::Acker>,
    properties: BasicProperties,
    body: Vec<u8>,
    sub: Arc<Subscription>,
}

/// What to do with a delivery whose copy could not be published.
enum Fallback {
    /// Put it back in its queue.
    Requeue,
    /// Reject it to the queue's own dead-letter exchange.
    Reject,
}

impl AmqpAcker {
    fn take(&mut self) -> lapin::Acker {
        self.acker.take().expect("settled once")
    }

    /// Publishes `copy` (confirmed), then acks the original; if the copy fails, settles the
    /// original by `fallback` instead, so the message is never lost. The original stays
    /// unsettled in `self` until the copy's fate is known: if this is dropped meanwhile, the
    /// drop requeues it.
    async fn publish_then_ack(
        &mut self,
        copy: Outgoing,
        fallback: Fallback,
    ) -> Result<(), TransportError> {
        let limit = self.sub.config.confirm_timeout;
        let published = publish_outgoing(&self.sub.publish, limit, vec![copy]).await;
        let acker = self.take();
        match published {
            Ok(()) => settle(limit, acker.ack(BasicAckOptions::default())).await,
            Err(e) => {
                warn!(error = %e, "publishing a copy failed; settling the original without it");
                match fallback {
                    Fallback::Requeue => {
                        let nack = acker.nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        });
                        settle(limit, nack).await
                    }
                    Fallback::Reject => {
                        settle(limit, acker.reject(BasicRejectOptions { requeue: false })).await
                    }
                }
            }
        }
    }
}

/// Waits at most `limit` for an acknowledgement to be sent: one on a connection that stopped
/// answering (a node stopping, say) fails rather than hold its command, and the process's
/// shutdown, forever; the broker redelivers the message when the connection goes.
async fn settle<T>(
    limit: std::time::Duration,
    acknowledgement: impl Future<Output = lapin::Result<T>>,
) -> Result<(), TransportError> {
    match tokio::time::timeout(limit, acknowledgement).await {
        Ok(done) => done.map(drop).map_err(amqp_error),
        Err(_) => Err(TransportError::new(format!(
            "acknowledging the delivery took longer than {limit:?}"
        ))),
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        let acker = self.take();
        settle(
            self.sub.config.confirm_timeout,
            acker.ack(BasicAckOptions::default()),
        )
        .await
    }

    /// Publishes a copy to the tail of the same queue, then acks the original: a hand-back is
    /// not a failed delivery, so it does not count against the queue's delivery limit (which is
    /// for messages whose consumer dies). Falls back to a plain requeue if the copy fails.
    async fn requeue(mut self: Box<Self>) -> Result<(), TransportError> {
        let config = &self.sub.config;
        // Through the queue's own hand-back exchange: a participant may write to it without
        // being able to reach any other queue.
        let copy = Outgoing {
            exchange: config.requeue_exchange(&self.sub.source),
            routing_key: String::new(),
            properties: self.properties.clone(),
            envelope: Envelope {
                destination: self.sub.source.clone(),
                message: message(&self.properties, std::mem::take(&mut self.body)),
            },
        };
        self.publish_then_ack(copy, Fallback::Requeue).await
    }

    /// Publishes a copy with the reason to the dead-letter exchange, then acks the original;
    /// if that publish fails, rejects it so the queue's own dead-lettering keeps it.
    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), TransportError> {
        let config = &self.sub.config;
        let queue = config.queue(&self.sub.source);
        let mut original = message(&self.properties, std::mem::take(&mut self.body));
        original
            .headers
            .insert(headers::REJECT_REASON.to_owned(), reason.to_owned());
        original
            .headers
            .insert("x-saga-source-queue".to_owned(), queue.clone());
        let properties = crate::convert::properties(&original, &[]);
        let copy = Outgoing {
            exchange: config.dead_exchange(),
            routing_key: queue,
            properties,
            envelope: Envelope {
                destination: self.sub.source.clone(),
                message: original,
            },
        };
        self.publish_then_ack(copy, Fallback::Reject).await
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if let (Some(acker), Ok(handle)) =
            (self.acker.take(), tokio::runtime::Handle::try_current())
        {
            let limit = self.sub.config.confirm_timeout;
            handle.spawn(async move {
                let nack = acker.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                });
                let _ = settle(limit, nack).await;
            });
        }
    }
}
