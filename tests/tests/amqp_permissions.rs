//! Per-service RabbitMQ credentials on a vhost of the test's own: each participant connects as
//! its own user, limited by `AmqpConfig::participant_permissions` to reading its own queue and
//! writing results, dead letters and hand-backs; sagas still run, the broker refuses the rest,
//! and a forged result changes nothing.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::{Destination, Direction, Envelope, Message, Outcome, Reply, SagaStatus, Transport};
use saga_tests::amqp::{broker, drain_dead_letters};
use saga_tests::database;
use saga_tests::harness::{self, assert_effects};

const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];

/// What the broker answers when `user` tries `what`: `Ok` or the error text.
async fn attempt(config: &AmqpConfig, what: &str) -> Result<(), String> {
    let conn = Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .expect("the participant's user may connect");
    let channel = conn.create_channel().await.unwrap();
    let result = match what {
        "consume payment's queue" => channel
            .basic_consume(
                "saga.service.payment".into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        "publish a command"
        | "publish to payment's hand-back exchange"
        | "publish through the default exchange" => {
            let (exchange, key) = match what {
                "publish a command" => ("saga.commands", "payment"),
                "publish through the default exchange" => ("", "saga.service.payment"),
                _ => ("saga.requeue.service.payment", ""),
            };
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            match channel
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await
            {
                Ok(confirm) => confirm.await.map(drop),
                Err(e) => Err(e),
            }
        }
        "bind its queue to the commands" => {
            channel
                .queue_bind(
                    "saga.service.inventory".into(),
                    "saga.commands".into(),
                    "payment".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        "declare a queue" => channel
            .queue_declare(
                "saga.service.inventory.copy".into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        _ => unreachable!("{what}"),
    };
    let _ = conn.close(200, "done".into()).await;
    result.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_with_their_own_credentials_reach_only_their_own_queue() {
    let (db, broker) = (database().await, broker().await);
    // An orchestrator's (or an administrator's) user declares the topology; the participants
    // only check it.
    let admin = broker.transport().await;
    let mut sources = vec![Destination::Results];
    sources.extend(SERVICES.map(|s| Destination::Service(s.into())));
    admin.declare(&sources).await.unwrap();
    let [inventory, payment, shipping] = [
        broker.participant("inventory").await,
        broker.participant("payment").await,
        broker.participant("shipping").await,
    ];
    // The payment service starts late, so the sagas wait on their charge while results are
    // forged.
    let mut configs = vec![inventory.clone(), shipping, broker.config.clone()].into_iter();
    let (mut running, mut held) = harness::run_holding(
        &db,
        || {
            let config = configs
                .next()
                .expect("inventory, shipping and the orchestrator");
            async move { AmqpTransport::connect(config).await.unwrap() }
        },
        &["payment"],
    )
    .await;
    let ids = running.start(20, 5).await;

    // The broker refuses what the inventory service has no business doing.
    for what in [
        "consume payment's queue",
        "publish a command",
        "publish to payment's hand-back exchange",
        "publish through the default exchange",
        "bind its queue to the commands",
        "declare a queue",
    ] {
        let refused = attempt(&inventory, what).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("ACCESS_REFUSED")),
            "inventory may not {what}: {refused:?}"
        );
    }

    // It may publish a result, but a forged one changes nothing: one naming a command the
    // saga never sent, one replaying the reservation's (answered) command as a failure.
    let target = ids[1];
    let charging = saga_tests::wait_until(Duration::from_secs(30), || async {
        running
            .client
            .history(target)
            .await
            .unwrap()
            .iter()
            .any(|e| matches!(e.event, saga_core::Event::Dispatched { step: 1, .. }))
    })
    .await;
    assert!(charging, "the saga waits on its charge");
    let history = running.client.history(target).await.unwrap();
    let replayed = history
        .iter()
        .find_map(|e| match &e.event {
            saga_core::Event::Dispatched {
                step: 0,
                command_id,
                ..
            } => Some(*command_id),
            _ => None,
        })
        .expect("the reservation was dispatched");
    let forger = AmqpTransport::connect(inventory.clone()).await.unwrap();
    // The replay goes first: the results queue has one consumer here, so once the second
    // forgery is dead-lettered, the replay was settled too.
    for (step, command_id) in [(0, replayed), (1, uuid::Uuid::new_v4())] {
        let forged = Reply {
            saga_id: target,
            step,
            direction: Direction::Forward,
            attempt: 1,
            command_id,
            outcome: Outcome::Failure {
                error: "forged".into(),
                retryable: false,
            },
        };
        forger.publish(vec![forged.to_envelope()]).await.unwrap();
    }
    let letters =
        drain_dead_letters(&admin, &Destination::Results, 1, Duration::from_secs(10)).await;
    assert_eq!(
        letters.len(),
        1,
        "the unknown command id is dead-lettered: {letters:?}"
    );
    assert!(letters[0].1.contains("sent no command"), "{letters:?}");
    assert_eq!(
        running.client.history(target).await.unwrap(),
        history,
        "neither forgery changed the saga's log"
    );

    // Under their own users, the participants run every saga to its end.
    running.spawn(
        held.remove(0),
        AmqpTransport::connect(payment).await.unwrap(),
    );
    let counts = running.settle(Duration::from_secs(60)).await;
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&16));
    assert_eq!(counts.get(&SagaStatus::Compensated), Some(&4));
    assert_effects(&db, &ids, 5).await;

    // A hand-back goes through the queue's own requeue exchange, which the user may write to.
    let mut deliveries = forger
        .consume(&Destination::Service("inventory".into()))
        .await
        .unwrap();
    running.stop().await;
    let probe = Envelope {
        destination: Destination::Service("inventory".into()),
        message: Message {
            id: uuid::Uuid::new_v4(),
            headers: Default::default(),
            body: b"{\"probe\":true}".to_vec(),
        },
    };
    admin.publish(vec![probe.clone()]).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("the probe arrives")
        .unwrap();
    assert_eq!(first.message.id, probe.message.id);
    first.requeue().await.expect("the hand-back is allowed");
    let again = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("the probe comes back")
        .unwrap();
    assert_eq!(again.message.id, probe.message.id);
    again.ack().await.unwrap();

    broker.cleanup().await;
    db.drop_schema().await;
}
