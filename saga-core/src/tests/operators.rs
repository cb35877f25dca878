//! Canned histories of operators and of sagas that park: an operator's retry and resolve go
//! through a fence; a late answer settles a stuck saga. No I/O.

use super::support;

use saga_core::{Direction, Event, Input, Outcome, SagaStatus, Timer};
use serde_json::json;
use support::{Run, dispatch, order};

use Direction::{Compensation as C, Fence as X, Forward as F};

fn fenced() -> Outcome {
    Outcome::Fenced {
        detail: "tombstone written".into(),
    }
}

fn operator_retry() -> Input {
    Input::Timer(Timer::Operator {
        id: uuid::Uuid::from_u128(9),
        action: saga_core::OperatorAction::Retry,
    })
}

/// A pivot whose service cannot fence (no inbox) is never compensated past: the saga parks
/// as stuck. An operator's retry fences it again (still unfenceable), then runs it again
/// under the same key (a worker without an inbox keeps its own idempotency by it).
#[test]
fn a_pivot_that_cannot_be_fenced_parks_the_saga() {
    let unfenceable = || Outcome::Unfenceable {
        detail: "no inbox".into(),
    };
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.ok(json!("C-1"));
    run.time_out_attempts(3);
    run.reply(unfenceable());
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert_eq!(run.state.stuck_at(), Some((2, F)));
    let reason = run.state.stuck_reason.clone().unwrap();
    assert!(reason.contains("pivot step `ship` is unknown"), "{reason}");
    let d = run.input(operator_retry());
    assert_eq!(dispatch(&d).direction, X);
    let d = run.reply(unfenceable());
    let again = dispatch(&d);
    assert_eq!((again.direction, again.attempt), (F, 4));
    assert_eq!(again.idempotency_key, format!("{}:2:forward", run.saga_id));
    run.ok(json!({}));
    assert_eq!(run.state.status, SagaStatus::Completed);
}

/// An operator's retry of a stuck compensation first fences it: a terminal failure recorded
/// under its key answers `fenced`, and the compensation runs again under a fresh key
/// (`...:compensation:1`), so the handler runs instead of returning the recorded failure. One
/// whose last attempts timed out may have applied meanwhile: fenced and found applied, it is
/// not run again.
#[test]
fn an_operator_retry_fences_then_runs_under_a_fresh_key() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.fail(false);
    run.fail(false);
    assert_eq!(run.state.status, SagaStatus::Stuck);
    let d = run.input(operator_retry());
    let fence = dispatch(&d);
    assert_eq!(fence.direction, X);
    assert_eq!(
        fence.idempotency_key,
        format!("{}:0:compensation", run.saga_id)
    );
    let d = run.reply(fenced());
    let again = dispatch(&d);
    assert_eq!((again.direction, again.attempt), (C, 2));
    assert_eq!(
        again.idempotency_key,
        format!("{}:0:compensation:1", run.saga_id)
    );
    // The retry policy counts afresh from the operator's retry.
    run.fail(true);
    assert!(matches!(
        run.events.last(),
        Some(Event::RetryScheduled { attempt: 3, .. })
    ));

    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.fail(false);
    run.time_out_attempts(3);
    assert_eq!(run.state.status, SagaStatus::Stuck);
    run.input(operator_retry());
    run.ok(json!(null));
    assert_eq!(run.state.status, SagaStatus::Compensated);
    assert_eq!(
        run.dispatched().iter().filter(|d| **d == (0, C)).count(),
        3,
        "not run again"
    );
}

/// A compensation resolved by hand is fenced first, so no delivery still on its way applies
/// it a second time; the saga then compensates on.
#[test]
fn a_resolved_compensation_is_fenced() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.ok(json!("C-1"));
    run.fail(false);
    run.time_out_attempts(3);
    assert_eq!(run.state.stuck_at(), Some((1, C)));
    let d = run.input(Input::Timer(Timer::Operator {
        id: uuid::Uuid::from_u128(4),
        action: saga_core::OperatorAction::Resolve {
            step: "charge".into(),
            reason: "refunded by hand".into(),
        },
    }));
    let fence = dispatch(&d);
    assert_eq!(fence.direction, X);
    assert_eq!(
        fence.idempotency_key,
        format!("{}:1:compensation", run.saga_id)
    );
    let d = run.reply(fenced());
    assert_eq!(dispatch(&d).command, "release");
    run.ok(json!(null));
    assert_eq!(run.state.status, SagaStatus::Compensated);
}

