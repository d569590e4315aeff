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

/// The wire enums as operators read them: `COMPLETED` for `SAGA_STATE_COMPLETED`.
/// One place, so sagactl, the console and the tests print the same names.
pub mod names {
    use crate::pb;

    /// A `SagaState` value's short name (`UNKNOWN` for a value this build does not know).
    #[must_use]
    pub fn state(v: i32) -> &'static str {
        pb::SagaState::try_from(v)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN")
            .trim_start_matches("SAGA_STATE_")
    }

    /// A `StepStatus` value's short name.
    #[must_use]
    pub fn step_status(v: i32) -> &'static str {
        pb::StepStatus::try_from(v)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN")
            .trim_start_matches("STEP_STATUS_")
    }

    /// Whether a `SagaState` value is terminal: COMPLETED, COMPENSATED or FAILED.
    #[must_use]
    pub fn is_terminal(state: i32) -> bool {
        matches!(
            pb::SagaState::try_from(state),
            Ok(pb::SagaState::Completed | pb::SagaState::Compensated | pb::SagaState::Failed)
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn names_are_short_and_unknown_values_named_so() {
            assert_eq!(state(pb::SagaState::Compensated as i32), "COMPENSATED");
            assert_eq!(step_status(pb::StepStatus::Succeeded as i32), "SUCCEEDED");
            assert_eq!(state(999), "UNKNOWN");
            assert!(is_terminal(pb::SagaState::Failed as i32));
            assert!(!is_terminal(pb::SagaState::Running as i32));
        }
    }
}
