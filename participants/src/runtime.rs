//! The participant runtime: the NATS side every participant shares, so that a
//! third participant is only a [`Handler`].
//!
//! [`serve`] queue-subscribes to `saga.cmd.<participant>.*` in the queue group
//! `<participant>` (instances share the load) and answers the read-only
//! `saga.admin.<participant>.stats` and `….effects` (paged) on a task of its
//! own, [`ADMIN_CONCURRENCY`] at a time, so admin traffic never delays a
//! command. Each command runs in its own tracked task, so a slow one
//! (gateway latency) never holds up the others, and shutdown waits for those
//! in flight. [`decode`] turns untrusted bytes into a [`Command`] that keeps
//! saga-wire's rules, or a [`Refused`] (the field at fault and the reply:
//! `error` for a malformed envelope, `rejected: invalid_payload` for an
//! order no `CreateOrder` could make); it goes back with a warning, never a
//! panic, and the handler never sees it.
//!
//! Every command is counted in [`crate::telemetry`] by participant, action
//! and outcome (`malformed` when it never reached the handler), and the
//! handler's time is recorded.
//!
//! Handlers own effects and idempotency (see [`crate::store`]); this module
//! never touches a store but to flush it at shutdown, and never decides a
//! business outcome.

use std::{future::Future, pin::Pin, sync::Arc};

use futures::StreamExt;
use saga_wire::{self as wire, Command, Reply};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, info_span, warn, Instrument};

use crate::telemetry::{self, Outcome};

/// Longest wait on NATS during shutdown (it may be down already).
pub const NATS_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The effects a handler yields for one page: `(cursor of this entry, saga
/// id, effect as JSON)`, in key order.
pub type Effects = Vec<(String, String, serde_json::Value)>;

/// Admin requests answered at the same time, at most; more wait for a
/// turn (NATS buffers them, a caller past its timeout gives up).
pub const ADMIN_CONCURRENCY: usize = 2;

/// A boxed future returned by handlers.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One participant's business logic.
pub trait Handler: Send + Sync + 'static {
    /// Participant name: subject token and queue group.
    fn participant(&self) -> &str;
    /// Actions (forward and compensating) this participant performs.
    fn actions(&self) -> &[&str];
    /// Applies a command (at most once per idempotency key) and returns the
    /// reply to send; must not return before the effect and stored reply are durable.
    fn handle(&self, command: Command) -> BoxFuture<'_, Reply>;
    /// Current figures, as JSON, for `saga.admin.<participant>.stats`:
    /// counters kept with the effects, never a scan of them (it runs on
    /// the admin task, but a flood of requests must stay cheap).
    fn stats(&self) -> BoxFuture<'_, serde_json::Value>;
    /// At most `limit` of the effects that exist now, in key order, starting
    /// after `cursor`: `(cursor of this entry, saga id, effect as JSON)`, for
    /// the paged `saga.admin.<participant>.effects` (audits and the chaos suite).
    fn effects<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Effects, crate::store::StoreError>>;
    /// The handler's store (flushed at shutdown).
    fn store(&self) -> &crate::store::SharedStore;
}

/// Failure to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Subscribing failed.
    #[error("nats subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// The reply to a command whose action exists but not in this direction
/// (a forward `release`, say): an `error`, nothing applied.
pub fn wrong_direction(kind: wire::CommandKind, action: &str) -> Reply {
    Reply::error(format!("`{action}` is not a {} action here", kind.as_str()))
}

/// The reply of a handler whose store failed: logged, then an `error`
/// reply (nothing was recorded, so the coordinator retries with the same key).
pub fn store_reply<E: std::fmt::Display>(participant: &str, result: Result<Reply, E>) -> Reply {
    result.unwrap_or_else(|e| {
        tracing::error!(error = %e, participant, "{participant} store failure");
        Reply::error(format!("{participant} store: {e}"))
    })
}

/// A command refused before it reached the handler: nothing was applied
/// and nothing is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The field at fault (`saga_id`, `payload.items[2].quantity`), or
    /// `body`/`action` when the message is not a command of this participant.
    pub field: String,
    /// The reply to send: `error` for a malformed envelope (as the protocol
    /// always answered one), `rejected: invalid_payload: …` for an order no
    /// `CreateOrder` could have made (retrying cannot help). Either way the
    /// coordinator knows the effect was not applied.
    pub reply: Reply,
}

