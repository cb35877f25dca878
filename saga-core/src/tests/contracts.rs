//! Sagas declared with contracts: the compensation reads its action's output as the
//! contract's type, and `output_of` refuses a step that runs another command.

use saga_core::testing::TestEnv;
use saga_core::{SagaDefinition, SagaStatus, StepError, contract, service};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
}

service!(Payment = "payment");
service!(Shipping = "shipping");
contract!(Charge: Payment, "charge", u64 => Receipt);
contract!(Refund: Payment, "refund", String => ());
contract!(Ship: Shipping, "ship", String => ());

/// charge (refund: the receipt's id) -> ship the receipt (pivot).
fn saga(
    ship_reads: fn(&saga_core::StepContext<'_, u64>) -> Result<String, saga_core::InputError>,
) -> SagaDefinition<u64> {
    SagaDefinition::<u64>::builder("order", 1)
        .step("charge", |s| {
            s.call::<Charge>(|ctx| *ctx.input())
                .compensate::<Refund>(|_, receipt| receipt.charge_id)
        })
        .step("ship", move |s| s.try_call::<Ship>(ship_reads).pivot())
        .build()
        .unwrap()
}

#[test]
fn the_compensation_gets_the_actions_output_as_its_type() {
    let saga = saga(|ctx| Ok(ctx.output_of::<Charge>("charge")?.charge_id));
    let mut env = TestEnv::new();
    let refunded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = refunded.clone();
    env.register(&saga)
        .serve::<Charge>(|amount| {
            Ok(Receipt {
                charge_id: format!("ch-{amount}"),
            })
        })
        .serve::<Refund>(move |charge_id| {
            seen.lock().unwrap().push(charge_id);
            Ok(())
        })
        .serve::<Ship>(|charge_id| {
            assert_eq!(charge_id, "ch-42", "ship reads the charge's receipt");
            Err(StepError::terminal("no courier"))
        });
    let id = env.start(&saga, &42);
    assert_eq!(env.status(id), SagaStatus::Compensated);
    assert_eq!(*refunded.lock().unwrap(), ["ch-42"]);
    assert_eq!(
        env.commands(id),
        ["payment.charge", "shipping.ship", "payment.refund"]
    );
}

contract!(Other: Shipping, "quote", u64 => Receipt);

#[test]
fn reading_a_step_as_another_contract_fails_naming_both() {
    let saga = saga(|ctx| Ok(ctx.output_of::<Other>("charge")?.charge_id));
    let mut env = TestEnv::new();
    env.register(&saga)
        .serve::<Charge>(|amount| {
            Ok(Receipt {
                charge_id: format!("ch-{amount}"),
            })
        })
        .serve::<Refund>(|_| Ok(()))
        .serve::<Ship>(|_| Ok(()));
    let id = env.start(&saga, &42);
    assert_eq!(env.status(id), SagaStatus::Compensated);
    let reason = env
        .state(id)
        .failure
        .as_ref()
        .map(|(_, r)| r.clone())
        .unwrap();
    assert!(
        reason.contains("step `charge` runs payment.charge, not shipping.quote")
            && reason.contains("Other"),
        "{reason}"
    );
}

/// A worker without an inbox runs on the kit as in production: a redelivery runs its handler
/// again, and a closure registered for a command it does not handle still serves it.
#[test]
fn an_at_least_once_worker_runs_a_redelivery_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let payment = saga_core::Worker::at_least_once_for::<Payment>()
        .serve::<Charge>(saga_core::worker::handler_fn(move |amount: u64, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, StepError>(Receipt {
                    charge_id: format!("ch-{amount}"),
                })
            }
        }))
        .build();
    let saga = saga(|ctx| Ok(ctx.output_of::<Charge>("charge")?.charge_id));
    let mut env = TestEnv::new();
    env.register(&saga)
        .serve::<Refund>(|_| Ok(()))
        .worker(&payment)
        .serve::<Ship>(|_| Ok(()))
        .inject("payment", "charge", saga_core::testing::Fault::LoseResult);
    let id = env.start(&saga, &42);
    assert_eq!(env.status(id), SagaStatus::Running, "the answer was lost");
    env.advance(std::time::Duration::from_secs(120));
    assert_eq!(env.status(id), SagaStatus::Completed);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "at least once: it ran again"
    );
}
