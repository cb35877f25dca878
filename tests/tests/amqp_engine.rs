//! The engine over RabbitMQ: orchestrator and participants on their own connections, each test
//! on its own vhost and its own database schema.

use std::time::Duration;

use saga_core::message::headers;
use saga_core::transport::PublishError;
use saga_core::{Destination, Envelope, Message, SagaStatus, Transport};
use saga_tests::amqp::{broker, drain_dead_letters, rabbitmqctl};
use saga_tests::database;
use saga_tests::harness::{self, assert_effects};
use saga_tests::order::{self, Order};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_complete_and_compensate_over_rabbitmq() {
    let (db, broker) = (database().await, broker().await);
    let running = harness::run(&db, || broker.transport()).await;
    let ids = running.start(40, 5).await;
    let counts = running.settle(Duration::from_secs(60)).await;
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&32));
    assert_eq!(counts.get(&SagaStatus::Compensated), Some(&8));
    assert_effects(&db, &ids, 5).await;
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}

/// `AMQP_URL` as a list of a cluster's nodes: a node that does not answer is passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_nodes_connects_to_one_that_answers() {
    let (db, broker) = (database().await, broker().await);
    // Nothing listens on a port just freed; then the real node.
    let dead = saga_tests::free_port();
    let live = broker.config.url.clone();
    let (_, vhost) = live.rsplit_once('/').expect("a vhost");
    let mut nodes = broker.config.clone();
    nodes.url = format!("amqp://guest:guest@127.0.0.1:{dead}/{vhost},{live}");
    let running = harness::run(&db, || {
        let config = nodes.clone();
        async move { saga_amqp::AmqpTransport::connect(config).await.unwrap() }
    })
    .await;
    let ids = running.start(10, 5).await;
    let counts = running.settle(Duration::from_secs(60)).await;
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&8));
    assert_effects(&db, &ids, 5).await;
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_over_rabbitmq() {
    let (db, broker) = (database().await, broker().await);
    let running = harness::run(&db, || broker.transport()).await;
    let def = order::definition();
    let id = running
        .client
        .start(
            &def,
            &Order {
                id: 1,
                flaky_charge: 2,
                ..Order::default()
            },
        )
        .await
        .unwrap()
        .saga_id;
    running.settle(Duration::from_secs(30)).await;
    assert_eq!(
        running.client.summary(id).await.unwrap().unwrap().status,
        SagaStatus::Completed
    );
    assert_eq!(
        order::effects(&db.pool, &db.schema, id).await,
        ["reserve", "charge", "ship"]
    );
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}

