//! The command-line program every example shares: `demo`, `migrate`, `orchestrator`,
//! `service NAME`, `start`, `wait`, `status`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{StreamExt, TryStreamExt};
use saga_core::ops::Ops;
use saga_core::{Client, Orchestrator, PgStore, SagaStatus};

use crate::Example;
use crate::connections::{
    PROCESS_NAME, broker, counts_riding_out, database, payloads, ready_store, store,
    store_riding_out,
};
use crate::participant::{Ledger, migrate, worker_with};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Runs an example saga: in memory, or as microservices on PostgreSQL and RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs everything in one process, in memory (no services needed), and prints a timeline
    /// per saga.
    Demo {
        /// How many sagas to run.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Every K-th saga fails for good (at its pivot; the travel saga's car rental), so it
        /// compensates.
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
        fail_every: Option<u64>,
        /// Prints one JSON line per saga instead of the timelines and the counts:
        /// `{"saga_id","name","status","events":[{"t_ms","step","direction","kind","attempt"}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Creates or upgrades the saga schema and the example tables.
    Migrate,
    /// Runs an orchestrator until SIGTERM or SIGINT.
    Orchestrator,
    /// Runs one participant service until SIGTERM or SIGINT.
    Service {
        /// The service to run.
        name: String,
    },
    /// Starts sagas.
    Start {
        /// How many sagas to start.
        #[arg(long)]
        count: u64,
        /// Every K-th saga fails for good (at its pivot; the travel saga's car rental), so it
        /// compensates.
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
        fail_every: Option<u64>,
        /// How many starts may wait for their commit at once (starts waiting together share
        /// one statement and one commit).
        #[arg(long, value_name = "C", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        in_flight: u64,
        /// Also prints each saga's id, one per line, in the order they were numbered.
        #[arg(long)]
        ids: bool,
    },
    /// Sends a signal (a JSON payload) to a saga.
    Signal {
        /// The saga's id.
        id: uuid::Uuid,
        /// The signal's name.
        name: String,
        /// Its payload, as JSON.
        payload: String,
    },
    /// Cancels a saga; fails, saying why, once its pivot has started.
    Cancel {
        /// The saga's id.
        id: uuid::Uuid,
        /// Why.
        reason: String,
    },
    /// Waits until no saga is running; prints the status counts; fails on timeout.
    Wait {
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Prints the number of sagas per status as one JSON line.
    Status {
        /// How long to ride out a database out of reach (a restart), in seconds; 0 tries
        /// once.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Runs an orchestrator and the participants here, starts sagas, checks every outcome and
    /// prints one JSON line of figures (in a schema and queue prefix of its own).
    Bench {
        /// How many sagas.
        #[arg(long, default_value_t = 2000)]
        count: u64,
        /// At most this many sagas in flight.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
        in_flight: u64,
        /// Every K-th saga fails for good (at its pivot; the travel saga's car rental), so it
        /// compensates.
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
        fail_every: Option<u64>,
        /// Participants run without an inbox and keep their effects in memory (at least once),
        /// instead of applying a PostgreSQL effect in their inbox's transaction as real
        /// services do (the default).
        #[arg(long)]
        at_least_once: bool,
        /// With `--at-least-once`: each participant writes its effect to PostgreSQL in a
        /// transaction of its own, as a service without an inbox would (the baseline the
        /// inbox's cost is measured against).
        #[arg(long, requires = "at_least_once")]
        effects: bool,
        /// The default (participants with their inbox); kept for scripts that pass it.
        #[arg(long, hide = true, conflicts_with = "at_least_once")]
        inbox: bool,
        /// Before the run, fill the log with this many finished sagas (copies of a real one's
        /// rows), to measure throughput with a large log.
        #[arg(long, value_name = "N", default_value_t = 0)]
        history: u64,
        /// Start sagas through a store of their own, as another service would (their first
        /// commands then wait for the relay's poller), rather than through the orchestrator's.
        #[arg(long)]
        remote_starts: bool,
        /// Run the orchestrator and each participant as a process of its own (this program's
        /// `orchestrator` and `service NAME`, participants with their inbox, on a database of
        /// the bench's own), as they are deployed; sagas are started from the bench process.
        #[arg(long, conflicts_with_all = ["at_least_once", "history", "remote_starts"])]
        processes: bool,
        /// With `--processes`: how many orchestrator processes share the work (scale-out).
        #[arg(long, value_name = "N", default_value_t = 1, requires = "processes",
              value_parser = clap::value_parser!(u64).range(1..=16))]
        orchestrators: u64,
        /// Runs the example's parallel group as the same steps one after another (travel-saga),
        /// to compare the two.
        #[arg(long, conflicts_with = "processes")]
        sequential: bool,
        /// Each participant's handler works this long before it answers (a service's own
        /// work), in milliseconds.
        #[arg(
            long,
            value_name = "MS",
            default_value_t = 0,
            conflicts_with = "processes"
        )]
        work_ms: u64,
    },
}

