//! The participants of the examples: every command records its effect, once, in the service's
//! own table and in `example_effects`, in the transaction its worker's inbox runs it in (or,
//! for the bench's baseline, at least once in a transaction of its own; or in memory for the
//! demo).

use std::sync::{Arc, Mutex};

use saga_core::Inbox;
use saga_core::worker::{CommandContext, Handler, StepError, Worker};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use crate::{CommandSpec, Example, Receipt};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// An effect kept in memory: saga, service, action.
pub type MemoryEffect = (Uuid, &'static str, &'static str);

/// Where a participant's effects go.
#[derive(Clone)]
pub enum Ledger {
    /// PostgreSQL: the service's schema holds its `operations` table and its inbox.
    Pg {
        /// The pool.
        pool: PgPool,
        /// The service's inbox.
        inbox: Inbox,
        /// The service's schema.
        schema: String,
    },
    /// PostgreSQL without an inbox: each command writes its effect in a transaction of its
    /// own, at least once, as a service without an inbox would (the bench's baseline for what
    /// the inbox costs).
    PgAtLeastOnce {
        /// The pool.
        pool: PgPool,
        /// The service's schema.
        schema: String,
    },
    /// Memory, for the demo: `(saga, service, action)` in order.
    Memory(Arc<Mutex<Vec<MemoryEffect>>>),
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ledger::Pg { .. } => f.write_str("Ledger::Pg"),
            Ledger::PgAtLeastOnce { .. } => f.write_str("Ledger::PgAtLeastOnce"),
            Ledger::Memory(_) => f.write_str("Ledger::Memory"),
        }
    }
}

impl Ledger {
    /// Effects in PostgreSQL, the service's tables in `schema`.
    pub fn pg(pool: PgPool, schema: &str) -> anyhow::Result<Self> {
        Ok(Ledger::Pg {
            inbox: Inbox::new(pool.clone(), schema)?,
            pool,
            schema: schema.to_owned(),
        })
    }
}

/// Creates `example_effects`, and for each schema (one per service) its `operations` table and
/// inbox.
pub async fn migrate(pool: &PgPool, schemas: &[&str]) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    for service in schemas {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{service}\""
        )))
        .execute(pool)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS \"{service}\".operations (id bigserial PRIMARY KEY, \
             saga_id uuid NOT NULL, command text NOT NULL, payload jsonb NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now())"
        )))
        .execute(pool)
        .await?;
        Inbox::new(pool.clone(), service)?.migrate().await?;
    }
    Ok(())
}

/// Handles one command by recording its effect.
#[derive(Debug, Clone)]
pub struct EffectHandler {
    spec: CommandSpec,
    ledger: Ledger,
    /// How long the handler works before it acts.
    work: std::time::Duration,
}

impl Handler for EffectHandler {
    type Input = Value;
    type Output = Receipt;

    async fn handle(&self, input: Value, ctx: CommandContext) -> Result<Receipt, StepError> {
        let spec = self.spec;
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        if let Some(flag) = spec.fails_when
            && input.get(flag) == Some(&Value::Bool(true))
        {
            return Err(StepError::terminal(format!(
                "{} refused: {flag}",
                spec.command
            )));
        }
        let receipt = Receipt {
            id: format!("{}-{}", spec.command, ctx.saga_id),
        };
        match &self.ledger {
            Ledger::Memory(effects) => {
                effects.lock().expect("effects lock").push((
                    ctx.saga_id,
                    spec.service,
                    spec.command,
                ));
                Ok(receipt)
            }
            Ledger::Pg { schema, .. } => {
                // Committed with the command's inbox record: once per step, whatever happens.
                let mut tx = ctx.transaction().await?;
                write_effect(&mut tx, schema, ctx.saga_id, &spec, &input).await?;
                Ok(receipt)
            }
            Ledger::PgAtLeastOnce { pool, schema } => {
                // Committed on its own: a redelivery writes it again.
                let mut tx = pool.begin().await?;
                write_effect(&mut tx, schema, ctx.saga_id, &spec, &input).await?;
                tx.commit().await?;
                Ok(receipt)
            }
        }
    }
}

