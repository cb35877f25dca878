//! Broker faults during a run: connections closed, the broker app stopped and started. Every
//! saga finishes, none is lost, no effect is applied twice.
//!
//! These tests disturb RabbitMQ; nextest runs each alone (`.config/nextest.toml`), and the
//! broker is started again even when a test fails.

use std::time::Duration;

use saga_core::{QueryStore, SagaStatus};
use saga_tests::amqp::{WatermarkGuard, broker, rabbitmqctl};
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

/// Whether the broker has raised its memory alarm (it then blocks publishers).
async fn memory_alarm_raised() -> bool {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])
        .await
        .contains("memory")
}

/// `n` messages of `size` bytes for `service`'s queue.
fn envelopes(service: &str, n: usize, size: usize) -> Vec<saga_core::Envelope> {
    (0..n)
        .map(|_| saga_core::Envelope {
            destination: saga_core::Destination::Service(service.into()),
            message: saga_core::Message {
                id: uuid::Uuid::new_v4(),
                headers: Default::default(),
                body: vec![b'1'; size],
            },
        })
        .collect()
}

/// Publishes 64 MiB on `transport` (confirm timeout 2 s) and checks that the publish gave up
/// at its deadline with every message handed back.
async fn publish_fails_at_the_deadline(transport: &saga_amqp::AmqpTransport) {
    use saga_core::transport::{PublishError, Transport};
    let began = std::time::Instant::now();
    let published = tokio::time::timeout(
        Duration::from_secs(30),
        transport.publish(envelopes("big", 64, 1 << 20)),
    )
    .await
    .expect("the publish returned instead of waiting for the broker");
    assert!(
        matches!(&published, Err(PublishError::NotConfirmed { envelopes, .. }) if envelopes.len() == 64),
        "every envelope is handed back as not confirmed: {:?}",
        published.as_ref().err().map(ToString::to_string)
    );
    // At its deadline: the confirm timeout, plus at most a second to close what it used.
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "the publish gave up at its deadline (2 s), not after {took:?}"
    );
}

/// Waits until `transport` publishes again.
async fn publishes_again(transport: &saga_amqp::AmqpTransport) -> bool {
    use saga_core::transport::Transport;
    wait_until(Duration::from_secs(60), || async {
        transport.publish(envelopes("big", 1, 16)).await.is_ok()
    })
    .await
}

/// A transport on `url` whose publishes give up after 2 s, with the queue `big` declared.
async fn transport_with_big_queue(
    url: String,
    broker: &saga_tests::amqp::Broker,
) -> saga_amqp::AmqpTransport {
    use saga_core::transport::Transport;
    let mut config = broker.config.clone();
    config.url = url;
    config.confirm_timeout = Duration::from_secs(2);
    let transport = saga_amqp::AmqpTransport::connect(config).await.unwrap();
    let big = saga_core::Destination::Service("big".into());
    transport.declare(std::slice::from_ref(&big)).await.unwrap();
    transport
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_while_the_broker_blocks_publishers_fails_at_its_deadline() {
    let broker = broker().await;
    let transport = transport_with_big_queue(broker.config.url.clone(), &broker).await;
    {
        let _guard = WatermarkGuard;
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]).await;
        assert!(
            wait_until(Duration::from_secs(30), memory_alarm_raised).await,
            "the broker raised its memory alarm"
        );
        publish_fails_at_the_deadline(&transport).await;
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    }
    assert!(
        publishes_again(&transport).await,
        "publishing works again after the alarm"
    );
    broker.cleanup().await;
}

/// A TCP proxy to `upstream` that stops reading from its clients while `paused` is true.
async fn pausable_proxy(
    upstream: String,
    paused: tokio::sync::watch::Receiver<bool>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let mut paused = paused.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    // Holds off reading, so the client's socket fills up, as with a broker
                    // that stopped reading.
                    if paused.wait_for(|p| !*p).await.is_err() {
                        return;
                    }
                    match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_stops_reading_fails_at_its_deadline() {
    let broker = broker().await;
    // The broker's host and port, from its URL (`amqp://user:pass@host:port/vhost`).
    let url = broker.config.url.clone();
    let (scheme_user, rest) = url.rsplit_once('@').expect("a URL with credentials");
    let (upstream, vhost) = rest.split_once('/').expect("a URL with a vhost");
    let (pause, paused) = tokio::sync::watch::channel(false);
    let proxy = pausable_proxy(upstream.to_owned(), paused).await;
    let transport =
        transport_with_big_queue(format!("{scheme_user}@{proxy}/{vhost}"), &broker).await;
    assert!(
        publishes_again(&transport).await,
        "publishing works through the proxy"
    );
    pause.send(true).unwrap();
    // 64 MiB: more than the sockets' buffers hold, so sending itself waits on the broker.
    publish_fails_at_the_deadline(&transport).await;
    pause.send(false).unwrap();
    // The connection that held the unsent rest of the batch was closed with it, so the next
    // publish goes out on a new one, not behind those frames (which would follow a channel's
    // close and make the broker close the connection).
    let again = {
        use saga_core::transport::Transport;
        transport.publish(envelopes("big", 1, 16)).await
    };
    assert!(
        again.is_ok(),
        "the first publish once the broker reads again goes through: {:?}",
        again.err().map(|e| e.to_string())
    );
    broker.cleanup().await;
}
