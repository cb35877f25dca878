//! A connection to the broker that reconnects on demand, named for its role.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ConnectionStatus};
use tokio::sync::Mutex;
use tracing::info;

use saga_core::Envelope;
use saga_core::transport::TransportError;

use crate::config::{AmqpConfig, redact};
use crate::returns::Returns;
use crate::topology::declare_exchange;

/// How a link's channel is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Publishes with confirms.
    Publish,
    /// Consumes; each consumer gets a channel of its own.
    Consume,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Publish => "publish",
            Role::Consume => "consume",
        }
    }
}

/// Which of a link's successive connections something was opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionId(u64);

/// One connection (and, for publishing, one confirm channel), replaced when it fails.
pub(crate) struct Link {
    config: Arc<AmqpConfig>,
    role: Role,
    current: Mutex<Option<(Connection, Channel, ConnectionId)>>,
    connections: AtomicU64,
    /// When the link last replaced its channel after nacks (see [`Link::retire_channel`]).
    retired_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// The node (of the configured URLs) tried first at the next connect: the one after
    /// the node last connected to, so a node just lost is tried last.
    next_node: std::sync::atomic::AtomicUsize,
    queueing: std::sync::Mutex<()>,
    returns: std::sync::Mutex<Returns<Envelope>>,
}

impl Link {
    pub(crate) fn new(config: Arc<AmqpConfig>, role: Role) -> Self {
        Self {
            config,
            role,
            current: Mutex::new(None),
            connections: AtomicU64::new(0),
            retired_at: std::sync::Mutex::new(None),
            next_node: std::sync::atomic::AtomicUsize::new(0),
            queueing: std::sync::Mutex::new(()),
            returns: std::sync::Mutex::new(Returns::default()),
        }
    }

    /// The link's healthy channel, connecting first if the connection is gone; fails after
    /// [`SETUP_TIMEOUT`] rather than wait on a connection that stopped answering.
    pub(crate) async fn channel(&self) -> Result<Channel, TransportError> {
        Ok(self.identified_channel().await?.0)
    }

    /// [`Link::channel`], with the connection it is on, for [`Link::reset`].
    pub(crate) async fn identified_channel(
        &self,
    ) -> Result<(Channel, ConnectionId), TransportError> {
        self.within_setup_timeout("opening a channel", self.open_channel())
            .await
    }

