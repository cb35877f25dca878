//! The participants' inbox: each step's outcome recorded under its idempotency key, in the
//! same transaction as the handler's own writes; and fences.

use serde_json::{Value, json};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgQueryResult;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, SqlSafeStr, SqlStr};
use uuid::Uuid;

use crate::error::Result;
use crate::message::Outcome;
use crate::schema;

mod purge;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/inbox");

/// A participant's inbox, in its own database: give it to
/// [`Worker::builder`](crate::Worker::builder), and every command of the worker runs in a
/// transaction of this pool that also records the command's outcome under its idempotency key.
///
/// - A handler's writes through [`CommandContext::transaction`](crate::CommandContext::transaction)
///   commit with that record, or not at all: a redelivered command, or a retry of the same step,
///   gets the recorded result back and its effect is not applied again.
/// - A terminal failure is recorded too (the handler's writes are rolled back), so a
///   redelivery fails the same way; a retryable failure, a panic or a timeout rolls everything
///   back, and the next attempt runs afresh.
/// - A compensation also leaves a tombstone under its step's forward key, if nothing is
///   recorded there.
/// - A *fence* (the orchestrator asks whether a step whose outcome it does not know applied)
///   is answered from the record, or writes a tombstone under the key, after which no delivery
///   of any attempt runs the handler.
///
/// Its pool should hold at least as many connections as the worker runs commands at once
/// ([`WorkerBuilder::concurrency`](crate::worker::WorkerBuilder::concurrency)): each command
/// holds one until its outcome is committed.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> saga_core::Result<()> {
/// let inbox = saga_core::Inbox::new(pool, "payment")?;
/// inbox.migrate().await?; // the table `payment.inbox`
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Inbox {
    pool: PgPool,
    schema: String,
    sql: std::sync::Arc<Statements>,
}

/// The inbox's statements, the schema name formatted in.
struct Statements {
    claim: SqlStr,
    claim_compensation: SqlStr,
    recorded: SqlStr,
    record: SqlStr,
    record_new: SqlStr,
    purge_horizon: SqlStr,
    purge_rows: SqlStr,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// What claiming a key found.
pub(crate) enum Claim {
    /// The key was free: this delivery runs the handler, in this transaction.
    Mine(sqlx::Transaction<'static, sqlx::Postgres>),
    /// An outcome is recorded: the answer, without running the handler.
    Recorded(Outcome),
}

impl Inbox {
    /// The default schema of the inbox table.
    pub const DEFAULT_SCHEMA: &'static str = "saga_inbox";

    /// An inbox in the participant's database, in `schema`.
    pub fn new(pool: PgPool, schema: &str) -> Result<Self> {
        let s = schema::quoted(schema)?;
        let sql = |text: String| AssertSqlSafe(text).into_sql_str();
        Ok(Self {
            pool,
            schema: schema.to_owned(),
            sql: std::sync::Arc::new(Statements {
                // Every insert of a key is refused (no row, no conflict) for a saga whose records
                // a purge may have deleted: one started before the purge's horizon ($4, the saga's
                // start less a margin; see `purge`).
                claim: sql(format!(
                    "INSERT INTO {s}.inbox (idempotency_key, saga_id, command) SELECT $1, $2, $3 \
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.inbox_purged WHERE purged_before > $4) \
                 ON CONFLICT (idempotency_key) DO NOTHING"
                )),
                // The claim of a compensation, with a tombstone under its step's forward key ($5)
                // if nothing is recorded there; the row count is the claim's.
                claim_compensation: sql(format!(
                    "WITH h AS (SELECT NOT EXISTS (SELECT 1 FROM {s}.inbox_purged WHERE purged_before > $4) AS ok), \
                 f AS (INSERT INTO {s}.inbox (idempotency_key, saga_id, command, outcome) \
                 SELECT $5, $2, $3, '{{\"fenced\": \"its step was compensated\"}}' FROM h WHERE h.ok \
                 ON CONFLICT (idempotency_key) DO NOTHING) \
                 INSERT INTO {s}.inbox (idempotency_key, saga_id, command) SELECT $1, $2, $3 FROM h WHERE h.ok \
                 ON CONFLICT (idempotency_key) DO NOTHING"
                )),
                recorded: sql(format!(
                    "SELECT outcome FROM {s}.inbox WHERE idempotency_key = $1"
                )),
                record: sql(format!(
                    "UPDATE {s}.inbox SET outcome = $2 WHERE idempotency_key = $1"
                )),
                // An outcome for a key nothing is recorded under (a tombstone, a failure); never
                // over another delivery's.
                record_new: sql(format!(
                    "INSERT INTO {s}.inbox (idempotency_key, saga_id, command, outcome) SELECT $1, $2, $3, $4 \
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.inbox_purged WHERE purged_before > $5) \
                 ON CONFLICT (idempotency_key) DO NOTHING"
                )),
                purge_horizon: sql(format!(
                    "INSERT INTO {s}.inbox_purged (purged_before) VALUES ($1) ON CONFLICT (one) \
                 DO UPDATE SET purged_before = greatest({s}.inbox_purged.purged_before, EXCLUDED.purged_before)"
                )),
                purge_rows: sql(format!(
                    "DELETE FROM {s}.inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM {s}.inbox \
                 WHERE created_at < $1 LIMIT $2))"
                )),
            }),
        })
    }

