//! Who may read and act through the console: the token, the CSRF check of every form, the
//! `Host` check that keeps other sites' pages (DNS rebinding) away from a console on loopback,
//! and the headers that keep pages out of other sites' frames.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::header::{
    AUTHORIZATION, CONTENT_SECURITY_POLICY, COOKIE, HOST, LOCATION, ORIGIN, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{PageError, Ui};

/// The cookie that carries the token after `/login`.
pub(crate) const TOKEN_COOKIE: &str = "saga_ui_token";

/// The console's access rules.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    /// The digest of `SAGA_UI_TOKEN`, if set: then every action needs the token, and off
    /// loopback every page too. The login cookie holds the digest, never the token.
    token: Option<String>,
    /// `--read-only`: no action at all.
    read_only: bool,
    /// The address served; actions on a non-loopback one need the token.
    bound: SocketAddr,
    /// The secret every form carries back (random for each run of the console).
    csrf: String,
}

/// Whether the actions of a page are offered to this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Actions {
    /// Shown and accepted.
    Allowed,
    /// Shown after a login with the token.
    NeedToken,
    /// Neither shown nor accepted, for this reason.
    Off(&'static str),
}

impl Access {
    /// The rules for a console on `listen`.
    pub(crate) fn new(listen: SocketAddr, token: Option<String>, read_only: bool) -> Self {
        Access {
            token: token.filter(|t| !t.is_empty()).map(|t| digest(&t)),
            read_only,
            bound: listen,
            csrf: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// The same rules, for the address actually bound (port 0 resolved).
    pub(crate) fn bound_to(mut self, bound: SocketAddr) -> Self {
        self.bound = bound;
        self
    }

    /// The rules in a few words, for the log line at start.
    pub(crate) fn describe(&self) -> &'static str {
        match self.actions_without_token() {
            Actions::Allowed => "actions allowed",
            Actions::NeedToken => "actions need SAGA_UI_TOKEN",
            Actions::Off(why) => why,
        }
    }

    /// The secret forms carry.
    pub(crate) fn csrf(&self) -> &str {
        &self.csrf
    }

    fn actions_without_token(&self) -> Actions {
        if self.read_only {
            Actions::Off("read-only (--read-only)")
        } else if self.token.is_some() {
            Actions::NeedToken
        } else if self.bound.ip().is_loopback() {
            Actions::Allowed
        } else {
            Actions::Off("read-only: bound to a non-loopback address without SAGA_UI_TOKEN")
        }
    }

    /// Whether this request may act.
    pub(crate) fn actions(&self, headers: &HeaderMap) -> Actions {
        match self.actions_without_token() {
            Actions::NeedToken if self.has_token(headers) => Actions::Allowed,
            other => other,
        }
    }

    /// Whether the request presents the console's token (or the login cookie).
    fn has_token(&self, headers: &HeaderMap) -> bool {
        let token = self.token.as_deref();
        presented(headers).is_some_and(|t| token.is_some_and(|token| same(&t, token)))
    }

    /// Whether reading needs the token too: off loopback, once there is one.
    fn reads_need_token(&self) -> bool {
        self.token.is_some() && !self.bound.ip().is_loopback()
    }

    /// Whether `token` is the console's token.
    pub(crate) fn token_is(&self, token: &str) -> bool {
        self.token
            .as_deref()
            .is_some_and(|t| same(&digest(token), t))
    }

    /// What the login cookie holds for `token`.
    pub(crate) fn cookie_value(token: &str) -> String {
        digest(token)
    }

    /// Refuses an action unless this request may act and its form came from a page of this
    /// console.
    pub(crate) fn authorize(&self, headers: &HeaderMap, csrf: &str) -> Result<(), PageError> {
        self.check_form(headers, csrf)?;
        match self.actions(headers) {
            Actions::Allowed => Ok(()),
            Actions::NeedToken => Err(PageError::Forbidden(
                "this action needs the console's token (SAGA_UI_TOKEN): log in first".into(),
            )),
            Actions::Off(why) => Err(PageError::Forbidden(format!("actions are off: {why}"))),
        }
    }

    /// The CSRF check alone (the login form has it too).
    pub(crate) fn check_form(&self, headers: &HeaderMap, csrf: &str) -> Result<(), PageError> {
        let cross_site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "cross-site" || v == "same-site");
        let foreign_origin = headers.get(ORIGIN).is_some_and(|origin| {
            let host = headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let origin = origin.to_str().unwrap_or("");
            origin != format!("http://{host}") && origin != format!("https://{host}")
        });
        if cross_site || foreign_origin || !same(csrf, &self.csrf) {
            return Err(PageError::Forbidden(
                "the form did not come from this console (CSRF check failed); reload the page"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The digest of the token a request presents: `Authorization: Bearer ..`, or the login
/// cookie (which holds the digest).
fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(digest(bearer.trim()));
    }
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The hex SHA-256 of the token, so that secrets compared are of one length and the cookie
/// never holds the token.
fn digest(token: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, format!("saga-ui:{token}").as_bytes());
    hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Addresses served without the token: the login form and what it needs.
const PUBLIC: [&str; 3] = ["/login", "/style.css", "/console.js"];

/// Every request: on a loopback address, refuses a `Host` that is not a loopback name (a page
/// of another site whose name was made to point here, DNS rebinding, gets nothing); off
/// loopback with a token, sends a request without it to the login form (`/api`: 401); and
/// keeps every page out of other sites' frames.
pub(crate) async fn check_request(State(ui): State<Ui>, request: Request, next: Next) -> Response {
    let access = &ui.access;
    let mut response = if access.bound.ip().is_loopback() && !loopback_host(request.headers()) {
        PageError::Forbidden(
            "the console on a loopback address answers only to 127.0.0.1, localhost or [::1]"
                .into(),
        )
        .into_response()
    } else if access.reads_need_token()
        && !PUBLIC.contains(&request.uri().path())
        && !access.has_token(request.headers())
    {
        if request.method() != axum::http::Method::GET {
            PageError::Forbidden(
                "this console needs its token (SAGA_UI_TOKEN): log in first".into(),
            )
            .into_response()
        } else if request.uri().path().starts_with("/api/") {
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({ "error": "this console needs its token: Authorization: Bearer <SAGA_UI_TOKEN>" })),
            )
                .into_response()
        } else {
            let back = request.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut response = StatusCode::SEE_OTHER.into_response();
            if let Ok(to) =
                HeaderValue::from_str(&format!("/login?next={}", super::pages::encode(back)))
            {
                response.headers_mut().insert(LOCATION, to);
            }
            response
        }
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// Whether the request's `Host` is a loopback name.
fn loopback_host(headers: &HeaderMap) -> bool {
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = host.rsplit_once(':').map_or(host, |(name, port)| {
        if port.parse::<u16>().is_ok() {
            name
        } else {
            host
        }
    });
    matches!(name, "127.0.0.1" | "localhost" | "[::1]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn a_non_loopback_console_acts_only_with_its_token() {
        let open = Access::new("0.0.0.0:8080".parse().unwrap(), None, false);
        assert!(matches!(open.actions(&headers(&[])), Actions::Off(_)));
        let guarded = Access::new(
            "0.0.0.0:8080".parse().unwrap(),
            Some("s3cret".into()),
            false,
        );
        assert_eq!(guarded.actions(&headers(&[])), Actions::NeedToken);
        let cookie = format!("a=b; saga_ui_token={}", Access::cookie_value("s3cret"));
        assert_eq!(
            guarded.actions(&headers(&[("cookie", cookie.as_str())])),
            Actions::Allowed
        );
        assert_eq!(
            guarded.actions(&headers(&[("cookie", "saga_ui_token=s3cret")])),
            Actions::NeedToken,
            "the cookie holds the digest, not the token"
        );
        assert_eq!(
            guarded.actions(&headers(&[("authorization", "Bearer s3cret")])),
            Actions::Allowed
        );
        assert_eq!(
            guarded.actions(&headers(&[("authorization", "Bearer s3creT")])),
            Actions::NeedToken
        );
    }

    #[test]
    fn read_only_refuses_even_with_the_token() {
        let access = Access::new("127.0.0.1:0".parse().unwrap(), Some("t".into()), true);
        let h = headers(&[("authorization", "Bearer t")]);
        assert!(matches!(access.actions(&h), Actions::Off(_)));
        let csrf = access.csrf().to_owned();
        assert!(access.authorize(&h, &csrf).is_err());
    }

    #[test]
    fn a_form_needs_the_console_s_csrf_secret_and_origin() {
        let access = Access::new("127.0.0.1:0".parse().unwrap(), None, false);
        let csrf = access.csrf().to_owned();
        let host = [("host", "127.0.0.1:8080")];
        assert!(access.authorize(&headers(&host), &csrf).is_ok());
        assert!(access.authorize(&headers(&host), "guess").is_err());
        let foreign = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
        ]);
        assert!(access.authorize(&foreign, &csrf).is_err());
        let same = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(access.authorize(&same, &csrf).is_ok());
        let cross = headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")]);
        assert!(access.authorize(&cross, &csrf).is_err());
    }
}
