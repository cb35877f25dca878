//! A saga, its two services with their inboxes, and its tests, in one small program: a
//! starting point to copy.
//!
//! An order reserves its item at the warehouse (released if the order fails), charges the card
//! (refunded if it fails), and ships (the pivot: an address that cannot be served fails it,
//! and the order compensates). Each service keeps its data and its inbox in a schema of its
//! own; each command's writes commit with its inbox record, once, however often it is
//! delivered. The steps and the handlers share one declaration of each command (a contract),
//! so they cannot disagree on a name or a type.
//!
//! `plain-saga [ORDERS]`, with `DATABASE_URL` and `AMQP_URL`: creates the tables, runs the
//! orchestrator and both services in this process, places ORDERS orders (default 5; every
//! third one undeliverable) and prints how each ended. Placing them is idempotent: a second
//! run prints the same outcomes. In production each service runs as a process of its own,
//! with its own database; only the wiring in `main` changes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::worker::{CommandContext, Handler, StepError, Worker};
use saga_core::{
    Client, Inbox, Orchestrator, PgHosts, PgStore, SagaDefinition, SagaStatus, contract, service,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

/// What the customer ordered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    order_no: u64,
    sku: String,
    amount_cents: i64,
    /// Empty: the order cannot be shipped.
    address: String,
}

/// A reservation of the order's item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reservation {
    reservation_id: String,
}

/// A charge of the order's amount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
}

/// A shipment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Shipment {
    tracking_no: String,
}

service!(Warehouse = "warehouse");
service!(Payments = "payments");
contract!(Reserve: Warehouse, "reserve", Order => Reservation);
contract!(Release: Warehouse, "release", Reservation => ());
contract!(Ship: Warehouse, "ship", Order => Shipment);
contract!(Charge: Payments, "charge", Order => Receipt);
contract!(Refund: Payments, "refund", Receipt => ());

/// The saga: each compensation reads what its action returned.
fn order_saga() -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder("plain-order", 1)
        .step("reserve", |s| {
            s.call::<Reserve>(|ctx| ctx.input().clone())
                .compensate::<Release>(|_, reservation| reservation)
        })
        .step("charge", |s| {
            s.call::<Charge>(|ctx| ctx.input().clone())
                .compensate::<Refund>(|_, receipt| receipt)
        })
        .step("ship", |s| {
            s.call::<Ship>(|ctx| ctx.input().clone()).pivot()
        })
        .build()
        .expect("the saga is valid")
}

// The handlers: each writes through the command's transaction, which commits with its inbox
// record. An error is retryable unless marked terminal.

struct ReserveItem;

impl Handler for ReserveItem {
    type Input = Order;
    type Output = Reservation;

    async fn handle(&self, order: Order, ctx: CommandContext) -> Result<Reservation, StepError> {
        let reservation_id = format!("r-{}", order.order_no);
        let mut tx = ctx.transaction().await?;
        sqlx::query("INSERT INTO warehouse.reservations (id, sku) VALUES ($1, $2)")
            .bind(&reservation_id)
            .bind(&order.sku)
            .execute(&mut *tx)
            .await?;
        Ok(Reservation { reservation_id })
    }
}

struct ReleaseItem;

impl Handler for ReleaseItem {
    type Input = Reservation;
    type Output = ();

