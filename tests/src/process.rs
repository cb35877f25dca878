//! The example programs as OS processes on a fresh database and a fresh vhost.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::PgPool;

use crate::amqp::{Broker, broker};

/// The path of a workspace binary, next to the test executable's directory.
///
/// `cargo nextest run --workspace` (and `cargo test --workspace`) build it first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo nextest run --workspace` (or `cargo build --bin {name}` first)",
        path.display()
    );
    path
}

/// Runs `command` to its end; returns its stdout, or panics naming it (`what`) with its output.
pub fn stdout_of(command: &mut Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A database and a vhost of the test's own, and the processes started on them.
pub struct Stack {
    program: PathBuf,
    /// `DATABASE_URL` of the test's database.
    pub database_url: String,
    /// A pool on the test's database.
    pub pool: PgPool,
    db: Option<crate::FreshDatabase>,
    broker: Option<Broker>,
    children: Vec<Child>,
}

impl Stack {
    /// Creates the database and the vhost for `program`.
    pub async fn new(program: &str) -> Stack {
        let db = crate::fresh_database().await;
        Stack {
            program: binary(program),
            database_url: db.url.clone(),
            pool: db.pool.clone(),
            db: Some(db),
            broker: Some(broker().await),
            children: Vec::new(),
        }
    }

    /// A fresh vhost for `program` on a database the test set up itself (a server of its
    /// own): `database_url` for the processes, `pool` for the test's checks. The database is
    /// the test's to remove.
    pub async fn on_database(program: &str, database_url: &str, pool: PgPool) -> Stack {
        Stack {
            program: binary(program),
            database_url: database_url.to_owned(),
            pool,
            db: None,
            broker: Some(broker().await),
            children: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_of(&self.program, args)
    }

    fn command_of(&self, program: &std::path::Path, args: &[&str]) -> Command {
        let broker = self.broker.as_ref().expect("broker until cleanup");
        let mut command = Command::new(program);
        command
            .args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", &broker.config.url)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        command
    }

    /// The broker configuration (vhost) the processes use.
    pub fn broker_config(&self) -> saga_amqp::AmqpConfig {
        self.broker
            .as_ref()
            .expect("broker until cleanup")
            .config
            .clone()
    }

    /// Runs the program to its end; returns its stdout. Panics if it fails.
    pub async fn run(&self, args: &[&str]) -> String {
        self.run_with(args, &[]).await.0
    }

    /// Runs the program to its end with extra environment; returns its stdout and stderr.
    /// Panics if it fails.
    pub async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> (String, String) {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let mut command = tokio::process::Command::from(command);
        let output = command.output().await.expect("run the program");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{args:?} failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        (stdout, String::from_utf8_lossy(&output.stderr).into_owned())
    }

    /// Runs the program to its end on a pseudo-terminal (util-linux `script`), as at a
    /// person's terminal; returns what the terminal showed. Panics if it fails.
    pub async fn run_on_terminal(&self, args: &[&str]) -> String {
        let inner = self.command(args);
        let quote =
            |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
        let line: Vec<String> = std::iter::once(inner.get_program())
            .chain(inner.get_args())
            .map(quote)
            .collect();
        let mut command = tokio::process::Command::new("script");
        command
            .args(["-qec", &line.join(" "), "/dev/null"])
            .stdin(Stdio::null());
        for (key, value) in inner.get_envs() {
            if let Some(value) = value {
                command.env(key, value);
            }
        }
        let output = command
            .output()
            .await
            .expect("run `script` (util-linux) for a pseudo-terminal");
        let shown = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{args:?} on a terminal failed: {shown}"
        );
        shown
    }

    /// Runs the program to its end with extra environment, expecting it to fail; returns its
    /// stderr.
    pub async fn run_failing(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let output = tokio::process::Command::from(command)
            .output()
            .await
            .expect("run the program");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
        stderr
    }

    /// Starts the program in the background with extra environment, its output going to
    /// `log`; returns its PID.
    pub fn spawn_logged(
        &mut self,
        args: &[&str],
        env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> u32 {
        let file = std::fs::File::create(log).expect("create the log file");
        let mut command = self.command(args);
        command
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("clone the log file"))
            .stderr(file);
        let child = command.spawn().expect("spawn the program");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Starts the program in the background; returns its PID.
    pub fn spawn(&mut self, args: &[&str]) -> u32 {
        self.spawn_with(args, &[])
    }

    /// Starts the program in the background with extra environment; returns its PID.
    pub fn spawn_with(&mut self, args: &[&str], env: &[(&str, &str)]) -> u32 {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let child = command.spawn().expect("spawn the program");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Starts another program (a participant in another language, say) in the background on
    /// the stack's database and vhost; returns its PID.
    pub fn spawn_program(&mut self, program: &std::path::Path, args: &[&str]) -> u32 {
        let child = self
            .command_of(program, args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Sends `signal` (e.g. `KILL`, `TERM`) to a process this stack started.
    pub fn signal(&mut self, pid: u32, signal: &str) {
        assert!(
            self.children.iter().any(|c| c.id() == pid),
            "{pid} was not started here"
        );
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits for a process this stack started to exit, within `timeout`; returns whether it
    /// exited successfully.
    pub async fn wait_exit(&mut self, pid: u32, timeout: Duration) -> bool {
        let index = self
            .children
            .iter()
            .position(|c| c.id() == pid)
            .expect("started here");
        let mut child = self.children.remove(index);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                return status.success();
            }
            if tokio::time::Instant::now() >= deadline {
                let command = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default();
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "process {pid} ({}) did not exit within {timeout:?}",
                    command.trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every process with SIGTERM and checks each exits cleanly, then drops the database
    /// and the vhost.
    pub async fn shutdown(mut self) {
        let pids: Vec<u32> = self.children.iter().map(Child::id).collect();
        for pid in &pids {
            self.signal(*pid, "TERM");
        }
        for pid in pids {
            assert!(
                self.wait_exit(pid, Duration::from_secs(20)).await,
                "process {pid} exited cleanly on SIGTERM"
            );
        }
        if let Some(db) = self.db.take() {
            db.drop_database().await;
        }
        if let Some(broker) = self.broker.take() {
            broker.cleanup().await;
        }
    }
}

impl Drop for Stack {
    /// A failing test still ends every process it started.
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
