//! The saga engine's gRPC contract: the `saga.v1` protobuf messages and the
//! tonic client and server for `SagaService`, generated at build time by
//! protox (no system `protoc`), and the encoded descriptors that gRPC
//! reflection serves.
//!
//! The NATS envelopes live in `saga-wire` (serde only, so participants need
//! no gRPC code) and the NATS connection settings in `saga-nats`. This crate
//! holds types only: no policy, no I/O.
#![deny(unreachable_pub)]
#![warn(missing_docs)]

/// Generated `saga.v1` protobuf messages and the tonic `SagaService` client and server.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("saga.v1");
}

/// Encoded `FileDescriptorSet` of `saga.v1` (with its imports), for gRPC reflection.
pub static FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/saga_descriptor.bin"));
