//! A three-step order saga for the tests, with participants that record effects in their
//! inbox's transactions and fail on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use saga_core::worker::{CommandContext, Handler, StepError, Worker};
use saga_core::{Inbox, Payloads, RetryPolicy, SagaDefinition};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// The saga input, with failures to inject.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Order {
    /// The order number.
    pub id: u32,
    /// The shipment fails terminally.
    pub fail_ship: bool,
    /// The charge fails (retryably) on its first `flaky_charge` attempts.
    pub flaky_charge: u32,
    /// The reservation handler panics on its first attempt.
    pub panic_reserve: bool,
    /// Free text (personal data, say); the handlers' outputs end with it when it is set.
    #[serde(default)]
    pub note: String,
}

/// The retry policy of every step: 3 attempts, 50-200 ms backoff.
pub fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        multiplier: 2.0,
        jitter: 0.5,
        max_elapsed: None,
    }
}

/// reserve (release) -> charge (refund) -> ship (pivot).
pub fn definition() -> SagaDefinition<Order> {
    definition_timed(None)
}

/// [`definition`], with `timed` as every step's timeout and the saga's deadline.
pub fn definition_timed(timed: Option<Duration>) -> SagaDefinition<Order> {
    let mut builder = SagaDefinition::<Order>::builder("order", 1);
    if let Some(t) = timed {
        builder = builder.deadline(t);
    }
    steps(builder, timed)
}

/// [`definition`], with `timeout` as every step's timeout (and no deadline).
pub fn definition_with_timeout(timeout: Duration) -> SagaDefinition<Order> {
    steps(SagaDefinition::<Order>::builder("order", 1), Some(timeout))
}

fn steps(builder: saga_core::SagaBuilder<Order>, timed: Option<Duration>) -> SagaDefinition<Order> {
    let timeout = |s: saga_core::StepBuilder<Order>| match timed {
        Some(t) => s.timeout(t),
        None => s,
    };
    builder
        .step("reserve", |s| {
            timeout(s)
                .action("inventory", "reserve", |ctx| Ok(ctx.input().clone()))
                .compensation("inventory", "release", |ctx| Ok(ctx.input().clone()))
                .retry(retry())
        })
        .step("charge", |s| {
            timeout(s)
                .action("payment", "charge", |ctx| Ok(ctx.input().clone()))
                .compensation("payment", "refund", |ctx| Ok(ctx.input().clone()))
                .retry(retry())
        })
        .step("ship", |s| {
            timeout(s)
                .pivot()
                .action("shipping", "ship", |ctx| Ok(ctx.input().clone()))
                .retry(retry())
        })
        .build()
        .expect("valid definition")
}

/// Applies one effect: appends `(saga, service, action)` to the `effects` table in the
/// command's transaction, so a redelivered command changes nothing.
#[derive(Clone)]
pub struct Effect {
    insert: String,
    action: &'static str,
    service: &'static str,
    /// How many times the handler ran (deliveries, not effects).
    pub runs: Arc<AtomicU32>,
}

impl Effect {
    async fn apply(&self, order: &Order, ctx: &CommandContext) -> Result<String, StepError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.action == "charge" && ctx.attempt <= order.flaky_charge {
            return Err(StepError::retryable("payment gateway unavailable"));
        }
        if self.action == "reserve" && order.panic_reserve && ctx.attempt == 1 {
            panic!("inventory handler bug");
        }
        if self.action == "ship" && order.fail_ship {
            return Err(StepError::terminal("address undeliverable"));
        }
        let mut tx = ctx.transaction().await?;
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(ctx.saga_id)
            .bind(self.service)
            .bind(self.action)
            .execute(&mut *tx)
            .await?;
        if order.note.is_empty() {
            Ok(format!("{}:{}", self.action, ctx.saga_id))
        } else {
            Ok(format!("{}:{}:{}", self.action, ctx.saga_id, order.note))
        }
    }
}

impl Handler for Effect {
    type Input = Order;
    type Output = String;

    async fn handle(&self, order: Order, ctx: CommandContext) -> Result<String, StepError> {
        self.apply(&order, &ctx).await
    }
}

/// The three participants' workers, sharing one inbox and one `effects` table in `schema`
/// (the inbox's pool is `pool`: size it for the workers' concurrency).
pub struct Participants {
    /// inventory, payment and shipping.
    pub workers: Vec<Worker>,
    /// Handler runs per action, in the order reserve, release, charge, refund, ship.
    pub runs: Vec<(&'static str, Arc<AtomicU32>)>,
}

/// Creates the `effects` table and the inbox in `schema`, and builds the workers.
pub async fn participants(pool: &PgPool, schema: &str) -> Participants {
    participants_serving(pool, schema, "payment").await
}

/// Like [`participants`], with the payment worker serving the queue of `payment` (a misspelt
/// name, say).
pub async fn participants_serving(pool: &PgPool, schema: &str, payment: &str) -> Participants {
    participants_with(pool, schema, payment, Payloads::plain()).await
}

/// Like [`participants_serving`], the workers' payloads encoded by `payloads`.
pub async fn participants_with(
    pool: &PgPool,
    schema: &str,
    payment: &str,
    payloads: Payloads,
) -> Participants {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS \"{schema}\".effects (id bigserial PRIMARY KEY, saga_id uuid NOT NULL, \
         service text NOT NULL, action text NOT NULL)"
    )))
    .execute(pool)
    .await
    .expect("create effects table");
    let inbox = Inbox::new(pool.clone(), schema).expect("inbox");
    inbox.migrate().await.expect("inbox migrates");
    let effect = |service: &'static str, action: &'static str| Effect {
        insert: format!(
            "INSERT INTO \"{schema}\".effects (saga_id, service, action) VALUES ($1, $2, $3)"
        ),
        action,
        service,
        runs: Arc::new(AtomicU32::new(0)),
    };
    let [reserve, release, charge, refund, ship] = [
        effect("inventory", "reserve"),
        effect("inventory", "release"),
        effect("payment", "charge"),
        effect("payment", "refund"),
        effect("shipping", "ship"),
    ];
    let runs = [&reserve, &release, &charge, &refund, &ship]
        .iter()
        .map(|e| (e.action, Arc::clone(&e.runs)))
        .collect();
    let workers = vec![
        Worker::builder("inventory", inbox.clone())
            .handler("reserve", reserve)
            .handler("release", release)
            .payloads(payloads.clone())
            .build(),
        Worker::builder(payment, inbox.clone())
            .handler("charge", charge)
            .handler("refund", refund)
            .payloads(payloads.clone())
            .build(),
        Worker::builder("shipping", inbox.clone())
            .handler("ship", ship)
            .payloads(payloads)
            .build(),
    ];
    Participants { workers, runs }
}

/// The effects of one saga, in the order they were applied.
pub async fn effects(pool: &PgPool, schema: &str, saga_id: Uuid) -> Vec<String> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT action FROM \"{schema}\".effects WHERE saga_id = $1 ORDER BY id"
    )))
    .bind(saga_id)
    .fetch_all(pool)
    .await
    .expect("read effects")
}
