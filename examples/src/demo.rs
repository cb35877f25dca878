//! The embedded demo: a saga, its orchestrator and its participants in one process, on the
//! in-memory store and the in-process transport. No services needed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::orchestrator::OrchestratorConfig;
use saga_core::{
    Client, Definition, Direction, Event, InProcessTransport, MemoryStore, Orchestrator,
    QueryStore, RecordedEvent, SagaStatus, Transport,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Example;
use crate::participant::{Ledger, worker};

/// Runs `count` sagas of `E` in memory (every `fail_every`-th compensates), prints a timeline
/// per saga (or, with `json`, one JSON line per saga: [`json_line`]), and returns the counts
/// by status.
pub async fn run<E: Example>(
    count: u64,
    fail_every: Option<u64>,
    json: bool,
) -> anyhow::Result<BTreeMap<SagaStatus, u64>> {
    let def = E::definition();
    let store = Arc::new(MemoryStore::new());
    let transport: Arc<dyn Transport> = Arc::new(InProcessTransport::new());
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let ledger = Ledger::Memory(Arc::new(Mutex::new(Vec::new())));
    for service in E::services() {
        tasks.spawn(worker::<E>(service, &ledger).run(Arc::clone(&transport), shutdown.clone()));
    }
    let config = OrchestratorConfig {
        poll_interval: Duration::from_millis(20),
        ..OrchestratorConfig::default()
    };
    let orchestrator = Orchestrator::builder(store.clone(), Arc::clone(&transport))
        .register(&def)
        .config(config)
        .build();
    tasks.spawn(orchestrator.run(shutdown.clone()));

    let client = Client::new(store.clone());
    let mut ids = Vec::new();
    for n in 1..=count {
        let fail = fail_every.is_some_and(|k| n.is_multiple_of(k));
        let id = client.start(&def, &E::input(n, fail)).await?.saga_id;
        for (name, payload) in E::demo_signals(n, fail) {
            client.signal(id, name, &payload).await?;
        }
        ids.push(id);
    }
    let counts = loop {
        let counts = store.count_by_status().await?;
        if counts.keys().all(|s| !s.is_active()) {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    shutdown.cancel();
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    for id in ids {
        let summary = client.summary(id).await?.expect("started above");
        let history = client.history(id).await?;
        use std::io::Write as _;
        let text = if json {
            json_line(id, summary.status, def.definition(), &history).to_string()
        } else {
            saga_core::timeline::render(&summary, Some(def.definition()), &history)
        };
        writeln!(std::io::stdout(), "{text}")?;
    }
    Ok(counts)
}

/// A saga as one JSON object for scripts: `saga_id`, `name`, `status`, and `events`, one per
/// event of a step: `t_ms` (milliseconds since the saga started), `step` (its name),
/// `direction` (`forward` or `compensation`; a fence has the direction of the command it
/// fences), `kind` (the event's kind, `dispatched`, `succeeded`, `failed`, `timed_out`,
/// `skipped`, `waiting`, `retry_scheduled`, ...; a fence's are `fence_dispatched`,
/// `fence_succeeded` (it had applied), `fenced`, `fence_failed`, `fence_timed_out`) and
/// `attempt` (0 for events of no attempt).
pub fn json_line(
    saga_id: Uuid,
    status: SagaStatus,
    definition: &Definition,
    history: &[RecordedEvent],
) -> Value {
    let start = history.first().map(|r| r.at);
    let mut fencing: HashMap<u32, Direction> = HashMap::new();
    let mut events = Vec::new();
    for record in history {
        let (step, direction, attempt) = match &record.event {
            Event::FenceStarted { step, target, .. } => {
                fencing.insert(*step, *target);
                continue;
            }
            Event::Fenced { step, attempt, .. } => (*step, Direction::Fence, *attempt),
            Event::Skipped { step } | Event::Waiting { step, .. } => (*step, Direction::Forward, 0),
            Event::CompensationStarted { step, .. } => (*step, Direction::Compensation, 0),
            Event::Resolved { step, .. } => (*step, Direction::Compensation, 0),
            Event::Stuck {
                step, direction, ..
            } => (*step, *direction, 0),
            other => match other.step_attempt() {
                Some(at) => (at.step, at.direction, at.attempt),
                None => continue,
            },
        };
        let mut kind = record.event.kind().to_owned();
        let direction = if direction == Direction::Fence {
            if !kind.starts_with("fence") {
                kind = format!("fence_{kind}");
            }
            fencing.get(&step).copied().unwrap_or(Direction::Forward)
        } else {
            direction
        };
        let t_ms = start.map_or(0.0, |start| {
            (record.at - start).num_microseconds().unwrap_or(0) as f64 / 1000.0
        });
        events.push(json!({
            "t_ms": t_ms,
            "step": definition.steps().get(step as usize).map_or_else(|| format!("#{step}"), |s| s.name.clone()),
            "direction": direction.as_str(),
            "kind": kind,
            "attempt": attempt,
        }));
    }
    json!({
        "saga_id": saga_id,
        "name": definition.name(),
        "status": status.as_str(),
        "events": events,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone, Utc};
    use serde_json::json;

    use super::*;
    use crate::order::OrderSaga;

    /// A fence is told by its kind and keeps the direction of what it fences; a skipped step
    /// is an event of its own.
    #[test]
    fn fences_and_skipped_steps_in_the_json_line() {
        let start = Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap();
        let history: Vec<RecordedEvent> = [
            json!({"type": "started", "saga": "order", "version": 1, "input": {}, "business_key": null}),
            json!({"type": "skipped", "step": 0}),
            json!({"type": "fence_started", "step": 1, "reason": "no answer", "target": "forward", "then": "give_up"}),
            json!({"type": "dispatched", "step": 1, "direction": "fence", "attempt": 1,
                   "command_id": uuid::Uuid::nil(), "payload": null}),
            json!({"type": "fenced", "step": 1, "attempt": 1, "detail": "tombstone"}),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            serde_json::from_value(json!({
                "seq": i + 1,
                "at": start + Duration::milliseconds(i as i64 * 2),
                "event": event,
            }))
            .unwrap()
        })
        .collect();
        let definition = OrderSaga::definition();
        let line = json_line(
            uuid::Uuid::nil(),
            SagaStatus::Compensated,
            definition.definition(),
            &history,
        );
        assert_eq!(
            line["events"],
            json!([
                {"t_ms": 2.0, "step": "reserve", "direction": "forward", "kind": "skipped", "attempt": 0},
                {"t_ms": 6.0, "step": "charge", "direction": "forward", "kind": "fence_dispatched", "attempt": 1},
                {"t_ms": 8.0, "step": "charge", "direction": "forward", "kind": "fenced", "attempt": 1},
            ])
        );
        assert_eq!(line["status"], "compensated");
        assert_eq!(line["name"], "order");
    }
}
