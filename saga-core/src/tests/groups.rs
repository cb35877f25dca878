//! Parallel groups: canned histories of a trip whose flight, hotel and car are booked
//! together, and a check that any order of the members' results ends the same way.

use super::support::Run;

use std::time::Duration;

use saga_core::decide::{Decision, Effect};
use saga_core::{
    Command, DefinitionError, Direction, Event, Input, Outcome, ReplayError, Reply, RetryPolicy,
    SagaDefinition, SagaStatus, Timer, replay,
};
use serde_json::{Value, json};

use Direction::{Compensation as C, Fence as X, Forward as F};

/// What goes wrong in the definition's own code.
#[derive(Default)]
struct Faults {
    /// The flight's input builder fails.
    flight_fails: bool,
    /// The hotel's input builder panics the first time it runs.
    hotel_panics_once: bool,
    /// The hotel's input builder panics the second time it runs (its first retry).
    hotel_panics_on_retry: bool,
    /// The saga's deadline.
    deadline: Option<Duration>,
}

/// hold (release) -> book: [flight, hotel, car] (each cancelled) -> confirm (pivot).
fn trip() -> SagaDefinition<Value> {
    trip_with(Faults::default())
}

/// [`trip`], with `faults`.
fn trip_with(faults: Faults) -> SagaDefinition<Value> {
    let retry = super::support::retry();
    let member = |service: &'static str, retry: RetryPolicy| {
        move |s: saga_core::StepBuilder<Value>| {
            s.action(service, "book", |_| Ok(json!({})))
                .compensation(service, "cancel", |_| Ok(json!({})))
                .retry(retry.clone())
                .fence_retry(retry)
                .timeout(Duration::from_secs(5))
        }
    };
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let flight_fails = faults.flight_fails;
    let mut builder = SagaDefinition::<Value>::builder("order", 1);
    if let Some(deadline) = faults.deadline {
        builder = builder.deadline(deadline);
    }
    let (panics_once, panics_on_retry) = (faults.hotel_panics_once, faults.hotel_panics_on_retry);
    builder
        .step("hold", |s| {
            s.action("wallet", "hold", |_| Ok(json!({})))
                .compensation("wallet", "release", |_| Ok(json!({})))
        })
        .parallel("book", |g| {
            g.step("flight", |s| {
                member("flights", retry.clone())(s).action("flights", "book", move |_| {
                    match flight_fails {
                        true => Err(saga_core::InputError::new("no passport number")),
                        false => Ok(json!({})),
                    }
                })
            })
            .step("hotel", |s| {
                member("hotels", retry.clone())(s).action("hotels", "book", move |_| {
                    let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    if (panics_once && call == 1) || (panics_on_retry && call == 2) {
                        panic!("the hotel's builder broke");
                    }
                    Ok(json!({}))
                })
            })
            .step("car", member("cars", retry.clone()))
        })
        .step("confirm", |s| {
            s.pivot().action("booking", "confirm", |ctx| {
                Ok(json!([
                    ctx.output::<Value>("flight")?,
                    ctx.output::<Value>("car")?
                ]))
            })
        })
        .build()
        .unwrap()
}

/// The commands a decision dispatched, as (step, direction).
fn sent(d: &Decision) -> Vec<(u32, Direction)> {
    commands(d).iter().map(|c| (c.step, c.direction)).collect()
}

