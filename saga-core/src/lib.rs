//! saga-core
#![doc = "Durable, orchestrated sagas."]

pub mod client;
pub mod decide;
pub mod definition;
pub mod error;
pub mod event;
mod inbox;
pub mod message;
pub mod orchestrator;
pub mod registry;
mod relay;
mod schema;
pub mod state;
pub mod store;
pub mod transport;
pub mod worker;

pub use client::Client;
pub use decide::{Decision, Effect, Env, Input, Timer, Verdict, decide};
pub use definition::{
    Definition, DefinitionError, InputError, RetryPolicy, SagaBuilder, SagaDefinition, Step,
    StepBuilder, StepContext, StepKind,
};
pub use error::{Error, Result};
pub use event::{Direction, Event, RecordedEvent};
pub use inbox::Inbox;
pub use message::{Command, Destination, Envelope, Message, Outcome, Reply};
pub use orchestrator::{Orchestrator, OrchestratorConfig};
pub use registry::Registry;
pub use state::{ReplayError, SagaState, SagaStatus, replay};
pub use store::{MemoryStore, PgStore, Store};
pub use transport::{Delivery, InProcessTransport, Transport};
pub use worker::{CommandContext, Handler, StepError, StepResultExt, Worker};
