//! Riding out a database restart: the connection at start, and the reads of `list` and
//! `show`, are tried again while PostgreSQL is out of reach, until `--reconnect-for` has
//! passed. An answer that will not change (a wrong password, no such database) fails at once.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;

/// How long to wait between tries.
const PAUSE: Duration = Duration::from_millis(500);

/// A pool on `url`, once the database answers.
pub(crate) async fn connect(url: &str, deadline: Instant) -> anyhow::Result<PgPool> {
    retry(deadline, || async {
        let hosts: saga_core::PgHosts = url.parse().context("DATABASE_URL")?;
        let options = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5));
        hosts
            .connect(options)
            .await
            .context("cannot connect to PostgreSQL at DATABASE_URL")
    })
    .await
}

/// Runs `attempt` until it succeeds, fails for a reason a restart does not explain, or
/// `deadline` passes; says once on stderr that it waits.
pub(crate) async fn retry<T, F, Fut>(deadline: Instant, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut said = false;
    loop {
        match attempt().await {
            Err(e)
                if saga_core::error::is_out_of_reach(&*e) && Instant::now() + PAUSE < deadline =>
            {
                if !said {
                    eprintln!(
                        "saga: the database is out of reach ({}); trying again",
                        saga_core::error::report(&*e)
                    );
                    said = true;
                }
                tokio::time::sleep(PAUSE).await;
            }
            other => return other,
        }
    }
}
