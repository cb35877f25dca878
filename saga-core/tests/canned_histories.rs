//! Canned histories: each test drives the pure core through a known sequence of inputs and
//! checks the exact events it records. No I/O.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use saga_core::{
    Decision, Direction, Effect, Env, Event, Input, Outcome, ReplayError, Reply, RetryPolicy,
    SagaDefinition, SagaState, SagaStatus, Timer, Verdict, decide, replay,
};
use serde_json::{Value, json};
use uuid::Uuid;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// reserve (release) -> charge (refund) -> ship (pivot); 3 attempts, 100 ms backoff, no jitter.
fn order() -> SagaDefinition<Value> {
    order_with(None)
}

/// [`order`], with a deadline if one is given.
fn order_with(deadline: Option<Duration>) -> SagaDefinition<Value> {
    let mut builder = SagaDefinition::<Value>::builder("order", 1);
    if let Some(deadline) = deadline {
        builder = builder.deadline(deadline);
    }
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        multiplier: 2.0,
        jitter: 0.0,
    };
    builder
        .step("reserve", |s| {
            s.action("inventory", "reserve", |ctx| Ok(ctx.input()["sku"].clone()))
                .compensation("inventory", "release", |ctx| {
                    Ok(json!({ "reservation": ctx.output::<Value>("reserve")? }))
                })
                .retry(retry.clone())
        })
        .step("charge", |s| {
            s.action("payment", "charge", |ctx| Ok(ctx.input()["amount"].clone()))
                .compensation("payment", "refund", |ctx| {
                    Ok(json!({ "charge": ctx.try_output::<Value>("charge")? }))
                })
                .retry(retry.clone())
                .timeout(Duration::from_secs(5))
        })
        .step("ship", |s| {
            s.pivot()
                .action("shipping", "ship", |_| Ok(json!({})))
                .retry(retry.clone())
        })
        .build()
        .unwrap()
}

/// A saga driven input by input, keeping its whole log.
struct Run {
    def: SagaDefinition<Value>,
    saga_id: Uuid,
    events: Vec<Event>,
    state: SagaState,
    now: DateTime<Utc>,
    ids: u128,
}

impl Run {
    fn start(def: SagaDefinition<Value>) -> (Self, Decision) {
        let started = Event::Started {
            saga: "order".into(),
            version: 1,
            input: json!({"sku": "A-1", "amount": 30}),
            business_key: None,
        };
        let state = replay(def.definition(), [&started]).unwrap();
        let mut run = Run {
            def,
            saga_id: Uuid::from_u128(7),
            events: vec![started],
            state,
            now: t0(),
            ids: 100,
        };
        let d = run.input(Input::Start);
        (run, d)
    }

    fn input(&mut self, input: Input) -> Decision {
        let mut ids = self.ids;
        let mut new_id = || {
            ids += 1;
            Uuid::from_u128(ids)
        };
        let mut env = Env {
            saga_id: self.saga_id,
            now: self.now,
            new_id: &mut new_id,
        };
        let d = decide(self.def.definition(), &self.state, &input, &mut env).unwrap();
        self.ids = ids;
        self.events.extend(d.events.iter().cloned());
        self.state = d.state.clone();
        // The log alone rebuilds the same state.
        assert_eq!(
            replay(self.def.definition(), &self.events).unwrap(),
            self.state
        );
        d
    }

    fn reply(&mut self, outcome: Outcome) -> Decision {
        let current = self.state.current.expect("a command is outstanding");
        let reply = Reply {
            saga_id: self.saga_id,
            step: current.step,
            direction: current.direction,
            attempt: current.attempt,
            command_id: current.command_id.expect("dispatched"),
            outcome,
        };
        self.input(Input::Reply(reply))
    }

    fn ok(&mut self, output: Value) -> Decision {
        self.reply(Outcome::Success { output })
    }

    fn fail(&mut self, retryable: bool) -> Decision {
        self.reply(Outcome::Failure {
            error: "boom".into(),
            retryable,
        })
    }

    fn kinds(&self) -> Vec<&'static str> {
        self.events.iter().map(Event::kind).collect()
    }

    /// (step, direction) of every dispatched command, in order.
    fn dispatched(&self) -> Vec<(u32, Direction)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Dispatched {
                    step, direction, ..
                } => Some((*step, *direction)),
                _ => None,
            })
            .collect()
    }
}

use Direction::{Compensation as C, Forward as F};

fn dispatch(d: &Decision) -> &saga_core::Command {
    d.effects
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(command) => Some(command),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no dispatch in {:?}", d.effects))
}

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
        [Effect::SetTimer {
            timer: Timer::Retry {
                step: 0,
                direction: F,
                attempt: 2
            },
            due_at: due
        }]
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
    assert_eq!(run.state.current.unwrap().step, 1);
}

/// Three retryable failures of reserve exhaust its policy: compensation_started, compensated
/// (nothing completed before it).
#[test]
fn exhausted_retries_compensate() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    for attempt in 1..=3 {
        let d = run.fail(true);
        if attempt < 3 {
            let Event::RetryScheduled { delay_ms, .. } = d.events.last().unwrap() else {
                panic!()
            };
            assert_eq!(*delay_ms, 100 << (attempt - 1));
            run.input(Input::Timer(Timer::Retry {
                step: 1,
                direction: F,
                attempt: attempt + 1,
            }));
        }
    }
    assert_eq!(run.dispatched(), [(0, F), (1, F), (1, F), (1, F), (0, C)]);
    assert!(
        run.state
            .failure
            .as_ref()
            .unwrap()
            .1
            .contains("after 3 attempts")
    );
}

/// dispatched(charge) then its timeout fires three times: timed_out counts as a failed attempt
/// that may have been applied, so charge is refunded too.
#[test]
fn timed_out_step_is_compensated_too() {
    let (mut run, _) = Run::start(order());
    run.ok(json!("R-1"));
    for attempt in 1..=3 {
        let d = run.input(Input::Timer(Timer::Timeout {
            step: 1,
            direction: F,
            attempt,
        }));
        assert_eq!(
            d.events[0],
            Event::TimedOut {
                step: 1,
                direction: F,
                attempt
            }
        );
        if attempt < 3 {
            run.input(Input::Timer(Timer::Retry {
                step: 1,
                direction: F,
                attempt: attempt + 1,
            }));
        }
    }
    // charge may have been applied by its last attempt: refund it, then release.
    assert_eq!(run.dispatched(), [(0, F), (1, F), (1, F), (1, F), (1, C)]);
    assert_eq!(run.state.current.unwrap().direction, C);
    let started_again = run.input(Input::Start);
    assert!(matches!(started_again.verdict, Verdict::Ignored(_)));
    run.ok(json!(null));
    run.ok(json!(null));
    assert_eq!(run.dispatched().last(), Some(&(0, C)));
    assert_eq!(run.state.status, SagaStatus::Compensated);
}

/// A late result for a timed-out attempt and a duplicate result are ignored; a result with a
/// forged command id or mismatched attempt is rejected.
#[test]
fn stale_duplicate_and_forged_results() {
    let (mut run, _) = Run::start(order());
    let first = run.state.current.unwrap();
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
