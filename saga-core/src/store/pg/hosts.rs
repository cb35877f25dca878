//! A `DATABASE_URL` that names several hosts, as libpq takes it
//! (`postgres://user@primary:5432,standby:5432/db?target_session_attrs=read-write`), and a pool
//! that follows the primary when a standby is promoted.

mod parse;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// How often a pool on several hosts checks, on a session of its own, that its host still
/// suits; a host that fails the check (or does not answer within [`CHECK_TIMEOUT`]) has the
/// hosts walked again.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a check, or a connection attempt to one host, may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Which server a session may be opened on: libpq's `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Any server that accepts the connection (libpq's default; one host only here).
    Any,
    /// A server whose sessions are read-write by default: not in recovery, and
    /// `default_transaction_read_only` off (the default with several hosts).
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
    /// Whether the server of `conn` suits; an error if it cannot be asked.
    async fn suits(self, conn: &mut PgConnection) -> sqlx::Result<bool> {
        let check = match self {
            Target::Any => return conn.ping().await.map(|()| true),
            Target::ReadWrite => {
                "SELECT NOT pg_is_in_recovery() \
                 AND current_setting('default_transaction_read_only') = 'off'"
            }
            Target::Primary => "SELECT NOT pg_is_in_recovery()",
        };
        sqlx::query_scalar(check).fetch_one(conn).await
    }
}

/// The hosts of a `DATABASE_URL`, in their order, and the kind of server a session needs.
///
/// One host is what sqlx parses. Several, comma-separated in the URL's authority, share the
/// rest of the URL; each is parsed as a URL of its own (a port left out follows `PGPORT` or
/// 5432). `target_session_attrs` takes `read-write` (the default with several hosts),
/// `primary`, or `any` (the default with one host); a saga store writes, so the standby kinds,
/// and `any` with several hosts, are refused.
///
/// ```
/// use saga_core::store::{PgHosts, Target};
///
/// let hosts: PgHosts = "postgres://app@db-a:5432,db-b:5433/orders".parse().unwrap();
/// assert_eq!(hosts.hosts().len(), 2);
/// assert_eq!(hosts.hosts()[1].get_port(), 5433);
/// assert_eq!(hosts.target(), Target::ReadWrite);
/// ```
#[derive(Clone)]
pub struct PgHosts {
    hosts: Arc<[PgConnectOptions]>,
    target: Target,
}

impl std::fmt::Debug for PgHosts {
    /// The hosts' addresses and the target; never the options' password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHosts")
            .field("hosts", &self.hosts.iter().map(address).collect::<Vec<_>>())
            .field("target", &self.target)
            .finish()
    }
}

