//! Checks of an order-saga run's outcome, in SQL: effects exactly as each saga's end requires.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::process::Stack;
use crate::wait_until;

/// `order-saga wait` (with the extra environment `env`, within `timeout_secs`) sees every saga
/// ended: every `fail_every`-th compensated, the rest completed, none stuck; and their effects
/// are exactly what [`assert_invariants`] requires.
pub async fn assert_all_ended(
    stack: &Stack,
    env: &[(&str, &str)],
    timeout_secs: u64,
    sagas: i64,
    fail_every: i64,
) {
    assert_waited(stack, env, timeout_secs, sagas, fail_every).await;
    assert_invariants(stack, sagas, fail_every).await;
}

/// The program's `wait` sees every saga ended: every `fail_every`-th compensated, the rest
/// completed, none stuck.
pub async fn assert_waited(
    stack: &Stack,
    env: &[(&str, &str)],
    timeout_secs: u64,
    sagas: i64,
    fail_every: i64,
) {
    let timeout = timeout_secs.to_string();
    let (waited, _) = stack.run_with(&["wait", "--timeout", &timeout], env).await;
    assert_eq!(
        waited.trim(),
        format!(
            r#"{{"running":0,"completed":{},"compensated":{},"stuck":0}}"#,
            sagas - sagas / fail_every,
            sagas / fail_every
        )
    );
}

/// Every trip of a `travel-saga` run has exactly the effects its end requires: a completed
/// one booked flight, hotel and car (in any order, the group runs them together) and then
/// confirmed; a compensated one rented no car, confirmed nothing, and cancelled exactly what
/// it booked, after booking it. Nothing happened twice.
pub async fn assert_travel_invariants(stack: &Stack, sagas: i64, fail_every: i64) {
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT i.status, array_agg(e.action ORDER BY e.id) FROM saga.instances i \
         JOIN example_effects e ON e.saga_id = i.id GROUP BY i.id, i.status",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let (mut completed, mut compensated) = (0, 0);
    for (status, actions) in rows {
        let count = |a: &str| actions.iter().filter(|x| *x == a).count();
        let at = |a: &str| actions.iter().position(|x| x == a);
        for action in actions.iter() {
            assert_eq!(count(action), 1, "{action} twice: {actions:?}");
        }
        match status.as_str() {
            "completed" => {
                completed += 1;
                assert_eq!(actions.len(), 4, "{actions:?}");
                let mut booked = actions[..3].to_vec();
                booked.sort();
                assert_eq!(
                    booked,
                    ["book_flight", "book_hotel", "rent_car"],
                    "{actions:?}"
                );
                assert_eq!(actions[3..], ["confirm"], "{actions:?}");
            }
            "compensated" => {
                compensated += 1;
                assert_eq!(
                    count("rent_car") + count("confirm") + count("cancel_car"),
                    0,
                    "{actions:?}"
                );
                for (book, cancel) in [
                    ("book_flight", "cancel_flight"),
                    ("book_hotel", "cancel_hotel"),
                ] {
                    assert_eq!(count(book), count(cancel), "{actions:?}");
                    assert!(
                        at(cancel) >= at(book),
                        "{cancel} before {book}: {actions:?}"
                    );
                }
            }
            other => panic!("a trip ended {other}: {actions:?}"),
        }
    }
    assert_eq!(
        completed,
        sagas - sagas / fail_every,
        "completed trips with effects"
    );
    // A compensated trip whose flight and hotel were fenced before they ran has no effect;
    // the others undid what they booked.
    assert!(compensated <= sagas / fail_every);
    assert!(compensated > 0, "no compensated trip had booked anything");
    assert_outbox_drained(stack).await;
}

/// Every saga has exactly the effects its outcome requires, in order, none twice.
pub async fn assert_invariants(stack: &Stack, sagas: i64, fail_every: i64) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT seq, count(*) FROM (SELECT saga_id, string_agg(action, ',' ORDER BY id) AS seq \
         FROM example_effects GROUP BY saga_id) s GROUP BY seq",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let sequences: BTreeMap<String, i64> = rows.into_iter().collect();
    assert_eq!(
        sequences,
        BTreeMap::from([
            ("reserve,charge,ship".to_owned(), sagas - sagas / fail_every),
            (
                "reserve,charge,refund,release".to_owned(),
                sagas / fail_every
            ),
        ])
    );
    assert_outbox_drained(stack).await;
}

/// The outbox empties.
pub async fn assert_outbox_drained(stack: &Stack) {
    // Rows whose deletion a database crash undid are published again (and dropped by the
    // verdicts) once their lease runs out: the outbox drains, if not at once.
    let outbox = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM saga.outbox")
            .fetch_one(&stack.pool)
            .await
            .unwrap()
    };
    let drained = wait_until(Duration::from_secs(30), || async { outbox().await == 0 }).await;
    assert!(
        drained,
        "the outbox is drained: {} rows left",
        outbox().await
    );
}

/// Sagas completed or compensated.
pub async fn finished(stack: &Stack) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM saga.instances WHERE status IN ('completed', 'compensated')",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}
