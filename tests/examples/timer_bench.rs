//! 100,000 sagas waiting on durable timers: the orchestrator's resident memory while they
//! wait, then timers fired per second and the lateness of a due timer once they come due
//! (due times spread over a window).
//!
//! `cargo run --release -p saga-tests --example timer_bench [-- COUNT WINDOW_SECS]`, with
//! `DATABASE_URL`. Uses a schema of its own and drops it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_core::orchestrator::OrchestratorConfig;
use saga_core::{InProcessTransport, Orchestrator, PgStore, SagaDefinition};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: i64 = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let window: f64 = args.next().map_or(Ok(10.0), |a| a.parse())?;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| saga_tests::DEFAULT_DATABASE_URL.to_owned());
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await?;
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let store = Arc::new(PgStore::builder(pool.clone()).schema(&schema).build()?);
    store.migrate().await?;
    let def = SagaDefinition::<u64>::builder("waiter", 1)
        .step("wait", |s| s.delay(Duration::from_secs(3600)))
        .build()?;

    // 100,000 sagas, each started and waiting on its delay timer, due over `window` seconds
    // starting 15 s from now (time for the orchestrator to settle and be measured idle).
    let setup = Instant::now();
    let s = format!("\"{schema}\"");
    // One connection, so the temporary table is visible to every statement.
    let mut conn = pool.acquire().await?;
    sqlx::query(
        "CREATE TEMP TABLE waiters AS SELECT gen_random_uuid() AS id, \
         now() + interval '15 seconds' + (i * $2 / $1) * interval '1 second' AS due FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(count)
    .bind(window)
    .execute(&mut *conn)
    .await?;
    let steps = [
        format!(
            "INSERT INTO {s}.instances (id, saga, version, status, last_seq, created_at, updated_at) \
                 SELECT id, 'waiter', 1, 'running', 2, now(), now() FROM waiters"
        ),
        format!(
            "INSERT INTO {s}.events (saga_id, seq, kind, data, recorded_at) \
                 SELECT id, 1, 'started', jsonb_build_object('type', 'started', 'saga', 'waiter', 'version', 1, 'input', 0, 'business_key', null), now() FROM waiters"
        ),
        format!(
            "INSERT INTO {s}.events (saga_id, seq, kind, data, recorded_at) \
                 SELECT id, 2, 'waiting', jsonb_build_object('type', 'waiting', 'step', 0, 'signal', null, 'until', to_jsonb(due)), now() FROM waiters"
        ),
        format!(
            "INSERT INTO {s}.timers (saga_id, key, timer, set_at, due_at) \
                 SELECT id, 'delay:0', '{{\"kind\":\"delay\",\"step\":0}}'::jsonb, now(), due FROM waiters"
        ),
        "ANALYZE".to_owned(),
    ];
    for sql in steps {
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await?;
    }
    drop(conn);
    eprintln!("set up {count} waiting sagas in {:.1?}", setup.elapsed());

    let rss_before = rss_mb();
    let shutdown = CancellationToken::new();
    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(InProcessTransport::new()))
        .register(&def)
        .config(OrchestratorConfig {
            batch_size: 256,
            ..OrchestratorConfig::default()
        })
        .build();
    let running = tokio::spawn(orchestrator.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_waiting = rss_mb();

    let remaining = format!("SELECT count(*) FROM {s}.timers WHERE fired_at IS NULL");
    loop {
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(remaining.clone()))
            .fetch_one(&pool)
            .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_after = rss_mb();
    let (secs, p50, p99, max): (f64, f64, f64, f64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT extract(epoch FROM max(fired_at) - min(due_at))::float8, \
         (percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM fired_at - due_at)) * 1000)::float8, \
         (percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM fired_at - due_at)) * 1000)::float8, \
         (max(extract(epoch FROM fired_at - due_at)) * 1000)::float8 FROM {s}.timers"
    )))
    .fetch_one(&pool)
    .await?;
    let completed: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {s}.instances WHERE status = 'completed'"
    )))
    .fetch_one(&pool)
    .await?;
    shutdown.cancel();
    running.await??;
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {s} CASCADE")))
        .execute(&pool)
        .await?;
    assert_eq!(completed, count, "every waiting saga completed");
    println!(
        "{{\"timers\":{count},\"window_secs\":{window},\"fired_per_sec\":{:.0},\"lateness_p50_ms\":{p50:.1},\"lateness_p99_ms\":{p99:.1},\"lateness_max_ms\":{max:.1},\"rss_mb_before\":{rss_before:.1},\"rss_mb_waiting\":{rss_waiting:.1},\"rss_mb_after\":{rss_after:.1}}}",
        count as f64 / secs
    );
    Ok(())
}
