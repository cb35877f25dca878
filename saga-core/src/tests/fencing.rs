//! Canned histories of unknown outcomes: a step the saga gives up on without knowing whether
//! it applied is fenced at its own service, and the saga decides from the answer. No I/O.

use super::support;

use std::time::Duration;

use saga_core::decide::Effect;
use saga_core::state::StepProgress;
use saga_core::{Direction, Event, Input, Outcome, SagaStatus, StepAttempt, Timer};
use serde_json::json;
use support::{Run, dispatch, order, t0};

use Direction::{Compensation as C, Fence as X, Forward as F};

fn fenced() -> Outcome {
    Outcome::Fenced {
        detail: "tombstone written".into(),
    }
}

/// Reserve succeeds; charge's three attempts all time out.
fn charge_timed_out_three_times() -> Run {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.time_out_attempts(3);
    run
}

/// dispatched(charge) x3, each timed_out; fence_started; dispatched(charge, fence). The
/// service answers the charge applied (with its output): refund (seeing the output), then
/// release; compensated.
#[test]
fn a_timed_out_step_that_applied_is_compensated() {
    let mut run = charge_timed_out_three_times();
    assert_eq!(
        run.kinds()[run.kinds().len() - 3..],
        ["timed_out", "fence_started", "dispatched"]
    );
    let fence = run.state.first_current().unwrap();
    assert_eq!(fence.at, StepAttempt::new(1, X, 1));
    assert_eq!(run.state.status, SagaStatus::Running);
    let d = run.ok(json!("C-9"));
    let refund = dispatch(&d);
    assert_eq!(refund.command, "refund");
    assert_eq!(refund.payload, json!({"charge": "C-9"}));
    assert_eq!(run.state.failure.as_ref().unwrap().0, 1);
    assert!(
        run.state
            .failure
            .as_ref()
            .unwrap()
            .1
            .contains("failed after 3 attempts"),
        "{:?}",
        run.state.failure
    );
    run.ok(json!(null));
    run.ok(json!(null));
    assert_eq!(
        run.dispatched(),
        [(0, F), (1, F), (1, F), (1, F), (1, X), (1, C), (0, C)]
    );
    assert_eq!(run.state.status, SagaStatus::Compensated);
}

/// The same, but the service finds the charge unapplied and writes its tombstone: fenced;
/// only reserve is released.
#[test]
fn a_timed_out_step_that_did_not_apply_is_not_compensated() {
    let mut run = charge_timed_out_three_times();
    let d = run.reply(fenced());
    assert_eq!(
        d.events[0],
        Event::Fenced {
            step: 1,
            attempt: 1,
            detail: "tombstone written".into()
        }
    );
    assert_eq!(dispatch(&d).command, "release");
    assert_eq!(run.state.progress[1], StepProgress::Failed);
    run.ok(json!(null));
    assert_eq!(
        run.dispatched(),
        [(0, F), (1, F), (1, F), (1, F), (1, X), (0, C)]
    );
    assert_eq!(run.state.status, SagaStatus::Compensated);
}

/// The three attempts fail retryably: another delivery may still apply the charge (the inbox
/// keeps no trace of a retryable failure), so it is fenced before anything is compensated.
#[test]
fn exhausted_retries_fence_then_compensate() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.fail_attempts(3);
    assert_eq!(run.dispatched(), [(0, F), (1, F), (1, F), (1, F), (1, X)]);
    let reason = SagaStatus::reason(&run.state).unwrap();
    assert!(
        reason.starts_with("fencing step charge: step `charge` forward failed after 3 attempts"),
        "{reason}"
    );
    run.reply(fenced());
    assert_eq!(run.dispatched().last(), Some(&(0, C)));
}

/// A terminal failure after an attempt that timed out: the timed-out attempt may still
/// apply, so the step is fenced. A first attempt's terminal failure needs no fence.
#[test]
fn a_terminal_failure_after_an_unanswered_attempt_is_fenced() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.time_out();
    run.retry_now();
    run.fail(false);
    assert_eq!(run.dispatched().last(), Some(&(1, X)));

    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.fail(false);
    assert_eq!(run.dispatched().last(), Some(&(0, C)));
}

