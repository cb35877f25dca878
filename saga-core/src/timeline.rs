//! A readable timeline of one saga, from its log: one line per event, with its time since the
//! start, its step and attempt, and, for a result, how long the attempt took.

use std::collections::HashMap;
use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::definition::Definition;
use crate::event::{Direction, Event, RecordedEvent};
use crate::store::SagaSummary;

/// Renders a saga's history. With the definition, steps are shown by name (else by number).
pub fn render(
    summary: &SagaSummary,
    definition: Option<&Definition>,
    history: &[RecordedEvent],
) -> String {
    let start = history.first().map(|r| r.at).unwrap_or(summary.created_at);
    let names: Vec<String> = definition
        .map(|d| d.steps().iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default();
    let step_name = |step: u32| {
        names
            .get(step as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{step}"))
    };
    let mut dispatched: HashMap<(u32, Direction, u32), DateTime<Utc>> = HashMap::new();
    let took =
        |dispatched: &HashMap<(u32, Direction, u32), DateTime<Utc>>, key, at: DateTime<Utc>| {
            dispatched
                .get(&key)
                .map(|d: &DateTime<Utc>| {
                    let ms = (at - *d).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                    format!(" in {ms:.1} ms")
                })
                .unwrap_or_default()
        };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "saga {} ({} v{}) {}",
        summary.id, summary.saga, summary.version, summary.status
    );
    for record in history {
        let ms = (record.at - start).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        let line = match &record.event {
            Event::Started { business_key, .. } => match business_key {
                Some(key) => format!("started (key {key})"),
                None => "started".to_owned(),
            },
            Event::Dispatched {
                step,
                direction,
                attempt,
                ..
            } => {
                dispatched.insert((*step, *direction, *attempt), record.at);
                let s = definition.and_then(|d| d.steps().get(*step as usize));
                let action = s.and_then(|s| match direction {
                    Direction::Forward => s.action(),
                    Direction::Compensation => s.compensation.as_ref(),
                });
                let target = action.map_or_else(
                    || "?".to_owned(),
                    |a| format!("{}.{}", a.service, a.command),
                );
                format!(
                    "{:<8} {} -> {target} (attempt {attempt})",
                    step_name(*step),
                    arrow(*direction)
                )
            }
            Event::Waiting {
                step,
                signal,
                until,
            } => {
                let until = until
                    .map(|u| format!(" until {}", u.format("%Y-%m-%d %H:%M:%S")))
                    .unwrap_or_default();
                match signal {
                    Some(name) => format!(
                        "{:<8} >> waits for signal `{name}`{until}",
                        step_name(*step)
                    ),
                    None => format!("{:<8} >> waits{until}", step_name(*step)),
                }
            }
            Event::SignalReceived { name, payload } => format!("signal `{name}`: {payload}"),
            Event::CancelRequested { reason, .. } => format!("cancel requested: {reason}"),
            Event::CancelRefused { reason, why, .. } => format!("cancel refused ({reason}): {why}"),
            Event::DeadlineExceeded => "deadline passed".to_owned(),
            Event::RetryRequested {
                step, direction, ..
            } => {
                format!(
                    "{:<8} {} retried by an operator",
                    step_name(*step),
                    arrow(*direction)
                )
            }
            Event::Resolved { step, reason, .. } => {
                format!("{:<8} << resolved by hand: {reason}", step_name(*step))
            }
            Event::Paused { reason, .. } => format!("paused: {reason}"),
            Event::Resumed { .. } => "resumed".to_owned(),
            Event::Held {
                step,
                direction,
                attempt,
            } => format!(
                "{:<8} {} attempt {attempt} held (paused)",
                step_name(*step),
                arrow(*direction)
            ),
            Event::ActionRefused { action, why, .. } => format!("{action} refused: {why}"),
            Event::Cancelled => "cancelled".to_owned(),
            Event::Succeeded {
                step,
                direction,
                attempt,
                ..
            } => format!(
                "{:<8} {} ok (attempt {attempt}){}",
                step_name(*step),
                arrow(*direction),
                took(&dispatched, (*step, *direction, *attempt), record.at)
            ),
            Event::Failed {
                step,
                direction,
                attempt,
                error,
                retryable,
            } => format!(
                "{:<8} {} failed (attempt {attempt}, {}){}: {error}",
                step_name(*step),
                arrow(*direction),
                if *retryable { "retryable" } else { "terminal" },
                took(&dispatched, (*step, *direction, *attempt), record.at)
            ),
            Event::TimedOut {
                step,
                direction,
                attempt,
            } => format!(
                "{:<8} {} attempt {attempt} timed out{}",
                step_name(*step),
                arrow(*direction),
                took(&dispatched, (*step, *direction, *attempt), record.at)
            ),
            Event::RetryScheduled {
                step,
                direction,
                attempt,
                delay_ms,
                ..
            } => format!(
                "{:<8} {} attempt {attempt} in {delay_ms} ms",
                step_name(*step),
                arrow(*direction)
            ),
            Event::CompensationStarted { reason, .. } => format!("compensating: {reason}"),
            Event::Completed => "completed".to_owned(),
            Event::Compensated => "compensated".to_owned(),
            Event::Stuck { reason, .. } => format!("stuck: {reason}"),
        };
        let _ = writeln!(out, "  {ms:>8.1} ms  {line}");
    }
    out
}

fn arrow(direction: Direction) -> &'static str {
    match direction {
        Direction::Forward => ">>",
        Direction::Compensation => "<<",
    }
}
