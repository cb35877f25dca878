//! Payload codecs: the business data of a saga (its input, step inputs and outputs, signal
//! payloads, compensation data) encoded before it reaches PostgreSQL or the broker, and
//! decoded where it is used.
//!
//! A [`PayloadCodec`] turns bytes into bytes under a key id; [`Payloads`] applies one to JSON
//! values, replacing each with a *sealed* value, `{"$sealed": {"key": "k1", "data": "<base64>"}}`,
//! that the log, the outbox, the inbox and every message carry in its place. What the engine
//! needs to run a saga (ids, names, steps, statuses, reasons, error messages) stays readable.
//! [`AesGcmCodec`] ships: AES-256-GCM with keys from configuration ([`SAGA_PAYLOAD_KEYS`]),
//! the first key for new writes, the others to read what older keys wrote.
//!
//! The orchestrator's store ([`PgStoreBuilder::payloads`](crate::store::PgStoreBuilder::payloads))
//! and the workers ([`WorkerBuilder::payloads`](crate::worker::WorkerBuilder::payloads)) take
//! the same [`Payloads`]; both must hold every key still in use.
//!
//! ```
//! use saga_core::codec::{AesGcmCodec, Payloads};
//!
//! // `id:base64key` pairs, the first used for new writes (see `AesGcmCodec::generate_key`).
//! let keys = "k2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=,k1:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
//! let payloads = Payloads::new(AesGcmCodec::parse(keys)?);
//! let sealed = payloads.seal(serde_json::json!({"card": "4111 1111 1111 1111"}))?;
//! assert_eq!(Payloads::sealed_key(&sealed), Some("k2"));
//! assert!(!sealed.to_string().contains("4111"));
//! assert_eq!(payloads.open(sealed)?, serde_json::json!({"card": "4111 1111 1111 1111"}));
//! # Ok::<(), saga_core::codec::CodecError>(())
//! ```

mod aes_gcm;
mod sealing;

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

pub use aes_gcm::AesGcmCodec;

/// The environment variable the example programs and `saga` read their payload keys from:
/// `id:base64key` pairs separated by commas, the first used for new writes; unset or empty
/// means payloads are not encrypted.
pub const SAGA_PAYLOAD_KEYS: &str = "SAGA_PAYLOAD_KEYS";

/// The field of a sealed value.
const SEALED: &str = "$sealed";

/// Encodes and decodes payload bytes under key ids.
pub trait PayloadCodec: Send + Sync + 'static {
    /// Encodes `plain` under the key for new writes.
    fn encode(&self, plain: &[u8]) -> Result<Encoded, CodecError>;
    /// Decodes `data`, encoded under `key`.
    fn decode(&self, key: &str, data: &[u8]) -> Result<Vec<u8>, CodecError>;
}

/// Bytes a [`PayloadCodec`] encoded, and the id of the key it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The key's id (kept in the clear beside the data).
    pub key: String,
    /// The encoded bytes.
    pub data: Vec<u8>,
}

/// Why a payload cannot be encoded or decoded, or a codec built. It never holds key material
/// or payload bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The payload was sealed under a key this process is not given.
    #[error(
        "the payload is encrypted with key `{key}`, which is not configured here (add it to {SAGA_PAYLOAD_KEYS})"
    )]
    UnknownKey {
        /// The key's id.
        key: String,
    },
    /// The payload does not decode under its key: altered, or sealed by another key of the
    /// same id.
    #[error("the payload encrypted with key `{key}` does not decrypt: {why}")]
    Corrupt {
        /// The key's id.
        key: String,
        /// What failed.
        why: String,
    },
    /// The keys given are not valid.
    #[error("invalid payload keys: {0}")]
    Config(String),
    /// A value from a caller or a handler has the shape of a sealed payload, which only the
    /// codec writes.
    #[error(
        "{0} has the shape of a sealed payload (an object whose one field is `$sealed`), which only the payload codec writes"
    )]
    SealedShape(String),
    /// Encoding failed.
    #[error("cannot encrypt a payload: {0}")]
    Encode(String),
}

impl CodecError {
    /// Whether it may pass: a key not configured here yet (a rotation rolling out).
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::UnknownKey { .. })
    }
}

/// Applies a [`PayloadCodec`] (or none) to JSON payloads. Cheap to clone.
#[derive(Clone, Default)]
pub struct Payloads {
    codec: Option<Arc<dyn PayloadCodec>>,
}

impl fmt::Debug for Payloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payloads")
            .field("encrypting", &self.is_encoding())
            .finish()
    }
}

impl Payloads {
    /// Payloads kept as they are (sealed ones still cannot be opened).
    pub fn plain() -> Self {
        Self::default()
    }

    /// Payloads encoded by `codec`.
    pub fn new(codec: impl PayloadCodec) -> Self {
        Self {
            codec: Some(Arc::new(codec)),
        }
    }