/// The pivot (ship) times out three times, then the fence finds it applied: the saga goes
/// forward and completes; nothing is refunded. Found unapplied, the saga compensates.
#[test]
fn a_pivot_whose_outcome_was_unknown_goes_forward_if_it_applied() {
    let ship_times_out = || {
        let (mut run, _) = Run::start(order());
        run.ok(json!("R-1"));
        run.ok(json!("C-1"));
        run.time_out_attempts(3);
        assert_eq!(run.state.first_current().unwrap().at.direction, X);
        run
    };
    let mut run = ship_times_out();
    run.ok(json!({"tracking": "T-1"}));
    assert_eq!(run.state.status, SagaStatus::Completed);
    assert_eq!(run.state.outputs[2], Some(json!({"tracking": "T-1"})));
    assert!(!run.dispatched().contains(&(1, C)));

    let mut run = ship_times_out();
    run.reply(fenced());
    run.ok(json!(null));
    run.ok(json!(null));
    assert_eq!(run.state.status, SagaStatus::Compensated);
    assert_eq!(
        run.dispatched()[run.dispatched().len() - 2..],
        [(1, C), (0, C)]
    );
}

/// A terminal failure in answer to a fence is a worker refusing it (it could not read it,
/// say), not a service without an inbox: the fence is tried again, and nothing is decided.
#[test]
fn a_refused_fence_is_tried_again() {
    let mut run = charge_timed_out_three_times();
    let d = run.fail(false);
    assert!(matches!(
        d.events.last(),
        Some(Event::RetryScheduled { direction: X, .. })
    ));
    assert_eq!(run.state.progress[1], StepProgress::InFlight);
    run.retry_now();
    run.reply(fenced());
    assert_eq!(run.dispatched().last(), Some(&(0, C)));
}

/// Attempt 1 of charge timed out and attempt 2 was scheduled; then attempt 1's success
/// arrives: it is the step's success (not dropped as stale), the backoff is dropped, and the
/// saga goes on. The retry's timer, should it fire anyway, changes nothing.
#[test]
fn a_late_success_settles_its_step() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    let first = run.state.first_current().unwrap().command_id.unwrap();
    run.time_out();
    let d = run.late(
        first,
        Outcome::Success {
            output: json!("C-1"),
        },
    );
    assert!(d.effects.contains(&Effect::CancelTimer(Timer::Retry {
        step: 1,
        direction: F,
        attempt: 2
    })));
    assert_eq!(dispatch(&d).command, "ship");
    assert_eq!(run.state.outputs[1], Some(json!("C-1")));
    let stale = run.input(Input::Timer(Timer::Retry {
        step: 1,
        direction: F,
        attempt: 2,
    }));
    assert!(stale.events.is_empty());
}

/// While charge is fenced, a success of one of its attempts arrives: it answers the fence
/// (applied), and the fence's own answer, when it comes, is dropped.
#[test]
fn a_late_success_answers_the_fence() {
    let mut run = charge_timed_out_three_times();
    let attempt_two = run
        .state
        .sent
        .iter()
        .find(|(_, s)| s.at == StepAttempt::new(1, F, 2))
        .map(|(id, _)| *id)
        .unwrap();
    let fence = run.state.first_current().unwrap().command_id.unwrap();
    let d = run.late(
        attempt_two,
        Outcome::Success {
            output: json!("C-2"),
        },
    );
    assert!(d.effects.contains(&Effect::CancelTimer(Timer::Timeout {
        step: 1,
        direction: X,
        attempt: 1
    })));
    assert_eq!(dispatch(&d).payload, json!({"charge": "C-2"}));
    let stale = run.late(
        fence,
        Outcome::Success {
            output: json!("C-2"),
        },
    );
    assert!(stale.events.is_empty());
    assert_eq!(run.state.first_current().unwrap().at.direction, C);
}

/// A fence nobody answers is retried by the step's fence policy (three attempts here), then
/// the saga parks as stuck, saying so. An operator's retry fences again; a late answer of an
/// earlier fence attempt settles it too.
#[test]
fn an_unanswered_fence_parks_the_saga_until_answered() {
    let mut run = charge_timed_out_three_times();
    run.time_out_attempts(3);
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert_eq!(run.state.stuck_at(), Some((1, X)));
    let reason = SagaStatus::reason(&run.state).unwrap();
    assert!(
        reason.starts_with("fencing step `charge` gave up after 3 attempts"),
        "{reason}"
    );
    let first_fence = run
        .state
        .sent
        .iter()
        .find(|(_, s)| s.at == StepAttempt::new(1, X, 1))
        .map(|(id, _)| *id)
        .unwrap();
    // The first fence's answer comes at last: the saga goes on from it.
    let d = run.late(first_fence, fenced());
    assert_eq!(dispatch(&d).command, "release");
    assert_eq!(run.state.status, SagaStatus::Compensating);
}