/// A compensation that ran out of attempts parks the saga; its late success settles it: the
/// saga compensates on and ends compensated.
#[test]
fn a_late_compensation_success_settles_a_stuck_saga() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.ok(json!("C-1"));
    run.fail(false);
    let refund_one = run.state.first_current().unwrap().command_id.unwrap();
    run.time_out();
    run.retry_now();
    run.fail(true);
    run.retry_now();
    run.fail(true);
    assert_eq!(run.state.status, SagaStatus::Stuck);
    let d = run.late(
        refund_one,
        Outcome::Success {
            output: json!(null),
        },
    );
    assert_eq!(dispatch(&d).command, "release");
    assert_eq!(run.state.status, SagaStatus::Compensating);
    run.ok(json!(null));
    assert_eq!(run.state.status, SagaStatus::Compensated);
}

/// A compensation run by another service than its action: an operator's fence of it goes to
/// the compensation's service, under the compensation's key, not to the action's.
#[test]
fn a_compensations_fence_goes_to_its_own_service() {
    let def = saga_core::SagaDefinition::<serde_json::Value>::builder("order", 1)
        .step("charge", |s| {
            s.action("payment", "charge", |_| Ok(1))
                .compensation("refunds", "refund", |_| Ok(1))
                .compensation_retry(saga_core::RetryPolicy::no_retry())
        })
        .step("ship", |s| s.pivot().action("shipping", "ship", |_| Ok(1)))
        .build()
        .unwrap();
    let (mut run, _) = Run::start(def);
    run.ok(json!("C-1"));
    run.fail(false);
    run.fail(false);
    assert_eq!(run.state.stuck_at(), Some((0, C)));
    let d = run.input(operator_retry());
    let fence = dispatch(&d);
    assert_eq!(
        (
            fence.direction,
            fence.service.as_str(),
            fence.command.as_str()
        ),
        (X, "refunds", "refund")
    );
    assert_eq!(
        fence.idempotency_key,
        format!("{}:0:compensation", run.saga_id)
    );
}

/// An answer of an earlier fence of the step (of its action, while an operator's retry now
/// fences its compensation) does not answer the fence running now.
#[test]
fn an_earlier_fences_answer_does_not_answer_the_fence_running_now() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.time_out_attempts(3);
    let first_fence = run.state.first_current().unwrap().command_id.unwrap();
    run.time_out();
    run.retry_now();
    // The second fence attempt answers: charge applied; its refund then fails for good.
    run.ok(json!("C-1"));
    run.fail(false);
    assert_eq!(run.state.stuck_at(), Some((1, C)));
    run.input(operator_retry());
    assert_eq!(run.state.fencing.values().next().unwrap().target, C);
    // The first fence attempt's answer, about the charge, comes now.
    let d = run.late(
        first_fence,
        Outcome::Success {
            output: json!("C-1"),
        },
    );
    assert!(d.events.is_empty(), "{:?}", d.events);
    assert!(!run.state.compensated[1]);
}

/// A tombstone's answer from a delivery under an earlier generation of the key does not say
/// anything of the generation being fenced now.
#[test]
fn a_fenced_answer_of_an_earlier_key_does_not_settle_the_fence_of_this_one() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.fail(false);
    let release_one = run.state.first_current().unwrap().command_id.unwrap();
    run.fail(false);
    run.input(operator_retry());
    run.reply(fenced());
    // Generation 1 of release runs, fails for good again; a second retry fences generation 1.
    run.fail(false);
    run.input(operator_retry());
    let fence = run.state.first_current().unwrap();
    assert_eq!(fence.at.direction, X);
    let d = run.late(release_one, fenced());
    assert!(d.events.is_empty(), "{:?}", d.events);
    assert_eq!(run.state.first_current(), Some(fence));
}

