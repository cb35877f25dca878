//! A saga's timeline as an inline SVG picture: a row per step, each attempt of its action
//! (upper lane) and of its compensation or fence (lower lane) a bar on one time axis,
//! coloured by outcome.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use maud::{Markup, html};
use saga_core::{Direction, Event, RecordedEvent};

/// How an attempt ended, which is also its bar's CSS class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The action succeeded.
    Ok,
    /// The compensation succeeded.
    Compensated,
    /// Failed for good.
    Failed,
    /// Failed, and another attempt may follow.
    Retried,
    /// No answer within the timeout.
    TimedOut,
    /// Waiting for a signal or a delay.
    Waiting,
    /// A fence's answer.
    Fence,
    /// Sent, with no answer yet.
    Pending,
    /// Not run: its condition did not hold.
    Skipped,
}

impl Outcome {
    fn class(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Compensated => "compensated",
            Outcome::Failed => "failed",
            Outcome::Retried => "retried",
            Outcome::TimedOut => "timedout",
            Outcome::Waiting => "waiting",
            Outcome::Fence => "fence",
            Outcome::Pending => "pending",
            Outcome::Skipped => "skipped",
        }
    }

    /// Every outcome with its words, for the legend.
    pub(crate) const LEGEND: [(Outcome, &'static str); 9] = [
        (Outcome::Ok, "ok"),
        (Outcome::Failed, "failed"),
        (Outcome::TimedOut, "timed out"),
        (Outcome::Retried, "failed, retried"),
        (Outcome::Waiting, "waiting"),
        (Outcome::Compensated, "compensated"),
        (Outcome::Fence, "fence"),
        (Outcome::Pending, "in flight"),
        (Outcome::Skipped, "skipped"),
    ];
}

/// One attempt drawn as a bar.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bar {
    /// The step's position.
    pub step: u32,
    /// Action, compensation or fence (a wait is an action).
    pub direction: Direction,
    /// The attempt (0 for a wait).
    pub attempt: u32,
    /// When it began.
    pub from: DateTime<Utc>,
    /// When it ended, or `None` while it goes on.
    pub to: Option<DateTime<Utc>>,
    /// How it ended.
    pub outcome: Outcome,
    /// What the bar's tooltip says beyond its step and attempt.
    pub detail: String,
}

