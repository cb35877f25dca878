//! Configuration of the RabbitMQ transport, from code or from the environment.

use std::time::Duration;

/// The kind of queue declared for services and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// Replicated, durable, with a delivery limit (the default).
    #[default]
    Quorum,
    /// A classic durable queue (no delivery limit).
    Classic,
}

/// How the transport connects and names its topology.
#[derive(Clone, PartialEq)]
pub struct AmqpConfig {
    /// The broker URL (`amqp://` or `amqps://`); the vhost comes from its path. For a cluster,
    /// a comma-separated list of its nodes' URLs (one vhost and one user): the transport
    /// connects to the first that answers and, having lost it, to the next.
    pub url: String,
    /// The prefix of every exchange and queue name.
    pub prefix: String,
    /// Unacknowledged deliveries per consumer.
    pub prefetch: u16,
    /// Quorum (default) or classic queues.
    pub queue_type: QueueType,
    /// Deliveries of one message before a quorum queue dead-letters it (stops poison loops).
    pub delivery_limit: u32,
    /// On how many nodes a quorum queue is replicated when it is declared
    /// (`x-quorum-initial-group-size`); `None`: the broker's default (every node of the
    /// cluster, up to its limit).
    pub quorum_group_size: Option<u32>,
    /// How long a publish may take (opening the channel, waiting out the broker's block,
    /// sending, confirms); past it, the publish fails.
    pub confirm_timeout: Duration,
    /// Heartbeat interval in seconds, unless the URL sets one.
    pub heartbeat_secs: u16,
    /// Names the connections in the broker's management view (`NAME-publish`, `NAME-consume`).
    pub connection_name: String,
    /// Whether to declare the topology (exchanges, queues, bindings); when `false`, the
    /// topology must exist (an orchestrator declares it) and is only checked. A participant
    /// with credentials limited to its own queue runs with `false` (see
    /// [`AmqpConfig::participant_permissions`]).
    pub declare: bool,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .field("prefetch", &self.prefetch)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .field("quorum_group_size", &self.quorum_group_size)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("connection_name", &self.connection_name)
            .field("declare", &self.declare)
            .finish()
    }
}

impl AmqpConfig {
    /// The local RabbitMQ's default vhost, as guest.
    pub const DEFAULT_URL: &'static str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    /// Default name prefix.
    pub const DEFAULT_PREFIX: &'static str = "saga";
    /// Default prefetch.
    pub const DEFAULT_PREFETCH: u16 = 64;
    /// Default delivery limit.
    pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;
    /// Default confirm timeout.
    pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default heartbeat.
    pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

