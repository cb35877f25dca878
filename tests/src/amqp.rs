//! A vhost of its own on the real RabbitMQ, for one test.

use saga_amqp::{AmqpConfig, AmqpTransport};

/// The broker the tests use unless `AMQP_URL` says otherwise (its vhost is replaced).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A fresh vhost, deleted by [`Broker::cleanup`].
#[derive(Debug)]
pub struct Broker {
    /// The vhost's name.
    pub vhost: String,
    /// A configuration pointing at the vhost.
    pub config: AmqpConfig,
    /// Users made for the test, deleted with the vhost.
    users: std::sync::Mutex<Vec<String>>,
}

/// Runs `rabbitmqctl` with `args`; panics with its output if it fails.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run rabbitmqctl ({e}): these tests need RabbitMQ's rabbitmqctl, run as root; \
                 start the broker with `rabbitmq-server -detached`, or run `scripts/test`"
            )
        });
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {text}"
    );
    text
}

/// Creates a vhost for one test, with guest's permissions, and checks the broker answers.
pub async fn broker() -> Broker {
    crate::init_tracing();
    let vhost = format!("t_{}", uuid::Uuid::new_v4().simple());
    rabbitmqctl(&["add_vhost", &vhost]).await;
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]).await;
    let base = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
    let root = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(root, _)| root);
    let mut config = AmqpConfig::new(format!("{root}/{vhost}"));
    config.connection_name = vhost.clone();
    let broker = Broker {
        vhost,
        config,
        users: std::sync::Mutex::new(Vec::new()),
    };
    if let Err(e) = AmqpTransport::connect(broker.config.clone()).await {
        panic!(
            "RabbitMQ is not reachable ({e}). Start it with `rabbitmq-server -detached`, or run \
             `scripts/test`, which starts it."
        );
    }
    broker
}

impl Broker {
    /// A transport on the vhost (its own two connections).
    pub async fn transport(&self) -> AmqpTransport {
        AmqpTransport::connect(self.config.clone())
            .await
            .expect("connect to the test vhost")
    }

    /// A user of the test's own for `service`, with the permissions
    /// [`AmqpConfig::participant_permissions`] documents, and a configuration that connects
    /// as it without declaring anything.
    pub async fn participant(&self, service: &str) -> AmqpConfig {
        let user = format!("{}_{service}", self.vhost);
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &user, &password]).await;
        self.users.lock().unwrap().push(user.clone());
        let [configure, write, read] = self.config.participant_permissions(service);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.vhost,
            &user,
            &configure,
            &write,
            &read,
        ])
        .await;
        let mut config = self.config.clone();
        config.url = config
            .url
            .replacen("guest:guest@", &format!("{user}:{password}@"), 1);
        assert_ne!(config.url, self.config.url, "AMQP_URL names guest:guest");
        config.connection_name = user;
        config.declare = false;
        config
    }

    /// Deletes the vhost and everything in it, and the test's users.
    pub async fn cleanup(self) {
        rabbitmqctl(&["delete_vhost", &self.vhost]).await;
        let users = std::mem::take(&mut *self.users.lock().unwrap());
        for user in users {
            rabbitmqctl(&["delete_user", &user]).await;
        }
    }
}

/// Takes the dead letters of `source` until at least `expected` arrived or `timeout` passed;
/// returns them with their reasons.
pub async fn drain_dead_letters(
    transport: &AmqpTransport,
    source: &saga_core::Destination,
    expected: usize,
    timeout: std::time::Duration,
) -> Vec<(saga_core::Message, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut letters = Vec::new();
    loop {
        letters.extend(
            transport
                .drain_dead_letters(source)
                .await
                .expect("read the dead-letter queue"),
        );
        if letters.len() >= expected || tokio::time::Instant::now() >= deadline {
            return letters;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Sets the broker's memory watermark back to RabbitMQ's default (0.4) when dropped, so a
/// test that raised the memory alarm leaves the broker usable even when it fails.
#[derive(Debug)]
pub struct WatermarkGuard;

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .output();
    }
}

/// A queue named `tap` that receives a copy of every message sent to `routes`: their
/// topology is declared first (as the programs declare it), then the queue is bound to each
/// route's exchange and key. Read it with `basic_get` on the returned channel.
pub async fn tap(config: &AmqpConfig, routes: &[saga_core::Destination]) -> lapin::Channel {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use saga_core::Transport as _;
    AmqpTransport::connect(config.clone())
        .await
        .expect("connect to the test vhost")
        .declare(routes)
        .await
        .expect("declare the routes");
    let url = config.urls()[0];
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect the tap");
    let channel = conn.create_channel().await.expect("a channel for the tap");
    channel
        .queue_declare(
            "tap".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the tap");
    for route in routes {
        let (exchange, key) = match route {
            saga_core::Destination::Service(name) => (config.commands_exchange(), name.clone()),
            saga_core::Destination::Results => (config.results_exchange(), "results".to_owned()),
        };
        channel
            .queue_bind(
                "tap".into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the tap");
    }
    channel
}
