//! No secret in any log line: the programs run with passwords in both URLs (the database's
//! also as a query parameter, percent-encoded, and as `PGPASSWORD`; the broker's also in a list
//! of URLs) and with payload keys, at the most verbose log level, and their whole output (the
//! orchestrator's metrics included) is searched. The same run shows the programs encrypt every
//! payload with one variable set: the log and the inboxes hold no input in plain text.

use std::time::Duration;

use saga_tests::amqp::rabbitmqctl;
use saga_tests::process::Stack;

const PG_SECRET: &str = "Pg-s3cret-7f1d";
const MQ_SECRET: &str = "Mq-s3cret-92ab";
/// A password with characters a URL must encode, as the URL carries it.
const ENCODED_SECRET: &str = "Sp%2Fec%3Fal%23-5c0e";
/// The same password, decoded.
const DECODED_SECRET: &str = "Sp/ec?al#-5c0e";
/// A payload key (32 bytes, base64).
const PAYLOAD_KEY: &str = "UGF5bG9hZC1rZXktbWF0ZXJpYWwtMzItYnl0ZXMhISE=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_logs() {
    let mut stack = Stack::new("order-saga").await;
    let broker = stack.broker_config();
    let vhost = broker.url.rsplit_once('/').unwrap().1.to_owned();
    let user = format!("u_{}", &vhost[2..14]);
    rabbitmqctl(&["add_user", &user, MQ_SECRET]).await;
    rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]).await;
    let amqp_url = format!("amqp://{user}:{MQ_SECRET}@127.0.0.1:5672/{vhost}");
    // PostgreSQL trusts local connections here, so the password is carried but never checked.
    // Also as a query parameter sqlx does not know (and would log, value included).
    let database_url = format!(
        "{}?sslpassword={PG_SECRET}",
        stack
            .database_url
            .replacen("://postgres@", &format!("://postgres:{PG_SECRET}@"), 1)
    );
    assert!(database_url.contains(PG_SECRET), "{database_url}");
    let keys = format!("k1:{PAYLOAD_KEY}");
    let metrics_addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("AMQP_URL", amqp_url.as_str()),
        ("RUST_LOG", "trace"),
        ("SAGA_PAYLOAD_KEYS", keys.as_str()),
    ];

    let dir = std::env::temp_dir().join(format!("saga-secrets-{vhost}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut outputs = Vec::new();
    outputs.push(stack.run_with(&["migrate"], &env).await);
    let mut logs = vec![dir.join("orchestrator.log")];
    let orchestrator_env = [&env[..], &[("METRICS_ADDR", metrics_addr.as_str())]].concat();
    stack.spawn_logged(&["orchestrator"], &orchestrator_env, &logs[0]);
    for service in ["inventory", "payment", "shipping"] {
        let log = dir.join(format!("{service}.log"));
        stack.spawn_logged(&["service", service], &env, &log);
        logs.push(log);
    }
    outputs.push(
        stack
            .run_with(&["start", "--count", "10", "--fail-every", "5"], &env)
            .await,
    );
    outputs.push(stack.run_with(&["wait", "--timeout", "60"], &env).await);
    outputs.push((scrape(&metrics_addr).await, String::new()));
    // The database's password as PGPASSWORD, the URL without one.
    let bare_url = stack.database_url.clone();
    outputs.push(
        stack
            .run_with(
                &["status"],
                &[
                    ("DATABASE_URL", bare_url.as_str()),
                    ("PGPASSWORD", PG_SECRET),
                    ("RUST_LOG", "trace"),
                ],
            )
            .await,
    );
    // A failure that names the URLs: unreachable broker and database.
    let unreachable = [
        (
            "DATABASE_URL",
            database_url.replace("127.0.0.1:5432", "127.0.0.1:1"),
        ),
        ("AMQP_URL", amqp_url.replace("5672", "1")),
        ("RUST_LOG", "trace".to_owned()),
    ];
    // The database out of reach, then the broker.
    outputs.push(fails(&["status", "--timeout", "1"], &unreachable));
    // Out of reach with a percent-encoded password, and with PGPASSWORD.
    let encoded = bare_url.replace("127.0.0.1:5432", "127.0.0.1:1").replacen(
        "://postgres@",
        &format!("://postgres:{ENCODED_SECRET}@"),
        1,
    );
    outputs.push(fails(
        &["status", "--timeout", "1"],
        &[("DATABASE_URL", encoded), ("RUST_LOG", "trace".to_owned())],
    ));
    outputs.push(fails(
        &["status", "--timeout", "1"],
        &[
            (
                "DATABASE_URL",
                bare_url.replace("127.0.0.1:5432", "127.0.0.1:1"),
            ),
            ("PGPASSWORD", PG_SECRET.to_owned()),
            ("RUST_LOG", "trace".to_owned()),
        ],
    ));
    // Payload keys that are not valid: refused without echoing them.
    outputs.push(fails(
        &["status", "--timeout", "1"],
        &[(
            "SAGA_PAYLOAD_KEYS",
            format!("k1:{PAYLOAD_KEY},{PAYLOAD_KEY}"),
        )],
    ));
    let broker_unreachable = [unreachable[1].clone(), unreachable[2].clone()];
    outputs.push(fails(
        &["service", "payment"],
        &[
            &[("DATABASE_URL", database_url.clone())][..],
            &broker_unreachable[..],
        ]
        .concat(),
    ));
    // A list of broker URLs, as AMQP clients accept them: each password hidden.
    let list = format!(
        "{},{}",
        amqp_url.replace("5672", "1"),
        amqp_url.replace("5672", "2")
    );
    outputs.push(fails(
        &["service", "payment"],
        &[
            ("DATABASE_URL", database_url.clone()),
            ("AMQP_URL", list),
            ("RUST_LOG", "trace".to_owned()),
        ],
    ));
    // Encrypted: no saga input in the log or the inboxes (the example's SKUs are `SKU-n`).
    let mut plain = Vec::new();
    for table in [
        "saga.events",
        "inventory.inbox",
        "payment.inbox",
        "shipping.inbox",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM {table} t"
        )))
        .fetch_all(&stack.pool)
        .await
        .unwrap();
        assert!(!rows.is_empty(), "{table} has rows");
        plain.extend(rows.into_iter().filter(|r| r.contains("SKU-")));
    }
    assert!(plain.is_empty(), "payloads in plain text: {plain:?}");
    stack.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut text = String::new();
    for (out, err) in outputs {
        text.push_str(&out);
        text.push_str(&err);
    }
    for log in &logs {
        text.push_str(&std::fs::read_to_string(log).unwrap());
    }
    assert!(
        text.lines().count() > 50,
        "the programs logged (at trace level)"
    );
    assert!(
        text.contains(":***@"),
        "URLs are shown with the password hidden"
    );
    assert!(
        text.contains("saga_results_total"),
        "the orchestrator's metrics were scraped"
    );
    for secret in [
        PG_SECRET,
        MQ_SECRET,
        ENCODED_SECRET,
        DECODED_SECRET,
        PAYLOAD_KEY,
    ] {
        let leaks: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(secret))
            .take(3)
            .collect();
        assert!(leaks.is_empty(), "{secret} leaked: {leaks:?}");
    }
    rabbitmqctl(&["delete_user", &user]).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The body of `GET /metrics` at `addr`.
async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// Runs `order-saga` with `args` and `env`, which must fail; returns its stdout and stderr.
fn fails(args: &[&str], env: &[(&str, String)]) -> (String, String) {
    let output = std::process::Command::new(saga_tests::process::binary("order-saga"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
