//! A `DATABASE_URL` that names several hosts, as libpq takes it
//! (`postgres://user@primary:5432,standby:5432/db?target_session_attrs=read-write`), and a pool
//! that follows the primary when a standby is promoted.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// How often a pool on several hosts checks, on a session of its own, that its host still
/// suits; a host that fails the check (or does not answer within [`CHECK_TIMEOUT`]) has the
/// hosts walked again, in their order.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a check, or a connection attempt to one host, may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Which server a session may be opened on: libpq's `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Any server that accepts the connection (libpq's default).
    Any,
    /// A server whose sessions are read-write by default: not in recovery, and
    /// `default_transaction_read_only` off.
    ReadWrite,
    /// A server not in recovery.
    Primary,
}

impl std::fmt::Display for Target {
    /// The name libpq gives it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Any => "any",
            Target::ReadWrite => "read-write",
            Target::Primary => "primary",
        })
    }
}

impl Target {
    /// The query whose single boolean says whether a session suits.
    fn check(self) -> &'static str {
        match self {
            Target::Any => "SELECT true",
            Target::ReadWrite => {
                "SELECT NOT pg_is_in_recovery() \
                 AND current_setting('default_transaction_read_only') = 'off'"
            }
            Target::Primary => "SELECT NOT pg_is_in_recovery()",
        }
    }

    /// Whether the server of `conn` suits; an error if it cannot be asked.
    async fn suits(self, conn: &mut PgConnection) -> sqlx::Result<bool> {
        if self == Target::Any {
            return conn.ping().await.map(|()| true);
        }
        sqlx::query_scalar(self.check()).fetch_one(conn).await
    }
}

/// The hosts of a `DATABASE_URL`, in their order, and the kind of server a session needs.
///
/// One host is what sqlx parses. Several, comma-separated in the URL's authority, each with
/// its own port (5432 if none), share the rest of the URL. `target_session_attrs` takes `any`
/// (the default), `read-write` or `primary`; the standby kinds make no sense for a saga store
/// and are refused.
///
/// ```
/// use saga_core::store::PgHosts;
///
/// let hosts: PgHosts = "postgres://app@db-a:5432,db-b:5433/orders?target_session_attrs=read-write"
///     .parse()
///     .unwrap();
/// assert_eq!(hosts.hosts().len(), 2);
/// assert_eq!(hosts.hosts()[1].get_port(), 5433);
/// ```
#[derive(Debug, Clone)]
pub struct PgHosts {
    hosts: Arc<[PgConnectOptions]>,
    target: Target,
}

impl FromStr for PgHosts {
    type Err = sqlx::Error;

    fn from_str(url: &str) -> sqlx::Result<Self> {
        let (url, target) = take_target(url)?;
        let Some((head, hosts, tail)) = split_hosts(&url) else {
            let one: PgConnectOptions = url.parse()?;
            return Ok(PgHosts {
                hosts: Arc::from([one]),
                target,
            });
        };
        let mut parsed = Vec::new();
        let mut base: Option<PgConnectOptions> = None;
        for host in hosts.split(',') {
            let (name, port) = host_and_port(host)?;
            let base = match &base {
                Some(base) => base.clone(),
                None => base.insert(format!("{head}{name}{tail}").parse()?).clone(),
            };
            parsed.push(base.host(name.trim_matches(['[', ']'])).port(port));
        }
        Ok(PgHosts {
            hosts: parsed.into(),
            target,
        })
    }
}

impl PgHosts {
    /// Each host's connection options, in the URL's order.
    pub fn hosts(&self) -> &[PgConnectOptions] {
        &self.hosts
    }

    /// The kind of server a session needs (`target_session_attrs`).
    pub fn target(&self) -> Target {
        self.target
    }

    /// The same hosts, each host's options changed by `f` (to name the sessions, say).
    pub fn map(self, f: impl Fn(PgConnectOptions) -> PgConnectOptions) -> Self {
        PgHosts {
            hosts: self.hosts.iter().cloned().map(f).collect(),
            target: self.target,
        }
    }

    /// A pool on the first host, in order, that accepts a session of the target kind; tries
    /// again until `options`' acquire timeout while none does (a failover under way).
    ///
    /// With a target other than `any`, every new connection of the pool is checked (its
    /// `after_connect` hook is this check), so no session is ever opened on a standby. With
    /// several hosts, the pool keeps one session of its own to check its host every
    /// [`CHECK_EVERY`]; when the host fails, the hosts are walked again and the pool's new
    /// connections go to the first that suits. Connections already open to a failed host fail
    /// once and are dropped, as after a restart. The check stops when the pool is closed.
    pub async fn connect(&self, options: PgPoolOptions) -> sqlx::Result<PgPool> {
        if self.hosts.len() == 1 && self.target == Target::Any {
            return options.connect_with(self.hosts[0].clone()).await;
        }
        let deadline = tokio::time::Instant::now() + options.get_acquire_timeout();
        let (index, sentinel) = self.walk_until(deadline).await?;
        let target = self.target;
        let options = if target == Target::Any {
            options
        } else {
            options.after_connect(move |conn, _| {
                Box::pin(async move {
                    if target.suits(conn).await? {
                        Ok(())
                    } else {
                        Err(sqlx::Error::Configuration(
                            format!("the server is not {target} (target_session_attrs)").into(),
                        ))
                    }
                })
            })
        };
        let pool = options.connect_with(self.hosts[index].clone()).await?;
        if self.hosts.len() > 1 {
            tokio::spawn(self.clone().watch(pool.clone(), index, sentinel));
        }
        Ok(pool)
    }

