//! `/api`: the console's data as JSON, in the shapes of the CLI's `--json`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use saga_core::Payloads;
use saga_core::store::SagaSummary;
use serde::Deserialize;
use serde_json::{Value, json};

use super::pages::ListQuery;
use super::{PageError, Ui};

/// A [`PageError`] answered as `{"error": ..}`.
pub(crate) struct ApiError(PageError);

impl From<PageError> for ApiError {
    fn from(e: PageError) -> Self {
        ApiError(e)
    }
}

impl From<saga_core::Error> for ApiError {
    fn from(e: saga_core::Error) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0.status(), Json(json!({ "error": self.0.text() }))).into_response()
    }
}

/// `/api/sagas`: as `saga list --json` (filters `status`, `name`, `key`, `page`, `limit`).
pub(crate) async fn list(
    State(ui): State<Ui>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<SagaSummary>>, ApiError> {
    Ok(Json(ui.client.list(&query.filter()?).await?))
}

/// Whether `/api/sagas/{id}` includes the log.
#[derive(Debug, Deserialize)]
pub(crate) struct SagaQuery {
    #[serde(default = "yes")]
    events: bool,
}

fn yes() -> bool {
    true
}

/// `/api/sagas/{id}`: as `saga show --json`, `{"saga": .., "events": [..]}` (`?events=false`
/// leaves out the log).
pub(crate) async fn saga(
    State(ui): State<Ui>,
    Path(id): Path<String>,
    Query(query): Query<SagaQuery>,
) -> Result<Json<Value>, ApiError> {
    let summary = ui.saga(&id).await?;
    let id = summary.id;
    let shown = if query.events {
        json!({ "saga": summary, "events": ui.client.history(id).await? })
    } else {
        json!({ "saga": summary })
    };
    Ok(Json(Payloads::masked(&shown)))
}
