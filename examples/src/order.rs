//! The order saga: reserve inventory, charge the payment, create the shipment.

pub mod demo;

use saga_core::{RetryPolicy, SagaDefinition};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The saga's durable name.
pub const SAGA: &str = "order";

/// An order to fulfil.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The order number.
    pub order_no: u64,
    /// What is ordered.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// The price in cents.
    pub amount_cents: u64,
    /// Test hook: the shipment fails terminally, so the saga compensates.
    #[serde(default)]
    pub undeliverable: bool,
}

/// Reserve `quantity` of `sku` for an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reserve {
    /// The order number.
    pub order_no: u64,
    /// What to reserve.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// A reservation that was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// Its id, to release it.
    pub reservation_id: String,
}

/// Charge an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// The order number.
    pub order_no: u64,
    /// The amount in cents.
    pub amount_cents: u64,
}

/// A charge that was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// Its id, to refund it.
    pub charge_id: String,
}

/// Ship an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ship {
    /// The order number.
    pub order_no: u64,
    /// Whether the address is undeliverable (a test hook).
    pub undeliverable: bool,
}

/// The order saga, version 1.
pub fn definition() -> SagaDefinition<Order> {
    let retry = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(5),
        ..RetryPolicy::default()
    };
    SagaDefinition::<Order>::builder(SAGA, 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |ctx| {
                let o = ctx.input();
                Ok(Reserve {
                    order_no: o.order_no,
                    sku: o.sku.clone(),
                    quantity: o.quantity,
                })
            })
            .compensation("inventory", "release", |ctx| {
                ctx.output::<Reservation>("reserve")
            })
            .retry(retry.clone())
            .timeout(Duration::from_secs(30))
        })
        .step("charge", |s| {
            s.action("payment", "charge", |ctx| {
                Ok(Charge {
                    order_no: ctx.input().order_no,
                    amount_cents: ctx.input().amount_cents,
                })
            })
            .compensation("payment", "refund", |ctx| {
                // A timed-out charge may have gone through: refund by order number then.
                Ok(ctx.try_output::<Receipt>("charge")?.map_or_else(
                    || format!("order-{}", ctx.input().order_no),
                    |r| r.charge_id,
                ))
            })
            .retry(retry.clone())
            .timeout(Duration::from_secs(30))
        })
        .step("ship", |s| {
            s.pivot()
                .action("shipping", "ship", |ctx| {
                    Ok(Ship {
                        order_no: ctx.input().order_no,
                        undeliverable: ctx.input().undeliverable,
                    })
                })
                .retry(retry)
                .timeout(Duration::from_secs(30))
        })
        .build()
        .expect("the order saga is valid")
}

/// The `n`-th order (from 1) of a run where every `fail_every`-th order is undeliverable.
pub fn nth_order(n: u64, fail_every: Option<u64>) -> Order {
    Order {
        order_no: n,
        sku: format!("SKU-{}", n % 7),
        quantity: 1 + (n % 3) as u32,
        amount_cents: 1_000 + 250 * (n % 5),
        undeliverable: fail_every.is_some_and(|k| k > 0 && n.is_multiple_of(k)),
    }
}
