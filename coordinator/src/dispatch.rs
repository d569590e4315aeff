//! Sends outbox commands to participants over NATS request-reply and turns
//! whatever comes back into an engine [`Outcome`].
//!
//! Each command runs in its own tracked task: wait the step's backoff for
//! attempts after the first (`RetryPolicy::delay_before`, jittered by the
//! `backon` crate), send with the step's timeout, classify the answer, report
//! it to the saga runner. Retrying is the engine's decision, recorded before
//! the next attempt leaves; this module never retries on its own and never
//! touches the store. Callers hand it only commands whose state is flushed.

use std::time::Duration;

use async_nats::{header::HeaderMap, RequestErrorKind};
use saga_proto::wire::{self, Reply};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info_span, warn, Instrument};

use crate::{
    engine::{Event, Outcome},
    store::OutboxEntry,
};

/// Why a call produced no participant answer (style: the two kinds
/// async-nats distinguishes, plus a reply we cannot read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Nobody listens on the subject (or the connection is down): nothing was
    /// delivered; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Sent, but no answer in time: the effect may exist; retry with the same key.
    #[error("timeout after {0:?}")]
    OutcomeUnknown(Duration),
    /// An answer that is not a valid reply envelope.
    #[error("malformed reply: {0}")]
    Malformed(String),
}

/// An outcome for the saga runner.
#[derive(Debug)]
pub struct Reported {
    /// Saga the outcome belongs to.
    pub saga_id: String,
    /// The engine event.
    pub event: Event,
}

/// Sends commands; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    client: async_nats::Client,
    outcomes: mpsc::UnboundedSender<Reported>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Dispatcher {
    /// A dispatcher reporting outcomes on `outcomes`. Tasks are tracked by
    /// `tracker` and abandoned (not reported) when `cancel` fires: their
    /// commands stay in the outbox and are re-sent on the next start.
    pub fn new(
        client: async_nats::Client,
        outcomes: mpsc::UnboundedSender<Reported>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Dispatcher {
            client,
            outcomes,
            tracker,
            cancel,
        }
    }

    /// Sends `entry` in the background. The caller guarantees the state that
    /// implies this command is durable.
    pub fn dispatch(&self, entry: OutboxEntry) {
        let span = info_span!(
            "command",
            saga_id = %entry.saga_id,
            correlation_id = %entry.correlation_id,
            step = %entry.message.step,
            kind = entry.kind.as_str(),
            attempt = entry.message.attempt,
        );
        let this = self.clone();
        self.tracker.spawn(
            async move {
                let delay = entry.retry.delay_before(entry.message.attempt);
                let outcome = tokio::select! {
                    _ = this.cancel.cancelled() => return,
                    outcome = async {
                        tokio::time::sleep(delay).await;
                        this.call(&entry).await
                    } => outcome,
                };
                let outcome = match outcome {
                    Ok(Reply::Ok { data }) => Outcome::Ok(data),
                    Ok(Reply::Rejected { reason }) => Outcome::Rejected(reason),
                    Ok(Reply::Error { reason }) => Outcome::NotApplied(format!("error: {reason}")),
                    Err(e @ CallError::Unavailable(_)) => Outcome::NotApplied(e.to_string()),
                    Err(e @ (CallError::OutcomeUnknown(_) | CallError::Malformed(_))) => {
                        Outcome::Transient(e.to_string())
                    }
                };
                debug!(?outcome, "outcome");
                let event = Event::Reply {
                    step: entry.step,
                    kind: entry.kind,
                    attempt: entry.message.attempt,
                    outcome,
                };
                // The runner is gone only during shutdown; the outbox keeps the command.
                let _ = this.outcomes.send(Reported {
                    saga_id: entry.saga_id,
                    event,
                });
            }
            .instrument(span),
        );
    }

    /// One request-reply round trip.
    async fn call(&self, entry: &OutboxEntry) -> Result<Reply, CallError> {
        let body = serde_json::to_vec(&entry.message).map_err(|e| CallError::Malformed(e.to_string()))?;
        let timeout = Duration::from_millis(entry.timeout_ms);
        let request = async_nats::Request::new()
            .payload(body.into())
            .headers(headers(entry))
            .timeout(Some(timeout));
        let msg = match self.client.send_request(entry.subject.clone(), request).await {
            Ok(msg) => msg,
            Err(e) => {
                return Err(match e.kind() {
                    RequestErrorKind::TimedOut => CallError::OutcomeUnknown(timeout),
                    RequestErrorKind::NoResponders => CallError::Unavailable("no responders".into()),
                    RequestErrorKind::InvalidSubject
                    | RequestErrorKind::MaxPayloadExceeded
                    | RequestErrorKind::Other => CallError::Unavailable(e.to_string()),
                })
            }
        };
        serde_json::from_slice::<Reply>(&msg.payload).map_err(|e| {
            warn!(error = %e, body = %String::from_utf8_lossy(&msg.payload), "malformed reply from participant");
            CallError::Malformed(e.to_string())
        })
    }
}

/// `X-Correlation-ID` and a W3C `traceparent` whose trace id is the saga id,
/// so every command of one saga shares a trace.
fn headers(entry: &OutboxEntry) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(wire::CORRELATION_HEADER, entry.correlation_id.as_str());
    let trace_id: String = entry.saga_id.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if trace_id.len() == 32 {
        let span_id = uuid::Uuid::new_v4().simple().to_string();
        h.insert(
            wire::TRACEPARENT_HEADER,
            format!("00-{trace_id}-{}-01", &span_id[..16]).as_str(),
        );
    }
    h
}
