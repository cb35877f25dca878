//! Durable, orchestrated sagas: the engine.
//!
//! A saga is a named, versioned list of steps; each step sends a command to a participant
//! service and may have a compensation that undoes it. The [`Orchestrator`] appends every
//! transition to an event log (the [`Store`]) in the same transaction as the commands it sends,
//! publishes them through a [`Transport`], applies the participants' results, and replays the
//! log ([`replay`], then a pure decision) to go forward or, after a step failed for good, to compensate
//! the completed steps in reverse order. Participants run step handlers in a [`Worker`], whose
//! [`Inbox`] applies each effect once and lets the orchestrator *fence* a step whose outcome
//! it does not know (a timeout, a lost answer) before it decides.
//!
//! # Quick start
//!
//! ```no_run
//! use std::sync::Arc;
//! use saga_core::worker::{handler_fn, StepError};
//! use saga_core::{Client, CommandContext, InProcessTransport, MemoryStore, Orchestrator, SagaDefinition, Worker};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let saga = SagaDefinition::<u64>::builder("order", 1)
//!     .step("charge", |s| {
//!         s.action("payment", "charge", |ctx| Ok(*ctx.input()))
//!             .compensation("payment", "refund", |ctx| Ok(*ctx.input()))
//!     })
//!     .step("ship", |s| s.pivot().action("shipping", "ship", |ctx| Ok(*ctx.input())))
//!     .build()?;
//!
//! // In memory here; `PgStore`, saga-amqp's transport and workers with an `Inbox` in production.
//! let store = Arc::new(MemoryStore::new());
//! let transport = Arc::new(InProcessTransport::new());
//! let shutdown = CancellationToken::new();
//! let ok = |n: u64, _: CommandContext| async move { Ok::<_, StepError>(n) };
//! let payment = Worker::at_least_once("payment").handler("charge", handler_fn(ok)).handler("refund", handler_fn(ok)).build();
//! let shipping = Worker::at_least_once("shipping").handler("ship", handler_fn(ok)).build();
//! tokio::spawn(payment.run(transport.clone(), shutdown.clone()));
//! tokio::spawn(shipping.run(transport.clone(), shutdown.clone()));
//! tokio::spawn(Orchestrator::builder(store.clone(), transport).register(&saga).build().run(shutdown));
//!
//! let started = Client::new(store).start(&saga, &42).await?;
//! # Ok(()) }
//! ```

#[cfg(test)]
extern crate self as saga_core;

mod batch;
pub mod client;
pub mod codec;
pub mod contract;
mod decide;
pub mod definition;
pub mod error;
pub mod event;
#[cfg(feature = "http")]
pub mod http;
mod inbox;
pub mod message;
pub mod metrics;
#[cfg(feature = "http")]
pub mod ops;
pub mod orchestrator;
#[cfg(feature = "otel")]
pub mod otel;
pub mod registry;
mod relay;
mod schema;
mod state;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod timeline;
pub mod transport;
mod watch;
pub mod worker;

pub use client::{Client, SagaOutcome};
pub use codec::{PayloadCodec, Payloads};
pub use contract::{Contract, Service};
pub use decide::{Input, OperatorAction, Timer, Verdict};
pub use definition::{
    ContractStep, DEFAULT_STEP_TIMEOUT, Definition, DefinitionError, GroupBuilder, InputError,
    RetryPolicy, SagaBuilder, SagaDefinition, SignalWait, Step, StepBuilder, StepContext,
    StepGroup, StepKind, Work,
};
pub use error::{DatabaseError, Error, MigrateError, Result};
pub use event::{Direction, Event, RecordedEvent, StepAttempt};
pub use inbox::Inbox;
pub use message::{Command, Destination, Envelope, Message, Outcome, Reply};
pub use metrics::Metrics;
pub use orchestrator::{Orchestrator, OrchestratorConfig};
pub use registry::Registry;
pub use state::{ReplayError, SagaState, SagaStatus, replay};
pub use store::{MemoryStore, OutboxStore, PgHosts, PgStore, QueryStore, SagaStore, Store};
pub use transport::{Delivery, InProcessTransport, Transport};
pub use worker::{CommandContext, Handler, StepError, StepResultExt, Tx, Worker};

#[cfg(test)]
mod tests;
