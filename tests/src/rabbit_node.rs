//! RabbitMQ nodes of a test's own: their own names, ports and data directories, booted with
//! `rabbitmq-server` (run as root, which hands the files to the `rabbitmq` user) and stopped
//! by the test, by name and then by PID. The shared broker is left alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::free_port;
use crate::process::stdout_of;

/// A folder removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh folder under the system's temporary directory.
    pub fn new(prefix: &str) -> TempDir {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("{prefix}-{id}"));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running node of the test's own.
#[derive(Debug)]
pub struct Node {
    /// Its Erlang node name, `NAME@localhost`.
    pub name: String,
    /// The port its listener takes.
    pub port: u16,
    dist_port: u16,
    wrapper: Option<Child>,
    // Dropped last: the node's files.
    dir: TempDir,
}

impl Node {
    /// Boots a node named `NAME@localhost` in `dir` with `config` (a `rabbitmq.conf`, whose
    /// listener must be on `port`), and waits until it listens.
    pub async fn start(name: &str, dir: TempDir, config: &str, port: u16) -> Node {
        std::fs::write(dir.0.join("rabbitmq.conf"), config).expect("write rabbitmq.conf");
        std::fs::write(dir.0.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        let mut node = Node {
            name: format!("{name}@localhost"),
            port,
            dist_port: free_port(),
            wrapper: None,
            dir,
        };
        node.boot().await;
        node
    }

    /// The node's folder.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Starts the node (again, after [`Node::kill`]) and waits until it listens.
    pub async fn boot(&mut self) {
        // The broker runs as the rabbitmq user (the wrapper script switches to it).
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:", &self.dir.0.to_string_lossy()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            owned,
            "this test runs as root, to hand its node's files to the rabbitmq user"
        );
        let dir = &self.dir.0;
        let log = |f: &str| std::fs::File::create(dir.join(f)).expect("a log file");
        let wrapper = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(log("out.txt"))
            .stderr(log("err.txt"))
            .spawn()
            .expect("this test boots RabbitMQ nodes of its own with rabbitmq-server, run as root");
        self.wrapper = Some(wrapper);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            let exited = self
                .wrapper
                .as_mut()
                .and_then(|w| w.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                panic!(
                    "node {} did not listen within 120 s ({exited:?}): {}{}",
                    self.name,
                    read("out.txt"),
                    read("err.txt")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `rabbitmqctl -n NODE args`; returns its standard output, or panics with its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut command = Command::new("rabbitmqctl");
        command.args(["-n", &self.name]).args(args);
        stdout_of(
            &mut command,
            &format!("rabbitmqctl -n {} {args:?}", self.name),
        )
    }

    /// The PID of the node's Erlang VM, from its PID file.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.0.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// Kills the node's VM with SIGKILL (no goodbye to its peers) and reaps its wrapper.
    pub fn kill(&mut self) {
        let pid = self.pid().expect("the node wrote its PID file");
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(killed, "kill -9 {pid} (node {})", self.name);
        if let Some(mut wrapper) = self.wrapper.take() {
            let _ = wrapper.wait();
        }
        let _ = std::fs::remove_file(self.dir.0.join("pid"));
    }
}

impl Drop for Node {
    /// Stops this node only, pass or fail, by its VM's PID: SIGTERM (Erlang's orderly stop),
    /// then SIGKILL if it still runs after 20 s (a node whose quorum queues lost
    /// their majority may never finish an orderly stop; `rabbitmqctl stop` would wait on it
    /// for ever). Its files go after.
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let signal = |s: &str| {
                let _ = Command::new("kill").args([s, &pid.to_string()]).output();
            };
            let runs = || Path::new(&format!("/proc/{pid}")).exists();
            signal("-TERM");
            let deadline = std::time::Instant::now() + STOP_GRACE;
            while runs() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if runs() {
                signal("-KILL");
            }
        }
        if let Some(mut wrapper) = self.wrapper.take() {
            let _ = wrapper.kill();
            let _ = wrapper.wait();
        }
    }
}

/// How long a dropped node is given to stop on its own before its VM is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);
