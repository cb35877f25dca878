//! `bench`: an orchestrator and the participants (as tasks) on the real PostgreSQL and
//! RabbitMQ, N sagas with at most C in flight, every outcome checked, one JSON line of figures.
//!
//! Runs in a schema and under a queue prefix of its own, removed at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::orchestrator::OrchestratorConfig;
use saga_core::transport::Source;
use saga_core::{
    Client, Destination, Metrics, Orchestrator, PgStore, SagaDefinition, SagaStatus, Transport,
};
use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Example;
use crate::cpu::CpuTimes;
use crate::participant::{Ledger, migrate, worker_with};

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct BenchArgs {
    /// How many sagas.
    pub count: u64,
    /// At most this many in flight.
    pub in_flight: u64,
    /// Every K-th saga fails at its pivot and compensates.
    pub fail_every: Option<u64>,
    /// Participants run with their inbox and apply a PostgreSQL effect in its transaction (as
    /// real services do); without, they run at least once and keep their effects in memory.
    pub inbox: bool,
    /// Without `inbox`: participants write each effect to PostgreSQL in a transaction of their
    /// own (at least once) instead of keeping it in memory.
    pub effects: bool,
    /// Finished sagas put in the log before the run.
    pub history: u64,
    /// Sagas are started through a store of their own, not the orchestrator's.
    pub remote_starts: bool,
    /// The orchestrator and each participant run as processes of their own (see
    /// [`bench_processes`](crate::bench_processes)).
    pub processes: bool,
    /// With `processes`: how many orchestrator processes share the work.
    pub orchestrators: usize,
    /// Runs the example's parallel groups as the same steps one after another.
    pub sequential: bool,
    /// How long each participant's handler works before it answers (a service's own work).
    pub work: Duration,
}

impl BenchArgs {
    /// The definition the bench runs: the example's, or its steps in sequence.
    pub(crate) fn definition<E: Example>(&self) -> SagaDefinition<E::Input> {
        match self.sequential {
            true => E::sequential().expect("checked when the bench starts"),
            false => E::definition(),
        }
    }
}

/// When a saga was started, and whether it is meant to compensate.
pub(crate) type Started = (bool, Instant);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Copies the rows of the finished saga `model` (instance, events, timers) `count` times under
/// new time-ordered ids, in chunks, then vacuums and analyzes the tables and writes the copy
/// out (a checkpoint). The pool's search path is the bench's schema.
async fn fill_history(pool: &sqlx::PgPool, model: Uuid, count: u64) -> anyhow::Result<(i64, i64)> {
    const CHUNK: u64 = 50_000;
    // Its own connection, where statements taking seconds are expected and not logged.
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .disable_statement_logging();
    let mut conn = options.connect().await?;
    let mut done = 0;
    while done < count {
        let n = CHUNK.min(count - done);
        // UUIDv7-shaped ids a day old and older, like those of sagas started back then.
        sqlx::query(
            "WITH ids AS ( \
               SELECT (lpad(to_hex((extract(epoch FROM now() - interval '1 day') * 1000)::bigint \
                        - ($2 + g)), 12, '0') || '7' || substr(md5(random()::text), 1, 3) \
                        || '8' || substr(md5(random()::text), 1, 15))::uuid AS id \
               FROM generate_series(1, $3) g), \
             i AS (INSERT INTO instances \
                 (id, saga, version, status, business_key, reason, last_seq, created_at, updated_at, \
                  finished_at) \
               SELECT ids.id, m.saga, m.version, m.status, NULL, m.reason, m.last_seq, \
                      m.created_at - interval '1 day', m.updated_at - interval '1 day', \
                      m.finished_at - interval '1 day' \
               FROM ids, instances m WHERE m.id = $1 RETURNING id), \
             e AS (INSERT INTO events (saga_id, seq, kind, data, recorded_at) \
               SELECT i.id, m.seq, m.kind, m.data, m.recorded_at - interval '1 day' \
               FROM i, events m WHERE m.saga_id = $1) \
             INSERT INTO timers (saga_id, key, timer, set_at, due_at, fired_at) \
             SELECT i.id, m.key, m.timer, m.set_at, m.due_at, m.fired_at \
             FROM i, timers m WHERE m.saga_id = $1",
        )
        .bind(model)
        .bind(done as i64)
        .bind(n as i64)
        .execute(&mut conn)
        .await
        .context("filling the history")?;
        done += n;
    }
    // A log grown over days never comes at once: autovacuum has been through it, and its
    // writes are long on disk. The copy leaves millions of rows autovacuum would take on during
    // the measured run, and a gigabyte or more of dirty pages whose checkpoint would run then
    // too: vacuum and write it out now, so the run pays for having the log, not for having
    // just loaded it. Checkpointing takes a superuser or `pg_checkpoint`; without either, the
    // run goes on.
    sqlx::query("VACUUM (ANALYZE) instances, events, timers")
        .execute(&mut conn)
        .await?;
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&mut conn).await {
        eprintln!("history: no checkpoint after the copy ({e}); its writes may slow the run");
    }
    Ok(
        sqlx::query_as("SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM events)")
            .fetch_one(&mut conn)
            .await?,
    )
}

