//! Signals for a saga's `await` steps sent over NATS (docs/protocol.md,
//! "Signals"): a request on [`SIGNAL_SUBJECT`] carrying a [`SignalRequest`],
//! answered with a [`SignalReply`]. gRPC `SignalSaga` takes the same fields.

use serde::{Deserialize, Serialize};

use crate::{check_name, check_saga_id, check_text, FieldError, MAX_ID_CHARS};

/// Subject the coordinators answer signals on (queue group `coordinator`).
pub const SIGNAL_SUBJECT: &str = "saga.signal";
/// Largest signal payload, as JSON, in bytes.
pub const MAX_SIGNAL_PAYLOAD_BYTES: usize = 64 * 1024;

/// A signal for the `await` step of saga `saga_id` that waits for `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The saga.
    pub saga_id: String,
    /// The signal's name.
    pub name: String,
    /// The sender's id for this signal: the same id again changes nothing.
    pub signal_id: String,
    /// The await step's output; `null` when absent.
    #[serde(default)]
    pub payload: serde_json::Value,
}

impl SignalRequest {
    /// Checks every field as if an attacker wrote it (the payload's size:
    /// `payload_bytes`, as it arrived).
    ///
    /// # Errors
    /// The first bad field.
    pub fn check(&self, payload_bytes: usize) -> Result<(), FieldError> {
        check_saga_id("saga_id", &self.saga_id)?;
        // What a definition's `await:` may name.
        check_name("name", &self.name)?;
        check_text("signal_id", &self.signal_id, MAX_ID_CHARS)?;
        if payload_bytes > MAX_SIGNAL_PAYLOAD_BYTES {
            return Err(FieldError::new(
                "payload",
                format!("is {payload_bytes} bytes; at most {MAX_SIGNAL_PAYLOAD_BYTES}"),
            ));
        }
        Ok(())
    }
}

/// The answer to a [`SignalRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum SignalReply {
    /// Taken (`consumed`), kept for later (`kept`) or a repeat (`duplicate`).
    Ok {
        /// `consumed`, `kept` or `duplicate`.
        outcome: String,
        /// The saga's state after it (`RUNNING`, …).
        state: String,
    },
    /// Refused; nothing changed.
    Error {
        /// The gRPC status code's name it matches (`invalid_argument`,
        /// `not_found`, `failed_precondition`, `unavailable`, `internal`).
        code: String,
        /// Why.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> SignalRequest {
        SignalRequest {
            saga_id: "0190f7a2-1c3b-7def-8123-456789abcdef".into(),
            name: "payment-confirmed".into(),
            signal_id: "psp-evt-1".into(),
            payload: serde_json::json!({"code": "ok"}),
        }
    }

    #[test]
    fn every_field_is_checked() {
        assert_eq!(request().check(20), Ok(()));
        let field = |r: SignalRequest, n: usize| r.check(n).map_err(|e| e.field);
        let mut r = request();
        r.saga_id = "x".into();
        assert_eq!(field(r, 1), Err("saga_id".into()));
        let mut r = request();
        r.name = "Payment".into();
        assert_eq!(field(r, 1), Err("name".into()));
        let mut r = request();
        r.signal_id = String::new();
        assert_eq!(field(r, 1), Err("signal_id".into()));
        assert_eq!(
            field(request(), MAX_SIGNAL_PAYLOAD_BYTES + 1),
            Err("payload".into())
        );
        assert!(
            serde_json::from_str::<SignalRequest>(r#"{"saga_id":"a","name":"b","signal_id":"c","x":1}"#)
                .is_err()
        );
    }
}
