//! Property tests of the pure core: random definitions run against participants that keep an
//! inbox, with any interleaving of deliveries, redeliveries, lost commands, late, duplicate
//! and lost results, timeouts, fences, cancels, pauses and resumes, and operators retrying
//! stuck sagas. Some definitions have a parallel group. Whatever happens, the saga ends, and
//! the effects that applied match its status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use saga_core::decide::{Effect, Env, decide};
use saga_core::{
    Command, Direction, Event, Input, OperatorAction, Outcome, Reply, RetryPolicy, SagaDefinition,
    SagaState, SagaStatus, StepKind, Timer, Verdict, replay,
};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Shape {
    steps: usize,
    pivot: Option<usize>,
    compensated: Vec<bool>,
    attempts: Vec<u32>,
    /// A step's condition, if it has one: `Some(false)` skips it.
    condition: Vec<Option<bool>>,
    /// A parallel group: its first member and how many (all before the pivot).
    group: Option<(usize, usize)>,
    /// A step whose code fails the first time it runs: 0, its input builder with an error (a
    /// terminal failure); 1, its input builder with a panic, or 2, its condition with a panic
    /// (the saga parks until an operator retries).
    faulty: Option<(usize, u8)>,
    /// The saga has a deadline.
    deadline: bool,
}

impl Shape {
    /// The group's members, if it has one.
    fn members(&self) -> std::ops::Range<usize> {
        self.group.map_or(0..0, |(first, len)| first..first + len)
    }
}

fn shapes() -> impl Strategy<Value = Shape> {
    (1usize..6).prop_flat_map(|steps| {
        (
            Just(steps),
            prop::option::of(0..steps),
            prop::collection::vec(prop::bool::weighted(0.8), steps),
            prop::collection::vec(1u32..4, steps),
            prop::collection::vec(
                prop_oneof![6 => Just(None), 1 => Just(Some(true)), 2 => Just(Some(false))],
                steps,
            ),
            prop::option::weighted(0.5, (0..steps, 2usize..4)),
            prop::option::weighted(0.2, (0..steps, 0u8..3)),
            any::<bool>(),
        )
            .prop_map(
                |(steps, pivot, compensated, attempts, condition, group, faulty, deadline)| {
                    // A group stands before the pivot.
                    let limit = pivot.unwrap_or(steps);
                    let group = group.filter(|(first, len)| first + len <= limit);
                    Shape {
                        steps,
                        pivot,
                        compensated,
                        attempts,
                        condition,
                        group,
                        faulty,
                        deadline,
                    }
                },
            )
    })
}

fn definition(shape: &Shape) -> SagaDefinition<Value> {
    let mut b = SagaDefinition::<Value>::builder("prop", 1);
    if shape.deadline {
        b = b.deadline(Duration::from_secs(40));
    }
    let mut i = 0;
    while i < shape.steps {
        if shape.group.is_some() && shape.members().start == i {
            b = b.parallel("group", |mut g| {
                for m in shape.members() {
                    g = g.step(format!("s{m}"), configure(shape, m));
                }
                g
            });
            i = shape.members().end;
            continue;
        }
        b = b.step(format!("s{i}"), configure(shape, i));
        i += 1;
    }
    b.build().unwrap()
}

