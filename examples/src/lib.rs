//! Example sagas for saga, as users would write them.
//!
//! - [`order`]: reserve inventory (release) -> charge payment (refund) -> create shipment
//!   (the pivot). The binary `order-saga` runs it.

pub mod order;
pub mod timeline;