    /// Creates or upgrades the inbox table.
    pub async fn migrate(&self) -> Result<()> {
        schema::migrate(
            &self.pool,
            &self.schema,
            &MIGRATOR,
            "_saga_inbox_migrations",
        )
        .await
    }

    /// The pool the commands' transactions come from.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema of the inbox table.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Begins a command's transaction and claims its key. A concurrent delivery of the same
    /// key waits here until the first commits or rolls back, at most `wait`. A compensation
    /// also leaves a tombstone under its step's forward key, if nothing is recorded there:
    /// a forward delivery still on its way after the compensation then does nothing.
    pub(crate) async fn claim(
        &self,
        command: &crate::message::Command,
        wait: std::time::Duration,
    ) -> Result<Claim> {
        let (key, saga_id) = (command.idempotency_key.as_str(), command.saga_id);
        let mut tx = self.begin_waiting(wait).await?;
        let claim = if command.direction == crate::event::Direction::Compensation {
            let forward = crate::message::Command::idempotency_key_for(
                saga_id,
                command.step,
                crate::event::Direction::Forward,
            );
            sqlx::query(self.sql.claim_compensation.clone())
                .bind(key)
                .bind(saga_id)
                .bind(&command.command)
                .bind(purge::horizon_of(saga_id))
                .bind(forward)
        } else {
            sqlx::query(self.sql.claim.clone())
                .bind(key)
                .bind(saga_id)
                .bind(&command.command)
                .bind(purge::horizon_of(saga_id))
        };
        let claimed = claim.execute(&mut *tx).await?.rows_affected() == 1;
        if claimed {
            return Ok(Claim::Mine(tx));
        }
        let outcome = self.recorded(&mut tx, key).await?;
        tx.rollback().await?;
        let Some(outcome) = outcome else {
            // Neither claimed nor recorded: its saga predates a purge. Nothing is recorded;
            // the orchestrator's retries end in a fence, which cannot tell either.
            tracing::warn!(%key, "command of a saga whose inbox records may have been purged");
            return Ok(Claim::Recorded(Outcome::Failure {
                error: purge::too_old(saga_id),
                retryable: true,
            }));
        };
        tracing::info!(%key, "command already settled; answering from the inbox");
        Ok(Claim::Recorded(outcome))
    }

    /// Begins a transaction whose lock waits give up after `wait` (one round trip, as a plain
    /// `BEGIN`).
    async fn begin_waiting(
        &self,
        wait: std::time::Duration,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self
            .pool
            .begin_with(AssertSqlSafe(format!(
                "BEGIN; SET LOCAL lock_timeout = {}",
                wait.as_millis().max(1)
            )))
            .await?)
    }

    /// The outcome recorded under `key`; `None` if the key has no row.
    async fn recorded(&self, conn: &mut PgConnection, key: &str) -> Result<Option<Outcome>> {
        let outcome: Option<Option<Json<Value>>> = sqlx::query_scalar(self.sql.recorded.clone())
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(outcome.map(|o| decode(o.map(|Json(v)| v))))
    }

    /// Whether an outcome (a success, a terminal failure or a tombstone) is recorded under
    /// `key` (for the test kit).
    #[cfg(feature = "testing")]
    pub(crate) async fn settles(&self, key: &str) -> Result<bool> {
        let mut conn = self.pool.acquire().await?;
        let recorded = self.recorded(&mut conn, key).await?;
        Ok(recorded.is_some_and(|o| {
            !matches!(
                o,
                Outcome::Failure {
                    retryable: true,
                    ..
                }
            )
        }))
    }