/// Step `i` of `shape`.
fn configure(
    shape: &Shape,
    i: usize,
) -> impl FnOnce(saga_core::StepBuilder<Value>) -> saga_core::StepBuilder<Value> {
    {
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
            max_elapsed: None,
        };
        let compensated = shape.compensated[i] && kind == StepKind::Compensatable;
        let condition = shape.condition[i];
        let faulty = shape
            .faulty
            .filter(|(step, _)| *step == i)
            .map(|(_, how)| how);
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        move |s| {
            let mut s = s
                .action("svc", &format!("do{i}"), move |_| {
                    let first = !failed.swap(true, std::sync::atomic::Ordering::SeqCst);
                    match faulty {
                        Some(1) if first => panic!("the builder of s{i} broke"),
                        Some(0) if first => Err(saga_core::InputError::new("bad input")),
                        _ => Ok(i),
                    }
                })
                .retry(retry.clone())
                .compensation_retry(RetryPolicy {
                    max_attempts: 6,
                    ..retry.clone()
                })
                .fence_retry(RetryPolicy {
                    max_attempts: 6,
                    ..retry
                })
                .timeout(Duration::from_secs(1));
            s = match kind {
                StepKind::Pivot => s.pivot(),
                StepKind::Retriable => s.retriable(),
                StepKind::Compensatable => s,
            };
            if compensated {
                s = s.compensation("svc", &format!("undo{i}"), move |_| Ok(i));
            }
            if let Some(holds) = condition {
                s = s.when(move |_| holds);
            } else if faulty == Some(2) {
                let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                s = s.when(move |_| {
                    if !asked.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        panic!("the condition of s{i} broke");
                    }
                    true
                });
            }
            s
        }
    }
}

/// A participant's inbox entry under a key.
#[derive(Debug, Clone, PartialEq)]
enum Recorded {
    Ok,
    Failed,
    Fenced,
}

/// The saga, its participants and everything in flight between them.
struct World {
    def: SagaDefinition<Value>,
    state: SagaState,
    events: Vec<Event>,
    now: DateTime<Utc>,
    ids: u128,
    /// Commands published and not yet consumed (a redelivery leaves a copy).
    queue: Vec<Command>,
    /// Results published and not yet applied.
    results: Vec<Reply>,
    /// Every result ever published, to send again once the saga ended.
    sent_results: Vec<Reply>,
    /// Pending timers by key.
    timers: BTreeMap<String, Timer>,
    inbox: HashMap<String, Recorded>,
    /// Effects applied, in order: (step, direction).
    effects: Vec<(u32, Direction)>,
}

impl World {
    fn feed(&mut self, input: Input) -> (Verdict, usize) {
        let mut ids = self.ids;
        let mut new_id = || {
            ids += 1;
            Uuid::from_u128(ids)
        };
        let mut env = Env {
            saga_id: Uuid::nil(),
            now: self.now,
            new_id: &mut new_id,
        };
        let d = decide(self.def.definition(), &self.state, &input, &mut env).unwrap();
        self.ids = ids;
        let n = d.events.len();
        self.events.extend(d.events);
        self.state = d.state;
        for effect in d.effects {
            match effect {
                Effect::Dispatch(command) => self.queue.push(command),
                Effect::SetTimer { timer, .. } => {
                    self.timers.insert(timer.key(), timer);
                }
                Effect::CancelTimer(timer) => {
                    self.timers.remove(&timer.key());
                }
            }
        }
        (d.verdict, n)
    }

    /// A participant consumes `command`: answers from its inbox, or runs the handler (whose
    /// outcome `roll` picks) and records the outcome with the effect.
    fn deliver(&mut self, command: &Command, roll: u8) -> Outcome {
        let key = command.idempotency_key.clone();
        if command.direction == Direction::Fence {
            let recorded = self.inbox.entry(key).or_insert(Recorded::Fenced);
            return match recorded {
                Recorded::Ok => Outcome::Success { output: json!(1) },
                _ => Outcome::Fenced {
                    detail: "fenced".into(),
                },
            };
        }
        match self.inbox.get(&key) {
            Some(Recorded::Ok) => return Outcome::Success { output: json!(1) },
            Some(Recorded::Failed) => {
                return Outcome::Failure {
                    error: "declined".into(),
                    retryable: false,
                };
            }
            Some(Recorded::Fenced) => {
                return Outcome::Fenced {
                    detail: "fenced".into(),
                };
            }
            None => {}
        }
        // A compensation fails for good now and then; then the saga parks for an operator.
        let terminal_allowed = command.direction == Direction::Forward || roll % 23 == 2;
        match roll % 6 {
            0 | 1 => Outcome::Failure {
                error: "flaky".into(),
                retryable: true,
            },
            2 if terminal_allowed => {
                self.inbox.insert(key, Recorded::Failed);
                Outcome::Failure {
                    error: "declined".into(),
                    retryable: false,
                }
            }
            _ => {
                self.inbox.insert(key, Recorded::Ok);
                self.effects.push((command.step, command.direction));
                Outcome::Success { output: json!(1) }
            }
        }
    }

