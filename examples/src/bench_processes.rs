//! `bench --processes`: the deployed shape. The orchestrator and each participant run as
//! processes of this same program (`orchestrator`, `service NAME`), participants with their
//! inbox, on a database and under a queue prefix of the bench's own; the bench starts the
//! sagas through a store of its own, at most `--in-flight` unsettled, and learns of each
//! saga's end from a notification a trigger sends when its row settles. It checks every
//! outcome as `bench` does, prints the same JSON line, and stops every process it started.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::{Client, PgStore, SagaStatus};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

use crate::Example;
use crate::bench::{BenchArgs, Started, delete_topology, figures, spawn_starts};
use crate::cpu::CpuTimes;

/// The channel the settle trigger notifies on.
const SETTLED: &str = "bench_settled";

/// Runs the bench with every part a process of its own; returns its JSON line.
pub async fn run<E: Example>(args: BenchArgs, broker_msgs_per_sec: f64) -> anyhow::Result<String> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    let options: PgConnectOptions = url.parse().context("DATABASE_URL")?;
    let id = Uuid::new_v4().simple().to_string();
    let database = format!("bench_{}", &id[..12]);
    let prefix = format!("bench-{}", &id[..12]);
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .context("cannot connect to PostgreSQL at DATABASE_URL")?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
        .execute(&admin)
        .await
        .context("creating the bench's database")?;
    let mut programs = Programs::default();
    let outcome = measure::<E>(
        args,
        &with_database(&url, &database),
        &prefix,
        &mut programs,
        broker_msgs_per_sec,
    )
    .await;
    let stopped = programs.stop();
    let mut amqp = AmqpConfig::from_env()?;
    amqp.prefix = prefix;
    let cleaned = clean_up::<E>(&admin, &database, amqp).await;
    let line = outcome?;
    stopped?;
    cleaned?;
    Ok(line)
}

