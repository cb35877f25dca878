//! What the canned histories share: an order saga, and a saga driven input by input.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use saga_core::decide::{Decision, Effect, Env, decide};
use saga_core::{
    Direction, Event, Input, Outcome, Reply, RetryPolicy, SagaDefinition, SagaState, replay,
};
use serde_json::{Value, json};
use uuid::Uuid;

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// reserve (release) -> charge (refund) -> ship (pivot); 3 attempts, 100 ms backoff, no jitter.
pub fn order() -> SagaDefinition<Value> {
    order_with(None)
}

/// [`order`], with a deadline if one is given.
pub fn order_with(deadline: Option<Duration>) -> SagaDefinition<Value> {
    let mut builder = SagaDefinition::<Value>::builder("order", 1);
    if let Some(deadline) = deadline {
        builder = builder.deadline(deadline);
    }
    let retry = retry();
    builder
        .step("reserve", |s| {
            s.action("inventory", "reserve", |ctx| Ok(ctx.input()["sku"].clone()))
                .compensation("inventory", "release", |ctx| {
                    Ok(json!({ "reservation": ctx.output::<Value>("reserve")? }))
                })
                .retry(retry.clone())
                .compensation_retry(retry.clone())
        })
        .step("charge", |s| {
            s.action("payment", "charge", |ctx| Ok(ctx.input()["amount"].clone()))
                .compensation("payment", "refund", |ctx| {
                    Ok(json!({ "charge": ctx.try_output::<Value>("charge")? }))
                })
                .retry(retry.clone())
                .compensation_retry(retry.clone())
                .fence_retry(retry.clone())
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

/// 3 attempts, 100 ms backoff doubling to 1 s, no jitter.
pub fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        multiplier: 2.0,
        jitter: 0.0,
        max_elapsed: None,
    }
}

/// A saga driven input by input, keeping its whole log.
pub struct Run {
    pub def: SagaDefinition<Value>,
    pub saga_id: Uuid,
    pub events: Vec<Event>,
    pub state: SagaState,
    pub now: DateTime<Utc>,
    pub ids: u128,
}

impl Run {
    pub fn start(def: SagaDefinition<Value>) -> (Self, Decision) {
        let started = Event::Started {
            saga: "order".into(),
            version: 1,
            input: json!({"sku": "A-1", "amount": 30}),
            business_key: None,
            steps: def.definition().step_names(),
            groups: def.definition().group_records(),
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

    pub fn input(&mut self, input: Input) -> Decision {
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

    pub fn reply(&mut self, outcome: Outcome) -> Decision {
        let current = self
            .state
            .first_current()
            .expect("a command is outstanding");
        let reply = Reply {
            saga_id: self.saga_id,
            step: current.at.step,
            direction: current.at.direction,
            attempt: current.at.attempt,
            command_id: current.command_id.expect("dispatched"),
            outcome,
        };
        self.input(Input::Reply(reply))
    }

    pub fn ok(&mut self, output: Value) -> Decision {
        self.reply(Outcome::Success { output })
    }

    pub fn fail(&mut self, retryable: bool) -> Decision {
        self.reply(Outcome::Failure {
            error: "boom".into(),
            retryable,
        })
    }

    /// The outstanding attempt's timeout fires.
    pub fn time_out(&mut self) -> Decision {
        let c = self
            .state
            .first_current()
            .expect("a command is outstanding");
        self.input(Input::Timer(saga_core::Timer::Timeout {
            step: c.at.step,
            direction: c.at.direction,
            attempt: c.at.attempt,
        }))
    }

    /// The outstanding command's attempts time out, `n` in a row: each is retried after its
    /// backoff, but the last.
    pub fn time_out_attempts(&mut self, n: u32) -> Decision {
        self.attempts(n, Self::time_out)
    }

    /// The outstanding command's attempts fail retryably, `n` in a row (each retried but the
    /// last).
    pub fn fail_attempts(&mut self, n: u32) -> Decision {
        self.attempts(n, |run| run.fail(true))
    }

    fn attempts(&mut self, n: u32, mut end: impl FnMut(&mut Self) -> Decision) -> Decision {
        for _ in 1..n {
            end(self);
            self.retry_now();
        }
        end(self)
    }

    /// The pending retry's backoff ends.
    pub fn retry_now(&mut self) -> Decision {
        let c = self.state.first_current().expect("a retry is pending");
        assert!(c.command_id.is_none(), "a retry is pending: {c:?}");
        self.input(Input::Timer(saga_core::Timer::Retry {
            step: c.at.step,
            direction: c.at.direction,
            attempt: c.at.attempt,
        }))
    }

    /// A reply to the command `command_id` (which the saga sent) with `outcome`.
    pub fn late(&mut self, command_id: Uuid, outcome: Outcome) -> Decision {
        let sent = self.state.sent[&command_id];
        self.input(Input::Reply(Reply {
            saga_id: self.saga_id,
            step: sent.at.step,
            direction: sent.at.direction,
            attempt: sent.at.attempt,
            command_id,
            outcome,
        }))
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.events.iter().map(Event::kind).collect()
    }

    /// (step, direction) of every dispatched command, in order.
    pub fn dispatched(&self) -> Vec<(u32, Direction)> {
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

/// The command a decision dispatched (the first, if several).
pub fn dispatch(d: &Decision) -> &saga_core::Command {
    d.effects
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(command) => Some(command),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no dispatch in {:?}", d.effects))
}
