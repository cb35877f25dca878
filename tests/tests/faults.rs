//! The fault suite (CI-sized): `order-saga` (and `travel-saga`, whose parallel group books
//! three things at once) as processes on the real services while processes are killed,
//! database sessions are terminated, the saga tables are locked, the broker raises a memory
//! alarm, and bad messages are injected. Invariants are checked in SQL afterwards.
//!
//! These tests disturb shared services; nextest runs each alone (`.config/nextest.toml`).

use std::time::Duration;

use tokio::io::AsyncBufReadExt as _;

use saga_core::message::headers;
use saga_core::{Destination, Envelope, Message, Reply, Transport};
use saga_tests::amqp::{WatermarkGuard, drain_dead_letters, rabbitmqctl};
use saga_tests::browser::http;
use saga_tests::console::Console;
use saga_tests::invariants::{
    assert_all_ended, assert_invariants, assert_travel_invariants, assert_waited, finished,
};
use saga_tests::process::Stack;
use saga_tests::wait_until;

const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];

/// One orchestrator and each service, `count` sagas starting (in the background, so the run is
/// surely under way when the fault comes), a tenth of them finished.
async fn running(count: i64) -> Stack {
    // `shutdown` checks later that the starter exited cleanly too.
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    stack.spawn(&["orchestrator"]);
    for service in SERVICES {
        stack.spawn(&["service", service]);
    }
    stack.spawn(&["start", "--count", &count.to_string(), "--fail-every", "10"]);
    let progressed = wait_until(Duration::from_secs(60), || async {
        finished(&stack).await >= count / 10
    })
    .await;
    assert!(progressed, "sagas were finishing before the fault");
    stack
}

/// Sagas in the kill run: 1,000, or `SAGA_SOAK_SAGAS` for a longer soak (kills scale with it).
fn soak_sagas() -> i64 {
    std::env::var("SAGA_SOAK_SAGAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// A small deterministic generator, so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

fn bad_messages(stack: &Stack) -> Vec<Envelope> {
    let _ = stack;
    let raw = |destination: Destination, body: &[u8], extra: &[(&str, &str)]| Envelope {
        destination,
        message: Message {
            id: uuid::Uuid::new_v4(),
            headers: extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.to_vec(),
        },
    };
    let forged = Reply {
        saga_id: uuid::Uuid::new_v4(),
        step: 0,
        direction: saga_core::Direction::Forward,
        attempt: 1,
        command_id: uuid::Uuid::new_v4(),
        outcome: saga_core::Outcome::Success {
            output: serde_json::json!("forged"),
        },
    };
    vec![
        raw(Destination::Results, b"{not json", &[]),
        raw(
            Destination::Results,
            b"{}",
            &[(headers::SCHEMA_VERSION, "99")],
        ),
        forged.to_envelope(),
        raw(Destination::Service("payment".into()), b"[1,2,3]", &[]),
        raw(
            Destination::Service("shipping".into()),
            &vec![b' '; 2 << 20],
            &[],
        ),
    ]
}

/// Kills a random one of `roles` (its arguments and PID) every 250 ms with SIGKILL and starts
/// it again, `max_kills` times or until 95% of `sagas` finished; at least 4 kills, so the
/// faults surely came mid-run. Returns how many.
async fn kill_at_random(
    stack: &mut Stack,
    roles: &mut [(Vec<&str>, u32)],
    seed: u64,
    max_kills: i64,
    sagas: i64,
) -> i64 {
    let mut rng = Lcg(seed);
    let mut kills = 0;
    while kills < max_kills && finished(stack).await < sagas * 95 / 100 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let i = rng.next(roles.len());
        let (args, pid) = roles[i].clone();
        stack.signal(pid, "KILL");
        assert!(!stack.wait_exit(pid, Duration::from_secs(10)).await);
        roles[i].1 = stack.spawn(&args);
        kills += 1;
    }
    assert!(kills >= 4, "faults were injected mid-run ({kills} kills)");
    kills
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_bad_messages_lose_nothing_and_double_nothing() {
    let sagas = soak_sagas();
    let max_kills = 16 * sagas / 1000;
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    let mut roles: Vec<(Vec<&str>, u32)> = Vec::new();
    for _ in 0..2 {
        roles.push((vec!["orchestrator"], stack.spawn(&["orchestrator"])));
        for service in SERVICES {
            roles.push((vec!["service", service], stack.spawn(&["service", service])));
        }
    }
    // Sagas start while the faults happen.
    let count = sagas.to_string();
    let starter = stack.spawn(&["start", "--count", &count, "--fail-every", "10"]);
    let probe = saga_amqp::AmqpTransport::connect(stack.broker_config())
        .await
        .unwrap();
    // Each bad message is sent once its queue exists (the processes declare them as they start).
    let bad = bad_messages(&stack);
    for message in bad.iter().cloned() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while let Err(e) = probe.publish(vec![message.clone()]).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?} is still unroutable: {e}",
                message.destination
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // SIGKILL a random process every 250 ms, and start it again, 16 times.
    let kills = kill_at_random(&mut stack, &mut roles, 0x5eed, max_kills, sagas).await;
    assert!(
        stack.wait_exit(starter, Duration::from_secs(120)).await,
        "all 1000 sagas were started"
    );
    assert_all_ended(&stack, &[], 1800, sagas, 10).await;

    // Every bad message is in a dead-letter queue, with its reason. Dead-lettering is
    // at least once: a process killed after the copy and before its ack copies the message
    // again when it is redelivered, so copies are counted by the original's message id.
    let sent: Vec<uuid::Uuid> = bad.iter().map(|e| e.message.id).collect();
    let mut copies = 0;
    let mut reasons = std::collections::BTreeMap::new();
    for (source, expected) in [
        (Destination::Results, 3),
        (Destination::Service("payment".into()), 1),
        (Destination::Service("shipping".into()), 1),
    ] {
        let letters = drain_dead_letters(&probe, &source, expected, Duration::from_secs(10)).await;
        copies += letters.len();
        for (message, reason) in letters {
            assert!(
                sent.contains(&message.id),
                "a dead letter that is none of the bad messages: {reason}"
            );
            reasons.insert(message.id, reason);
        }
    }
    assert!(
        copies <= sent.len() + kills as usize,
        "{copies} dead letters for {} bad messages and {kills} kills",
        sent.len()
    );
    let reasons: Vec<String> = reasons.into_values().collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    for expected in [
        "invalid command",
        "invalid result",
        "message of",
        "unknown saga",
        "unsupported schema version 99",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(expected)),
            "no `{expected}` in {reasons:?}"
        );
    }
    stack.shutdown().await;
}

