//! Support for saga's end-to-end tests: a fresh schema per test on the real PostgreSQL, and a
//! small order saga whose participants record their effects through the inbox.

pub mod amqp;
pub mod browser;
pub mod console;
pub mod harness;
pub mod invariants;
pub mod logs;
pub mod order;
pub mod pg_node;
pub mod process;
pub mod rabbit_node;

use std::time::Duration;

use saga_core::PgStore;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

/// The database the tests use unless `DATABASE_URL` says otherwise.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A schema of its own on the real PostgreSQL, for one test.
#[derive(Debug)]
pub struct TestDb {
    /// A pool on the test database.
    pub pool: PgPool,
    /// The test's own schema, holding the saga tables and the test's tables.
    pub schema: String,
}

/// Connects to the test database and creates a fresh schema with the saga tables.
///
/// Fails, never skips, when PostgreSQL is not reachable.
pub async fn database() -> TestDb {
    let pool = admin_pool().await;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let db = TestDb { pool, schema };
    db.store().migrate().await.expect("migrations apply");
    db
}

/// A pool on `DATABASE_URL`; fails, never skips, when PostgreSQL is not reachable.
pub async fn admin_pool() -> PgPool {
    init_tracing();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at DATABASE_URL ({e}). Start it with \
                 `pg_ctlcluster --skip-systemctl-redirect 15 main start`, or run `scripts/test`, \
                 which starts it."
            )
        })
}

impl TestDb {
    /// A store in the test's schema.
    pub fn store(&self) -> PgStore {
        self.store_with_lease(PgStore::DEFAULT_OUTBOX_LEASE)
    }

    /// A store in the test's schema with a given outbox lease.
    pub fn store_with_lease(&self, lease: Duration) -> PgStore {
        PgStore::builder(self.pool.clone())
            .schema(&self.schema)
            .outbox_lease(lease)
            .build()
            .expect("valid schema name")
    }

    /// An inbox in the test's schema, migrated, for workers.
    pub async fn inbox(&self) -> saga_core::Inbox {
        let inbox = saga_core::Inbox::new(self.pool.clone(), &self.schema).expect("valid schema");
        inbox.migrate().await.expect("inbox migrates");
        inbox
    }

    /// Drops the test's schema; call it at the end of a passing test (a failing one keeps its
    /// schema for a look).
    pub async fn drop_schema(self) {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA \"{}\" CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await
        .expect("drop test schema");
        self.pool.close().await;
    }
}

/// A database of its own, for tests whose tables live in fixed schemas (the examples').
#[derive(Debug)]
pub struct FreshDatabase {
    /// Its URL.
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
    admin: PgPool,
    name: String,
}

/// Creates a database for one test.
pub async fn fresh_database() -> FreshDatabase {
    let admin = admin_pool().await;
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("create the test database");
    let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let root = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(root, _)| root);
    let url = format!("{root}/{name}");
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("connect to the test database");
    FreshDatabase {
        url,
        pool,
        admin,
        name,
    }
}

impl FreshDatabase {
    /// Checks that no session of a program (sessions with an `application_name`) outlived it,
    /// then drops the database; call it at the end of a passing test, once its processes
    /// exited.
    pub async fn drop_database(self) {
        self.pool.close().await;
        let sessions = || async {
            // The programs name their sessions (`order-saga orchestrator`, ...); the test's own
            // in-process stores do not.
            sqlx::query_as::<_, (String, String, String)>(
                "SELECT application_name, coalesce(state, ''), left(query, 80) \
                 FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> ''",
            )
            .bind(&self.name)
            .fetch_all(&self.admin)
            .await
            .expect("read pg_stat_activity")
        };
        // A backend ends a moment after its client's socket closes.
        let closed = wait_until(Duration::from_secs(10), || async {
            sessions().await.is_empty()
        })
        .await;
        assert!(closed, "database sessions leaked: {:?}", sessions().await);
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await
        .expect("drop the test database");
    }
}

/// A TCP port free on 127.0.0.1 a moment ago, for a server a test starts: drawn at random
/// below Linux's ephemeral range (32768 and up), so that no outgoing connection is handed it
/// later, while the server is down between a stop and a restart on the same port.
pub fn free_port() -> u16 {
    const PORTS: std::ops::Range<u16> = 20_000..32_000;
    for _ in 0..1000 {
        let draw = u16::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..2].try_into().unwrap());
        let port = PORTS.start + draw % (PORTS.end - PORTS.start);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS:?} on 127.0.0.1")
}

/// Logs to the test output, filtered by `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Checks `condition` until it holds or `timeout` passes; returns whether it held.
///
/// For conditions only visible in the database (a saga's status), which send no event.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

/// The getting-started guide's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/GETTING-STARTED.md")]
struct GettingStartedDoctests;

/// The data-protection guide's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/DATA-PROTECTION.md")]
struct DataProtectionDoctests;
