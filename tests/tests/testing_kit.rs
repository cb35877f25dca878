//! The testing kit: sagas on a virtual clock, handlers as closures, injected faults.

use std::time::Duration;

use saga_core::testing::{Fault, TestEnv};
use saga_core::{Event, SagaDefinition, SagaStatus, StepError};
use saga_examples::expense::{Approval, Expense, definition_with};
use saga_examples::{Example, Receipt};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn env() -> (TestEnv, SagaDefinition<Expense>) {
    let def = definition_with(3 * DAY, 7 * DAY);
    let mut env = TestEnv::new();
    let receipt = |what: &'static str| {
        move |_: serde_json::Value| Ok::<_, StepError>(Receipt { id: what.into() })
    };
    env.register(&def)
        .handle("budget", "reserve", receipt("res-1"))
        .handle("budget", "release", receipt("rel-1"))
        .handle("payroll", "pay", receipt("pay-1"));
    (env, def)
}

fn approval(approved: bool) -> Approval {
    Approval {
        approved,
        approver: "maria".into(),
        comment: if approved {
            String::new()
        } else {
            "no receipt".into()
        },
    }
}

fn expense(n: u64) -> Expense {
    saga_examples::expense::ExpenseSaga::input(n, false)
}

#[test]
fn approved_rejected_and_timed_out() {
    let (mut env, def) = env();
    let approved = env.start(&def, &expense(1));
    let rejected = env.start(&def, &expense(2));
    let forgotten = env.start(&def, &expense(3));
    assert_eq!(env.status(approved), SagaStatus::Running);

    env.advance(DAY);
    env.signal(approved, "approval", &approval(true));
    env.signal(rejected, "approval", &approval(false));
    assert_eq!(env.status(approved), SagaStatus::Completed);
    assert_eq!(env.commands(approved), ["budget.reserve", "payroll.pay"]);
    assert_eq!(env.status(rejected), SagaStatus::Compensated);
    assert!(
        env.state(rejected)
            .failure()
            .unwrap()
            .contains("rejected by maria: no receipt")
    );
    assert_eq!(env.commands(rejected), ["budget.reserve", "budget.release"]);

    env.advance(2 * DAY - Duration::from_secs(1));
    assert_eq!(
        env.status(forgotten),
        SagaStatus::Running,
        "still within its three days"
    );
    env.advance(Duration::from_secs(1));
    assert_eq!(env.status(forgotten), SagaStatus::Compensated);
    assert!(
        env.state(forgotten)
            .failure()
            .unwrap()
            .contains("no signal `approval` within")
    );
}

#[test]
fn a_signal_before_the_wait_is_kept() {
    let (mut env, def) = env();
    // The reservation's result is lost, so the saga is still at its first step when the
    // approval comes; it is kept, and taken when the wait begins.
    env.inject("budget", "reserve", Fault::LoseResult);
    let id = env.start(&def, &expense(4));
    env.signal(id, "approval", &approval(true));
    assert_eq!(env.status(id), SagaStatus::Running);
    env.advance(Duration::from_secs(31)); // the reservation's attempt times out and is retried
    env.advance(Duration::from_secs(5));
    assert_eq!(env.status(id), SagaStatus::Completed);
    let kinds: Vec<&str> = env.history(id).iter().map(|r| r.event.kind()).collect();
    let signal = kinds.iter().position(|k| *k == "signal_received").unwrap();
    let wait = kinds.iter().position(|k| *k == "waiting").unwrap();
    assert!(signal < wait, "{kinds:?}");
}

