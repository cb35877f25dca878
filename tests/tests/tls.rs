//! TLS end to end: `order-saga` as processes reaching PostgreSQL with
//! `sslmode=verify-full` and a RabbitMQ node that only listens for TLS (`amqps://`), started by
//! the test on ports of its own and stopped by it, with certificates it makes.
//!
//! The shared RabbitMQ is left alone (the node is another one), but a node boot is heavy, so
//! nextest runs this alone (`.config/nextest.toml`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use saga_tests::free_port;
use saga_tests::process::Stack;

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

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A RabbitMQ node of the test's own, listening only for TLS on `port`.
struct TlsNode {
    node: String,
    port: u16,
    wrapper: Child,
    // Dropped last: the node's files and keys.
    dir: TempDir,
}

impl TlsNode {
    /// Makes a CA and a server certificate for `localhost`, and boots the node.
    async fn start() -> TlsNode {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let guard = TempDir(std::env::temp_dir().join(format!("saga-tls-{id}")));
        let dir = guard.0.clone();
        std::fs::create_dir_all(&dir).unwrap();
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
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {d}/ca.pem\n\
                 ssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // The broker runs as the rabbitmq user (the wrapper script switches to it).
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:", &dir.to_string_lossy()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            owned,
            "this test runs as root, to hand its node's files to the rabbitmq user"
        );
        let node = format!("saga_tls_{id}@localhost");
        let wrapper = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("out.txt")).unwrap())
            .stderr(std::fs::File::create(dir.join("err.txt")).unwrap())
            .spawn()
            .expect("this test boots a RabbitMQ node of its own with rabbitmq-server, run as root");
        let mut node = TlsNode {
            node,
            port,
            wrapper,
            dir: guard,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break node;
            }
            let exited = node.wrapper.try_wait().unwrap();
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                panic!(
                    "the TLS node did not listen within 90 s ({exited:?}): {}{}",
                    read("out.txt"),
                    read("err.txt")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn ca(&self) -> String {
        self.dir.0.join("ca.pem").to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) -> String {
        let output = Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .expect("run rabbitmqctl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for TlsNode {
    /// Stops this node only (by name, then by its PID if it is still there), pass or fail.
    fn drop(&mut self) {
        let stopped = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !stopped && let Ok(pid) = std::fs::read_to_string(self.dir.0.join("pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).output();
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
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
