//! A running order saga: orchestrator and participants on a store and a transport.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use saga_core::orchestrator::OrchestratorConfig;
use saga_core::{Client, Orchestrator, PgStore, QueryStore, SagaStatus, Transport, Worker};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::order::{self, Order};
use crate::{TestDb, wait_until};

/// Orchestrator tuning for tests: quick polls, short leases.
pub fn config() -> OrchestratorConfig {
    OrchestratorConfig {
        poll_interval: Duration::from_millis(100),
        outbox_lease: Duration::from_secs(1),
        ..OrchestratorConfig::default()
    }
}

/// Tasks running an order saga's orchestrator and participants.
pub struct Running {
    /// The definition the orchestrator runs.
    pub definition: saga_core::SagaDefinition<Order>,
    /// The store (in the test's schema).
    pub store: Arc<PgStore>,
    /// A client on the store.
    pub client: Client,
    /// Stops every task.
    pub shutdown: CancellationToken,
    /// The tasks.
    pub tasks: JoinSet<saga_core::Result<()>>,
}

/// Spawns the three participants (each on its own transport from `transport`) and one
/// orchestrator (on another).
pub async fn run<T, F, Fut>(db: &TestDb, transport: F) -> Running
where
    T: Transport,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    run_holding(db, transport, &[]).await.0
}

/// Like [`run`], but the workers of the services in `held` are returned instead of spawned,
/// for the test to start later (with [`Running::spawn`]).
pub async fn run_holding<T, F, Fut>(
    db: &TestDb,
    transport: F,
    held: &[&str],
) -> (Running, Vec<Worker>)
where
    T: Transport,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    run_definition(db, transport, &order::definition(), held).await
}

/// Like [`run_holding`], with `definition` (an order saga of other timings).
pub async fn run_definition<T, F, Fut>(
    db: &TestDb,
    mut transport: F,
    definition: &saga_core::SagaDefinition<Order>,
    held: &[&str],
) -> (Running, Vec<Worker>)
where
    T: Transport,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let store = Arc::new(db.store_with_lease(Duration::from_secs(1)));
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut waiting = Vec::new();
    for worker in order::participants(&db.pool, &db.schema).await.workers {
        if held.contains(&worker.service()) {
            waiting.push(worker);
        } else {
            tasks.spawn(worker.run(Arc::new(transport().await), shutdown.clone()));
        }
    }
    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(transport().await))
        .register(definition)
        .config(config())
        .build();
    tasks.spawn(orchestrator.run(shutdown.clone()));
    let running = Running {
        definition: definition.clone(),
        client: Client::new(store.clone()),
        store,
        shutdown,
        tasks,
    };
    (running, waiting)
}

impl Running {
    /// Spawns a worker that was held back.
    pub fn spawn(&mut self, worker: Worker, transport: impl Transport) {
        self.tasks
            .spawn(worker.run(Arc::new(transport), self.shutdown.clone()));
    }

    /// Starts `n` orders; every `fail_every`-th one's shipment fails terminally.
    pub async fn start(&self, n: u32, fail_every: u32) -> Vec<Uuid> {
        let def = &self.definition;
        let mut ids = Vec::with_capacity(n as usize);
        for id in 0..n {
            let order = Order {
                id,
                fail_ship: id.is_multiple_of(fail_every),
                ..Order::default()
            };
            ids.push(self.client.start(def, &order).await.expect("start").saga_id);
        }
        ids
    }

    /// Waits until every saga of `ids` shows a reason that starts with `prefix` (`fencing step
    /// ship`, say), within `timeout`; returns whether they all did.
    pub async fn all_show(&self, ids: &[Uuid], prefix: &str, timeout: Duration) -> bool {
        wait_until(timeout, || async {
            let mut all = true;
            for id in ids {
                let reason = self.client.summary(*id).await.unwrap().unwrap().reason;
                all &= reason.is_some_and(|r| r.starts_with(prefix));
            }
            all
        })
        .await
    }

    /// Waits until no saga is active; returns the counts by status.
    pub async fn settle(&self, timeout: Duration) -> BTreeMap<SagaStatus, u64> {
        let settled = wait_until(timeout, || async {
            let counts = self.store.count_by_status().await.unwrap();
            counts.keys().all(|s| !s.is_active())
        })
        .await;
        let counts = self.store.count_by_status().await.unwrap();
        assert!(settled, "sagas still active after {timeout:?}: {counts:?}");
        counts
    }

    /// Stops every task and checks each ended cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(result) = self.tasks.join_next().await {
            result
                .expect("task did not panic")
                .expect("task ended cleanly");
        }
    }
}

/// Checks that each saga has exactly the effects its outcome requires, in order: reserve,
/// charge, ship when completed; reserve, charge, refund, release when compensated.
pub async fn assert_effects(db: &TestDb, ids: &[Uuid], fail_every: u32) {
    for (n, id) in ids.iter().enumerate() {
        let effects = order::effects(&db.pool, &db.schema, *id).await;
        let expected: &[&str] = if (n as u32).is_multiple_of(fail_every) {
            &["reserve", "charge", "refund", "release"]
        } else {
            &["reserve", "charge", "ship"]
        };
        assert_eq!(effects, expected, "saga #{n} {id}");
    }
}
