//! `saga ui`, the web console, as a process of the test's own.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `saga ui` as a process of the test's own, stopped (by PID) when dropped.
pub struct Console {
    child: Child,
    /// `host:port` it serves on.
    pub addr: String,
}

impl Console {
    /// Starts `saga ui --listen <listen>` on the test's schema with `env`, and waits for its
    /// address.
    pub async fn start(
        schema: &str,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Console {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| crate::DEFAULT_DATABASE_URL.to_owned());
        Self::start_on(&url, schema, listen, extra, env).await
    }

    /// [`Console::start`] on the database at `url`.
    pub async fn start_on(
        url: &str,
        schema: &str,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Console {
        use std::io::BufRead as _;
        let mut command = Command::new(crate::process::binary("saga"));
        command
            .args([
                "--schema",
                schema,
                "--reconnect-for",
                "10s",
                "ui",
                "--listen",
                listen,
            ])
            .args(extra)
            .env("DATABASE_URL", url)
            .env_remove("SAGA_UI_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start saga ui");
        let stderr = child.stderr.take().expect("its stderr");
        // Stopped on drop, even if it never says where it serves.
        let mut console = Console {
            child,
            addr: String::new(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("serving http://").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_owned());
                }
                eprintln!("saga ui: {line}");
            }
        });
        console.addr = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("saga ui to say where it serves")
            .expect("saga ui to start");
        console
    }

    /// `http://host:port`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
