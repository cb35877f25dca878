//! Property tests of the pure core over random definitions and random step outcomes.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use saga_core::{
    Direction, Env, Event, Input, Outcome, Reply, RetryPolicy, SagaDefinition, SagaState,
    SagaStatus, StepKind, Timer, Verdict, decide, replay,
};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Shape {
    steps: usize,
    pivot: Option<usize>,
    compensated: Vec<bool>,
    attempts: Vec<u32>,
    timeouts: Vec<bool>,
}

fn shapes() -> impl Strategy<Value = Shape> {
    (1usize..6).prop_flat_map(|steps| {
        (
            Just(steps),
            prop::option::of(0..steps),
            prop::collection::vec(prop::bool::weighted(0.8), steps),
            prop::collection::vec(1u32..4, steps),
            prop::collection::vec(any::<bool>(), steps),
        )
            .prop_map(|(steps, pivot, compensated, attempts, timeouts)| Shape {
                steps,
                pivot,
                compensated,
                attempts,
                timeouts,
            })
    })
}

fn definition(shape: &Shape) -> SagaDefinition<Value> {
    let mut b = SagaDefinition::<Value>::builder("prop", 1);
    for i in 0..shape.steps {
        let kind = match shape.pivot {
            Some(p) if i == p => StepKind::Pivot,
            Some(p) if i > p => StepKind::Retriable,
            _ => StepKind::Compensatable,
        };
        let retry = RetryPolicy {
            max_attempts: shape.attempts[i],
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            jitter: 0.5,
        };
        let compensated = shape.compensated[i] && kind == StepKind::Compensatable;
        let timeout = shape.timeouts[i];
        b = b.step(format!("s{i}"), move |s| {
            let mut s = s
                .action("svc", &format!("do{i}"), move |_| Ok(i))
                .retry(retry);
            s = match kind {
                StepKind::Pivot => s.pivot(),
                StepKind::Retriable => s.retriable(),
                StepKind::Compensatable => s,
            };
            if compensated {
                s = s.compensation("svc", &format!("undo{i}"), move |_| Ok(i));
            }
            if timeout {
                s = s.timeout(Duration::from_secs(1));
            }
            s
        });
    }
    b.build().unwrap()
}

/// Outcomes a participant can give: 0 success, 1 retryable failure, 2 terminal failure,
/// 3 timeout (when the step has one; success otherwise).
struct Sim {
    def: SagaDefinition<Value>,
    state: SagaState,
    events: Vec<Event>,
    replies: Vec<Reply>,
    ids: u128,
}

impl Sim {
    fn feed(&mut self, input: Input) -> (Verdict, usize) {
        let mut ids = self.ids;
        let mut new_id = || {
            ids += 1;
            Uuid::from_u128(ids)
        };
        let mut env = Env {
            saga_id: Uuid::nil(),
            now: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            new_id: &mut new_id,
        };
        let d = decide(self.def.definition(), &self.state, &input, &mut env).unwrap();
        self.ids = ids;
        let n = d.events.len();
        self.events.extend(d.events);
        self.state = d.state;
        (d.verdict, n)
    }
}

