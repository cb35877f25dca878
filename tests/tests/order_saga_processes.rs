//! `order-saga` as separate OS processes on the real PostgreSQL and RabbitMQ: orchestrators and
//! participants, several copies of each, one killed with SIGKILL mid-run.

use std::collections::BTreeMap;
use std::time::Duration;

use saga_tests::process::Stack;
use saga_tests::wait_until;

const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];
const DONE: &str = r#"{"running":0,"completed":180,"compensated":20,"stuck":0}"#;

/// How many sagas show each sequence of effects, in order of id.
async fn effect_sequences(stack: &Stack) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT seq, count(*) FROM (SELECT saga_id, string_agg(action, ',' ORDER BY id) AS seq \
         FROM example_effects GROUP BY saga_id) s GROUP BY seq",
    )
    .fetch_all(&stack.pool)
    .await
    .expect("read example_effects");
    rows.into_iter().collect()
}

fn expected_sequences() -> BTreeMap<String, i64> {
    BTreeMap::from([
        ("reserve,charge,ship".to_owned(), 180),
        ("reserve,charge,refund,release".to_owned(), 20),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_orders_across_processes() {
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    // Several orchestrators and several copies of each service share the database and broker.
    for _ in 0..2 {
        stack.spawn(&["orchestrator"]);
        for service in SERVICES {
            stack.spawn(&["service", service]);
        }
    }
    assert_eq!(
        stack
            .run(&["start", "--count", "200", "--fail-every", "10"])
            .await
            .trim(),
        "started 200"
    );
    assert_eq!(stack.run(&["wait", "--timeout", "120"]).await.trim(), DONE);
    assert_eq!(stack.run(&["status"]).await.trim(), DONE);
    assert_eq!(effect_sequences(&stack).await, expected_sequences());
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_mid_run_is_replaced() {
    let mut stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    let orchestrator = stack.spawn(&["orchestrator"]);
    for service in SERVICES {
        stack.spawn(&["service", service]);
    }
    // Sagas keep starting while the orchestrator dies, so some are surely mid-run.
    let starter = stack.spawn(&["start", "--count", "200", "--fail-every", "10"]);
    let pool = stack.pool.clone();
    let progressed = wait_until(Duration::from_secs(60), || async {
        let finished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM saga.instances WHERE status IN ('completed', 'compensated')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        finished >= 20
    })
    .await;
    assert!(progressed, "sagas finished before the kill");
    stack.signal(orchestrator, "KILL");
    assert!(
        !stack.wait_exit(orchestrator, Duration::from_secs(10)).await,
        "killed, not exited"
    );
    let status = stack.run(&["status"]).await;
    assert!(
        !status.contains(r#""running":0,"#),
        "sagas were still running at the kill: {status}"
    );
    assert!(
        stack.wait_exit(starter, Duration::from_secs(60)).await,
        "all sagas were started"
    );
    stack.spawn(&["orchestrator"]);
    assert_eq!(stack.run(&["wait", "--timeout", "120"]).await.trim(), DONE);
    assert_eq!(effect_sequences(&stack).await, expected_sequences());
    stack.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_one_line_and_a_failure() {
    let program = saga_tests::process::binary("order-saga");
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 7] = [
        (
            &["bench", "--sequential"],
            &[],
            "--sequential needs an example with a parallel group; order-saga has none",
        ),
        (
            &["start", "--count", "x"],
            &[],
            "invalid value 'x' for '--count <COUNT>'",
        ),
        (&["launch"], &[], "unrecognized subcommand 'launch'"),
        (
            &["status", "--timeout", "0"],
            &[("DATABASE_URL", "postgres://app:s3cret@127.0.0.1:1/none")],
            "cannot connect to PostgreSQL at DATABASE_URL (postgres://app:***@127.0.0.1:1/none)",
        ),
        (
            &["service", "inventory"],
            &[
                ("DATABASE_URL", "postgres://postgres@127.0.0.1/postgres"),
                ("AMQP_URL", "amqp://app:s3cret@127.0.0.1:1/%2f"),
            ],
            "cannot reach RabbitMQ at AMQP_URL",
        ),
        (
            &["orchestrator"],
            &[("STEP_TIMEOUT_MS", "soon")],
            "invalid STEP_TIMEOUT_MS: expected a positive number of milliseconds, got `soon`",
        ),
        (
            &["orchestrator"],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    ];
    for (args, env, expected) in cases {
        let mut command = tokio::process::Command::new(&program);
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "off");
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} failed");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: one line, got {stderr}"
        );
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("s3cret") && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}

/// The bench's JSON line, its keys checked, in the order the issue fixed.
fn bench_line(last: &str) -> serde_json::Value {
    let keys: Vec<&str> = last.split('"').skip(1).step_by(2).collect();
    assert_eq!(
        keys,
        [
            "sagas",
            "secs",
            "sagas_per_sec",
            "steps_per_sec",
            "p50_ms",
            "p99_ms",
            "completed",
            "compensated",
            "orchestrator_rss_mb",
            "broker_msgs_per_sec"
        ]
    );
    serde_json::from_str(last).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_baseline_without_an_inbox_writes_every_effect() {
    let stack = Stack::new("order-saga").await;
    let args = "bench --count 20 --in-flight 4 --fail-every 5 --at-least-once --effects";
    let args: Vec<&str> = args.split(' ').collect();
    let (stdout, stderr) = stack.run_with(&args, &[]).await;
    let figures = bench_line(stdout.lines().last().expect("a JSON line"));
    assert_eq!(
        (figures["completed"].clone(), figures["compensated"].clone()),
        (16.into(), 4.into())
    );
    // reserve, charge, ship for each completed saga; reserve, charge, refund, release for each
    // compensated one: written to PostgreSQL, none twice (nothing is redelivered here).
    assert!(stderr.contains("effects: 64 in PostgreSQL"), "{stderr}");
}

/// `travel-saga bench` runs its parallel group (`travel` v2), and with `--sequential` the same
/// steps one after another (`travel` v1); each handler working 5 ms (`--work-ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_travel_bench_runs_its_group_and_the_same_steps_in_sequence() {
    let stack = Stack::new("travel-saga").await;
    for (shape, version) in [("", 2), (" --sequential", 1)] {
        let args = format!("bench --count 20 --in-flight 4 --fail-every 5 --work-ms 5{shape}");
        let args: Vec<&str> = args.split(' ').collect();
        let (stdout, stderr) = stack.run_with(&args, &[]).await;
        let ran = format!("definition: travel v{version}, work 5 ms a command");
        assert!(stderr.contains(&ran), "{args:?}: {stderr}");
        let figures = bench_line(stdout.lines().last().expect("a JSON line"));
        assert_eq!(
            (figures["completed"].clone(), figures["compensated"].clone()),
            (16.into(), 4.into()),
            "{args:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_checks_every_outcome_and_prints_its_figures() {
    let stack = Stack::new("order-saga").await;
    let (stdout, stderr) = stack
        .run_with(
            &[
                "bench",
                "--count",
                "40",
                "--in-flight",
                "8",
                "--fail-every",
                "5",
                "--history",
                "100",
            ],
            &[],
        )
        .await;
    assert!(
        stderr.contains("history: 101 sagas, 808 events in the log"),
        "{stderr}"
    );
    // Where the CPU time went, per saga: the bench process, and each service this machine
    // runs (visible in `/proc`).
    let cpu = stderr
        .lines()
        .find(|l| l.starts_with("cpu a saga: this process "))
        .unwrap_or_else(|| panic!("no CPU line: {stderr}"));
    let here = saga_examples::cpu::CpuTimes::now();
    for (part, local) in [
        ("RabbitMQ ", here.broker.is_some()),
        ("PostgreSQL ", here.database.is_some()),
    ] {
        assert_eq!(cpu.contains(part), local, "{cpu}");
    }
    let last = stdout.lines().last().expect("a JSON line");
    let figures = bench_line(last);
    assert_eq!(figures["sagas"], 40);
    assert_eq!(figures["completed"], 32);
    assert_eq!(figures["compensated"], 8);
    for key in ["sagas_per_sec", "p50_ms", "broker_msgs_per_sec"] {
        assert!(figures[key].as_f64().unwrap() > 0.0, "{key}: {last}");
    }
    // Its schema and queues are gone.
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bench\\_%'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_with_remote_starts_checks_every_outcome() {
    let stack = Stack::new("order-saga").await;
    let stdout = stack
        .run(&[
            "bench",
            "--count",
            "20",
            "--in-flight",
            "4",
            "--fail-every",
            "4",
            "--remote-starts",
        ])
        .await;
    let last = stdout.lines().last().expect("a JSON line");
    let figures: serde_json::Value = serde_json::from_str(last).expect("JSON");
    assert_eq!(figures["sagas"], 20, "{last}");
    assert_eq!(figures["completed"], 15, "{last}");
    assert_eq!(figures["compensated"], 5, "{last}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_of_processes_checks_every_outcome_and_stops_its_programs() {
    let stack = Stack::new("order-saga").await;
    let (stdout, stderr) = stack
        .run_with(
            &[
                "bench",
                "--processes",
                "--count",
                "30",
                "--in-flight",
                "6",
                "--fail-every",
                "5",
                "--orchestrators",
                "2",
            ],
            &[],
        )
        .await;
    let last = stdout.lines().last().expect("a JSON line");
    // The same line as `bench` (whose checks include that no effect was applied twice,
    // whichever of the two orchestrators handled a saga).
    let figures = bench_line(last);
    assert_eq!(figures["sagas"], 30);
    assert_eq!(figures["completed"], 24);
    assert_eq!(figures["compensated"], 6);
    for key in ["sagas_per_sec", "p50_ms", "orchestrator_rss_mb"] {
        assert!(figures[key].as_f64().unwrap() > 0.0, "{key}: {last}");
    }
    // It ran two orchestrators and the three services as processes, and stopped them all.
    let started = stderr
        .lines()
        .find_map(|l| l.strip_prefix("processes: "))
        .unwrap_or_else(|| panic!("no processes line: {stderr}"));
    let parts: Vec<&str> = started.split(", ").collect();
    assert_eq!(parts.len(), 5, "{started}");
    assert_eq!(
        parts
            .iter()
            .filter(|p| p.starts_with("orchestrator "))
            .count(),
        2,
        "{started}"
    );
    for part in parts {
        let pid = part.rsplit(' ').next().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("order-saga"),
            "`{part}` still runs"
        );
    }
    assert!(stderr.contains("the programs "), "{stderr}");
    // Its database is gone.
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'bench\\_%'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_shows_its_progress_on_a_terminal_and_nothing_when_piped() {
    let stack = Stack::new("order-saga").await;
    stack.run(&["migrate"]).await;
    // Piped: stdout says what was done, stderr holds no bar.
    let (stdout, stderr) = stack.run_with(&["start", "--count", "300"], &[]).await;
    assert_eq!(stdout.trim(), "started 300");
    assert!(!stderr.contains("/300"), "no bar when piped: {stderr}");
    // At a terminal: the bar is drawn (and cleared), then the same line.
    let shown = stack.run_on_terminal(&["start", "--count", "300"]).await;
    assert!(
        shown.contains("started") && shown.contains("/300"),
        "a bar on a terminal: {shown:?}"
    );
    assert!(shown.trim_end().ends_with("started 300"), "{shown:?}");
    stack.shutdown().await;
}

/// A trip started under `travel` v1 (its steps one after another) before the orchestrator
/// that runs v2 starts still ends under v1; a new trip runs v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trips_started_under_the_version_before_the_group_end_under_it() {
    use saga_examples::Example as _;
    use saga_examples::travel::TravelSaga;

    let mut stack = Stack::new("travel-saga").await;
    stack.run(&["migrate"]).await;
    let store = saga_core::PgStore::builder(stack.pool.clone())
        .build()
        .unwrap();
    let client = saga_core::Client::new(std::sync::Arc::new(store));
    let v1 = TravelSaga::previous().remove(0);
    assert_eq!((v1.name(), v1.version()), ("travel", 1));
    let old = client
        .start(&v1, &TravelSaga::input(1, false))
        .await
        .unwrap();
    stack.spawn(&["orchestrator"]);
    for service in ["flights", "hotels", "cars", "booking"] {
        stack.spawn(&["service", service]);
    }
    let new = client
        .start(&TravelSaga::definition(), &TravelSaga::input(2, false))
        .await
        .unwrap();
    for (started, version) in [(old, 1), (new, 2)] {
        let outcome = client
            .outcome(started.saga_id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            outcome.status,
            saga_core::SagaStatus::Completed,
            "v{version}"
        );
    }
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM saga.instances ORDER BY version")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(versions, [1, 2]);
    stack.shutdown().await;
}
