//! Canned histories: each test drives the pure core through a known sequence of inputs and
//! checks the exact events it records. No I/O.

use super::support;

use std::time::Duration;

use saga_core::decide::{Decision, Effect};
use saga_core::{
    Direction, Event, Input, Outcome, ReplayError, Reply, SagaDefinition, SagaStatus, Timer,
    Verdict, replay,
};
use serde_json::{Value, json};
use support::{Run, dispatch, order, order_with, t0};
use uuid::Uuid;

use Direction::{Compensation as C, Forward as F};

/// started, dispatched(reserve), succeeded, dispatched(charge), succeeded, dispatched(ship),
/// succeeded, completed.
#[test]
fn happy_path_runs_each_step_once() {
    let (mut run, first) = Run::start(order());
    let command = dispatch(&first);
    assert_eq!(
        (command.service.as_str(), command.command.as_str()),
        ("inventory", "reserve")
    );
    assert_eq!(command.payload, json!("A-1"));
    assert_eq!(
        command.idempotency_key,
        format!("{}:0:forward", run.saga_id)
    );
    run.ok(json!("R-1"));
    let d = run.ok(json!("C-1"));
    assert!(d.effects.contains(&Effect::CancelTimer(Timer::Timeout {
        step: 1,
        direction: F,
        attempt: 1
    })));
    run.ok(json!({}));
    assert_eq!(
        run.kinds(),
        [
            "started",
            "dispatched",
            "succeeded",
            "dispatched",
            "succeeded",
            "dispatched",
            "succeeded",
            "completed"
        ]
    );
    assert_eq!(run.dispatched(), [(0, F), (1, F), (2, F)]);
    assert_eq!(run.state.status, SagaStatus::Completed);
}

/// ..., dispatched(ship), failed(terminal), compensation_started, dispatched(refund),
/// succeeded, dispatched(release), succeeded, compensated.
#[test]
fn terminal_failure_compensates_in_reverse() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.ok(json!("C-1"));
    let d = run.fail(false);
    let refund = dispatch(&d);
    assert_eq!(refund.command, "refund");
    assert_eq!(refund.payload, json!({"charge": "C-1"}));
    assert_eq!(
        refund.idempotency_key,
        format!("{}:1:compensation", run.saga_id)
    );
    assert_eq!(run.state.status, SagaStatus::Compensating);
    run.ok(json!(null));
    let d = run.ok(json!(null));
    assert_eq!(
        d.events,
        [
            Event::Succeeded {
                step: 0,
                direction: C,
                attempt: 1,
                output: json!(null)
            },
            Event::Compensated
        ]
    );
    assert_eq!(run.dispatched(), [(0, F), (1, F), (2, F), (1, C), (0, C)]);
    assert_eq!(run.state.status, SagaStatus::Compensated);
    assert_eq!(run.state.failure.as_ref().unwrap().0, 2);
}

/// dispatched(reserve #1), failed(retryable), retry_scheduled(#2 after 100 ms),
/// [timer] dispatched(reserve #2), succeeded, ...
#[test]
fn retryable_failure_backs_off_then_succeeds() {
    let (mut run, _) = Run::start(order());
    let d = run.fail(true);
    let due = t0() + Duration::from_millis(100);
    assert_eq!(
        d.events.last().unwrap(),
        &Event::RetryScheduled {
            step: 0,
            direction: F,
            attempt: 2,
            delay_ms: 100,
            due_at: due
        }
    );
    assert_eq!(
        d.effects,
        [
            Effect::CancelTimer(Timer::Timeout {
                step: 0,
                direction: F,
                attempt: 1
            }),
            Effect::SetTimer {
                timer: Timer::Retry {
                    step: 0,
                    direction: F,
                    attempt: 2
                },
                due_at: due
            }
        ]
    );
    run.now = due;
    let d = run.input(Input::Timer(Timer::Retry {
        step: 0,
        direction: F,
        attempt: 2,
    }));
    let second = dispatch(&d);
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.idempotency_key,
        format!("{}:0:forward", run.saga_id),
        "same key on retry"
    );
    // The same timer again (a second orchestrator, a redelivery) changes nothing.
    let again = run.input(Input::Timer(Timer::Retry {
        step: 0,
        direction: F,
        attempt: 2,
    }));
    assert!(matches!(again.verdict, Verdict::Ignored(_)) && again.events.is_empty());
    run.ok(json!("R-1"));
    assert_eq!(run.state.first_current().unwrap().at.step, 1);
}