/// Runs the bench and returns its JSON line.
pub async fn run<E: Example>(args: BenchArgs) -> anyhow::Result<String> {
    if args.sequential && E::sequential().is_none() {
        bail!(
            "--sequential needs an example with a parallel group; {} has none",
            E::PROGRAM
        );
    }
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    let mut amqp = AmqpConfig::from_env()?;
    let id = Uuid::new_v4().simple().to_string();
    let schema = format!("bench_{}", &id[..12]);
    amqp.prefix = format!("bench-{}", &id[..12]);
    amqp.connection_name = format!("{}-bench", E::PROGRAM);
    amqp.prefetch = 256;

    // The broker's own rate, measured first, in the same run.
    let baseline = 10_000;
    let broker_secs = crate::baseline::raw_publish_consume(amqp.urls()[0], baseline, 256)
        .await
        .map_err(|e| anyhow::anyhow!("measuring the broker: {}", e.message()))?;
    let broker_msgs_per_sec = baseline as f64 / broker_secs.as_secs_f64();
    if args.processes {
        return crate::bench_processes::run::<E>(args, broker_msgs_per_sec).await;
    }

    let options: PgConnectOptions = url.parse().context("DATABASE_URL")?;
    let search_path = format!("\"{schema}\", public");
    // The orchestrator's pool: no ping before each transaction (a failed one is retried).
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .test_before_acquire(false)
        .connect_with(
            options
                .options([("search_path", search_path.as_str())])
                .application_name(&format!("{} bench", E::PROGRAM)),
        )
        .await
        .context("cannot connect to PostgreSQL at DATABASE_URL")?;
    let service_schemas: Vec<String> = E::services()
        .iter()
        .map(|s| format!("{schema}_{s}"))
        .collect();
    let connect = || async {
        AmqpTransport::connect(amqp.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach RabbitMQ at AMQP_URL: {}", e.message()))
    };
    // The run, then the clean-up whatever the run did: no schema or queue is left behind.
    let outcome = measure::<E, _, _>(
        args,
        &pool,
        &schema,
        &service_schemas,
        &connect,
        broker_msgs_per_sec,
    )
    .await;
    let cleaned = clean_up::<E, _, _>(&pool, &schema, &service_schemas, &connect).await;
    let line = outcome?;
    cleaned?;
    Ok(line)
}

/// Migrates, runs the orchestrator and participants, starts and checks the sagas; returns the
/// JSON line.
async fn measure<E: Example, C, F>(
    args: BenchArgs,
    pool: &sqlx::PgPool,
    schema: &str,
    service_schemas: &[String],
    connect: &C,
    broker_msgs_per_sec: f64,
) -> anyhow::Result<String>
where
    C: Fn() -> F,
    F: std::future::Future<Output = anyhow::Result<AmqpTransport>>,
{
    let pool = pool.clone();
    // Payloads encrypted as the programs' are, with the keys of SAGA_PAYLOAD_KEYS.
    let payloads = crate::connections::payloads()?;
    if payloads.is_encoding() {
        eprintln!("payloads: encrypted (SAGA_PAYLOAD_KEYS)");
    }
    let store = Arc::new(
        PgStore::builder(pool.clone())
            .schema(schema)
            .payloads(payloads.clone())
            .build()?,
    );
    store.migrate().await?;
    if args.inbox || args.effects {
        let names: Vec<&str> = service_schemas.iter().map(String::as_str).collect();
        migrate(&pool, &names).await?;
    }
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let memory = Ledger::Memory(Default::default());
    // The participants share one transport (two connections), as services in one process would.
    let participants: Arc<dyn Transport> = Arc::new(connect().await?);
    for (service, service_schema) in E::services().into_iter().zip(service_schemas) {
        let ledger = if args.inbox {
            Ledger::pg(pool.clone(), service_schema)?
        } else if args.effects {
            Ledger::PgAtLeastOnce {
                pool: pool.clone(),
                schema: service_schema.clone(),
            }
        } else {
            memory.clone()
        };
        let worker = worker_with::<E>(
            service,
            &ledger,
            Metrics::new(),
            payloads.clone(),
            args.work,
        );
        tasks.spawn(worker.run(Arc::clone(&participants), shutdown.clone()));
    }
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel();
    let def = args.definition::<E>();
    let (name, version, work) = (def.name(), def.version(), args.work.as_millis());
    eprintln!("definition: {name} v{version}, work {work} ms a command");
    let orchestrator = Orchestrator::builder(store.clone(), Arc::new(connect().await?))
        .register(&def)
        .config(OrchestratorConfig {
            batch_size: 256,
            ..OrchestratorConfig::default()
        })
        .on_settled(move |id, status| {
            let _ = settled_tx.send((id, status, Instant::now()));
        })
        .build();
    tasks.spawn(orchestrator.run(shutdown.clone()));
    // Sagas are started through the orchestrator's store, as a service that runs its
    // orchestrator does: their first commands go to its relay in memory. With
    // `--remote-starts`, through a store and pool of their own, as another service's would:
    // their first commands wait for the relay's poller.
    let client = if args.remote_starts {
        let client_pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(
                pool.connect_options()
                    .as_ref()
                    .clone()
                    .application_name(&format!("{} bench client", E::PROGRAM)),
            )
            .await?;
        Client::new(Arc::new(
            PgStore::builder(client_pool)
                .schema(schema)
                .payloads(payloads.clone())
                .build()?,
        ))
    } else {
        Client::new(store.clone())
    };
    if args.history > 0 {
        // One real saga, then its rows copied under new ids, finished a day ago.
        let model = client.start(&def, &E::input(0, false)).await?.saga_id;
        let settled = tokio::time::timeout(Duration::from_secs(30), settled_rx.recv()).await;
        match settled {
            Ok(Some((id, SagaStatus::Completed, _))) if id == model => {}
            other => bail!("the model saga for --history did not complete: {other:?}"),
        }
        let began = Instant::now();
        let (sagas, events) = fill_history(&pool, model, args.history).await?;
        eprintln!(
            "history: {sagas} sagas, {events} events in the log ({:.0} s to fill)",
            began.elapsed().as_secs_f64()
        );
    }

    // Start sagas concurrently, at most `in_flight` unsettled at a time.
    let permits = Arc::new(Semaphore::new(args.in_flight.max(1) as usize));
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let cpu_before = CpuTimes::now();
    let begin = Instant::now();
    let starter = spawn_starts::<E>(args, client.clone(), permits.clone(), started_tx);
    // The tally runs as a task, on the runtime's workers, not on the bench's main thread: a
    // third thread woken for every start and every outcome would compete with the engine
    // for the cores.
    let count = args.count as usize;
    let tally = tokio::spawn(async move {
        let bar = crate::progress::bar(count as u64, "sagas settled");
        let mut started: HashMap<Uuid, Started> = HashMap::new();
        let mut settled: HashMap<Uuid, (SagaStatus, Instant)> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while settled.len() < count {
            tokio::select! {
                Some(s) = started_rx.recv() => {
                    let (id, fail, at) = s.context("starting a saga")?;
                    started.insert(id, (fail, at));
                }
                Some((id, status, at)) = settled_rx.recv() => {
                    settled.insert(id, (status, at));
                    permits.add_permits(1);
                    bar.inc(1);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    bail!("the run did not finish within 10 minutes")
                }
            }
        }
        let secs = begin.elapsed().as_secs_f64();
        bar.finish_and_clear();
        starter.await?;
        while let Ok(s) = started_rx.try_recv() {
            let (id, fail, at) = s?;
            started.insert(id, (fail, at));
        }
        anyhow::Ok((started, settled, secs))
    });
    let (started, settled, secs) = tally.await??;
    let rss = crate::cpu::peak_rss_mb(std::process::id());
    if let Some(line) = CpuTimes::now().per_saga_since(&cpu_before, args.count) {
        eprintln!("{line}");
    }
    shutdown.cancel();
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    if args.inbox || args.effects {
        let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM example_effects")
            .fetch_one(&pool)
            .await?;
        eprintln!("effects: {effects} in PostgreSQL");
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

/// What a start sends back: the saga's id, whether it is meant to compensate, and when it was
/// asked for.
pub(crate) type StartSent = saga_core::Result<(Uuid, bool, Instant)>;

/// Starts the run's sagas from a task of its own, each once a permit is free (at most
/// `in_flight` unsettled: the tally gives a permit back as each settles), and sends each
/// start's answer to `started`.
pub(crate) fn spawn_starts<E: Example>(
    args: BenchArgs,
    client: Client,
    permits: Arc<Semaphore>,
    started: mpsc::UnboundedSender<StartSent>,
) -> tokio::task::JoinHandle<()> {
    let def = args.definition::<E>();
    tokio::spawn(async move {
        for n in 1..=args.count {
            permits.acquire().await.expect("open").forget();
            let fail = args.fail_every.is_some_and(|k| n.is_multiple_of(k));
            let (client, def, started) = (client.clone(), def.clone(), started.clone());
            tokio::spawn(async move {
                let at = Instant::now();
                let result = client.start(&def, &E::input(n, fail)).await;
                let _ = started.send(result.map(|s| (s.saga_id, fail, at)));
            });
        }
    })
}

/// Checks that every saga started settled as meant (compensated or completed), and gives the
/// JSON line of figures.
pub(crate) fn figures<E: Example>(
    count: u64,
    started: &HashMap<Uuid, Started>,
    settled: &HashMap<Uuid, (SagaStatus, Instant)>,
    secs: f64,
    rss: f64,
    broker_msgs_per_sec: f64,
) -> anyhow::Result<String> {
    let (mut completed, mut compensated) = (0u64, 0u64);
    let mut latencies = Vec::with_capacity(settled.len());
    for (id, (fail, at)) in started {
        let Some((status, done)) = settled.get(id) else {
            bail!("saga {id} never settled");
        };
        let expected = if *fail {
            SagaStatus::Compensated
        } else {
            SagaStatus::Completed
        };
        if *status != expected {
            bail!("saga {id} ended {status}, expected {expected}");
        }
        match status {
            SagaStatus::Completed => completed += 1,
            _ => compensated += 1,
        }
        latencies.push(done.duration_since(*at).as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let steps = E::definition().definition().steps().len() as u64;
    // A compensated order ran every step forward and undid those before its pivot.
    let undone = E::definition()
        .definition()
        .steps()
        .iter()
        .filter(|s| s.compensation.is_some())
        .count() as u64;
    let step_count = completed * steps + compensated * (steps + undone);

    Ok(format!(
        "{{\"sagas\":{},\"secs\":{secs:.3},\"sagas_per_sec\":{:.1},\"steps_per_sec\":{:.1},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"completed\":{completed},\"compensated\":{compensated},\"orchestrator_rss_mb\":{rss:.1},\"broker_msgs_per_sec\":{broker_msgs_per_sec:.0}}}",
        count,
        count as f64 / secs,
        step_count as f64 / secs,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
    ))
}

/// Drops the bench's schemas and deletes its queues and exchanges.
async fn clean_up<E: Example, C, F>(
    pool: &sqlx::PgPool,
    schema: &str,
    service_schemas: &[String],
    connect: &C,
) -> anyhow::Result<()>
where
    C: Fn() -> F,
    F: std::future::Future<Output = anyhow::Result<AmqpTransport>>,
{
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(pool)
    .await?;
    for s in service_schemas {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{s}\" CASCADE"
        )))
        .execute(pool)
        .await?;
    }
    delete_topology::<E>(&connect().await?).await
}

/// Deletes the queues and exchanges of `E`'s services and of the results, under the prefix
/// `transport` was configured with.
pub(crate) async fn delete_topology<E: Example>(transport: &AmqpTransport) -> anyhow::Result<()> {
    let mut sources: Vec<Source> = E::services()
        .into_iter()
        .map(|s| Destination::Service(s.to_owned()))
        .collect();
    sources.push(Destination::Results);
    transport
        .delete_topology(&sources)
        .await
        .map_err(|e| anyhow::anyhow!(e.message().to_owned()))
}