    /// Runs `setup` on this link for at most [`SETUP_TIMEOUT`]; past it, fails naming `what`
    /// and forgets the connection, which stopped answering, so the next use connects afresh
    /// (unless another use of the link has connected afresh meanwhile).
    pub(crate) async fn within_setup_timeout<T>(
        &self,
        what: &str,
        setup: impl Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        let connected = self.connections.load(Ordering::Relaxed);
        match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
            Ok(done) => done,
            Err(_) => {
                let mut current = self.current.lock().await;
                if self.connections.load(Ordering::Relaxed) == connected {
                    *current = None;
                }
                drop(current);
                Err(TransportError::new(format!(
                    "{what} took longer than {SETUP_TIMEOUT:?}"
                )))
            }
        }
    }

    async fn open_channel(&self) -> Result<(Channel, ConnectionId), TransportError> {
        let mut current = self.current.lock().await;
        if let Some((conn, channel, id)) = current.as_ref() {
            if conn.status().connected() && channel.status().connected() {
                return Ok((channel.clone(), *id));
            }
            if conn.status().connected() {
                let (channel, id) = (self.setup(conn).await?, *id);
                current.as_mut().expect("checked above").1 = channel.clone();
                return Ok((channel, id));
            }
        }
        let conn = self.connect().await?;
        let channel = self.setup(&conn).await?;
        let id = ConnectionId(self.connections.fetch_add(1, Ordering::Relaxed));
        *current = Some((conn, channel.clone(), id));
        Ok((channel, id))
    }

    /// Held while a publish queues messages on the link's channel (never across an await):
    /// lapin numbers a message for its confirm and queues its frames under two locks, so
    /// publishes interleaving on one channel could swap numbers, and a nack would be blamed on
    /// another publish's message.
    pub(crate) fn queueing(&self) -> MutexGuard<'_, ()> {
        self.queueing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The returns of the link's publishes, matched to the publish that sent each message
    /// (see [`Returns`]).
    pub(crate) fn returns(&self) -> MutexGuard<'_, Returns<Envelope>> {
        self.returns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The link's configuration.
    pub(crate) fn config(&self) -> &AmqpConfig {
        &self.config
    }

    /// The status of the link's connection, if it has one.
    pub(crate) async fn connection_status(&self) -> Option<ConnectionStatus> {
        let current = self.current.lock().await;
        current.as_ref().map(|(conn, ..)| conn.status().clone())
    }

    /// Closes the link's connection if it is still `connection` (waiting at most a second for
    /// the broker) and forgets it, so the next use connects afresh; a newer connection, opened
    /// since by another user of the link, is left alone. For a connection with frames queued
    /// that must never reach the broker: closing it drops them with it.
    pub(crate) async fn reset(&self, connection: ConnectionId) {
        let conn = {
            let mut current = self.current.lock().await;
            match current.as_ref() {
                Some((.., id)) if *id == connection => current.take().expect("checked above").0,
                _ => return,
            }
        };
        tokio::spawn(async move {
            let closing = conn.close(200, "reset".into());
            let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
        });
    }

    /// Replaces the link's channel with a new one on the same connection, if it is still
    /// `channel` and was not replaced in the last second; `channel` is closed after `linger`,
    /// once the confirms of the publishes still on it have come (closing it at once would
    /// fail them, and reach the broker before their messages).
    pub(crate) async fn retire_channel(&self, channel: &Channel, linger: Duration) {
        let mut current = self.current.lock().await;
        let Some((conn, link_channel, _)) = current.as_mut() else {
            return;
        };
        if link_channel.id() != channel.id() || !conn.status().connected() {
            return;
        }
        {
            let mut retired_at = self
                .retired_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if retired_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *retired_at = Some(std::time::Instant::now());
        }
        let Ok(Ok(fresh)) = tokio::time::timeout(SETUP_TIMEOUT, self.setup(conn)).await else {
            return;
        };
        let old = std::mem::replace(link_channel, fresh);
        drop(current);
        tracing::warn!(
            channel = old.id(),
            "replacing a publishing channel whose messages were nacked"
        );
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let closing = old.close(200, "publishes nacked".into());
            let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
        });
    }

    /// A new channel on the link's connection, for one consumer or one task.
    pub(crate) async fn extra_channel(&self) -> Result<Channel, TransportError> {
        Ok(self.watched_channel().await?.0)
    }

    /// A new channel on the link's connection, with that connection's status, which a
    /// consumer watches: a channel whose connection is gone can no longer deliver.
    pub(crate) async fn watched_channel(
        &self,
    ) -> Result<(Channel, ConnectionStatus), TransportError> {
        self.channel().await?;
        self.within_setup_timeout("opening a consumer's channel", async {
            let current = self.current.lock().await;
            match current.as_ref() {
                Some((conn, ..)) => Ok((
                    conn.create_channel().await.map_err(amqp_error)?,
                    conn.status().clone(),
                )),
                None => Err(TransportError::new(
                    "the connection was lost while opening a channel".to_owned(),
                )),
            }
        })
        .await
    }

    /// Connects to the first node that answers, from the one after the node last used.
    async fn connect(&self) -> Result<Connection, TransportError> {
        let urls = self.config.urls();
        match urls.as_slice() {
            [] => return Err(TransportError::new("no AMQP URL is configured".to_owned())),
            // One node: bounded by the caller's setup time, as before lists existed.
            [url] => return self.connect_to(url).await,
            _ => {}
        }
        let first = self.next_node.load(Ordering::Relaxed) % urls.len();
        // Each node gets its share of the setup time (lapin's own connect has no timeout: a
        // host that drops packets would hold the connect for the system's TCP timeout).
        let each = CONNECT_TIMEOUT.min(SETUP_TIMEOUT / urls.len() as u32);
        let mut failures = Vec::new();
        for i in (0..urls.len()).map(|k| (first + k) % urls.len()) {
            // The next connect starts after this node, whether it answers or not.
            self.next_node.store(i + 1, Ordering::Relaxed);
            let attempt = match tokio::time::timeout(each, self.connect_to(urls[i])).await {
                Ok(attempt) => attempt,
                Err(_) => Err(TransportError::new(format!(
                    "cannot connect to {}: no answer within {each:?}",
                    redact(urls[i])
                ))),
            };
            match attempt {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    tracing::warn!(url = %redact(urls[i]), error = %e, "a RabbitMQ node did not answer; trying the next");
                    failures.push(e.to_string());
                }
            }
        }
        Err(TransportError::new(format!(
            "no RabbitMQ node answered: {}",
            failures.join("; ")
        )))
    }

    async fn connect_to(&self, url: &str) -> Result<Connection, TransportError> {
        // The parser's message quotes the whole URL, password included: not shown.
        let mut uri: AMQPUri = url.parse().map_err(|_: String| {
            TransportError::new(format!(
                "invalid AMQP URL {}: expected amqp://user:password@host:port/vhost",
                redact(url)
            ))
        })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(self.config.heartbeat_secs);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(CONNECT_TIMEOUT.as_millis() as u64);
        }
        let name = format!("{}-{}", self.config.connection_name, self.role.name());
        let properties = ConnectionProperties::default().with_connection_name(name.clone().into());
        let conn = Connection::connect_uri(uri, properties)
            .await
            .map_err(|e| {
                let message = format!("cannot connect to {}: {e}", redact(url));
                TransportError::with_source(message, e)
            })?;
        info!(connection = %name, url = %redact(url), "connected to RabbitMQ");
        Ok(conn)
    }

    async fn setup(&self, conn: &Connection) -> Result<Channel, TransportError> {
        self.setup_channel(conn).await.map_err(amqp_error)
    }

    async fn setup_channel(&self, conn: &Connection) -> lapin::Result<Channel> {
        let channel = conn.create_channel().await?;
        if self.role == Role::Publish {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        if self.role == Role::Publish && self.config.declare {
            for exchange in [
                self.config.commands_exchange(),
                self.config.results_exchange(),
                self.config.dead_exchange(),
            ] {
                declare_exchange(&channel, &exchange).await?;
            }
        }
        Ok(channel)
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection, channel or subscription may take to set up. A broker that
/// answers a connection but then stops answering (one restarting, say) would otherwise hold a
/// consumer waiting for a reply that never comes, instead of trying again.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// A broker error as a transport error.
pub(crate) fn amqp_error(error: lapin::Error) -> TransportError {
    TransportError::with_source(format!("rabbitmq: {error}"), error)
}
