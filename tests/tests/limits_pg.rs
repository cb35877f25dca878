//! The payload size limit, enforced on publish and on consume, with a clear terminal error.

use std::sync::Arc;
use std::time::Duration;

use saga_core::worker::{StepError, Worker, handler_fn};
use saga_core::{
    Client, CommandContext, Destination, Envelope, InProcessTransport, Message, Orchestrator,
    SagaDefinition, SagaStatus, Transport,
};
use saga_tests::harness::config;
use saga_tests::{database, wait_until};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const BIG: usize = 2 << 20;

/// a (undo_a) -> b, whose input is `size_in` bytes and whose output is `size_out` bytes.
fn definition() -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("limits", 1)
        .step("a", |s| {
            s.action("svc", "a", |c| Ok(c.input().clone()))
                .compensation("svc", "undo_a", |c| Ok(c.input().clone()))
        })
        .step("b", |s| {
            s.pivot().action("svc", "b", |c| {
                let n = c.input()["size_in"].as_u64().unwrap_or(0) as usize;
                Ok(json!({ "blob": "x".repeat(n), "size_out": c.input()["size_out"] }))
            })
        })
        .build()
        .unwrap()
}

#[tokio::test]
async fn oversized_messages_fail_their_step_or_are_dead_lettered() {
    let db = database().await;
    let store = Arc::new(db.store());
    let transport = Arc::new(InProcessTransport::new());
    let shutdown = CancellationToken::new();
    let echo = |v: Value, _: CommandContext| async move { Ok::<_, StepError>(v) };
    let worker = Worker::builder("svc", db.inbox().await)
        .handler("a", handler_fn(echo))
        .handler("undo_a", handler_fn(echo))
        .handler(
            "b",
            handler_fn(|v: Value, _: CommandContext| async move {
                let n = v["size_out"].as_u64().unwrap_or(0) as usize;
                Ok::<_, StepError>("y".repeat(n))
            }),
        )
        .build();
    let w = tokio::spawn(worker.run(transport.clone(), shutdown.clone()));
    let o = tokio::spawn(
        Orchestrator::builder(store.clone(), transport.clone())
            .register(&definition())
            .config(config())
            .build()
            .run(shutdown.clone()),
    );
    let client = Client::new(store.clone());
    let big_command = client
        .start(&definition(), &json!({"size_in": BIG, "size_out": 0}))
        .await
        .unwrap()
        .saga_id;
    let big_output = client
        .start(&definition(), &json!({"size_in": 0, "size_out": BIG}))
        .await
        .unwrap()
        .saga_id;
    let fine = client
        .start(&definition(), &json!({"size_in": 10, "size_out": 10}))
        .await
        .unwrap()
        .saga_id;
    for id in [big_command, big_output, fine] {
        assert!(
            wait_until(Duration::from_secs(10), || async {
                !client
                    .summary(id)
                    .await
                    .unwrap()
                    .unwrap()
                    .status
                    .is_active()
            })
            .await
        );
    }
    let reason = async |id| client.summary(id).await.unwrap().unwrap();
    let s = reason(big_command).await;
    assert_eq!(s.status, SagaStatus::Compensated);
    assert!(
        s.reason
            .as_deref()
            .unwrap()
            .contains("cannot be sent: message of"),
        "{s:?}"
    );
    let s = reason(big_output).await;
    assert_eq!(s.status, SagaStatus::Compensated);
    assert!(
        s.reason
            .as_deref()
            .unwrap()
            .contains("the output of command `b` is too large"),
        "{s:?}"
    );
    assert_eq!(reason(fine).await.status, SagaStatus::Completed);

    // A raw oversized message on either queue is dead-lettered with the reason.
    let raw = |destination| Envelope {
        destination,
        message: Message {
            id: uuid::Uuid::new_v4(),
            headers: Default::default(),
            body: vec![b'{'; BIG],
        },
    };
    transport
        .publish(vec![
            raw(Destination::Results),
            raw(Destination::Service("svc".into())),
        ])
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            transport.dead_letters(&Destination::Results).len() == 1
                && transport
                    .dead_letters(&Destination::Service("svc".into()))
                    .len()
                    == 1
        })
        .await
    );
    for source in [Destination::Results, Destination::Service("svc".into())] {
        let (_, why) = transport.dead_letters(&source).remove(0);
        assert_eq!(
            why,
            format!(
                "message of {BIG} bytes exceeds the limit of {} bytes",
                1 << 20
            )
        );
    }
    shutdown.cancel();
    w.await.unwrap().unwrap();
    o.await.unwrap().unwrap();
    db.drop_schema().await;
}
