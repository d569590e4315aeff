//! NATS envelopes (docs/protocol.md): the command the coordinator sends to a participant and the
//! reply it gets back, both JSON.
//!
//! Subjects are `saga.cmd.<participant>.<action>`; participants listen in the
//! queue group `<participant>`. A repeated command carries the same
//! `idempotency_key` (`<saga_id>/<step>/<kind>`), so a participant applies its
//! effect at most once and answers a repeat with the stored reply.
#![deny(unreachable_pub)]
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

mod signal;
mod validate;
pub use signal::{SignalReply, SignalRequest, MAX_SIGNAL_PAYLOAD_BYTES, SIGNAL_SUBJECT};
pub use validate::{
    check_currency, check_definition, check_id, check_name, check_saga_id, check_text, is_forbidden_char,
    FieldError, MAX_AMOUNT_CENTS, MAX_ID_CHARS, MAX_ITEMS, MAX_NAME_CHARS, MAX_QUANTITY, MAX_SKU_CHARS,
};

/// Header carrying the saga's correlation id on every command.
pub const CORRELATION_HEADER: &str = "X-Correlation-ID";
/// W3C trace-context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Prefix of every command subject.
pub const COMMAND_SUBJECT_PREFIX: &str = "saga.cmd";
/// Prefix of the participants' read-only admin subjects (`saga.admin.<participant>.stats`).
pub const ADMIN_SUBJECT_PREFIX: &str = "saga.admin";

/// Prefix of the saga lifecycle events (`saga.events.<definition>.<event>`).
pub const EVENTS_SUBJECT_PREFIX: &str = "saga.events";
/// Format version of [`SagaEvent`] (`"v"` in the JSON).
pub const EVENT_FORMAT_VERSION: u32 = 1;

/// Subject of `event` of a saga of definition `name`: `saga.events.<name>.<event>`.
pub fn event_subject(definition_name: &str, event: &str) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}.{definition_name}.{event}")
}

/// Subject of `action` on `participant`: `saga.cmd.<participant>.<action>`.
pub fn command_subject(participant: &str, action: &str) -> String {
    format!("{COMMAND_SUBJECT_PREFIX}.{participant}.{action}")
}

/// Subject answering a participant's figures (stock, ledger) as JSON.
pub fn stats_subject(participant: &str) -> String {
    format!("{ADMIN_SUBJECT_PREFIX}.{participant}.stats")
}

/// Subject answering the effects a participant holds, per saga id, a page
/// at a time ([`EffectsRequest`] → [`EffectsPage`]).
pub fn effects_subject(participant: &str) -> String {
    format!("{ADMIN_SUBJECT_PREFIX}.{participant}.effects")
}

/// Entries in an effects page when the request names no `limit`.
pub const EFFECTS_PAGE_DEFAULT: u32 = 500;
/// Most entries in one effects page; a larger `limit` is lowered to it.
pub const EFFECTS_PAGE_MAX: u32 = 1000;
/// Most bytes of entries in one effects page: a page ends before the entry
/// that would pass it (but holds at least one entry), so a reply stays far
/// below NATS's 1 MiB payload limit whatever the entries hold.
pub const EFFECTS_PAGE_BYTES: usize = 512 * 1024;

/// The request on [`effects_subject`]: an empty body, `{}`, asks for the
/// first page; `cursor` is the `next_cursor` of the previous page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectsRequest {
    /// Where the page starts: after this entry (a previous page's `next_cursor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Most entries wanted; [`EFFECTS_PAGE_DEFAULT`] when absent, at most
    /// [`EFFECTS_PAGE_MAX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The reply on [`effects_subject`]: one page of the effects a participant
/// holds, per saga id, in key order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EffectsPage {
    /// `{saga_id: effect}` (the participant's own shape of an effect).
    pub effects: serde_json::Map<String, serde_json::Value>,
    /// The cursor of the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The saga id of an idempotency key (`<saga_id>/<step>/<kind>`).
pub fn saga_of_key(key: &str) -> &str {
    key.split('/').next().unwrap_or(key)
}

/// Whether a command does a step's work or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandKind {
    /// The step's action (`reserve`, `charge`).
    Forward,
    /// The step's compensation (`release`, `refund`).
    Compensate,
}

impl CommandKind {
    /// The lowercase name used in idempotency keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Forward => "forward",
            CommandKind::Compensate => "compensate",
        }
    }
}

/// Idempotency key of a step's forward command or compensation.
///
/// The forward key is what a compensation refers to: a participant finds the
/// effect to undo (or records a tombstone) under [`forward_key`].
pub fn idempotency_key(saga_id: &str, step: &str, kind: CommandKind) -> String {
    format!("{saga_id}/{step}/{}", kind.as_str())
}

/// The forward key a compensation key undoes (`…/compensate` → `…/forward`).
pub fn forward_key(key: &str) -> Option<String> {
    key.strip_suffix("/compensate")
        .map(|base| format!("{base}/forward"))
}