    /// One random happening, picked by `a` and `b`.
    fn happen(&mut self, a: u8, b: u8) {
        self.now += Duration::from_secs(1);
        match a % 10 {
            0..=3 if !self.queue.is_empty() => {
                let i = b as usize % self.queue.len();
                let command = if a.is_multiple_of(3) {
                    self.queue[i].clone() // delivered, and delivered again later
                } else {
                    self.queue.remove(i)
                };
                let outcome = self.deliver(&command, (a / 10).wrapping_add(b));
                if !b.is_multiple_of(7) {
                    self.publish(Reply::to(&command, outcome));
                }
            }
            4..=6 if !self.results.is_empty() => {
                let i = b as usize % self.results.len();
                let reply = if b.is_multiple_of(5) {
                    self.results[i].clone() // applied, and delivered again later
                } else {
                    self.results.remove(i)
                };
                self.feed(Input::Reply(reply));
            }
            7 if !self.queue.is_empty() => {
                // A command lost (expired in its queue).
                let i = b as usize % self.queue.len();
                self.queue.remove(i);
            }
            8 if b.is_multiple_of(4) => {
                self.feed(Input::Timer(Timer::Cancel {
                    id: Uuid::from_u128(u128::from(b)),
                    reason: "changed mind".into(),
                }));
            }
            8 if b % 4 == 1 => self.operator(OperatorAction::Pause {
                reason: "look".into(),
            }),
            8 if b % 4 == 2 => self.operator(OperatorAction::Resume),
            8 => self.operator(OperatorAction::Retry),
            _ if !self.timers.is_empty() => {
                let keys: Vec<String> = self.timers.keys().cloned().collect();
                let timer = self.timers.remove(&keys[b as usize % keys.len()]).unwrap();
                self.feed(Input::Timer(timer));
            }
            _ => {}
        }
    }

    fn operator(&mut self, action: OperatorAction) {
        self.ids += 1;
        let id = Uuid::from_u128(self.ids);
        self.feed(Input::Timer(Timer::Operator { id, action }));
    }

    fn publish(&mut self, reply: Reply) {
        self.results.push(reply.clone());
        self.sent_results.push(reply);
    }

    /// Everything is delivered and answered from now on, in order, until the saga settles; an
    /// operator resumes a paused saga and retries a stuck one (a few times).
    fn calm_down(&mut self, retry_first: bool) {
        let mut retries = 0;
        for _ in 0..10_000 {
            if self.state.paused && !retry_first {
                self.operator(OperatorAction::Resume);
            }
            if self.state.status == SagaStatus::Stuck && retries < 3 {
                retries += 1;
                self.operator(OperatorAction::Retry);
            }
            if self.state.paused && !self.state.status.is_terminal() {
                // The next round retries what the resume parked, if it parked.
                self.operator(OperatorAction::Resume);
                continue;
            }
            if !self.state.status.is_active() {
                return;
            }
            self.now += Duration::from_secs(1);
            if !self.results.is_empty() {
                let reply = self.results.remove(0);
                self.feed(Input::Reply(reply));
            } else if !self.queue.is_empty() {
                let command = self.queue.remove(0);
                let outcome = self.deliver(&command, 5);
                self.publish(Reply::to(&command, outcome));
            } else if let Some(key) = self.timers.keys().next().cloned() {
                let timer = self.timers.remove(&key).unwrap();
                self.feed(Input::Timer(timer));
            } else {
                panic!("an active saga waits for nothing: {:?}", self.state.current);
            }
        }
        panic!("the saga did not settle");
    }
}

