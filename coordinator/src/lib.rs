//! The saga coordinator.
pub mod definition;
pub mod engine;
pub mod store;