impl PgHosts {
    fn new(hosts: Vec<PgConnectOptions>, target: Target) -> Self {
        PgHosts {
            hosts: hosts.into(),
            target,
        }
    }

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
        PgHosts::new(self.hosts.iter().cloned().map(f).collect(), self.target)
    }

    /// A pool on the first host, in order, that accepts a session of the target kind; tries
    /// again until `options`' acquire timeout while none does and every failure may pass (a
    /// failover under way). One host with `any` is a plain sqlx pool.
    ///
    /// Otherwise every new connection is checked (the pool's `after_connect` hook is this
    /// check, replacing any `options` had), so the pool opens no session on a standby. With
    /// several hosts, the pool also keeps one session of its own to check its host every
    /// [`CHECK_EVERY`]; when the host fails, the hosts are walked again (its own first), new
    /// connections go to the first that suits, and each connection opened before the move is
    /// closed when next acquired (the `before_acquire` hook). The check holds the pool: it
    /// stops when the pool is closed ([`PgPool::close`]).
    pub async fn connect(&self, options: PgPoolOptions) -> sqlx::Result<PgPool> {
        if self.hosts.len() == 1 && self.target == Target::Any {
            return options.connect_with(self.hosts[0].clone()).await;
        }
        let deadline = tokio::time::Instant::now() + options.get_acquire_timeout();
        let (index, sentinel) = self.walk_until(0, deadline).await?;
        let target = self.target;
        let mut options = options.after_connect(move |conn, _| {
            Box::pin(async move {
                if target.suits(conn).await? {
                    Ok(())
                } else {
                    Err(sqlx::Error::Configuration(
                        format!("the server is not {target} (target_session_attrs)").into(),
                    ))
                }
            })
        });
        let moved: Arc<Mutex<Option<Instant>>> = Arc::default();
        if self.hosts.len() > 1 {
            let moved = Arc::clone(&moved);
            options = options.before_acquire(move |_, meta| {
                let opened = Instant::now().checked_sub(meta.age);
                let moved = *moved.lock().expect("moved lock");
                Box::pin(async move { Ok(moved.is_none_or(|m| opened.is_some_and(|o| o >= m))) })
            });
        }
        let pool = options.connect_with(self.hosts[index].clone()).await?;
        if self.hosts.len() > 1 {
            tokio::spawn(self.clone().watch(pool.clone(), index, sentinel, moved));
        } else {
            let _ = sentinel.close().await;
        }
        Ok(pool)
    }

    /// The first host that suits, starting at `first`, and a session on it; walks the hosts
    /// again (backing off) while every failure may pass, until `deadline`.
    async fn walk_until(
        &self,
        first: usize,
        deadline: tokio::time::Instant,
    ) -> sqlx::Result<(usize, PgConnection)> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.walk(first, deadline).await {
                Ok(found) => return Ok(found),
                Err(Walked::Lasting(e)) => return Err(e),
                Err(Walked::Passing(e)) if tokio::time::Instant::now() + backoff >= deadline => {
                    return Err(e);
                }
                Err(Walked::Passing(_)) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One walk of the hosts, `first` first and then the others in order: the first that suits
    /// and a session on it. Each host gets [`CHECK_TIMEOUT`], or what is left until `deadline`
    /// (at least a second). A host whose answer will not change (a login refused there) is
    /// passed over like one that is down; that answer is the walk's error if no host suits.
    async fn walk(
        &self,
        first: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(usize, PgConnection), Walked> {
        let order = std::iter::once(first).chain((0..self.hosts.len()).filter(|&i| i != first));
        let mut failures = Vec::new();
        let mut lasting = None;
        for index in order {
            let host = &self.hosts[index];
            let attempt = async {
                let mut conn = host.connect().await?;
                if self.target.suits(&mut conn).await? {
                    Ok(Some(conn))
                } else {
                    let _ = conn.close().await;
                    Ok::<_, sqlx::Error>(None)
                }
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let limit = CHECK_TIMEOUT.min(left).max(Duration::from_secs(1));
            let failure = match tokio::time::timeout(limit, attempt).await {
                Ok(Ok(Some(conn))) => return Ok((index, conn)),
                Ok(Ok(None)) => format!("not {} (target_session_attrs)", self.target),
                Err(_) => format!("no answer within {limit:?}"),
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
        // An answer that will not change (a wrong password, say), as it came.
        if let Some(lasting) = lasting {
            return Err(Walked::Lasting(lasting));
        }
        let text = if self.hosts.len() == 1 {
            failures.remove(0)
        } else {
            format!("no host of the database URL suits: {}", failures.join("; "))
        };
        // Out of reach, as the callers that ride out a restart understand it.
        Err(Walked::Passing(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            text,
        ))))
    }

    /// Checks the pool's host every [`CHECK_EVERY`] on `sentinel`; when it fails, points the
    /// pool at the first host that suits (its own first) and marks the connections opened
    /// before as `moved`. Ends when the pool closes.
    async fn watch(
        self,
        pool: PgPool,
        mut current: usize,
        mut sentinel: PgConnection,
        moved: Arc<Mutex<Option<Instant>>>,
    ) {
        loop {
            tokio::select! {
                () = pool.close_event() => break,
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
            // A walk gives up after an hour (or at once on a lasting error, a password changed
            // say): the check fails again a second later, and so the walk goes on.
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            let found = tokio::select! {
                () = pool.close_event() => break,
                found = self.walk_until(current, far) => found,
            };
            let (index, conn) = match found {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(error = %e, "no database host suits yet");
                    continue;
                }
            };
            if index != current {
                pool.set_connect_options(self.hosts[index].clone());
                *moved.lock().expect("moved lock") = Some(Instant::now());
                tracing::warn!(
                    from = %address(&self.hosts[current]),
                    to = %address(&self.hosts[index]),
                    "the pool's new connections go to another database host"
                );
                current = index;
            }
            let _ = std::mem::replace(&mut sentinel, conn).close_hard().await;
        }
        let _ = sentinel.close().await;
    }
}

/// How a walk of the hosts failed.
enum Walked {
    /// Every host failed in a way that may pass (down, starting, not yet promoted).
    Passing(sqlx::Error),
    /// A host gave an answer that will not change.
    Lasting(sqlx::Error),
}

/// Whether a failure to connect passes on its own: the server down or out of reach, shutting
/// down or starting up, or short of resources (too many connections).
fn passes(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// `host:port`, for logs and errors.
fn address(host: &PgConnectOptions) -> String {
    match host.get_host() {
        v6 if v6.contains(':') && !v6.starts_with('[') => format!("[{v6}]:{}", host.get_port()),
        name => format!("{name}:{}", host.get_port()),
    }
}

#[cfg(test)]
mod tests;
