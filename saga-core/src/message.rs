//! The messages that cross the transport: commands to participants and their results.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::event::{Direction, StepAttempt};

/// The version of the message schema this crate writes. It reads this version and version 1.
///
/// Version 2 added the `fence` direction, the `fenced` outcome and the command's time to live
/// ([`headers::TTL_MS`]). A worker of version 1 dead-letters version-2 messages, so a fence
/// never reaches a runtime that would run the step's handler instead; upgrade workers before
/// orchestrators.
pub const SCHEMA_VERSION: u32 = 2;

/// The oldest message schema version this crate reads.
pub const OLDEST_SCHEMA_VERSION: u32 = 1;

/// The default size limit of a message body, enforced on publish and on consume.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Why a message body is refused, or `None` if it is within `limit`.
pub fn oversize(body: &[u8], limit: usize) -> Option<String> {
    (body.len() > limit).then(|| {
        format!(
            "message of {} bytes exceeds the limit of {limit} bytes",
            body.len()
        )
    })
}

/// A command for a participant: run one step (or undo it) for one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per attempt; the result must echo it.
    pub command_id: Uuid,
    /// The saga instance.
    pub saga_id: Uuid,
    /// The saga definition's name.
    pub saga: String,
    /// The step's position.
    pub step: u32,
    /// The step's name.
    pub step_name: String,
    /// Action or compensation.
    pub direction: Direction,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The participant service.
    pub service: String,
    /// The command's name, which selects the handler.
    pub command: String,
    /// The same for every delivery and every retry of this step in this direction. For a
    /// fence, the key of the action it fences.
    pub idempotency_key: String,
    /// How long the orchestrator waits for this attempt, if it has a timeout.
    pub timeout_ms: Option<u64>,
    /// The Rust type the saga built the input as (`std::any::type_name`), when it was built
    /// as a type rather than as raw JSON: informational, for the error a handler that reads
    /// another type reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_type: Option<String>,
    /// The command's input.
    pub payload: Value,
}

impl Command {
    /// The attempt this command runs.
    pub fn step_attempt(&self) -> StepAttempt {
        StepAttempt::new(self.step, self.direction, self.attempt)
    }

    /// The idempotency key of a step in a direction: `saga_id:step:direction`.
    pub fn idempotency_key_for(saga_id: Uuid, step: u32, direction: Direction) -> String {
        Self::idempotency_key_at(saga_id, step, direction, 0)
    }

    /// The idempotency key of a step in a direction after `generation` operator retries
    /// under a fresh key: `saga_id:step:direction`, then `saga_id:step:direction:N`.
    pub fn idempotency_key_at(
        saga_id: Uuid,
        step: u32,
        direction: Direction,
        generation: u32,
    ) -> String {
        match generation {
            0 => format!("{saga_id}:{step}:{direction}"),
            n => format!("{saga_id}:{step}:{direction}:{n}"),
        }
    }
}

/// What a participant reports about a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The saga instance.
    pub saga_id: Uuid,
    /// The step's position.
    pub step: u32,
    /// Action or compensation.
    pub direction: Direction,
    /// The attempt.
    pub attempt: u32,
    /// The command this answers.
    pub command_id: Uuid,
    /// Success with an output, or a failure.
    pub outcome: Outcome,
}

impl Reply {
    /// The attempt this reply answers.
    pub fn step_attempt(&self) -> StepAttempt {
        StepAttempt::new(self.step, self.direction, self.attempt)
    }

