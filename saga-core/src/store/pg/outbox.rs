//! The outbox: committed commands claimed for publishing, and deleted once published.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use sqlx::types::Json;
use sqlx::{Row, SqlStr};

use super::PgStore;
use super::sql;
use crate::error::{Error, Result};
use crate::message::{Destination, Envelope, Message};
use crate::store::{OutboxRecord, OutboxStore};

/// The statements of the outbox.
pub(super) struct Statements {
    claim_outbox: SqlStr,
    delete_outbox: SqlStr,
}

impl Statements {
    pub(super) fn new(s: &str) -> Self {
        Self {
            claim_outbox: sql(format!(
                "UPDATE {s}.outbox SET claimed_until = now() + make_interval(secs => $1) WHERE id IN \
                 (SELECT id FROM {s}.outbox WHERE claimed_until <= now() ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, destination, message_id, headers, body"
            )),
            delete_outbox: sql(format!("DELETE FROM {s}.outbox WHERE id = ANY($1)")),
        }
    }
}

#[async_trait]
impl OutboxStore for PgStore {
    async fn claim_outbox(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxRecord>> {
        // Leases are read and set by the database's `now()`.
        let rows = sqlx::query(self.sql.outbox.claim_outbox.clone())
            .bind(lease.as_secs_f64())
            .bind(limit as i64)
            .fetch_all(self.relaxed().await?)
            .await?;
        rows.into_iter()
            .map(|row| {
                let destination: String = row.try_get("destination")?;
                let Json(headers): Json<BTreeMap<String, String>> = row.try_get("headers")?;
                Ok(OutboxRecord {
                    id: row.try_get("id")?,
                    envelope: Envelope {
                        destination: Destination::decode(&destination).ok_or_else(|| {
                            Error::Internal(format!(
                                "outbox row has a bad destination `{destination}`"
                            ))
                        })?,
                        message: Message {
                            id: row.try_get("message_id")?,
                            headers,
                            body: row.try_get("body")?,
                        },
                    },
                })
            })
            .collect()
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<()> {
        sqlx::query(self.sql.outbox.delete_outbox.clone())
            .bind(ids)
            .execute(self.relaxed().await?)
            .await?;
        Ok(())
    }

    async fn outbox_notifications(&self) -> Result<BoxStream<'static, ()>> {
        super::listen(&self.pool, &self.notify_channel()).await
    }
}
