//! PostgreSQL servers of a test's own: a primary and a synchronous streaming standby, each in a
//! temporary directory on a port of its own, run as the `postgres` user with the machine's
//! PostgreSQL binaries. The shared cluster on 5432 is left alone. Each server is stopped by
//! its data directory's postmaster PID when dropped, pass or fail.

use std::path::PathBuf;
use std::process::Command;

use crate::free_port;
use crate::process::stdout_of;
use crate::rabbit_node::TempDir;

/// The application name the standby streams under, which the primary waits for.
const STANDBY_NAME: &str = "saga_standby";

/// A running server of the test's own.
#[derive(Debug)]
pub struct PgServer {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    running: bool,
    // Dropped last: the data directory.
    dir: TempDir,
}

impl PgServer {
    /// A fresh primary whose commits wait until the standby of [`PgServer::standby_of`] has
    /// them (`synchronous_standby_names`), running.
    pub fn primary() -> PgServer {
        let (dir, data) = folder();
        as_postgres(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        );
        let port = free_port();
        configure(
            &dir.0,
            port,
            &format!(
                "wal_level = replica\n\
                 max_wal_senders = 4\n\
                 synchronous_standby_names = '{STANDBY_NAME}'\n\
                 synchronous_commit = on\n"
            ),
        );
        PgServer::run(dir, port)
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), running. Its own
    /// `synchronous_standby_names` is empty, so once promoted its commits wait for nobody.
    pub fn standby_of(primary: &PgServer) -> PgServer {
        let (dir, data) = folder();
        as_postgres(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &data.to_string_lossy(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        let port = free_port();
        configure(
            &dir.0,
            port,
            &format!("cluster_name = '{STANDBY_NAME}'\nsynchronous_standby_names = ''\n"),
        );
        PgServer::run(dir, port)
    }

    /// Starts the server whose data directory is in `dir`, on `port`.
    fn run(dir: TempDir, port: u16) -> PgServer {
        let mut server = PgServer {
            port,
            running: false,
            dir,
        };
        server.start();
        server
    }

    /// A URL of this server's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Whether the primary streams to the standby synchronously (asked of the primary; `false`
    /// while it does not answer).
    pub fn streams_synchronously(&self) -> bool {
        let query = format!(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'"
        );
        let port = self.port.to_string();
        bin_command("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-Atc",
                &query,
            ])
            .output()
            .is_ok_and(|out| {
                out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "sync"
            })
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`): no checkpoint, no goodbye.
    pub fn stop_immediately(&mut self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
        self.running = false;
    }

    /// Promotes a standby to primary and waits until it is one.
    pub fn promote(&self) {
        self.pg_ctl(&["promote", "-w"]);
    }

    fn start(&mut self) {
        let log = self.dir.0.join("server.log");
        // Before the start: a start that times out may leave a server running, which the
        // drop then stops.
        self.running = true;
        self.pg_ctl(&["start", "-w", "-t", "60", "-l", &log.to_string_lossy()]);
    }

    fn pg_ctl(&self, args: &[&str]) -> String {
        let data = data(&self.dir.0);
        let mut all = vec!["-D", data.to_str().expect("a UTF-8 path")];
        all.extend_from_slice(args);
        as_postgres("pg_ctl", &all)
    }

    /// The postmaster's PID, from its data directory.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(data(&self.dir.0).join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PgServer {
    /// Stops this server only: `pg_ctl stop -m immediate` on its data directory, then SIGKILL
    /// to its postmaster's PID if that did not end it.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let data = data(&self.dir.0);
        let _ = bin_command("pg_ctl")
            .args([
                "-D",
                &data.to_string_lossy(),
                "stop",
                "-m",
                "immediate",
                "-w",
            ])
            .args(["-t", "20"])
            .output();
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
    }
}

/// A fresh folder for a server, handed to the postgres user, and its data directory's path.
fn folder() -> (TempDir, PathBuf) {
    let dir = TempDir::new("saga-pg");
    own(&dir.0);
    let data = data(&dir.0);
    (dir, data)
}

/// The data directory inside a server's folder.
fn data(dir: &std::path::Path) -> PathBuf {
    dir.join("data")
}

/// Hands a folder to the postgres user, which the server runs as.
fn own(dir: &std::path::Path) {
    let owned = Command::new("chown")
        .args(["postgres:", &dir.to_string_lossy()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        owned,
        "this test runs as root, to hand its servers' folders to the postgres user"
    );
}

/// Appends the test's settings to a server's `postgresql.conf`: its port, 127.0.0.1 only, its
/// socket in its own folder, and `extra`. Durability to disk is off (`fsync`): the tests stop
/// servers, never the machine, and what they check is replication.
fn configure(dir: &std::path::Path, port: u16, extra: &str) {
    let conf = data(dir).join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
    text.push_str(&format!(
        "\nport = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{}'\n\
         max_connections = 200\n\
         fsync = off\n\
         hot_standby = on\n\
         {extra}",
        dir.display()
    ));
    std::fs::write(&conf, text).expect("write postgresql.conf");
}

/// A command of the machine's PostgreSQL binaries, run as the postgres user.
fn bin_command(program: &str) -> Command {
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(bin_dir().join(program));
    command
}

/// Runs a PostgreSQL binary as the postgres user; returns its stdout, or panics with its output.
fn as_postgres(program: &str, args: &[&str]) -> String {
    let mut command = bin_command(program);
    command.args(args);
    stdout_of(
        &mut command,
        &format!("{program} {args:?} as postgres (runuser)"),
    )
}

/// The folder of the machine's PostgreSQL binaries (`pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`).
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().expect(
        "PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup) under /usr/lib/postgresql/*/bin",
    )
}