impl Refused {
    fn malformed(field: &str, reason: String) -> Self {
        Refused {
            field: field.into(),
            reply: Reply::error(reason),
        }
    }
}

/// The `rejected` reason prefix of a command whose order breaks a rule of
/// [`saga_wire::OrderPayload::validate`].
pub const INVALID_PAYLOAD: &str = "invalid_payload";

/// Validates a command message: JSON envelope, the subject's last token
/// equal to the envelope's action, an action of this participant, the
/// envelope's rules ([`Command::validate_envelope`]: canonical saga id,
/// names, attempt, idempotency key) and, for a forward command, the order's
/// ([`saga_wire::OrderPayload::validate`]).
///
/// # Errors
/// The field at fault and the reply to send.
pub fn decode(subject: &str, body: &[u8], actions: &[&str]) -> Result<Command, Refused> {
    let cmd: Command = serde_json::from_slice(body)
        .map_err(|e| Refused::malformed("body", format!("malformed command: {e}")))?;
    let token = subject.rsplit('.').next().unwrap_or_default();
    if token != cmd.action {
        return Err(Refused::malformed(
            "action",
            format!(
                "subject action `{token}` does not match command action `{}`",
                cmd.action
            ),
        ));
    }
    if !actions.contains(&cmd.action.as_str()) {
        return Err(Refused::malformed(
            "action",
            format!("unknown action `{}`", cmd.action),
        ));
    }
    if let Err(e) = cmd.validate_envelope() {
        return Err(Refused::malformed(&e.field, format!("invalid command: {e}")));
    }
    if let Err(e) = cmd.validate() {
        return Err(Refused {
            field: e.field.clone(),
            reply: Reply::rejected(format!("{INVALID_PAYLOAD}: {e}")),
        });
    }
    Ok(cmd)
}

/// Serves `handler` until `shutdown` fires; then stops taking commands
/// (draining what NATS already delivered), waits for the ones in flight and
/// flushes. The participant's name, subject token and queue group are
/// `handler.participant()`.
///
/// # Errors
/// Subscribing failed.
pub async fn serve(
    client: async_nats::Client,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let name = handler.participant().to_string();
    let mut commands = client
        .queue_subscribe(format!("{}.{name}.*", wire::COMMAND_SUBJECT_PREFIX), name.clone())
        .await?;
    let admin = client
        .subscribe(format!("{}.{name}.*", wire::ADMIN_SUBJECT_PREFIX))
        .await?;
    // Admin queries have their own task: a flood of them never delays a command.
    let admin_task = tokio::spawn(serve_admin(
        client.clone(),
        handler.clone(),
        admin,
        shutdown.clone(),
    ));
    info!(participant = %name, "serving commands");
    let tracker = TaskTracker::new();
    let counted = telemetry::InFlight::new(&name);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = commands.next() => match msg {
                Some(msg) => {
                    tracker.spawn(process(client.clone(), handler.clone(), msg, counted.enter()));
                }
                None => break,
            },
        }
    }
    info!(participant = %name, in_flight = tracker.len(), "stopping: no new commands");
    // NATS may already be gone at shutdown: never wait on it for long. Commands
    // the server delivered before the UNSUB are still handled, not dropped.
    let deadline = tokio::time::Instant::now() + NATS_GRACE;
    if let Ok(Ok(())) = tokio::time::timeout_at(deadline, commands.drain()).await {
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, commands.next()).await {
            tracker.spawn(process(client.clone(), handler.clone(), msg, counted.enter()));
        }
    }
    let _ = tokio::time::timeout(NATS_GRACE, commands.unsubscribe()).await;
    tracker.close();
    tracker.wait().await;
    let _ = admin_task.await;
    if let Err(e) = handler.store().flush().await {
        warn!(error = %e, "flush at shutdown failed");
    }
    let _ = tokio::time::timeout(NATS_GRACE, client.flush()).await;
    info!(participant = %name, "stopped");
    Ok(())
}

