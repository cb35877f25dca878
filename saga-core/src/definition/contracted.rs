//! Steps declared by contract: [`StepBuilder::call`] and the [`ContractStep`] it returns.

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{InputError, RetryPolicy, StepBuilder, StepContext};
use crate::contract::{Contract, Service};

impl<I> StepBuilder<I>
where
    I: Serialize + DeserializeOwned + 'static,
{
    /// The forward command of contract `C` (its service and command), its input built by
    /// `input` as the contract's input type. The step's output is `C::Output`, which
    /// [`ContractStep::compensate`] and [`StepContext::output_of`] read as that type.
    /// [`try_call`](Self::try_call) takes a builder that can fail.
    pub fn call<C: Contract>(
        self,
        input: impl Fn(&StepContext<'_, I>) -> C::Input + Send + Sync + 'static,
    ) -> ContractStep<I, C> {
        self.try_call::<C>(move |ctx| Ok(input(ctx)))
    }

    /// Like [`call`](Self::call), with an input builder that can fail (one that reads an
    /// earlier step's output with `?`, say): its error parks the saga as `stuck`, naming the
    /// step.
    pub fn try_call<C: Contract>(
        self,
        input: impl Fn(&StepContext<'_, I>) -> Result<C::Input, InputError> + Send + Sync + 'static,
    ) -> ContractStep<I, C> {
        ContractStep {
            step: self.action(<C::Service as Service>::NAME, C::COMMAND, input),
            _contract: PhantomData,
        }
    }
}

/// A step whose action is the contract `C`; see [`StepBuilder::call`]. Its compensation is
/// [`compensate`](Self::compensate) (by contract) or [`compensate_with`](Self::compensate_with)
/// (by name); the other settings are [`StepBuilder`]'s. `.into()` gives the `StepBuilder`.
pub struct ContractStep<I, C> {
    step: StepBuilder<I>,
    _contract: PhantomData<fn() -> C>,
}

impl<I, C> ContractStep<I, C>
where
    I: Serialize + DeserializeOwned + 'static,
    C: Contract,
{
    /// The compensation: contract `K`, its input built from the saga's context and this
    /// step's own output, read as `C::Output`. When that output is not known (an
    /// at-least-once service's step whose outcome could not be fenced counts as applied
    /// without one), the closure gets what `null` reads as: `()` for a unit output, `None` for
    /// an `Option`; for any other type the input cannot be built and the saga parks as
    /// `stuck`, naming the step. Declare the output as an `Option` to handle that case.
    /// [`try_compensate`](Self::try_compensate) takes a builder that can fail.
    pub fn compensate<K: Contract>(
        self,
        input: impl Fn(&StepContext<'_, I>, C::Output) -> K::Input + Send + Sync + 'static,
    ) -> Self {
        self.try_compensate::<K>(move |ctx, output| Ok(input(ctx, output)))
    }

    /// Like [`compensate`](Self::compensate), with an input builder that can fail.
    pub fn try_compensate<K: Contract>(
        self,
        input: impl Fn(&StepContext<'_, I>, C::Output) -> Result<K::Input, InputError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let (service, command) = (<K::Service as Service>::NAME, K::COMMAND);
        self.compensate_with(service, command, input)
    }

    /// The compensation as `command` of `service`, named by strings (a service without a
    /// contract, as in another language), its input built as
    /// [`try_compensate`](Self::try_compensate) builds it, from this step's output read as
    /// `C::Output`.
    pub fn compensate_with<T: Serialize>(
        mut self,
        service: &str,
        command: &str,
        input: impl Fn(&StepContext<'_, I>, C::Output) -> Result<T, InputError> + Send + Sync + 'static,
    ) -> Self {
        let name = self.step.name.clone();
        self.step = self
            .step
            .compensation(service, command, move |ctx: &StepContext<'_, I>| {
                input(ctx, own_output::<I, C>(ctx, &name)?)
            });
        self
    }

    /// Runs this step only when `condition` holds ([`StepBuilder::when`]).
    pub fn when(
        self,
        condition: impl Fn(&StepContext<'_, I>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.map(|s| s.when(condition))
    }

    /// Marks this step as the pivot ([`StepBuilder::pivot`]).
    pub fn pivot(self) -> Self {
        self.map(StepBuilder::pivot)
    }

    /// Marks this step as retriable ([`StepBuilder::retriable`]).
    pub fn retriable(self) -> Self {
        self.map(StepBuilder::retriable)
    }

    /// How the action is retried ([`StepBuilder::retry`]).
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.map(|s| s.retry(policy))
    }

    /// How the compensation is retried ([`StepBuilder::compensation_retry`]).
    pub fn compensation_retry(self, policy: RetryPolicy) -> Self {
        self.map(|s| s.compensation_retry(policy))
    }

    /// How a fence of the action is retried ([`StepBuilder::fence_retry`]).
    pub fn fence_retry(self, policy: RetryPolicy) -> Self {
        self.map(|s| s.fence_retry(policy))
    }

    /// How long one attempt may take ([`StepBuilder::timeout`]).
    pub fn timeout(self, timeout: Duration) -> Self {
        self.map(|s| s.timeout(timeout))
    }

    fn map(mut self, f: impl FnOnce(StepBuilder<I>) -> StepBuilder<I>) -> Self {
        self.step = f(self.step);
        self
    }
}

/// The output of `step`, whose action is `C`; what `null` reads as when it is not known.
fn own_output<I, C: Contract>(
    ctx: &StepContext<'_, I>,
    step: &str,
) -> Result<C::Output, InputError> {
    if let Some(output) = ctx.try_output::<C::Output>(step)? {
        return Ok(output);
    }
    serde_json::from_value(serde_json::Value::Null).map_err(|_| {
        InputError::new(format!(
            "step `{step}` has no output (its outcome was not known), and its compensation reads \
             a `{}`: declare the output as an Option to compensate such a step",
            std::any::type_name::<C::Output>()
        ))
    })
}

impl<I, C> From<ContractStep<I, C>> for StepBuilder<I> {
    fn from(step: ContractStep<I, C>) -> Self {
        step.step
    }
}

impl<I> StepContext<'_, I> {
    /// The output of step `step`, whose action is the contract `C`, as `C::Output`. Fails
    /// (naming both) if that step runs another command, or has no output.
    pub fn output_of<C: Contract>(&self, step: &str) -> Result<C::Output, InputError> {
        let (service, command) = (<C::Service as Service>::NAME, C::COMMAND);
        if let Some(action) = self
            .raw
            .definition
            .steps()
            .iter()
            .find(|s| s.name == step)
            .and_then(|s| s.action())
            && (action.service != service || action.command != command)
        {
            return Err(InputError::new(format!(
                "step `{step}` runs {}.{}, not {service}.{command} (contract `{}`)",
                action.service,
                action.command,
                std::any::type_name::<C>()
            )));
        }
        self.output(step)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::definition::RawContext;
    use crate::{SagaDefinition, contract, service};

    service!(Shop = "shop");
    contract!(Reserve: Shop, "reserve", u64 => ());
    contract!(Charge: Shop, "charge", u64 => String);

    #[test]
    fn an_unknown_output_reads_as_null_where_the_type_allows() {
        let saga = SagaDefinition::<u64>::builder("order", 1)
            .step("reserve", |s| s.call::<Reserve>(|ctx| *ctx.input()))
            .step("charge", |s| s.call::<Charge>(|ctx| *ctx.input()))
            .build()
            .unwrap();
        let outputs: [Option<Value>; 2] = [None, None];
        let raw = RawContext {
            definition: saga.definition(),
            input: &json!(5),
            outputs: &outputs,
        };
        let ctx = StepContext::new(&5u64, &raw);
        // A unit output compensates without one; a `String` cannot be made up.
        own_output::<u64, Reserve>(&ctx, "reserve").unwrap();
        let why = own_output::<u64, Charge>(&ctx, "charge")
            .unwrap_err()
            .to_string();
        assert!(why.contains("declare the output as an Option"), "{why}");
        // A known output is read as it is.
        let known = [Some(Value::Null), Some(json!("ch-5"))];
        let raw = RawContext {
            outputs: &known,
            ..raw
        };
        let ctx = StepContext::new(&5u64, &raw);
        assert_eq!(own_output::<u64, Charge>(&ctx, "charge").unwrap(), "ch-5");
        // ... and `output_of` refuses a step read as another contract.
        let wrong = ctx.output_of::<Reserve>("charge").unwrap_err().to_string();
        assert!(
            wrong.contains("runs shop.charge, not shop.reserve"),
            "{wrong}"
        );
    }
}
