//! Notifications on a channel (`LISTEN`), as a stream of wake-ups that never ends: a session
//! lost is opened again, and a pool that moved to another host (see [`super::PgHosts`]) has
//! its listening session follow it.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::hosts::CHECK_EVERY;
use crate::error::Result;

/// How long to wait before listening again after the session could not be opened.
const RETRY: Duration = Duration::from_secs(1);

/// A stream that yields at each notification on `channel`, and once more each time it listens
/// anew (notifications sent meanwhile are lost, so its reader should look for itself). The
/// first session is opened here, so an error at the start is the caller's.
pub(super) async fn listen(pool: &PgPool, channel: &str) -> Result<BoxStream<'static, ()>> {
    let listening = Listening {
        listener: Some(subscribe(pool, channel).await?),
        host: host_of(pool),
        pool: pool.clone(),
        channel: channel.to_owned(),
    };
    Ok(futures_util::stream::unfold(listening, |mut l| async move {
        l.next().await;
        Some(((), l))
    })
    .boxed())
}

/// A listening session and what it takes to open it again.
struct Listening {
    listener: Option<PgListener>,
    /// The host and port the session was opened on.
    host: (String, u16),
    pool: PgPool,
    channel: String,
}

impl Listening {
    /// Waits for the next notification, or for the session to be opened anew.
    async fn next(&mut self) {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match subscribe(&self.pool, &self.channel).await {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, channel = %self.channel, "cannot listen yet");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            };
            tokio::select! {
                received = listener.recv() => match received {
                    Ok(_) => return,
                    // Lost, and not reconnected: listen anew (after a pause).
                    Err(_) => {
                        self.listener = None;
                        tokio::time::sleep(RETRY).await;
                    }
                },
                () = tokio::time::sleep(CHECK_EVERY) => {
                    let host = host_of(&self.pool);
                    if host != self.host {
                        // The pool moved to another host: so does the session.
                        self.host = host;
                        self.listener = None;
                    }
                }
            }
        }
    }
}

async fn subscribe(pool: &PgPool, channel: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

/// The host and port a pool opens its connections on now.
fn host_of(pool: &PgPool) -> (String, u16) {
    let options = pool.connect_options();
    (options.get_host().to_owned(), options.get_port())
}