    /// The reply to `command` with `outcome`.
    pub fn to(command: &Command, outcome: Outcome) -> Self {
        Self {
            saga_id: command.saga_id,
            step: command.step,
            direction: command.direction,
            attempt: command.attempt,
            command_id: command.command_id,
            outcome,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The step did its work.
    Success {
        /// The handler's output.
        output: Value,
    },
    /// The step did not do its work.
    Failure {
        /// Why.
        error: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// The command did not apply and never will: its service holds a tombstone (or a
    /// recorded terminal failure) under its idempotency key. The answer to a fence, and to
    /// any delivery of a fenced command.
    Fenced {
        /// What the service found.
        detail: String,
    },
    /// The answer to a fence from a worker without an inbox: it cannot tell whether the
    /// command applied, nor stop a later delivery, so the command counts as applied.
    Unfenceable {
        /// Why.
        detail: String,
    },
}

/// Header names used on every message; their values are strings.
pub mod headers {
    /// The message's id.
    pub const MESSAGE_ID: &str = "x-saga-message-id";
    /// The saga instance.
    pub const SAGA_ID: &str = "x-saga-id";
    /// The step's position.
    pub const STEP: &str = "x-saga-step";
    /// `forward` or `compensation`.
    pub const DIRECTION: &str = "x-saga-direction";
    /// The attempt.
    pub const ATTEMPT: &str = "x-saga-attempt";
    /// The command id.
    pub const COMMAND_ID: &str = "x-saga-command-id";
    /// The command's name.
    pub const COMMAND: &str = "x-saga-command";
    /// The idempotency key.
    pub const IDEMPOTENCY_KEY: &str = "x-saga-idempotency-key";
    /// Always `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The message schema version.
    pub const SCHEMA_VERSION: &str = "x-saga-schema-version";
    /// Why a message was dead-lettered.
    pub const REJECT_REASON: &str = "x-saga-reject-reason";
    /// How long a command is wanted, in milliseconds from its publish: its attempt's timeout.
    /// The broker drops (dead-letters) it once that has passed unconsumed.
    pub const TTL_MS: &str = "x-saga-ttl-ms";
    /// W3C trace context: one trace per saga (the trace id is the saga id), whose root span
    /// is the parent of every step attempt.
    pub const TRACEPARENT: &str = "traceparent";
}

/// Where a message goes: a participant service's queue, or the orchestrators' results queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Destination {
    /// The queue of a participant service.
    Service(String),
    /// The orchestrators' shared results queue.
    Results,
}

impl Destination {
    /// A compact text form: `service:NAME` or `results`.
    pub fn encode(&self) -> String {
        match self {
            Destination::Service(name) => format!("service:{name}"),
            Destination::Results => "results".to_owned(),
        }
    }

    /// Parses [`Destination::encode`]'s form.
    pub fn decode(text: &str) -> Option<Self> {
        match text {
            "results" => Some(Destination::Results),
            _ => text
                .strip_prefix("service:")
                .map(|name| Destination::Service(name.to_owned())),
        }
    }
}

/// A message as the transport carries it: headers and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Unique per message; used by the transport for confirms and tracing.
    pub id: Uuid,
    /// String headers (see [`headers`]).
    pub headers: BTreeMap<String, String>,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// A message and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Where it goes.
    pub destination: Destination,
    /// What it carries.
    pub message: Message,
}

/// A message that cannot be accepted; the reason goes into the dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn common_headers(
    id: Uuid,
    saga_id: Uuid,
    step: u32,
    direction: Direction,
    attempt: u32,
    command_id: Uuid,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (headers::MESSAGE_ID.to_owned(), id.to_string()),
        (headers::SAGA_ID.to_owned(), saga_id.to_string()),
        (headers::STEP.to_owned(), step.to_string()),
        (headers::DIRECTION.to_owned(), direction.to_string()),
        (headers::ATTEMPT.to_owned(), attempt.to_string()),
        (headers::COMMAND_ID.to_owned(), command_id.to_string()),
        (
            headers::CONTENT_TYPE.to_owned(),
            "application/json".to_owned(),
        ),
        (
            headers::SCHEMA_VERSION.to_owned(),
            SCHEMA_VERSION.to_string(),
        ),
        (headers::TRACEPARENT.to_owned(), traceparent(saga_id)),
    ])
}

