//! Who may act through the console: the token, the CSRF check of every form, and the `Host`
//! check that keeps other sites' pages (DNS rebinding) away from a console on loopback.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{PageError, Ui};

/// The cookie that carries the token after `/login`.
pub(crate) const TOKEN_COOKIE: &str = "saga_ui_token";

/// The console's access rules.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    /// `SAGA_UI_TOKEN`, if set: then every action needs it.
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
            token: token.filter(|t| !t.is_empty()),
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
        match (self.actions_without_token(), &self.token) {
            (Actions::NeedToken, Some(token))
                if presented(headers).is_some_and(|t| same(&t, token)) =>
            {
                Actions::Allowed
            }
            (other, _) => other,
        }
    }

    /// Whether `token` is the console's token.
    pub(crate) fn token_is(&self, token: &str) -> bool {
        self.token.as_deref().is_some_and(|t| same(token, t))
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

/// The token a request presents: `Authorization: Bearer ..` or the login cookie.
fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_owned());
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

/// Compares secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// On a loopback address, refuses requests whose `Host` is not a loopback name: a page of
/// another site whose name was made to point here (DNS rebinding) gets nothing.
pub(crate) async fn check_host(State(ui): State<Ui>, request: Request, next: Next) -> Response {
    if ui.access.bound.ip().is_loopback() {
        let host = request
            .headers()
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
        if !matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
            return PageError::Forbidden(format!(
                "the console on a loopback address answers only to 127.0.0.1, localhost or [::1], not `{host}`"
            ))
            .into_response();
        }
    }
    next.run(request).await
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
        assert_eq!(
            guarded.actions(&headers(&[("cookie", "a=b; saga_ui_token=s3cret")])),
            Actions::Allowed
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