    /// The defaults, connecting to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            prefetch: Self::DEFAULT_PREFETCH,
            queue_type: QueueType::Quorum,
            delivery_limit: Self::DEFAULT_DELIVERY_LIMIT,
            quorum_group_size: None,
            confirm_timeout: Self::DEFAULT_CONFIRM_TIMEOUT,
            heartbeat_secs: Self::DEFAULT_HEARTBEAT_SECS,
            connection_name: "saga".to_owned(),
            declare: true,
        }
    }

    /// Reads `AMQP_URL` (one URL, or a comma-separated list of a cluster's nodes),
    /// `AMQP_PREFIX`, `AMQP_PREFETCH`, `AMQP_QUEUE_TYPE` (`quorum` or `classic`),
    /// `AMQP_DELIVERY_LIMIT`, `AMQP_QUORUM_GROUP_SIZE`, `AMQP_CONFIRM_TIMEOUT_MS` and
    /// `AMQP_DECLARE` (`true` or `false`); unset ones take the defaults. A value that does not
    /// parse is an error naming the variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`AmqpConfig::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config =
            Self::new(lookup("AMQP_URL").unwrap_or_else(|| Self::DEFAULT_URL.to_owned()));
        let mut parsed = Vec::new();
        for url in config.urls() {
            // Another scheme inside is a list with a URL that is not AMQP's.
            let scheme_ok = (url.starts_with("amqp://") || url.starts_with("amqps://"))
                && !url[url.find("://").unwrap_or(0) + 3..].contains("://");
            match url.parse::<lapin::uri::AMQPUri>() {
                Ok(uri) if scheme_ok => parsed.push(uri),
                _ => {
                    return Err(ConfigError::new(
                        "AMQP_URL",
                        "an amqp:// or amqps:// URL, or a comma-separated list of them",
                    ));
                }
            }
        }
        if parsed.is_empty() {
            return Err(ConfigError::new(
                "AMQP_URL",
                "an amqp:// or amqps:// URL, or a comma-separated list of them",
            ));
        }
        let one_place = parsed.windows(2).all(|w| {
            (&w[0].scheme, &w[0].vhost, &w[0].authority.userinfo)
                == (&w[1].scheme, &w[1].vhost, &w[1].authority.userinfo)
        });
        if !one_place {
            return Err(ConfigError::new(
                "AMQP_URL",
                "URLs of one cluster: the same scheme, vhost and user in each",
            ));
        }
        if let Some(prefix) = lookup("AMQP_PREFIX") {
            let valid = !prefix.is_empty()
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                return Err(ConfigError::new(
                    "AMQP_PREFIX",
                    "letters, digits, '-', '_' or '.'",
                ));
            }
            config.prefix = prefix;
        }
        if let Some(v) = lookup("AMQP_PREFETCH") {
            config.prefetch = v
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::new("AMQP_PREFETCH", "a number from 1 to 65535"))?;
        }
        if let Some(v) = lookup("AMQP_QUEUE_TYPE") {
            config.queue_type = match v.as_str() {
                "quorum" => QueueType::Quorum,
                "classic" => QueueType::Classic,
                _ => return Err(ConfigError::new("AMQP_QUEUE_TYPE", "`quorum` or `classic`")),
            };
        }
        if let Some(v) = lookup("AMQP_DELIVERY_LIMIT") {
            config.delivery_limit = v
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::new("AMQP_DELIVERY_LIMIT", "a positive number"))?;
        }
        if let Some(v) = lookup("AMQP_QUORUM_GROUP_SIZE") {
            config.quorum_group_size =
                Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ConfigError::new("AMQP_QUORUM_GROUP_SIZE", "a positive number")
                })?);
        }
        if let Some(v) = lookup("AMQP_DECLARE") {
            config.declare = match v.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(ConfigError::new("AMQP_DECLARE", "`true` or `false`")),
            };
        }
        if let Some(v) = lookup("AMQP_CONFIRM_TIMEOUT_MS") {
            config.confirm_timeout = v
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    ConfigError::new(
                        "AMQP_CONFIRM_TIMEOUT_MS",
                        "a positive number of milliseconds",
                    )
                })?;
        }
        Ok(config)
    }

    /// The URLs of the broker's nodes, in the order they are tried (one, unless `url` is a
    /// comma-separated list).
    pub fn urls(&self) -> Vec<&str> {
        // A comma starts another URL only before a scheme: a password may hold one.
        let mut urls = Vec::new();
        let mut rest = self.url.as_str();
        loop {
            let next = rest.match_indices(',').map(|(i, _)| i).find(|&i| {
                let after = rest[i + 1..].trim_start();
                after.starts_with("amqp://") || after.starts_with("amqps://")
            });
            let (url, tail) = match next {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            let url = url.trim().trim_end_matches(',').trim();
            if !url.is_empty() {
                urls.push(url);
            }
            match tail {
                Some(tail) => rest = tail,
                None => return urls,
            }
        }
    }

    /// The name of the commands exchange.
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.prefix)
    }

    /// The name of the results exchange.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// The name of the dead-letter exchange.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The exchange that hands a message back to the queue of `source` (and only to it):
    /// `PREFIX.requeue.service.NAME` or `PREFIX.requeue.results`.
    pub fn requeue_exchange(&self, source: &saga_core::Destination) -> String {
        match source {
            saga_core::Destination::Service(name) => {
                format!("{}.requeue.service.{name}", self.prefix)
            }
            saga_core::Destination::Results => format!("{}.requeue.results", self.prefix),
        }
    }

    /// The RabbitMQ permissions (configure, write, read regular expressions) of a participant
    /// limited to its own service: it declares nothing (run it with `declare: false`), reads
    /// only its own queue, and writes only results, dead letters and hand-backs to its own
    /// queue. For `rabbitmqctl set_permissions -p VHOST USER CONFIGURE WRITE READ`.
    pub fn participant_permissions(&self, service: &str) -> [String; 3] {
        let p = regex_escape(&self.prefix);
        let s = regex_escape(service);
        [
            "^$".to_owned(),
            format!("^{p}\\.(results|dead|requeue\\.service\\.{s})$"),
            format!("^{p}\\.service\\.{s}$"),
        ]
    }

    /// The queue of a source: `PREFIX.service.NAME` or `PREFIX.results`.
    pub fn queue(&self, source: &saga_core::Destination) -> String {
        match source {
            saga_core::Destination::Service(name) => format!("{}.service.{name}", self.prefix),
            saga_core::Destination::Results => format!("{}.results", self.prefix),
        }
    }

    /// The dead-letter queue of a source queue: `PREFIX.dead.QUEUE`.
    pub fn dead_queue(&self, source: &saga_core::Destination) -> String {
        format!("{}.dead.{}", self.prefix, self.queue(source))
    }
}

