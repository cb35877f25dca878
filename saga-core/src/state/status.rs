//! Where a saga stands: [`SagaStatus`].

use serde::{Deserialize, Serialize};

use super::SagaState;

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SagaStatus {
    /// Going forward.
    Running,
    /// A step failed for good; compensations are running.
    Compensating,
    /// Every step succeeded. Terminal.
    Completed,
    /// Every needed compensation succeeded. Terminal.
    Compensated,
    /// Needs an operator: a compensation (or a step after the pivot) failed for good, a fence
    /// went unanswered, a pivot's outcome cannot be known, or the definition's code failed.
    Stuck,
    /// Cancelled, and every needed compensation succeeded. Terminal.
    Cancelled,
}

impl SagaStatus {
    /// Why the saga is stuck, fences a step, or compensates, if it does: what operators see
    /// beside the status (`fencing step charge: attempt 3 timed out after 500ms`).
    pub fn reason(state: &SagaState) -> Option<String> {
        if let Some(reason) = &state.stuck_reason {
            return Some(reason.clone());
        }
        if let Some(f) = state.fencing.values().next() {
            return Some(format!("fencing step {}: {}", f.name, f.reason));
        }
        state.failure.as_ref().map(|(_, reason)| reason.clone())
    }

    /// Every status, in a stable order.
    pub const ALL: [SagaStatus; 6] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Stuck,
        SagaStatus::Cancelled,
    ];

    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Stuck => "stuck",
            SagaStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the saga has finished (Completed, Compensated or Cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Cancelled
        )
    }

    /// Whether the engine still acts on the saga by itself.
    pub fn is_active(self) -> bool {
        matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }
}

impl std::fmt::Display for SagaStatus {
    /// The status's name; honours width and alignment (`{:<12}`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for SagaStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SagaStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown saga status `{s}`"))
    }
}
