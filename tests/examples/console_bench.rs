//! The web console's server times: the page of a saga with 1,000 events, and the overview and
//! lists with a million finished sagas in the log. Prints one JSON line of medians and 95th
//! percentiles in milliseconds, measured from a client on loopback (the database's time
//! included).
//!
//! `cargo build --release -p saga-cli && cargo run --release -p saga-tests --example
//! console_bench [-- FINISHED_SAGAS]`, with `DATABASE_URL`. Uses a schema of its own and
//! drops it.

use std::time::Instant;

use saga_tests::browser::http;
use saga_tests::console::Console;
use serde_json::json;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

/// Requests per address.
const RUNS: usize = 30;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let finished: i64 = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |a| a.parse())?;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| saga_tests::DEFAULT_DATABASE_URL.to_owned());
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let store = saga_core::PgStore::builder(pool.clone())
        .schema(&schema)
        .build()?;
    store.migrate().await?;
    let run = |sql: String| {
        let pool = pool.clone();
        async move { sqlx::query(AssertSqlSafe(sql)).execute(&pool).await }
    };

    // A million finished sagas over 30 days, three names, one in 20 compensated.
    let started = Instant::now();
    run(format!(
        "INSERT INTO {schema}.instances (id, saga, version, status, business_key, reason, last_seq, \
         created_at, updated_at, finished_at) \
         SELECT gen_random_uuid(), (ARRAY['order','payment','travel'])[1 + i % 3], 1, \
         CASE WHEN i % 20 = 0 THEN 'compensated' ELSE 'completed' END, 'key-' || i, NULL, 9, \
         now() - (i * interval '30 days' / {finished}), now() - (i * interval '30 days' / {finished}), \
         now() - (i * interval '30 days' / {finished}) \
         FROM generate_series(1, {finished}) AS i"
    ))
    .await?;
    run(format!("ANALYZE {schema}.instances")).await?;
    let seeded_s = started.elapsed().as_secs_f64();

    // One stuck saga with 1,000 events: 333 attempts that failed, each retried, and a stuck.
    let id = uuid::Uuid::now_v7();
    run(format!(
        "INSERT INTO {schema}.instances (id, saga, version, status, business_key, reason, last_seq, \
         created_at, updated_at) VALUES ('{id}', 'order', 1, 'stuck', 'long-one', \
         'step `charge` failed 333 times', 1000, now() - interval '1 hour', now())"
    ))
    .await?;
    run(format!(
        "INSERT INTO {schema}.events (saga_id, seq, kind, data, recorded_at) \
         SELECT '{id}'::uuid, 1, 'started', jsonb_build_object('type','started','saga','order','version',1, \
           'input', jsonb_build_object('order_id', 42, 'items', jsonb_build_array('a','b')), \
           'business_key','long-one','steps', jsonb_build_array('reserve','charge','ship')), \
           now() - interval '1 hour' \
         UNION ALL \
         SELECT '{id}'::uuid, 2 + (a - 1) * 3 + k, \
           (ARRAY['dispatched','failed','retry_scheduled'])[k + 1], \
           CASE k \
             WHEN 0 THEN jsonb_build_object('type','dispatched','step',1,'direction','forward','attempt',a, \
               'command_id', gen_random_uuid(), 'payload', jsonb_build_object('amount', 10), \
               'service','payment','command','charge') \
             WHEN 1 THEN jsonb_build_object('type','failed','step',1,'direction','forward','attempt',a, \
               'error','gateway busy','retryable', true) \
             ELSE jsonb_build_object('type','retry_scheduled','step',1,'direction','forward', \
               'attempt', a + 1, 'delay_ms', 100, 'due_at', now()) \
           END, \
           now() - interval '1 hour' + ((a - 1) * 3 + k) * interval '10 ms' \
         FROM generate_series(1, 333) AS a, generate_series(0, 2) AS k"
    ))
    .await?;
    run(format!(
        "INSERT INTO {schema}.events (saga_id, seq, kind, data, recorded_at) VALUES \
         ('{id}', 1001, 'stuck', '{{\"type\":\"stuck\",\"step\":1,\"direction\":\"forward\",\
         \"reason\":\"step `charge` failed 333 times\"}}', now())"
    ))
    .await?;

    let console = Console::start(&schema, "127.0.0.1:0", &[], &[]).await;
    let mut figures = serde_json::Map::new();
    for (name, path) in [
        ("saga_page_1000_events", format!("/sagas/{id}")),
        ("saga_api_1000_events", format!("/api/sagas/{id}")),
        ("overview", "/".to_owned()),
        ("list_newest", "/sagas".to_owned()),
        ("list_page_100", "/sagas?page=100".to_owned()),
        (
            "list_status_compensated",
            "/sagas?status=compensated".to_owned(),
        ),
        ("list_status_stuck", "/sagas?status=stuck".to_owned()),
        ("list_name_travel", "/sagas?name=travel".to_owned()),
        ("list_key", format!("/sagas?key=key-{}", finished / 2)),
        ("api_list", "/api/sagas?limit=500".to_owned()),
    ] {
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let at = Instant::now();
            let response = http(&console.addr, "GET", &path, &[], b"").await;
            times.push(at.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(response.status, 200, "{path}: {}", response.text());
        }
        times.sort_by(f64::total_cmp);
        figures.insert(
            name.to_owned(),
            json!({
                "p50_ms": round(times[RUNS / 2]),
                "p95_ms": round(times[RUNS * 95 / 100]),
            }),
        );
    }
    drop(console);
    run(format!("DROP SCHEMA {schema} CASCADE")).await?;
    println!(
        "{}",
        json!({ "finished_sagas": finished, "seeded_s": round(seeded_s), "requests": figures })
    );
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
