//! Canned histories of operators and of sagas that park: an operator's retry and resolve go
//! through a fence; a late answer settles a stuck saga. No I/O.

mod support;

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
    for attempt in 1..=3 {
        run.time_out();
        if attempt < 3 {
            run.retry_now();
        }
    }
    run.reply(unfenceable());
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert_eq!(run.state.stuck_at, Some((2, F)));
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
    for attempt in 1..=3 {
        run.time_out();
        if attempt < 3 {
            run.retry_now();
        }
    }
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
    for attempt in 1..=3 {
        run.time_out();
        if attempt < 3 {
            run.retry_now();
        }
    }
    assert_eq!(run.state.stuck_at, Some((1, C)));
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
    let refund_one = run.state.current.unwrap().command_id.unwrap();
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
