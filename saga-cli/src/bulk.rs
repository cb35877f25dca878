//! Acting on every saga a filter matches: `saga retry --status stuck --name order`.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use anyhow::bail;
use saga_core::store::ListFilter;
use saga_core::{Client, OperatorAction, SagaStatus};
use uuid::Uuid;

/// How many sagas one page of the search holds.
const PAGE: u32 = 500;

/// Retries every saga in `status` (of the saga `name`, if given), after saying how many and
/// asking (unless `yes`); prints what was done to each that refused, and the counts.
pub(crate) async fn retry_matching(
    client: &Client,
    status: SagaStatus,
    name: Option<String>,
    yes: bool,
    json: bool,
) -> anyhow::Result<()> {
    if status != SagaStatus::Stuck {
        bail!("only stuck sagas can be retried; `--status {status}` matches none that can");
    }
    let ids = matching(client, status, name.clone()).await?;
    let what = match &name {
        Some(name) => format!("{} {status} `{name}` sagas", ids.len()),
        None => format!("{} {status} sagas", ids.len()),
    };
    if !ids.is_empty() && !yes && !confirmed(&what)? {
        bail!("nothing done");
    }
    let mut refused = Vec::new();
    for id in &ids {
        match client.act(*id, OperatorAction::Retry).await {
            Ok(()) => {}
            Err(e @ saga_core::Error::ActionRefused { .. }) => {
                refused.push((*id, saga_core::error::report(&e)));
            }
            // No orchestrator answered: this request stays queued and will apply; the others
            // are not sent one by one into the same silence.
            Err(e @ saga_core::Error::NotAnswered { .. }) => {
                bail!("{e}; the sagas after it were not asked (is an orchestrator running?)")
            }
            Err(e) => return Err(e.into()),
        }
    }
    let retried = ids.len() - refused.len();
    if json {
        let refused: Vec<_> = refused
            .iter()
            .map(|(id, why)| serde_json::json!({ "saga_id": id, "why": why }))
            .collect();
        let line = serde_json::json!({
            "matched": ids.len(),
            "retried": retried,
            "refused": refused,
        });
        writeln!(std::io::stdout(), "{line}")?;
    } else {
        for (_, why) in &refused {
            writeln!(std::io::stdout(), "refused: {why}")?;
        }
        writeln!(
            std::io::stdout(),
            "{what} matched: {retried} retried, {} refused",
            refused.len()
        )?;
    }
    Ok(())
}

/// The ids of every saga in `status` (of `name`), newest first.
async fn matching(
    client: &Client,
    status: SagaStatus,
    name: Option<String>,
) -> anyhow::Result<Vec<Uuid>> {
    let mut ids: Vec<Uuid> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0;
    loop {
        let page = client
            .list(&ListFilter {
                status: Some(status),
                saga: name.clone(),
                limit: Some(PAGE),
                offset,
                ..ListFilter::default()
            })
            .await?;
        let full = page.len() == PAGE as usize;
        offset += page.len() as u32;
        // A saga that changed status between pages may come twice: it is asked once.
        ids.extend(page.into_iter().map(|s| s.id).filter(|id| seen.insert(*id)));
        if !full {
            return Ok(ids);
        }
    }
}

/// Asks on the terminal whether to act on `what`; refuses, saying how to go on, when there
/// is no terminal to ask on.
fn confirmed(what: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{what} match; pass --yes to retry them without being asked (no terminal to ask on)");
    }
    eprint!("retry {what}? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
