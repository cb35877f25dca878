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
    assert_invariants(stack, sagas, fail_every).await;
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
