//! A readable timeline of one saga, from its log.

use std::fmt::Write;

use saga_core::store::SagaSummary;
use saga_core::{Definition, Direction, Event, RecordedEvent};

/// Renders a saga's history, one line per event, times relative to its start.
pub fn render(summary: &SagaSummary, definition: &Definition, history: &[RecordedEvent]) -> String {
    let start = history.first().map(|r| r.at).unwrap_or(summary.created_at);
    let step_name = |step: u32| {
        definition
            .steps()
            .get(step as usize)
            .map_or("?", |s| s.name.as_str())
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
                let s = &definition.steps()[*step as usize];
                let action = match direction {
                    Direction::Forward => s.action(),
                    Direction::Compensation => s.compensation.as_ref(),
                };
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
            Event::Cancelled => "cancelled".to_owned(),
            Event::Succeeded {
                step, direction, ..
            } => {
                format!("{:<8} {} ok", step_name(*step), arrow(*direction))
            }
            Event::Failed {
                step,
                direction,
                error,
                retryable,
                ..
            } => format!(
                "{:<8} {} failed ({}): {error}",
                step_name(*step),
                arrow(*direction),
                if *retryable { "retryable" } else { "terminal" }
            ),
            Event::TimedOut {
                step,
                direction,
                attempt,
            } => {
                format!(
                    "{:<8} {} attempt {attempt} timed out",
                    step_name(*step),
                    arrow(*direction)
                )
            }
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