    /// The first host that suits and a session on it, walking the hosts again (backing off)
    /// until `deadline`; then an error naming each host's failure.
    async fn walk_until(
        &self,
        deadline: tokio::time::Instant,
    ) -> sqlx::Result<(usize, PgConnection)> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.walk().await {
                Ok(found) => return Ok(found),
                Err(e) if tokio::time::Instant::now() + backoff >= deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One walk of the hosts, in order: the first that suits and a session on it. When none
    /// does, an error that says "out of reach" (an I/O error naming each host's failure) if
    /// every host is down, starting, or not yet of the target kind (a failover under way);
    /// otherwise the first answer that will not change (a wrong password, say) as it came.
    async fn walk(&self) -> sqlx::Result<(usize, PgConnection)> {
        let mut failures = Vec::new();
        let mut lasting = None;
        for (index, host) in self.hosts.iter().enumerate() {
            let attempt = async {
                let mut conn = host.connect().await?;
                if self.target.suits(&mut conn).await? {
                    Ok(Some(conn))
                } else {
                    let _ = conn.close().await;
                    Ok::<_, sqlx::Error>(None)
                }
            };
            let failure = match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
                Ok(Ok(Some(conn))) => return Ok((index, conn)),
                Ok(Ok(None)) => format!("not {} (target_session_attrs)", self.target),
                Err(_) => format!("no answer within {CHECK_TIMEOUT:?}"),
                Ok(Err(e)) => {
                    let text = e.to_string();
                    if !passes(&e) && lasting.is_none() {
                        lasting = Some(e);
                    }
                    text
                }
            };
            failures.push(format!("{}: {failure}", address(host)));
        }
        if let Some(lasting) = lasting {
            return Err(lasting);
        }
        let text = if self.hosts.len() == 1 {
            failures.remove(0)
        } else {
            format!("no host of the database URL suits: {}", failures.join("; "))
        };
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            text,
        )))
    }

    /// Checks the pool's host every [`CHECK_EVERY`] on `sentinel`; when it fails, points the
    /// pool at the first host that suits. Ends when the pool closes.
    async fn watch(self, pool: PgPool, mut current: usize, mut sentinel: PgConnection) {
        loop {
            tokio::select! {
                () = pool.close_event() => return,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let check = tokio::time::timeout(CHECK_TIMEOUT, self.target.suits(&mut sentinel));
            if matches!(check.await, Ok(Ok(true))) {
                continue;
            }
            tracing::warn!(
                host = %address(&self.hosts[current]),
                "the database host failed its check; walking the hosts"
            );
            let found = tokio::select! {
                () = pool.close_event() => return,
                found = self.walk_until(tokio::time::Instant::now() + Duration::from_secs(3600)) => found,
            };
            // A walk gives up only after an hour: the check runs again and so does the walk.
            let Ok((index, conn)) = found else { continue };
            pool.set_connect_options(self.hosts[index].clone());
            if index != current {
                tracing::warn!(
                    from = %address(&self.hosts[current]),
                    to = %address(&self.hosts[index]),
                    "the pool's new connections go to another database host"
                );
            }
            current = index;
            let _ = std::mem::replace(&mut sentinel, conn).close_hard().await;
        }
    }
}

/// Whether a failure to connect passes on its own: the server down or out of reach, shutting
/// down or starting up.
fn passes(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

/// `host:port`, for logs and errors.
fn address(host: &PgConnectOptions) -> String {
    match host.get_host() {
        v6 if v6.contains(':') => format!("[{v6}]:{}", host.get_port()),
        name => format!("{name}:{}", host.get_port()),
    }
}

/// The URL without its `target_session_attrs` parameter, and that parameter's target.
fn take_target(url: &str) -> sqlx::Result<(String, Target)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Target::Any));
    };
    let mut target = Target::Any;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => {
                target = match value {
                    "any" => Target::Any,
                    "read-write" => Target::ReadWrite,
                    "primary" => Target::Primary,
                    other => {
                        return Err(sqlx::Error::Configuration(
                            format!(
                                "target_session_attrs={other} is not supported: a saga store \
                                 writes, so it takes any, read-write or primary"
                            )
                            .into(),
                        ));
                    }
                }
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, target))
}

/// `(before the hosts, the hosts, after them)` when the URL's authority names several hosts.
fn split_hosts(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let authority_len = url[start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - start);
    let authority = &url[start..start + authority_len];
    let hosts_at = start + authority.rfind('@').map_or(0, |at| at + 1);
    let hosts = &url[hosts_at..start + authority_len];
    hosts
        .contains(',')
        .then(|| (&url[..hosts_at], hosts, &url[start + authority_len..]))
}

/// A host of a list and its port (5432 if it names none); `[v6]:port` for IPv6.
fn host_and_port(host: &str) -> sqlx::Result<(&str, u16)> {
    let bad = || sqlx::Error::Configuration(format!("`{host}` is not host[:port]").into());
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let end = rest.find(']').ok_or_else(bad)?;
        let port = rest[end + 1..].strip_prefix(':');
        (&host[..end + 2], port)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if name.is_empty() || name == "[]" {
        return Err(bad());
    }
    let port = match port {
        Some(port) => port.parse().map_err(|_| bad())?,
        None => 5432,
    };
    Ok((name, port))
}

#[cfg(test)]
mod tests;
