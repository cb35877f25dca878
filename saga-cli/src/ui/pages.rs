//! The console's pages: the overview, the list of sagas, and the login form. The saga's own
//! page is in [`saga`](super::saga).

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::response::Html;
use chrono::{Duration, Utc};
use maud::{Markup, html};
use saga_core::SagaStatus;
use saga_core::store::{ListFilter, SagaSummary};
use serde::Deserialize;

use super::layout::{Refresh, framed, page};
use super::{PageError, Ui};

/// How far back the overview counts finished sagas (their count is read from an index
/// range, which grows with the window).
const FINISHED_WINDOW_HOURS: i64 = 1;

/// How many sagas the list's pages reach past (an offset reads every row it skips).
const DEEPEST: u32 = 10_000;

/// `/`: sagas by name and status, the stuck ones, the oldest running, recent failures.
pub(crate) async fn overview(State(ui): State<Ui>) -> Result<Html<String>, PageError> {
    let counts = ui
        .client
        .counts(Utc::now() - Duration::hours(FINISHED_WINDOW_HOURS))
        .await?;
    let mut by_name: BTreeMap<String, BTreeMap<SagaStatus, u64>> = BTreeMap::new();
    for c in counts {
        by_name.entry(c.saga).or_default().insert(c.status, c.count);
    }
    let mut names: Vec<(&String, &BTreeMap<SagaStatus, u64>)> = by_name.iter().collect();
    let n = |m: &BTreeMap<SagaStatus, u64>, s| m.get(&s).copied().unwrap_or(0);
    // Stuck first, then running, then by name.
    names.sort_by_key(|(name, m)| {
        (
            std::cmp::Reverse(n(m, SagaStatus::Stuck)),
            std::cmp::Reverse(n(m, SagaStatus::Running) + n(m, SagaStatus::Compensating)),
            (*name).clone(),
        )
    });
    let list = |status, oldest_first, limit| ListFilter {
        status: Some(status),
        oldest_first,
        limit: Some(limit),
        ..ListFilter::default()
    };
    let stuck = ui.client.list(&list(SagaStatus::Stuck, false, 20)).await?;
    let oldest = ui.client.list(&list(SagaStatus::Running, true, 10)).await?;
    let failures = ui
        .client
        .list(&list(SagaStatus::Compensated, false, 10))
        .await?;
    const COLUMNS: [SagaStatus; 6] = [
        SagaStatus::Stuck,
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Cancelled,
    ];
    let body = html! {
        h1 { "Overview" }
        @if names.is_empty() {
            p.muted { "No saga is running or stuck, and none finished in the last " (FINISHED_WINDOW_HOURS) " h." }
        } @else {
            table #counts {
                tr {
                    th { "saga" }
                    @for s in COLUMNS {
                        th.num { (s.as_str()) @if s.is_terminal() { " (last " (FINISHED_WINDOW_HOURS) " h)" } }
                    }
                }
                @for (name, m) in &names {
                    tr {
                        td { a href={ "/sagas?name=" (encode(name)) } { (name) } }
                        @for s in COLUMNS {
                            td.num {
                                @let count = n(m, s);
                                @if count > 0 {
                                    a href={ "/sagas?name=" (encode(name)) "&status=" (s.as_str()) } { (count) }
                                } @else { span.muted { "0" } }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Stuck" @if !stuck.is_empty() { " — " a href="/sagas?status=stuck" { "all" } } }
        (summaries(&stuck, "No saga is stuck."))
        h2 { "Oldest running" }
        (summaries(&oldest, "No saga is running."))
        h2 { "Recent failures (compensated)" }
        (summaries(&failures, "None."))
    };
    let refresh = Refresh {
        every: 5,
        watch: None,
        version: None,
    };
    Ok(Html(framed("Overview", Some(refresh), body).into_string()))
}

/// The filters of `/sagas` and `/api/sagas`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    key: String,
    page: Option<u32>,
    limit: Option<u32>,
}

impl ListQuery {
    /// The store's filter, or what is wrong with the query.
    pub(crate) fn filter(&self) -> Result<ListFilter, PageError> {
        let status = match self.status.trim() {
            "" => None,
            s => Some(s.parse::<SagaStatus>().map_err(|_| {
                PageError::BadRequest(format!(
                    "unknown status `{s}`: one of running, compensating, completed, compensated, stuck, cancelled"
                ))
            })?),
        };
        let limit = self.limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(PageError::BadRequest("limit must be from 1 to 500".into()));
        }
        let page = self.page.unwrap_or(1).max(1);
        if u64::from(page - 1) * u64::from(limit) > u64::from(DEEPEST) {
            return Err(PageError::BadRequest(format!(
                "page {page} is too deep (past {DEEPEST} sagas): narrow the filters (status, name, key) \
                 or use `saga list --older-than`"
            )));
        }
        let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        Ok(ListFilter {
            status,
            saga: some(&self.name),
            business_key: some(&self.key),
            limit: Some(limit),
            offset: (page - 1).saturating_mul(limit),
            ..ListFilter::default()
        })
    }

    fn page(&self) -> u32 {
        self.page.unwrap_or(1).max(1)
    }

    /// This query's address with another page.
    fn with_page(&self, page: u32) -> String {
        let mut url = format!(
            "/sagas?status={}&name={}&key={}&page={page}",
            encode(&self.status),
            encode(&self.name),
            encode(&self.key)
        );
        if let Some(limit) = self.limit {
            url.push_str(&format!("&limit={limit}"));
        }
        url
    }
}

/// `/sagas`: sagas matching the filters, newest first, a page at a time.
pub(crate) async fn list(
    State(ui): State<Ui>,
    Query(query): Query<ListQuery>,
) -> Result<Html<String>, PageError> {
    let filter = query.filter()?;
    let sagas = ui.client.list(&filter).await?;
    let limit = filter.limit.unwrap_or(50);
    let full = sagas.len() as u32 == limit && filter.offset + limit <= DEEPEST;
    let page_no = query.page();
    let body = html! {
        h1 { "Sagas" }
        form.filters method="get" action="/sagas" {
            label { "status "
                select name="status" {
                    option value="" selected[query.status.is_empty()] { "any" }
                    @for s in SagaStatus::ALL {
                        option value=(s.as_str()) selected[query.status == s.as_str()] { (s.as_str()) }
                    }
                }
            }
            label { "name " input type="text" name="name" value=(query.name) size="14"; }
            label { "key " input type="text" name="key" value=(query.key) size="18"; }
            button type="submit" { "filter" }
        }
        (summaries(&sagas, "No saga matches."))
        p.pages {
            @if page_no > 1 { a #prev href=(query.with_page(page_no - 1)) { "← newer" } }
            span.muted { "page " (page_no) }
            " "
            @if full { a #next href=(query.with_page(page_no + 1)) { "older →" } }
        }
    };
    let refresh = Refresh {
        every: 5,
        watch: None,
        version: None,
    };
    Ok(Html(framed("Sagas", Some(refresh), body).into_string()))
}

/// A table of sagas, each linking to its page.
pub(crate) fn summaries(sagas: &[SagaSummary], none: &str) -> Markup {
    html! {
        @if sagas.is_empty() {
            p.muted { (none) }
        } @else {
            table.sagas {
                tr { th { "id" } th { "saga" } th { "status" } th { "key" } th { "started" } th { "updated" } th { "reason" } }
                @for s in sagas {
                    tr {
                        td.id { a href={ "/sagas/" (s.id) } { (s.id) } }
                        td { (s.saga) " v" (s.version) }
                        td { span class={ "status " (s.status.as_str()) } { (s.status.as_str()) } }
                        td { (s.business_key.as_deref().unwrap_or("")) }
                        td { (s.created_at.format("%Y-%m-%d %H:%M:%S")) }
                        td { (s.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                        td { (s.reason.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

/// Where `/login` goes back to.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Next {
    #[serde(default)]
    pub(crate) next: String,
}

/// `/login`: the form that takes the console's token.
pub(crate) async fn login(State(ui): State<Ui>, Query(next): Query<Next>) -> Html<String> {
    let body = html! {
        h1 { "Log in" }
        p { "Actions on this console need its token (" code { "SAGA_UI_TOKEN" } ")." }
        form.action method="post" action="/login" {
            input type="hidden" name="csrf" value=(ui.access.csrf());
            input type="hidden" name="next" value=(next.next);
            label { "token " input type="password" name="token" autocomplete="current-password"; }
            button type="submit" { "log in" }
        }
    };
    Html(page("Log in", body).into_string())
}

/// Percent-encodes a query value.
pub(crate) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