async fn measure<E: Example>(
    args: BenchArgs,
    url: &str,
    prefix: &str,
    programs: &mut Programs,
    broker_msgs_per_sec: f64,
) -> anyhow::Result<String> {
    // The bench's own pool: the starts, and the notifications.
    let options: PgConnectOptions = url.parse().context("the bench database's URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options.application_name(&format!("{} bench client", E::PROGRAM)))
        .await?;
    let payloads = crate::connections::payloads()?;
    let store = Arc::new(PgStore::builder(pool.clone()).payloads(payloads).build()?);
    store.migrate().await?;
    crate::participant::migrate(&pool, &E::services()).await?;
    notify_settled(&pool).await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(SETTLED).await?;
    let mut notifications = listener.into_stream();

    // The same broker settings as `bench` gives its transports.
    let env = [
        ("DATABASE_URL", url.to_owned()),
        ("AMQP_PREFIX", prefix.to_owned()),
        ("AMQP_PREFETCH", "256".to_owned()),
    ];
    for _ in 0..args.orchestrators.max(1) {
        programs.spawn(&["orchestrator"], &env)?;
    }
    for service in E::services() {
        programs.spawn(&["service", service], &env)?;
    }
    eprintln!("processes: {}", programs.describe());

    // Every part up and consuming: one saga end to end, not measured.
    let client = Client::new(store.clone());
    let def = E::definition();
    let warm = client.start(&def, &E::input(0, false)).await?.saga_id;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let note = tokio::time::timeout_at(deadline.into(), notifications.next())
            .await
            .context("the programs did not run a first saga within 60 s")?
            .context("the notifications ended")??;
        if note.payload().starts_with(&warm.to_string()) {
            break;
        }
    }

    let permits = Arc::new(Semaphore::new(args.in_flight.max(1) as usize));
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let cpu_before = CpuTimes::now();
    let programs_before = programs.cpu_us();
    let begin = Instant::now();
    let starter = spawn_starts::<E>(args, client.clone(), permits.clone(), started_tx);
    let count = args.count as usize;
    let mut started: HashMap<Uuid, Started> = HashMap::new();
    let mut settled: HashMap<Uuid, (SagaStatus, Instant)> = HashMap::new();
    // Notifications may come before their start's answer: kept until it does.
    let mut early: HashMap<Uuid, (SagaStatus, Instant)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let bar = crate::progress::bar(count as u64, "sagas settled");
    while settled.len() < count {
        bar.set_position(settled.len() as u64);
        tokio::select! {
            Some(s) = started_rx.recv() => {
                let (id, fail, at) = s.context("starting a saga")?;
                started.insert(id, (fail, at));
                if let Some(end) = early.remove(&id) {
                    settled.insert(id, end);
                }
            }
            note = tokio::time::timeout(QUIET, notifications.next()) => match note {
                Ok(note) => {
                    let note = note.context("the notifications ended")??;
                    let (id, status) = parse(note.payload())?;
                    if id != warm && !settled.contains_key(&id) && !early.contains_key(&id) {
                        permits.add_permits(1);
                        let end = (status, Instant::now());
                        if started.contains_key(&id) {
                            settled.insert(id, end);
                        } else {
                            early.insert(id, end);
                        }
                    }
                }
                // Quiet for a while: a notification may have been lost (the listener
                // reconnected); the sagas' rows say which have settled.
                Err(_) => {
                    let pending: Vec<Uuid> = started
                        .keys()
                        .filter(|id| !settled.contains_key(id))
                        .copied()
                        .collect();
                    for (id, status) in settled_rows(&pool, &pending).await? {
                        permits.add_permits(1);
                        settled.insert(id, (status, Instant::now()));
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                bail!("the run did not finish within 10 minutes")
            }
        }
    }
    let secs = begin.elapsed().as_secs_f64();
    bar.finish_and_clear();
    starter.await?;
    let rss = programs.orchestrator_rss_mb();
    // However many orchestrators shared the work, no participant applied an effect twice.
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM example_effects \
         GROUP BY saga_id, service, action HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await?;
    if doubled > 0 {
        bail!("{doubled} effects were applied twice");
    }
    if let Some(line) = CpuTimes::now().per_saga_since(&cpu_before, args.count) {
        let programs_us = (programs.cpu_us() - programs_before) / args.count.max(1) as f64;
        eprintln!("{line}, the programs {programs_us:.0} µs");
    }
    figures::<E>(
        args.count,
        &started,
        &settled,
        secs,
        rss,
        broker_msgs_per_sec,
    )
}

/// `url` with its database replaced by `database` (the query, if any, kept).
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    // The path starts after the authority (`scheme://authority/path`).
    let authority_end = base
        .find("://")
        .map(|s| s + 3)
        .and_then(|start| base[start..].find('/').map(|p| start + p))
        .unwrap_or(base.len());
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
#[test]
fn the_database_of_a_url_is_replaced() {
    assert_eq!(
        with_database("postgres://u:p@h:5432/app?sslmode=disable", "b"),
        "postgres://u:p@h:5432/b?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "b"), "postgres://h/b");
    assert_eq!(with_database("postgres://h/", "b"), "postgres://h/b");
}

/// How long without a notification before the sagas' rows are read instead.
const QUIET: Duration = Duration::from_secs(2);

/// Which of `ids` have settled, by their rows.
async fn settled_rows(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<Vec<(Uuid, SagaStatus)>> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, status FROM saga.instances WHERE id = ANY($1) \
         AND status IN ('completed', 'compensated', 'cancelled', 'stuck')",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(id, status)| {
            let status = status
                .parse()
                .map_err(|e| anyhow::anyhow!("saga {id}: {e}"))?;
            Ok((id, status))
        })
        .collect()
}

/// A trigger that notifies [`SETTLED`] with `ID STATUS` when a saga's row settles.
async fn notify_settled(pool: &PgPool) -> anyhow::Result<()> {
    for statement in [
        format!(
            "CREATE FUNCTION saga.bench_settled() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.status IN ('completed', 'compensated', 'cancelled', 'stuck') \
             AND NEW.status IS DISTINCT FROM OLD.status THEN \
             PERFORM pg_notify('{SETTLED}', NEW.id::text || ' ' || NEW.status); END IF; \
             RETURN NULL; END $$"
        ),
        "CREATE TRIGGER bench_settled AFTER UPDATE ON saga.instances FOR EACH ROW \
         EXECUTE FUNCTION saga.bench_settled()"
            .to_owned(),
    ] {
        sqlx::query(AssertSqlSafe(statement)).execute(pool).await?;
    }
    Ok(())
}

fn parse(payload: &str) -> anyhow::Result<(Uuid, SagaStatus)> {
    let (id, status) = payload
        .split_once(' ')
        .with_context(|| format!("a notification `{payload}`"))?;
    Ok((
        id.parse()?,
        status
            .parse()
            .map_err(|e| anyhow::anyhow!("a notification `{payload}`: {e}"))?,
    ))
}

/// The processes the bench started, stopped by PID whatever happens.
#[derive(Default)]
struct Programs {
    children: Vec<(String, Child)>,
}

impl Programs {
    fn spawn(&mut self, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<()> {
        let child = Command::new(std::env::current_exe()?)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // Four processes cannot serve one metrics address.
            .env_remove("METRICS_ADDR")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `{}`", args.join(" ")))?;
        self.children.push((args.join(" "), child));
        Ok(())
    }

    fn describe(&self) -> String {
        self.children
            .iter()
            .map(|(name, child)| format!("{name} {}", child.id()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The CPU time the processes spent so far, in µs.
    fn cpu_us(&self) -> f64 {
        self.children
            .iter()
            .filter_map(|(_, child)| crate::cpu::process_us(child.id()))
            .sum()
    }

    /// The orchestrator's peak resident memory.
    fn orchestrator_rss_mb(&self) -> f64 {
        self.children
            .first()
            .map_or(0.0, |(_, child)| crate::cpu::peak_rss_mb(child.id()))
    }

    /// Asks each process to stop (SIGTERM), waits up to 20 s, then kills what is left; fails
    /// if a process did not exit cleanly.
    fn stop(&mut self) -> anyhow::Result<()> {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut failed = Vec::new();
        for (name, child) in &mut self.children {
            loop {
                match child.try_wait()? {
                    Some(status) if status.success() => break,
                    Some(status) => {
                        failed.push(format!("`{name}` exited with {status}"));
                        break;
                    }
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        failed.push(format!("`{name}` did not stop within 20 s; killed"));
                        break;
                    }
                }
            }
        }
        self.children.clear();
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("{}", failed.join("; "))
        }
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Drops the bench's database and deletes its queues and exchanges.
async fn clean_up<E: Example>(
    admin: &PgPool,
    database: &str,
    amqp: AmqpConfig,
) -> anyhow::Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE \"{database}\" WITH (FORCE)"
    )))
    .execute(admin)
    .await?;
    let transport = AmqpTransport::connect(amqp)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach RabbitMQ at AMQP_URL: {}", e.message()))?;
    delete_topology::<E>(&transport).await
}
