//! Example sagas for saga, as users would write them, each runnable as real microservices.
//!
//! - [`order`]: reserve inventory (release) -> charge payment (refund) -> create shipment (the
//!   pivot). Binary `order-saga`.
//! - [`payment`]: fraud check -> authorize (void) -> ledger entry (reverse) -> capture (the
//!   pivot). Binary `payment-saga`.
//! - [`travel`]: book flight (cancel) -> book hotel (cancel) -> rent car (cancel) -> confirm
//!   (the pivot). Binary `travel-saga`.
//! - [`expense`]: reserve budget (release) -> wait for the `approval` signal (three days) ->
//!   pay (the pivot), with a seven-day deadline. Binary `expense-saga`.
//!
//! Every binary has the same subcommands ([`cli`]): `demo`, `migrate`, `orchestrator`,
//! `service NAME`, `start`, `wait`, `status`.

pub mod baseline;
pub mod bench;
pub mod bench_processes;
pub mod cli;
mod connections;
pub mod cpu;
pub mod demo;
pub mod example;
pub mod expense;
pub mod order;
pub mod participant;
pub mod payment;
mod progress;
pub mod telemetry;
pub mod travel;

pub use example::{CommandSpec, Example, Receipt};