/// Writes a line on stdout; fails when the reader has gone (`start --ids | head`), so that the
/// program ends quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

/// Checks that `args` (without the program name) form a valid command line of `E`'s program,
/// service names included; no I/O.
pub fn check_args<E: Example>(args: &[&str]) -> Result<(), String> {
    let cli = Cli::try_parse_from(std::iter::once(E::PROGRAM).chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    if let Command::Service { name } = &cli.command
        && !E::services().contains(&name.as_str())
    {
        return Err(format!("unknown service `{name}`"));
    }
    Ok(())
}

/// Parses the command line, runs the command, and reports a failure as one line on stderr.
pub fn main<E: Example>() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line naming what is wrong; `--help` has the rest.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("{}: {}", E::PROGRAM, first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // The demo prints timelines; services log what they do.
    let default_filter = match cli.command {
        Command::Demo { .. } | Command::Bench { .. } => "warn",
        _ => "info",
    };
    if let Err(e) = crate::order::step_timeout_from_env() {
        eprintln!("{}: {e}", E::PROGRAM);
        return ExitCode::from(2);
    }
    if let Err(e) = payloads() {
        eprintln!("{}: {}", E::PROGRAM, saga_core::error::report(&*e));
        return ExitCode::from(2);
    }
    let role = match &cli.command {
        Command::Service { name } => name.as_str(),
        Command::Orchestrator => "orchestrator",
        _ => "client",
    };
    let name = PROCESS_NAME.get_or_init(|| format!("{} {role}", E::PROGRAM));
    let telemetry = match crate::telemetry::init(default_filter, name) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("{}: {}", E::PROGRAM, saga_core::error::report(&*e));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", E::PROGRAM);
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run::<E>(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if saga_core::error::is_closed_pipe(&*e) {
                // `start --ids | head`: the reader has what it wanted.
                ExitCode::SUCCESS
            } else {
                eprintln!("{}: {}", E::PROGRAM, saga_core::error::report(&*e));
                ExitCode::FAILURE
            }
        }
    };
    drop(runtime);
    telemetry.shutdown();
    code
}

