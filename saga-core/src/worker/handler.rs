//! Typed step handlers, and their type-erased form in the worker's registry.

use std::future::Future;
use std::marker::PhantomData;
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

/// What a handler knows about the command it runs.
#[derive(Debug, Clone, PartialEq)]
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
}

impl CommandContext {
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
                StepError::terminal(format!("invalid input for command `{}`: {e}", ctx.command))
            })?;
            let output = self.0.handle(input, ctx).await?;
            serde_json::to_value(output)
                .map_err(|e| StepError::terminal(format!("output does not serialize: {e}")))
        }
        .boxed()
    }
}