fn garbage(destination: Destination) -> Envelope {
    Envelope {
        destination,
        message: Message {
            id: uuid::Uuid::new_v4(),
            headers: Default::default(),
            body: b"{\"this is\": not json".to_vec(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_a_reason() {
    let (db, broker) = (database().await, broker().await);
    let running = harness::run(&db, || broker.transport()).await;
    let ids = running.start(10, 5).await;
    let probe = broker.transport().await;
    let inventory = Destination::Service("inventory".into());
    let unknown_saga = saga_core::Reply {
        saga_id: uuid::Uuid::new_v4(),
        step: 0,
        direction: saga_core::Direction::Forward,
        attempt: 1,
        command_id: uuid::Uuid::new_v4(),
        outcome: saga_core::Outcome::Success {
            output: serde_json::json!(null),
        },
    };
    probe
        .publish(vec![
            garbage(inventory.clone()),
            garbage(Destination::Results),
            unknown_saga.to_envelope(),
        ])
        .await
        .unwrap();
    running.settle(Duration::from_secs(30)).await;
    assert_effects(&db, &ids, 5).await;
    for source in [inventory, Destination::Results] {
        let expected = if source == Destination::Results { 2 } else { 1 };
        let letters = drain_dead_letters(&probe, &source, expected, Duration::from_secs(10)).await;
        assert_eq!(
            letters.len(),
            expected,
            "dead letters of {source:?}: {letters:?}"
        );
        let mut reasons: Vec<&str> = letters.iter().map(|(_, r)| r.as_str()).collect();
        reasons.sort_unstable();
        assert!(reasons[0].starts_with("invalid"), "reasons: {reasons:?}");
        if expected == 2 {
            assert!(
                reasons[1].starts_with("unknown saga"),
                "reasons: {reasons:?}"
            );
        }
        for (message, reason) in &letters {
            assert_eq!(message.headers.get(headers::REJECT_REASON), Some(reason));
        }
        assert!(
            letters
                .iter()
                .any(|(m, _)| m.body == b"{\"this is\": not json")
        );
    }
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_a_service_without_a_queue_fails_its_step() {
    let (db, broker) = (database().await, broker().await);
    let probe = broker.transport().await;
    let lost = probe
        .publish(vec![garbage(Destination::Service("nowhere".into()))])
        .await
        .unwrap_err();
    assert!(
        matches!(lost, PublishError::Unroutable(ref e) if e.len() == 1),
        "{lost:?}"
    );

    // The shipping service is not running, and its queue disappears (deleted by an operator).
    let (running, _held) = harness::run_holding(&db, || broker.transport(), &["shipping"]).await;
    let queue = broker
        .config
        .queue(&Destination::Service("shipping".into()));
    rabbitmqctl(&["delete_queue", "--vhost", &broker.vhost, &queue]).await;
    let order = Order {
        id: 1,
        ..Order::default()
    };
    let ids = [running
        .client
        .start(&order::definition(), &order)
        .await
        .unwrap()
        .saga_id];
    running.settle(Duration::from_secs(30)).await;
    let summary = running.client.summary(ids[0]).await.unwrap().unwrap();
    assert_eq!(summary.status, SagaStatus::Compensated);
    assert!(
        summary
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("no queue is bound for service `shipping`"),
        "{summary:?}"
    );
    assert_eq!(
        order::effects(&db.pool, &db.schema, ids[0]).await,
        ["reserve", "charge", "refund", "release"]
    );
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_a_send_window_arrives_whole_and_in_order() {
    use futures_util::StreamExt as _;
    let broker = broker().await;
    let transport = broker.transport().await;
    let bulk = Destination::Service("bulk".into());
    transport
        .declare(std::slice::from_ref(&bulk))
        .await
        .unwrap();
    // 40 messages, every 8th of 700 KiB (the publisher queues at most 1 MiB at once, so they
    // leave in several windows), then 100 small ones (one window of more than 30 sends), with
    // two unroutable messages among them.
    let mut batch: Vec<Envelope> = (0..140)
        .map(|i| Envelope {
            destination: bulk.clone(),
            message: Message {
                id: uuid::Uuid::new_v4(),
                headers: Default::default(),
                body: vec![
                    b'0' + (i % 10) as u8;
                    if i < 40 && i % 8 == 0 { 700 << 10 } else { 200 }
                ],
            },
        })
        .collect();
    let expected: Vec<uuid::Uuid> = batch.iter().map(|e| e.message.id).collect();
    let mut lost_ids = Vec::new();
    for at in [20, 100] {
        let lost = garbage(Destination::Service("nowhere".into()));
        lost_ids.push(lost.message.id);
        batch.insert(at, lost);
    }

    let published = transport.publish(batch).await;
    let handed_back = match &published {
        Err(PublishError::Unroutable(e)) => e.iter().map(|e| e.message.id).collect(),
        _ => Vec::new(),
    };
    assert_eq!(
        handed_back, lost_ids,
        "only the unroutable messages are handed back: {published:?}"
    );
    let mut deliveries = transport.consume(&bulk).await.unwrap();
    let mut received = Vec::new();
    while received.len() < expected.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
            .await
            .expect("every published message is delivered")
            .expect("the consumer's stream goes on");
        received.push(delivery.message.id);
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        received, expected,
        "delivered once each, in the batch's order"
    );
    drop(deliveries);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_profile_reports_the_brokers_work_by_process_kind() {
    // The broker must be up, as for every test here (this fails with how to start it).
    let broker = broker().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/broker-profile");
    let run = |args: &'static [&'static str]| async move {
        tokio::process::Command::new(script)
            .args(args)
            .output()
            .await
            .expect("run scripts/broker-profile")
    };
    let out = run(&["1"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("reductions in 1 s"), "{text}");
    assert!(text.contains("by kind"), "{text}");
    assert!(text.contains("busiest processes"), "{text}");

    let bad = run(&["soon"]).await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage: scripts/broker-profile"));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_each_learn_their_own_messages_fate() {
    use futures_util::StreamExt as _;
    let broker = broker().await;
    let transport = std::sync::Arc::new(broker.transport().await);
    let bulk = Destination::Service("bulk".into());
    transport
        .declare(std::slice::from_ref(&bulk))
        .await
        .unwrap();
    // Many publishes at once on the transport's one publishing channel, every 7th one message
    // to a service without a queue, every 4th of the others a batch of 20 (a batch reads its
    // confirms only when all have come, which is when a return it carries for another
    // publish can come late). lapin hands a returned message to whichever confirm of the
    // channel completes next: a routed message must never be reported as returned, and a
    // returned one only to the publish that sent it, or, if the return reached another
    // publish after its own had finished, as a late return: each exactly once. (Late returns
    // are rare: 2 of 1,800 unroutable messages in a trial with more of them; the unit tests of
    // `returns` and `engine_pg` cover what follows one.)
    let (mut routable, mut unroutable, mut reported, mut late) = (0, 0, 0, 0);
    for round in 0..5 {
        let mut confirmed_lost = std::collections::HashSet::new();
        let calls = (0..120).map(|i| {
            let transport = std::sync::Arc::clone(&transport);
            let lost = (i + round) % 7 == 0;
            let batch: Vec<_> = if lost {
                vec![garbage(Destination::Service("nowhere".into()))]
            } else {
                let size = if i % 4 == 0 { 20 } else { 1 };
                (0..size)
                    .map(|_| garbage(Destination::Service("bulk".into())))
                    .collect()
            };
            let (id, size) = (batch[0].message.id, batch.len());
            tokio::spawn(async move { (lost, id, size, transport.publish(batch).await) })
        });
        for call in futures_util::future::join_all(calls).await {
            let (lost, id, size, published) = call.unwrap();
            match published {
                Ok(()) if lost => {
                    unroutable += 1;
                    confirmed_lost.insert(id);
                }
                Ok(()) => routable += size,
                Err(PublishError::Unroutable(e))
                    if lost && e.len() == 1 && e[0].message.id == id =>
                {
                    unroutable += 1;
                    reported += 1;
                }
                other => panic!("a message's own fate (unroutable: {lost}), not {other:?}"),
            }
        }
        // Every publish has finished, so every return has been noted.
        let returned_late: Vec<_> = transport
            .take_late_returns()
            .into_iter()
            .map(|e| {
                assert_eq!(e.destination, Destination::Service("nowhere".into()));
                e.message.id
            })
            .collect();
        let distinct: std::collections::HashSet<_> = returned_late.iter().copied().collect();
        assert_eq!(distinct.len(), returned_late.len(), "each late return once");
        assert_eq!(
            distinct, confirmed_lost,
            "the unroutable messages their own publish confirmed are exactly the late returns"
        );
        late += returned_late.len();
    }
    assert_eq!(reported + late, unroutable);
    assert!(reported > 0);
    let mut deliveries = transport.consume(&bulk).await.unwrap();
    for _ in 0..routable {
        let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
            .await
            .expect("every routed message is delivered")
            .expect("the consumer's stream goes on");
        delivery.ack().await.unwrap();
    }
    drop(deliveries);
    broker.cleanup().await;
}

/// A payment worker started under a misspelt name (`paymnet`) leaves the real queue with
/// nobody to read it: each charge attempt expires in its queue (the broker dead-letters it
/// once its time to live, the attempt's timeout, has passed), the sagas give up on the charge
/// and fence it, and wait, showing it (`fencing step charge`). When the right worker starts,
/// the fences find nothing applied: the orders compensate, and no card is charged late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_a_service_nobody_runs_expire_and_are_fenced_not_run_late() {
    let (db, broker) = (database().await, broker().await);
    let def = order::definition_with_timeout(Duration::from_millis(500));
    let (mut running, _) =
        harness::run_definition(&db, || broker.transport(), &def, &["payment"]).await;
    let misspelt = order::participants_serving(&db.pool, &db.schema, "paymnet").await;
    for worker in misspelt.workers {
        if worker.service() == "paymnet" {
            running.spawn(worker, broker.transport().await);
        }
    }
    let ids = running.start(5, 1_000).await;
    let fencing = running
        .all_show(&ids, "fencing step charge", Duration::from_secs(60))
        .await;
    assert!(fencing, "every saga fences its charge");
    let probe = broker.transport().await;
    let payment = Destination::Service("payment".into());
    let expired = drain_dead_letters(&probe, &payment, 5, Duration::from_secs(10)).await;
    assert!(expired.len() >= 5, "{} expired", expired.len());
    assert!(
        expired.iter().all(
            |(m, _)| m.headers.get("x-first-death-reason").map(String::as_str) == Some("expired")
        ),
        "{:?}",
        expired.iter().map(|(m, _)| &m.headers).collect::<Vec<_>>()
    );
    let right = order::participants(&db.pool, &db.schema).await;
    for worker in right.workers {
        if worker.service() == "payment" {
            running.spawn(worker, broker.transport().await);
        }
    }
    let counts = running.settle(Duration::from_secs(60)).await;
    assert_eq!(counts.get(&SagaStatus::Compensated), Some(&5), "{counts:?}");
    for id in &ids {
        assert_eq!(
            order::effects(&db.pool, &db.schema, *id).await,
            ["reserve", "release"],
            "saga {id}: no charge applied"
        );
    }
    running.stop().await;
    broker.cleanup().await;
    db.drop_schema().await;
}
