//! The frame of every page, its style sheet and its one small script.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use maud::{DOCTYPE, Markup, html};

/// A whole page: the header with its links, then `body`.
pub(crate) fn page(title: &str, body: Markup) -> Markup {
    framed(title, None, body)
}

/// A page that reloads itself every `every` seconds while nobody is filling in a form; with
/// `watch` (an API address and the version shown), only when that version changes.
pub(crate) fn framed(title: &str, refresh: Option<Refresh>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · saga" }
                link rel="stylesheet" href="/style.css";
            }
            body data-refresh=[refresh.as_ref().map(|r| r.every)]
                data-watch=[refresh.as_ref().and_then(|r| r.watch.clone())]
                data-version=[refresh.as_ref().and_then(|r| r.version.clone())] {
                header {
                    a.brand href="/" { "saga" }
                    nav {
                        a href="/" { "overview" }
                        a href="/sagas" { "sagas" }
                        a href="/sagas?status=stuck" { "stuck" }
                        a href="/sagas?status=running" { "running" }
                    }
                }
                main { (body) }
                script src="/console.js" {}
            }
        }
    }
}

/// How a page refreshes itself.
#[derive(Debug, Clone)]
pub(crate) struct Refresh {
    /// Seconds between looks.
    pub every: u32,
    /// An `/api` address whose `saga.updated_at` is compared with `version`.
    pub watch: Option<String>,
    /// The version shown.
    pub version: Option<String>,
}

/// `/style.css`.
pub(crate) async fn style() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// `/console.js`.
pub(crate) async fn script() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT)
}

const STYLE: &str = r#"
:root { --ok:#2e9e5b; --compensated:#7c5cc4; --failed:#d64545; --retried:#ef9a2e;
  --timedout:#c9a400; --waiting:#8fb5dc; --fence:#7d7d7d; --pending:#3a78e0; --skipped:#c8ced6; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1f2328; background: #fafbfc; }
header { display: flex; gap: 2em; align-items: center; padding: .6em 1.5em; background: #24292f; }
header a { color: #e6edf3; text-decoration: none; margin-right: 1.2em; }
header a.brand { font-weight: 700; font-size: 1.2em; }
main { padding: 1em 1.5em; max-width: 1100px; }
h1 { font-size: 1.35em; margin: .4em 0; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e4e7eb; vertical-align: top; }
th { background: #f0f2f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, td.id { font-family: ui-monospace, monospace; font-size: 12.5px; }
pre { background: #fff; border: 1px solid #e4e7eb; padding: .6em; overflow: auto; max-height: 20em; }
.status { padding: 0 .45em; border-radius: 3px; color: #fff; background: #888; }
.status.completed { background: var(--ok); } .status.compensated { background: var(--compensated); }
.status.stuck { background: var(--failed); } .status.running { background: var(--pending); }
.status.compensating { background: var(--retried); } .status.cancelled { background: var(--fence); }
.flash { padding: .5em .8em; border-radius: 4px; background: #e6f4ea; border: 1px solid var(--ok); }
.flash.error { background: #fdecea; border-color: var(--failed); }
form.filters, form.action { display: inline-flex; gap: .4em; align-items: center; margin: .2em .6em .2em 0; }
form.action { border: 1px solid #e4e7eb; padding: .4em .6em; background: #fff; border-radius: 4px; }
input, select, button, textarea { font: inherit; }
button { cursor: pointer; }
svg.timeline { background: #fff; border: 1px solid #e4e7eb; max-width: 100%; height: auto; }
svg .row { fill: #fff; } svg .row.odd { fill: #f6f8fa; }
svg .grid { stroke: #d8dee4; stroke-dasharray: 2 3; } svg .tick { font-size: 11px; fill: #57606a; }
svg .marker { stroke-width: 1; stroke-dasharray: 4 2; } svg .mark { font-size: 10px; }
svg .marker.stop { stroke: var(--failed); } svg .mark.stop { fill: var(--failed); }
svg .marker.operator { stroke: #24292f; } svg .mark.operator { fill: #24292f; }
svg .marker.end { stroke: #57606a; } svg .mark.end { fill: #57606a; }
svg .step { font-size: 13px; font-weight: 600; } svg .service { font-size: 11px; fill: #57606a; }
.bar.ok, .swatch.ok { fill: var(--ok); background: var(--ok); }
.bar.compensated, .swatch.compensated { fill: var(--compensated); background: var(--compensated); }
.bar.failed, .swatch.failed { fill: var(--failed); background: var(--failed); }
.bar.retried, .swatch.retried { fill: var(--retried); background: var(--retried); }
.bar.timedout, .swatch.timedout { fill: var(--timedout); background: var(--timedout); }
.bar.waiting, .swatch.waiting { fill: var(--waiting); background: var(--waiting); }
.bar.fence, .swatch.fence { fill: var(--fence); background: var(--fence); }
.bar.pending, .swatch.pending { fill: var(--pending); background: var(--pending); }
.bar.skipped, .swatch.skipped { fill: var(--skipped); background: var(--skipped); }
ul.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1em; color: #57606a; }
.swatch { display: inline-block; width: 1em; height: .8em; margin-right: .3em; border-radius: 2px; }
.pages a { margin-right: 1em; } .muted { color: #57606a; }
"#;

const SCRIPT: &str = r#"
// Keeps a page of sagas that may still change up to date, unless a form is being filled in.
(function () {
  var every = Number(document.body.dataset.refresh || 0);
  if (!every) return;
  function busy() {
    var a = document.activeElement;
    if (a && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName)) return true;
    return Array.prototype.some.call(document.querySelectorAll('form.action input, form.action textarea'),
      function (e) { return e.type !== 'hidden' && e.value !== e.defaultValue; });
  }
  setInterval(function () {
    if (busy()) return;
    var watch = document.body.dataset.watch;
    if (!watch) { location.reload(); return; }
    fetch(watch).then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
      if (j && j.saga && j.saga.updated_at !== document.body.dataset.version) location.reload();
    }).catch(function () {});
  }, every * 1000);
})();
"#;
