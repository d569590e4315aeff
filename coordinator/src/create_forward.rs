//! jetstream store: a `CreateOrder` whose idempotency key names a saga that
//! another coordinator must create, forwarded to it over NATS.
//!
//! A key is written before its saga's record; when the record's write does
//! not go through (the coordinator died, or JetStream failed, in between), a
//! retry with the key creates that very saga, and only the holder of its
//! partition may (`runner`). A client retrying on any other coordinator was
//! refused until the partition came back to that one, which need not happen.
//! Now that coordinator sends the request, as the client wrote it, on
//! `saga.coordinator.create.<partition>`; the holder checks it as it checks a
//! gRPC request and creates the saga there. The others leave it unanswered.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use prost::Message;
use saga_proto::pb;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::warn;

use crate::partition::{partition_of, Ownership};

/// Prefix of the subjects creations are forwarded on (`.<partition>`).
pub(crate) const CREATE_SUBJECT: &str = "saga.coordinator.create";
/// Header carrying the request's correlation id.
const CORRELATION_HEADER: &str = "Saga-Correlation-Id";
/// How long the forwarding coordinator waits for the holder.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Largest answer read back (an id, an order id, a state or an error message).
const MAX_ANSWER_BYTES: usize = 4096;

/// What creates a saga on the holder: the gRPC service's own path, without
/// forwarding (a holder that lost the partition meanwhile refuses). A trait,
/// so this module (transport only) does not import the API that uses it.
pub(crate) trait CreateHere: Send + Sync + 'static {
    /// Checks `request` (an encoded `CreateOrderRequest`, as an attacker may
    /// have written it) and the correlation id as a gRPC request's, and
    /// creates the saga here.
    fn create_here(
        &self,
        request: bytes::Bytes,
        correlation_id: Option<String>,
    ) -> impl std::future::Future<Output = Result<pb::CreateOrderResponse, Status>> + Send;
}

/// The holder's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Answer {
    Created {
        saga_id: String,
        order_id: String,
        created: bool,
        state: i32,
    },
    Error {
        code: i32,
        message: String,
    },
}

/// Sends `req` to the holder of `saga_id`'s partition and returns its answer.
///
/// # Errors
/// `UNAVAILABLE` when no holder answers in time (a hand-over in progress) or
/// its answer is unreadable; the holder's own status otherwise.
pub(crate) async fn forward(
    nats: &async_nats::Client,
    partitions: u32,
    saga_id: &str,
    req: &pb::CreateOrderRequest,
    correlation_id: &str,
) -> Result<pb::CreateOrderResponse, Status> {
    let subject = format!("{CREATE_SUBJECT}.{}", partition_of(saga_id, partitions));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CORRELATION_HEADER, correlation_id);
    let asked = nats.request_with_headers(subject, headers, req.encode_to_vec().into());
    let reply = tokio::time::timeout(ANSWER_WITHIN, asked)
        .await
        .map_err(|_| {
            Status::unavailable(
                "the coordinator that must create this saga did not answer; retry with the same idempotency key",
            )
        })?
        .map_err(|e| Status::unavailable(format!("forwarding to the saga's coordinator: {e}")))?;
    answer_of(&reply.payload)
}

/// The holder's answer as what `CreateOrder` returns, checked.
fn answer_of(payload: &[u8]) -> Result<pb::CreateOrderResponse, Status> {
    let unreadable =
        |why: String| Status::unavailable(format!("unreadable answer from the saga's coordinator: {why}"));
    if payload.len() > MAX_ANSWER_BYTES {
        return Err(unreadable(format!("{} bytes", payload.len())));
    }
    match serde_json::from_slice::<Answer>(payload).map_err(|e| unreadable(e.to_string()))? {
        Answer::Created {
            saga_id,
            order_id,
            created,
            state,
        } => {
            uuid::Uuid::parse_str(&saga_id).map_err(|e| unreadable(format!("saga_id: {e}")))?;
            pb::SagaState::try_from(state).map_err(|e| unreadable(format!("state: {e}")))?;
            Ok(pb::CreateOrderResponse {
                saga_id,
                order_id,
                created,
                state,
            })
        }
        Answer::Error { code, message } => Err(Status::new(Code::from_i32(code), message)),
    }
}

/// Answers the creations forwarded for the partitions held here, until `stop`.
pub(crate) async fn serve<H: CreateHere>(
    nats: async_nats::Client,
    ownership: Ownership,
    host: Arc<H>,
    stop: CancellationToken,
) {
    let mut sub = match nats.subscribe(format!("{CREATE_SUBJECT}.*")).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot subscribe to forwarded creations");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        // Another coordinator's partition: its holder answers.
        let partition = msg.subject.rsplit('.').next().and_then(|p| p.parse::<u32>().ok());
        if !partition.is_some_and(|p| ownership.holds(p)) {
            continue;
        }
        let correlation_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(CORRELATION_HEADER))
            .map(|v| v.as_str().to_string());
        let answer = match host.create_here(msg.payload, correlation_id).await {
            Ok(r) => Answer::Created {
                saga_id: r.saga_id,
                order_id: r.order_id,
                created: r.created,
                state: r.state,
            },
            Err(status) => Answer::Error {
                code: status.code() as i32,
                message: status.message().to_string(),
            },
        };
        match serde_json::to_vec(&answer) {
            Ok(body) => {
                if let Err(e) = nats.publish(reply_to, body.into()).await {
                    warn!(subject = %msg.subject, error = %e, "cannot answer a forwarded creation");
                }
            }
            Err(e) => {
                warn!(subject = %msg.subject, error = %e, "cannot encode a forwarded creation's answer")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_before_they_are_passed_on() {
        let ok = serde_json::json!({"result": "created", "saga_id": uuid::Uuid::now_v7().to_string(),
                                    "order_id": "o-1", "created": true, "state": pb::SagaState::Running as i32});
        let r = answer_of(ok.to_string().as_bytes()).expect("a valid answer");
        assert!(r.created);
        let bad_id = serde_json::json!({"result": "created", "saga_id": "x", "order_id": "o",
                                        "created": true, "state": 1});
        assert_eq!(
            answer_of(bad_id.to_string().as_bytes())
                .map_err(|s| s.code())
                .err(),
            Some(Code::Unavailable)
        );
        let refused = serde_json::json!({"result": "error", "code": Code::InvalidArgument as i32,
                                         "message": "items: empty"});
        let status = answer_of(refused.to_string().as_bytes()).expect_err("an error");
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, "items: empty")
        );
        assert_eq!(
            answer_of(&vec![b' '; MAX_ANSWER_BYTES + 1])
                .map_err(|s| s.code())
                .err(),
            Some(Code::Unavailable)
        );
        assert_eq!(
            answer_of(b"{").map_err(|s| s.code()).err(),
            Some(Code::Unavailable)
        );
    }
}