/// A cancel while charge is in flight does not wait for its result or its timeout: charge is
/// fenced at once; the saga ends cancelled, with charge refunded only if it applied.
#[test]
fn a_cancel_fences_the_step_in_flight() {
    for applied in [true, false] {
        let (mut run, _) = Run::start(order());
        run.ok(json!("R-1"));
        let d = run.input(Input::Timer(Timer::Cancel {
            id: uuid::Uuid::from_u128(5),
            reason: "customer changed their mind".into(),
        }));
        assert!(d.effects.contains(&Effect::CancelTimer(Timer::Timeout {
            step: 1,
            direction: F,
            attempt: 1
        })));
        assert_eq!(dispatch(&d).direction, X);
        if applied {
            run.ok(json!("C-1"));
            run.ok(json!(null));
        } else {
            run.reply(fenced());
        }
        run.ok(json!(null));
        assert_eq!(run.state.status, SagaStatus::Cancelled);
        assert_eq!(run.dispatched().contains(&(1, C)), applied);
    }
}

/// A cancel that arrives while the saga fences a step it gave up on is refused: the saga is
/// already giving up.
#[test]
fn a_cancel_while_fencing_is_refused() {
    let mut run = charge_timed_out_three_times();
    run.input(Input::Timer(Timer::Cancel {
        id: uuid::Uuid::from_u128(5),
        reason: "too late".into(),
    }));
    let Some(Event::CancelRefused { why, .. }) = run.events.last() else {
        panic!("{:?}", run.events.last())
    };
    assert!(why.contains("giving up on step `charge`"), "{why}");
}

/// A cancel fences the charge in flight; the charge's own answer, a terminal failure, comes
/// first: with no earlier attempt in doubt, it did not apply, and settles the fence.
#[test]
fn a_terminal_failure_of_the_only_attempt_settles_a_cancel_fence() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    let charge = run.state.first_current().unwrap().command_id.unwrap();
    run.input(Input::Timer(Timer::Cancel {
        id: uuid::Uuid::from_u128(5),
        reason: "changed mind".into(),
    }));
    let d = run.late(
        charge,
        Outcome::Failure {
            error: "declined".into(),
            retryable: false,
        },
    );
    assert!(matches!(d.events[0], Event::Fenced { step: 1, .. }));
    assert_eq!(dispatch(&d).command, "release");
}

/// By default a compensation retries for a day, whatever the number of attempts, then parks
/// the saga.
#[test]
fn compensations_are_patient_by_default() {
    let def = saga_core::SagaDefinition::<serde_json::Value>::builder("order", 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |_| Ok(1))
                .compensation("inventory", "release", |_| Ok(1))
        })
        .step("ship", |s| s.pivot().action("shipping", "ship", |_| Ok(1)))
        .build()
        .unwrap();
    let (mut run, _) = Run::start(def);
    run.ok(json!(1));
    run.fail(false);
    let mut attempts = 1;
    while run.state.status == SagaStatus::Compensating {
        run.now += Duration::from_secs(3600);
        run.fail(true);
        if run.state.status == SagaStatus::Compensating {
            run.retry_now();
            attempts += 1;
        }
    }
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert_eq!(attempts, 25, "a failure an hour, for a day");
}

/// A step that sets no timeout gets the saga's default (a minute): its attempt is timed.
#[test]
fn every_command_has_a_timeout() {
    let (_, first) = Run::start(order());
    assert!(first.effects.contains(&Effect::SetTimer {
        timer: Timer::Timeout {
            step: 0,
            direction: F,
            attempt: 1
        },
        due_at: t0() + saga_core::definition::DEFAULT_STEP_TIMEOUT,
    }));
    assert_eq!(dispatch(&first).timeout_ms, Some(60_000));
}
