//! The console's actions (POST): retry, resolve, cancel, pause, resume, signal, through the
//! same code as the CLI ([`crate::act`]), so they are queued for the orchestrators and recorded in the
//! log as the CLI's are; and the login that takes the token.

use axum::Form;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::header::{LOCATION, SET_COOKIE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use saga_core::OperatorAction;

use crate::act::Action;
use serde::Deserialize;
use uuid::Uuid;

use super::guard::{Access, TOKEN_COOKIE};
use super::{PageError, Ui};

/// An action's form: `csrf` always, the rest as the action needs.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    payload: String,
}

/// `POST /sagas/{id}/{action}`: does it, then shows the saga with the verdict.
pub(crate) async fn act(
    State(ui): State<Ui>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Result<Response, PageError> {
    ui.access.authorize(&headers, &form.csrf)?;
    let id = super::saga_id(&id)?;
    let verdict = run(&ui, id, &action, form).await?;
    let flash = match verdict {
        Ok(done) => ui.flash(true, done),
        Err(e) => ui.flash(false, format!("{action}: {}", saga_core::error::report(&e))),
    };
    Ok(see_other(&format!("/sagas/{id}?flash={flash}")))
}

/// Runs one action; the outer error is a bad request, the inner the action's verdict.
async fn run(
    ui: &Ui,
    id: Uuid,
    action: &str,
    form: ActionForm,
) -> Result<Result<String, saga_core::Error>, PageError> {
    let required = |value: &str, what: &str| {
        if value.trim().is_empty() {
            Err(PageError::BadRequest(format!("{action} needs {what}")))
        } else {
            Ok(value.trim().to_owned())
        }
    };
    let action = match action {
        "retry" => Action::Operator(OperatorAction::Retry),
        "resolve" => Action::Operator(OperatorAction::Resolve {
            step: required(&form.step, "a step")?,
            reason: required(&form.reason, "a reason")?,
        }),
        "cancel" => Action::Cancel {
            reason: required(&form.reason, "a reason")?,
        },
        "pause" => Action::Operator(OperatorAction::Pause {
            reason: Some(form.reason.trim().to_owned())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "paused by an operator".to_owned()),
        }),
        "resume" => Action::Operator(OperatorAction::Resume),
        "signal" => Action::Signal {
            name: required(&form.name, "a signal name")?,
            payload: serde_json::from_str(&form.payload)
                .map_err(|e| PageError::BadRequest(format!("the payload is not JSON: {e}")))?,
        },
        other => return Err(PageError::NotFound(format!("no action `{other}`"))),
    };
    Ok(crate::act::perform(&ui.client, id, action).await)
}

/// The login form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /login`: keeps the token in a cookie (HTTP only, this site only) when it is right.
pub(crate) async fn login(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, PageError> {
    ui.access.check_form(&headers, &form.csrf)?;
    // One wrong token closes the form for a second, for everyone: guessing goes slowly.
    {
        let mut open_at = ui.login_open_at.lock().expect("login gate");
        let now = std::time::Instant::now();
        if now < *open_at {
            return Err(PageError::Forbidden(
                "too many attempts: wait a second and try again".into(),
            ));
        }
        if !ui.access.token_is(&form.token) {
            *open_at = now + std::time::Duration::from_secs(1);
            return Err(PageError::Forbidden("wrong token".into()));
        }
    }
    let mut response = see_other(&safe_next(&form.next));
    let cookie = format!(
        "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200",
        Access::cookie_value(&form.token)
    );
    let cookie = HeaderValue::from_str(&cookie)
        .map_err(|_| PageError::BadRequest("the token cannot be kept in a cookie".into()))?;
    response.headers_mut().insert(SET_COOKIE, cookie);
    Ok(response)
}

/// Where a login goes back to: a path of this console, never another site (`//host`,
/// `/\\host` and control characters, which browsers read as another site, give `/`).
fn safe_next(next: &str) -> String {
    let ok = next.starts_with('/')
        && !next[1..].starts_with(['/', '\\'])
        && !next.contains('\\')
        && !next.chars().any(char::is_control);
    if ok { next.to_owned() } else { "/".to_owned() }
}

fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn a_login_goes_back_only_to_a_page_of_the_console() {
        assert_eq!(safe_next("/sagas/1?flash=2"), "/sagas/1?flash=2");
        for other in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "https://evil.example",
            "",
        ] {
            assert_eq!(safe_next(other), "/", "{other:?}");
        }
    }
}
