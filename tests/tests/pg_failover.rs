//! A PostgreSQL primary with a synchronous streaming standby, both of the test's own (`initdb`
//! and `pg_basebackup` into temporary directories, other ports; the shared cluster is left
//! alone), and `order-saga` as processes given both hosts in `DATABASE_URL` with
//! `target_session_attrs=read-write`. A thousand sagas run while the primary is stopped
//! immediately and the standby promoted: every saga finishes with exactly the effects it
//! requires, nothing lost and nothing twice. And a pool on both hosts: it opens sessions on
//! the primary only, and leaves none on a host that stopped suiting.
//!
//! Two servers and four programs take the machine: nextest runs this alone
//! (`.config/nextest.toml`).

use std::time::Duration;

use futures_util::StreamExt;
use saga_core::{OutboxStore, PgHosts, PgStore};
use saga_tests::invariants::{assert_all_ended, finished};
use saga_tests::pg_node::PgServer;
use saga_tests::process::Stack;
use saga_tests::wait_until;
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;

const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];
const SAGAS: i64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_finish_while_the_primary_fails_over_to_its_synchronous_standby() {
    let mut primary = PgServer::primary();
    let standby = PgServer::standby_of(&primary);
    let streaming = wait_until(Duration::from_secs(60), || async {
        primary.streams_synchronously()
    })
    .await;
    assert!(streaming, "the standby streams synchronously");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let hosts: PgHosts = url.parse().expect("the URL of both hosts");
    // The test's own checks go through the same host walk as the programs'.
    let pool = hosts
        .connect(PgPoolOptions::new().max_connections(2))
        .await
        .expect("connect to the primary");
    let mut stack = Stack::on_database("order-saga", &url, pool).await;
    stack.run(&["migrate"]).await;

    let logs = std::env::temp_dir().join(format!(
        "saga-failover-logs-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("the programs' logs: {}", logs.display());
    let logged = [("RUST_LOG", "info")];
    stack.spawn_logged(&["orchestrator"], &logged, &logs.join("orchestrator.log"));
    for service in SERVICES {
        stack.spawn_logged(
            &["service", service],
            &logged,
            &logs.join(format!("{service}.log")),
        );
    }
    let count = SAGAS.to_string();
    stack
        .run(&["start", "--count", &count, "--fail-every", "10"])
        .await;
    let running = wait_until(Duration::from_secs(120), || async {
        finished(&stack).await >= SAGAS / 50
    })
    .await;
    assert!(running, "sagas finish on the primary");

    // The primary goes without a checkpoint or a goodbye; the standby takes over.
    let before = finished(&stack).await;
    assert!(before < SAGAS, "sagas are running when the primary stops");
    eprintln!("{before} of {SAGAS} sagas had finished when the primary stopped");
    primary.stop_immediately();
    standby.promote();

    assert_all_ended(&stack, &[], 180, SAGAS, 10).await;
    let orchestrator = std::fs::read_to_string(logs.join("orchestrator.log")).unwrap();
    assert!(
        orchestrator.contains("another database host"),
        "the orchestrator says it moved to the promoted standby: {orchestrator}"
    );
    stack.shutdown().await;
    eprintln!(
        "the orchestrator's log: {}",
        orchestrator
            .lines()
            .filter(|l| l.contains("database host"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = std::fs::remove_dir_all(&logs);
}

/// A pool on several hosts skips a standby listed first, and a URL of standbys alone gives no
/// session at all, saying why for each host. When its host turns read-only and the standby is
/// promoted, the pool's connections opened before the move are retired: none stays on the
/// host that no longer suits, and a store's `LISTEN` session follows the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_write_pool_never_opens_a_session_on_a_standby() {
    let primary = PgServer::primary();
    let standby = PgServer::standby_of(&primary);
    let options = |wait: u64| {
        PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(wait))
    };
    // Several hosts want a read-write session by default.
    let both: PgHosts = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        standby.port, primary.port
    )
    .parse::<PgHosts>()
    .unwrap()
    .map(|host| host.application_name("saga-failover-test"));
    let pool = both
        .connect(options(10))
        .await
        .expect("the primary, second");
    assert_eq!(pool.connect_options().get_port(), primary.port);
    let recovering: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!recovering, "the pool's sessions are on the primary");

    let alone: PgHosts = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=primary",
        standby.port, standby.port
    )
    .parse()
    .unwrap();
    let refused = alone.connect(options(3)).await.unwrap_err().to_string();
    assert!(
        refused.contains("no host of the database URL suits")
            && refused.contains(&format!("127.0.0.1:{}: not primary", standby.port)),
        "{refused}"
    );
    // Any server will do when the URL (of one host) says so.
    let any: PgHosts = standby.url().parse().unwrap();
    let on_standby = any.connect(options(10)).await.expect("the standby");
    let recovering: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&on_standby)
        .await
        .unwrap();
    assert!(recovering);
    on_standby.close().await;

    // The primary turns read-only (its server stays up, its sessions open) and the standby is
    // promoted: the pool moves, and its idle connection to the old host is not used again.
    let port = || async {
        sqlx::query_scalar::<_, i32>("SELECT inet_server_port()")
            .fetch_one(&pool)
            .await
    };
    assert_eq!(port().await.unwrap(), i32::from(primary.port));
    // A store on the pool listens for its outbox (a session of the pool, kept for it).
    let store = PgStore::builder(pool.clone()).build().unwrap();
    let mut woken = store.outbox_notifications().await.unwrap();
    // Read, as the relay reads it.
    let reader = tokio::spawn(async move { while woken.next().await.is_some() {} });
    let mut admin = sqlx::PgConnection::connect(&primary.url()).await.unwrap();
    sqlx::query("ALTER SYSTEM SET default_transaction_read_only = on")
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut admin)
        .await
        .unwrap();
    standby.promote();
    let moved = wait_until(Duration::from_secs(30), || async {
        port().await.is_ok_and(|p| p == i32::from(standby.port))
    })
    .await;
    assert!(moved, "the pool's sessions moved to the promoted standby");
    for _ in 0..10 {
        assert_eq!(port().await.unwrap(), i32::from(standby.port));
    }
    // Its sessions there (the one it used, its check's, the store's LISTEN) end.
    let sessions_on_old = || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'saga-failover-test'",
        )
    };
    let mut left = -1;
    for _ in 0..50 {
        // The pool in use: each of its connections acquired (an idle one opened before the
        // move, the store's former LISTEN session say, is retired then).
        let (a, b) = tokio::join!(pool.acquire(), pool.acquire());
        drop((a.unwrap(), b.unwrap()));
        left = sessions_on_old().fetch_one(&mut admin).await.unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let which: Option<String> = sqlx::query_scalar(
        "SELECT string_agg(query || ' (' || state || ', since ' || backend_start::text || ')', '; ') \
         FROM pg_stat_activity WHERE application_name = 'saga-failover-test'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        left, 0,
        "no session of the pool is left on the old host: {which:?}"
    );
    // The store listens on the new host.
    let mut on_new = sqlx::PgConnection::connect(&standby.url()).await.unwrap();
    let mut listening = false;
    for _ in 0..50 {
        listening = sqlx::query_scalar::<_, bool>(
            "SELECT count(*) > 0 FROM pg_stat_activity \
             WHERE application_name = 'saga-failover-test' AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(&mut on_new)
        .await
        .unwrap();
        if listening {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listening, "the store's LISTEN session followed the pool");
    reader.abort();
    pool.close().await;
}
