//! The RabbitMQ transport of saga, on lapin.
//!
//! Topology (all names from a prefix, default `saga`):
//!
//! - exchange `saga.commands` (direct): routing key = service; queue `saga.service.NAME` per
//!   participant service;
//! - exchange `saga.results` (direct): the orchestrators' shared queue `saga.results`;
//! - exchange `saga.dead` (direct): queue `saga.dead.QUEUE` per source queue, routing key =
//!   the source queue's name. Messages saga rejects carry `x-saga-reject-reason`.
//!
//! Queues are durable quorum queues (classic as an option) with a delivery limit, so a message
//! that keeps failing ends in its dead-letter queue instead of looping.

mod config;
mod consumer;
mod convert;
mod link;
mod publisher;
mod returns;
mod topology;
mod transport;

pub use config::{AmqpConfig, ConfigError, QueueType, redact};
pub use transport::AmqpTransport;
