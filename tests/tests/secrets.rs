//! No secret in any log line: the programs run with passwords in both URLs (the database's
//! also as a query parameter, the broker's also in a list of URLs), at the most verbose log
//! level, and their whole output is searched.

use std::time::Duration;

use saga_tests::amqp::rabbitmqctl;
use saga_tests::process::Stack;

const PG_SECRET: &str = "Pg-s3cret-7f1d";
const MQ_SECRET: &str = "Mq-s3cret-92ab";

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
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("AMQP_URL", amqp_url.as_str()),
        ("RUST_LOG", "trace"),
    ];

    let dir = std::env::temp_dir().join(format!("saga-secrets-{vhost}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut outputs = Vec::new();
    outputs.push(stack.run_with(&["migrate"], &env).await);
    let mut logs = vec![dir.join("orchestrator.log")];
    stack.spawn_logged(&["orchestrator"], &env, &logs[0]);
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
    outputs.push(fails(&["status"], &unreachable));
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
    for secret in [PG_SECRET, MQ_SECRET] {
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
