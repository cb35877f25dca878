//! What an example saga provides to the shared command-line program.

use saga_core::SagaDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One command a participant service handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// The service (its queue's routing key, and its own database schema).
    pub service: &'static str,
    /// The command's name, also the `action` recorded in `example_effects`.
    pub command: &'static str,
    /// A boolean field of the command's input that, when true, makes it fail terminally.
    pub fails_when: Option<&'static str>,
}

/// The output of every example step: the id of what it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// For example `reserve-0192...`.
    pub id: String,
}

/// An example saga: its definition, its inputs, and its participants' commands.
pub trait Example: Send + Sync + 'static {
    /// The saga input.
    type Input: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The program's name, e.g. `order-saga`.
    const PROGRAM: &'static str;

    /// The commands of every participant.
    const COMMANDS: &'static [CommandSpec];

    /// The definition.
    fn definition() -> SagaDefinition<Self::Input>;

    /// The same steps one after another, for a definition with parallel groups (`bench
    /// --sequential` compares the two); `None` when it has none.
    fn sequential() -> Option<SagaDefinition<Self::Input>> {
        None
    }

    /// Earlier versions of the definition, still registered by the orchestrator so that the
    /// sagas started under them end under them.
    fn previous() -> Vec<SagaDefinition<Self::Input>> {
        Vec::new()
    }

    /// The `n`-th input of a run (from 1); `fail` makes it compensate.
    fn input(n: u64, fail: bool) -> Self::Input;

    /// The signals the `demo` sends the `n`-th saga once it started (name and payload), so
    /// that a saga that waits for one ends; `fail` as in [`input`](Self::input).
    fn demo_signals(n: u64, fail: bool) -> Vec<(&'static str, serde_json::Value)> {
        let _ = (n, fail);
        Vec::new()
    }

    /// The services, each once, in order of first use.
    fn services() -> Vec<&'static str> {
        let mut services: Vec<&'static str> = Vec::new();
        for c in Self::COMMANDS {
            if !services.contains(&c.service) {
                services.push(c.service);
            }
        }
        services
    }
}