/// `00-<saga id>-<root span id>-01`: the trace id is the saga id, and the parent is the saga's
/// root span, whose id is the saga id's last 8 bytes (see the `otel` feature's module).
pub fn traceparent(saga_id: Uuid) -> String {
    let span: String = saga_id.as_bytes()[8..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("00-{}-{span}-01", saga_id.simple())
}

fn check_schema(message: &Message) -> Result<(), Malformed> {
    match message.headers.get(headers::SCHEMA_VERSION) {
        None => Ok(()),
        Some(v)
            if v.parse::<u32>()
                .is_ok_and(|v| (OLDEST_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&v)) =>
        {
            Ok(())
        }
        Some(v) => Err(Malformed(format!(
            "unsupported schema version {v} (this build reads {OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION})"
        ))),
    }
}

impl Command {
    /// The envelope that carries this command to its service.
    pub fn to_envelope(&self) -> Envelope {
        let id = self.command_id;
        let mut headers = common_headers(
            id,
            self.saga_id,
            self.step,
            self.direction,
            self.attempt,
            self.command_id,
        );
        headers.insert(headers::COMMAND.to_owned(), self.command.clone());
        headers.insert(
            headers::IDEMPOTENCY_KEY.to_owned(),
            self.idempotency_key.clone(),
        );
        if let Some(ttl) = self.timeout_ms {
            headers.insert(headers::TTL_MS.to_owned(), ttl.to_string());
        }
        Envelope {
            destination: Destination::Service(self.service.clone()),
            message: Message {
                id,
                headers,
                body: serde_json::to_vec(self).expect("a command serializes"),
            },
        }
    }

    /// Reads a command from a message, or says why it cannot.
    pub fn from_message(message: &Message) -> Result<Self, Malformed> {
        check_schema(message)?;
        serde_json::from_slice(&message.body).map_err(|e| {
            let e = crate::codec::without_values(&e);
            Malformed(format!("invalid command: {e}"))
        })
    }
}

impl Reply {
    /// The envelope that carries this reply to the orchestrators.
    pub fn to_envelope(&self) -> Envelope {
        let id = Uuid::new_v4();
        Envelope {
            destination: Destination::Results,
            message: Message {
                id,
                headers: common_headers(
                    id,
                    self.saga_id,
                    self.step,
                    self.direction,
                    self.attempt,
                    self.command_id,
                ),
                body: serde_json::to_vec(self).expect("a reply serializes"),
            },
        }
    }

    /// Reads a reply from a message, or says why it cannot.
    pub fn from_message(message: &Message) -> Result<Self, Malformed> {
        check_schema(message)?;
        serde_json::from_slice(&message.body).map_err(|e| {
            let e = crate::codec::without_values(&e);
            Malformed(format!("invalid result: {e}"))
        })
    }

    /// The reply with `outcome` to the command a message's headers name, when its body cannot
    /// be read (an unknown schema version, bad JSON, too large): what a worker sends before it
    /// dead-letters a command, so the saga does not wait for an answer that never comes.
    /// `None` if the headers do not name a command.
    pub fn from_headers(message: &Message, outcome: Outcome) -> Option<Self> {
        let get = |name: &str| message.headers.get(name).map(String::as_str);
        Some(Self {
            saga_id: get(headers::SAGA_ID)?.parse().ok()?,
            step: get(headers::STEP)?.parse().ok()?,
            direction: get(headers::DIRECTION)?.parse().ok()?,
            attempt: get(headers::ATTEMPT)?.parse().ok()?,
            command_id: get(headers::COMMAND_ID)?.parse().ok()?,
            outcome,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trips_through_a_message() {
        let command = Command {
            command_id: Uuid::new_v4(),
            saga_id: Uuid::new_v4(),
            saga: "order".into(),
            step: 1,
            step_name: "charge".into(),
            direction: Direction::Forward,
            attempt: 2,
            service: "payment".into(),
            command: "charge".into(),
            idempotency_key: "k".into(),
            timeout_ms: Some(10),
            input_type: None,
            payload: serde_json::json!({"amount": 5}),
        };
        let envelope = command.to_envelope();
        assert_eq!(envelope.destination, Destination::Service("payment".into()));
        assert_eq!(envelope.message.headers[headers::ATTEMPT], "2");
        let trace = &envelope.message.headers[headers::TRACEPARENT];
        assert_eq!(trace.len(), 55);
        assert!(
            trace.starts_with(&format!("00-{}-", command.saga_id.simple())),
            "{trace}"
        );
        assert_eq!(Command::from_message(&envelope.message).unwrap(), command);
        assert_eq!(envelope.message.headers[headers::TTL_MS], "10");
        // A body nobody can read still names its command in the headers.
        let mut unreadable = envelope.message.clone();
        unreadable.body = b"{".to_vec();
        let failure = Outcome::Failure {
            error: "unreadable".into(),
            retryable: false,
        };
        assert_eq!(
            Reply::from_headers(&unreadable, failure.clone()),
            Some(Reply::to(&command, failure.clone()))
        );
        unreadable.headers.remove(headers::COMMAND_ID);
        assert_eq!(Reply::from_headers(&unreadable, failure), None);
    }

    #[test]
    fn unknown_schema_version_is_malformed() {
        let mut message = Message {
            id: Uuid::new_v4(),
            headers: BTreeMap::new(),
            body: b"{}".to_vec(),
        };
        message
            .headers
            .insert(headers::SCHEMA_VERSION.into(), "99".into());
        let err = Reply::from_message(&message).unwrap_err();
        assert!(err.0.contains("unsupported schema version 99"), "{err}");
        for readable in ["1", "2"] {
            message
                .headers
                .insert(headers::SCHEMA_VERSION.into(), readable.into());
            assert!(check_schema(&message).is_ok(), "version {readable}");
        }
        assert_eq!(
            Destination::decode(&Destination::Service("a:b".into()).encode()),
            Some(Destination::Service("a:b".into()))
        );
    }
}
