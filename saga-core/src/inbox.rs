//! The participants' inbox: apply a command's effect once, however often it is delivered.

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::migrate::Migrator;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, SqlSafeStr, SqlStr};

use crate::error::Result;
use crate::event::Direction;
use crate::message::Command;
use crate::schema;
use crate::worker::{CommandContext, StepError};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/inbox");

/// Records each command's result under its idempotency key, in the same transaction as the
/// handler's own writes. A redelivered command (or a retry of the same step) gets the recorded
/// result back and its effect is not applied again.
///
/// Retryable failures are not recorded (their transaction rolls back, so the next attempt
/// runs afresh); terminal failures are, so a redelivery fails the same way. A compensation
/// leaves a tombstone under its step's forward key, so a forward delivery that arrives after
/// the compensation (late, from a backlog) does nothing.
///
/// ```no_run
/// # async fn demo(inbox: saga_core::Inbox, ctx: saga_core::CommandContext) -> Result<(), saga_core::StepError> {
/// let charged: u64 = inbox
///     .run(&ctx, |tx| Box::pin(async move {
///         sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
///             .execute(&mut *tx)
///             .await?;
///         Ok(10)
///     }))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Inbox {
    pool: PgPool,
    schema: String,
    claim: SqlStr,
    recorded: SqlStr,
    record: SqlStr,
    record_failure: SqlStr,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
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
            claim: sql(format!(
                "INSERT INTO {s}.inbox (idempotency_key, saga_id, command) VALUES ($1, $2, $3) \
                 ON CONFLICT (idempotency_key) DO NOTHING"
            )),
            recorded: sql(format!(
                "SELECT outcome FROM {s}.inbox WHERE idempotency_key = $1"
            )),
            record: sql(format!(
                "INSERT INTO {s}.inbox (idempotency_key, saga_id, command, outcome) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (idempotency_key) DO UPDATE SET outcome = EXCLUDED.outcome"
            )),
            // Never over another delivery's recorded outcome.
            record_failure: sql(format!(
                "INSERT INTO {s}.inbox (idempotency_key, saga_id, command, outcome) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (idempotency_key) DO NOTHING"
            )),
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

    /// Runs `work` in a transaction and records its result under the command's idempotency
    /// key; if a result is already recorded, returns it without running `work`.
    pub async fn run<T, F>(&self, ctx: &CommandContext, work: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, StepError>> + Send,
    {
        let mut tx = self.pool.begin().await?;
        // Concurrent deliveries of one key wait here for the first to commit or roll back.
        let claimed = sqlx::query(self.claim.clone())
            .bind(&ctx.idempotency_key)
            .bind(ctx.saga_id)
            .bind(&ctx.command)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if ctx.direction == Direction::Compensation {
            // A forward delivery that arrives after its compensation (it sat in a backlog past
            // its timeout) must not apply: it finds this tombstone under its key instead.
            let forward =
                Command::idempotency_key_for(ctx.saga_id, ctx.step_index, Direction::Forward);
            sqlx::query(self.record_failure.clone())
                .bind(&forward)
                .bind(ctx.saga_id)
                .bind(&ctx.command)
                .bind(Json(
                    json!({ "error": "the step was compensated before this delivery" }),
                ))
                .execute(&mut *tx)
                .await?;
        }
        if !claimed {
            let outcome: Option<Json<Value>> = sqlx::query_scalar(self.recorded.clone())
                .bind(&ctx.idempotency_key)
                .fetch_one(&mut *tx)
                .await?;
            tx.rollback().await?;
            tracing::info!(key = %ctx.idempotency_key, "command already applied; returning the recorded result");
            return decode(outcome.map(|Json(v)| v));
        }
        match work(&mut tx).await {
            Ok(value) => {
                sqlx::query(self.record.clone())
                    .bind(&ctx.idempotency_key)
                    .bind(ctx.saga_id)
                    .bind(&ctx.command)
                    .bind(Json(
                        json!({ "ok": serde_json::to_value(&value).map_err(StepError::terminal)? }),
                    ))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(value)
            }
            Err(error) if error.is_retryable() => {
                tx.rollback().await?;
                Err(error)
            }
            Err(error) => {
                tx.rollback().await?;
                sqlx::query(self.record_failure.clone())
                    .bind(&ctx.idempotency_key)
                    .bind(ctx.saga_id)
                    .bind(&ctx.command)
                    .bind(Json(json!({ "error": error.message() })))
                    .execute(&self.pool)
                    .await?;
                Err(error)
            }
        }
    }
}

fn decode<T: DeserializeOwned>(outcome: Option<Value>) -> Result<T, StepError> {
    match outcome {
        Some(Value::Object(mut map)) => {
            if let Some(ok) = map.remove("ok") {
                serde_json::from_value(ok).map_err(StepError::terminal)
            } else {
                let error = map.remove("error").unwrap_or_default();
                Err(StepError::terminal(
                    error.as_str().unwrap_or("recorded failure"),
                ))
            }
        }
        _ => Err(StepError::retryable(
            "the inbox row has no recorded outcome",
        )),
    }
}
