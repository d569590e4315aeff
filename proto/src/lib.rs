//! Wire contracts shared by every process of the saga engine.
//!
//! - [`pb`]: the `saga.v1` protobuf messages and the tonic client/server for
//!   `SagaService`, generated at build time by protox (no system `protoc`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC reflection.
//! - [`wire`]: the JSON envelopes the coordinator and the participants exchange
//!   over NATS request-reply (DESIGN.md, "Messages on NATS").
//! - [`nats`]: the NATS security settings (credentials, TLS) every binary
//!   takes, and how they become connection options.
//!
//! This crate holds types and settings only: no policy, and no I/O beyond
//! reading a NATS credentials file when asked to.
#![deny(unreachable_pub)]
#![warn(missing_docs)]

/// Generated `saga.v1` protobuf messages and the tonic `SagaService` client and server.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("saga.v1");
}

/// Encoded `FileDescriptorSet` of `saga.v1` (with its imports), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/saga_descriptor.bin"));

pub mod nats;
pub mod wire;
