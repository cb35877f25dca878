//! The crate's error type.

use crate::state::ReplayError;
use crate::transport::TransportError;

/// What can go wrong in saga-core outside a step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[source] DatabaseError),
    /// Applying the migrations failed.
    #[error("migration: {0}")]
    Migrate(#[source] MigrateError),
    /// A saga's log disagrees with its definition.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The message broker failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A value could not be turned into JSON or back.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    /// The saga's definition is not registered in this process.
    #[error("saga `{name}` v{version} is not registered in this process")]
    UnknownDefinition {
        /// The definition's name.
        name: String,
        /// The definition's version.
        version: u32,
    },
    /// No saga has this id.
    #[error("no saga {0}")]
    UnknownSaga(uuid::Uuid),
    /// A cancel was refused.
    #[error("saga {saga_id} cannot be cancelled: {why}")]
    CancelRefused {
        /// The saga.
        saga_id: uuid::Uuid,
        /// Why.
        why: String,
    },
    /// An operator's action was refused.
    #[error("saga {saga_id}: cannot {action}: {why}")]
    ActionRefused {
        /// The saga.
        saga_id: uuid::Uuid,
        /// The action.
        action: &'static str,
        /// Why.
        why: String,
    },
    /// No orchestrator answered a request in time; it stays queued.
    #[error(
        "saga {saga_id}: no orchestrator answered the {what} within {waited:?}; it stays queued"
    )]
    NotAnswered {
        /// The saga.
        saga_id: uuid::Uuid,
        /// What was asked.
        what: &'static str,
        /// How long the caller waited.
        waited: std::time::Duration,
    },
    /// A saga had not ended when the wait for it ran out (see
    /// [`Client::outcome`](crate::Client::outcome)); it goes on.
    #[error("saga {saga_id} is still {status} after {waited:?}")]
    StillRunning {
        /// The saga.
        saga_id: uuid::Uuid,
        /// Its status when the wait ran out.
        status: crate::state::SagaStatus,
        /// How long the caller waited.
        waited: std::time::Duration,
    },
    /// A payload could not be encrypted or decrypted (see [`codec`](crate::codec)).
    #[error("payload: {0}")]
    Payload(#[from] crate::codec::CodecError),
    /// Invalid configuration, naming the setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A loop of the orchestrator ended before it was asked to stop (a panic, a stream that
    /// closed); the orchestrator stopped its other loops and returned.
    #[error("{0} ended before shutdown")]
    LoopEnded(String),
    /// In-flight work did not finish within the grace period after the shutdown signal (see
    /// `ops::Ops::run_until_shutdown`, feature `http`).
    #[error("in-flight work did not finish within the grace period of {grace:?}")]
    ShutdownTimedOut {
        /// The grace period.
        grace: std::time::Duration,
    },
    /// One error for several calls served together (starts written in one statement, say).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
    /// Something saga rules out happened anyway: a row changed around the store while it was
    /// locked, a value in its tables it never writes, a task that stopped before answering
    /// (its runtime shutting down). Treated as transient, so the work is tried again; if it
    /// lasts, it is a bug to report, or a hand edit of the tables.
    #[error("internal: {0}")]
    Internal(String),
}

/// A failed database call: the driver's error, with its message and sources.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DatabaseError(sqlx::Error);

impl DatabaseError {
    /// The SQLSTATE the server answered with, if the server answered (not for a lost
    /// connection or a pool timeout).
    pub fn code(&self) -> Option<String> {
        match &self.0 {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// Whether the server answered with an error about the statement itself (a constraint,
    /// a value it cannot hold), as opposed to not answering at all.
    pub fn is_server_answer(&self) -> bool {
        matches!(self.0, sqlx::Error::Database(_))
    }

    /// Whether the database could not be reached: no connection, a lost one, or a server
    /// shutting down or not yet accepting connections.
    fn is_unreachable(&self) -> bool {
        Self::unreachable(&self.0)
    }

    fn unreachable(error: &sqlx::Error) -> bool {
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => db.code().as_deref().is_some_and(|code| {
                code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
            }),
            _ => false,
        }
    }

    /// Whether trying again may succeed: the database out of reach, or an answer that
    /// passes (see [`transient_sqlstate`]).
    fn is_transient(&self) -> bool {
        self.is_unreachable() || self.code().as_deref().is_some_and(transient_sqlstate)
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(DatabaseError(e))
    }
}

/// `error` and its sources on one line, `what: why: cause`, each source left out when the text
/// before it says it already (sqlx and the errors that wrap it repeat their source's message),
/// for programs that report an error on one line.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Whether `error`, or one of its sources, says the database could not be reached or is
/// restarting (no connection, a lost one, a server shutting down or starting up), as opposed
/// to an answer that will not change (a wrong password, no such database): what a program
/// that rides out a database restart tries again.
pub fn is_out_of_reach(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        let unreachable = e
            .downcast_ref::<Error>()
            .is_some_and(|e| matches!(e, Error::Database(db) if db.is_transient()))
            || e.downcast_ref::<DatabaseError>()
                .is_some_and(DatabaseError::is_transient)
            || e.downcast_ref::<sqlx::Error>()
                .is_some_and(DatabaseError::unreachable);
        if unreachable {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Whether `error`, or one of its sources, is a write to a pipe whose reader has gone (`saga
/// list | head`): programs end quietly on it.
pub fn is_closed_pipe(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A failed migration of the saga tables, with its sources.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct MigrateError(sqlx::migrate::MigrateError);

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Migrate(MigrateError(e))
    }
}

impl Error {
    /// Whether trying again later may succeed (a lost connection, a deadlock, a broker hiccup).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => e.is_transient(),
            Error::Transport(_) | Error::Internal(_) => true,
            Error::Shared(e) => e.is_transient(),
            _ => false,
        }
    }
}

