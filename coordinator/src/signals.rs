//! Signals for `await` steps, from gRPC `SignalSaga` and from NATS requests
//! on `saga.signal` (docs/protocol.md "Signals"): one validation, one route
//! (the [`Router`] operator events take), and the answer only once what the
//! signal changed is durable.

use std::sync::Arc;

use futures::StreamExt;
use saga_wire::{FieldError, SignalReply, SignalRequest, MAX_SIGNAL_PAYLOAD_BYTES, SIGNAL_SUBJECT};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::{
    cluster::{Router, SagaHost},
    engine::{Event, SignalFate, SignalRefused, StateTag},
    ops::{OperateError, Operated},
};

/// Signals handled at once from NATS; more wait in the subscription.
const IN_FLIGHT: usize = 256;

/// The engine event of a checked request ([`SignalRequest::check`]).
///
/// # Errors
/// A saga id that is not a UUID.
pub(crate) fn event(req: SignalRequest) -> Result<(Uuid, Event), FieldError> {
    let id = Uuid::parse_str(&req.saga_id).map_err(|e| FieldError::new("saga_id", e.to_string()))?;
    Ok((
        id,
        Event::Signal {
            name: req.name,
            id: req.signal_id,
            payload: req.payload,
        },
    ))
}

/// Delivers a signal to the saga's runner; answers once it is durable.
///
/// # Errors
/// The saga is unknown or refuses it ([`SignalRefused`]), or the runner cannot take it now.
pub(crate) async fn deliver<R: SagaHost>(
    router: &Router<R>,
    id: Uuid,
    event: Event,
) -> Result<(SignalFate, StateTag), OperateError> {
    match router.operate(id, event).await? {
        Operated::Signalled(fate, state) => Ok((fate, state)),
        Operated::Changed(_) | Operated::Unchanged(_) => Err(OperateError::Elsewhere(
            "the saga's coordinator answered a signal as another event".into(),
        )),
    }
}

/// Answers signal requests on [`SIGNAL_SUBJECT`] (queue group
/// `coordinator`, so one coordinator takes each) until `shutdown`.
pub(crate) async fn serve<R: SagaHost>(
    nats: async_nats::Client,
    router: Router<R>,
    shutdown: CancellationToken,
) {
    let mut sub = match nats.queue_subscribe(SIGNAL_SUBJECT, "coordinator".into()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, subject = SIGNAL_SUBJECT, "cannot subscribe to signals");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply_to) = msg.reply.clone() else {
            warn!(subject = %msg.subject, "signal without a reply subject; dropped");
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (nats, router) = (nats.clone(), router.clone());
        tokio::spawn(async move {
            let answer = answer(&router, &msg.payload).await;
            if let Ok(body) = serde_json::to_vec(&answer) {
                if let Err(e) = nats.publish(reply_to, body.into()).await {
                    warn!(error = %e, "cannot answer a signal");
                }
            }
            drop(slot);
        });
    }
}

/// The answer to one signal request's bytes, as if an attacker wrote them.
async fn answer<R: SagaHost>(router: &Router<R>, bytes: &[u8]) -> SignalReply {
    let refuse = |code: &str, message: String| SignalReply::Error {
        code: code.into(),
        message,
    };
    // The envelope's fields are small; the payload is bounded on its own.
    if bytes.len() > MAX_SIGNAL_PAYLOAD_BYTES + 4096 {
        warn!(bytes = bytes.len(), "signal too large; refused");
        return refuse(
            "invalid_argument",
            format!("signal is {} bytes; too large", bytes.len()),
        );
    }
    let req: SignalRequest = match serde_json::from_slice(bytes) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "malformed signal; refused");
            return refuse("invalid_argument", format!("malformed signal: {e}"));
        }
    };
    let payload_bytes = serde_json::to_vec(&req.payload).map_or(usize::MAX, |b| b.len());
    let checked = req.check(payload_bytes).and_then(|()| event(req));
    let (id, event) = match checked {
        Ok(v) => v,
        Err(e) => {
            warn!(field = %e.field, reason = %e.reason, "invalid signal; refused");
            return refuse("invalid_argument", format!("{}: {}", e.field, e.reason));
        }
    };
    match deliver(router, id, event).await {
        Ok((fate, state)) => SignalReply::Ok {
            outcome: fate.as_str().into(),
            state: state.as_str().into(),
        },
        Err(e) => {
            info!(saga_id = %id, error = %e, "signal not taken");
            let code = match &e {
                OperateError::NotFound(_) => "not_found",
                OperateError::Refused(SignalRefused::UnknownName { .. } | SignalRefused::Payload { .. }) => {
                    "invalid_argument"
                }
                OperateError::Refused(_) => "failed_precondition",
                OperateError::Store(_) => "internal",
                OperateError::Stopped | OperateError::NotStarted | OperateError::Elsewhere(_) => {
                    "unavailable"
                }
            };
            refuse(code, e.to_string())
        }
    }
}
