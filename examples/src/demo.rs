//! The embedded demo: a saga, its orchestrator and its participants in one process, on the
//! in-memory store and the in-process transport. No services needed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::orchestrator::OrchestratorConfig;
use saga_core::{
    Client, InProcessTransport, MemoryStore, Orchestrator, QueryStore, SagaStatus, Transport,
};
use tokio_util::sync::CancellationToken;

use crate::Example;
use crate::participant::{Ledger, worker};

/// Runs `count` sagas of `E` in memory (every `fail_every`-th compensates), prints a timeline
/// per saga, and returns the counts by status.
pub async fn run<E: Example>(
    count: u64,
    fail_every: Option<u64>,
) -> anyhow::Result<BTreeMap<SagaStatus, u64>> {
    let def = E::definition();
    let store = Arc::new(MemoryStore::new());
    let transport: Arc<dyn Transport> = Arc::new(InProcessTransport::new());
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let ledger = Ledger::Memory(Arc::new(Mutex::new(Vec::new())));
    for service in E::services() {
        tasks.spawn(worker::<E>(service, &ledger).run(Arc::clone(&transport), shutdown.clone()));
    }
    let config = OrchestratorConfig {
        poll_interval: Duration::from_millis(20),
        ..OrchestratorConfig::default()
    };
    let orchestrator = Orchestrator::builder(store.clone(), Arc::clone(&transport))
        .register(&def)
        .config(config)
        .build();
    tasks.spawn(orchestrator.run(shutdown.clone()));

    let client = Client::new(store.clone());
    let mut ids = Vec::new();
    for n in 1..=count {
        let fail = fail_every.is_some_and(|k| n.is_multiple_of(k));
        ids.push(client.start(&def, &E::input(n, fail)).await?.saga_id);
    }
    let counts = loop {
        let counts = store.count_by_status().await?;
        if counts.keys().all(|s| !s.is_active()) {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    shutdown.cancel();
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    for id in ids {
        let summary = client.summary(id).await?.expect("started above");
        let history = client.history(id).await?;
        use std::io::Write as _;
        writeln!(
            std::io::stdout(),
            "{}",
            saga_core::timeline::render(&summary, Some(def.definition()), &history)
        )?;
    }
    Ok(counts)
}