fn commands(d: &Decision) -> Vec<Command> {
    d.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

impl Run {
    /// The reply to the command outstanding at `step`.
    fn answer(&mut self, step: u32, outcome: Outcome) -> Decision {
        let c = self
            .state
            .current_of(step)
            .expect("a command is outstanding");
        self.input(Input::Reply(Reply {
            saga_id: self.saga_id,
            step,
            direction: c.at.direction,
            attempt: c.at.attempt,
            command_id: c.command_id.expect("dispatched"),
            outcome,
        }))
    }

    /// The saga is in the group: `hold` succeeded.
    fn in_group() -> (Self, Decision) {
        let (mut run, _) = Run::start(trip());
        let d = run.ok(json!("H-1"));
        (run, d)
    }
}

fn ok(output: &str) -> Outcome {
    Outcome::Success {
        output: json!(output),
    }
}

fn declined() -> Outcome {
    Outcome::Failure {
        error: "no car left".into(),
        retryable: false,
    }
}

fn fenced() -> Outcome {
    Outcome::Fenced {
        detail: "never ran".into(),
    }
}

#[test]
fn the_members_are_sent_together_and_the_saga_goes_on_once_all_succeeded() {
    let (mut run, entered) = Run::in_group();
    assert_eq!(sent(&entered), [(1, F), (2, F), (3, F)]);
    assert!(sent(&run.answer(3, ok("C-1"))).is_empty());
    assert!(sent(&run.answer(1, ok("F-1"))).is_empty());
    let last = run.answer(2, ok("H-1"));
    let confirm = &commands(&last)[0];
    assert_eq!((confirm.step, confirm.direction), (4, F));
    // A later step reads each member's output by its name.
    assert_eq!(confirm.payload, json!(["F-1", "C-1"]));
    run.ok(json!("OK"));
    assert_eq!(run.state.status(), SagaStatus::Completed);
}

#[test]
fn a_member_failing_fences_the_members_in_flight_then_compensates_what_applied() {
    let (mut run, _) = Run::in_group();
    run.answer(1, ok("F-1"));
    // The car fails for good: the hotel, still in flight, is fenced; nothing else starts.
    let failed = run.answer(3, declined());
    assert_eq!(sent(&failed), [(2, X)]);
    assert_eq!(run.state.status(), SagaStatus::Compensating);
    // The hotel never ran: the flight, then the hold, are undone.
    let after = run.answer(2, fenced());
    assert_eq!(sent(&after), [(1, C)]);
    run.answer(1, ok("cancelled"));
    run.answer(0, ok("released"));
    assert_eq!(run.state.status(), SagaStatus::Compensated);
    assert_eq!(run.dispatched().iter().filter(|d| d.1 == C).count(), 2);
}

#[test]
fn a_fenced_member_that_applied_is_compensated_in_reverse_declaration_order() {
    let (mut run, _) = Run::in_group();
    let failed = run.answer(3, declined());
    assert_eq!(sent(&failed), [(1, X), (2, X)]);
    // Both had applied: the fences say so (the hotel's first); a member's own late success
    // afterwards changes nothing.
    assert!(sent(&run.answer(2, ok("H-1"))).is_empty());
    let flight_first = run
        .state
        .sent
        .iter()
        .find(|(_, s)| s.at == saga_core::StepAttempt::new(1, F, 1))
        .map(|(id, _)| *id)
        .unwrap();
    let fenced_flight = run.answer(1, ok("F-1"));
    assert_eq!(sent(&fenced_flight), [(2, C)], "the hotel is undone first");
    let (verdict, events) = {
        let d = run.late(flight_first, ok("F-1"));
        (d.verdict, d.events.len())
    };
    assert!(
        matches!(verdict, saga_core::Verdict::Ignored(_)),
        "{verdict:?}"
    );
    assert_eq!(events, 0);
    assert_eq!(sent(&run.answer(2, ok("cancelled"))), [(1, C)]);
    assert_eq!(sent(&run.answer(1, ok("cancelled"))), [(0, C)]);
    run.answer(0, ok("released"));
    assert_eq!(run.state.status(), SagaStatus::Compensated);
}

#[test]
fn a_member_timing_out_is_retried_alone() {
    let (mut run, _) = Run::in_group();
    let c = run.state.current_of(2).unwrap();
    let timed_out = run.input(Input::Timer(Timer::Timeout {
        step: 2,
        direction: F,
        attempt: c.at.attempt,
    }));
    assert!(sent(&timed_out).is_empty());
    assert_eq!(
        run.state.current_of(2).unwrap().command_id,
        None,
        "a backoff"
    );
    assert!(run.state.current_of(1).unwrap().command_id.is_some());
    let retried = run.input(Input::Timer(Timer::Retry {
        step: 2,
        direction: F,
        attempt: 2,
    }));
    assert_eq!(sent(&retried), [(2, F)]);
    run.answer(1, ok("F-1"));
    run.answer(3, ok("C-1"));
    let last = run.answer(2, ok("H-1"));
    assert_eq!(sent(&last), [(4, F)]);
}

#[test]
fn a_cancel_during_a_group_fences_every_member_in_flight_then_compensates() {
    let (mut run, _) = Run::in_group();
    run.answer(1, ok("F-1"));
    let cancel = run.input(Input::Timer(Timer::Cancel {
        id: uuid::Uuid::from_u128(1),
        reason: "changed plans".into(),
    }));
    assert_eq!(sent(&cancel), [(2, X), (3, X)]);
    assert!(sent(&run.answer(2, fenced())).is_empty());
    let last_fence = run.answer(3, ok("C-1"));
    assert_eq!(sent(&last_fence), [(3, C)]);
    run.answer(3, ok("cancelled"));
    run.answer(1, ok("cancelled"));
    run.answer(0, ok("released"));
    assert_eq!(run.state.status(), SagaStatus::Cancelled);
    let undone: Vec<u32> = run
        .dispatched()
        .iter()
        .filter(|d| d.1 == C)
        .map(|d| d.0)
        .collect();
    assert_eq!(undone, [3, 1, 0]);
}

/// Every order of the members' results (fixed up front: all three applied, the hotel declined,
/// or the flight and hotel declined; each delivered once, one of them twice) ends the same:
/// the same status, the same compensations, the same events from the first compensation (or
/// the confirm) on.
#[test]
fn any_order_of_the_members_results_ends_the_same() {
    let orders = [
        [1, 2, 3],
        [1, 3, 2],
        [2, 1, 3],
        [2, 3, 1],
        [3, 1, 2],
        [3, 2, 1],
    ];
    for outcomes in [
        [true, true, true],
        [true, false, true],
        [false, false, true],
    ] {
        let mut ends = Vec::new();
        for order in orders {
            for twice in [None, Some(order[0]), Some(order[2])] {
                ends.push(run_in_order(outcomes, order, twice));
            }
        }
        assert!(
            ends.windows(2).all(|w| w[0] == w[1]),
            "{outcomes:?}: {ends:#?}"
        );
        let (status, undone, _) = &ends[0];
        match outcomes.iter().all(|ok| *ok) {
            true => assert_eq!(*status, SagaStatus::Completed),
            false => {
                assert_eq!(*status, SagaStatus::Compensated);
                let applied: Vec<u32> = (1..=3u32)
                    .rev()
                    .filter(|m| outcomes[*m as usize - 1])
                    .chain([0])
                    .collect();
                assert_eq!(*undone, applied);
            }
        }
    }
}

/// Runs the trip with each member's result known up front (`outcomes[m - 1]`: applied or
/// declined), delivered in `order` (a fence is answered from what its member did), `twice`
/// delivered a second time; returns the end and the compensations in order.
fn run_in_order(
    outcomes: [bool; 3],
    order: [u32; 3],
    twice: Option<u32>,
) -> (SagaStatus, Vec<u32>, Vec<&'static str>) {
    let (mut run, entered) = Run::in_group();
    let mut first: Vec<Reply> = commands(&entered)
        .iter()
        .map(|c| {
            let outcome = match outcomes[c.step as usize - 1] {
                true => ok("done"),
                false => declined(),
            };
            Reply::to(c, outcome)
        })
        .collect();
    first.sort_by_key(|r| order.iter().position(|s| *s == r.step));
    if let Some(step) = twice {
        let copy = first.iter().find(|r| r.step == step).unwrap().clone();
        first.push(copy);
    }
    for reply in first {
        run.input(Input::Reply(reply));
    }
    // What is left: fences (answered from what the member did), compensations, confirm.
    settle(&mut run, |step| match outcomes[step as usize - 1] {
        true => ok("done"),
        false => fenced(),
    });
    let undone = run
        .dispatched()
        .iter()
        .filter(|d| d.1 == C)
        .map(|d| d.0)
        .collect();
    let from = run
        .events
        .iter()
        .position(|e| {
            matches!(
                e,
                Event::Dispatched { step: 4, .. } | Event::Dispatched { direction: C, .. }
            )
        })
        .unwrap();
    let after_group = run.events[from..].iter().map(Event::kind).collect();
    (run.state.status(), undone, after_group)
}

#[test]
fn a_group_may_not_hold_a_pivot_a_wait_or_a_single_step() {
    let build = |members: fn(saga_core::GroupBuilder<Value>) -> saga_core::GroupBuilder<Value>| {
        SagaDefinition::<Value>::builder("g", 1)
            .parallel("book", members)
            .build()
            .unwrap_err()
    };
    let pivot = build(|g| {
        g.step("a", |s| s.action("x", "a", |_| Ok(1)))
            .step("b", |s| s.pivot().action("x", "b", |_| Ok(1)))
    });
    assert!(
        matches!(pivot, DefinitionError::PivotInGroup { ref step, .. } if step == "b"),
        "{pivot}"
    );
    let wait = build(|g| {
        g.step("a", |s| s.action("x", "a", |_| Ok(1)))
            .step("b", |s| s.delay(Duration::from_secs(1)))
    });
    assert!(wait.to_string().contains("member `b` waits"), "{wait}");
    let single = build(|g| g.step("a", |s| s.action("x", "a", |_| Ok(1))));
    assert!(single.to_string().contains("two or more"), "{single}");
    let retriable = SagaDefinition::<Value>::builder("g", 1)
        .step("ship", |s| s.pivot().action("x", "ship", |_| Ok(1)))
        .parallel("notify", |g| {
            g.step("mail", |s| s.retriable().action("x", "mail", |_| Ok(1)))
                .step("sms", |s| s.retriable().action("x", "sms", |_| Ok(1)))
        })
        .build()
        .unwrap_err();
    assert!(
        retriable.to_string().contains("member `mail` is retriable"),
        "{retriable}"
    );
    let nameless = SagaDefinition::<Value>::builder("g", 1)
        .parallel(" ", |g| {
            g.step("a", |s| s.action("x", "a", |_| Ok(1)))
                .step("b", |s| s.action("x", "b", |_| Ok(1)))
        })
        .build()
        .unwrap_err();
    assert!(
        nameless.to_string().contains("its name is empty"),
        "{nameless}"
    );
    let clash = build(|g| {
        g.step("book", |s| s.action("x", "a", |_| Ok(1)))
            .step("b", |s| s.action("x", "b", |_| Ok(1)))
    });
    assert!(clash.to_string().contains("already a step's"), "{clash}");
}

#[test]
fn a_log_started_with_other_groups_does_not_replay() {
    let def = trip();
    let started = Event::Started {
        saga: "order".into(),
        version: 1,
        input: json!({}),
        business_key: None,
        steps: def.definition().step_names(),
        groups: Vec::new(),
    };
    let err = replay(def.definition(), [&started]).unwrap_err();
    assert_eq!(err.code, ReplayError::RENAMED);
    assert!(err.message.contains("parallel groups"), "{err}");
}

/// How many commands of `step` in `direction` the saga sent in its whole run.
fn count(run: &Run, step: u32, direction: Direction) -> usize {
    run.dispatched()
        .iter()
        .filter(|d| **d == (step, direction))
        .count()
}

fn pause(run: &mut Run) -> Decision {
    run.input(Input::Timer(Timer::Operator {
        id: uuid::Uuid::from_u128(900),
        action: saga_core::OperatorAction::Pause {
            reason: "look".into(),
        },
    }))
}

fn operator(run: &mut Run, n: u128, action: saga_core::OperatorAction) -> Decision {
    run.input(Input::Timer(Timer::Operator {
        id: uuid::Uuid::from_u128(n),
        action,
    }))
}

/// Answers whatever is outstanding until the saga ends: a fence of a step with `fence(step)`,
/// anything else with a success.
fn settle(run: &mut Run, fence: impl Fn(u32) -> Outcome) {
    while run.state.status().is_active() {
        let (step, c) = run
            .state
            .current
            .iter()
            .next()
            .map(|(s, c)| (*s, *c))
            .unwrap();
        let outcome = match c.at.direction {
            X => fence(step),
            _ => ok("done"),
        };
        run.answer(step, outcome);
    }
}

#[test]
fn members_held_by_a_pause_are_withdrawn_not_sent_when_one_fails_on_resume() {
    let (mut run, _) = Run::start(trip_with(Faults {
        flight_fails: true,
        ..Faults::default()
    }));
    pause(&mut run);
    assert!(sent(&run.ok(json!("H-1"))).is_empty(), "held while paused");
    assert_eq!(run.state.held.len(), 3);
    // On resume the flight cannot be built: the hotel and car, never sent, are withdrawn
    // (recorded as skipped), and the hold is released.
    let resumed = operator(&mut run, 901, saga_core::OperatorAction::Resume);
    assert_eq!(sent(&resumed), [(0, C)]);
    let skipped: Vec<u32> = resumed
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Skipped { step } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(skipped, [2, 3]);
    settle(&mut run, |_| fenced());
    assert_eq!(run.state.status(), SagaStatus::Compensated);
    assert_eq!(count(&run, 2, F) + count(&run, 3, F), 0);
    assert_eq!(
        run.dispatched()
            .iter()
            .filter(|d| d.1 == C)
            .collect::<Vec<_>>(),
        [&(0, C)]
    );
}

#[test]
fn a_stuck_member_does_not_hold_back_the_others_and_resume_sends_them() {
    let (mut run, _) = Run::start(trip_with(Faults {
        hotel_panics_once: true,
        ..Faults::default()
    }));
    pause(&mut run);
    run.ok(json!("H-1"));
    assert_eq!(run.state.held.len(), 3);
    // On resume the hotel's builder panics: the hotel is stuck, the flight and car still go.
    let resumed = operator(&mut run, 901, saga_core::OperatorAction::Resume);
    assert_eq!(run.state.status(), SagaStatus::Stuck);
    assert_eq!(run.state.stuck_at(), Some((2, F)));
    assert_eq!(sent(&resumed), [(1, F), (3, F)]);
    run.answer(1, ok("F-1"));
    run.answer(3, ok("C-1"));
    assert_eq!(run.state.status(), SagaStatus::Stuck);
    let retried = operator(&mut run, 902, saga_core::OperatorAction::Retry);
    assert_eq!(sent(&retried), [(2, F)]);
    assert_eq!(sent(&run.answer(2, ok("H-1"))), [(4, F)]);
    run.answer(4, ok("OK"));
    assert_eq!(run.state.status(), SagaStatus::Completed);
}

#[test]
fn two_members_whose_fences_give_up_are_both_retried_by_the_operator() {
    let (mut run, _) = Run::in_group();
    run.answer(3, declined());
    let fence_times_out = |run: &mut Run, step: u32| {
        let c = run.state.current_of(step).unwrap();
        run.input(Input::Timer(Timer::Timeout {
            step,
            direction: X,
            attempt: c.at.attempt,
        }));
        if let Some(c) = run.state.current_of(step) {
            run.input(Input::Timer(Timer::Retry {
                step,
                direction: X,
                attempt: c.at.attempt,
            }));
        }
    };
    for _ in 0..3 {
        fence_times_out(&mut run, 1);
        fence_times_out(&mut run, 2);
    }
    assert_eq!(run.state.status(), SagaStatus::Stuck);
    assert_eq!(
        run.state.stuck.len(),
        2,
        "both members are stuck: {:?}",
        run.state.stuck
    );
    // A late answer about one does not revive the saga while the other is stuck.
    let flight_fence = run
        .state
        .sent
        .iter()
        .find(|(_, s)| s.at == saga_core::StepAttempt::new(1, X, 3))
        .map(|(id, _)| *id)
        .unwrap();
    run.late(flight_fence, fenced());
    assert_eq!(run.state.status(), SagaStatus::Stuck);
    assert_eq!(run.state.stuck_at(), Some((2, X)));
    let retried = operator(&mut run, 902, saga_core::OperatorAction::Retry);
    assert_eq!(sent(&retried), [(2, X)]);
    run.answer(2, fenced());
    assert_eq!(run.state.status(), SagaStatus::Compensating);
    settle(&mut run, |_| fenced());
    assert_eq!(run.state.status(), SagaStatus::Compensated);
}

#[test]
fn an_operator_retry_after_compensation_began_does_not_send_a_member_forward() {
    let (mut run, _) = Run::start(trip_with(Faults {
        hotel_panics_once: true,
        ..Faults::default()
    }));
    let entered = run.ok(json!("H-1"));
    assert_eq!(
        sent(&entered),
        [(1, F), (3, F)],
        "the car is sent though the hotel is stuck"
    );
    run.answer(1, declined());
    run.answer(3, ok("C-1"));
    assert_eq!(run.state.status(), SagaStatus::Stuck);
    let retried = operator(&mut run, 902, saga_core::OperatorAction::Retry);
    assert_eq!(sent(&retried), [(3, C)]);
    settle(&mut run, |_| fenced());
    assert_eq!(run.state.status(), SagaStatus::Compensated);
    assert_eq!(count(&run, 2, F), 0, "the hotel never went out");
}

#[test]
fn a_deadline_that_passed_while_a_member_was_stuck_fences_the_other_members() {
    let (mut run, _) = Run::start(trip_with(Faults {
        hotel_panics_once: true,
        deadline: Some(Duration::from_secs(60)),
        ..Faults::default()
    }));
    run.ok(json!("H-1"));
    let c = run.state.current_of(1).unwrap();
    run.input(Input::Timer(Timer::Timeout {
        step: 1,
        direction: F,
        attempt: c.at.attempt,
    }));
    let deadline = run.input(Input::Timer(Timer::Deadline));
    assert_eq!(run.state.status(), SagaStatus::Stuck);
    // The members still outstanding are fenced at once; the flight's backoff is over.
    assert_eq!(sent(&deadline), [(1, X), (3, X)]);
    let due = run.input(Input::Timer(Timer::Retry {
        step: 1,
        direction: F,
        attempt: 2,
    }));
    assert!(sent(&due).is_empty());
    assert_eq!(count(&run, 1, F), 1);
}

/// A member's code never sees a sibling's output, even once the sibling succeeded (on a
/// retry): what it builds does not depend on the order the members answer in. A later step
/// and a compensation see every member's output.
#[test]
fn a_member_never_reads_a_siblings_output() {
    let def = SagaDefinition::<Value>::builder("order", 1)
        .parallel("book", |g| {
            g.step("flight", |s| {
                s.action("flights", "book", |_| Ok(json!("F")))
                    .compensation("flights", "cancel", |ctx| {
                        Ok(json!(ctx.try_output::<Value>("hotel")?))
                    })
            })
            .step("hotel", |s| {
                s.action("hotels", "book", |ctx| {
                    Ok(json!(ctx.try_output::<Value>("flight")?))
                })
                .retry(super::support::retry())
            })
        })
        .step("pay", |s| {
            s.action("payment", "pay", |ctx| {
                Ok(json!(ctx.try_output::<Value>("hotel")?))
            })
        })
        .build()
        .unwrap();
    let (mut run, entered) = Run::start(def);
    assert_eq!(commands(&entered)[1].payload, Value::Null);
    run.answer(0, ok("F-1"));
    run.answer(
        1,
        Outcome::Failure {
            error: "busy".into(),
            retryable: true,
        },
    );
    let retried = run.input(Input::Timer(Timer::Retry {
        step: 1,
        direction: F,
        attempt: 2,
    }));
    assert_eq!(
        commands(&retried)[0].payload,
        Value::Null,
        "not the flight's output"
    );
    let pay = run.answer(1, ok("H-1"));
    assert_eq!(commands(&pay)[0].payload, json!("H-1"));
    let undo = run.answer(2, declined());
    assert_eq!(
        commands(&undo)[0].payload,
        json!("H-1"),
        "the flight's cancel reads the hotel"
    );
}

/// A member an operator's retry fences gives up with the others once another member is given
/// up on; the compensation says why (the other member), not "an operator's retry".
#[test]
fn compensation_started_by_a_retried_member_says_why_the_saga_gave_up() {
    let (mut run, _) = Run::start(trip_with(Faults {
        hotel_panics_on_retry: true,
        ..Faults::default()
    }));
    run.ok(json!("H-1"));
    run.answer(1, ok("F-1"));
    run.input(Input::Timer(Timer::Timeout {
        step: 2,
        direction: F,
        attempt: 1,
    }));
    run.input(Input::Timer(Timer::Retry {
        step: 2,
        direction: F,
        attempt: 2,
    }));
    assert_eq!(run.state.stuck_at(), Some((2, F)));
    let retried = operator(&mut run, 902, saga_core::OperatorAction::Retry);
    assert_eq!(
        sent(&retried),
        [(2, X)],
        "the hotel's command is fenced first"
    );
    for attempt in 1..=3 {
        run.input(Input::Timer(Timer::Timeout {
            step: 3,
            direction: F,
            attempt,
        }));
        if attempt < 3 {
            run.input(Input::Timer(Timer::Retry {
                step: 3,
                direction: F,
                attempt: attempt + 1,
            }));
        }
    }
    assert!(
        run.state.fencing.contains_key(&3),
        "the car is given up on and fenced"
    );
    run.answer(2, fenced());
    let reason = run.state.failure().unwrap_or_default().to_owned();
    assert!(reason.contains("`car`"), "{reason}");
    settle(&mut run, |_| fenced());
    assert_eq!(run.state.status(), SagaStatus::Compensated);
}