/// A command sent by the coordinator to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Saga id (UUID).
    pub saga_id: String,
    /// `name@version` of the saga definition.
    pub definition: String,
    /// Step name from the definition.
    pub step: String,
    /// Action (forward) or compensation name; also the last subject token.
    pub action: String,
    /// Forward or compensate.
    pub kind: CommandKind,
    /// 1-based attempt number; informative only, never part of the key.
    pub attempt: u32,
    /// `<saga_id>/<step>/<kind>`; the participant's dedupe key.
    pub idempotency_key: String,
    /// The order the saga is about.
    pub payload: OrderPayload,
    /// The step's extra input from its definition (`input:` or
    /// `compensation_input:`), references already resolved, e.g.
    /// `{"charge_id": "ch_…"}` taken from an earlier step's output. Absent
    /// when the step declares none.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub input: serde_json::Value,
}

/// The business payload of an order saga (its rules: [`OrderPayload::validate`];
/// like the order schema, it has no other fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderPayload {
    /// Business order id.
    pub order_id: String,
    /// Customer the order is for.
    pub customer_id: String,
    /// Lines of the order; 1 to [`MAX_ITEMS`].
    pub items: Vec<Item>,
    /// Total to charge, in minor units; 1 to [`MAX_AMOUNT_CENTS`].
    pub amount_cents: i64,
    /// ISO 4217 currency code.
    pub currency: String,
}

/// One order line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Stock keeping unit; 1 to [`MAX_SKU_CHARS`] characters.
    pub sku: String,
    /// Units; 1 to [`MAX_QUANTITY`].
    pub quantity: u32,
}

/// A participant's answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Reply {
    /// Done (or already done): the effect exists.
    Ok {
        /// Participant-specific result, e.g. `{"charge_id": "…"}`.
        #[serde(default)]
        data: serde_json::Value,
    },
    /// Business "no" (e.g. `insufficient_stock`): no effect; compensate, do not retry.
    Rejected {
        /// Machine-readable reason.
        reason: String,
    },
    /// Transient failure: no effect was recorded; the coordinator retries.
    Error {
        /// Human-readable reason.
        reason: String,
    },
}

impl Reply {
    /// An `ok` reply with `data`.
    pub fn ok(data: serde_json::Value) -> Self {
        Reply::Ok { data }
    }
    /// A `rejected` reply.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Reply::Rejected {
            reason: reason.into(),
        }
    }
    /// An `error` reply.
    pub fn error(reason: impl Into<String>) -> Self {
        Reply::Error {
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_matches_the_design_document() {
        let json = r#"{"saga_id":"s1","definition":"order@1","step":"reserve-inventory","action":"reserve",
            "kind":"forward","attempt":1,"idempotency_key":"s1/reserve-inventory/forward",
            "payload":{"order_id":"o1","customer_id":"c1","items":[{"sku":"A-1","quantity":2}],"amount_cents":1999,"currency":"EUR"}}"#;
        let cmd: Command = serde_json::from_str(json).expect("design example parses");
        assert_eq!(cmd.kind, CommandKind::Forward);
        assert_eq!(cmd.payload.items[0].quantity, 2);
        assert_eq!(
            cmd.idempotency_key,
            idempotency_key("s1", "reserve-inventory", CommandKind::Forward)
        );
    }

    #[test]
    fn replies_round_trip_with_outcome_tag() {
        let r: Reply =
            serde_json::from_str(r#"{"outcome":"rejected","reason":"insufficient_stock"}"#).expect("parses");
        assert_eq!(r, Reply::rejected("insufficient_stock"));
        let ok: Reply = serde_json::from_str(r#"{"outcome":"ok"}"#).expect("data defaults");
        assert_eq!(ok, Reply::ok(serde_json::Value::Null));
        let text = serde_json::to_string(&Reply::error("boom")).expect("serialises");
        assert_eq!(text, r#"{"outcome":"error","reason":"boom"}"#);
    }

    #[test]
    fn compensation_key_maps_to_forward_key() {
        assert_eq!(
            forward_key("s/charge-payment/compensate").as_deref(),
            Some("s/charge-payment/forward")
        );
        assert_eq!(forward_key("s/charge-payment/forward"), None);
    }
}

/// One saga lifecycle event as published on `saga.events.<definition>.<event>`
/// (and under the definition's domain alias, if it declares one): one per
/// history entry of the saga, `sequence` contiguous from 1. The JSON Schema
/// is `saga-definitions/schemas/saga-event.v1.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaEvent {
    /// Format version ([`EVENT_FORMAT_VERSION`]).
    pub v: u32,
    /// The saga.
    pub saga_id: String,
    /// `name@version` of the definition the saga runs.
    pub definition: String,
    /// 1-based, contiguous per saga: the history entry's number.
    pub sequence: u64,
    /// What happened: `created`, `started`, `step_succeeded`, `step_retry`,
    /// `step_rejected`, `step_unknown`, `step_failed`, `compensating`,
    /// `compensation_succeeded`, `compensation_retry`, `compensation_failed`,
    /// `completed`, `compensated`, `failed`, `aborted`, `retried`.
    pub event: String,
    /// The step the event is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The attempt the event is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Free text: a reason or an outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The saga's state after the event (`RUNNING`, `COMPLETED`, …).
    pub state: String,
    /// When the event happened, ms since the Unix epoch.
    pub at_ms: u64,
    /// When the saga was created, ms since the Unix epoch.
    pub saga_created_at_ms: u64,
    /// Correlation id of the request that created the saga.
    pub correlation_id: String,
    /// The order the saga runs.
    pub order: OrderPayload,
}