    async fn handle(&self, reservation: Reservation, ctx: CommandContext) -> Result<(), StepError> {
        let mut tx = ctx.transaction().await?;
        sqlx::query("UPDATE warehouse.reservations SET released = true WHERE id = $1")
            .bind(&reservation.reservation_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

struct ShipOrder;

impl Handler for ShipOrder {
    type Input = Order;
    type Output = Shipment;

    async fn handle(&self, order: Order, ctx: CommandContext) -> Result<Shipment, StepError> {
        if order.address.is_empty() {
            // A business refusal: final, and the order compensates.
            return Err(StepError::terminal("no address to ship to"));
        }
        let tracking_no = format!("t-{}", order.order_no);
        let mut tx = ctx.transaction().await?;
        sqlx::query("INSERT INTO warehouse.shipments (tracking_no, address) VALUES ($1, $2)")
            .bind(&tracking_no)
            .bind(&order.address)
            .execute(&mut *tx)
            .await?;
        Ok(Shipment { tracking_no })
    }
}

struct ChargeCard;

impl Handler for ChargeCard {
    type Input = Order;
    type Output = Receipt;

    async fn handle(&self, order: Order, ctx: CommandContext) -> Result<Receipt, StepError> {
        let charge_id = format!("c-{}", order.order_no);
        let mut tx = ctx.transaction().await?;
        sqlx::query("INSERT INTO payments.charges (id, amount_cents) VALUES ($1, $2)")
            .bind(&charge_id)
            .bind(order.amount_cents)
            .execute(&mut *tx)
            .await?;
        Ok(Receipt { charge_id })
    }
}

struct RefundCard;

impl Handler for RefundCard {
    type Input = Receipt;
    type Output = ();

    async fn handle(&self, receipt: Receipt, ctx: CommandContext) -> Result<(), StepError> {
        let mut tx = ctx.transaction().await?;
        sqlx::query("UPDATE payments.charges SET refunded = true WHERE id = $1")
            .bind(&receipt.charge_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// The services' tables and inboxes, each service in its own schema.
async fn migrate_services(pool: &PgPool) -> anyhow::Result<Vec<Inbox>> {
    for statement in [
        "CREATE SCHEMA IF NOT EXISTS warehouse",
        "CREATE TABLE IF NOT EXISTS warehouse.reservations \
         (id text PRIMARY KEY, sku text NOT NULL, released boolean NOT NULL DEFAULT false)",
        "CREATE TABLE IF NOT EXISTS warehouse.shipments (tracking_no text PRIMARY KEY, address text NOT NULL)",
        "CREATE SCHEMA IF NOT EXISTS payments",
        "CREATE TABLE IF NOT EXISTS payments.charges \
         (id text PRIMARY KEY, amount_cents bigint NOT NULL, refunded boolean NOT NULL DEFAULT false)",
    ] {
        sqlx::query(statement).execute(pool).await?;
    }
    let mut inboxes = Vec::new();
    for schema in ["warehouse", "payments"] {
        let inbox = Inbox::new(pool.clone(), schema)?;
        inbox.migrate().await?;
        inboxes.push(inbox);
    }
    Ok(inboxes)
}

/// The two services' workers, each command's writes committed with its inbox record.
fn workers(warehouse_inbox: Inbox, payments_inbox: Inbox) -> [Worker; 2] {
    // Each command holds a connection of its inbox's pool while it runs: with one pool in
    // this program, the services run a few commands at once each.
    let warehouse = Worker::for_service::<Warehouse>(warehouse_inbox)
        .serve::<Reserve>(ReserveItem)
        .serve::<Release>(ReleaseItem)
        .serve::<Ship>(ShipOrder)
        .concurrency(8)
        .build();
    let payments = Worker::for_service::<Payments>(payments_inbox)
        .serve::<Charge>(ChargeCard)
        .serve::<Refund>(RefundCard)
        .concurrency(8)
        .build();
    [warehouse, payments]
}

/// Order `n`: every third has no address.
fn order(n: u64) -> Order {
    Order {
        order_no: n,
        sku: format!("SKU-{}", n % 4),
        amount_cents: 1_000 + 100 * n as i64,
        address: if n.is_multiple_of(3) {
            String::new()
        } else {
            format!("{n} Main Street")
        },
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let orders: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("ORDERS is a number")?,
        None => 5,
    };
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    // One host, or several with `target_session_attrs=read-write` to follow a failover.
    let hosts: PgHosts = url.parse()?;
    let pool = hosts
        .connect(PgPoolOptions::new().max_connections(20))
        .await?;
    let store = Arc::new(PgStore::builder(pool.clone()).build()?);
    store.migrate().await?;
    let [warehouse_inbox, payments_inbox]: [Inbox; 2] =
        migrate_services(&pool)
            .await?
            .try_into()
            .map_err(|_| anyhow::anyhow!("two inboxes"))?;
    let transport = Arc::new(AmqpTransport::connect(AmqpConfig::from_env()?).await?);

    let shutdown = CancellationToken::new();
    let [warehouse, payments] = workers(warehouse_inbox, payments_inbox);
    let saga = order_saga();
    let mut services = tokio::task::JoinSet::new();
    services.spawn(warehouse.run(transport.clone(), shutdown.clone()));
    services.spawn(payments.run(transport.clone(), shutdown.clone()));
    services.spawn(
        Orchestrator::builder(store.clone(), transport)
            .register(&saga)
            .build()
            .run(shutdown.clone()),
    );

    let client = Client::new(store);
    let placing = place_orders(&client, &saga, orders);
    // A service that stops (it cannot reach RabbitMQ, say) ends the program with its error,
    // rather than leave the orders waiting.
    let placed = tokio::select! {
        placed = placing => placed,
        Some(stopped) = services.join_next() => {
            Err(anyhow::anyhow!("a service stopped: {:?}", stopped?.err()))
        }
    };
    shutdown.cancel();
    while let Some(service) = services.join_next().await {
        service??;
    }
    for line in placed? {
        println!("{line}");
    }
    Ok(())
}

/// Places orders 1 to `orders` and says how each ended.
async fn place_orders(
    client: &Client,
    saga: &SagaDefinition<Order>,
    orders: u64,
) -> anyhow::Result<Vec<String>> {
    let mut placed = Vec::new();
    for n in 1..=orders {
        // The business key makes placing an order idempotent: a second run finds the sagas
        // of the first (so the rows the handlers key by order number are written once).
        let started = client
            .start_with_key(saga, &order(n), format!("plain-order-{n}"))
            .await?;
        placed.push((n, started.saga_id));
    }
    let mut lines = Vec::new();
    for (n, id) in placed {
        let outcome = client.outcome(id, Duration::from_secs(60)).await?;
        lines.push(match outcome.status {
            SagaStatus::Completed => {
                let shipment: Option<Shipment> = outcome.output("ship")?;
                let tracking = shipment.map(|s| s.tracking_no).unwrap_or_default();
                format!("order {n}: completed, tracking {tracking}")
            }
            status => format!(
                "order {n}: {status}: {}",
                outcome.reason.as_deref().unwrap_or("")
            ),
        });
    }
    Ok(lines)
}

/// The saga's logic on the test kit (a virtual clock, no broker), with its handlers as
/// closures and as they are.
#[cfg(test)]
mod tests {
    use saga_core::testing::{Fault, TestEnv};

    use super::*;

    fn env(refunds: Arc<std::sync::Mutex<Vec<String>>>) -> (TestEnv, SagaDefinition<Order>) {
        let saga = order_saga();
        let mut env = TestEnv::new();
        env.register(&saga)
            .serve::<Reserve>(|o| {
                Ok(Reservation {
                    reservation_id: format!("r-{}", o.order_no),
                })
            })
            .serve::<Release>(|_| Ok(()))
            .serve::<Charge>(|o| {
                Ok(Receipt {
                    charge_id: format!("c-{}", o.order_no),
                })
            })
            .serve::<Refund>(move |r| {
                refunds.lock().unwrap().push(r.charge_id);
                Ok(())
            })
            .serve::<Ship>(|o| {
                if o.address.is_empty() {
                    Err(StepError::terminal("no address to ship to"))
                } else {
                    Ok(Shipment {
                        tracking_no: format!("t-{}", o.order_no),
                    })
                }
            });
        (env, saga)
    }

    /// The real handlers on the test kit, writing through their inboxes: this one needs
    /// PostgreSQL (`DATABASE_URL`), where it creates a database of its own; no RabbitMQ.
    #[test]
    fn the_real_handlers_write_once_through_their_inboxes() {
        let url = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL names a PostgreSQL where this test may create a database");
        let database = format!("plain_saga_{}", uuid::Uuid::new_v4().simple());
        let mut env = TestEnv::new();
        // Pools are made on the env's runtime, where the handlers run.
        let (admin, pool, inboxes) = env.block_on(async move {
            let admin = PgPool::connect(&url)
                .await
                .expect("PostgreSQL at DATABASE_URL");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
                .execute(&admin)
                .await
                .expect("a database for the test");
            let (root, _) = url.rsplit_once('/').expect("a URL with a database");
            let pool = PgPool::connect(&format!("{root}/{database}"))
                .await
                .unwrap();
            let inboxes = migrate_services(&pool).await.expect("the services' tables");
            (admin, pool, inboxes)
        });
        let [warehouse_inbox, payments_inbox] = inboxes.try_into().expect("two inboxes");
        let saga = order_saga();
        env.register(&saga);
        for worker in workers(warehouse_inbox, payments_inbox) {
            env.worker(&worker);
        }
        // The first charge applies but its answer is lost: the retry finds it recorded.
        env.inject("payments", "charge", Fault::LoseResult);
        let shipped = env.start(&saga, &order(1));
        let undeliverable = env.start(&saga, &order(3));
        env.advance(Duration::from_secs(120));
        assert_eq!(env.status(shipped), SagaStatus::Completed);
        assert_eq!(env.status(undeliverable), SagaStatus::Compensated);
        let charges = env
            .commands(shipped)
            .iter()
            .filter(|c| *c == "payments.charge");
        assert_eq!(charges.count(), 2, "the charge was sent again");

        let counts: (i64, i64, i64, i64, i64) = env.block_on(async move {
            let counts = sqlx::query_as(
                "SELECT (SELECT count(*) FROM warehouse.reservations), \
                 (SELECT count(*) FROM warehouse.reservations WHERE released), \
                 (SELECT count(*) FROM warehouse.shipments), \
                 (SELECT count(*) FROM payments.charges), \
                 (SELECT count(*) FROM payments.charges WHERE refunded)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            pool.close().await;
            let database = pool.connect_options().get_database().unwrap().to_owned();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {database} WITH (FORCE)"
            )))
            .execute(&admin)
            .await
            .unwrap();
            counts
        });
        // Two reservations, one released; one shipment; two charges, one refunded.
        assert_eq!(counts, (2, 1, 1, 2, 1));
    }

    #[test]
    fn an_order_with_an_address_ships() {
        let (mut env, saga) = env(Arc::default());
        let id = env.start(&saga, &order(1));
        assert_eq!(env.status(id), SagaStatus::Completed);
        assert_eq!(
            env.commands(id),
            ["warehouse.reserve", "payments.charge", "warehouse.ship"]
        );
    }

    #[test]
    fn an_undeliverable_order_refunds_what_it_charged_and_releases_its_item() {
        let refunds = Arc::default();
        let (mut env, saga) = env(Arc::clone(&refunds));
        let id = env.start(&saga, &order(3));
        assert_eq!(env.status(id), SagaStatus::Compensated);
        assert_eq!(*refunds.lock().unwrap(), ["c-3"]);
        assert_eq!(
            env.commands(id),
            [
                "warehouse.reserve",
                "payments.charge",
                "warehouse.ship",
                "payments.refund",
                "warehouse.release"
            ]
        );
    }
}