/// A configuration value that does not parse, naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}: expected {expected}")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: &'static str,
    /// What it should hold.
    pub expected: &'static str,
}

impl ConfigError {
    fn new(variable: &'static str, expected: &'static str) -> Self {
        Self { variable, expected }
    }
}

/// The URL with every password replaced by `***`, for logs and errors: the password of each
/// URL's userinfo (in a comma-separated list of URLs too, and holding `/`, `?` or `#`
/// unencoded), and the values of `password` and `sslpassword` in a query string or in a
/// `key=value` connection string. When in doubt it hides more, never less.
pub fn redact(url: &str) -> String {
    mask_password_params(&mask_userinfo(url))
}

/// Masks the password of the userinfo after each `scheme://` in `text`.
fn mask_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // This URL ends where the next one of a list begins (`...,amqp://...`).
        let end = tail
            .find("://")
            .and_then(|next| tail[..next].rfind(','))
            .unwrap_or(tail.len());
        let url = &tail[..end];
        // The userinfo ends at the URL's last `@`: a password may hold `/`, `?` or `#`.
        match url.rfind('@') {
            Some(at) if url[..at].contains(':') => {
                let user = url[..at].split(':').next().unwrap_or_default();
                out.push_str(user);
                out.push_str(":***");
                out.push_str(&url[at..]);
            }
            _ => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Masks the values of the `password` and `sslpassword` parameters (in any case) of a query
/// string or a `key=value` connection string in `text`.
fn mask_password_params(text: &str) -> String {
    const NAME: &str = "password=";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = lower[from..].find(NAME) {
        let at = from + found;
        let value_start = at + NAME.len();
        // The parameter's name starts after `?`, `&`, white space, or at the start.
        let name_start = lower[..at]
            .rfind(|c: char| c == '?' || c == '&' || c.is_whitespace())
            .map_or(0, |s| s + 1);
        let name = &lower[name_start..at + "password".len()];
        // The value ends at the next parameter, a fragment, white space, or the next URL of a
        // list (`,scheme://`).
        let tail = &text[value_start..];
        let mut value_end = tail
            .find(|c: char| c == '&' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        if let Some(comma) = tail.find("://").and_then(|next| tail[..next].rfind(',')) {
            value_end = value_end.min(comma);
        }
        if name == "password" || name == "sslpassword" {
            out.push_str(&text[copied..value_start]);
            out.push_str("***");
            copied = value_start + value_end;
        }
        from = value_start;
    }
    out.push_str(&text[copied..]);
    out
}

/// Escapes the characters a prefix or service name may hold that regular expressions treat
/// specially.
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = !(c.is_ascii_alphanumeric() || c == '_' || c == '-');
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

#[cfg(test)]
mod tests;
