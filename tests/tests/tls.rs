//! TLS end to end: `order-saga` as processes reaching PostgreSQL with
//! `sslmode=verify-full` and a RabbitMQ node that only listens for TLS (`amqps://`), started by
//! the test on ports of its own and stopped by it, with certificates it makes.
//!
//! The shared RabbitMQ is left alone (the node is another one), but a node boot is heavy, so
//! nextest runs this alone (`.config/nextest.toml`).

use std::path::Path;
use std::process::Command;

use saga_tests::free_port;
use saga_tests::process::Stack;
use saga_tests::rabbit_node::{Node, TempDir};

/// PostgreSQL's certificate on Debian (`ssl = on` with the snakeoil pair, `CN=localhost`).
const PG_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("this test makes its certificates with the openssl command; install openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A RabbitMQ node of the test's own, listening only for TLS.
struct TlsNode(Node);

impl TlsNode {
    /// Makes a CA and a server certificate for `localhost`, and boots the node.
    async fn start() -> TlsNode {
        let guard = TempDir::new("saga-tls");
        let dir = guard.0.clone();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=saga test CA",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            dir.join("ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext",
            ],
        );
        let port = free_port();
        let d = dir.display();
        let config = format!(
            "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {d}/ca.pem\n\
                 ssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n"
        );
        let name = format!("saga_tls_{}", uuid::Uuid::new_v4().simple());
        TlsNode(Node::start(&name, guard, &config, port).await)
    }

    fn ca(&self) -> String {
        self.0.dir().join("ca.pem").to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.0.port)
    }

    fn ctl(&self, args: &[&str]) -> String {
        self.0.ctl(args)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_run_over_tls_to_both_services() {
    let node = TlsNode::start().await;
    let mut stack = Stack::new("order-saga").await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(
        ssl == "on" && Path::new(PG_CERT).exists(),
        "this test needs PostgreSQL with `ssl = on` and its certificate at {PG_CERT} \
         (Debian's default)"
    );
    // Verified against the server's own certificate; by name too when it names localhost
    // (Debian issues it to the machine's hostname).
    let names_localhost = Command::new("openssl")
        .args(["x509", "-noout", "-checkhost", "localhost", "-in", PG_CERT])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("does match"));
    let mode = if names_localhost {
        "verify-full"
    } else {
        "verify-ca"
    };
    let database_url = format!(
        "{}?sslmode={mode}&sslrootcert={PG_CERT}",
        stack.database_url.replacen("127.0.0.1", "localhost", 1)
    );
    let (url, ca) = (node.url(), node.ca());
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("AMQP_URL", url.as_str()),
        // The test CA, for the rustls roots the AMQP client loads.
        ("SSL_CERT_FILE", ca.as_str()),
    ];

    // Without the CA the broker's certificate is refused, in one line naming AMQP_URL.
    let refused = stack
        .run_failing(&["service", "inventory"], &[env[0], env[1]])
        .await;
    assert!(
        refused.contains("AMQP_URL") && refused.to_lowercase().contains("certificate"),
        "{refused}"
    );

    stack.run_with(&["migrate"], &env).await;
    stack.spawn_with(&["orchestrator"], &env);
    for service in ["inventory", "payment", "shipping"] {
        stack.spawn_with(&["service", service], &env);
    }
    stack
        .run_with(&["start", "--count", "20", "--fail-every", "5"], &env)
        .await;
    let (waited, _) = stack.run_with(&["wait", "--timeout", "60"], &env).await;
    assert_eq!(
        waited.trim(),
        r#"{"running":0,"completed":16,"compensated":4,"stuck":0}"#
    );

    // Every AMQP connection of the run is TLS (the node has no other listener); the database
    // sessions are too, verified against the server's certificate (`verify-full` refuses
    // anything else).
    let ssl = node.ctl(&["list_connections", "-q", "--no-table-headers", "ssl"]);
    let flags: Vec<&str> = ssl.split_whitespace().collect();
    assert!(flags.len() >= 8, "two connections per process: {ssl}");
    assert!(flags.iter().all(|f| *f == "true"), "{ssl}");
    stack.shutdown().await;
}