/// Writes a command's effect: a row in its service's `operations` and one in `example_effects`.
async fn write_effect(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    saga_id: Uuid,
    spec: &CommandSpec,
    input: &Value,
) -> Result<(), StepError> {
    let operation = format!(
        "INSERT INTO \"{schema}\".operations (saga_id, command, payload) VALUES ($1, $2, $3)"
    );
    sqlx::query(AssertSqlSafe(operation))
        .bind(saga_id)
        .bind(spec.command)
        .bind(sqlx::types::Json(input))
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO example_effects (saga_id, service, action) VALUES ($1, $2, $3)")
        .bind(saga_id)
        .bind(spec.service)
        .bind(spec.command)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The worker of `service`, with a handler for each of its commands: with the service's inbox
/// in PostgreSQL, or at least once (the bench's baseline, and the demo in memory). Payloads are
/// not encrypted.
pub fn worker<E: Example>(service: &str, ledger: &Ledger) -> Worker {
    worker_with::<E>(
        service,
        ledger,
        saga_core::Metrics::new(),
        saga_core::Payloads::plain(),
        std::time::Duration::ZERO,
    )
}

/// Like [`worker`], counting into `metrics`, its payloads encoded by `payloads`; each handler
/// works for `work` (a service's own work, for the bench) before it acts.
pub fn worker_with<E: Example>(
    service: &str,
    ledger: &Ledger,
    metrics: saga_core::Metrics,
    payloads: saga_core::Payloads,
    work: std::time::Duration,
) -> Worker {
    let builder = match ledger {
        Ledger::Pg { inbox, .. } => Worker::builder(service, inbox.clone()),
        Ledger::PgAtLeastOnce { .. } | Ledger::Memory(_) => Worker::at_least_once(service),
    };
    E::COMMANDS
        .iter()
        .filter(|c| c.service == service)
        .fold(builder.metrics(metrics).payloads(payloads), |w, spec| {
            w.handler(
                spec.command,
                EffectHandler {
                    spec: *spec,
                    ledger: ledger.clone(),
                    work,
                },
            )
        })
        .build()
}

/// The examples' real handlers on the test kit (in memory, a virtual clock).
#[cfg(test)]
mod tests {
    use saga_core::SagaStatus;
    use saga_core::testing::TestEnv;

    use super::*;
    use crate::order::OrderSaga;

    #[test]
    fn the_order_saga_runs_on_the_test_kit_with_its_real_handlers() {
        let effects = Arc::new(Mutex::new(Vec::new()));
        let ledger = Ledger::Memory(Arc::clone(&effects));
        let saga = OrderSaga::definition();
        let mut env = TestEnv::new();
        env.register(&saga);
        for service in ["inventory", "payment", "shipping"] {
            env.worker(&worker::<OrderSaga>(service, &ledger));
        }
        let shipped = env.start(&saga, &OrderSaga::input(1, false));
        let refused = env.start(&saga, &OrderSaga::input(2, true));
        assert_eq!(env.status(shipped), SagaStatus::Completed);
        assert_eq!(env.status(refused), SagaStatus::Compensated);
        let done = |id: Uuid| -> Vec<&str> {
            effects
                .lock()
                .unwrap()
                .iter()
                .filter(|(saga, _, _)| *saga == id)
                .map(|(_, _, action)| *action)
                .collect()
        };
        assert_eq!(done(shipped), ["reserve", "charge", "ship"]);
        assert_eq!(done(refused), ["reserve", "charge", "refund", "release"]);
        let reason = SagaStatus::reason(env.state(refused)).unwrap_or_default();
        assert!(reason.contains("ship refused: undeliverable"), "{reason}");
    }
}
