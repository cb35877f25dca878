//! One delivery, end to end: check it, run it (or fence), publish the result, then ack.

use tracing::{Instrument, error, info, info_span, warn};

use super::Worker;
use crate::event::Direction;
use crate::message::{Command, Outcome, Reply, headers, oversize};
use crate::transport::{Delivery, Transport};

impl Worker {
    pub(super) async fn process(&self, transport: &dyn Transport, delivery: Delivery) {
        if let Some(why) = oversize(&delivery.message.body, self.max_message_bytes) {
            let answer = self.unreadable(&delivery, &why).await;
            return self.refuse(transport, delivery, answer, &why).await;
        }
        let mut command = match Command::from_message(&delivery.message) {
            Ok(command) => command,
            Err(malformed) => {
                let answer = self.unreadable(&delivery, &malformed.0).await;
                return self.refuse(transport, delivery, answer, &malformed.0).await;
            }
        };
        if command.service != self.service {
            // Another service's command: this inbox is not where its step is recorded.
            let why = format!(
                "command for service `{}` reached service `{}`",
                command.service, self.service
            );
            let answer = Some(Reply::to(&command, self.refusal(&why)));
            return self.refuse(transport, delivery, answer, &why).await;
        }
        let traceparent = delivery.message.headers.get(headers::TRACEPARENT);
        let trace_id = traceparent
            .and_then(|t| t.split('-').nth(1))
            .map(str::to_owned);
        let span = info_span!(
            "step",
            saga.id = %command.saga_id,
            saga.name = %command.saga,
            step = %command.step_name,
            direction = %command.direction,
            attempt = command.attempt,
            trace_id = trace_id.as_deref().unwrap_or(""),
        );
        #[cfg(feature = "otel")]
        crate::otel::adopt(&span, traceparent.map(String::as_str));
        async {
            let began = std::time::Instant::now();
            let outcome = match command.direction {
                Direction::Fence => self.fence(&command).await,
                _ => match self.payloads.open_in(&mut command) {
                    Ok(()) => self.attempt(&command, trace_id.clone()).await,
                    Err(e) => {
                        // A key not rolled out here yet may come (nothing is recorded, so a
                        // worker that holds it may take a retry); a payload that does not
                        // decrypt never will.
                        error!(service = %self.service, error = %e, "cannot read a command's input");
                        Outcome::Failure {
                            error: format!(
                                "service `{}` cannot read the input of command `{}`: {e}",
                                self.service, command.command
                            ),
                            retryable: e.is_transient(),
                        }
                    }
                },
            };
            let outcome = self.sealed(outcome);
            let label = match &outcome {
                Outcome::Success { .. } => "success",
                Outcome::Failure {
                    retryable: true, ..
                } => "retryable",
                Outcome::Failure {
                    retryable: false, ..
                } => "terminal",
                Outcome::Fenced { .. } => "fenced",
                Outcome::Unfenceable { .. } => "unfenceable",
            };
            let command_label = match command.direction {
                Direction::Fence => format!("fence:{}", command.command),
                _ => command.command.clone(),
            };
            self.metrics
                .attempt(&self.service, &command_label, label, began.elapsed());
            match &outcome {
                Outcome::Failure {
                    error,
                    retryable: true,
                } => warn!(%error, "step attempt failed; it may be retried"),
                Outcome::Failure {
                    error,
                    retryable: false,
                } => info!(%error, "step failed terminally"),
                Outcome::Fenced { detail } => info!(%detail, "step fenced"),
                Outcome::Unfenceable { detail } => info!(%detail, "cannot fence"),
                Outcome::Success { .. } => {}
            }
            let mut reply = Reply::to(&command, outcome);
            let mut envelope = reply.to_envelope();
            if let Some(why) = oversize(&envelope.message.body, self.max_message_bytes) {
                // Only a worker without an inbox gets here (one with checks before its
                // commit): the effect may have applied, so the step's outcome is unknown.
                warn!(reason = %why, "the result is too large to send");
                reply.outcome = Outcome::Failure {
                    error: format!(
                        "the result of command `{}` is too large: {why}",
                        command.command
                    ),
                    retryable: true,
                };
                envelope = reply.to_envelope();
            }
            match transport.publish(vec![envelope]).await {
                Ok(()) => {
                    if let Err(e) = delivery.ack().await {
                        warn!(error = %e, "ack failed; the broker redelivers the command unless the ack still reaches it");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "publishing the result failed; handing the command back");
                    let _ = delivery.requeue().await;
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The answer to a command whose body this worker cannot read, when its headers name it:
    /// with an inbox, the command's key is fenced (another copy of it, read by a worker that
    /// can, will not apply it later), and the answer is what the inbox holds (`fenced`, or the
    /// recorded outcome); without one, a terminal failure.
    async fn unreadable(&self, delivery: &Delivery, why: &str) -> Option<Reply> {
        let message = &delivery.message;
        let refused = || Reply::from_headers(message, self.refusal(why));
        let Some(inbox) = &self.inbox else {
            return refused();
        };
        let header = |name: &str| message.headers.get(name).map(String::as_str);
        let (Some(key), Some(saga_id), Some(command)) = (
            header(headers::IDEMPOTENCY_KEY),
            header(headers::SAGA_ID).and_then(|id| id.parse().ok()),
            header(headers::COMMAND),
        ) else {
            return refused();
        };
        let wait = std::time::Duration::from_secs(5);
        match inbox.fence(key, saga_id, command, wait).await {
            Ok(outcome) => Reply::from_headers(message, outcome),
            Err(e) => {
                warn!(error = %e, "fencing an unreadable command failed");
                refused()
            }
        }
    }

    /// `outcome` with its output sealed, as every result leaves the worker (an output the
    /// inbox recorded, or one [`attempt`](Self::attempt) sealed, is sealed already); a failure
    /// to seal is a retryable failure.
    fn sealed(&self, mut outcome: Outcome) -> Outcome {
        match self.payloads.seal_in_once(&mut outcome) {
            Ok(()) => outcome,
            Err(e) => {
                error!(service = %self.service, error = %e, "cannot seal a step's output");
                Outcome::Failure {
                    error: format!("service `{}` cannot seal the output: {e}", self.service),
                    retryable: true,
                }
            }
        }
    }

    /// The terminal failure that answers a command this worker will not run.
    fn refusal(&self, why: &str) -> Outcome {
        Outcome::Failure {
            error: super::attempt::capped(&format!(
                "service `{}` cannot run this command: {why}",
                self.service
            )),
            retryable: false,
        }
    }

    /// Answers a command the worker will not run (when its headers say which it is), so its
    /// saga does not wait for a result that never comes, then dead-letters it with `why`.
    async fn refuse(
        &self,
        transport: &dyn Transport,
        delivery: Delivery,
        answer: Option<Reply>,
        why: &str,
    ) {
        warn!(service = %self.service, reason = %why, "dead-lettering a command");
        self.metrics.dead_lettered(&self.service);
        if let Some(answer) = answer
            && let Err(e) = transport
                .publish(vec![
                    Reply {
                        outcome: self.sealed(answer.outcome),
                        ..answer
                    }
                    .to_envelope(),
                ])
                .await
        {
            // The step's timeout answers for it.
            warn!(error = %e, "answering a dead-lettered command failed");
        }
        if let Err(e) = delivery.dead_letter(why).await {
            warn!(error = %e, "dead-lettering failed");
        }
    }
}