/// A late result for a timed-out attempt and a duplicate result are ignored; a result with a
/// forged command id or mismatched attempt is rejected.
#[test]
fn stale_duplicate_and_forged_results() {
    let (mut run, _) = Run::start(order());
    let first = run.state.first_current().unwrap();
    run.ok(json!("R-1"));
    let duplicate = Reply {
        saga_id: run.saga_id,
        step: 0,
        direction: F,
        attempt: 1,
        command_id: first.command_id.unwrap(),
        outcome: Outcome::Success {
            output: json!("R-2"),
        },
    };
    let d = run.input(Input::Reply(duplicate.clone()));
    assert!(matches!(d.verdict, Verdict::Ignored(_)), "{:?}", d.verdict);
    assert!(d.events.is_empty());
    let forged = Reply {
        command_id: Uuid::from_u128(999),
        ..duplicate.clone()
    };
    let d = run.input(Input::Reply(forged));
    assert!(
        matches!(&d.verdict, Verdict::Rejected(r) if r.contains("sent no command")),
        "{:?}",
        d.verdict
    );
    let mismatched = Reply {
        attempt: 2,
        ..duplicate
    };
    assert!(matches!(
        run.input(Input::Reply(mismatched)).verdict,
        Verdict::Rejected(_)
    ));
    assert_eq!(run.state.outputs[0], Some(json!("R-1")));
}

/// A compensation that keeps failing parks the saga as stuck, with the reason.
#[test]
fn failing_compensation_gets_stuck() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    run.fail(false);
    for attempt in 1..=3 {
        run.fail(true);
        if attempt < 3 {
            run.input(Input::Timer(Timer::Retry {
                step: 0,
                direction: C,
                attempt: attempt + 1,
            }));
        }
    }
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert!(
        run.state
            .stuck_reason
            .as_ref()
            .unwrap()
            .contains("step `reserve` compensation failed after 3 attempts")
    );
    assert_eq!(run.kinds().last(), Some(&"stuck"));
}

/// The deadline is set at the start and cancelled by the decision that ends the saga, whether
/// it completes or compensates; a stuck saga keeps it, and no decision before the end cancels it.
#[test]
fn the_end_of_a_saga_cancels_its_deadline() {
    let deadline = Some(Duration::from_secs(3600));
    let cancels_deadline = |d: &Decision| d.effects.contains(&Effect::CancelTimer(Timer::Deadline));

    let (mut run, first) = Run::start(order_with(deadline));
    assert!(first.effects.contains(&Effect::SetTimer {
        timer: Timer::Deadline,
        due_at: t0() + Duration::from_secs(3600),
    }));
    assert!(!cancels_deadline(&run.ok(json!("R-1"))));
    assert!(!cancels_deadline(&run.ok(json!("C-1"))));
    let last = run.ok(json!({}));
    assert_eq!(run.state.status, SagaStatus::Completed);
    assert!(cancels_deadline(&last), "{:?}", last.effects);

    let (mut run, _) = Run::start(order_with(deadline));
    run.ok(json!("R-1"));
    assert!(!cancels_deadline(&run.fail(false)));
    let last = run.ok(json!({}));
    assert_eq!(run.state.status, SagaStatus::Compensated);
    assert!(cancels_deadline(&last), "{:?}", last.effects);

    let (mut run, _) = Run::start(order_with(deadline));
    run.ok(json!("R-1"));
    run.fail(false);
    let mut decisions = Vec::new();
    for attempt in 1..=3 {
        decisions.push(run.fail(true));
        if attempt < 3 {
            decisions.push(run.input(Input::Timer(Timer::Retry {
                step: 0,
                direction: C,
                attempt: attempt + 1,
            })));
        }
    }
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert!(!decisions.iter().any(cancels_deadline));
}

/// A log that disagrees with the definition fails replay with a stable code.
#[test]
fn replay_errors_carry_codes() {
    let def = order();
    let err = replay(def.definition(), &[]).unwrap_err();
    assert_eq!(err.code, ReplayError::BAD_START);
    let started = Event::Started {
        saga: "order".into(),
        version: 2,
        input: json!({}),
        business_key: None,
        steps: Vec::new(),
        groups: Vec::new(),
    };
    assert_eq!(
        replay(def.definition(), [&started]).unwrap_err().code,
        ReplayError::WRONG_DEFINITION
    );
    let started = Event::Started {
        saga: "order".into(),
        version: 1,
        input: json!({}),
        business_key: None,
        steps: Vec::new(),
        groups: Vec::new(),
    };
    let bad = Event::Succeeded {
        step: 9,
        direction: F,
        attempt: 1,
        output: json!(null),
    };
    let err = replay(def.definition(), [&started, &bad]).unwrap_err();
    assert_eq!(err.code, ReplayError::UNKNOWN_STEP);
    assert!(
        err.to_string().starts_with("[SAGA-R002] saga `order` v1:"),
        "{err}"
    );
    let after = [started, Event::Completed, Event::Compensated];
    assert_eq!(
        replay(def.definition(), &after).unwrap_err().code,
        ReplayError::AFTER_END
    );
}

