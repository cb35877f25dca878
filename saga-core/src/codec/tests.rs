use serde_json::{Value, json};

use super::sealing::Carries;
use super::{AesGcmCodec, CodecError, Payloads};
use crate::event::{Direction, Event};

const K1: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
const K2: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn payloads(keys: &str) -> Payloads {
    Payloads::new(AesGcmCodec::parse(keys).expect("valid keys"))
}

#[test]
fn a_sealed_value_hides_its_data_and_opens_to_the_same_value() {
    let p = payloads(&format!("k1:{K1}"));
    let value = json!({"name": "Ada Lovelace", "card": "tok_4242", "n": [1, 2.5, null]});
    let sealed = p.seal(value.clone()).unwrap();
    assert_eq!(Payloads::sealed_key(&sealed), Some("k1"));
    let text = sealed.to_string();
    assert!(
        !text.contains("Ada") && !text.contains("tok_4242"),
        "{text}"
    );
    assert_eq!(p.open(sealed).unwrap(), value);
}

#[test]
fn each_seal_draws_a_fresh_nonce() {
    let p = payloads(&format!("k1:{K1}"));
    let a = p.seal(json!("same")).unwrap();
    let b = p.seal(json!("same")).unwrap();
    assert_ne!(a, b);
}

#[test]
fn null_and_plain_values_pass_through_and_a_sealed_shape_is_sealed_again() {
    let p = payloads(&format!("k1:{K1}"));
    assert_eq!(p.seal(Value::Null).unwrap(), Value::Null);
    assert_eq!(Payloads::plain().seal(json!(7)).unwrap(), json!(7));
    assert_eq!(
        p.open(json!({"plain": true})).unwrap(),
        json!({"plain": true})
    );
    // A value of the sealed shape given to `seal` (data, not the codec's) is sealed like any
    // other: opened, it comes back as it was, never opened a second time.
    let sealed = p.seal(json!(7)).unwrap();
    let twice = p.seal(sealed.clone()).unwrap();
    assert_ne!(twice, sealed);
    assert_eq!(p.open(twice).unwrap(), sealed);
    // What the codec sealed itself is not sealed again on its way out.
    assert_eq!(p.seal_once(sealed.clone()).unwrap(), sealed);
    let refused = super::refuse_sealed_shape(&sealed, "the input").unwrap_err();
    assert!(
        refused
            .to_string()
            .starts_with("the input has the shape of a sealed payload"),
        "{refused}"
    );
    assert!(super::refuse_sealed_shape(&json!({"$sealed": 1, "x": 2}), "the input").is_ok());
}

#[test]
fn serde_errors_lose_the_values_they_quote() {
    let e = serde_json::from_value::<u32>(json!("4111 1111 1111 1111")).unwrap_err();
    let shown = super::without_values(&e);
    assert!(!shown.contains("4111"), "{shown}");
    assert!(
        shown.contains("invalid type (value not shown), expected u32"),
        "{shown}"
    );
    #[derive(Debug, serde::Deserialize)]
    enum Card {
        Visa,
    }
    let e = serde_json::from_value::<Card>(json!("4111-secret")).unwrap_err();
    let shown = super::without_values(&e);
    assert!(!shown.contains("4111"), "{shown}");
    assert!(shown.contains("expected `Visa`"), "{shown}");
    let _ = Card::Visa;
    let e = serde_json::from_value::<u8>(json!(4111)).unwrap_err();
    assert!(!super::without_values(&e).contains("4111"));
    let e =
        serde_json::from_value::<std::collections::HashMap<String, u8>>(json!([1])).unwrap_err();
    assert!(super::without_values(&e).contains("expected a map"));
}

#[test]
fn after_rotation_new_writes_use_the_first_key_and_old_payloads_still_open() {
    let old = payloads(&format!("k1:{K1}"));
    let written_before = old.seal(json!({"order": 1})).unwrap();
    let rotated = payloads(&format!("k2:{K2},k1:{K1}"));
    let written_after = rotated.seal(json!({"order": 2})).unwrap();
    assert_eq!(Payloads::sealed_key(&written_after), Some("k2"));
    assert_eq!(rotated.open(written_before).unwrap(), json!({"order": 1}));
    assert_eq!(
        rotated.open(written_after.clone()).unwrap(),
        json!({"order": 2})
    );
    // The old configuration does not hold k2: it says which key it lacks.
    assert_eq!(
        old.open(written_after).unwrap_err(),
        CodecError::UnknownKey { key: "k2".into() }
    );
}

