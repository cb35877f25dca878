//! `saga`: the operator's tool. Finds sagas, shows their timelines, and acts on them: signal,
//! cancel, retry a stuck step, resolve a stuck compensation by hand, pause, resume, purge.
//!
//! Reads `DATABASE_URL` (and `SAGA_SCHEMA`, default `saga`; `SAGA_PAYLOAD_KEYS`, the payload
//! keys, to show encrypted payloads and to encrypt the signals it sends). Actions are queued
//! for the orchestrators, which apply them under the saga's lock; the tool waits for their
//! verdict. `saga ui` serves the same as a web console.

mod act;
mod bulk;
mod duration;
mod reach;
mod ui;

/// Writes a line on stdout; fails (so that the program ends quietly, see
/// `saga_core::error::is_closed_pipe`)
/// when the reader has gone, as with `saga list | head`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

/// Writes on stdout, like [`outln`] without the line end.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*)?
    }};
}

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use act::Action;
use anyhow::{Context, bail};
use chrono::Utc;
use clap::{Parser, Subcommand};
use saga_core::codec::{AesGcmCodec, SAGA_PAYLOAD_KEYS};
use saga_core::store::{ListFilter, SagaSummary};
use saga_core::{Client, Event, Inbox, OperatorAction, Payloads, PgStore, SagaStatus};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(name = "saga", version, about = "Operate sagas: find, inspect, fix")]
struct Cli {
    /// Print JSON for scripts instead of text for people.
    #[arg(long, global = true)]
    json: bool,
    /// The schema of the saga tables.
    #[arg(long, global = true, env = "SAGA_SCHEMA", default_value = "saga")]
    schema: String,
    /// While the database is out of reach (a restart), keep trying this long before failing
    /// (the connection, and the reads of `list` and `show`); 0s fails at once.
    #[arg(long, global = true, value_parser = duration::parse, default_value = "30s")]
    reconnect_for: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates or upgrades the saga tables.
    Migrate,
    /// Lists sagas, newest first.
    List {
        /// Only sagas in this status (running, compensating, completed, compensated, stuck,
        /// cancelled).
        #[arg(long)]
        status: Option<SagaStatus>,
        /// Only sagas of this name.
        #[arg(long)]
        saga: Option<String>,
        /// Only the saga with this business key.
        #[arg(long)]
        key: Option<String>,
        /// Only sagas started longer ago than this (e.g. 30m, 12h, 7d).
        #[arg(long, value_parser = duration::parse)]
        older_than: Option<Duration>,
        /// Only sagas started more recently than this.
        #[arg(long, value_parser = duration::parse)]
        newer_than: Option<Duration>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Page number, from 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        page: u32,
    },
    /// Shows a saga and its timeline: each event with its time, step, attempt, outcome and
    /// duration.
    Show {
        /// The saga's id.
        id: Uuid,
    },
    /// Sends a signal with a JSON payload.
    Signal {
        /// The saga's id.
        id: Uuid,
        /// The signal's name.
        name: String,
        /// Its payload, as JSON.
        payload: String,
    },
    /// Cancels a saga (refused once its pivot has started).
    Cancel {
        /// The saga's id.
        id: Uuid,
        /// Why.
        reason: String,
    },
    /// Runs a stuck saga's failed step again.
    /// With `--status stuck [--name NAME]` instead of an id: every stuck saga (of that name),
    /// after saying how many and asking (`--yes` does not ask).
    Retry {
        /// The saga's id.
        #[arg(required_unless_present = "status", conflicts_with_all = ["status", "name", "yes"])]
        id: Option<Uuid>,
        /// Every saga in this status (only `stuck` ones can be retried).
        #[arg(long)]
        status: Option<SagaStatus>,
        /// Only sagas of this name (with `--status`).
        #[arg(long, visible_alias = "saga", requires = "status")]
        name: Option<String>,
        /// Do not ask before retrying them (needed when no terminal is attached).
        #[arg(long, requires = "status")]
        yes: bool,
    },
    /// Marks a stuck compensation as done by hand (recorded in the log).
    Resolve {
        /// The saga's id.
        id: Uuid,
        /// The step whose compensation was done by hand.
        #[arg(long)]
        step: String,
        /// What was done, and why.
        #[arg(long)]
        reason: String,
    },
    /// Stops a saga from sending new commands.
    Pause {
        /// The saga's id.
        id: Uuid,
        /// Why.
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
    },
    /// Resumes a paused saga.
    Resume {
        /// The saga's id.
        id: Uuid,
    },
    /// Deletes a participant's inbox records older than this (DATABASE_URL is then the
    /// participant's database). Keep them longer than any saga that may still send the service
    /// a command: a later command of an older saga is answered "cannot tell".
    PurgeInbox {
        /// The inbox's schema (the service's, in the examples).
        #[arg(long, value_name = "SCHEMA")]
        inbox: String,
        /// e.g. 30d.
        #[arg(long, value_parser = duration::parse)]
        older_than: Duration,
    },
    /// Prints a new random payload key, base64-encoded, for `SAGA_PAYLOAD_KEYS`
    /// (`id:key` pairs separated by commas, the first used for new writes). Needs no database.
    Keygen,
    /// Serves the web console: an overview, the sagas with filters, each saga's timeline
    /// and the actions that apply to it, and the same as JSON under /api.
    Ui {
        /// The address to serve on. Off loopback, `SAGA_UI_TOKEN` guards every page and action
        /// (without it, the console is read-only).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Show everything, offer and accept no action.
        #[arg(long)]
        read_only: bool,
    },
    /// Deletes finished sagas (completed, compensated, cancelled) older than this, with their
    /// logs.
    Purge {
        /// e.g. 30d.
        #[arg(long, value_parser = duration::parse)]
        older_than: Duration,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            eprintln!(
                "saga: {}",
                text.lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if saga_core::error::is_closed_pipe(&*e) {
                // `saga list | head`: the reader has what it wanted.
                return ExitCode::SUCCESS;
            }
            eprintln!("saga: {}", saga_core::error::report(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Keygen = cli.command {
        let key = AesGcmCodec::generate_key();
        if cli.json {
            outln!("{}", serde_json::json!({ "key": key }));
        } else {
            outln!("{key}");
        }
        return Ok(());
    }
    let payloads = Payloads::from_env().with_context(|| format!("reading {SAGA_PAYLOAD_KEYS}"))?;
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    let deadline = tokio::time::Instant::now() + cli.reconnect_for;
    let pool = reach::connect(&url, deadline).await?;
    let store = Arc::new(
        PgStore::builder(pool)
            .schema(&cli.schema)
            .payloads(payloads)
            .build()?,
    );
    let client = Client::new(store.clone());
    let json = cli.json;
    let done = |what: &str, id: Uuid| -> anyhow::Result<()> {
        if json {
            outln!("{}", serde_json::json!({ "saga_id": id, "done": what }));
        } else {
            outln!("saga {id}: {what}");
        }
        Ok(())
    };
    match cli.command {
        Command::Migrate => {
            store.migrate().await?;
            if json {
                outln!("{}", serde_json::json!({ "migrated": true }));
            } else {
                outln!("migrated schema {}", cli.schema);
            }
        }
        Command::List {
            status,
            saga,
            key,
            older_than,
            newer_than,
            limit,
            page,
        } => {
            let now = Utc::now();
            let filter = ListFilter {
                status,
                saga,
                created_before: older_than.map(|d| now - d),
                created_after: newer_than.map(|d| now - d),
                business_key: key,
                limit: Some(limit),
                offset: (page - 1) * limit,
                ..ListFilter::default()
            };
            let sagas =
                reach::retry(deadline, || async { Ok(client.list(&filter).await?) }).await?;
            if json {
                outln!("{}", serde_json::to_string(&sagas)?);
            } else {
                print_list(&sagas)?;
            }
        }
        Command::Show { id } => {
            let (summary, history) = reach::retry(deadline, || async {
                Ok((client.summary(id).await?, client.history(id).await?))
            })
            .await?;
            let summary = summary.with_context(|| format!("saga {id}: no such saga"))?;
            // Payloads under a key not given here show as `<encrypted: key ..>`.
            if json {
                let shown = serde_json::json!({ "saga": summary, "events": history });
                outln!("{}", Payloads::masked(&shown));
            } else {
                out!("{}", saga_core::timeline::render(&summary, None, &history));
                if let Some(reason) = &summary.reason {
                    outln!("reason: {reason}");
                }
                if let Some(Event::Started { input, .. }) = history.first().map(|r| &r.event) {
                    outln!("input: {}", Payloads::masked(input));
                }
                outln!("{}", saga_core::timeline::LEGEND);
            }
        }
        Command::Signal { id, name, payload } => {
            let payload: serde_json::Value = serde_json::from_str(&payload)
                .with_context(|| format!("saga {id}: the payload is not JSON"))?;
            let said = act::perform(&client, id, Action::Signal { name, payload }).await?;
            done(&said, id)?;
        }
        Command::Cancel { id, reason } => {
            done(
                &act::perform(&client, id, Action::Cancel { reason }).await?,
                id,
            )?;
        }
        Command::Retry { id: Some(id), .. } => {
            let retry = Action::Operator(OperatorAction::Retry);
            done(&act::perform(&client, id, retry).await?, id)?;
        }
        Command::Retry {
            id: None,
            status,
            name,
            yes,
        } => {
            let status = status.expect("clap requires an id or --status");
            bulk::retry_matching(&client, status, name, yes, json).await?;
        }
        Command::Resolve { id, step, reason } => {
            let resolve = Action::Operator(OperatorAction::Resolve { step, reason });
            done(&act::perform(&client, id, resolve).await?, id)?;
        }
        Command::Pause { id, reason } => {
            let pause = Action::Operator(OperatorAction::Pause { reason });
            done(&act::perform(&client, id, pause).await?, id)?;
        }
        Command::Resume { id } => {
            let resume = Action::Operator(OperatorAction::Resume);
            done(&act::perform(&client, id, resume).await?, id)?;
        }
        Command::Keygen => unreachable!("answered before connecting"),
        Command::Ui { listen, read_only } => {
            let token = std::env::var("SAGA_UI_TOKEN").ok();
            ui::serve(client, listen, ui::Access::new(listen, token, read_only)).await?;
        }
        Command::PurgeInbox { inbox, older_than } => {
            if older_than.is_zero() {
                bail!("--older-than must be more than zero");
            }
            let inbox = Inbox::new(store.pool().clone(), &inbox)?;
            let purged = inbox.purge(Utc::now() - older_than).await?;
            if json {
                outln!("{}", serde_json::json!({ "purged": purged }));
            } else {
                outln!("purged {purged} inbox records of {}", inbox.schema());
            }
        }
        Command::Purge { older_than } => {
            if older_than.is_zero() {
                bail!("--older-than must be more than zero");
            }
            let purged = client.purge(Utc::now() - older_than).await?;
            if json {
                outln!("{}", serde_json::json!({ "purged": purged }));
            } else {
                outln!("purged {purged} finished sagas");
            }
        }
    }
    Ok(())
}

fn print_list(sagas: &[SagaSummary]) -> anyhow::Result<()> {
    outln!(
        "{:<36}  {:<16} {:>3}  {:<12}  {:<20}  reason",
        "id",
        "saga",
        "v",
        "status",
        "updated"
    );
    for s in sagas {
        outln!(
            "{:<36}  {:<16} {:>3}  {:<12}  {:<20}  {}",
            s.id,
            s.saga,
            s.version,
            s.status,
            s.updated_at.format("%Y-%m-%d %H:%M:%S"),
            s.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
