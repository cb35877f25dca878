//! Declaring queues, their dead-letter queues and their bindings, idempotently.

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use saga_core::Destination;

use crate::config::{AmqpConfig, QueueType};

/// Declares the queue of `source`, bound to its exchange and to its hand-back exchange, and its
/// dead-letter queue. Without `config.declare`, only checks that the queue exists.
pub(crate) async fn declare_source(
    channel: &Channel,
    config: &AmqpConfig,
    source: &Destination,
) -> lapin::Result<()> {
    let queue = config.queue(source);
    if !config.declare {
        // Passive declares need no permission; they fail with NOT_FOUND if the queue or its
        // hand-back exchange is missing (an orchestrator of this version declares both).
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                config.requeue_exchange(source).into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        return Ok(());
    }
    let dead_queue = config.dead_queue(source);
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            dead_queue.clone().into(),
            durable,
            queue_arguments(config, None),
        )
        .await?;
    channel
        .queue_bind(
            dead_queue.into(),
            config.dead_exchange().into(),
            queue.clone().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.clone().into(),
            durable,
            queue_arguments(config, Some(&queue)),
        )
        .await?;
    let requeue = config.requeue_exchange(source);
    declare_exchange(channel, &requeue).await?;
    channel
        .queue_bind(
            queue.clone().into(),
            requeue.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (exchange, routing_key) = route(config, source);
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares a durable direct exchange.
pub(crate) async fn declare_exchange(channel: &Channel, name: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The exchange and routing key that reach `destination`.
pub(crate) fn route(config: &AmqpConfig, destination: &Destination) -> (String, String) {
    match destination {
        Destination::Service(name) => (config.commands_exchange(), name.clone()),
        Destination::Results => (config.results_exchange(), "results".to_owned()),
    }
}

/// Queue arguments: the queue type (for a quorum queue, its replicas if configured); for a
/// source queue, its dead-letter route and (quorum) its delivery limit.
fn queue_arguments(config: &AmqpConfig, dead_letter_key: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let kind = match config.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    args.insert("x-queue-type".into(), text(kind));
    if let Some(key) = dead_letter_key {
        args.insert(
            "x-dead-letter-exchange".into(),
            text(&config.dead_exchange()),
        );
        args.insert("x-dead-letter-routing-key".into(), text(key));
        if config.queue_type == QueueType::Quorum {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(config.delivery_limit.min(i32::MAX as u32) as i32),
            );
        }
    }
    if let (QueueType::Quorum, Some(size)) = (config.queue_type, config.quorum_group_size) {
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongInt(size.min(i32::MAX as u32) as i32),
        );
    }
    args
}