/// `travel-saga` as processes (two of each), a random one killed every 250 ms and started
/// again: every trip ends as it must, with exactly its effects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_during_parallel_groups_lose_nothing_and_double_nothing() {
    let sagas = 400;
    let mut stack = Stack::new("travel-saga").await;
    stack.run(&["migrate"]).await;
    let mut roles: Vec<(Vec<&str>, u32)> = Vec::new();
    for _ in 0..2 {
        roles.push((vec!["orchestrator"], stack.spawn(&["orchestrator"])));
        for service in ["flights", "hotels", "cars", "booking"] {
            roles.push((vec!["service", service], stack.spawn(&["service", service])));
        }
    }
    let count = sagas.to_string();
    let starter = stack.spawn(&["start", "--count", &count, "--fail-every", "10"]);
    kill_at_random(&mut stack, &mut roles, 0x7a1e, 10, sagas).await;
    assert!(
        stack.wait_exit(starter, Duration::from_secs(120)).await,
        "all trips were started"
    );
    assert_waited(&stack, &[], 900, sagas, 10).await;
    assert_travel_invariants(&stack, sagas, 10).await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_sessions_and_a_long_lock_are_ridden_out() {
    let stack = running(400).await;
    // Every session of the test database but ours is terminated, twice.
    for _ in 0..2 {
        let terminated: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
        )
        .fetch_one(&stack.pool)
        .await
        .unwrap();
        assert!(terminated > 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A long lock on the saga tables: everything waits, then goes on.
    let mut tx = stack.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE saga.instances, saga.events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    // Counted inside the locking transaction: any other session would wait for the lock.
    let during: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga.instances WHERE status IN ('completed', 'compensated')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.rollback().await.unwrap();
    assert!(during < 400, "the lock was taken mid-run");
    assert_all_ended(&stack, &[], 180, 400, 10).await;
    stack.shutdown().await;
    // No leaked sessions: with every process stopped, only the test's own pool remains.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishers_until_cleared() {
    let stack = running(300).await;
    {
        let _guard = WatermarkGuard;
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let blocked = finished(&stack).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            finished(&stack).await - blocked <= 2,
            "publishers are blocked while the alarm lasts"
        );
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    }
    assert_all_ended(&stack, &[], 180, 300, 10).await;
    stack.shutdown().await;
}

