//! Step contracts: a service and each of its commands declared once, as types, and used by
//! both sides, so that the saga definition and the worker cannot disagree.
//!
//! A [`Service`] names the queue its worker reads; a [`Contract`] is one command of it with
//! its input and output types. The definition takes the contract
//! ([`StepBuilder::call`](crate::StepBuilder::call), whose compensation reads the action's
//! output as the contract's output type), and so does the worker
//! ([`WorkerBuilder::serve`](crate::worker::WorkerBuilder::serve), which takes only a handler
//! of the contract's input and output, on the contract's service). A mismatched type or a
//! contract served by another service does not compile. Services written in other languages
//! keep the string-based API ([`StepBuilder::action`](crate::StepBuilder::action),
//! [`WorkerBuilder::handler`](crate::worker::WorkerBuilder::handler)).
//!
//! ```
//! use saga_core::{contract, service};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! pub struct Receipt { pub charge_id: String }
//!
//! service!(
//!     /// Takes payments.
//!     pub Payment = "payment"
//! );
//! contract!(
//!     /// Charges an amount in cents.
//!     pub Charge: Payment, "charge", u64 => Receipt
//! );
//! contract!(
//!     /// Refunds a charge.
//!     pub Refund: Payment, "refund", String => ()
//! );
//! ```
//!
//! A compensation that reads the action's output as another type does not compile:
//!
//! ```compile_fail,E0631
//! # use saga_core::{contract, service, SagaDefinition};
//! # #[derive(serde::Serialize, serde::Deserialize)] pub struct Receipt { pub charge_id: String }
//! # service!(pub Payment = "payment");
//! # contract!(pub Charge: Payment, "charge", u64 => Receipt);
//! # contract!(pub Refund: Payment, "refund", String => ());
//! SagaDefinition::<u64>::builder("order", 1).step("charge", |s| {
//!     s.call::<Charge>(|ctx| *ctx.input())
//!         // Charge returns a Receipt, not a String:
//!         .compensate::<Refund>(|_, charge_id: String| charge_id)
//! });
//! ```
//!
//! Nor does a handler whose output is not the contract's, or a contract served by a worker of
//! another service:
//!
//! ```compile_fail,E0271
//! # use saga_core::{contract, service, Inbox, Worker};
//! # use saga_core::worker::{handler_fn, CommandContext, StepError};
//! # #[derive(serde::Serialize, serde::Deserialize)] pub struct Receipt { pub charge_id: String }
//! # service!(pub Payment = "payment");
//! # contract!(pub Charge: Payment, "charge", u64 => Receipt);
//! # fn worker(inbox: Inbox) {
//! Worker::for_service::<Payment>(inbox).serve::<Charge>(handler_fn(
//!     // returns a String, not a Receipt:
//!     |amount: u64, _: CommandContext| async move { Ok::<_, StepError>(format!("ch-{amount}")) },
//! ));
//! # }
//! ```
//!
//! ```compile_fail,E0271
//! # use saga_core::{contract, service, Inbox, Worker};
//! # use saga_core::worker::{handler_fn, CommandContext, StepError};
//! # #[derive(serde::Serialize, serde::Deserialize)] pub struct Receipt { pub charge_id: String }
//! # service!(pub Payment = "payment");
//! # service!(pub Inventory = "inventory");
//! # contract!(pub Charge: Payment, "charge", u64 => Receipt);
//! # fn worker(inbox: Inbox) {
//! // Charge is a command of Payment, not of Inventory:
//! Worker::for_service::<Inventory>(inbox).serve::<Charge>(handler_fn(
//!     |amount: u64, _: CommandContext| async move {
//!         Ok::<_, StepError>(Receipt { charge_id: format!("ch-{amount}") })
//!     },
//! ));
//! # }
//! ```
//!
//! The same, right, compiles:
//!
//! ```
//! # use saga_core::{contract, service, Inbox, SagaDefinition, Worker};
//! # use saga_core::worker::{handler_fn, CommandContext, StepError};
//! # #[derive(serde::Serialize, serde::Deserialize)] pub struct Receipt { pub charge_id: String }
//! # service!(pub Payment = "payment");
//! # contract!(pub Charge: Payment, "charge", u64 => Receipt);
//! # contract!(pub Refund: Payment, "refund", String => ());
//! let saga = SagaDefinition::<u64>::builder("order", 1)
//!     .step("charge", |s| {
//!         s.call::<Charge>(|ctx| *ctx.input())
//!             .compensate::<Refund>(|_, receipt: Receipt| receipt.charge_id)
//!     })
//!     .build()
//!     .unwrap();
//! # fn worker(inbox: Inbox) {
//! Worker::for_service::<Payment>(inbox)
//!     .serve::<Charge>(handler_fn(|amount: u64, _: CommandContext| async move {
//!         Ok::<_, StepError>(Receipt { charge_id: format!("ch-{amount}") })
//!     }))
//!     .serve::<Refund>(handler_fn(|_: String, _: CommandContext| async move {
//!         Ok::<_, StepError>(())
//!     }));
//! # }
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A service that runs steps; [`NAME`](Self::NAME) is the routing key of its queue. Declare
/// one with [`service!`](crate::service!).
pub trait Service: 'static {
    /// The service's name, as the worker and the definition route commands by it.
    const NAME: &'static str;
}

/// One command of a [`Service`], with its input and output types. Declare one with
/// [`contract!`](crate::contract!).
pub trait Contract: 'static {
    /// The service that runs it.
    type Service: Service;
    /// The command's name within its service.
    const COMMAND: &'static str;
    /// What the command takes.
    type Input: Serialize + DeserializeOwned + Send + 'static;
    /// What it returns (the step's output).
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

/// Declares a [`Service`]: `service!(pub Payment = "payment");`, a unit struct that derives
/// `Debug, Clone, Copy, PartialEq, Eq` (add other attributes, not these derives).
#[macro_export]
macro_rules! service {
    ($(#[$meta:meta])* $vis:vis $name:ident = $service:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis struct $name;

        const _: () = assert!(!$service.is_empty(), "a service's name is not empty");

        impl $crate::contract::Service for $name {
            const NAME: &'static str = $service;
        }
    };
}

/// Declares a [`Contract`]: `contract!(pub Charge: Payment, "charge", u64 => Receipt);`,
/// the command `charge` of the service `Payment`, taking a `u64` and returning a `Receipt`;
/// a unit struct that derives `Debug, Clone, Copy, PartialEq, Eq`.
#[macro_export]
macro_rules! contract {
    ($(#[$meta:meta])* $vis:vis $name:ident : $service:ty, $command:literal, $input:ty => $output:ty) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis struct $name;

        const _: () = assert!(!$command.is_empty(), "a command's name is not empty");

        impl $crate::contract::Contract for $name {
            type Service = $service;
            const COMMAND: &'static str = $command;
            type Input = $input;
            type Output = $output;
        }
    };
}
