//! What every long-running saga process needs for operations: metrics and health served over
//! HTTP, readiness while it works, and a graceful shutdown on SIGTERM or SIGINT bounded by a
//! grace period.
//!
//! Enabled by the `http` feature.
//!
//! ```no_run
//! # async fn demo(
//! #     store: std::sync::Arc<saga_core::PgStore>,
//! #     transport: std::sync::Arc<dyn saga_core::Transport>,
//! #     saga: saga_core::SagaDefinition<u64>,
//! # ) -> saga_core::Result<()> {
//! use saga_core::Orchestrator;
//! use saga_core::ops::Ops;
//!
//! // METRICS_ADDR (say 0.0.0.0:9464) and SHUTDOWN_GRACE_SECS (default 30).
//! let ops = Ops::from_env()?;
//! ops.serve(Some(store.clone())).await?;
//! let run = Orchestrator::builder(store, transport)
//!     .register(&saga)
//!     .metrics(ops.metrics().clone())
//!     .build()
//!     .run(ops.shutdown());
//! ops.run_until_shutdown(run).await // ready while it runs; Ok after a clean shutdown
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::http::{Health, serve};
use crate::metrics::Metrics;
use crate::store::QueryStore;

/// A process's metrics, health, and shutdown. Cheap to clone: clones share them.
#[derive(Debug, Clone)]
pub struct Ops {
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
    addr: Option<SocketAddr>,
    grace: Duration,
}

impl Ops {
    /// The grace period when none is set.
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

    /// Operations without an HTTP endpoint, shut down on SIGTERM or SIGINT within
    /// [`Ops::DEFAULT_GRACE`]. Must be called inside a tokio runtime.
    pub fn new() -> Self {
        Self {
            metrics: Metrics::new(),
            health: Health::new(),
            shutdown: shutdown_on_signal(),
            addr: None,
            grace: Self::DEFAULT_GRACE,
        }
    }

    /// [`Ops::new`], configured from the environment: `METRICS_ADDR` (`host:port`; unset, no
    /// endpoint) and `SHUTDOWN_GRACE_SECS` (whole seconds). A value that does not parse is an
    /// [`Error::Config`] naming the variable.
    pub fn from_env() -> Result<Self> {
        let mut ops = Self::new();
        if let Ok(v) = std::env::var("METRICS_ADDR") {
            let addr = v.parse().map_err(|_| {
                Error::Config(format!("METRICS_ADDR: expected host:port, got `{v}`"))
            })?;
            ops = ops.listen_on(addr);
        }
        if let Ok(v) = std::env::var("SHUTDOWN_GRACE_SECS") {
            let secs = v.parse().map_err(|_| {
                Error::Config(format!("SHUTDOWN_GRACE_SECS: expected seconds, got `{v}`"))
            })?;
            ops = ops.grace(Duration::from_secs(secs));
        }
        Ok(ops)
    }

    /// Serves `/metrics`, `/livez` and `/readyz` on `addr` (see [`Ops::serve`]).
    pub fn listen_on(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// How long in-flight work may take to finish after the shutdown signal.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The metrics to hand to the orchestrator or the worker.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The process's liveness and readiness, as `/livez` and `/readyz` answer them.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The token cancelled on SIGTERM or SIGINT, to hand to the orchestrator or the worker.
    /// Cancelling it stops the process as the signal would.
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Starts serving the endpoint, if an address was set; `store`, if given, adds its
    /// figures to `/metrics` and must answer for `/readyz` to. Fails if the address cannot be
    /// bound.
    pub async fn serve<S: QueryStore>(&self, store: Option<Arc<S>>) -> Result<()> {
        let Some(addr) = self.addr else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
        let store = store.map(|s| s as Arc<dyn QueryStore>);
        tokio::spawn(serve(
            listener,
            self.metrics.clone(),
            self.health.clone(),
            store,
        ));
        Ok(())
    }

    /// Marks the process ready and runs `work` until it ends after the shutdown signal;
    /// fails if it takes longer than the grace period (in-flight messages then go back to
    /// the broker). Work that ends before the signal (an orchestrator's loop that died) marks
    /// the process dead and not ready and fails with [`Error::LoopEnded`], so that the
    /// program exits non-zero and is restarted.
    pub async fn run_until_shutdown(
        &self,
        work: impl Future<Output = Result<()>> + Send + 'static,
    ) -> Result<()> {
        let mut task = tokio::spawn(work);
        self.health.set_ready(true);
        tokio::select! {
            done = &mut task => {
                // Work that ends because the signal came (the select may see either first)
                // is a clean end.
                if self.shutdown.is_cancelled() {
                    self.health.set_ready(false);
                    return joined(done);
                }
                self.health.set_dead();
                joined(done)?;
                return Err(Error::LoopEnded("the process's work".into()));
            }
            _ = self.shutdown.cancelled() => {}
        }
        self.health.set_ready(false);
        match tokio::time::timeout(self.grace, task).await {
            Ok(done) => joined(done),
            Err(_) => Err(Error::ShutdownTimedOut { grace: self.grace }),
        }
    }
}

impl Default for Ops {
    fn default() -> Self {
        Self::new()
    }
}

/// The work's own result, or its panic as [`Error::LoopEnded`].
fn joined(done: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    done.map_err(|e| Error::LoopEnded(format!("the process's work ({e})")))?
}

/// A token cancelled on SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        let Ok(mut term) = term else {
            tracing::warn!("no SIGTERM handler; shutting down on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_that_ends_after_the_shutdown_is_a_clean_end() {
        let ops = Ops::new();
        let shutdown = ops.shutdown();
        let work = async move {
            shutdown.cancelled().await;
            Ok(())
        };
        ops.shutdown().cancel();
        ops.run_until_shutdown(work).await.unwrap();
        assert!(!ops.health().is_ready());
        assert!(ops.health().is_live());
    }

    #[tokio::test]
    async fn work_that_ends_before_the_shutdown_marks_the_process_dead() {
        let ops = Ops::new();
        let err = ops.run_until_shutdown(async { Ok(()) }).await.unwrap_err();
        assert!(matches!(err, Error::LoopEnded(_)), "{err}");
        assert!(!ops.health().is_live());
        assert!(!ops.health().is_ready());
    }

    #[tokio::test]
    async fn work_past_the_grace_period_fails_the_shutdown() {
        let ops = Ops::new().grace(Duration::from_millis(10));
        ops.shutdown().cancel();
        let err = ops
            .run_until_shutdown(std::future::pending::<Result<()>>())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ShutdownTimedOut { .. }), "{err}");
    }
}