    /// Records the handler's output under `key`, and commits.
    pub(crate) async fn succeed(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        key: &str,
        output: &Value,
    ) -> Result<()> {
        self.record(&mut tx, key, json!({ "ok": output })).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Rolls the command's transaction back (the handler's writes with it) and records a
    /// terminal failure under its key, in a transaction of its own; returns the answer: that
    /// failure, or the outcome another delivery recorded in between (it claimed the key once
    /// this transaction let go of it, and its outcome is the truth).
    pub(crate) async fn fail(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        command: &crate::message::Command,
        error: &str,
    ) -> Result<Outcome> {
        tx.rollback().await?;
        let key = command.idempotency_key.as_str();
        let mut tx = self.pool.begin().await?;
        let recorded = sqlx::query(self.sql.record_new.clone())
            .bind(key)
            .bind(command.saga_id)
            .bind(&command.command)
            .bind(Json(json!({ "error": error })))
            .bind(purge::horizon_of(command.saga_id))
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        let outcome = if recorded {
            Outcome::Failure {
                error: error.to_owned(),
                retryable: false,
            }
        } else {
            self.recorded(&mut tx, key)
                .await?
                .unwrap_or_else(|| Outcome::Failure {
                    error: purge::too_old(command.saga_id),
                    retryable: true,
                })
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn record(&self, conn: &mut PgConnection, key: &str, outcome: Value) -> Result<()> {
        let updated: PgQueryResult = sqlx::query(self.sql.record.clone())
            .bind(key)
            .bind(Json(outcome))
            .execute(&mut *conn)
            .await?;
        if updated.rows_affected() != 1 {
            // The handler ended the transaction that held the claim (a COMMIT of its own).
            return Err(crate::Error::Internal(format!(
                "the inbox row of {key} is gone: the handler must not end the command's transaction"
            )));
        }
        Ok(())
    }

    /// Fences the step whose action's key is `key`: answers its recorded outcome, or writes a
    /// tombstone so that no delivery can apply it any more. Waits at most `lock_timeout_ms`
    /// for a delivery that holds the key (its handler is running) to finish.
    pub(crate) async fn fence(
        &self,
        key: &str,
        saga_id: Uuid,
        command: &str,
        wait: std::time::Duration,
    ) -> Result<Outcome> {
        let mut tx = self.begin_waiting(wait).await?;
        let tombstone = json!({ "fenced": "fenced before any delivery applied it" });
        let written = sqlx::query(self.sql.record_new.clone())
            .bind(key)
            .bind(saga_id)
            .bind(command)
            .bind(Json(tombstone))
            .bind(purge::horizon_of(saga_id))
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        let outcome = if written {
            Outcome::Fenced {
                detail: "no delivery had applied it; a tombstone now stops every later one".into(),
            }
        } else {
            match self.recorded(&mut tx, key).await? {
                Some(Outcome::Failure {
                    error,
                    retryable: false,
                }) => Outcome::Fenced {
                    detail: format!("its failure is recorded: {error}"),
                },
                Some(other) => other,
                // Its record may have been purged: whether it applied is not known here.
                None => Outcome::Unfenceable {
                    detail: purge::too_old(saga_id),
                },
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }
}

/// The answer a recorded outcome gives: `{"ok": output}`, `{"error": why}` (a terminal
/// failure) or `{"fenced": why}` (a tombstone).
fn decode(outcome: Option<Value>) -> Outcome {
    let Some(Value::Object(mut map)) = outcome else {
        return Outcome::Failure {
            error: "the inbox row has no recorded outcome".into(),
            retryable: true,
        };
    };
    let text = |v: Option<Value>, default: &str| {
        v.as_ref()
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    if let Some(output) = map.remove("ok") {
        Outcome::Success { output }
    } else if let Some(fenced) = map.remove("fenced") {
        Outcome::Fenced {
            detail: text(Some(fenced), "fenced"),
        }
    } else {
        Outcome::Failure {
            error: text(map.remove("error"), "recorded failure"),
            retryable: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migrations can be spawned: their futures are `Send`.
    #[allow(dead_code)]
    fn migrations_are_send(inbox: &Inbox, store: &crate::PgStore) {
        fn send<T: Send>(_: T) {}
        send(inbox.migrate());
        send(store.migrate());
    }

    #[test]
    fn recorded_outcomes_decode_to_their_answers() {
        assert_eq!(
            decode(Some(json!({"ok": 7}))),
            Outcome::Success { output: json!(7) }
        );
        assert_eq!(
            decode(Some(json!({"error": "declined"}))),
            Outcome::Failure {
                error: "declined".into(),
                retryable: false
            }
        );
        assert_eq!(
            decode(Some(json!({"fenced": "tombstone"}))),
            Outcome::Fenced {
                detail: "tombstone".into()
            }
        );
        assert!(matches!(
            decode(None),
            Outcome::Failure {
                retryable: true,
                ..
            }
        ));
    }
}
