//! Tests of the pure core through its internals: canned histories (exact events for known
//! inputs), unknown outcomes and fences, operators, and model-based property tests. They use
//! the crate as its users name it (`saga_core::...`), with the internals (`decide`, the
//! state's fields) visible to them.

mod canned_histories;
#[cfg(feature = "testing")]
mod contracts;
mod fencing;
mod groups;
mod operators;
mod properties;
mod support;
