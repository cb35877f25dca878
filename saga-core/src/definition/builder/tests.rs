//! The builder's checks, each naming what is wrong.

use super::*;
use serde_json::Value;

fn noop(ctx: &StepContext<'_, Value>) -> Result<Value, InputError> {
    Ok(ctx.input().clone())
}

fn err(builder: SagaBuilder<Value>) -> String {
    builder.build().unwrap_err().to_string()
}

#[test]
fn empty_saga_is_rejected() {
    assert_eq!(
        err(SagaDefinition::builder("order", 1)),
        "saga `order` has no steps"
    );
}

#[test]
fn duplicate_step_is_named() {
    let b = SagaDefinition::builder("order", 1)
        .step("reserve", |s| s.action("inv", "reserve", noop))
        .step("reserve", |s| s.action("inv", "reserve", noop));
    assert_eq!(err(b), "saga `order`: step `reserve` is defined twice");
}

#[test]
fn missing_action_is_named() {
    let b = SagaDefinition::builder("order", 1).step("charge", |s| s);
    assert_eq!(err(b), "saga `order`: step `charge` has no action");
}

#[test]
fn compensation_after_pivot_is_named() {
    let b = SagaDefinition::builder("order", 1)
        .step("ship", |s| s.pivot().action("ship", "ship", noop))
        .step("notify", |s| {
            s.retriable()
                .action("mail", "send", noop)
                .compensation("mail", "unsend", noop)
        });
    assert_eq!(
        err(b),
        "saga `order`: step `notify` comes after the pivot `ship` and cannot have a compensation"
    );
}

#[test]
fn retriable_before_pivot_is_named() {
    let b = SagaDefinition::builder("order", 1)
        .step("notify", |s| s.retriable().action("mail", "send", noop));
    assert_eq!(
        err(b),
        "saga `order`: retriable step `notify` must come after a pivot step"
    );
}

#[test]
fn plain_step_after_pivot_is_named() {
    let b = SagaDefinition::builder("order", 1)
        .step("ship", |s| s.pivot().action("ship", "ship", noop))
        .step("bill", |s| s.action("pay", "bill", noop));
    assert_eq!(
        err(b),
        "saga `order`: step `bill` comes after the pivot `ship` and must be retriable"
    );
}

#[test]
fn second_pivot_and_compensated_pivot_are_named() {
    let b = SagaDefinition::builder("order", 1)
        .step("a", |s| s.pivot().action("x", "a", noop))
        .step("b", |s| s.pivot().action("x", "b", noop));
    assert_eq!(
        err(b),
        "saga `order`: step `b` is a second pivot (the pivot is `a`)"
    );
    let b = SagaDefinition::builder("order", 1).step("a", |s| {
        s.pivot()
            .action("x", "a", noop)
            .compensation("x", "undo", noop)
    });
    assert_eq!(
        err(b),
        "saga `order`: pivot step `a` cannot have a compensation"
    );
}

#[test]
fn bad_retry_and_timeout_are_named() {
    let b = SagaDefinition::builder("order", 1).step("a", |s| {
        s.action("x", "a", noop).retry(RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        })
    });
    assert_eq!(
        err(b),
        "saga `order`: step `a` has an invalid retry policy: max_attempts must be at least 1"
    );
    let b = SagaDefinition::builder("order", 1)
        .step("a", |s| s.action("x", "a", noop).timeout(Duration::ZERO));
    assert_eq!(err(b), "saga `order`: step `a` has a zero timeout");
    let b = SagaDefinition::builder("order", 1).step("a", |s| s.action("", "a", noop));
    assert_eq!(err(b), "saga `order`: step `a` has an empty service");
}

#[test]
fn valid_definition_lists_services() {
    let saga = SagaDefinition::builder("order", 2)
        .step("reserve", |s| {
            s.action("inventory", "reserve", noop)
                .compensation("inventory", "release", noop)
        })
        .step("charge", |s| s.action("payment", "charge", noop))
        .step("ship", |s| s.pivot().action("shipping", "ship", noop))
        .step("notify", |s| s.retriable().action("mail", "send", noop))
        .build()
        .unwrap();
    assert_eq!(saga.version(), 2);
    assert_eq!(
        saga.definition().services(),
        vec!["inventory", "mail", "payment", "shipping"]
    );
}