/// Answers `saga.admin.<participant>.stats` and `….effects` until
/// `shutdown`: at most [`ADMIN_CONCURRENCY`] at a time, each on a task of
/// its own, never on the command path.
async fn serve_admin(
    client: async_nats::Client,
    handler: Arc<dyn Handler>,
    mut admin: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    let turns = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONCURRENCY));
    let tracker = TaskTracker::new();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = admin.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let Some(reply) = msg.reply.clone() else { continue };
        let turn = tokio::select! {
            _ = shutdown.cancelled() => break,
            turn = turns.clone().acquire_owned() => match turn {
                Ok(t) => t,
                Err(_) => break,
            },
        };
        let (client, handler) = (client.clone(), handler.clone());
        tracker.spawn(async move {
            let body = admin_answer(handler.as_ref(), &msg.subject, &msg.payload).await;
            drop(turn);
            if let Err(e) = client.publish(reply, body.into()).await {
                warn!(error = %e, "admin reply failed");
            }
        });
    }
    let _ = tokio::time::timeout(NATS_GRACE, admin.unsubscribe()).await;
    tracker.close();
    tracker.wait().await;
}

/// The JSON answer to an admin query on `subject` with `body`.
async fn admin_answer(handler: &dyn Handler, subject: &str, body: &[u8]) -> Vec<u8> {
    let answer = match subject.rsplit('.').next() {
        Some("stats") => handler.stats().await,
        Some("effects") => {
            let request = if body.iter().all(u8::is_ascii_whitespace) {
                Ok(wire::EffectsRequest::default())
            } else {
                serde_json::from_slice::<wire::EffectsRequest>(body)
            };
            match request {
                Err(e) => serde_json::json!({"error": format!("malformed effects request: {e}")}),
                Ok(request) => match effects_page(handler, &request).await {
                    Ok(page) => serde_json::to_value(page).unwrap_or_default(),
                    Err(e) => serde_json::json!({"error": e.to_string()}),
                },
            }
        }
        other => serde_json::json!({"error": format!("unknown admin query {other:?}")}),
    };
    serde_json::to_vec(&answer).unwrap_or_default()
}

/// One page of `handler`'s effects: at most `limit` entries (capped at
/// [`wire::EFFECTS_PAGE_MAX`]) and, but for a page's first entry, at most
/// [`wire::EFFECTS_PAGE_BYTES`] of them, so a reply stays under NATS's
/// payload limit by construction; `next_cursor` is set when more follow.
///
/// # Errors
/// The handler's store failed.
pub async fn effects_page(
    handler: &dyn Handler,
    request: &wire::EffectsRequest,
) -> Result<wire::EffectsPage, crate::store::StoreError> {
    let limit = request
        .limit
        .unwrap_or(wire::EFFECTS_PAGE_DEFAULT)
        .clamp(1, wire::EFFECTS_PAGE_MAX) as usize;
    let mut page = wire::EffectsPage::default();
    let (mut bytes, mut last) = (0usize, None);
    for (cursor, saga_id, effect) in handler.effects(request.cursor.as_deref(), limit + 1).await? {
        // The entry's share of the reply: `"<saga_id>":<effect>,`.
        let size = serde_json::to_string(&saga_id).map_or(0, |s| s.len())
            + serde_json::to_vec(&effect).map_or(0, |v| v.len())
            + 2;
        let full = page.effects.len() >= limit
            || (!page.effects.is_empty() && bytes + size > wire::EFFECTS_PAGE_BYTES);
        if full {
            page.next_cursor = last;
            return Ok(page);
        }
        bytes += size;
        page.effects.insert(saga_id, effect);
        last = Some(cursor);
    }
    Ok(page)
}

/// Every effect of `handler`, page after page, as one `{saga_id: effect}` map (tests).
#[cfg(test)]
pub(crate) async fn all_effects(handler: &dyn Handler) -> serde_json::Value {
    let mut all = serde_json::Map::new();
    let mut request = wire::EffectsRequest::default();
    loop {
        let page = effects_page(handler, &request).await.expect("effects page");
        all.extend(page.effects);
        match page.next_cursor {
            Some(c) => request.cursor = Some(c),
            None => return serde_json::Value::Object(all),
        }
    }
}