/// The bars of a saga's log, in the order their attempts began.
pub(crate) fn bars(history: &[RecordedEvent]) -> Vec<Bar> {
    let mut bars: Vec<Bar> = Vec::new();
    let mut open: HashMap<(u32, Direction, u32), usize> = HashMap::new();
    let mut waiting: HashMap<u32, usize> = HashMap::new();
    for record in history {
        let at = record.at;
        let mut close = |key: (u32, Direction, u32), outcome: Outcome, detail: String| {
            if let Some(i) = open.remove(&key) {
                let bar = &mut bars[i];
                bar.to = Some(at);
                bar.outcome = outcome;
                bar.detail = detail;
            }
        };
        match &record.event {
            Event::Dispatched {
                step,
                direction,
                attempt,
                service,
                command,
                ..
            } => {
                let target = match (service, command) {
                    (Some(s), Some(c)) => format!("{s}.{c}"),
                    _ => String::new(),
                };
                open.insert((*step, *direction, *attempt), bars.len());
                bars.push(Bar {
                    step: *step,
                    direction: *direction,
                    attempt: *attempt,
                    from: at,
                    to: None,
                    outcome: Outcome::Pending,
                    detail: format!("{target} in flight"),
                });
            }
            Event::Succeeded {
                step,
                direction,
                attempt,
                ..
            } => {
                let outcome = match direction {
                    Direction::Forward => Outcome::Ok,
                    Direction::Compensation => Outcome::Compensated,
                    _ => Outcome::Fence,
                };
                close((*step, *direction, *attempt), outcome, "ok".into());
            }
            Event::Failed {
                step,
                direction,
                attempt,
                error,
                retryable,
            } => {
                let outcome = match (direction, retryable) {
                    (Direction::Fence, _) => Outcome::Fence,
                    (_, true) => Outcome::Retried,
                    (_, false) => Outcome::Failed,
                };
                let kind = if *retryable { "retryable" } else { "terminal" };
                close(
                    (*step, *direction, *attempt),
                    outcome,
                    format!("failed ({kind}): {error}"),
                );
            }
            Event::TimedOut {
                step,
                direction,
                attempt,
            } => close(
                (*step, *direction, *attempt),
                Outcome::TimedOut,
                "timed out".into(),
            ),
            Event::Fenced {
                step,
                attempt,
                detail,
            } => close(
                (*step, Direction::Fence, *attempt),
                Outcome::Fence,
                format!("not applied, fenced: {detail}"),
            ),
            Event::Skipped { step } => bars.push(Bar {
                step: *step,
                direction: Direction::Forward,
                attempt: 0,
                from: at,
                to: Some(at),
                outcome: Outcome::Skipped,
                detail: "skipped: its condition did not hold".into(),
            }),
            Event::Waiting { step, signal, .. } => {
                waiting.insert(*step, bars.len());
                bars.push(Bar {
                    step: *step,
                    direction: Direction::Forward,
                    attempt: 0,
                    from: at,
                    to: None,
                    outcome: Outcome::Waiting,
                    detail: match signal {
                        Some(name) => format!("waits for signal `{name}`"),
                        None => "waits".to_owned(),
                    },
                });
            }
            _ => {}
        }
        // A wait ends with the next event of its step, or the saga's end.
        if let Some(step) = step_of(&record.event)
            && !matches!(record.event, Event::Waiting { .. })
            && let Some(i) = waiting.remove(&step)
        {
            bars[i].to = Some(at);
        }
        if matches!(
            record.event,
            Event::Completed | Event::Compensated | Event::Cancelled
        ) {
            for i in waiting.drain().map(|(_, i)| i) {
                bars[i].to = Some(at);
            }
        }
    }
    bars
}

fn step_of(event: &Event) -> Option<u32> {
    match event {
        Event::Resolved { step, .. } | Event::CompensationStarted { step, .. } => Some(*step),
        other => other.step_attempt().map(|a| a.step),
    }
}

/// Events of the whole saga drawn as a line across the rows: what an operator did, and
/// where the saga stopped or ended.
fn marker(event: &Event) -> Option<(&'static str, &'static str)> {
    Some(match event {
        Event::Stuck { .. } => ("stuck", "stop"),
        Event::RetryRequested { .. } => ("retry", "operator"),
        Event::Resolved { .. } => ("resolved", "operator"),
        Event::CancelRequested { .. } => ("cancel", "operator"),
        Event::Paused { .. } => ("paused", "operator"),
        Event::Resumed { .. } => ("resumed", "operator"),
        Event::DeadlineExceeded => ("deadline", "stop"),
        Event::Completed => ("completed", "end"),
        Event::Compensated => ("compensated", "end"),
        Event::Cancelled => ("cancelled", "end"),
        _ => return None,
    })
}

/// Geometry of the picture, in SVG units.
const LABEL: f64 = 190.0;
const PLOT: f64 = 760.0;
const ROW: f64 = 34.0;
const AXIS: f64 = 46.0;