fn run(shape: &Shape, choices: &[u8]) -> World {
    let def = definition(shape);
    let started = Event::Started {
        saga: "prop".into(),
        version: 1,
        input: json!(null),
        business_key: None,
        steps: def.definition().step_names(),
        groups: def.definition().group_records(),
    };
    let state = replay(def.definition(), [&started]).unwrap();
    let mut world = World {
        def,
        state,
        events: vec![started],
        now: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        ids: 0,
        queue: Vec::new(),
        results: Vec::new(),
        sent_results: Vec::new(),
        timers: BTreeMap::new(),
        inbox: HashMap::new(),
        effects: Vec::new(),
    };
    world.feed(Input::Start);
    for pair in choices.chunks(2) {
        world.happen(pair[0], *pair.get(1).unwrap_or(&0));
    }
    world.calm_down(choices.len() % 2 == 1);
    world
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn any_interleaving_ends_with_effects_matching_the_status(
        shape in shapes(),
        choices in prop::collection::vec(any::<u8>(), 0..160),
    ) {
        let mut world = run(&shape, &choices);
        let status = world.state.status;
        let def = world.def.definition();
        let forward = |step: usize| world.effects.iter().filter(|e| **e == (step as u32, Direction::Forward)).count();
        let undone = |step: usize| world.effects.iter().filter(|e| **e == (step as u32, Direction::Compensation)).count();

        // A step is skipped only when its condition fails, and a skipped step is never sent.
        for step in 0..shape.steps {
            let skipped = world.events.iter().any(|e| matches!(e, Event::Skipped { step: s } if *s as usize == step));
            // (Or a group member held by a pause, withdrawn when the saga gave up on the group.)
            let sent = world.events.iter().any(|e| matches!(e, Event::Dispatched { step: s, direction: Direction::Forward, .. } if *s as usize == step));
            let withdrawn = shape.members().contains(&step) && !sent;
            prop_assert!(!skipped || shape.condition[step] == Some(false) || withdrawn, "step {step} skipped though its condition held");
            if shape.condition[step] == Some(false) {
                prop_assert_eq!(forward(step) + undone(step), 0, "skipped step {} ran: {:?}", step, world.effects);
                let sent = world.events.iter().any(|e| matches!(e, Event::Dispatched { step: s, .. } if *s as usize == step));
                prop_assert!(!sent, "skipped step {step} was dispatched");
            }
        }
        // Each effect at most once; a compensation only of a step that applied.
        for step in 0..shape.steps {
            prop_assert!(forward(step) <= 1, "step {step} applied twice: {:?}", world.effects);
            prop_assert!(undone(step) <= forward(step), "step {step} undone but never applied: {:?}", world.effects);
        }
        // A group's members are all sent before any is answered, and the saga goes past the
        // group only once each member succeeded or was skipped.
        let members = shape.members();
        let index = |found: &dyn Fn(&Event) -> bool| world.events.iter().position(found);
        let answered = index(&|e| matches!(e, Event::Succeeded { step, .. } | Event::Failed { step, .. } | Event::TimedOut { step, .. } if members.contains(&(*step as usize))));
        for m in members.clone() {
            let sent = index(&|e| matches!(e, Event::Dispatched { step, .. } | Event::Held { step, .. } | Event::Skipped { step } if *step as usize == m));
            // (A member whose builder panicked waits for the operator.)
            let parked = world.events.iter().any(|e| matches!(e, Event::Stuck { step, .. } if *step as usize == m));
            if let (Some(sent), Some(answered), false) = (sent, answered, parked) {
                prop_assert!(sent < answered, "member {m} was sent after a member was answered: {:?}", world.events);
            }
        }
        if !members.is_empty() && members.end < shape.steps {
            let past = index(&|e| matches!(e, Event::Dispatched { step, direction: Direction::Forward, .. } | Event::Skipped { step } if *step as usize == members.end));
            if let Some(past) = past {
                for m in members.clone() {
                    let done = world.events[..past].iter().any(|e| matches!(e, Event::Succeeded { step, direction: Direction::Forward | Direction::Fence, .. } | Event::Skipped { step } if *step as usize == m));
                    prop_assert!(done, "the saga went past the group before member {m} succeeded: {:?}", world.events);
                }
            }
        }

        // No member goes forward once the saga gives up on the group.
        if let Some(stop) = index(&|e| matches!(e, Event::CompensationStarted { .. } | Event::CancelRequested { .. } | Event::DeadlineExceeded)) {
            let late = world.events[stop..].iter().find(|e| matches!(e, Event::Dispatched { step, direction: Direction::Forward, .. } if members.contains(&(*step as usize))));
            prop_assert!(late.is_none(), "{late:?} after {:?}: {:?}", world.events[stop], world.events);
        }

        // Compensations run in reverse order of their steps.
        let compensations: Vec<u32> = world.effects.iter().filter(|e| e.1 == Direction::Compensation).map(|e| e.0).collect();
        prop_assert!(compensations.windows(2).all(|w| w[0] > w[1]), "{compensations:?}");

        match status {
            SagaStatus::Completed => {
                for step in 0..shape.steps {
                    let runs = usize::from(shape.condition[step] != Some(false));
                    prop_assert_eq!(forward(step), runs, "completed, step {} applied {} times: {:?}", step, forward(step), world.effects);
                    prop_assert_eq!(undone(step), 0);
                }
            }
            SagaStatus::Compensated | SagaStatus::Cancelled => {
                for step in 0..shape.steps {
                    let s = &def.steps()[step];
                    if s.kind != StepKind::Compensatable {
                        prop_assert_eq!(forward(step), 0, "a compensated saga applied its pivot (or later) step {}: {:?}", step, world.effects);
                    } else if s.compensation.is_some() {
                        prop_assert_eq!(undone(step), forward(step), "step {} applied {} time(s), undone {}: {:?}", step, forward(step), undone(step), world.effects);
                    }
                }
            }
            SagaStatus::Stuck => {
                let Some(Event::Stuck { step, direction, .. }) = world.events.last() else {
                    return Err(TestCaseError::fail("a stuck saga's last event is stuck"));
                };
                let kind = def.steps()[*step as usize].kind;
                prop_assert!(*direction != Direction::Forward || kind == StepKind::Retriable, "stuck going forward at {:?} step {step}", kind);
            }
            other => prop_assert!(false, "the saga ended {other:?}"),
        }

        // No command is dispatched twice for the same attempt.
        let mut seen = HashSet::new();
        for e in &world.events {
            if let Event::Dispatched { step, direction, attempt, .. } = e {
                prop_assert!(seen.insert((*step, *direction, *attempt)), "dispatched twice: {step} {direction} {attempt}");
            }
        }

        // Replaying the log gives the state; a prefix then the rest gives the same.
        let whole = replay(def, &world.events).unwrap();
        prop_assert_eq!(&whole, &world.state);
        let cut = choices.first().copied().unwrap_or(0) as usize % world.events.len() + 1;
        let mut state = replay(def, &world.events[..cut]).unwrap();
        for e in &world.events[cut..] {
            state.apply(def, e).unwrap();
        }
        prop_assert_eq!(&state, &whole);

        // A finished saga stays finished: old results and timers change nothing.
        if status.is_terminal() {
            let end = world.events.len();
            for reply in world.sent_results.clone() {
                let (verdict, n) = world.feed(Input::Reply(reply));
                prop_assert!(matches!(verdict, Verdict::Ignored(_)), "{verdict:?}");
                prop_assert_eq!(n, 0);
            }
            for step in 0..shape.steps as u32 {
                for timer in [Timer::Retry { step, direction: Direction::Forward, attempt: 2 }, Timer::Timeout { step, direction: Direction::Forward, attempt: 1 }] {
                    let (_, n) = world.feed(Input::Timer(timer));
                    prop_assert_eq!(n, 0);
                }
            }
            let (_, n) = world.feed(Input::Start);
            prop_assert_eq!(n, 0);
            prop_assert_eq!(world.events.len(), end);
        }
    }
}
