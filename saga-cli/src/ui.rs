//! `saga ui`: the web console. Server-side HTML over the same client as the CLI: an
//! overview, a filtered list, each saga's page with its timeline drawn as SVG and the actions
//! that apply to it, and the same data as JSON under `/api`.

mod actions;
mod api;
mod guard;
mod layout;
mod pages;
mod saga;
mod svg;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use saga_core::Client;
use uuid::Uuid;

pub(crate) use guard::Access;

/// The console's shared state.
#[derive(Clone)]
pub(crate) struct Ui {
    client: Client,
    access: Arc<Access>,
    /// What an action did, shown on the page it redirects to (kept a minute, so that the
    /// page's own refreshes keep showing it).
    flashes: Arc<Mutex<HashMap<Uuid, Flash>>>,
    /// When the login form takes another try (a wrong token closes it a second).
    login_open_at: Arc<Mutex<Instant>>,
}

/// An action's verdict, for the next page.
#[derive(Debug, Clone)]
pub(crate) struct Flash {
    ok: bool,
    text: String,
    at: Instant,
}

impl Ui {
    fn flash(&self, ok: bool, text: String) -> Uuid {
        let id = Uuid::new_v4();
        let mut flashes = self.flashes.lock().expect("flashes");
        flashes.retain(|_, f| f.at.elapsed() < FLASH_KEPT);
        let at = Instant::now();
        flashes.insert(id, Flash { ok, text, at });
        id
    }

    /// The saga an address names, or the page that says why there is none.
    async fn saga(&self, id: &str) -> Result<saga_core::store::SagaSummary, PageError> {
        let id = saga_id(id)?;
        self.client
            .summary(id)
            .await?
            .ok_or_else(|| PageError::NotFound(format!("saga {id}: no such saga")))
    }

    fn flash_of(&self, id: Option<Uuid>) -> Option<Flash> {
        let flashes = self.flashes.lock().expect("flashes");
        id.and_then(|id| flashes.get(&id).cloned())
            .filter(|f| f.at.elapsed() < FLASH_KEPT)
    }
}

/// How long an action's verdict is shown.
const FLASH_KEPT: Duration = Duration::from_secs(60);

/// Serves the console on `listen` until Ctrl-C.
pub(crate) async fn serve(
    client: Client,
    listen: SocketAddr,
    access: Access,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    eprintln!("saga ui: serving http://{bound}/ ({})", access.describe());
    let ui = Ui {
        client,
        access: Arc::new(access.bound_to(bound)),
        flashes: Arc::default(),
        login_open_at: Arc::new(Mutex::new(Instant::now())),
    };
    axum::serve(listener, router(ui))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving the console")
}

fn router(ui: Ui) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/sagas", get(pages::list))
        .route("/sagas/{id}", get(saga::saga))
        .route("/sagas/{id}/{action}", post(actions::act))
        .route("/login", get(pages::login).post(actions::login))
        .route("/api/sagas", get(api::list))
        .route("/api/sagas/{id}", get(api::saga))
        .route("/style.css", get(layout::style))
        .route("/console.js", get(layout::script))
        .fallback(|| async { PageError::NotFound("no such page".into()) })
        .layer(axum::middleware::from_fn_with_state(
            ui.clone(),
            guard::check_request,
        ))
        .with_state(ui)
}

/// The saga id in an address.
fn saga_id(id: &str) -> Result<Uuid, PageError> {
    id.parse()
        .map_err(|_| PageError::BadRequest(format!("`{id}` is not a saga id")))
}

/// What a request could not do, as a page (or JSON under `/api`) with its status code.
#[derive(Debug)]
pub(crate) enum PageError {
    NotFound(String),
    BadRequest(String),
    Forbidden(String),
    /// The database could not answer (a restart, say): the page says so and the next
    /// request tries again.
    Unavailable(saga_core::Error),
}

impl From<saga_core::Error> for PageError {
    fn from(e: saga_core::Error) -> Self {
        PageError::Unavailable(e)
    }
}

impl PageError {
    fn status(&self) -> StatusCode {
        match self {
            PageError::NotFound(_) => StatusCode::NOT_FOUND,
            PageError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PageError::Forbidden(_) => StatusCode::FORBIDDEN,
            PageError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn text(&self) -> String {
        match self {
            PageError::NotFound(t) | PageError::BadRequest(t) | PageError::Forbidden(t) => {
                t.clone()
            }
            PageError::Unavailable(e) => format!(
                "the database did not answer: {}",
                saga_core::error::report(e)
            ),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.status();
        let page = layout::page(
            status.canonical_reason().unwrap_or("error"),
            maud::html! { p.flash.error { (self.text()) } p { a href="/" { "overview" } } },
        );
        (status, Html(page.into_string())).into_response()
    }
}
