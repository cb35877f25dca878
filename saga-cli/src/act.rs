//! The actions on one saga as the CLI and the console both run them: the client's call, and
//! the words that say it was done.

use saga_core::{Client, OperatorAction};
use serde_json::Value;
use uuid::Uuid;

/// An action on one saga.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send a signal with its payload.
    Signal { name: String, payload: Value },
    /// Cancel (refused once the pivot started).
    Cancel { reason: String },
    /// Retry, resolve, pause or resume.
    Operator(OperatorAction),
}

/// Runs `action` on saga `id` and waits for its verdict; says what was done.
pub(crate) async fn perform(
    client: &Client,
    id: Uuid,
    action: Action,
) -> saga_core::Result<String> {
    match action {
        Action::Signal { name, payload } => {
            client.signal(id, &name, &payload).await?;
            Ok(format!("signal `{name}` recorded"))
        }
        Action::Cancel { reason } => {
            client.cancel(id, &reason).await?;
            Ok("cancel accepted; it compensates".to_owned())
        }
        Action::Operator(action) => {
            let done = match &action {
                OperatorAction::Retry => "retrying its failed step".to_owned(),
                OperatorAction::Resolve { step, .. } => {
                    format!("compensation of `{step}` resolved by hand")
                }
                OperatorAction::Pause { .. } => "paused".to_owned(),
                OperatorAction::Resume => "resumed".to_owned(),
                other => format!("{} done", other.name()),
            };
            client.act(id, action).await?;
            Ok(done)
        }
    }
}
