//! A participant paused past its step timeouts (`kill -STOP`, then `kill -CONT`), with the
//! `order-saga` programs as processes on the real services: the orchestrator gives up on the
//! paused service's steps and fences them; whatever the timing, every saga ends completed or
//! compensated (or stuck with a reason), never running; no order both ships and compensates;
//! no effect applies twice; each saga's effects match its status exactly.
//!
//! These tests time processes against each other; nextest runs each alone
//! (`.config/nextest.toml`).

use std::collections::BTreeMap;
use std::time::Duration;

use saga_tests::process::Stack;
use saga_tests::wait_until;

const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];

/// Sagas per run: half started before the pause, half during it.
const SAGAS: i64 = 200;

async fn count(stack: &Stack, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

/// Runs the order saga with 500 ms step timeouts, pauses `paused` until the orchestrator
/// fences ten of the steps it runs, meanwhile kills and restarts `killed` (if any), resumes
/// it, and checks every saga.
async fn pause(paused: &str, killed: Option<&str>) {
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    let env = [("STEP_TIMEOUT_MS", "500")];
    let mut pids = BTreeMap::new();
    pids.insert("orchestrator", stack.spawn_with(&["orchestrator"], &env));
    for service in SERVICES {
        pids.insert(service, stack.spawn_with(&["service", service], &env));
    }
    let half = (SAGAS / 2).to_string();
    let start = ["start", "--count", half.as_str(), "--fail-every", "10"];
    stack.spawn_with(&start, &env);
    let finished =
        "SELECT count(*) FROM saga.instances WHERE status IN ('completed', 'compensated')";
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(&stack, finished).await >= SAGAS / 10
        })
        .await,
        "sagas were finishing before the pause"
    );
    stack.signal(pids[paused], "STOP");
    // Started during the pause, so that steps of the paused service are in flight.
    stack.spawn_with(&start, &env);
    let fences = "SELECT count(*) FROM saga.events WHERE kind = 'fence_started'";
    let fenced = wait_until(Duration::from_secs(120), || async {
        count(&stack, fences).await >= 10
    })
    .await;
    if let Some(role) = killed {
        let pid = pids[role];
        stack.signal(pid, "KILL");
        assert!(!stack.wait_exit(pid, Duration::from_secs(10)).await);
        let args: Vec<&str> = match role {
            "orchestrator" => vec!["orchestrator"],
            service => vec!["service", service],
        };
        pids.insert(role, stack.spawn_with(&args, &env));
    }
    stack.signal(pids[paused], "CONT");
    assert!(
        fenced,
        "the orchestrator fenced steps of the paused {paused} service"
    );
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(&stack, "SELECT count(*) FROM saga.instances").await == SAGAS
        })
        .await,
        "both starters started their sagas"
    );
    let waited = stack.run(&["wait", "--timeout", "300"]).await;
    let counts: serde_json::Value = serde_json::from_str(waited.trim()).unwrap();
    assert_eq!(counts["running"], 0, "{waited}");
    assert_every_saga_matches_its_effects(&stack).await;
    stack.shutdown().await;
}

/// Per saga: its effects (in the order applied) match its status exactly, none twice.
async fn assert_every_saga_matches_its_effects(stack: &Stack) {
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT i.status, i.reason, coalesce(string_agg(e.action, ',' ORDER BY e.id), '') \
         FROM saga.instances i LEFT JOIN example_effects e ON e.saga_id = i.id GROUP BY i.id",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (status, reason, effects) in &rows {
        let allowed: &[&str] = match status.as_str() {
            "completed" => &["reserve,charge,ship"],
            // Whatever applied was undone, in reverse; a step fenced before it applied needs
            // nothing. Never shipped.
            "compensated" => &["reserve,charge,refund,release", "reserve,release", ""],
            "stuck" => {
                assert!(reason.as_deref().is_some_and(|r| !r.is_empty()));
                &[]
            }
            other => panic!("a saga ended {other}"),
        };
        let actions: Vec<&str> = effects.split(',').filter(|a| !a.is_empty()).collect();
        let mut unique = actions.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), actions.len(), "an effect twice: {effects}");
        if !allowed.is_empty() {
            assert!(allowed.contains(&effects.as_str()), "{status}: {effects}");
        }
        *seen.entry((status.clone(), effects.clone())).or_default() += 1;
    }
    assert_eq!(rows.len() as i64, SAGAS);
    eprintln!("status and effects: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_paused_past_its_timeouts() {
    pause("inventory", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_paused_past_its_timeouts() {
    pause("payment", None).await;
}

/// The pivot's service: an order whose shipment timed out ships (the fence finds it applied,
/// the saga completes) or does not (fenced: refunded and released), never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_paused_past_its_timeouts() {
    pause("shipping", None).await;
}

/// The orchestrator is killed (and started again) while the payment service is paused and
/// its steps are being fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_paused_while_the_orchestrator_is_killed() {
    pause("payment", Some("orchestrator")).await;
}