#[test]
fn a_reader_without_the_key_keeps_the_value_sealed_and_shows_a_placeholder() {
    let sealed = payloads(&format!("k2:{K2}")).seal(json!("secret")).unwrap();
    let other = payloads(&format!("k1:{K1}"));
    assert_eq!(other.open_if_possible(sealed.clone()), sealed);
    assert!(matches!(
        Payloads::plain().open(sealed.clone()),
        Err(CodecError::UnknownKey { .. })
    ));
    assert_eq!(
        Payloads::placeholder(&sealed).as_deref(),
        Some("<encrypted: key k2>")
    );
    assert_eq!(
        Payloads::masked(&json!({"input": sealed, "n": 1})),
        json!({"input": "<encrypted: key k2>", "n": 1})
    );
}

#[test]
fn an_altered_payload_or_a_key_under_another_id_does_not_open() {
    let p = payloads(&format!("k1:{K1}"));
    let sealed = p.seal(json!({"amount": 100})).unwrap();
    let mut text = sealed.to_string();
    // Flip one base64 character of the data.
    let at = text.find("\"data\":\"").unwrap() + 20;
    let flipped = if &text[at..=at] == "A" { "B" } else { "A" };
    text.replace_range(at..=at, flipped);
    let altered: Value = serde_json::from_str(&text).unwrap();
    assert!(matches!(p.open(altered), Err(CodecError::Corrupt { .. })));
    // The same key bytes under another id: the id is bound to the data.
    let renamed = payloads(&format!("k9:{K1}"));
    let moved = json!({"$sealed": {"key": "k9", "data": sealed["$sealed"]["data"]}});
    assert!(matches!(
        renamed.open(moved),
        Err(CodecError::Corrupt { .. })
    ));
}

#[test]
fn bad_keys_are_refused_without_showing_key_material() {
    let cases = [
        ("", "not `id:base64key`"),
        ("k1", "not `id:base64key`"),
        ("k1:not base64!", "is not base64"),
        ("k1:AAEC", "has 3 bytes"),
        (&format!("{K1}:k1") as &str, "the id of key 1"),
        // A URL-safe, unpadded key in the id's place.
        (
            "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8:k1",
            "the id of key 1",
        ),
        (&format!("k1:{K1},k1:{K2}") as &str, "given twice"),
    ];
    for (keys, expected) in cases {
        let e = AesGcmCodec::parse(keys).unwrap_err().to_string();
        assert!(e.contains(expected), "{keys:?}: {e}");
        assert!(
            !e.contains(K1) && !e.contains(K2) && !e.contains("ICEiIyQl"),
            "{e}"
        );
    }
}

#[test]
fn a_generated_key_is_usable() {
    let key = AesGcmCodec::generate_key();
    let p = payloads(&format!("fresh:{key}"));
    let sealed = p.seal(json!([1, 2, 3])).unwrap();
    assert_eq!(p.open(sealed).unwrap(), json!([1, 2, 3]));
}

#[test]
fn events_carry_their_payload_sealed_and_metadata_in_the_clear() {
    let p = payloads(&format!("k1:{K1}"));
    let mut event = Event::Dispatched {
        step: 2,
        direction: Direction::Compensation,
        attempt: 1,
        command_id: uuid::Uuid::nil(),
        payload: json!({"refund": "card 4242"}),
        service: Some("payment".into()),
        command: Some("refund".into()),
    };
    let before = event.clone();
    p.seal_in(&mut event).unwrap();
    let text = serde_json::to_string(&event).unwrap();
    assert!(!text.contains("4242"), "{text}");
    assert!(
        text.contains("\"refund\"") && text.contains("payment"),
        "{text}"
    );
    p.open_in(&mut event).unwrap();
    assert_eq!(event, before);
    let mut completed = Event::Completed;
    assert!(completed.payload_mut().is_none());
    p.seal_in(&mut completed).unwrap();
}

/// A sealed command does not name its input's type in the clear; a plain one does.
#[test]
fn a_sealed_command_drops_the_name_of_its_input_type() {
    let command = || crate::message::Command {
        command_id: uuid::Uuid::nil(),
        saga_id: uuid::Uuid::nil(),
        saga: "order".into(),
        step: 0,
        step_name: "charge".into(),
        direction: Direction::Forward,
        attempt: 1,
        service: "payment".into(),
        command: "charge".into(),
        idempotency_key: "k".into(),
        timeout_ms: None,
        input_type: Some("shop::CardDetails".into()),
        payload: json!({"card": "tok_4242"}),
    };
    let mut sealed = command();
    payloads(&format!("k1:{K1}")).seal_in(&mut sealed).unwrap();
    assert_eq!(sealed.input_type, None);
    let mut plain = command();
    Payloads::plain().seal_in(&mut plain).unwrap();
    assert_eq!(plain.input_type.as_deref(), Some("shop::CardDetails"));
}