/// Starts PostgreSQL again when dropped, so a failing test leaves it running.
struct PostgresGuard;

impl Drop for PostgresGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", "15", "main", "start"])
            .output();
    }
}

async fn pg_ctl(args: &[&str]) {
    let output = tokio::process::Command::new("pg_ctlcluster")
        .arg("--skip-systemctl-redirect")
        .args(args)
        .output()
        .await
        .expect("run pg_ctlcluster (these tests need PostgreSQL 15's cluster tools, as root)");
    assert!(
        output.status.success(),
        "pg_ctlcluster {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_fast_and_immediate_are_ridden_out() {
    let stack = running(300).await;
    let _guard = PostgresGuard;
    // An operator's `wait`, already polling when the database restarts, rides it out too.
    let waiting = tokio::spawn(
        tokio::process::Command::new(saga_tests::process::binary("order-saga"))
            .args(["wait", "--timeout", "180"])
            .env("DATABASE_URL", &stack.database_url)
            .env("AMQP_URL", stack.broker_config().url)
            .kill_on_drop(true)
            .output(),
    );
    let polling = wait_until(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'order-saga client'",
        )
        .fetch_one(&stack.pool)
        .await
        .is_ok_and(|n| n > 0)
    })
    .await;
    assert!(polling, "`wait` connected");
    // The web console, serving before the restarts.
    let console = Console::start_on(&stack.database_url, "saga", "127.0.0.1:0", &[], &[]).await;
    let api = |path: &'static str| {
        let addr = console.addr.clone();
        async move { http(&addr, "GET", path, &[], b"").await.status }
    };
    assert_eq!(api("/api/sagas").await, 200);
    for mode in ["fast", "immediate"] {
        pg_ctl(&["15", "main", "restart", "-m", mode]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // ... serves again once the database is back.
    let serving = wait_until(Duration::from_secs(30), || async {
        api("/api/sagas").await == 200 && api("/").await == 200
    })
    .await;
    assert!(serving, "the console serves again after the restarts");
    drop(console);
    // `saga list` and `order-saga status`, started while the database is down, wait for it.
    pg_ctl(&["15", "main", "stop", "-m", "immediate"]).await;
    let started_while_down = |program: &str, args: &[&str]| {
        let mut child = tokio::process::Command::new(saga_tests::process::binary(program))
            .args(args)
            .env("DATABASE_URL", &stack.database_url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        (child, stderr)
    };
    let (listing, mut list_said) =
        started_while_down("saga", &["list", "--json", "--reconnect-for", "120s"]);
    let (counting, mut status_said) =
        started_while_down("order-saga", &["status", "--timeout", "120"]);
    let mut first_lines = Vec::new();
    for said in [&mut list_said, &mut status_said] {
        let line = tokio::time::timeout(Duration::from_secs(30), said.next_line()).await;
        first_lines.push(format!("{line:?}"));
    }
    // The shared cluster runs again before anything is asserted.
    pg_ctl(&["15", "main", "start"]).await;
    for said in &first_lines {
        assert!(said.contains("out of reach"), "{said}");
    }
    let listed = listing.wait_with_output().await.unwrap();
    assert!(
        listed.status.success(),
        "`saga list` failed after the restart"
    );
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(!listed.is_empty());
    let counted = counting.wait_with_output().await.unwrap();
    assert!(
        counted.status.success(),
        "`order-saga status` failed after the restart"
    );
    let counts: serde_json::Value = serde_json::from_slice(&counted.stdout).unwrap();
    assert!(counts["running"].is_u64(), "{counts}");
    let waited = waiting.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&waited.stdout);
    assert!(
        waited.status.success(),
        "`wait` failed: {stdout}{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert_eq!(
        stdout.trim(),
        r#"{"running":0,"completed":270,"compensated":30,"stuck":0}"#
    );
    assert_invariants(&stack, 300, 10).await;
    stack.shutdown().await;
}
