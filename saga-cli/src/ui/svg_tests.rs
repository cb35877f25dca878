use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use saga_core::{Direction, RecordedEvent};
use serde_json::json;

use super::{Outcome, bars, render};

/// A log from `(ms after the start, event as JSON)` pairs.
fn log(events: &[(i64, serde_json::Value)]) -> Vec<RecordedEvent> {
    let start: DateTime<Utc> = "2026-12-07T10:00:00Z".parse().unwrap();
    events
        .iter()
        .enumerate()
        .map(|(i, (ms, event))| {
            serde_json::from_value(json!({
                "seq": i + 1,
                "at": start + Duration::milliseconds(*ms),
                "event": event,
            }))
            .unwrap()
        })
        .collect()
}

fn dispatched(step: u32, direction: &str, attempt: u32) -> serde_json::Value {
    json!({"type": "dispatched", "step": step, "direction": direction, "attempt": attempt,
           "command_id": uuid::Uuid::nil(), "payload": null, "service": "payment", "command": "charge"})
}

#[test]
fn each_attempt_is_a_bar_coloured_by_how_it_ended() {
    let history = log(&[
        (
            0,
            json!({"type": "started", "saga": "order", "version": 1, "input": {}, "business_key": null}),
        ),
        (1, dispatched(0, "forward", 1)),
        (
            10,
            json!({"type": "succeeded", "step": 0, "direction": "forward", "attempt": 1, "output": 1}),
        ),
        (11, dispatched(1, "forward", 1)),
        (
            20,
            json!({"type": "failed", "step": 1, "direction": "forward", "attempt": 1, "error": "busy", "retryable": true}),
        ),
        (30, dispatched(1, "forward", 2)),
        (
            40,
            json!({"type": "timed_out", "step": 1, "direction": "forward", "attempt": 2}),
        ),
        (50, dispatched(1, "forward", 3)),
        (
            60,
            json!({"type": "failed", "step": 1, "direction": "forward", "attempt": 3, "error": "declined", "retryable": false}),
        ),
        (61, dispatched(0, "compensation", 1)),
        (
            70,
            json!({"type": "succeeded", "step": 0, "direction": "compensation", "attempt": 1, "output": null}),
        ),
        (71, json!({"type": "compensated"})),
    ]);
    let outcomes: Vec<(u32, Direction, u32, Outcome)> = bars(&history)
        .iter()
        .map(|b| (b.step, b.direction, b.attempt, b.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            (0, Direction::Forward, 1, Outcome::Ok),
            (1, Direction::Forward, 1, Outcome::Retried),
            (1, Direction::Forward, 2, Outcome::TimedOut),
            (1, Direction::Forward, 3, Outcome::Failed),
            (0, Direction::Compensation, 1, Outcome::Compensated),
        ]
    );
    let failed = &bars(&history)[3];
    assert_eq!(failed.detail, "failed (terminal): declined");
    assert_eq!(
        (failed.to.unwrap() - failed.from).num_milliseconds(),
        10,
        "a bar spans from the dispatch to the answer"
    );
}

#[test]
fn an_unanswered_attempt_and_a_wait_stay_open() {
    let history = log(&[
        (
            0,
            json!({"type": "started", "saga": "order", "version": 1, "input": {}, "business_key": null}),
        ),
        (
            5,
            json!({"type": "waiting", "step": 0, "signal": "approved", "until": null}),
        ),
        (
            9,
            json!({"type": "signal_received", "name": "approved", "payload": {}}),
        ),
        (
            12,
            json!({"type": "succeeded", "step": 0, "direction": "forward", "attempt": 0, "output": {}}),
        ),
        (20, dispatched(1, "forward", 1)),
    ]);
    let bars = bars(&history);
    assert_eq!(bars[0].outcome, Outcome::Waiting);
    assert_eq!((bars[0].to.unwrap() - bars[0].from).num_milliseconds(), 7);
    assert_eq!(bars[1].outcome, Outcome::Pending);
    assert_eq!(bars[1].to, None);
}

#[test]
fn a_skipped_step_is_a_grey_mark_of_its_own() {
    let history = log(&[
        (
            0,
            json!({"type": "started", "saga": "order", "version": 1, "input": {}, "business_key": null}),
        ),
        (1, json!({"type": "skipped", "step": 0})),
        (2, dispatched(1, "forward", 1)),
    ]);
    let bars = bars(&history);
    assert_eq!(
        (bars[0].step, bars[0].outcome, bars[0].to),
        (0, Outcome::Skipped, Some(bars[0].from))
    );
    assert_eq!(bars[0].detail, "skipped: its condition did not hold");
    assert_eq!(bars[1].outcome, Outcome::Pending);
}

#[test]
fn names_and_reasons_from_the_log_are_escaped_in_the_picture() {
    let history = log(&[
        (
            0,
            json!({"type": "started", "saga": "order", "version": 1, "input": {}, "business_key": null}),
        ),
        (1, dispatched(0, "forward", 1)),
        (
            10,
            json!({"type": "failed", "step": 0, "direction": "forward", "attempt": 1,
                    "error": "<script>alert(1)</script>", "retryable": false}),
        ),
    ]);
    let steps = vec!["<b>charge</b>".to_owned()];
    let svg = render(&steps, &HashMap::new(), &history, history[2].at).into_string();
    assert!(!svg.contains("<script>"), "{svg}");
    assert!(
        svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{svg}"
    );
    assert!(svg.contains("&lt;b&gt;charge&lt;/b&gt;"), "{svg}");
    assert!(svg.contains(r#"class="bar failed""#), "{svg}");
}

/// A parallel group's members run side by side: one bar each, over the same time, each ending
/// when its own answer came.
#[test]
fn a_groups_members_are_bars_side_by_side() {
    let ok = |step: u32| json!({"type": "succeeded", "step": step, "direction": "forward", "attempt": 1, "output": 1});
    let history = log(&[
        (
            0,
            json!({"type": "started", "saga": "travel", "version": 2, "input": {}, "business_key": null,
                   "steps": ["flight", "hotel", "car"],
                   "groups": [{"name": "book", "steps": ["flight", "hotel", "car"]}]}),
        ),
        (1, dispatched(0, "forward", 1)),
        (1, dispatched(1, "forward", 1)),
        (1, dispatched(2, "forward", 1)),
        (10, ok(2)),
        (20, ok(0)),
        (30, ok(1)),
    ]);
    let bars = bars(&history);
    let spans: Vec<(u32, i64, i64)> = bars
        .iter()
        .map(|b| {
            let ms = |t: DateTime<Utc>| (t - history[0].at).num_milliseconds();
            (b.step, ms(b.from), ms(b.to.expect("ended")))
        })
        .collect();
    assert_eq!(spans, [(0, 1, 20), (1, 1, 30), (2, 1, 10)]);
    assert!(bars.iter().all(|b| matches!(b.outcome, Outcome::Ok)));
}
