//! A baseline for benchmarks: what the broker itself does with raw lapin, no saga code.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::{StreamExt, TryStreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use saga_core::transport::TransportError;

/// A broker error as a transport error.
fn amqp_error(error: lapin::Error) -> TransportError {
    TransportError::with_source(format!("rabbitmq: {error}"), error)
}

/// Publishes `count` persistent messages of `size` bytes to a fresh quorum queue with
/// confirms (pipelined in batches of 200, each batch queued whole before any of it is awaited,
/// so it leaves together) while consuming them with manual acks (up to 500 unsettled,
/// acked without waiting for one another), on two connections; returns the time until the
/// last one was acked. The queue is deleted after.
pub async fn raw_publish_consume(
    url: &str,
    count: usize,
    size: usize,
) -> Result<Duration, TransportError> {
    let queue = format!("saga-baseline-{}", uuid::Uuid::new_v4().simple());
    let (elapsed, acked) = run(url, &queue, count, size).await.map_err(amqp_error)?;
    if acked < count {
        return Err(TransportError::new(format!(
            "the baseline's consumer stopped after {acked} of {count} messages"
        )));
    }
    Ok(elapsed)
}

/// Declares `queue` as a durable quorum queue on `channel`, as the baselines use.
pub async fn declare_quorum_queue(channel: &Channel, queue: &str) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), durable, args)
        .await
        .map(drop)
}

/// Returns the time until the last delivery was acked, and how many were.
async fn run(
    url: &str,
    queue: &str,
    count: usize,
    size: usize,
) -> lapin::Result<(Duration, usize)> {
    let publish = Connection::connect(url, ConnectionProperties::default()).await?;
    let consume = Connection::connect(url, ConnectionProperties::default()).await?;
    let pch = publish.create_channel().await?;
    pch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_quorum_queue(&pch, queue).await?;
    let cch = consume.create_channel().await?;
    cch.basic_qos(500, BasicQosOptions::default()).await?;
    let consumer = cch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let body = vec![b'x'; size];
    let start = Instant::now();
    let consuming = tokio::spawn(async move {
        let acked = AtomicUsize::new(0);
        consumer
            .take(count)
            .try_for_each_concurrent(500, |d| {
                let acked = &acked;
                async move {
                    d.ack(BasicAckOptions::default()).await?;
                    acked.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await
            .map(|()| acked.into_inner())
    });
    let mut sent = 0;
    while sent < count {
        let batch = (count - sent).min(200);
        let sends = (0..batch).map(|_| {
            pch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
        });
        let confirms = join_all(sends)
            .await
            .into_iter()
            .collect::<lapin::Result<Vec<_>>>()?;
        for confirm in join_all(confirms).await {
            confirm?;
        }
        sent += batch;
    }
    let acked = consuming.await.expect("the consumer task")?;
    let elapsed = start.elapsed();
    // The consumer's connection goes first: a queue deleted under a consumer being cancelled
    // makes the broker's cancel and lapin's cross, and lapin closes the connection over the
    // unexpected `cancel-ok` with an error in the log.
    let _ = consume.close(200, "done".into()).await;
    pch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    let _ = publish.close(200, "done".into()).await;
    Ok((elapsed, acked))
}
