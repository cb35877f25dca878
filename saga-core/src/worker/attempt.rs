//! Running one command: its handler, inside the inbox's transaction when the worker has one;
//! and answering fences.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument;

use super::Worker;
use super::handler::{CommandContext, ErasedHandler, TxSlot};
use crate::inbox::Claim;
use crate::message::{Command, Outcome};

/// How a handler's run ended.
enum Ran {
    Done(Result<Value, super::StepError>),
    Panicked(String),
    TimedOut(Duration),
}

/// Room a result takes besides its output (its ids, step, direction and status take a few
/// hundred bytes).
const REPLY_ROOM: usize = 1024;

/// How many attempts of a command no handler knows are answered retryable, with nothing
/// recorded, before the next is recorded as failed: a rolling deploy has that long to bring
/// the handler.
const UNKNOWN_COMMAND_RETRIES: u32 = 2;

/// How long a fence waits at most for a running delivery of its step to finish.
const FENCE_LOCK_WAIT: Duration = Duration::from_secs(30);

impl Worker {
    /// Runs `command`'s handler and says how it went. With an inbox, the handler runs in a
    /// transaction that claims the command's key first (a settled key answers without
    /// running it) and records the outcome with the handler's writes.
    pub(crate) async fn attempt(&self, command: &Command, trace_id: Option<String>) -> Outcome {
        let handler = self.handlers.get(&command.command);
        let ctx = CommandContext {
            trace_id,
            ..CommandContext::of(command)
        };
        let Some(inbox) = &self.inbox else {
            let Some(handler) = handler else {
                // Without an inbox, a retry guards nothing: the step fails for good.
                return Outcome::Failure {
                    error: self.unknown_command(command, false),
                    retryable: false,
                };
            };
            // An output too large to send is caught when the result is (`process`).
            return match self.run_handler(handler, command, ctx).await {
                Ran::Done(Ok(output)) => match self.sealed_output(command, output) {
                    Ok(output) => Outcome::Success { output },
                    Err(failure) => failure,
                },
                ran => failure(ran),
            };
        };
        let key = &command.idempotency_key;
        let tx = match inbox.claim(command, self.timeout_of(command)).await {
            Ok(Claim::Mine(tx)) => tx,
            Ok(Claim::Recorded(outcome)) => return outcome,
            Err(e) => return retryable(format!("the inbox cannot be reached: {e}")),
        };
        let Some(handler) = handler else {
            // A misspelt name, or a rolling deploy where an older build meets a newer
            // command. Its first attempts are answered retryable with nothing recorded, so
            // that a build with the handler may take a retry; a later one is recorded as
            // failed, so that no build applies a step its saga has given up on.
            let retry = command.attempt <= UNKNOWN_COMMAND_RETRIES;
            let why = self.unknown_command(command, retry);
            if retry {
                if let Err(e) = tx.rollback().await {
                    tracing::debug!(error = %e, "releasing the claim of an unknown command failed");
                }
                return retryable(why);
            }
            return recorded(inbox.fail(tx, command, &why).await);
        };
        let slot = TxSlot::new(tx);
        let ran = self
            .run_handler(
                handler,
                command,
                CommandContext {
                    tx: Some(slot.clone()),
                    ..ctx
                },
            )
            .await;
        let Some(tx) = slot.take().await else {
            return retryable("the handler kept its transaction after it returned".into());
        };
        match ran {
            Ran::Done(Ok(output)) => {
                // Recorded as it is sent: sealed.
                let output = match self.sealed_output(command, output) {
                    Ok(output) => output,
                    Err(Outcome::Failure {
                        error,
                        retryable: false,
                    }) => return recorded(inbox.fail(tx, command, &error).await),
                    Err(failure) => {
                        if let Err(e) = tx.rollback().await {
                            tracing::debug!(error = %e, "rolling back an unsealed output failed");
                        }
                        return failure;
                    }
                };
                if let Some(why) = self.too_large(command, &output) {
                    return recorded(inbox.fail(tx, command, &why).await);
                }
                match inbox.succeed(tx, key, &output).await {
                    Ok(()) => Outcome::Success { output },
                    // The commit may have gone through: a retry (or a fence) finds out.
                    Err(e) => retryable(format!("committing the step failed: {e}")),
                }
            }
            Ran::Done(Err(error)) if !error.is_retryable() => {
                recorded(inbox.fail(tx, command, &capped(error.message())).await)
            }
            ran => {
                if let Err(e) = tx.rollback().await {
                    tracing::debug!(error = %e, "rolling back a failed attempt failed");
                }
                failure(ran)
            }
        }
    }