/// The timeline: `steps` names the rows, `services` labels them, `now` ends bars still open
/// (the end of the log for a saga that has finished).
pub(crate) fn render(
    steps: &[String],
    services: &HashMap<u32, String>,
    history: &[RecordedEvent],
    end: DateTime<Utc>,
) -> Markup {
    let bars = bars(history);
    let start = history.first().map_or(end, |r| r.at);
    let span_ms = ((end - start).num_microseconds().unwrap_or(0) as f64 / 1000.0).max(1.0);
    let x = |t: DateTime<Utc>| {
        let ms = (t - start).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        LABEL + (ms / span_ms).clamp(0.0, 1.0) * PLOT
    };
    let rows = steps
        .len()
        .max(bars.iter().map(|b| b.step as usize + 1).max().unwrap_or(0));
    let name = |step: u32| {
        steps
            .get(step as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{step}"))
    };
    let height = AXIS + ROW * rows as f64 + 8.0;
    let width = LABEL + PLOT + 20.0;
    let ticks = 5;
    // Labels of markers close together go on alternate lines.
    let mut markers: Vec<(f64, &str, &str, u8, f64)> = Vec::new();
    for record in history {
        if let Some((label, kind)) = marker(&record.event) {
            let mx = x(record.at);
            let level = match markers.last() {
                Some((last, _, _, level, _)) if mx - last < 60.0 => 1 - level,
                _ => 0,
            };
            let at_ms = (record.at - start).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            markers.push((mx, label, kind, level, at_ms));
        }
    }
    html! {
        svg.timeline xmlns="http://www.w3.org/2000/svg" role="img"
            viewBox={ "0 0 " (width) " " (height) } width=(width) height=(height)
            aria-label="timeline of the saga's steps" {
            @for step in 0..rows as u32 {
                @let y = AXIS + ROW * f64::from(step);
                rect class={ "row " @if step % 2 == 1 { "odd" } } x="0" y=(y) width=(width) height=(ROW) {}
                text.step x="6" y=(y + 15.0) { (name(step)) }
                @if let Some(service) = services.get(&step) {
                    text.service x="6" y=(y + 28.0) { (service) }
                }
            }
            @for i in 0..=ticks {
                @let ms = span_ms * f64::from(i) / f64::from(ticks);
                @let tx = LABEL + PLOT * f64::from(i) / f64::from(ticks);
                line.grid x1=(tx) x2=(tx) y1=(16.0) y2=(height - 4.0) {}
                text.tick x=(tx) y="12" text-anchor="middle" { (duration(ms)) }
            }
            @for (mx, label, kind, level, at_ms) in &markers {
                line class={ "marker " (kind) } x1=(mx) x2=(mx) y1=(AXIS - 4.0) y2=(height - 4.0) {
                    title { (label) " at " (duration(*at_ms)) }
                }
                text class={ "mark " (kind) } x=(mx) y=(AXIS - 6.0 - 11.0 * f64::from(*level))
                    text-anchor=(if *mx > LABEL + PLOT - 40.0 { "end" } else { "middle" }) { (label) }
            }
            @for bar in &bars {
                @let y = AXIS + ROW * f64::from(bar.step)
                    + if bar.direction == Direction::Forward { 4.0 } else { 18.0 };
                @let x1 = x(bar.from);
                @let x2 = x(bar.to.unwrap_or(end)).max(x1 + 3.0);
                @let took = bar.to.map(|t| (t - bar.from).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                rect class={ "bar " (bar.outcome.class()) } data-step=(name(bar.step))
                    data-direction=(bar.direction.as_str())
                    x=(x1) y=(y) width=(x2 - x1) height="12" rx="2" {
                    title {
                        (name(bar.step)) " " (arrow(bar.direction))
                        @if bar.attempt > 0 { " attempt " (bar.attempt) }
                        ": " (bar.detail)
                        @if let Some(ms) = took { " (" (duration(ms)) ")" }
                    }
                }
            }
        }
    }
}

/// The legend of the bars' colours.
pub(crate) fn legend() -> Markup {
    html! {
        ul.legend {
            @for (outcome, words) in Outcome::LEGEND {
                li { span class={ "swatch " (outcome.class()) } {} (words) }
            }
            li { "upper lane: the action; lower lane: its compensation or fence" }
        }
    }
}

fn arrow(direction: Direction) -> &'static str {
    match direction {
        Direction::Forward => "action",
        Direction::Compensation => "compensation",
        _ => "fence",
    }
}

/// `850 ms`, `12.5 s`, `3.2 min`.
fn duration(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 120_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms < 7_200_000.0 {
        format!("{:.1} min", ms / 60_000.0)
    } else {
        format!("{:.1} h", ms / 3_600_000.0)
    }
}

#[cfg(test)]
#[path = "svg_tests.rs"]
mod tests;
