//! An HTTP endpoint for operations: `/metrics` (Prometheus text), `/livez` and `/readyz`.
//!
//! `/livez` answers 200 until [`Health::set_dead`] (a loop of the orchestrator ended: the
//! process is about to exit non-zero); `/readyz` 200 while [`Health::set_ready`] holds and the
//! store, if any, answers.
//!
//! Enabled by the `http` feature.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<saga_core::PgStore>) -> std::io::Result<()> {
//! use saga_core::http::{Health, serve};
//! use saga_core::Metrics;
//!
//! let (metrics, health) = (Metrics::new(), Health::new());
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:9464").await?;
//! tokio::spawn(serve(listener, metrics.clone(), health.clone(), Some(store)));
//! health.set_ready(true); // once connected and consuming
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::store::QueryStore;

/// Whether the process is alive and ready to take work. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    live: Arc<AtomicBool>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Health {
    /// Alive, not ready yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the process dead (`/livez` answers 503 from then on): its work stopped in a way
    /// it cannot recover from (an orchestrator's loop ended), and it is about to exit.
    pub fn set_dead(&self) {
        self.live.store(false, Ordering::SeqCst);
        self.set_ready(false);
    }

    /// Whether it is alive.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Marks the process ready (connected, consuming) or not (starting, shutting down).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether it is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Ops {
    metrics: Metrics,
    health: Health,
    store: Option<Arc<dyn QueryStore>>,
}

/// Serves `/metrics`, `/livez` and `/readyz` on `listener` until the process ends. With a
/// store, `/metrics` adds figures read from it and `/readyz` also needs it to answer.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Health,
    store: Option<Arc<dyn QueryStore>>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .with_state(Ops {
            metrics,
            health,
            store,
        });
    axum::serve(listener, app).await
}

async fn scrape(State(ops): State<Ops>) -> impl IntoResponse {
    let stats = match &ops.store {
        Some(store) => store.stats().await.ok(),
        None => None,
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.metrics.render(stats.as_ref()),
    )
}

async fn live(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.health.is_live() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "dead")
    }
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    let store_ok = match &ops.store {
        // A primary-key lookup: cheap, and it needs the database to answer.
        Some(store) => store.summary(uuid::Uuid::nil()).await.is_ok(),
        None => true,
    };
    if ops.health.is_ready() && store_ok {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}
