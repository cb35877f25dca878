//! Tests of the configuration: parsing, validation and redaction.

use super::*;

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact("amqp://app:s3cret@mq:5672/prod"),
        "amqp://app:***@mq:5672/prod"
    );
    assert_eq!(redact("amqps://mq/%2f"), "amqps://mq/%2f");
    let config = AmqpConfig::new("amqp://app:s3cret@mq/%2f");
    assert!(!format!("{config:?}").contains("s3cret"));
}

#[test]
fn every_password_of_a_url_list_or_query_is_redacted() {
    let list = "amqp://guest:pw1@127.0.0.1:5999/%2f,amqp://guest:pw2@127.0.0.1:5672/%2f";
    assert_eq!(
        redact(list),
        "amqp://guest:***@127.0.0.1:5999/%2f,amqp://guest:***@127.0.0.1:5672/%2f"
    );
    assert_eq!(
        redact("postgres://app@db/shop?sslmode=require&password=pw3"),
        "postgres://app@db/shop?sslmode=require&password=***"
    );
    assert_eq!(
        redact("postgres://app:pw4@db1:5432,db2:5432/shop?sslpassword=pw5"),
        "postgres://app:***@db1:5432,db2:5432/shop?sslpassword=***"
    );
    assert_eq!(redact("postgres://app@db/shop"), "postgres://app@db/shop");
    // Unencoded `/`, `?`, `#` and `@` in a password; no user; IPv6; key=value strings;
    // a comma in a query value; any case.
    assert_eq!(redact("amqp://u:pa/ss@h/v"), "amqp://u:***@h/v");
    assert_eq!(redact("amqp://u:pa?s#s@h"), "amqp://u:***@h");
    assert_eq!(redact("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
    assert_eq!(
        redact("amqp://:pw@[::1]:5672/v"),
        "amqp://:***@[::1]:5672/v"
    );
    assert_eq!(
        redact("host=db user=app password=pw6 dbname=shop"),
        "host=db user=app password=*** dbname=shop"
    );
    assert_eq!(
        redact("postgres://db/shop?PassWord=se,cret&x=1"),
        "postgres://db/shop?PassWord=***&x=1"
    );
    assert_eq!(
        redact("postgres://db/shop?mypassword=x"),
        "postgres://db/shop?mypassword=x"
    );
    assert_eq!(
        redact("ümlaut://ü:pw7@hö/ä?password=pw8"),
        "ümlaut://ü:***@hö/ä?password=***"
    );
    for secret in ["pw1", "pw2", "pw3", "pw4", "pw5", "pw6"] {
        for url in [
            list,
            "postgres://app@db/shop?sslmode=require&password=pw3",
            "postgres://app:pw4@db1:5432,db2:5432/shop?sslpassword=pw5",
            "host=db user=app password=pw6 dbname=shop",
        ] {
            assert!(!redact(url).contains(secret), "{url}");
        }
    }
}

#[test]
fn bad_values_name_the_variable() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let err = AmqpConfig::from_lookup(env(&[("AMQP_PREFETCH", "lots")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid AMQP_PREFETCH: expected a number from 1 to 65535"
    );
    let err = AmqpConfig::from_lookup(env(&[("AMQP_URL", "http://x")])).unwrap_err();
    assert_eq!(err.variable, "AMQP_URL");
    let err = AmqpConfig::from_lookup(env(&[("AMQP_QUEUE_TYPE", "stream")])).unwrap_err();
    assert_eq!(err.variable, "AMQP_QUEUE_TYPE");
    let err = AmqpConfig::from_lookup(env(&[("AMQP_DECLARE", "no")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid AMQP_DECLARE: expected `true` or `false`"
    );
    assert!(
        !AmqpConfig::from_lookup(env(&[("AMQP_DECLARE", "false")]))
            .unwrap()
            .declare
    );
    let ok = AmqpConfig::from_lookup(env(&[
        ("AMQP_QUEUE_TYPE", "classic"),
        ("AMQP_PREFIX", "t1"),
    ]))
    .unwrap();
    assert_eq!(
        (ok.queue_type, ok.queue(&saga_core::Destination::Results)),
        (QueueType::Classic, "t1.results".into())
    );
    assert_eq!(
        AmqpConfig::from_lookup(|_| None).unwrap().url,
        AmqpConfig::DEFAULT_URL
    );
}

#[test]
fn participant_permissions_name_only_its_own_resources() {
    let mut config = AmqpConfig::new(AmqpConfig::DEFAULT_URL);
    assert_eq!(
        config.participant_permissions("inventory"),
        [
            "^$".to_owned(),
            r"^saga\.(results|dead|requeue\.service\.inventory)$".to_owned(),
            r"^saga\.service\.inventory$".to_owned(),
        ]
    );
    config.prefix = "shop.v2".into();
    assert_eq!(
        config.participant_permissions("pay-ment")[2],
        r"^shop\.v2\.service\.pay-ment$"
    );
}

#[test]
fn a_url_list_names_one_cluster() {
    let config = |url: &'static str| {
        AmqpConfig::from_lookup(move |name| (name == "AMQP_URL").then(|| url.to_owned()))
    };
    let nodes = config("amqp://app:pw@n1:5672/shop, amqp://app:pw@n2:5673/shop,").unwrap();
    assert_eq!(
        nodes.urls(),
        ["amqp://app:pw@n1:5672/shop", "amqp://app:pw@n2:5673/shop"]
    );
    // A comma inside a password does not split the URL.
    let comma = config("amqp://app:p,w@n1/shop").unwrap();
    assert_eq!(comma.urls(), ["amqp://app:p,w@n1/shop"]);
    for mixed in [
        "amqp://app:pw@n1/shop,amqp://app:pw@n2/other",
        "amqp://app:pw@n1/shop,amqp://ops:pw@n2/shop",
        "amqps://app:pw@n1/shop,amqp://app:pw@n2/shop",
        "amqp://app:pw@n1/shop,http://n2",
        ",",
    ] {
        let err = config(mixed).unwrap_err();
        assert_eq!(err.variable, "AMQP_URL", "{mixed}");
    }
    let size =
        AmqpConfig::from_lookup(|name| (name == "AMQP_QUORUM_GROUP_SIZE").then(|| "3".to_owned()))
            .unwrap();
    assert_eq!(size.quorum_group_size, Some(3));
    let err =
        AmqpConfig::from_lookup(|name| (name == "AMQP_QUORUM_GROUP_SIZE").then(|| "0".to_owned()))
            .unwrap_err();
    assert_eq!(err.variable, "AMQP_QUORUM_GROUP_SIZE");
}
