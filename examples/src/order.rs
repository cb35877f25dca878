//! The order saga: reserve inventory, charge the payment, create the shipment.

use std::time::Duration;

use saga_core::{RetryPolicy, SagaDefinition};
use serde::{Deserialize, Serialize};

use crate::{CommandSpec, Example, Receipt};

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
    /// The address cannot be served: the shipment fails terminally and the saga compensates.
    #[serde(default)]
    pub undeliverable: bool,
}

/// Reserve `quantity` of `sku`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reserve {
    /// The order number.
    pub order_no: u64,
    /// What to reserve.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// Charge an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// The order number.
    pub order_no: u64,
    /// The amount in cents.
    pub amount_cents: u64,
}

/// Ship an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ship {
    /// The order number.
    pub order_no: u64,
    /// Whether the address is undeliverable.
    pub undeliverable: bool,
}

/// Undo what a receipt names (release a reservation, refund a charge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Undo {
    /// The order number.
    pub order_no: u64,
    /// The receipt of the step to undo, if its result came (a timed-out step has none).
    pub receipt: Option<Receipt>,
}

/// The order saga.
#[derive(Debug, Clone, Copy)]
pub struct OrderSaga;

/// The retry policy of the examples: 8 attempts, 100 ms to 5 s, so about 11 s of backoff: a
/// participant whose database restarts (which can take seconds while PostgreSQL recovers) gets
/// it back before its step runs out of attempts.
pub fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 8,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(5),
        ..RetryPolicy::default()
    }
}

/// Each attempt's timeout in the examples, unless `STEP_TIMEOUT_MS` says otherwise.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Each attempt's timeout: `STEP_TIMEOUT_MS` (milliseconds, at least 1) or [`STEP_TIMEOUT`].
pub fn step_timeout_from_env() -> Result<Duration, String> {
    match std::env::var("STEP_TIMEOUT_MS") {
        Err(_) => Ok(STEP_TIMEOUT),
        Ok(v) => match v.parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => Err(format!(
                "invalid STEP_TIMEOUT_MS: expected a positive number of milliseconds, got `{v}`"
            )),
        },
    }
}

/// The step timeout the examples' definitions use; the programs check `STEP_TIMEOUT_MS` at
/// start ([`step_timeout_from_env`]), so a bad value never gets here unnoticed.
pub fn step_timeout() -> Duration {
    step_timeout_from_env().unwrap_or(STEP_TIMEOUT)
}

impl Example for OrderSaga {
    type Input = Order;

    const PROGRAM: &'static str = "order-saga";

    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec {
            service: "inventory",
            command: "reserve",
            fails_when: None,
        },
        CommandSpec {
            service: "inventory",
            command: "release",
            fails_when: None,
        },
        CommandSpec {
            service: "payment",
            command: "charge",
            fails_when: None,
        },
        CommandSpec {
            service: "payment",
            command: "refund",
            fails_when: None,
        },
        CommandSpec {
            service: "shipping",
            command: "ship",
            fails_when: Some("undeliverable"),
        },
    ];

    fn definition() -> SagaDefinition<Order> {
        let undo = |step: &'static str| {
            move |ctx: &saga_core::StepContext<'_, Order>| {
                Ok(Undo {
                    order_no: ctx.input().order_no,
                    receipt: ctx.try_output(step)?,
                })
            }
        };
        SagaDefinition::<Order>::builder("order", 1)
            .step("reserve", |s| {
                s.action("inventory", "reserve", |ctx| {
                    let o = ctx.input();
                    Ok(Reserve {
                        order_no: o.order_no,
                        sku: o.sku.clone(),
                        quantity: o.quantity,
                    })
                })
                .compensation("inventory", "release", undo("reserve"))
                .retry(retry())
                .timeout(step_timeout())
            })
            .step("charge", |s| {
                s.action("payment", "charge", |ctx| {
                    Ok(Charge {
                        order_no: ctx.input().order_no,
                        amount_cents: ctx.input().amount_cents,
                    })
                })
                .compensation("payment", "refund", undo("charge"))
                .retry(retry())
                .timeout(step_timeout())
            })
            .step("ship", |s| {
                s.pivot()
                    .action("shipping", "ship", |ctx| {
                        Ok(Ship {
                            order_no: ctx.input().order_no,
                            undeliverable: ctx.input().undeliverable,
                        })
                    })
                    .retry(retry())
                    .timeout(step_timeout())
            })
            .build()
            .expect("the order saga is valid")
    }

    fn input(n: u64, fail: bool) -> Order {
        Order {
            order_no: n,
            sku: format!("SKU-{}", n % 7),
            quantity: 1 + (n % 3) as u32,
            amount_cents: 1_000 + 250 * (n % 5),
            undeliverable: fail,
        }
    }
}