fn run(shape: &Shape, choices: &[u8]) -> Sim {
    let def = definition(shape);
    let started = Event::Started {
        saga: "prop".into(),
        version: 1,
        input: json!(null),
        business_key: None,
    };
    let state = replay(def.definition(), [&started]).unwrap();
    let mut sim = Sim {
        def,
        state,
        events: vec![started],
        replies: Vec::new(),
        ids: 0,
    };
    sim.feed(Input::Start);
    let mut choices = choices.iter().copied().cycle();
    for _ in 0..1_000 {
        if !sim.state.status.is_active() {
            break;
        }
        let current = sim
            .state
            .current
            .expect("an active saga works on something");
        let Some(command_id) = current.command_id else {
            let (verdict, _) = sim.feed(Input::Timer(Timer::Retry {
                step: current.step,
                direction: current.direction,
                attempt: current.attempt,
            }));
            assert_eq!(verdict, Verdict::Applied);
            continue;
        };
        let choice = choices.next().unwrap();
        // Steps after the pivot retry without bound; end the run eventually.
        let choice = if current.attempt > 6 { 0 } else { choice % 8 };
        let has_timeout = sim.def.definition().steps()[current.step as usize]
            .timeout
            .is_some();
        if choice == 3 && has_timeout {
            sim.feed(Input::Timer(Timer::Timeout {
                step: current.step,
                direction: current.direction,
                attempt: current.attempt,
            }));
            continue;
        }
        let outcome = match choice {
            1 => Outcome::Failure {
                error: "flaky".into(),
                retryable: true,
            },
            2 => Outcome::Failure {
                error: "declined".into(),
                retryable: false,
            },
            _ => Outcome::Success {
                output: json!(current.step),
            },
        };
        let reply = Reply {
            saga_id: Uuid::nil(),
            step: current.step,
            direction: current.direction,
            attempt: current.attempt,
            command_id,
            outcome,
        };
        let (verdict, _) = sim.feed(Input::Reply(reply.clone()));
        assert_eq!(verdict, Verdict::Applied);
        if choice >= 6 {
            // A duplicate delivery right away changes nothing.
            let (verdict, n) = sim.feed(Input::Reply(reply.clone()));
            assert!(matches!(verdict, Verdict::Ignored(_)), "{verdict:?}");
            assert_eq!(n, 0);
        }
        sim.replies.push(reply);
    }
    sim
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_run_ends_and_compensates_in_reverse(shape in shapes(), choices in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut sim = run(&shape, &choices);
        let status = sim.state.status;
        prop_assert!(matches!(status, SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Stuck), "{status:?}");

        // No command is dispatched twice for the same attempt.
        let mut seen = HashSet::new();
        for e in &sim.events {
            if let Event::Dispatched { step, direction, attempt, .. } = e {
                prop_assert!(seen.insert((*step, *direction, *attempt)), "dispatched twice: {step} {direction} {attempt}");
            }
        }

        // The steps to undo, from the log at the moment compensation started.
        let start = sim.events.iter().position(|e| matches!(e, Event::CompensationStarted { .. }));
        let undone: Vec<u32> = sim.events.iter().filter_map(|e| match e {
            Event::Succeeded { step, direction: Direction::Compensation, .. } => Some(*step),
            _ => None,
        }).collect();
        match start {
            None => prop_assert!(undone.is_empty()),
            Some(at) => {
                let before = replay(sim.def.definition(), &sim.events[..=at]).unwrap();
                let mut expected: Vec<u32> = (0..shape.steps as u32).filter(|&i| {
                    let p = before.progress[i as usize];
                    sim.def.definition().steps()[i as usize].compensation.is_some()
                        && matches!(p, saga_core::state::StepProgress::Succeeded | saga_core::state::StepProgress::PossiblyApplied)
                }).collect();
                expected.reverse();
                match status {
                    SagaStatus::Compensated => prop_assert_eq!(&undone, &expected),
                    SagaStatus::Stuck => prop_assert!(expected.starts_with(&undone), "{undone:?} vs {expected:?}"),
                    other => prop_assert!(false, "compensation started but the saga ended {other:?}"),
                }
            }
        }
        match status {
            SagaStatus::Completed => prop_assert!(sim.state.progress.iter().all(|p| *p == saga_core::state::StepProgress::Succeeded)),
            SagaStatus::Stuck => {
                let Some(Event::Stuck { step, direction, .. }) = sim.events.last() else {
                    return Err(TestCaseError::fail("a stuck saga's last event is stuck"));
                };
                let kind = sim.def.definition().steps()[*step as usize].kind;
                prop_assert!(*direction == Direction::Compensation || kind == StepKind::Retriable);
            }
            _ => {}
        }

        // Replaying the log gives the state; a prefix then the rest gives the same.
        let whole = replay(sim.def.definition(), &sim.events).unwrap();
        prop_assert_eq!(&whole, &sim.state);
        let cut = choices[0] as usize % sim.events.len() + 1;
        let mut state = replay(sim.def.definition(), &sim.events[..cut]).unwrap();
        for e in &sim.events[cut..] {
            state.apply(sim.def.definition(), e).unwrap();
        }
        prop_assert_eq!(&state, &whole);

        // Terminal states stay terminal: old results and timers change nothing.
        let end = sim.events.len();
        for reply in sim.replies.clone() {
            let (verdict, n) = sim.feed(Input::Reply(reply));
            prop_assert!(matches!(verdict, Verdict::Ignored(_)), "{verdict:?}");
            prop_assert_eq!(n, 0);
        }
        for step in 0..shape.steps as u32 {
            for timer in [Timer::Retry { step, direction: Direction::Forward, attempt: 2 }, Timer::Timeout { step, direction: Direction::Forward, attempt: 1 }] {
                let (_, n) = sim.feed(Input::Timer(timer));
                prop_assert_eq!(n, 0);
            }
        }
        let (_, n) = sim.feed(Input::Start);
        prop_assert_eq!(n, 0);
        prop_assert_eq!(sim.events.len(), end);
    }
}
