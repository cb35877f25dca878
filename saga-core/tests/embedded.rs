//! The embedded mode: the in-memory store and the in-process transport, no services.

use std::sync::Arc;
use std::time::Duration;

use saga_core::orchestrator::OrchestratorConfig;
use saga_core::worker::{StepError, Worker, handler_fn};
use saga_core::{
    Client, CommandContext, InProcessTransport, MemoryStore, Orchestrator, SagaDefinition,
    SagaStatus,
};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn sagas_complete_and_compensate_in_memory() {
    let def = SagaDefinition::<u32>::builder("double", 1)
        .step("a", |s| {
            s.action("svc", "a", |ctx| Ok(*ctx.input()))
                .compensation("svc", "undo_a", |ctx| ctx.output::<u32>("a"))
        })
        .step("b", |s| {
            s.pivot()
                .action("svc", "b", |ctx| Ok(ctx.output::<u32>("a")? * 2))
        })
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let transport = Arc::new(InProcessTransport::new());
    let shutdown = CancellationToken::new();
    let (undone_tx, mut undone_rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = Worker::at_least_once("svc")
        .handler(
            "a",
            handler_fn(|n: u32, _: CommandContext| async move { Ok::<_, StepError>(n) }),
        )
        .handler(
            "b",
            handler_fn(|n: u32, _: CommandContext| async move {
                if n > 10 {
                    Err(StepError::terminal("too large"))
                } else {
                    Ok(n)
                }
            }),
        )
        .handler(
            "undo_a",
            handler_fn(move |n: u32, _: CommandContext| {
                let undone = undone_tx.clone();
                async move {
                    undone.send(n).unwrap();
                    Ok::<_, StepError>(())
                }
            }),
        )
        .build();
    let config = OrchestratorConfig {
        poll_interval: Duration::from_millis(20),
        ..OrchestratorConfig::default()
    };
    let orchestrator = Orchestrator::builder(store.clone(), transport.clone())
        .register(&def)
        .config(config)
        .build();
    let worker_task = tokio::spawn(worker.run(transport.clone(), shutdown.clone()));
    let orchestrator_task = tokio::spawn(orchestrator.run(shutdown.clone()));
    let client = Client::new(store.clone());
    let ok = client.start(&def, &3).await.unwrap().saga_id;
    let bad = client.start(&def, &7).await.unwrap().saga_id;
    // The compensation of the failing saga is observed as it runs.
    assert_eq!(undone_rx.recv().await, Some(7));
    let counts = loop {
        let counts = client.count_by_status().await.unwrap();
        if counts.keys().all(|s| !s.is_active()) {
            break counts;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&1));
    assert_eq!(
        client.summary(ok).await.unwrap().unwrap().status,
        SagaStatus::Completed
    );
    assert_eq!(
        client.summary(bad).await.unwrap().unwrap().status,
        SagaStatus::Compensated
    );
    shutdown.cancel();
    worker_task.await.unwrap().unwrap();
    orchestrator_task.await.unwrap().unwrap();
}
