//! The embedded demo: the order saga, its orchestrator and its three participants in one
//! process, on the in-memory store and the in-process transport. No services needed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use saga_core::orchestrator::OrchestratorConfig;
use saga_core::worker::{CommandContext, Handler, StepError, Worker};
use saga_core::{Client, InProcessTransport, MemoryStore, Orchestrator, SagaStatus, Transport};
use tokio_util::sync::CancellationToken;

use super::{Charge, Receipt, Reservation, Reserve, Ship, definition, nth_order};

/// The inventory service's `reserve`.
pub struct ReserveStock;

impl Handler for ReserveStock {
    type Input = Reserve;
    type Output = Reservation;

    async fn handle(&self, r: Reserve, _ctx: CommandContext) -> Result<Reservation, StepError> {
        Ok(Reservation {
            reservation_id: format!("res-{}-{}", r.order_no, r.sku),
        })
    }
}

/// The payment service's `charge`.
pub struct ChargeCard;

impl Handler for ChargeCard {
    type Input = Charge;
    type Output = Receipt;

    async fn handle(&self, c: Charge, _ctx: CommandContext) -> Result<Receipt, StepError> {
        Ok(Receipt {
            charge_id: format!("ch-{}-{}", c.order_no, c.amount_cents),
        })
    }
}

/// The shipping service's `ship`: fails terminally for undeliverable orders.
pub struct CreateShipment;

impl Handler for CreateShipment {
    type Input = Ship;
    type Output = String;

    async fn handle(&self, s: Ship, _ctx: CommandContext) -> Result<String, StepError> {
        if s.undeliverable {
            return Err(StepError::terminal("address undeliverable"));
        }
        Ok(format!("shp-{}", s.order_no))
    }
}

/// A compensation that only acknowledges (release, refund).
pub struct Undo;

impl Handler for Undo {
    type Input = serde_json::Value;
    type Output = ();

    async fn handle(
        &self,
        _input: serde_json::Value,
        _ctx: CommandContext,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// Runs `count` orders in memory (every `fail_every`-th one compensates), prints a timeline per
/// saga and a status line, and returns the counts.
pub async fn run(count: u64, fail_every: Option<u64>) -> anyhow::Result<BTreeMap<SagaStatus, u64>> {
    let def = definition();
    let store = Arc::new(MemoryStore::new());
    let transport: Arc<dyn Transport> = Arc::new(InProcessTransport::new());
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let workers = [
        Worker::builder("inventory")
            .handler("reserve", ReserveStock)
            .handler("release", Undo)
            .build(),
        Worker::builder("payment")
            .handler("charge", ChargeCard)
            .handler("refund", Undo)
            .build(),
        Worker::builder("shipping")
            .handler("ship", CreateShipment)
            .build(),
    ];
    for worker in workers {
        tasks.spawn(worker.run(Arc::clone(&transport), shutdown.clone()));
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
        let order = nth_order(n, fail_every);
        ids.push(
            client
                .start_with_key(&def, &order, format!("order-{n}"))
                .await?
                .saga_id,
        );
    }
    let counts = loop {
        let counts = client.count_by_status().await?;
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
        println!(
            "{}",
            crate::timeline::render(&summary, def.definition(), &history)
        );
    }
    Ok(counts)
}