    /// An [`AesGcmCodec`] with the keys of [`SAGA_PAYLOAD_KEYS`], or plain payloads when it is
    /// unset or empty.
    pub fn from_env() -> Result<Self, CodecError> {
        match std::env::var(SAGA_PAYLOAD_KEYS) {
            Ok(keys) if !keys.trim().is_empty() => Ok(Self::new(AesGcmCodec::parse(&keys)?)),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Self::plain()),
            Err(std::env::VarError::NotUnicode(_)) => Err(CodecError::Config(format!(
                "{SAGA_PAYLOAD_KEYS} is not valid UTF-8"
            ))),
        }
    }

    /// Whether new payloads are encoded.
    pub fn is_encoding(&self) -> bool {
        self.codec.is_some()
    }

    /// `value` sealed under the codec's key for new writes (a value of the sealed shape too:
    /// opened, it gives that value back); returned as it is without a codec, or when `null`.
    pub fn seal(&self, value: Value) -> Result<Value, CodecError> {
        let Some(codec) = &self.codec else {
            return Ok(value);
        };
        if value.is_null() {
            return Ok(value);
        }
        let plain = serde_json::to_vec(&value).expect("a JSON value serializes");
        let Encoded { key, data } = codec.encode(&plain)?;
        let mut inner = Map::with_capacity(2);
        inner.insert("key".into(), Value::String(key));
        inner.insert("data".into(), Value::String(STANDARD.encode(data)));
        Ok(Value::Object(Map::from_iter([(
            SEALED.to_owned(),
            Value::Object(inner),
        )])))
    }

    /// `value` sealed, unless it is sealed already (an output the inbox recorded sealed).
    pub(crate) fn seal_once(&self, value: Value) -> Result<Value, CodecError> {
        if Self::sealed_key(&value).is_some() {
            return Ok(value);
        }
        self.seal(value)
    }

    /// `value` opened if it is sealed, else as it is.
    pub fn open(&self, value: Value) -> Result<Value, CodecError> {
        let Some((key, data)) = sealed_parts(&value) else {
            return Ok(value);
        };
        let corrupt = |why: String| CodecError::Corrupt {
            key: key.to_owned(),
            why,
        };
        let data = STANDARD
            .decode(data)
            .map_err(|e| corrupt(format!("not base64: {e}")))?;
        let Some(codec) = &self.codec else {
            return Err(CodecError::UnknownKey {
                key: key.to_owned(),
            });
        };
        let plain = codec.decode(key, &data)?;
        serde_json::from_slice(&plain).map_err(|e| corrupt(format!("not JSON once decrypted: {e}")))
    }

    /// `value` opened if this process holds its key; a value it cannot open stays sealed
    /// (for readers that show what they may, like `saga show`).
    pub fn open_if_possible(&self, value: Value) -> Value {
        if Self::sealed_key(&value).is_none() {
            return value;
        }
        self.open(value.clone()).unwrap_or(value)
    }

    /// The id of the key `value` is sealed under, if it is a sealed value.
    pub fn sealed_key(value: &Value) -> Option<&str> {
        sealed_parts(value).map(|(key, _)| key)
    }

    /// How a value that could not be opened is shown: `<encrypted: key k2>`; `None` for a
    /// value that is not sealed.
    pub fn placeholder(value: &Value) -> Option<String> {
        Self::sealed_key(value).map(|key| format!("<encrypted: key {key}>"))
    }

    /// `value` with every sealed value in it (at any depth) replaced by its
    /// [`placeholder`](Self::placeholder) string.
    pub fn masked(value: &Value) -> Value {
        if let Some(shown) = Self::placeholder(value) {
            return Value::String(shown);
        }
        match value {
            Value::Array(items) => Value::Array(items.iter().map(Self::masked).collect()),
            Value::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), Self::masked(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// `e`'s message without the value it quotes: `invalid type: string "4111 1111", expected
/// u32` becomes `invalid type (value not shown), expected u32`. Such messages are kept in the
/// log as reasons, in plain text, so they must not carry the payload they are about.
pub fn without_values(e: &serde_json::Error) -> String {
    without_values_in(&e.to_string())
}

/// [`without_values`] on a message already formatted.
pub(crate) fn without_values_in(text: &str) -> String {
    for (lead, kind) in [
        ("invalid type: ", "invalid type"),
        ("invalid value: ", "invalid value"),
        ("unknown variant `", "unknown variant"),
    ] {
        if let Some(start) = text.find(lead)
            && let Some(end) = text[start..].find(", expected")
        {
            return format!(
                "{}{kind} (value not shown){}",
                &text[..start],
                &text[start + end..]
            );
        }
    }
    text.to_owned()
}

/// Refuses a value given by a caller or a handler that has the shape of a sealed value: only
/// the codec writes those.
pub(crate) fn refuse_sealed_shape(value: &Value, what: &str) -> Result<(), CodecError> {
    if sealed_parts(value).is_some() {
        return Err(CodecError::SealedShape(what.to_owned()));
    }
    Ok(())
}

/// The key id and base64 data of a sealed value.
fn sealed_parts(value: &Value) -> Option<(&str, &str)> {
    let Value::Object(outer) = value else {
        return None;
    };
    if outer.len() != 1 {
        return None;
    }
    let Value::Object(inner) = outer.get(SEALED)? else {
        return None;
    };
    Some((inner.get("key")?.as_str()?, inner.get("data")?.as_str()?))
}

#[cfg(test)]
mod tests;
