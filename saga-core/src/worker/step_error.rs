//! The error a step handler returns.

use std::fmt;

/// Why a step attempt failed, and whether another attempt may help.
///
/// Retryable unless marked terminal. `?` on any error converts it into a retryable failure; mark
/// business failures (a declined card) terminal with [`StepError::terminal`] or
/// [`StepResultExt::terminal`], which starts compensation.
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself, so that every error
/// converts into it.
#[derive(Clone, PartialEq, Eq)]
pub struct StepError {
    message: String,
    retryable: bool,
}

impl StepError {
    /// A failure that another attempt may fix (a timeout, a lost connection).
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: true,
        }
    }

    /// A failure that no retry can fix; the saga compensates.
    pub fn terminal(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: false,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable {
            "retryable"
        } else {
            "terminal"
        };
        write!(f, "StepError({kind}: {})", self.message)
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(error: E) -> Self {
        Self::retryable(error)
    }
}

/// Marks the error of a `Result` as retryable or terminal.
///
/// ```
/// use saga_core::worker::{StepError, StepResultExt};
///
/// fn charge(balance: u64, amount: u64) -> Result<u64, StepError> {
///     let left = balance.checked_sub(amount).ok_or("insufficient funds").terminal()?;
///     Ok(left)
/// }
/// assert!(!charge(1, 2).unwrap_err().is_retryable());
/// ```
pub trait StepResultExt<T> {
    /// A failure another attempt may fix.
    fn retryable(self) -> Result<T, StepError>;
    /// A failure no retry can fix.
    fn terminal(self) -> Result<T, StepError>;
}

impl<T, E: fmt::Display> StepResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, StepError> {
        self.map_err(StepError::retryable)
    }

    fn terminal(self) -> Result<T, StepError> {
        self.map_err(StepError::terminal)
    }
}
