//! The saga coordinator.
pub mod definition;
pub mod engine;
