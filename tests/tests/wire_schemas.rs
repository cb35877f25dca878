//! The messages the Rust code puts on the wire validate against the JSON Schemas of
//! docs/PROTOCOL.md, which another language's participant is written from; and the schemas
//! refuse what the code would refuse.

use saga_core::message::headers;
use saga_core::{Command, Direction, Outcome, Reply};
use serde_json::{Value, json};
use uuid::Uuid;

fn validator(name: &str) -> jsonschema::Validator {
    let path = format!("{}/../docs/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{path} is not a valid schema: {e}"))
}

fn assert_valid(validator: &jsonschema::Validator, body: &[u8]) {
    let instance: Value = serde_json::from_slice(body).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{instance}: {errors:?}");
}

fn commands() -> Vec<Command> {
    let saga_id = Uuid::now_v7();
    [
        Direction::Forward,
        Direction::Compensation,
        Direction::Fence,
    ]
    .into_iter()
    .map(|direction| Command {
        command_id: Uuid::now_v7(),
        saga_id,
        saga: "order".into(),
        step: 1,
        step_name: "charge".into(),
        direction,
        attempt: 2,
        service: "payment".into(),
        command: "charge".into(),
        idempotency_key: Command::idempotency_key_for(saga_id, 1, direction),
        timeout_ms: (direction != Direction::Compensation).then_some(30_000),
        input_type: (direction != Direction::Fence).then(|| "shop::Charge".into()),
        payload: if direction == Direction::Fence {
            Value::Null
        } else {
            json!({"amount_cents": 1200, "card": {"$sealed": {"key": "k1", "data": "AAAA"}}})
        },
    })
    .collect()
}

#[test]
fn commands_and_results_the_code_sends_validate() {
    let (command_schema, result_schema) = (
        validator("command.schema.json"),
        validator("result.schema.json"),
    );
    let outcomes = [
        Outcome::Success {
            output: json!({"charge_id": "ch-7"}),
        },
        Outcome::Success {
            output: Value::Null,
        },
        Outcome::Failure {
            error: "card declined".into(),
            retryable: false,
        },
        Outcome::Failure {
            error: "gateway busy".into(),
            retryable: true,
        },
        Outcome::Fenced {
            detail: "a tombstone now stops every later delivery".into(),
        },
        Outcome::Unfenceable {
            detail: "no inbox".into(),
        },
    ];
    for command in commands() {
        let envelope = command.to_envelope();
        assert_valid(&command_schema, &envelope.message.body);
        // The headers PROTOCOL.md lists.
        for header in [
            headers::MESSAGE_ID,
            headers::SAGA_ID,
            headers::STEP,
            headers::DIRECTION,
            headers::ATTEMPT,
            headers::COMMAND_ID,
            headers::SCHEMA_VERSION,
            headers::TRACEPARENT,
            headers::COMMAND,
            headers::IDEMPOTENCY_KEY,
        ] {
            assert!(envelope.message.headers.contains_key(header), "{header}");
        }
        assert_eq!(envelope.message.headers[headers::SCHEMA_VERSION], "2");
        for outcome in &outcomes {
            let reply = Reply::to(&command, outcome.clone());
            assert_valid(&result_schema, &reply.to_envelope().message.body);
        }
    }
}

#[test]
fn the_schemas_refuse_what_the_code_refuses() {
    let (command_schema, result_schema) = (
        validator("command.schema.json"),
        validator("result.schema.json"),
    );
    let command = commands().remove(0);
    let reply = Reply::to(
        &command,
        Outcome::Failure {
            error: "no".into(),
            retryable: false,
        },
    );
    let good_command = serde_json::to_value(&command).unwrap();
    let good_result = serde_json::to_value(&reply).unwrap();
    let broken = |good: &Value, path: &[&str], value: Option<Value>| {
        let mut v = good.clone();
        let (last, parents) = path.split_last().unwrap();
        let mut at = &mut v;
        for p in parents {
            at = &mut at[*p];
        }
        match value {
            Some(value) => at[*last] = value,
            None => {
                at.as_object_mut().unwrap().remove(*last);
            }
        }
        v
    };
    for bad in [
        broken(&good_command, &["command_id"], None),
        broken(&good_command, &["direction"], Some(json!("sideways"))),
        broken(&good_command, &["saga_id"], Some(json!("not-a-uuid"))),
    ] {
        assert!(!command_schema.is_valid(&bad), "{bad}");
        // ... and the code refuses it too.
        assert!(
            serde_json::from_value::<Command>(bad.clone()).is_err(),
            "{bad}"
        );
    }
    // Attempts count from 1: the schema says so (the code never sends 0).
    assert!(!command_schema.is_valid(&broken(&good_command, &["attempt"], Some(json!(0)))));
    for bad in [
        broken(&good_result, &["command_id"], None),
        broken(&good_result, &["outcome", "status"], Some(json!("maybe"))),
        broken(&good_result, &["outcome", "retryable"], None),
        broken(
            &good_result,
            &["outcome"],
            Some(json!({"status": "success"})),
        ),
    ] {
        assert!(!result_schema.is_valid(&bad), "{bad}");
        assert!(
            serde_json::from_value::<Reply>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}
