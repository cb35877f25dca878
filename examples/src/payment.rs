//! The payment saga: fraud check, authorize (void), ledger entry (reverse), capture (pivot).

use saga_core::{SagaDefinition, StepContext};
use serde::{Deserialize, Serialize};

use crate::order::{retry, step_timeout};
use crate::{CommandSpec, Example, Receipt};

/// A card payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    /// The payment number.
    pub payment_no: u64,
    /// The amount in cents.
    pub amount_cents: u64,
    /// The card's issuer refuses the capture: the saga compensates.
    #[serde(default)]
    pub capture_refused: bool,
}

/// What each payment command receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentCommand {
    /// The payment number.
    pub payment_no: u64,
    /// The amount in cents.
    pub amount_cents: u64,
    /// The receipt of the step this command undoes or completes, if any.
    pub receipt: Option<Receipt>,
    /// Whether the capture is refused.
    pub capture_refused: bool,
}

/// The payment saga.
#[derive(Debug, Clone, Copy)]
pub struct PaymentSaga;

fn command(
    step: Option<&'static str>,
) -> impl Fn(&StepContext<'_, Payment>) -> Result<PaymentCommand, saga_core::InputError>
+ Send
+ Sync
+ 'static {
    move |ctx| {
        let p = ctx.input();
        Ok(PaymentCommand {
            payment_no: p.payment_no,
            amount_cents: p.amount_cents,
            receipt: match step {
                Some(step) => ctx.try_output(step)?,
                None => None,
            },
            capture_refused: p.capture_refused,
        })
    }
}

impl Example for PaymentSaga {
    type Input = Payment;

    const PROGRAM: &'static str = "payment-saga";

    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec {
            service: "fraud",
            command: "check",
            fails_when: None,
        },
        CommandSpec {
            service: "gateway",
            command: "authorize",
            fails_when: None,
        },
        CommandSpec {
            service: "gateway",
            command: "void",
            fails_when: None,
        },
        CommandSpec {
            service: "ledger",
            command: "entry",
            fails_when: None,
        },
        CommandSpec {
            service: "ledger",
            command: "reverse",
            fails_when: None,
        },
        CommandSpec {
            service: "gateway",
            command: "capture",
            fails_when: Some("capture_refused"),
        },
    ];

    fn definition() -> SagaDefinition<Payment> {
        SagaDefinition::<Payment>::builder("payment", 1)
            .step("fraud_check", |s| {
                s.action("fraud", "check", command(None))
                    .retry(retry())
                    .timeout(step_timeout())
            })
            .step("authorize", |s| {
                s.action("gateway", "authorize", command(None))
                    .compensation("gateway", "void", command(Some("authorize")))
                    .retry(retry())
                    .timeout(step_timeout())
            })
            .step("ledger_entry", |s| {
                s.action("ledger", "entry", command(None))
                    .compensation("ledger", "reverse", command(Some("ledger_entry")))
                    .retry(retry())
                    .timeout(step_timeout())
            })
            .step("capture", |s| {
                s.pivot()
                    .action("gateway", "capture", command(Some("authorize")))
                    .retry(retry())
                    .timeout(step_timeout())
            })
            .build()
            .expect("the payment saga is valid")
    }

    fn input(n: u64, fail: bool) -> Payment {
        Payment {
            payment_no: n,
            amount_cents: 500 + 125 * (n % 9),
            capture_refused: fail,
        }
    }
}
