//! `/sagas/{id}`: a saga's header, its timeline drawn as SVG, the actions that apply to its
//! state, its input and its event log.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Html;
use chrono::Utc;
use maud::{Markup, html};
use saga_core::store::SagaSummary;
use saga_core::{Direction, Event, Payloads, RecordedEvent, SagaStatus};
use serde::Deserialize;
use uuid::Uuid;

use super::guard::Actions;
use super::layout::{Refresh, framed};
use super::pages::encode;
use super::{PageError, Ui, svg};

/// The flash an action left for this page.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct SagaQuery {
    flash: Option<Uuid>,
}

/// `/sagas/{id}`.
pub(crate) async fn saga(
    State(ui): State<Ui>,
    Path(id): Path<String>,
    Query(query): Query<SagaQuery>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let summary = ui.saga(&id).await?;
    let id = summary.id;
    let history = ui.client.history(id).await?;
    let flash = ui.flash_of(query.flash);
    let actions = ui.access.actions(&headers);
    let body = render(
        &summary,
        &history,
        flash.as_ref(),
        &actions,
        ui.access.csrf(),
    );
    let refresh = (!summary.status.is_terminal()).then(|| Refresh {
        every: 2,
        watch: Some(format!("/api/sagas/{id}?events=false")),
        version: Some(
            summary
                .updated_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
    });
    let title = format!("{} {}", summary.saga, short(id));
    Ok(Html(framed(&title, refresh, body).into_string()))
}

/// The page's body (also what the render bench measures).
pub(crate) fn render(
    summary: &SagaSummary,
    history: &[RecordedEvent],
    flash: Option<&super::Flash>,
    actions: &Actions,
    csrf: &str,
) -> Markup {
    let steps = saga_core::timeline::step_names(None, history);
    let lines = saga_core::timeline::describe(None, history);
    let mut services: HashMap<u32, String> = HashMap::new();
    for r in history {
        if let Event::Dispatched {
            step,
            direction: Direction::Forward,
            service: Some(service),
            ..
        } = &r.event
        {
            services.entry(*step).or_insert_with(|| service.clone());
        }
    }
    let end = if summary.status.is_terminal() {
        history.last().map_or(summary.updated_at, |r| r.at)
    } else {
        Utc::now().max(history.last().map_or(summary.updated_at, |r| r.at))
    };
    let start = history.first().map_or(summary.created_at, |r| r.at);
    let paused = history
        .iter()
        .rev()
        .find_map(|r| match &r.event {
            Event::Paused { reason, .. } => Some(Some(reason.clone())),
            Event::Resumed { .. } => Some(None),
            _ => None,
        })
        .flatten();
    let stuck = history.iter().rev().find_map(|r| match &r.event {
        Event::Stuck {
            step, direction, ..
        } => Some((*step, *direction)),
        _ => None,
    });
    let input = match history.first().map(|r| &r.event) {
        Some(Event::Started { input, .. }) => {
            serde_json::to_string_pretty(&Payloads::masked(input)).unwrap_or_default()
        }
        _ => String::new(),
    };
    html! {
        h1 { (summary.saga) " v" (summary.version) " "
            span #status class={ "status " (summary.status.as_str()) } { (summary.status.as_str()) }
            @if paused.is_some() { " " span.status { "paused" } }
        }
        @if let Some(flash) = flash {
            p #flash class={ "flash" @if !flash.ok { " error" } } { (flash.text) }
        }
        table.header {
            tr { th { "id" } td.id { (summary.id) } }
            @if let Some(key) = &summary.business_key { tr { th { "key" } td { (key) } } }
            @if let Some(reason) = &summary.reason { tr { th { "reason" } td #reason { (reason) } } }
            @if let Some(reason) = &paused { tr { th { "paused" } td { (reason) } } }
            tr { th { "started" } td { (summary.created_at.format("%Y-%m-%d %H:%M:%S%.3f UTC")) } }
            tr { th { "updated" } td { (summary.updated_at.format("%Y-%m-%d %H:%M:%S%.3f UTC")) } }
        }
        h2 { "Timeline" }
        (svg::render(&steps, &services, history, end))
        (svg::legend())
        h2 { "Actions" }
        (action_forms(summary, &steps, stuck, paused.is_some(), actions, csrf))
        h2 { "Input" }
        pre #input { (input) }
        h2 { "Events" }
        table #events {
            tr { th.num { "#" } th.num { "ms" } th { "event" } th { "what" } }
            @for (r, line) in history.iter().zip(&lines) {
                tr {
                    td.num { (r.seq) }
                    td.num { (format!("{:.1}", (r.at - start).num_microseconds().unwrap_or(0) as f64 / 1000.0)) }
                    td { code { (r.event.kind()) } }
                    td { (line) }
                }
            }
        }
    }
}

/// The forms of the actions that apply to the saga's state, or why there are none.
fn action_forms(
    summary: &SagaSummary,
    steps: &[String],
    stuck: Option<(u32, Direction)>,
    paused: bool,
    actions: &Actions,
    csrf: &str,
) -> Markup {
    let id = summary.id;
    let status = summary.status;
    if status.is_terminal() {
        return html! { p.muted { "Finished: no action applies." } };
    }
    match actions {
        Actions::Allowed => {}
        Actions::NeedToken => {
            return html! {
                p { a href={ "/login?next=" (encode(&format!("/sagas/{id}"))) } { "Log in with the console's token" } " to act on this saga." }
            };
        }
        Actions::Off(why) => return html! { p.muted { "Actions are off: " (why) "." } },
    }
    let form = |action: &str, label: &str, fields: Markup| {
        html! {
            form.action method="post" action={ "/sagas/" (id) "/" (action) } {
                input type="hidden" name="csrf" value=(csrf);
                (fields)
                button type="submit" name="do" value=(action) { (label) }
            }
        }
    };
    // A compensation stuck can be resolved by hand, for its own step only.
    let resolvable = match stuck {
        Some((step, Direction::Compensation)) if status == SagaStatus::Stuck => steps
            .get(step as usize)
            .cloned()
            .or_else(|| Some(format!("#{step}"))),
        _ => None,
    };
    html! {
        @if status == SagaStatus::Stuck {
            (form("retry", "retry the failed step", html! {}))
        }
        @if let Some(step) = &resolvable {
            (form("resolve", "resolve by hand", html! {
                input type="hidden" name="step" value=(step);
                span { "compensation of " code { (step) } " done by hand: " }
                input type="text" name="reason" placeholder="what was done, and why" required size="28";
            }))
        }
        @if status == SagaStatus::Running {
            (form("cancel", "cancel", html! {
                input type="text" name="reason" placeholder="why" required size="20";
            }))
        }
        @if paused {
            (form("resume", "resume", html! {}))
        } @else if status.is_active() {
            (form("pause", "pause", html! {
                input type="text" name="reason" placeholder="why" size="20";
            }))
        }
        (form("signal", "send signal", html! {
            input type="text" name="name" placeholder="signal name" required size="14";
            textarea name="payload" rows="1" cols="24" placeholder="JSON payload" { "{}" }
        }))
    }
}

/// The first part of an id, for titles.
fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_owned()
}
