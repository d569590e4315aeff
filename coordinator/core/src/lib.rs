//! The saga engine's pure core: what a saga is and how it moves, with no
//! async runtime, store, network or clock in it (time comes in as a value).
//!
//! - [`condition`]: a step's `when:` condition, a CEL expression checked at
//!   load against the names it may read and evaluated against the order and
//!   the earlier steps' outputs;
//! - [`definition`]: YAML saga definitions parsed and validated into typed,
//!   immutable [`definition::SagaDefinition`]s (errors with file:line:column);
//! - [`engine`]: the state machine: `create`, `transition` → the new saga and
//!   the commands it implies;
//! - [`plan`]: per failure point, what compensation would run (`sagactl plan`),
//!   worked out from a definition and tested against the engine.
//!
//! The coordinator persists what the engine decides and sends its commands;
//! `sagactl` uses the definitions and the plan offline.
#![deny(unreachable_pub)]

pub mod condition;
pub mod definition;
pub mod engine;
pub mod plan;
