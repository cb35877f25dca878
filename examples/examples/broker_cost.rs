//! What a persistent message costs the broker, by how many are in flight: raw lapin, no saga
//! code. For each concurrency C, C tasks each publish one message at a time to one of four
//! quorum queues (mandatory, with confirms, saga-like headers) and await its confirm, while a
//! consumer per queue acks each delivery. Prints one JSON line per C: messages per second and,
//! when RabbitMQ runs on this machine (`beam.smp` readable in `/proc`), the broker's CPU
//! microseconds per message.
//!
//! `cargo run --release -p saga-examples --example broker_cost [-- COUNT C1 C2 ...]`, with
//! `AMQP_URL` (default: 20,000 messages at 200, 40 and 8 in flight).

use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const QUEUES: usize = 4;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let count = args.first().copied().unwrap_or(20_000);
    let levels = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![200, 40, 8]
    };
    for in_flight in levels {
        // Every publisher sends the same number of messages, and every queue gets as many.
        let in_flight = in_flight.max(QUEUES).next_multiple_of(QUEUES);
        let per_task = count.div_ceil(in_flight);
        let (secs, broker_us) = run(&url, in_flight, per_task).await?;
        let sent = (per_task * in_flight) as f64;
        let broker = broker_us.map_or("null".to_owned(), |us| format!("{:.1}", us / sent));
        println!(
            "{{\"in_flight\":{in_flight},\"messages\":{sent},\"msgs_per_sec\":{:.0},\"broker_cpu_us_per_msg\":{broker}}}",
            sent / secs
        );
    }
    Ok(())
}

/// One level: returns the seconds until every message was acked and the broker's CPU time
/// (µs) over that span, if it could be read.
async fn run(
    url: &str,
    in_flight: usize,
    per_task: usize,
) -> Result<(f64, Option<f64>), Box<dyn std::error::Error>> {
    let publish = Connection::connect(url, ConnectionProperties::default()).await?;
    let consume = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = publish.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let queues: Vec<String> = (0..QUEUES)
        .map(|i| format!("broker-cost-{run}-{i}"))
        .collect();
    // The queues go whatever happened to the run.
    let measured: Result<(f64, Option<f64>), Box<dyn std::error::Error>> = async {
        let per_queue = per_task * in_flight / QUEUES;
        let mut consumers = Vec::new();
        for queue in &queues {
            saga_examples::baseline::declare_quorum_queue(&channel, queue).await?;
            let consumer_channel = consume.create_channel().await?;
            consumer_channel
                .basic_qos(256, BasicQosOptions::default())
                .await?;
            let mut consumer = consumer_channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(tokio::spawn(async move {
                for _ in 0..per_queue {
                    match consumer.next().await {
                        Some(Ok(delivery)) => {
                            delivery.ack(BasicAckOptions::default()).await?;
                        }
                        Some(Err(e)) => return Err(e),
                        None => break,
                    }
                }
                Ok(())
            }));
        }
        let broker_before = broker_cpu_us();
        let began = Instant::now();
        let publishers: Vec<_> = (0..in_flight)
            .map(|task| {
                let channel = channel.clone();
                let queue = queues[task % QUEUES].clone();
                tokio::spawn(async move { publish_one_at_a_time(&channel, &queue, per_task).await })
            })
            .collect();
        for publisher in publishers {
            publisher.await??;
        }
        for consumer in consumers {
            consumer.await??;
        }
        let secs = began.elapsed().as_secs_f64();
        let broker = broker_before.zip(broker_cpu_us()).map(|(a, b)| b - a);
        Ok((secs, broker))
    }
    .await;
    // The consumers' connection goes first (see `saga_examples::baseline`).
    let _ = consume.close(200, "done".into()).await;
    let cleanup = publish.create_channel().await?;
    for queue in &queues {
        cleanup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = publish.close(200, "done".into()).await;
    measured
}

/// Publishes `count` messages to `queue`, each confirmed before the next is sent.
async fn publish_one_at_a_time(channel: &Channel, queue: &str, count: usize) -> lapin::Result<()> {
    let body = br#"{"order_id":"0b5d7a5e-9a3e-4d0b-8f1e-7c1b2a3d4e5f","amount_cents":12345}"#;
    for _ in 0..count {
        let mut headers = FieldTable::default();
        for key in ["x-saga-id", "x-saga-command-id", "x-saga-idempotency-key"] {
            let id = uuid::Uuid::new_v4().to_string();
            headers.insert(key.into(), AMQPValue::LongString(LongString::from(id)));
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_headers(headers);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        channel
            .basic_publish("".into(), queue.into(), options, body, properties)
            .await?
            .await?;
    }
    Ok(())
}

/// CPU time (user + system, µs) of the first `beam.smp` in `/proc` (the local RabbitMQ node,
/// if it is the only one), if there is one to read.
fn broker_cpu_us() -> Option<f64> {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let program = cmdline.split(|b| *b == 0).next()?;
            if !program.ends_with(b"beam.smp") {
                return None;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / ticks_per_sec * 1e6)
        })
}
