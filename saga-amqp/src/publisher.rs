//! Publishing batches with pipelined confirms and the mandatory flag.

use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use saga_core::Envelope;
use saga_core::transport::PublishError;
use tracing::warn;

use crate::config::AmqpConfig;
use crate::convert::properties;
use crate::link::Link;
use crate::topology::route;

/// A message with its exact route and properties.
pub(crate) struct Outgoing {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) properties: BasicProperties,
    pub(crate) envelope: Envelope,
}

/// Publishes `batch` on `link`, routed by destination.
pub(crate) async fn publish(
    link: &Link,
    config: &AmqpConfig,
    batch: Vec<Envelope>,
) -> Result<(), PublishError> {
    let items = batch
        .into_iter()
        .map(|envelope| {
            let (exchange, routing_key) = route(config, &envelope.destination);
            Outgoing {
                exchange,
                routing_key,
                properties: properties(&envelope.message, &[]),
                envelope,
            }
        })
        .collect();
    publish_outgoing(link, config.confirm_timeout, items).await
}

/// How often a publisher held by the broker's block looks again.
const BLOCKED_RECHECK: Duration = Duration::from_millis(50);

/// Sends every message (a window at a time, see [`send`]) before awaiting any confirm, then
/// awaits all confirms together; the whole publish (opening the channel, waiting out a block,
/// sending, confirming) takes at most `timeout`. Hands back the envelopes that were not confirmed or were returned.
pub(crate) async fn publish_outgoing(
    link: &Link,
    timeout: Duration,
    items: Vec<Outgoing>,
) -> Result<(), PublishError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let fail = |reason: String, items: Vec<Outgoing>| {
        let batch = items.into_iter().map(|o| o.envelope).collect();
        Err(not_confirmed(reason, batch, Vec::new()))
    };
    let (channel, connection) =
        match tokio::time::timeout_at(deadline, link.identified_channel()).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return fail(e.0, items),
            Err(_) => return fail(format!("no channel within {timeout:?}"), items),
        };
    // A broker short of memory or disk blocks its publishers (`connection.blocked`) and stops
    // reading from them. Wait for the block to lift, until the deadline, without sending:
    // frames sent now would sit in the connection's buffers.
    if let Some(status) = link.connection_status().await {
        while status.blocked() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return fail(
                    format!("the broker blocked publishers (a resource alarm) for {timeout:?}"),
                    items,
                );
            }
            tokio::time::sleep_until((now + BLOCKED_RECHECK).min(deadline)).await;
        }
    }
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    // Sending shares the deadline: a broker that stops reading (an alarm raised before its
    // notice arrived, a restart) must not hold the publisher forever.
    let sent = tokio::time::timeout_at(deadline, send(&channel, &items, options)).await;
    let batch: Vec<Envelope> = items.into_iter().map(|o| o.envelope).collect();
    let Ok(sent) = sent else {
        // The rest of the batch is queued in the connection and would follow a channel's
        // close (the broker closes a connection that publishes on a closed channel): the
        // whole connection goes, and its queue with it.
        link.reset(connection).await;
        return Err(not_confirmed(
            format!("not sent within {timeout:?}"),
            batch,
            Vec::new(),
        ));
    };
    let mut reason = None;
    let mut confirms = Vec::with_capacity(sent.len());
    let mut slots = Vec::with_capacity(sent.len());
    for (slot, result) in sent.into_iter().enumerate() {
        match result {
            Ok(confirm) => {
                slots.push(slot);
                confirms.push(confirm);
            }
            Err(e) => {
                reason.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let confirmed = match tokio::time::timeout_at(deadline, join_all(confirms)).await {
        Ok(confirmed) => confirmed,
        Err(_) => {
            // A channel that stopped confirming is replaced; the connection's heartbeat judges
            // the connection.
            let closing = channel.close(200, "confirm timeout".into());
            let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
            return Err(not_confirmed(
                format!("no confirm within {timeout:?}"),
                batch,
                Vec::new(),
            ));
        }
    };
    // Each message's confirm, or none if it was not sent.
    let mut outcomes: Vec<Option<lapin::Result<Confirmation>>> =
        std::iter::repeat_with(|| None).take(batch.len()).collect();
    for (slot, outcome) in slots.into_iter().zip(confirmed) {
        outcomes[slot] = Some(outcome);
    }
    let mut unconfirmed = Vec::new();
    let mut unroutable = Vec::new();
    for (envelope, outcome) in batch.into_iter().zip(outcomes) {
        match outcome {
            Some(Ok(Confirmation::Ack(None))) => {}
            Some(Ok(Confirmation::Ack(Some(_)))) => unroutable.push(envelope),
            Some(Ok(Confirmation::Nack(_))) => {
                reason.get_or_insert_with(|| "the broker refused a message (nack)".to_owned());
                unconfirmed.push(envelope);
            }
            Some(Ok(Confirmation::NotRequested)) => {
                reason.get_or_insert_with(|| "confirms are not enabled".to_owned());
                unconfirmed.push(envelope);
            }
            Some(Err(e)) => {
                reason.get_or_insert_with(|| e.to_string());
                unconfirmed.push(envelope);
            }
            None => unconfirmed.push(envelope),
        }
    }
    match (unconfirmed.is_empty(), unroutable.is_empty()) {
        (true, true) => Ok(()),
        (true, false) => Err(PublishError::Unroutable(unroutable)),
        (false, _) => {
            let reason = reason.unwrap_or_else(|| "not confirmed".to_owned());
            warn!(%reason, count = unconfirmed.len(), "publish not confirmed");
            Err(not_confirmed(reason, unconfirmed, unroutable))
        }
    }
}

/// The most message bytes [`send`] queues in the connection at once.
const WINDOW_BYTES: usize = 1 << 20;

/// Sends `items` in order, a window at a time: every message of a window is queued before any
/// is awaited, so the connection's writer sends the window in one write instead of one round
/// trip per message, and the broker reads it in one go. A window holds at most
/// [`WINDOW_BYTES`] of bodies (or one larger message), which bounds the copies queued in the
/// connection. Stops after the first window with a failure: the messages after it are not sent
/// and have no entry.
async fn send(
    channel: &Channel,
    items: &[Outgoing],
    options: BasicPublishOptions,
) -> Vec<lapin::Result<PublisherConfirm>> {
    let mut sent = Vec::with_capacity(items.len());
    let mut rest = items;
    while !rest.is_empty() {
        let mut bytes = rest[0].envelope.message.body.len();
        let mut end = 1;
        while end < rest.len() && bytes + rest[end].envelope.message.body.len() <= WINDOW_BYTES {
            bytes += rest[end].envelope.message.body.len();
            end += 1;
        }
        let (window, after) = rest.split_at(end);
        // `join_all` polls the sends in order, and a send queues its frames on its first poll.
        let results = join_all(window.iter().map(|o| {
            channel.basic_publish(
                o.exchange.as_str().into(),
                o.routing_key.as_str().into(),
                options,
                &o.envelope.message.body,
                o.properties.clone(),
            )
        }))
        .await;
        let failed = results.iter().any(Result::is_err);
        sent.extend(results);
        if failed {
            break;
        }
        rest = after;
    }
    sent
}

fn not_confirmed(
    reason: String,
    envelopes: Vec<Envelope>,
    unroutable: Vec<Envelope>,
) -> PublishError {
    PublishError::NotConfirmed {
        reason,
        envelopes,
        unroutable,
    }
}
