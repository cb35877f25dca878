//! Between saga messages and AMQP messages.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use saga_core::Message;
use saga_core::message::headers;
use uuid::Uuid;

/// Persistent, JSON, with the message id and every header.
pub(crate) fn properties(message: &Message, extra: &[(&str, &str)]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (key, value) in message
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra.iter().copied())
    {
        table.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message.id.to_string().into())
        .with_headers(table)
}

/// A saga message from an AMQP delivery; unreadable headers are left out, a missing id is
/// made up (the message is then judged by its body).
pub(crate) fn message(properties: &BasicProperties, body: Vec<u8>) -> Message {
    let mut map = BTreeMap::new();
    if let Some(table) = properties.headers() {
        for (key, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                AMQPValue::Boolean(b) => b.to_string(),
                _ => continue,
            };
            map.insert(key.as_str().to_owned(), text);
        }
    }
    let id = properties
        .message_id()
        .as_ref()
        .and_then(|id| Uuid::parse_str(id.as_str()).ok())
        .or_else(|| {
            map.get(headers::MESSAGE_ID)
                .and_then(|id| Uuid::parse_str(id).ok())
        })
        .unwrap_or_else(Uuid::new_v4);
    Message {
        id,
        headers: map,
        body,
    }
}
