//! The crate's error type.

use crate::state::ReplayError;
use crate::transport::TransportError;

/// What can go wrong in saga-core outside a step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
    /// Invalid configuration, naming the setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// One error for several calls served together (starts written in one statement, say).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
}

impl Error {
    /// Whether trying again later may succeed (a lost connection, a deadlock, a broker hiccup).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => {
                    // serialization failure, deadlock, admin shutdown, cannot connect now
                    matches!(
                        db.code().as_deref(),
                        Some("40001" | "40P01" | "57P01" | "57P03" | "08006" | "08003")
                    )
                }
                _ => false,
            },
            Error::Transport(_) => true,
            Error::Shared(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