/// Best-effort ids of a body that did not decode, for the warning line.
fn ids_of_malformed(body: &[u8]) -> [String; 4] {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    ["saga_id", "step", "idempotency_key", "attempt"].map(|k| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// The subject's action token when it is one of `actions`, else `"unknown"`:
/// a metric label never takes an arbitrary value from the wire.
fn known_action<'a>(subject: &str, actions: &[&'a str]) -> &'a str {
    let token = subject.rsplit('.').next().unwrap_or_default();
    actions
        .iter()
        .find(|a| **a == token)
        .copied()
        .unwrap_or("unknown")
}

/// Handles one delivered command; `_held` counts it in flight until it is answered.
async fn process(
    client: async_nats::Client,
    handler: Arc<dyn Handler>,
    msg: async_nats::Message,
    _held: telemetry::Held,
) {
    let correlation_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(wire::CORRELATION_HEADER))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let participant = handler.participant();
    let Some(reply_to) = msg.reply.clone() else {
        let [saga_id, step, idempotency_key, attempt] = ids_of_malformed(&msg.payload);
        warn!(
            subject = %msg.subject, saga_id, correlation_id, step, attempt, idempotency_key,
            "command without a reply subject; dropped unapplied"
        );
        let action = known_action(&msg.subject, handler.actions());
        telemetry::command(participant, action, Outcome::Malformed);
        return;
    };
    let reply = match decode(&msg.subject, &msg.payload, handler.actions()) {
        Err(Refused { field, reply }) => {
            let [saga_id, step, idempotency_key, attempt] = ids_of_malformed(&msg.payload);
            let action = msg.subject.rsplit('.').next().unwrap_or_default();
            let reason = match &reply {
                Reply::Error { reason } | Reply::Rejected { reason } => reason.as_str(),
                Reply::Ok { .. } => "",
            };
            warn!(
                subject = %msg.subject, saga_id, correlation_id, step, attempt, idempotency_key, action,
                field, reason, "command refused unapplied"
            );
            let action = known_action(&msg.subject, handler.actions());
            telemetry::command(participant, action, Outcome::Malformed);
            reply
        }
        Ok(cmd) => {
            let action = cmd.action.clone();
            let span = info_span!(
                "command",
                otel.name = %format_args!("{participant} {}", cmd.action),
                otel.kind = "server",
                saga_id = %cmd.saga_id,
                correlation_id,
                participant,
                step = %cmd.step,
                action = %cmd.action,
                kind = %cmd.kind.as_str(),
                attempt = cmd.attempt,
                idempotency_key = %cmd.idempotency_key,
                effect = tracing::field::Empty,
                outcome = tracing::field::Empty,
                store_ms = tracing::field::Empty,
            );
            // In the saga's trace, under the coordinator's attempt (the
            // header's span when it is of this saga, else the saga's root).
            if saga_trace::spans().is_some() {
                if let Some(parent) =
                    saga_trace::propagation::parent_in_saga(msg.headers.as_ref(), &cmd.saga_id)
                {
                    let _ = saga_trace::OpenTelemetrySpanExt::set_parent(&span, parent);
                }
            }
            let started = std::time::Instant::now();
            let reply = async {
                let reply = handler.handle(cmd).await;
                let current = tracing::Span::current();
                current.record("outcome", Outcome::of(&reply).as_str());
                info!(outcome = ?reply, "command handled");
                reply
            }
            .instrument(span)
            .await;
            telemetry::command_duration(participant, &action, started.elapsed());
            telemetry::command(participant, &action, Outcome::of(&reply));
            reply
        }
    };
    let body = match serde_json::to_vec(&reply) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot encode reply");
            return;
        }
    };
    if let Err(e) = client.publish(reply_to, body.into()).await {
        warn!(error = %e, correlation_id, "reply not sent; the coordinator will retry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: &[&str] = &["reserve", "release"];
    const SAGA: &str = "0190b8a4-0000-7000-8000-0000000000aa";
    const KEY: &str = "0190b8a4-0000-7000-8000-0000000000aa/reserve-inventory/forward";

    fn command() -> serde_json::Value {
        serde_json::json!({
            "saga_id": SAGA, "definition": "order@1", "step": "reserve-inventory", "action": "reserve",
            "kind": "forward", "attempt": 1, "idempotency_key": KEY,
            "payload": {"order_id": "o", "customer_id": "c", "items": [{"sku": "A", "quantity": 1}],
                        "amount_cents": 5, "currency": "EUR"}
        })
    }

    fn with(changes: &[(&str, serde_json::Value)]) -> Vec<u8> {
        let mut v = command();
        for (path, value) in changes {
            let mut at = &mut v;
            for p in path.split('.') {
                at = match p.parse::<usize>() {
                    Ok(i) => &mut at[i],
                    Err(_) => &mut at[p],
                };
            }
            *at = value.clone();
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }

    #[test]
    fn a_good_command_decodes() {
        let cmd = decode("saga.cmd.inventory.reserve", &with(&[]), ACTIONS);
        assert_eq!(cmd.map(|c| c.action), Ok("reserve".to_string()));
    }

    #[test]
    fn metric_labels_take_only_known_actions() {
        assert_eq!(known_action("saga.cmd.inventory.release", ACTIONS), "release");
        assert_eq!(known_action("saga.cmd.inventory.explode", ACTIONS), "unknown");
        assert_eq!(known_action("", ACTIONS), "unknown");
    }

    #[test]
    fn malformed_commands_get_an_error_naming_the_field() {
        use serde_json::json;
        let upper = SAGA.to_uppercase();
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            (
                "saga.cmd.inventory.reserve",
                b"not json".to_vec(),
                "body",
                "malformed command",
            ),
            (
                "saga.cmd.inventory.reserve",
                b"{}".to_vec(),
                "body",
                "malformed command",
            ),
            (
                "saga.cmd.inventory.reserve",
                with(&[("action", json!("release"))]),
                "action",
                "does not match",
            ),
            (
                "saga.cmd.inventory.explode",
                with(&[("action", json!("explode"))]),
                "action",
                "unknown action",
            ),
            (
                "saga.cmd.inventory.reserve",
                with(&[("idempotency_key", json!(""))]),
                "idempotency_key",
                "must be",
            ),
            (
                "saga.cmd.inventory.reserve",
                with(&[("idempotency_key", json!("other/key"))]),
                "idempotency_key",
                "must be",
            ),
            (
                "saga.cmd.inventory.reserve",
                with(&[
                    ("saga_id", json!("")),
                    ("idempotency_key", json!("/reserve-inventory/forward")),
                ]),
                "saga_id",
                "canonical",
            ),
            (
                "saga.cmd.inventory.reserve",
                with(&[
                    ("saga_id", json!("s1")),
                    ("idempotency_key", json!("s1/reserve-inventory/forward")),
                ]),
                "saga_id",
                "canonical",
            ),
            (
                "saga.cmd.inventory.reserve",
                with(&[
                    ("saga_id", json!(upper)),
                    (
                        "idempotency_key",
                        json!(format!("{upper}/reserve-inventory/forward")),
                    ),
                ]),
                "saga_id",
                "canonical",
            ),
        ];
        for (subject, b, field, why) in cases {
            match decode(subject, &b, ACTIONS) {
                Ok(c) => panic!("{why}: accepted {c:?}"),
                Err(Refused {
                    field: f,
                    reply: Reply::Error { reason },
                }) => {
                    assert_eq!(f, field, "{reason}");
                    assert!(reason.contains(why), "{reason} should say {why}");
                }
                Err(other) => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn orders_no_create_order_could_make_are_rejected_naming_the_field() {
        use serde_json::json;
        let cases = [
            ("payload.amount_cents", json!(-50_000)),
            ("payload.amount_cents", json!(0)),
            ("payload.currency", json!("eur")),
            ("payload.customer_id", json!("")),
            ("payload.customer_id", json!("c\u{202E}")),
            ("payload.order_id", json!("o\u{2028}")),
            ("payload.items", json!([])),
            ("payload.items.0.quantity", json!(0)),
            ("payload.items.0.sku", json!("\u{202E}1-A")),
        ];
        for (path, value) in cases {
            let b = with(&[(path, value.clone())]);
            match decode("saga.cmd.inventory.reserve", &b, ACTIONS) {
                Err(Refused {
                    field,
                    reply: Reply::Rejected { reason },
                }) => {
                    let want = path.replace(".0.", "[0].");
                    assert_eq!(field, want, "{value}");
                    assert!(reason.starts_with(INVALID_PAYLOAD), "{reason}");
                }
                other => panic!("{path}={value}: {other:?}"),
            }
        }
    }
}
