//! Typed step handlers, and their type-erased form in the worker's registry.

use std::future::Future;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use super::StepError;
use crate::event::Direction;
use crate::message::Command;

/// What a handler knows about the command it runs, and the transaction it runs in.
#[derive(Debug, Clone)]
pub struct CommandContext {
    /// The saga instance.
    pub saga_id: Uuid,
    /// The saga definition's name.
    pub saga: String,
    /// The step's name.
    pub step: String,
    /// The step's position in its saga.
    pub step_index: u32,
    /// Action or compensation.
    pub direction: Direction,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The command's id.
    pub command_id: Uuid,
    /// The command's name.
    pub command: String,
    /// The same for every delivery and retry of this step in this direction; the inbox keys
    /// the recorded result by it.
    pub idempotency_key: String,
    /// The W3C trace id the command carried (the saga's trace), if any.
    pub trace_id: Option<String>,
    /// The type the saga built the input as, if it said.
    pub(crate) input_type: Option<String>,
    pub(crate) tx: Option<TxSlot>,
}

/// A command's transaction, shared between the worker and the handler it runs.
#[derive(Clone)]
pub(crate) struct TxSlot(
    Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>>,
);

impl std::fmt::Debug for TxSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TxSlot")
    }
}

impl TxSlot {
    pub(crate) fn new(tx: sqlx::Transaction<'static, sqlx::Postgres>) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(Some(tx))))
    }

    /// Takes the transaction back once the handler is done (`None` if a task the handler
    /// left behind still holds it a second later).
    pub(crate) async fn take(&self) -> Option<sqlx::Transaction<'static, sqlx::Postgres>> {
        let guard = tokio::time::timeout(std::time::Duration::from_secs(1), self.0.lock());
        guard.await.ok()?.take()
    }
}

/// The participant's database connection, inside the command's transaction; see
/// [`CommandContext::transaction`]. Use it as `&mut *tx` wherever sqlx takes an executor.
pub struct Tx<'a> {
    guard: tokio::sync::MutexGuard<'a, Option<sqlx::Transaction<'static, sqlx::Postgres>>>,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

impl Deref for Tx<'_> {
    type Target = sqlx::PgConnection;

    fn deref(&self) -> &sqlx::PgConnection {
        self.guard
            .as_ref()
            .expect("checked when the guard was made")
    }
}

impl DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        self.guard
            .as_mut()
            .expect("checked when the guard was made")
    }
}

impl CommandContext {
    /// The transaction this command runs in, on the worker's [`Inbox`](crate::Inbox) pool:
    /// what the handler writes through it commits together with the command's recorded
    /// outcome, exactly once, or not at all (a retryable error, a panic or a timeout rolls it
    /// back; a terminal error rolls the writes back and records the failure).
    ///
    /// Fails (terminally) in a worker without an inbox, and once the handler has returned.
    ///
    /// ```no_run
    /// # async fn charge(ctx: saga_core::CommandContext, amount: i64) -> Result<String, saga_core::StepError> {
    /// let mut tx = ctx.transaction().await?;
    /// sqlx::query("INSERT INTO charges (amount) VALUES ($1)")
    ///     .bind(amount)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// # Ok(String::new()) }
    /// ```
    pub async fn transaction(&self) -> Result<Tx<'_>, StepError> {
        let Some(slot) = &self.tx else {
            return Err(StepError::terminal(
                "this worker runs without an inbox (Worker::at_least_once): commands have no transaction",
            ));
        };
        let guard = slot.0.lock().await;
        if guard.is_none() {
            return Err(StepError::terminal(
                "the command's transaction has ended: its handler returned",
            ));
        }
        Ok(Tx { guard })
    }

    pub(crate) fn of(command: &Command) -> Self {
        Self {
            saga_id: command.saga_id,
            saga: command.saga.clone(),
            step: command.step_name.clone(),
            step_index: command.step,
            direction: command.direction,
            attempt: command.attempt,
            command_id: command.command_id,
            command: command.command.clone(),
            idempotency_key: command.idempotency_key.clone(),
            trace_id: None,
            input_type: command.input_type.clone(),
            tx: None,
        }
    }
}

/// Runs one command type: takes the step input, returns its output or a [`StepError`].
///
/// Implement it on a struct that holds the handler's dependencies (a pool, a client).
///
/// ```
/// use saga_core::worker::{CommandContext, Handler, StepError};
///
/// struct Reserve;
///
/// impl Handler for Reserve {
///     type Input = u32;
///     type Output = String;
///
///     async fn handle(&self, qty: u32, _ctx: CommandContext) -> Result<String, StepError> {
///         if qty == 0 {
///             return Err(StepError::terminal("nothing to reserve"));
///         }
///         Ok(format!("reserved {qty}"))
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The command's input.
    type Input: DeserializeOwned + Send + 'static;
    /// The step's output.
    type Output: Serialize + Send + 'static;

    /// Handles one delivery of the command.
    fn handle(
        &self,
        input: Self::Input,
        ctx: CommandContext,
    ) -> impl Future<Output = Result<Self::Output, StepError>> + Send;
}