/// A log started under other step names (a definition edited without a new version) fails
/// replay loudly, naming both lists; a log without names (written before they were
/// recorded) replays.
#[test]
fn a_renamed_step_fails_replay_loudly() {
    let def = order();
    let started = |steps: &[&str]| Event::Started {
        saga: "order".into(),
        version: 1,
        input: json!({}),
        business_key: None,
        steps: steps.iter().map(|s| (*s).to_owned()).collect(),
        groups: Vec::new(),
    };
    let err = replay(def.definition(), [&started(&["reserve", "pay", "ship"])]).unwrap_err();
    assert_eq!(err.code, ReplayError::RENAMED);
    assert!(
        err.to_string().contains(r#"["reserve", "pay", "ship"]"#),
        "{err}"
    );
    assert!(
        err.to_string().contains(r#"["reserve", "charge", "ship"]"#),
        "{err}"
    );
    let moved = replay(def.definition(), [&started(&["charge", "reserve", "ship"])]);
    assert_eq!(moved.unwrap_err().code, ReplayError::RENAMED);
    assert!(replay(def.definition(), [&started(&["reserve", "charge", "ship"])]).is_ok());
    assert!(replay(def.definition(), [&started(&[])]).is_ok());
}

/// An input builder that fails is a terminal failure of its step.
#[test]
fn input_builder_error_fails_the_step() {
    let def = SagaDefinition::<Value>::builder("order", 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |_| Ok(1))
                .compensation("inventory", "release", |_| Ok(1))
        })
        .step("charge", |s| {
            s.action("payment", "charge", |ctx| ctx.output::<String>("missing"))
        })
        .build()
        .unwrap();
    let (mut run, _) = Run::start(def);
    run.ok(json!(1));
    assert_eq!(run.dispatched(), [(0, F), (0, C)]);
    assert!(
        run.state
            .failure
            .as_ref()
            .unwrap()
            .1
            .contains("cannot build the input of step `charge`")
    );
}

/// A panic in the definition's code parks that saga as stuck with the panic's message, at the
/// step whose input was being built; what the input said is kept (reserve's success), and
/// decide returns normally.
#[test]
fn a_panic_in_the_definition_parks_the_saga() {
    let def = SagaDefinition::<Value>::builder("order", 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |_| Ok(1))
                .compensation("inventory", "release", |_| Ok(1))
        })
        .step("charge", |s| {
            s.action("payment", "charge", |ctx| {
                let amount: Option<u64> = ctx.input()["coupon"].as_u64();
                Ok(amount.expect("an amount"))
            })
        })
        .build()
        .unwrap();
    let (mut run, _) = Run::start(def);
    let d = run.ok(json!(1));
    assert!(matches!(d.verdict, Verdict::Applied));
    assert_eq!(run.kinds()[run.kinds().len() - 2..], ["succeeded", "stuck"]);
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert_eq!(run.state.stuck_at(), Some((1, F)));
    let reason = run.state.stuck_reason.clone().unwrap();
    assert!(
        reason.contains("failed at step `charge` (forward): its input builder panicked: an amount"),
        "{reason}"
    );
}

/// A deadline so far away that it overflows the date panics inside decide: the saga parks at
/// its start instead of taking the process down.
#[test]
fn a_duration_that_overflows_the_date_parks_the_saga() {
    let def = SagaDefinition::<Value>::builder("order", 1)
        .deadline(Duration::MAX)
        .step("reserve", |s| s.action("inventory", "reserve", |_| Ok(1)))
        .build()
        .unwrap();
    let (run, first) = Run::start(def);
    assert!(first.effects.is_empty());
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert_eq!(run.state.stuck_at(), Some((0, F)));
}

