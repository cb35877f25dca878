//! Broker faults during a run: connections closed, the broker app stopped and started. Every
//! saga finishes, none is lost, no effect is applied twice.
//!
//! These tests disturb RabbitMQ; nextest runs each alone (`.config/nextest.toml`), and the
//! broker is started again even when a test fails.

use std::time::Duration;

use saga_core::{SagaStatus, Store};
use saga_tests::amqp::{broker, rabbitmqctl};
use saga_tests::harness::{self, assert_effects};
use saga_tests::{database, wait_until};

const SAGAS: u32 = 200;
const FAIL_EVERY: u32 = 10;

/// Waits for every saga, checks the outcomes and each saga's effects, then cleans up.
async fn settle_and_check(
    running: harness::Running,
    db: saga_tests::TestDb,
    broker: saga_tests::amqp::Broker,
    ids: &[uuid::Uuid],
    timeout: Duration,
) {
    let counts = running.settle(timeout).await;
    assert_eq!(
        counts.get(&SagaStatus::Completed),
        Some(&u64::from(SAGAS - SAGAS / FAIL_EVERY))
    );
    assert_eq!(
        counts.get(&SagaStatus::Compensated),
        Some(&u64::from(SAGAS / FAIL_EVERY))
    );
    assert_effects(&db, ids, FAIL_EVERY).await;
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}

async fn finished(running: &harness::Running) -> u64 {
    let counts = running.store.count_by_status().await.unwrap();
    counts
        .iter()
        .filter(|(s, _)| !s.is_active())
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_all_connections_mid_run_loses_nothing() {
    let (db, broker) = (database().await, broker().await);
    let running = harness::run(&db, || broker.transport()).await;
    let ids = running.start(SAGAS, FAIL_EVERY).await;
    for round in 1..=2u64 {
        let progressed = wait_until(Duration::from_secs(60), || async {
            finished(&running).await >= round * u64::from(SAGAS) / 4
        })
        .await;
        assert!(progressed, "sagas progressed before round {round}");
        rabbitmqctl(&[
            "close_all_connections",
            "--vhost",
            &broker.vhost,
            "saga fault test",
        ])
        .await;
    }
    settle_and_check(running, db, broker, &ids, Duration::from_secs(120)).await;
}

/// Starts the broker app again when dropped, so a failing test leaves RabbitMQ running.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_and_starting_the_broker_mid_run_loses_nothing() {
    let (db, broker) = (database().await, broker().await);
    // Shipping starts after the restart, so the stop finds every saga mid-run.
    let (mut running, held) = harness::run_holding(&db, || broker.transport(), &["shipping"]).await;
    let ids = running.start(SAGAS, FAIL_EVERY).await;
    let ship_queue = broker
        .config
        .queue(&saga_core::Destination::Service("shipping".into()));
    let progressed = wait_until(Duration::from_secs(60), || async {
        let listed = rabbitmqctl(&[
            "list_queues",
            "--vhost",
            &broker.vhost,
            "--no-table-headers",
            "-q",
            "name",
            "messages",
        ])
        .await;
        listed.lines().any(|line| {
            let mut cols = line.split_whitespace();
            cols.next() == Some(ship_queue.as_str())
                && cols
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n >= SAGAS / 2)
        })
    })
    .await;
    assert!(
        progressed,
        "half the sagas reached the shipment before the broker stopped"
    );
    {
        let _guard = RestartGuard;
        rabbitmqctl(&["stop_app"]).await;
        rabbitmqctl(&["start_app"]).await;
    }
    for worker in held {
        running.spawn(worker, broker.transport().await);
    }
    settle_and_check(running, db, broker, &ids, Duration::from_secs(180)).await;
}

/// Restores the memory watermark when dropped, so a failing test leaves the broker usable.
struct WatermarkGuard;

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .output();
    }
}

/// Whether the broker has raised its memory alarm (it then stops reading from publishers).
async fn memory_alarm_raised() -> bool {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])
        .await
        .contains("memory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_stops_reading_fails_within_the_confirm_timeout() {
    use saga_core::transport::{PublishError, Transport};
    use saga_core::{Destination, Envelope, Message};

    let broker = broker().await;
    let mut config = broker.config.clone();
    config.confirm_timeout = Duration::from_secs(2);
    let transport = saga_amqp::AmqpTransport::connect(config).await.unwrap();
    let big = Destination::Service("big".into());
    transport.declare(std::slice::from_ref(&big)).await.unwrap();
    // 64 MiB: more than the socket's buffers hold, so sending itself waits on the broker.
    let envelopes = |n: usize, size: usize| -> Vec<Envelope> {
        (0..n)
            .map(|_| Envelope {
                destination: big.clone(),
                message: Message {
                    id: uuid::Uuid::new_v4(),
                    headers: Default::default(),
                    body: vec![b'1'; size],
                },
            })
            .collect()
    };
    {
        let _guard = WatermarkGuard;
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]).await;
        assert!(
            wait_until(Duration::from_secs(30), memory_alarm_raised).await,
            "the broker raised its memory alarm"
        );
        let began = std::time::Instant::now();
        let published = tokio::time::timeout(
            Duration::from_secs(30),
            transport.publish(envelopes(64, 1 << 20)),
        )
        .await
        .expect("the publish returned instead of waiting for the broker");
        assert!(
            matches!(&published, Err(PublishError::NotConfirmed { envelopes, .. }) if envelopes.len() == 64),
            "every envelope is handed back as not confirmed: {:?}",
            published.as_ref().err().map(ToString::to_string)
        );
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the publish gave up at its deadline, not after {:?}",
            began.elapsed()
        );
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    }
    // Once the alarm clears, the transport publishes again on a fresh channel.
    let recovered = wait_until(Duration::from_secs(60), || async {
        transport.publish(envelopes(1, 16)).await.is_ok()
    })
    .await;
    assert!(recovered, "publishing works again after the alarm");
    broker.cleanup().await;
}