    /// Why `command` cannot run here, logged as an error naming the commands this build
    /// handles; `retry` says whether it is answered retryable.
    fn unknown_command(&self, command: &Command, retry: bool) -> String {
        let mut known: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        known.sort_unstable();
        let why = capped(&format!(
            "service `{}` has no handler for command `{}` (this build handles: {})",
            self.service,
            command.command,
            known.join(", ")
        ));
        let then = if retry {
            "answering retryable, so that a build with the handler may take a retry"
        } else {
            "failing the step"
        };
        tracing::error!(
            service = %self.service,
            command = %command.command,
            saga.id = %command.saga_id,
            attempt = command.attempt,
            "{why}; {then}"
        );
        why
    }

    /// Runs the handler in a task of its own, so a panic or a hang past the command's
    /// timeout (or the worker's default) is a failed attempt; a hung handler is aborted.
    async fn run_handler(
        &self,
        handler: &Arc<dyn ErasedHandler>,
        command: &Command,
        ctx: CommandContext,
    ) -> Ran {
        let timeout = self.timeout_of(command);
        let mut task = tokio::spawn(
            Arc::clone(handler)
                .call(command.payload.clone(), ctx)
                .in_current_span(),
        );
        match tokio::time::timeout(timeout, &mut task).await {
            Ok(Ok(result)) => Ran::Done(result),
            Ok(Err(join)) => Ran::Panicked(panic_message(join)),
            Err(_) => {
                task.abort();
                // Once it has ended, it holds no lock on the transaction.
                let _ = task.await;
                Ran::TimedOut(timeout)
            }
        }
    }

    /// A handler's output, sealed; or the failure that answers instead: terminal for an output
    /// of the sealed shape (only the codec writes those), retryable if sealing fails.
    fn sealed_output(&self, command: &Command, output: Value) -> Result<Value, Outcome> {
        if let Err(e) = crate::codec::refuse_sealed_shape(&output, "the handler's output") {
            return Err(Outcome::Failure {
                error: format!("command `{}`: {e}", command.command),
                retryable: false,
            });
        }
        self.payloads
            .seal(output)
            .map_err(|e| retryable(format!("sealing the output failed: {e}")))
    }

    /// How long `command` may run: its attempt's timeout, or the worker's default.
    fn timeout_of(&self, command: &Command) -> Duration {
        command
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.default_timeout)
    }

    /// Why the result of `command` with `output` would be too large to send, if it would:
    /// the output's size and room for the rest of the result (one serialization of the
    /// output, before the commit that records it).
    fn too_large(&self, command: &Command, output: &Value) -> Option<String> {
        let size = serde_json::to_vec(output).map_or(usize::MAX, |b| b.len());
        let limit = self.max_message_bytes.saturating_sub(REPLY_ROOM);
        (size > limit).then(|| {
            format!(
                "the output of command `{}` is too large: {size} bytes, over the limit of \
                 {} bytes less {REPLY_ROOM} for the rest of the result",
                command.command, self.max_message_bytes
            )
        })
    }

    /// Answers a fence of `command`'s step from the inbox: applied (with the recorded
    /// output), or fenced (a tombstone written, or a terminal failure recorded). A worker
    /// without an inbox cannot fence (`unfenceable`): the command counts as applied.
    pub(crate) async fn fence(&self, command: &Command) -> Outcome {
        let Some(inbox) = &self.inbox else {
            return Outcome::Unfenceable {
                detail: format!(
                    "service `{}` runs without an inbox (an at-least-once worker): it cannot fence step `{}`",
                    self.service, command.step_name
                ),
            };
        };
        let wait = self.timeout_of(command).min(FENCE_LOCK_WAIT);
        match inbox
            .fence(
                &command.idempotency_key,
                command.saga_id,
                &command.command,
                wait,
            )
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => retryable(format!("fencing failed: {e}")),
        }
    }
}

fn failure(ran: Ran) -> Outcome {
    match ran {
        Ran::Done(Ok(output)) => Outcome::Success { output },
        Ran::Done(Err(error)) => Outcome::Failure {
            error: capped(error.message()),
            retryable: error.is_retryable(),
        },
        Ran::Panicked(message) => retryable(format!("handler panicked: {message}")),
        Ran::TimedOut(timeout) => retryable(format!("handler did not finish within {timeout:?}")),
    }
}

/// The longest error message recorded or sent: longer ones are cut, so a failure always
/// fits in a result.
const MAX_ERROR: usize = 4096;

/// `error`, cut to [`MAX_ERROR`] bytes (at a character boundary).
pub(super) fn capped(error: &str) -> String {
    if error.len() <= MAX_ERROR {
        return error.to_owned();
    }
    let mut end = MAX_ERROR;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &error[..end], error.len())
}

/// The answer once a terminal failure is recorded (or what another delivery recorded first).
fn recorded(result: crate::error::Result<Outcome>) -> Outcome {
    result.unwrap_or_else(|e| retryable(format!("recording the failure failed: {e}")))
}

fn retryable(error: String) -> Outcome {
    Outcome::Failure {
        error,
        retryable: true,
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => crate::decide::panic_message(payload.as_ref()),
        Err(join) => join.to_string(),
    }
}
