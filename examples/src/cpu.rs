//! Where a bench run's CPU time goes on this machine: the bench process itself, RabbitMQ
//! (`beam.smp`) and PostgreSQL (`postgres`), read from `/proc`. A service on another machine
//! (or a system without `/proc`) is left out.

use std::fmt::Write as _;
use std::path::Path;

/// Linux reports process times in clock ticks of 1/100 s (`USER_HZ`) on x86 and ARM.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU time (user and system) spent so far, in µs, by each part; `None` where it cannot be
/// read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTimes {
    /// The bench process: orchestrator, participants and load generator.
    pub bench: Option<f64>,
    /// Every `beam.smp` process (a RabbitMQ node).
    pub broker: Option<f64>,
    /// Every `postgres` process, with the children they reaped (backends that ended).
    pub database: Option<f64>,
}

impl CpuTimes {
    /// Reads the times now.
    pub fn now() -> Self {
        Self {
            bench: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .map(|t| t.own()),
            broker: named("beam.smp"),
            database: named("postgres"),
        }
    }

    /// The time each part spent between `before` and `self`, per saga of `sagas`, as one line
    /// (`cpu a saga: this process 925 µs, RabbitMQ 1115 µs, PostgreSQL 585 µs`); `None` if
    /// not even this process's time could be read.
    pub fn per_saga_since(&self, before: &CpuTimes, sagas: u64) -> Option<String> {
        let per_saga = |after: Option<f64>, before: Option<f64>| {
            Some((after? - before?).max(0.0) / sagas.max(1) as f64)
        };
        let mut line = format!(
            "cpu a saga: this process {:.0} µs",
            per_saga(self.bench, before.bench)?
        );
        for (name, after, before) in [
            ("RabbitMQ", self.broker, before.broker),
            ("PostgreSQL", self.database, before.database),
        ] {
            if let Some(us) = per_saga(after, before) {
                let _ = write!(line, ", {name} {us:.0} µs");
            }
        }
        Some(line)
    }
}

/// The four times of a `/proc/PID/stat` line, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticks {
    user: u64,
    system: u64,
    children_user: u64,
    children_system: u64,
}

impl Ticks {
    fn own(self) -> f64 {
        (self.user + self.system) as f64 / TICKS_PER_SEC * 1e6
    }

    fn with_children(self) -> f64 {
        (self.user + self.system + self.children_user + self.children_system) as f64 / TICKS_PER_SEC
            * 1e6
    }
}

/// Fields 14-17 of a `/proc/PID/stat` line; the command name (field 2, in parentheses) may
/// hold spaces and parentheses itself, so fields are counted from its last `)`.
fn parse_stat(stat: &str) -> Option<Ticks> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse().ok();
    Some(Ticks {
        user: field(14)?,
        system: field(15)?,
        children_user: field(16)?,
        children_system: field(17)?,
    })
}

/// The CPU time of every process whose command name is `name`, with the children each has
/// reaped; `None` if there is none.
fn named(name: &str) -> Option<f64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let dir = entry.path();
        if read_trimmed(&dir.join("comm")).as_deref() != Some(name) {
            continue;
        }
        if let Some(ticks) = read_trimmed(&dir.join("stat")).and_then(|s| parse_stat(&s)) {
            *total.get_or_insert(0.0) += ticks.with_children();
        }
    }
    total
}

/// The CPU time (user and system) process `pid` spent so far, in µs.
pub fn process_us(pid: u32) -> Option<f64> {
    read_trimmed(Path::new(&format!("/proc/{pid}/stat")))
        .and_then(|s| parse_stat(&s))
        .map(Ticks::own)
}

/// The peak resident memory of process `pid`, in MiB (0 if it cannot be read).
pub fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let stat = "4242 (tokio (rt) x) S 1 2 3 4 5 6 7 8 9 10 250 40 7 3 20 0 9 0 100";
        assert_eq!(
            parse_stat(stat),
            Some(Ticks {
                user: 250,
                system: 40,
                children_user: 7,
                children_system: 3,
            })
        );
        assert_eq!(parse_stat("4242 (short) S 1 2"), None);
    }

    #[test]
    fn times_per_saga_leave_out_what_could_not_be_read() {
        let before = CpuTimes {
            bench: Some(1_000_000.0),
            broker: Some(5_000_000.0),
            database: None,
        };
        let after = CpuTimes {
            bench: Some(2_000_000.0),
            broker: Some(7_000_000.0),
            database: Some(1.0),
        };
        assert_eq!(
            after.per_saga_since(&before, 1000).as_deref(),
            Some("cpu a saga: this process 1000 µs, RabbitMQ 2000 µs")
        );
        let unreadable = CpuTimes {
            bench: None,
            ..after
        };
        assert_eq!(unreadable.per_saga_since(&before, 1000), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read_and_an_absent_program_is_none() {
        let now = CpuTimes::now();
        assert!(now.bench.is_some(), "{now:?}");
        assert_eq!(named("no-such-program-here"), None);
    }
}