/// A handler made of an async closure; see [`handler_fn`].
pub struct FnHandler<F, In, Out> {
    f: F,
    _types: PhantomData<fn(In) -> Out>,
}

/// Makes a [`Handler`] of a closure taking the input and the context.
///
/// ```
/// use saga_core::worker::{handler_fn, CommandContext, StepError};
///
/// let refund = handler_fn(|amount: u64, _ctx: CommandContext| async move {
///     Ok::<_, StepError>(amount)
/// });
/// # let _ = refund;
/// ```
pub fn handler_fn<F, Fut, In, Out>(f: F) -> FnHandler<F, In, Out>
where
    F: Fn(In, CommandContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, StepError>> + Send + 'static,
    In: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
{
    FnHandler {
        f,
        _types: PhantomData,
    }
}

impl<F, Fut, In, Out> Handler for FnHandler<F, In, Out>
where
    F: Fn(In, CommandContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, StepError>> + Send + 'static,
    In: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
{
    type Input = In;
    type Output = Out;

    fn handle(
        &self,
        input: In,
        ctx: CommandContext,
    ) -> impl Future<Output = Result<Out, StepError>> + Send {
        (self.f)(input, ctx)
    }
}

/// A handler with its types erased: JSON in, JSON out.
pub(crate) trait ErasedHandler: Send + Sync {
    fn call(
        self: Arc<Self>,
        payload: Value,
        ctx: CommandContext,
    ) -> BoxFuture<'static, Result<Value, StepError>>;
}

pub(crate) struct Erased<H>(pub(crate) H);

impl<H: Handler> ErasedHandler for Erased<H> {
    fn call(
        self: Arc<Self>,
        payload: Value,
        ctx: CommandContext,
    ) -> BoxFuture<'static, Result<Value, StepError>> {
        async move {
            let input: H::Input = serde_json::from_value(payload).map_err(|e| {
                let e = crate::codec::without_values(&e);
                // The saga definition builds this command's input as another type than the
                // handler reads: a bug to fix, not a business failure.
                let sent = match &ctx.input_type {
                    Some(sent) => format!("; the saga built it as a `{sent}`"),
                    None => String::new(),
                };
                let why = format!(
                    "the input of command `{}` is not a `{}` (what its handler reads){sent}: {e}",
                    ctx.command,
                    std::any::type_name::<H::Input>()
                );
                tracing::error!(
                    saga = %ctx.saga,
                    step = %ctx.step,
                    saga.id = %ctx.saga_id,
                    "{why}; the saga definition and the handler disagree"
                );
                StepError::terminal(why)
            })?;
            let command = ctx.command.clone();
            let output = self.0.handle(input, ctx).await?;
            serde_json::to_value(output).map_err(|e| {
                let why = format!(
                    "the output of command `{command}` (a `{}`) does not serialize: {e}",
                    std::any::type_name::<H::Output>()
                );
                tracing::error!("{why}");
                StepError::terminal(why)
            })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::Direction;

    fn command() -> Command {
        Command {
            command_id: Uuid::nil(),
            saga_id: Uuid::nil(),
            saga: "order".into(),
            step: 1,
            step_name: "charge".into(),
            direction: Direction::Compensation,
            attempt: 1,
            service: "payment".into(),
            command: "refund".into(),
            idempotency_key: "k".into(),
            timeout_ms: None,
            input_type: None,
            payload: json!("ch-1"),
        }
    }

    #[derive(Debug, serde::Deserialize)]
    struct Receipt {
        #[allow(dead_code)]
        charge_id: String,
    }

    #[tokio::test]
    async fn an_input_of_another_type_fails_for_good_naming_both_types() {
        let refund = handler_fn(|_: Receipt, _| async { Ok::<_, StepError>(()) });
        let handler: Arc<dyn ErasedHandler> = Arc::new(Erased(refund));
        let command = Command {
            input_type: Some("alloc::string::String".into()),
            ..command()
        };
        let err = handler
            .call(command.payload.clone(), CommandContext::of(&command))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        let message = err.message();
        assert!(
            message.contains("the input of command `refund` is not a `")
                && message.contains("Receipt` (what its handler reads); the saga built it as a `alloc::string::String`: "),
            "{message}"
        );
    }
}
