//! The expense saga: reserve budget (release), wait for a manager's approval, pay (the pivot).
//! The approval is a signal; without one within three days the saga compensates, and the whole
//! saga has a deadline of seven days. It can be cancelled until it pays.

use std::time::Duration;

use saga_core::{SagaDefinition, StepContext};
use serde::{Deserialize, Serialize};

use crate::order::{retry, step_timeout};
use crate::{CommandSpec, Example, Receipt};

/// An expense claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expense {
    /// The claim's number.
    pub expense_no: u64,
    /// Who claims.
    pub employee: String,
    /// How much, in cents.
    pub amount_cents: u64,
}

/// The manager's answer: the `approval` signal's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Whether the expense is approved.
    pub approved: bool,
    /// Who decided.
    pub approver: String,
    /// Why, if rejected.
    #[serde(default)]
    pub comment: String,
}

/// What the budget and payroll commands receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpenseCommand {
    /// The claim's number.
    pub expense_no: u64,
    /// How much, in cents.
    pub amount_cents: u64,
    /// The budget reservation to release, for the compensation.
    pub reservation: Option<Receipt>,
}

/// How long a manager has to answer.
pub const APPROVAL_WAIT: Duration = Duration::from_secs(3 * 24 * 3600);
/// How long the whole claim may take before it is compensated.
pub const DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The expense saga.
#[derive(Debug, Clone, Copy)]
pub struct ExpenseSaga;

fn command(ctx: &StepContext<'_, Expense>) -> Result<ExpenseCommand, saga_core::InputError> {
    Ok(ExpenseCommand {
        expense_no: ctx.input().expense_no,
        amount_cents: ctx.input().amount_cents,
        reservation: ctx.try_output("reserve_budget")?,
    })
}

/// The expense saga with a given approval wait and deadline (tests shorten them).
pub fn definition_with(approval_wait: Duration, deadline: Duration) -> SagaDefinition<Expense> {
    SagaDefinition::<Expense>::builder("expense", 1)
        .deadline(deadline)
        .step("reserve_budget", |s| {
            s.action("budget", "reserve", command)
                .compensation("budget", "release", command)
                .retry(retry())
                .timeout(step_timeout())
        })
        .step("approval", |s| {
            s.wait_for::<Approval>("approval", |a| {
                if a.approved {
                    Ok(())
                } else {
                    Err(format!("rejected by {}: {}", a.approver, a.comment))
                }
            })
            .timeout(approval_wait)
        })
        .step("pay", |s| {
            s.pivot()
                .action("payroll", "pay", command)
                .retry(retry())
                .timeout(step_timeout())
        })
        .build()
        .expect("the expense saga is valid")
}

impl Example for ExpenseSaga {
    type Input = Expense;

    const PROGRAM: &'static str = "expense-saga";

    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec {
            service: "budget",
            command: "reserve",
            fails_when: None,
        },
        CommandSpec {
            service: "budget",
            command: "release",
            fails_when: None,
        },
        CommandSpec {
            service: "payroll",
            command: "pay",
            fails_when: None,
        },
    ];

    fn definition() -> SagaDefinition<Expense> {
        definition_with(APPROVAL_WAIT, DEADLINE)
    }

    fn input(n: u64, _fail: bool) -> Expense {
        Expense {
            expense_no: n,
            employee: format!("employee-{}", n % 13),
            amount_cents: 2_000 + 500 * (n % 7),
        }
    }

    /// The manager approves, or (`fail`) rejects, so the saga pays or compensates.
    fn demo_signals(_n: u64, fail: bool) -> Vec<(&'static str, serde_json::Value)> {
        let approval = Approval {
            approved: !fail,
            approver: "demo-manager".into(),
            comment: if fail {
                "over budget".into()
            } else {
                String::new()
            },
        };
        vec![(
            "approval",
            serde_json::to_value(approval).expect("an approval serializes"),
        )]
    }
}
