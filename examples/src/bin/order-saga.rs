//! `order-saga`: the order example as a command-line program.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use saga_core::SagaStatus;

/// The order saga: reserve inventory, charge payment, create shipment.
#[derive(Debug, Parser)]
#[command(name = "order-saga", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs everything in one process, in memory (no services needed), and prints a timeline
    /// per saga.
    Demo {
        /// How many orders to run.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Every K-th order's shipment fails terminally, so that saga compensates.
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
        fail_every: Option<u64>,
    },
}

/// The status counts as one JSON line, keys in lower case.
fn status_line(counts: &BTreeMap<SagaStatus, u64>) -> String {
    let get = |s: SagaStatus| counts.get(&s).copied().unwrap_or(0);
    format!(
        r#"{{"running":{},"completed":{},"compensated":{},"stuck":{}}}"#,
        get(SagaStatus::Running) + get(SagaStatus::Compensating),
        get(SagaStatus::Completed),
        get(SagaStatus::Compensated),
        get(SagaStatus::Stuck),
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Demo { count, fail_every } => saga_examples::order::demo::run(count, fail_every)
            .await
            .map(|counts| println!("{}", status_line(&counts))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order-saga: {e:#}");
            ExitCode::FAILURE
        }
    }
}