/// A stuck saga whose fence's late answer is `unfenceable` runs again: the command the retry
/// sends has a saga that acts on its timeout.
#[test]
fn a_late_unfenceable_answer_revives_a_stuck_saga() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.ok(json!("C-1"));
    run.fail(false);
    run.time_out_attempts(3);
    run.input(operator_retry());
    let fence = run.state.first_current().unwrap().command_id.unwrap();
    run.time_out_attempts(3);
    assert_eq!(run.state.stuck_at(), Some((1, X)));
    run.late(
        fence,
        Outcome::Unfenceable {
            detail: "no inbox".into(),
        },
    );
    assert_eq!(run.state.status, SagaStatus::Compensating);
    assert_eq!(run.state.first_current().unwrap().at.direction, C);
}

/// A deadline that passes while the saga is stuck is recorded: an operator's retry does not
/// run the step that never ran, the saga stops and compensates.
#[test]
fn a_deadline_passing_while_stuck_stops_the_saga_without_running_the_step() {
    static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let def = saga_core::SagaDefinition::<serde_json::Value>::builder("order", 1)
        .deadline(std::time::Duration::from_secs(3600))
        .step("reserve", |s| {
            s.action("inventory", "reserve", |_| Ok(1))
                .compensation("inventory", "release", |_| Ok(1))
        })
        .step("charge", |s| {
            s.action("payment", "charge", |_| {
                // A bug, fixed by the time an operator retries.
                if !PANICKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    panic!("charge input bug");
                }
                Ok(1)
            })
            .compensation("payment", "refund", |_| Ok(1))
        })
        .step("ship", |s| s.pivot().action("shipping", "ship", |_| Ok(1)))
        .build()
        .unwrap();
    let (mut run, _) = Run::start(def);
    run.ok(json!("R-1"));
    assert_eq!(run.state.stuck_at(), Some((1, F)));
    let d = run.input(Input::Timer(Timer::Deadline));
    assert_eq!(d.events, [Event::DeadlineExceeded]);
    // The charge never ran: the retry does not run it now, the reservation is released.
    run.input(operator_retry());
    assert_eq!(run.state.status, SagaStatus::Compensating);
    run.ok(json!(null));
    assert_eq!(run.state.status, SagaStatus::Compensated);
    assert_eq!(
        run.dispatched(),
        [(0, F), (0, C)],
        "never charged, never shipped"
    );
}

/// A conditional step reached while the saga is paused is asked there, its first command held;
/// asked again when the saga resumes and sends it; never asked by a replay.
#[test]
fn a_condition_met_during_a_pause_is_asked_again_on_resume_not_on_replay() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let asked = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&asked);
    let def = saga_core::SagaDefinition::<serde_json::Value>::builder("order", 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |_| Ok(json!(1)))
                .compensation("inventory", "release", |_| Ok(json!(1)))
        })
        .step("invoice", |s| {
            s.action("billing", "invoice", |_| Ok(json!(1)))
                .when(move |_| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    true
                })
        })
        .build()
        .unwrap();
    let operator = |id: u128, action| {
        Input::Timer(Timer::Operator {
            id: uuid::Uuid::from_u128(id),
            action,
        })
    };
    let (mut run, _) = Run::start(def);
    run.input(operator(
        11,
        saga_core::OperatorAction::Pause {
            reason: "month end".into(),
        },
    ));
    run.ok(json!("R-1"));
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(run.kinds().last(), Some(&"held"));
    let d = run.input(operator(12, saga_core::OperatorAction::Resume));
    assert_eq!(dispatch(&d).command, "invoice");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        2,
        "asked again when it is sent"
    );
    run.ok(json!("I-1"));
    assert_eq!(run.state.status, SagaStatus::Completed);
    let replayed = saga_core::replay(run.def.definition(), &run.events).unwrap();
    assert_eq!(replayed, run.state);
    assert_eq!(asked.load(Ordering::SeqCst), 2, "a replay does not ask");
}