#[test]
fn cancel_before_the_pivot_compensates_and_after_it_is_refused() {
    let (mut env, def) = env();
    let waiting = env.start(&def, &expense(5));
    env.advance(DAY);
    assert_eq!(env.cancel(waiting, "employee withdrew"), Ok(()));
    assert_eq!(env.status(waiting), SagaStatus::Cancelled);
    assert_eq!(env.commands(waiting), ["budget.reserve", "budget.release"]);

    let paid = env.start(&def, &expense(6));
    env.signal(paid, "approval", &approval(true));
    let refused = env.cancel(paid, "too late").unwrap_err();
    assert_eq!(refused, "the saga is completed");

    // Past the pivot but not finished: the payment fails once and is retried.
    env.inject(
        "payroll",
        "pay",
        Fault::Fail(StepError::retryable("bank offline")),
    );
    let paying = env.start(&def, &expense(7));
    env.signal(paying, "approval", &approval(true));
    let refused = env.cancel(paying, "too late").unwrap_err();
    assert_eq!(refused, "the saga has passed its pivot step `pay`");
    env.advance(Duration::from_secs(10));
    assert_eq!(env.status(paying), SagaStatus::Completed);
}

#[test]
fn the_deadline_compensates_a_saga_before_its_pivot() {
    let def = SagaDefinition::<u32>::builder("slow", 1)
        .deadline(Duration::from_secs(60))
        .step("hold", |s| {
            s.action("svc", "hold", |ctx| Ok(*ctx.input()))
                .compensation("svc", "free", |ctx| Ok(*ctx.input()))
        })
        .step("wait", |s| s.delay(Duration::from_secs(120)))
        .step("go", |s| {
            s.pivot().action("svc", "go", |ctx| Ok(*ctx.input()))
        })
        .build()
        .unwrap();
    let mut env = TestEnv::new();
    env.register(&def)
        .handle("svc", "hold", |n: u32| Ok::<_, StepError>(n))
        .handle("svc", "free", |_: u32| Ok::<_, StepError>(()))
        .handle("svc", "go", |_: u32| Ok::<_, StepError>(()));
    let id = env.start(&def, &1);
    env.advance(Duration::from_secs(300));
    assert_eq!(env.status(id), SagaStatus::Compensated);
    assert_eq!(env.commands(id), ["svc.hold", "svc.free"]);
    assert!(
        env.history(id)
            .iter()
            .any(|r| r.event == Event::DeadlineExceeded)
    );
}

/// The kit's participants keep an inbox, as real workers do: a payment whose answers are all
/// lost times out until the saga gives up and fences it; the fence finds it applied, so it is
/// compensated. A payment that never reached its handler is found unapplied: nothing to undo.
#[test]
fn lost_answers_and_lost_commands_are_settled_by_a_fence() {
    for (fault, undone) in [(Fault::LoseResult, true), (Fault::LoseCommand, false)] {
        let def = SagaDefinition::<u64>::builder("order", 1)
            .step("pay", |s| {
                s.action("payroll", "pay", |c| Ok(*c.input()))
                    .compensation("payroll", "refund", |c| Ok(*c.input()))
                    .retry(saga_core::RetryPolicy::no_retry())
                    .timeout(Duration::from_secs(30))
            })
            .step("ship", |s| {
                s.pivot().action("shipping", "ship", |c| Ok(*c.input()))
            })
            .build()
            .unwrap();
        let mut env = TestEnv::new();
        env.register(&def)
            .handle("payroll", "pay", |n: u64| Ok::<_, StepError>(n))
            .handle("payroll", "refund", |n: u64| Ok::<_, StepError>(n))
            .handle("shipping", "ship", |n: u64| Ok::<_, StepError>(n))
            .inject("payroll", "pay", fault.clone());
        let id = env.start(&def, &5);
        env.advance(Duration::from_secs(31));
        assert_eq!(env.status(id), SagaStatus::Compensated, "{fault:?}");
        assert_eq!(
            env.commands(id).contains(&"payroll.refund".to_owned()),
            undone,
            "{fault:?}: {:?}",
            env.commands(id)
        );
        let fenced = env
            .history(id)
            .iter()
            .any(|r| matches!(r.event, Event::FenceStarted { .. }));
        assert!(fenced, "{fault:?}");
    }
}
