//! A readable timeline of one saga, from its log: one line per event, with its time since the
//! start, its step and attempt, and, for a result, how long the attempt took.
//!
//! The log names its steps (in `started`) and each command's service and command (in
//! `dispatched`), so the timeline reads the same with or without the definition; a
//! definition fills in what logs written before those names were recorded lack.

use std::collections::HashMap;
use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::codec::Payloads;
use crate::definition::Definition;
use crate::event::{Direction, Event, RecordedEvent, StepAttempt};
use crate::store::SagaSummary;

/// Renders a saga's history. Steps are named from the log, or the definition, or by number.
pub fn render(
    summary: &SagaSummary,
    definition: Option<&Definition>,
    history: &[RecordedEvent],
) -> String {
    let start = history.first().map(|r| r.at).unwrap_or(summary.created_at);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "saga {} ({} v{}) {}",
        summary.id, summary.saga, summary.version, summary.status
    );
    for (record, line) in history.iter().zip(describe(definition, history)) {
        let ms = (record.at - start).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        let _ = writeln!(out, "  {ms:>8.1} ms  {line}");
    }
    out
}

/// The names of a saga's steps, in order: from its log, or else the definition.
pub fn step_names(definition: Option<&Definition>, history: &[RecordedEvent]) -> Vec<String> {
    if let Some(Event::Started { steps, .. }) = history.first().map(|r| &r.event)
        && !steps.is_empty()
    {
        return steps.clone();
    }
    definition.map(Definition::step_names).unwrap_or_default()
}

/// One line of words for each event of `history`, as [`render`] prints them after their
/// times (a result says how long its attempt took).
pub fn describe(definition: Option<&Definition>, history: &[RecordedEvent]) -> Vec<String> {
    let names = step_names(definition, history);
    let step_name = |step: u32| {
        names
            .get(step as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{step}"))
    };
    // When each attempt was dispatched, for how long its answer took.
    let mut dispatched: HashMap<StepAttempt, DateTime<Utc>> = HashMap::new();
    let mut lines = Vec::with_capacity(history.len());
    for record in history {
        let took = record
            .event
            .step_attempt()
            .and_then(|a| dispatched.get(&a))
            .map(|d| {
                let ms = (record.at - *d).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                format!(" in {ms:.1} ms")
            })
            .unwrap_or_default();
        let at = |step: u32, direction: Direction| {
            format!("{:<8} {}", step_name(step), arrow(direction))
        };
        let line = match &record.event {
            Event::Started {
                business_key,
                groups,
                ..
            } => {
                let mut line = match business_key {
                    Some(key) => format!("started (key {key})"),
                    None => "started".to_owned(),
                };
                for group in groups {
                    let _ = write!(line, "; group {}: {}", group.name, group.steps.join(", "));
                }
                line
            }
            Event::Dispatched {
                step,
                direction,
                attempt,
                service,
                command,
                ..
            } => {
                dispatched.insert(StepAttempt::new(*step, *direction, *attempt), record.at);
                let target = match (service, command) {
                    (Some(service), Some(command)) => format!("{service}.{command}"),
                    _ => target_in(definition, *step, *direction),
                };
                let what = if *direction == Direction::Fence {
                    "fence "
                } else {
                    ""
                };
                format!(
                    "{} {what}-> {target} (attempt {attempt})",
                    at(*step, *direction)
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
            Event::Skipped { step } => {
                format!(
                    "{:<8} -- skipped (its condition did not hold)",
                    step_name(*step)
                )
            }
            Event::SignalReceived { name, payload } => {
                format!("signal `{name}`: {}", Payloads::masked(payload))
            }
            Event::CancelRequested { reason, .. } => format!("cancel requested: {reason}"),
            Event::CancelRefused { reason, why, .. } => format!("cancel refused ({reason}): {why}"),
            Event::DeadlineExceeded => "deadline passed".to_owned(),
            Event::RetryRequested {
                step, direction, ..
            } => format!("{} retried by an operator", at(*step, *direction)),
            Event::Resolved { step, reason, .. } => {
                format!("{:<8} << resolved by hand: {reason}", step_name(*step))
            }
            Event::Paused { reason, .. } => format!("paused: {reason}"),
            Event::Resumed { .. } => "resumed".to_owned(),
            Event::Held {
                step,
                direction,
                attempt,
            } => format!("{} attempt {attempt} held (paused)", at(*step, *direction)),
            Event::ActionRefused { action, why, .. } => format!("{action} refused: {why}"),
            Event::Cancelled => "cancelled".to_owned(),
            Event::Succeeded {
                step,
                direction: Direction::Fence,
                attempt,
                ..
            } => format!(
                "{} applied, says the fence (attempt {attempt}){}",
                at(*step, Direction::Fence),
                took
            ),
            Event::Succeeded {
                step,
                direction,
                attempt,
                ..
            } => format!("{} ok (attempt {attempt}){}", at(*step, *direction), took),
            Event::Failed {
                step,
                direction: Direction::Fence,
                attempt,
                error,
                retryable: false,
            } => format!(
                "{} cannot be fenced (attempt {attempt}), counts as applied: {error}",
                at(*step, Direction::Fence)
            ),
            Event::Failed {
                step,
                direction,
                attempt,
                error,
                retryable,
            } => format!(
                "{} failed (attempt {attempt}, {}){}: {error}",
                at(*step, *direction),
                if *retryable { "retryable" } else { "terminal" },
                took
            ),
            Event::TimedOut {
                step,
                direction,
                attempt,
            } => format!(
                "{} attempt {attempt} timed out{}",
                at(*step, *direction),
                took
            ),
            Event::RetryScheduled {
                step,
                direction,
                attempt,
                delay_ms,
                ..
            } => format!(
                "{} attempt {attempt} in {delay_ms} ms",
                at(*step, *direction)
            ),
            Event::FenceStarted {
                step,
                reason,
                target,
                ..
            } => match target {
                Direction::Compensation => {
                    format!(
                        "fencing the compensation of step {}: {reason}",
                        step_name(*step)
                    )
                }
                _ => format!("fencing step {}: {reason}", step_name(*step)),
            },
            Event::Fenced {
                step,
                attempt,
                detail,
            } => format!(
                "{} not applied, fenced (attempt {attempt}){}: {detail}",
                at(*step, Direction::Fence),
                took
            ),
            Event::CompensationStarted { reason, .. } => format!("compensating: {reason}"),
            Event::Completed => "completed".to_owned(),
            Event::Compensated => "compensated".to_owned(),
            Event::Stuck { reason, .. } => format!("stuck: {reason}"),
        };
        lines.push(line);
    }
    lines
}

/// `service.command` of a step's command in `direction`, from the definition, or `?`.
fn target_in(definition: Option<&Definition>, step: u32, direction: Direction) -> String {
    let s = definition.and_then(|d| d.steps().get(step as usize));
    let action = s.and_then(|s| match direction {
        Direction::Forward | Direction::Fence => s.action(),
        Direction::Compensation => s.compensation.as_ref(),
    });
    action.map_or_else(
        || "?".to_owned(),
        |a| format!("{}.{}", a.service, a.command),
    )
}

/// What the marks of a rendered timeline mean.
pub const LEGEND: &str = "legend: >> the action, << its compensation, || a fence (asks the \
     step's service whether the action applied, and stops it if not); times are from the start";

fn arrow(direction: Direction) -> &'static str {
    match direction {
        Direction::Forward => ">>",
        Direction::Compensation => "<<",
        Direction::Fence => "||",
    }
}
