//! Publishing batches with pipelined confirms and the mandatory flag.

use std::collections::HashSet;
use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::maybe_done;
use futures_util::stream::FuturesUnordered;
use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use saga_core::message::headers;
use saga_core::transport::PublishError;
use saga_core::{Destination, Envelope};
use tracing::{error, warn};
use uuid::Uuid;

use crate::config::AmqpConfig;
use crate::convert::{message, properties};
use crate::link::Link;
use crate::returns::{Noted, Returns};
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
            let mut properties = properties(&envelope.message, &[]);
            // A command nobody will want once its attempt has timed out expires in its queue
            // (the broker dead-letters it) rather than run late.
            if let (Destination::Service(_), Some(ttl)) = (
                &envelope.destination,
                envelope.message.headers.get(headers::TTL_MS),
            ) {
                properties = properties.with_expiration(ttl.as_str().into());
            }
            Outgoing {
                exchange,
                routing_key,
                properties,
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
/// sending, confirming) takes at most `timeout`. Hands back the envelopes that were not
/// confirmed or were returned.
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
            Ok(Err(e)) => return fail(e.message().to_owned(), items),
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
    let in_flight = InFlight::begin(link, &items);
    // Sending shares the deadline: a broker that stops reading (an alarm raised before its
    // notice arrived, a restart) must not hold the publisher forever.
    let sent = tokio::time::timeout_at(deadline, send(link, &channel, &items, options)).await;
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
    let mut confirms = FuturesUnordered::new();
    for (slot, result) in sent.into_iter().enumerate() {
        match result {
            Ok(confirm) => confirms.push(async move { (slot, confirm.await) }),
            Err(e) => {
                reason.get_or_insert_with(|| e.to_string());
            }
        }
    }
    // Each message's confirm, or none if it was not sent (or not confirmed in time).
    let mut outcomes: Vec<Option<lapin::Result<Confirmation>>> =
        std::iter::repeat_with(|| None).take(batch.len()).collect();
    let all_confirmed = tokio::time::timeout_at(deadline, async {
        while let Some((slot, outcome)) = confirms.next().await {
            outcomes[slot] = Some(outcome);
        }
    })
    .await;
    if all_confirmed.is_err() {
        // The confirms that did come may carry other publishes' returns. The whole batch is
        // reported unconfirmed.
        returned_ids(link, &batch, &mut outcomes, in_flight, true);
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
    let returned = returned_ids(link, &batch, &mut outcomes, in_flight, false);
    let nacked = outcomes
        .iter()
        .any(|o| matches!(o, Some(Ok(Confirmation::Nack(_)))));
    if nacked {
        // A channel that started publishing to a quorum queue while its leader was moving to
        // another node may keep sending to the old one, its publishes nacked until it
        // closes: later publishes get a new channel, which asks for the leader afresh.
        link.retire_channel(&channel, timeout).await;
    }
    let mut unconfirmed = Vec::new();
    let mut unroutable = Vec::new();
    for (envelope, outcome) in batch.into_iter().zip(outcomes) {
        match outcome {
            Some(Ok(Confirmation::Ack(_))) => {
                if !returned.is_empty() && returned.contains(&envelope.message.id) {
                    unroutable.push(envelope);
                }
            }
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

/// A publish's messages, registered with its link's [`Returns`] until it has read its
/// confirms (or, if it fails before, until it is dropped).
struct InFlight<'a> {
    link: &'a Link,
    ids: Vec<Uuid>,
    finished: bool,
}

impl<'a> InFlight<'a> {
    fn begin(link: &'a Link, items: &[Outgoing]) -> Self {
        let ids: Vec<Uuid> = items.iter().map(|o| o.envelope.message.id).collect();
        link.returns().begin(&ids);
        Self {
            link,
            ids,
            finished: false,
        }
    }

    /// Takes the returns other publishes noted for these messages, `unconfirmed` being those
    /// this publish reports unconfirmed.
    fn finish(mut self, returns: &mut Returns<Envelope>, unconfirmed: &[Uuid]) -> Vec<Uuid> {
        self.finished = true;
        returns.finish(&self.ids, unconfirmed)
    }
}

impl Drop for InFlight<'_> {
    /// A publish that failed before reading its confirms reports every message unconfirmed.
    fn drop(&mut self) {
        if !self.finished {
            self.link.returns().finish(&self.ids, &self.ids);
        }
    }
}

/// The ids of the messages of `batch` the broker returned (mandatory, no queue), taken out of
/// `outcomes`. lapin hands a returned message to whichever confirm of the channel it completes
/// next, which may be another message's of this batch or of another publish on the link, so
/// returns are matched by message id: those of other publishes are noted on the link for
/// them, and those others noted for this one are taken, under one lock (see [`Returns`]). A
/// return whose publish had finished and reported its message confirmed is late: it is kept
/// for [`AmqpTransport`](crate::AmqpTransport)'s `take_late_returns`, or logged as lost.
/// `gave_up`: the publish reports its whole batch unconfirmed, not only the messages without
/// an ack.
fn returned_ids(
    link: &Link,
    batch: &[Envelope],
    outcomes: &mut [Option<lapin::Result<Confirmation>>],
    in_flight: InFlight<'_>,
    gave_up: bool,
) -> HashSet<Uuid> {
    let mut returned = HashSet::new();
    let mut others = Vec::new();
    let mut ours: Option<HashSet<Uuid>> = None;
    for outcome in outcomes.iter_mut().flatten() {
        if let Ok(Confirmation::Ack(message) | Confirmation::Nack(message)) = outcome
            && let Some(message) = message.take()
        {
            let Some(id) = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|id| Uuid::parse_str(id.as_str()).ok())
            else {
                warn!("the broker returned a message without a saga message id");
                continue;
            };
            let ours = ours.get_or_insert_with(|| batch.iter().map(|e| e.message.id).collect());
            if ours.contains(&id) {
                returned.insert(id);
            } else {
                others.push((id, message));
            }
        }
    }
    let unconfirmed: Vec<Uuid> = batch
        .iter()
        .zip(outcomes.iter())
        .filter(|(_, outcome)| gave_up || !matches!(outcome, Some(Ok(Confirmation::Ack(_)))))
        .map(|(envelope, _)| envelope.message.id)
        .collect();
    let mut late = Vec::new();
    {
        let mut returns = link.returns();
        for (id, message) in others {
            if returns.note(id) == Noted::Late {
                late.push((id, message));
            }
        }
        returned.extend(in_flight.finish(&mut returns, &unconfirmed));
    }
    // Built and logged outside the link's lock, which every publish takes.
    let late: Vec<Envelope> = late
        .into_iter()
        .filter_map(|(id, message)| late_envelope(link.config(), id, message))
        .collect();
    if !late.is_empty() {
        link.returns().keep_late(late);
    }
    returned
}

/// What is kept of a message returned after its publish had finished: a command, for the
/// relay to fail its step. Anything else returned late is logged as lost: a result (its
/// command was acked when the result counted as published; the step's timeout, if any, runs
/// the command again) or a copy to a dead-letter queue or back to its queue (its original was
/// settled).
fn late_envelope(config: &AmqpConfig, id: Uuid, returned: BasicReturnMessage) -> Option<Envelope> {
    let delivery = returned.delivery;
    let command = late_command(
        config,
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        &delivery.properties,
        delivery.data,
    );
    match &command {
        Some(envelope) => warn!(
            message.id = %id,
            destination = %envelope.destination.encode(),
            reason = %returned.reply_text,
            "a command was returned after its publish had finished; the relay fails its step"
        ),
        None => error!(
            message.id = %id,
            exchange = %delivery.exchange,
            routing_key = %delivery.routing_key,
            reason = %returned.reply_text,
            "a message was returned after its publish had finished: no queue holds it"
        ),
    }
    command
}

/// The command a returned message was, if it went to the commands exchange.
fn late_command(
    config: &AmqpConfig,
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body: Vec<u8>,
) -> Option<Envelope> {
    (exchange == config.commands_exchange()).then(|| Envelope {
        destination: Destination::Service(routing_key.to_owned()),
        message: message(properties, body),
    })
}

/// The most bytes [`send`] queues in the connection at once: bodies, plus
/// [`FRAMING_ESTIMATE`] a message for its method and header frames.
const WINDOW_BYTES: usize = 1 << 20;

/// What a message's method and header frames (routing, properties, saga headers) count for in
/// a window.
const FRAMING_ESTIMATE: usize = 512;

/// Sends `items` on `link`'s `channel` in order, a window at a time: every message of a window
/// is queued before any is awaited, so the connection's writer sends the window in a few
/// writes (often one) instead of one per message. A window holds at most [`WINDOW_BYTES`] (or
/// one larger message), which bounds the copies one publish queues in the connection. Stops
/// after the first window with a failure: the messages after that window are not sent and have
/// no entry (those of the failed window after the failure may have been sent).
async fn send(
    link: &Link,
    channel: &Channel,
    items: &[Outgoing],
    options: BasicPublishOptions,
) -> Vec<lapin::Result<PublisherConfirm>> {
    let size = |o: &Outgoing| o.envelope.message.body.len() + FRAMING_ESTIMATE;
    let mut sent = Vec::with_capacity(items.len());
    let mut rest = items;
    while !rest.is_empty() {
        let mut bytes = size(&rest[0]);
        let mut end = 1;
        while end < rest.len() && bytes + size(&rest[end]) <= WINDOW_BYTES {
            bytes += size(&rest[end]);
            end += 1;
        }
        let (window, after) = rest.split_at(end);
        let mut sends: Vec<_> = window
            .iter()
            .map(|o| {
                Box::pin(maybe_done(channel.basic_publish(
                    o.exchange.as_str().into(),
                    o.routing_key.as_str().into(),
                    options,
                    &o.envelope.message.body,
                    o.properties.clone(),
                )))
            })
            .collect();
        // A send's first poll numbers its message for the confirm and queues its frames,
        // without waiting: the window's first polls run in order, under the link's lock.
        poll_fn(|cx| {
            let _queueing = link.queueing();
            for send in &mut sends {
                let _ = send.as_mut().poll(cx);
            }
            Poll::Ready(())
        })
        .await;
        for send in &mut sends {
            send.as_mut().await;
        }
        let results: Vec<_> = sends
            .iter_mut()
            .map(|send| send.as_mut().take_output().expect("awaited above"))
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use saga_core::Message;

    #[test]
    fn a_late_command_is_kept_with_its_service_and_id_and_nothing_else_is() {
        let config = AmqpConfig::new("amqp://localhost");
        let sent = Message {
            id: Uuid::new_v4(),
            headers: [("x-saga-step".to_owned(), "2".to_owned())].into(),
            body: b"{}".to_vec(),
        };
        let properties = properties(&sent, &[]);
        let kept = late_command(
            &config,
            &config.commands_exchange(),
            "shipping",
            &properties,
            sent.body.clone(),
        )
        .expect("a command is kept");
        assert_eq!(kept.destination, Destination::Service("shipping".into()));
        assert_eq!(kept.message, sent);
        for exchange in [config.results_exchange(), config.dead_exchange()] {
            let other = late_command(&config, &exchange, "results", &properties, Vec::new());
            assert!(other.is_none(), "{exchange}");
        }
    }
}