async fn run<E: Example>(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo {
            count,
            fail_every,
            json,
        } => {
            let counts = crate::demo::run::<E>(count, fail_every, json).await?;
            if !json {
                outln!("{}", status_line(&counts));
            }
        }
        Command::Migrate => {
            let pool = database(4).await?;
            store(&pool)?
                .migrate()
                .await
                .context("migrating the saga schema")?;
            migrate(&pool, &E::services())
                .await
                .context("migrating the example tables")?;
            outln!("migrated");
        }
        Command::Orchestrator => {
            let ops = Ops::from_env()?;
            let pool = database(10).await?;
            let store = Arc::new(ready_store(&pool).await?);
            let transport = broker(E::PROGRAM, "orchestrator").await?;
            ops.serve(Some(store.clone())).await?;
            let orchestrator = E::previous().iter().fold(
                Orchestrator::builder(store, Arc::new(transport)).register(&E::definition()),
                |builder, earlier| builder.register(earlier),
            );
            let run = orchestrator
                .metrics(ops.metrics().clone())
                .build()
                .run(ops.shutdown());
            ops.run_until_shutdown(run).await?;
        }
        Command::Service { name } => {
            let services = E::services();
            let Some(service) = services.iter().find(|s| **s == name) else {
                bail!(
                    "unknown service `{name}`; expected one of: {}",
                    services.join(", ")
                );
            };
            let ops = Ops::from_env()?;
            let pool = database(8).await?;
            let ledger = Ledger::pg(pool, service)?;
            let transport = broker(E::PROGRAM, service).await?;
            ops.serve(None::<Arc<PgStore>>).await?;
            let run = worker_with::<E>(
                service,
                &ledger,
                ops.metrics().clone(),
                payloads()?,
                std::time::Duration::ZERO,
            )
            .run(Arc::new(transport), ops.shutdown());
            ops.run_until_shutdown(run).await?;
        }
        Command::Start {
            count,
            fail_every,
            in_flight,
            ids,
        } => {
            let pool = database(4).await?;
            let client = Client::new(Arc::new(ready_store(&pool).await?));
            let def = E::definition();
            // Each start has a business key, so a start whose commit is in doubt (the
            // database restarting) is retried without starting the saga twice.
            let run = uuid::Uuid::now_v7().simple().to_string();
            let start = |n: u64| {
                let (client, def) = (&client, &def);
                let fail = fail_every.is_some_and(|k| n.is_multiple_of(k));
                let input = E::input(n, fail);
                let key = format!("{run}-{n}");
                async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    loop {
                        match client.start_with_key(def, &input, key.clone()).await {
                            Ok(s) => return Ok(s.saga_id),
                            Err(e)
                                if e.is_transient() && tokio::time::Instant::now() < deadline =>
                            {
                                tracing::warn!(error = %e, "starting a saga failed; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(e) => return Err(anyhow::Error::from(e)),
                        }
                    }
                }
            };
            let bar = crate::progress::bar(count, "started");
            let started: Vec<uuid::Uuid> = futures_util::stream::iter(1..=count)
                .map(start)
                .buffered(usize::try_from(in_flight).unwrap_or(usize::MAX))
                .inspect_ok(|_| bar.inc(1))
                .try_collect()
                .await
                .with_context(|| {
                    // Some starts may have committed: their keys say which run they were.
                    format!("starting sagas with business keys {run}-1 to {run}-{count}")
                })?;
            bar.finish_and_clear();
            outln!("started {count}");
            if ids {
                for id in started {
                    outln!("{id}");
                }
            }
        }
        Command::Signal { id, name, payload } => {
            let payload: serde_json::Value =
                serde_json::from_str(&payload).context("the payload is not JSON")?;
            let pool = database(2).await?;
            let client = Client::new(Arc::new(ready_store(&pool).await?));
            client.signal(id, &name, &payload).await?;
            outln!("signalled");
        }
        Command::Cancel { id, reason } => {
            let pool = database(2).await?;
            let client = Client::new(Arc::new(ready_store(&pool).await?));
            client.cancel(id, &reason).await?;
            outln!("cancelled");
        }
        Command::Wait { timeout } => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            let store = store_riding_out(deadline).await?;
            loop {
                let counts = counts_riding_out(&store, deadline).await?;
                if counts.keys().all(|s| !s.is_active()) {
                    outln!("{}", status_line(&counts));
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "sagas still running after {timeout} s: {}",
                        status_line(&counts)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Command::Bench {
            count,
            in_flight,
            fail_every,
            at_least_once,
            effects,
            inbox: _,
            history,
            remote_starts,
            processes,
            orchestrators,
            sequential,
            work_ms,
        } => {
            let args = crate::bench::BenchArgs {
                history,
                remote_starts,
                processes,
                orchestrators: orchestrators as usize,
                count,
                in_flight,
                fail_every,
                inbox: !at_least_once,
                effects,
                sequential,
                work: std::time::Duration::from_millis(work_ms),
            };
            outln!("{}", crate::bench::run::<E>(args).await?);
        }
        Command::Status { timeout } => {
            // A database out of reach (a restart) is waited for until the timeout, saying so
            // once; an answer that will not change (a wrong password, no saga tables) fails at
            // once.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            let store = store_riding_out(deadline).await?;
            outln!(
                "{}",
                status_line(&counts_riding_out(&store, deadline).await?)
            );
        }
    }
    Ok(())
}

/// `{"running":R,"completed":C,"compensated":P,"stuck":S}`; running counts compensating sagas.
/// A `"cancelled":N` key follows when any saga was cancelled.
pub fn status_line(counts: &BTreeMap<SagaStatus, u64>) -> String {
    let get = |s: SagaStatus| counts.get(&s).copied().unwrap_or(0);
    let cancelled = match get(SagaStatus::Cancelled) {
        0 => String::new(),
        n => format!(r#","cancelled":{n}"#),
    };
    format!(
        r#"{{"running":{},"completed":{},"compensated":{},"stuck":{}{cancelled}}}"#,
        get(SagaStatus::Running) + get(SagaStatus::Compensating),
        get(SagaStatus::Completed),
        get(SagaStatus::Compensated),
        get(SagaStatus::Stuck),
    )
}