impl Error {
    /// Whether a payload is sealed under a key this process is not given (yet: a rotation
    /// rolling out). Only its own item waits for it; the others of its batch go on.
    pub(crate) fn is_missing_key(&self) -> bool {
        matches!(
            self,
            Error::Payload(crate::codec::CodecError::UnknownKey { .. })
        )
    }

    /// Whether the database or the broker could not be reached at all (as opposed to an
    /// answer about the statement or message at hand): the next item of a batch would fail
    /// the same way.
    pub(crate) fn is_unreachable(&self) -> bool {
        match self {
            Error::Database(e) => e.is_unreachable(),
            Error::Transport(_) => true,
            Error::Shared(e) => e.is_unreachable(),
            _ => false,
        }
    }
}

/// Whether an SQLSTATE names a condition that passes: a lost connection (class 08), a
/// rolled-back transaction (40: serialization failure, deadlock), insufficient resources (53:
/// disk full, out of memory, too many connections), an operator's intervention (57014 a
/// cancelled statement or statement timeout, 57P01-57P03 a shutdown or a database starting),
/// a lock not granted in time (55P03) or an object in use (55006), a read-only transaction
/// (25006: a failover in progress, the old primary now a replica), or an I/O error (58030).
fn transient_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53"))
        || matches!(
            code,
            "57014" | "57P01" | "57P02" | "57P03" | "55P03" | "55006" | "25006" | "58030"
        )
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// An error that repeats its source's message, as sqlx's do.
    #[derive(Debug)]
    struct Wrapping(&'static str, Option<Box<Wrapping>>);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match &self.1 {
                Some(inner) => write!(f, "{}: {inner}", self.0),
                None => f.write_str(self.0),
            }
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn a_report_says_each_cause_once() {
        let missing = Wrapping("relation \"saga.instances\" does not exist", None);
        let sqlx = Wrapping("error returned from database", Some(Box::new(missing)));
        let ours = Wrapping("database", Some(Box::new(sqlx)));
        assert_eq!(
            report(&ours),
            "database: error returned from database: relation \"saga.instances\" does not exist"
        );
        let io = std::io::Error::other("connection refused");
        assert_eq!(report(&io), "connection refused");
    }

    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn database(code: &'static str) -> Error {
        Error::from(sqlx::Error::Database(Box::new(Coded(code))))
    }

    /// A caller's error around ours, as `anyhow`'s context is.
    #[derive(Debug, thiserror::Error)]
    #[error("connecting")]
    struct Context(#[source] Box<dyn std::error::Error + Send + Sync>);

    #[test]
    fn out_of_reach_is_found_among_the_causes() {
        let io = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        // A driver's error, ours, and either under a context of the caller's.
        assert!(is_out_of_reach(&io()));
        assert!(is_out_of_reach(&Error::from(io())));
        assert!(is_out_of_reach(&Context(Box::new(io()))));
        assert!(is_out_of_reach(&database("57P03")));
        // An answer that will not change is not.
        assert!(!is_out_of_reach(&database("28P01")));
        assert!(!is_out_of_reach(&Context(Box::new(database("3D000")))));
        assert!(!is_out_of_reach(&Error::Internal("a bug".into())));
    }

    #[test]
    fn only_a_database_out_of_reach_is_unreachable() {
        assert!(Error::from(sqlx::Error::PoolTimedOut).is_unreachable());
        assert!(database("08006").is_unreachable());
        assert!(database("57P01").is_unreachable());
        // Answers about one statement, or one row, are not.
        assert!(!database("40P01").is_unreachable());
        assert!(!database("23505").is_unreachable());
        assert!(!Error::from(sqlx::Error::RowNotFound).is_unreachable());
        assert!(!Error::from(sqlx::Error::ColumnNotFound("x".into())).is_unreachable());
    }

    #[test]
    fn passing_database_conditions_are_transient_and_bugs_are_not() {
        for code in [
            "53300", "57014", "55P03", "25006", "53100", "53200", "40001", "40P01", "57P01",
            "57P02", "57P03", "08006", "08003", "08001", "55006", "58030",
        ] {
            assert!(database(code).is_transient(), "{code}");
        }
        for code in ["23505", "42P01", "42601", "22P02", "57P04", "XX000"] {
            assert!(!database(code).is_transient(), "{code}");
        }
    }
}