/// A wait step's `accept` that panics parks the saga, and the signal is kept: an operator's
/// retry (once the code is fixed) finds it.
#[test]
fn a_panicking_accept_keeps_its_signal() {
    let def = SagaDefinition::<Value>::builder("order", 1)
        .step("approval", |s| {
            s.wait_for::<Value>("approval", |_| panic!("accept bug"))
        })
        .build()
        .unwrap();
    let (mut run, _) = Run::start(def);
    run.input(Input::Timer(Timer::Signal {
        id: Uuid::from_u128(3),
        name: "approval".into(),
        payload: json!(true),
    }));
    assert_eq!(run.state.status, SagaStatus::Stuck);
    assert_eq!(run.state.pending_signal("approval"), Some(&json!(true)));
    assert_eq!(
        run.kinds()[run.kinds().len() - 2..],
        ["signal_received", "stuck"]
    );
}

/// A command says which type its input was built as, so that a handler reading another type
/// can name both; raw JSON and fences say nothing.
#[test]
fn commands_name_the_type_their_input_was_built_as() {
    let typed = SagaDefinition::<Value>::builder("order", 1)
        .step("charge", |s| {
            s.action("payment", "charge", |_| Ok(1200_u64))
                .compensation("payment", "refund", |_| Ok("ch-1".to_owned()))
        })
        .step("ship", |s| {
            s.pivot().action("shipping", "ship", |_| Ok(json!({})))
        })
        .build()
        .unwrap();
    let (mut run, first) = Run::start(typed);
    assert_eq!(dispatch(&first).input_type.as_deref(), Some("u64"));
    let fence = run.time_out_attempts(5);
    let fence = dispatch(&fence);
    assert_eq!(fence.direction, Direction::Fence);
    assert_eq!(fence.input_type, None);

    let (_, raw) = Run::start(order());
    assert_eq!(dispatch(&raw).input_type, None);
}

/// A step whose condition fails is recorded as skipped, sends nothing, and is not
/// compensated when a later step fails; one whose condition holds runs as any other.
#[test]
fn a_step_whose_condition_fails_is_skipped_and_never_compensated() {
    let def = SagaDefinition::<Value>::builder("order", 1)
        .step("reserve", |s| {
            s.action("inventory", "reserve", |_| Ok(json!(1)))
                .compensation("inventory", "release", |_| Ok(json!(1)))
        })
        .step("invoice", |s| {
            s.action("billing", "invoice", |_| Ok(json!(1)))
                .compensation("billing", "void", |_| Ok(json!(1)))
                .when(|ctx| ctx.input()["gift"] != json!(true))
        })
        .step("wrap", |s| {
            s.action("gifts", "wrap", |_| Ok(json!(1)))
                .compensation("gifts", "unwrap", |_| Ok(json!(1)))
                .when(|ctx| ctx.input()["gift"] == json!(true))
        })
        .step("ship", |s| {
            s.pivot().action("shipping", "ship", |_| Ok(json!(1)))
        })
        .build()
        .unwrap();
    // The support's `Run` starts every saga with the input {"sku": "A-1", "amount": 30}: not
    // a gift, so `invoice` runs and `wrap` is skipped.
    let (mut run, _) = Run::start(def);
    run.ok(json!("R-1"));
    let d = run.ok(json!("I-1"));
    assert_eq!(
        d.events.iter().map(Event::kind).collect::<Vec<_>>(),
        ["succeeded", "skipped", "dispatched"]
    );
    assert_eq!(dispatch(&d).command, "ship");
    let d = run.fail(false);
    assert_eq!(run.state.status(), SagaStatus::Compensating);
    assert_eq!(
        dispatch(&d).command,
        "void",
        "wrap is skipped: nothing to unwrap"
    );
    run.ok(json!(null));
    run.ok(json!(null));
    assert_eq!(run.state.status(), SagaStatus::Compensated);
    assert_eq!(
        run.dispatched(),
        [(0, F), (1, F), (3, F), (1, C), (0, C)],
        "the skipped step is never sent"
    );
    // The log replays to the same state without asking the condition again.
    assert_eq!(
        replay(run.def.definition(), &run.events).unwrap(),
        run.state
    );
}

/// A condition that panics parks the saga, naming the step.
#[test]
fn a_condition_that_panics_parks_the_saga() {
    let def = SagaDefinition::<Value>::builder("order", 1)
        .step("invoice", |s| {
            s.action("billing", "invoice", |_| Ok(json!(1)))
                .when(|_| panic!("no tax table"))
        })
        .build()
        .unwrap();
    let (run, _) = Run::start(def);
    assert_eq!(run.state.status(), SagaStatus::Stuck);
    let reason = run.state.stuck_reason().unwrap();
    assert!(
        reason.contains("step `invoice`")
            && reason.contains("its condition panicked: no tax table"),
        "{reason}"
    );
}
