//! Pushes 10,000 persistent messages through `AmqpTransport` (publish with confirms, consume
//! with manual acks), and the same through raw lapin in the same run, and prints both rates.
//!
//! `cargo run --release -p saga-examples --example transport_bench [-- COUNT]`, with `AMQP_URL`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::{Destination, Envelope, Message, Transport};

const BATCH: usize = 200;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = std::env::args().nth(1).map_or(Ok(10_000), |n| n.parse())?;
    let mut config = AmqpConfig::from_env()?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    config.prefix = format!("bench-{run}");
    config.prefetch = 500;

    let raw =
        saga_examples::baseline::raw_publish_consume(config.urls()[0], count, payload().len())
            .await?;
    let transport = through_transport(config.clone(), count).await?;

    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "{{\"messages\":{count},\"transport_msgs_per_sec\":{:.0},\"raw_lapin_msgs_per_sec\":{:.0},\"ratio\":{:.2}}}",
        rate(transport),
        rate(raw),
        raw.as_secs_f64() / transport.as_secs_f64()
    );
    cleanup(&config).await?;
    Ok(())
}

/// The same through the transport: batches of envelopes, confirmed; deliveries acked.
async fn through_transport(
    config: AmqpConfig,
    count: usize,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let publisher = AmqpTransport::connect(config.clone()).await?;
    let consumer = AmqpTransport::connect(config).await?;
    let source = Destination::Service("bench".into());
    publisher.declare(std::slice::from_ref(&source)).await?;
    let deliveries = consumer.consume(&source).await?;
    let body = payload();
    let start = Instant::now();
    // Acked without waiting for one another, as the baseline does.
    let consuming = tokio::spawn(
        deliveries
            .take(count)
            .for_each_concurrent(500, |d| async move { d.ack().await.expect("ack") }),
    );
    for chunk in (0..count).collect::<Vec<_>>().chunks(BATCH) {
        let batch = chunk
            .iter()
            .map(|_| Envelope {
                destination: source.clone(),
                message: Message {
                    id: uuid::Uuid::new_v4(),
                    headers: Default::default(),
                    body: body.clone(),
                },
            })
            .collect();
        publisher.publish(batch).await?;
    }
    consuming.await?;
    Ok(start.elapsed())
}

fn payload() -> Vec<u8> {
    br#"{"saga_id":"0192a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","step":1,"payload":{"order_no":42,"amount_cents":1250}}"#.to_vec()
}

async fn cleanup(config: &AmqpConfig) -> Result<(), Box<dyn std::error::Error>> {
    let conn = Connection::connect(config.urls()[0], ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let source = Destination::Service("bench".into());
    for queue in [config.queue(&source), config.dead_queue(&source)] {
        ch.queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [
        config.commands_exchange(),
        config.results_exchange(),
        config.dead_exchange(),
    ] {
        ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}
