//! The example programs' connections: the database pool and the saga store (checked,
//! encrypting as `SAGA_PAYLOAD_KEYS` says), the broker, and riding out a database restart.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use saga_amqp::{AmqpConfig, AmqpTransport, redact};
use saga_core::codec::SAGA_PAYLOAD_KEYS;
use saga_core::{Payloads, PgHosts, PgStore, QueryStore, SagaStatus};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// What this process is (`order-saga orchestrator`, `order-saga inventory`, ...): its
/// sessions' `application_name` in `pg_stat_activity`, and its OpenTelemetry service name.
pub(crate) static PROCESS_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A pool of `max_connections` on `DATABASE_URL`, its sessions named for this process.
pub(crate) async fn database(max_connections: u32) -> anyhow::Result<PgPool> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    // One host or several (libpq's `host1:port1,host2:port2`, with
    // `target_session_attrs=read-write` the pool follows the primary through a failover).
    let hosts: PgHosts = url
        .parse()
        .with_context(|| format!("DATABASE_URL is not a PostgreSQL URL ({})", redact(&url)))?;
    let name = PROCESS_NAME.get().map_or("saga-examples", String::as_str);
    let options = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // No ping round trip before each transaction (docs/PERFORMANCE.md): the long-running
        // commands retry what a connection broken by a database restart fails (the
        // orchestrator its batch, a participant's inbox handler its command), and the one-shot
        // commands start with fresh connections.
        .test_before_acquire(false);
    hosts
        .map(|host| host.application_name(name))
        .connect(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at DATABASE_URL ({})",
                redact(&url)
            )
        })
}

/// The saga store on `pool`, its payloads encrypted as `SAGA_PAYLOAD_KEYS` says.
pub(crate) fn store(pool: &PgPool) -> anyhow::Result<PgStore> {
    Ok(PgStore::builder(pool.clone())
        .payloads(payloads()?)
        .build()?)
}

/// The payload codec of `SAGA_PAYLOAD_KEYS` (`id:base64key` pairs, the first for new writes;
/// unset: payloads are not encrypted).
pub(crate) fn payloads() -> anyhow::Result<Payloads> {
    Payloads::from_env().with_context(|| format!("reading {SAGA_PAYLOAD_KEYS}"))
}

/// The store, after checking that `migrate` ran.
pub(crate) async fn ready_store(pool: &PgPool) -> anyhow::Result<PgStore> {
    let store = store(pool)?;
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}.instances", store.schema()))
        .fetch_one(pool)
        .await?;
    if !migrated {
        bail!("the saga tables do not exist in this database; run `migrate` first");
    }
    Ok(store)
}

/// A transport on `AMQP_URL`, its connections named for `program` and `role`.
pub(crate) async fn broker(program: &str, role: &str) -> anyhow::Result<AmqpTransport> {
    let mut config = AmqpConfig::from_env()?;
    config.connection_name = format!("{program}-{role}");
    AmqpTransport::connect(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach RabbitMQ at AMQP_URL: {}", e.message()))
}

/// The checked store, once the database answers; while it is out of reach (a restart), tries
/// again until `deadline`, saying so once. An answer that will not change (a wrong password, no
/// such database, no saga tables) fails at once.
pub(crate) async fn store_riding_out(deadline: tokio::time::Instant) -> anyhow::Result<PgStore> {
    let mut said = false;
    loop {
        let attempt = async {
            let pool = database(2).await?;
            let ready = ready_store(&pool).await;
            if ready.is_err() {
                // A pool on several hosts is held open by its check until closed.
                pool.close().await;
            }
            ready
        };
        match attempt.await {
            Ok(store) => return Ok(store),
            Err(e)
                if saga_core::error::is_out_of_reach(&*e)
                    && tokio::time::Instant::now() < deadline =>
            {
                if !said {
                    eprintln!(
                        "the database is out of reach ({}); trying again",
                        saga_core::error::report(&*e)
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The counts by status; while the database is out of reach (a restart), tries again until
/// `deadline`, saying so once.
pub(crate) async fn counts_riding_out(
    store: &PgStore,
    deadline: tokio::time::Instant,
) -> anyhow::Result<BTreeMap<SagaStatus, u64>> {
    let mut said = false;
    loop {
        match store.count_by_status().await {
            Ok(counts) => return Ok(counts),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                if !said {
                    eprintln!("the database is out of reach ({e}); trying again");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
