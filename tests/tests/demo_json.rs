//! `demo --json` of every example program: one JSON line per saga with exactly the keys
//! scripts read, and events that tell the saga's story.

use std::collections::BTreeSet;

use saga_tests::process::binary;
use serde_json::Value;

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect()
}

#[test]
fn every_example_prints_one_json_line_per_saga() {
    for program in ["order-saga", "payment-saga", "travel-saga", "expense-saga"] {
        let out = std::process::Command::new(binary(program))
            .args(["demo", "--count", "4", "--fail-every", "2", "--json"])
            .env("RUST_LOG", "warn")
            .output()
            .expect("the demo runs");
        assert!(out.status.success(), "{program}: {out:?}");
        let text = String::from_utf8(out.stdout).expect("UTF-8");
        let sagas: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{program}: {e}: {l}")))
            .collect();
        assert_eq!(sagas.len(), 4, "{program}: {text}");
        for (n, saga) in sagas.iter().enumerate() {
            assert_eq!(
                keys(saga),
                BTreeSet::from(["saga_id", "name", "status", "events"]),
                "{program}"
            );
            // Every second saga is made to fail, and compensates.
            let expected = if n % 2 == 1 {
                "compensated"
            } else {
                "completed"
            };
            assert_eq!(saga["status"], expected, "{program}: {saga}");
            let events = saga["events"].as_array().expect("events");
            let mut last = 0.0;
            for event in events {
                assert_eq!(
                    keys(event),
                    BTreeSet::from(["t_ms", "step", "direction", "kind", "attempt"]),
                    "{program}: {event}"
                );
                let t = event["t_ms"].as_f64().expect("t_ms is a number");
                assert!(t >= last, "{program}: events in order: {saga}");
                last = t;
                assert!(
                    ["forward", "compensation"].contains(&event["direction"].as_str().unwrap()),
                    "{program}: {event}"
                );
                assert!(
                    event["attempt"].is_u64() && event["step"].is_string(),
                    "{event}"
                );
            }
            let kinds: Vec<(&str, &str)> = events
                .iter()
                .map(|e| {
                    (
                        e["direction"].as_str().unwrap(),
                        e["kind"].as_str().unwrap(),
                    )
                })
                .collect();
            let compensated = kinds.contains(&("compensation", "succeeded"));
            assert_eq!(compensated, n % 2 == 1, "{program}: {saga}");
            assert!(
                kinds.contains(&("forward", "succeeded")),
                "{program}: {saga}"
            );
        }
    }
}

/// The travel saga's text timeline names its parallel group, and its members are all sent
/// before any answers.
#[test]
fn the_travel_timeline_shows_its_group_sent_together() {
    let out = std::process::Command::new(binary("travel-saga"))
        .args(["demo", "--count", "1"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("the demo runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        text.contains("started; group book: flight, hotel, car"),
        "{text}"
    );
    let lines: Vec<&str> = text.lines().collect();
    let sent = |what: &str| lines.iter().position(|l| l.contains(what)).expect(what);
    let first_answer = lines
        .iter()
        .position(|l| l.contains(">> ok"))
        .expect("an answer");
    for command in ["flights.book_flight", "hotels.book_hotel", "cars.rent_car"] {
        assert!(sent(command) < first_answer, "{command} sent late: {text}");
    }
}
