//! The records the store keeps beside the saga itself and hands to the
//! sending side: outbox entries (commands), dead letters and saga events.
//! Plain data built from a saga; no I/O here.

use saga_wire::CommandKind;
use serde::{Deserialize, Serialize};

use crate::{
    definition::{OutputSchema, RetryPolicy, SagaDefinition},
    engine::{Command, HistoryEntry, Saga},
};

/// A command waiting in the outbox: exactly what is sent on NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OutboxEntry {
    /// Saga the command belongs to.
    pub saga_id: String,
    /// Step index.
    pub step: usize,
    /// Forward or compensate.
    pub kind: CommandKind,
    /// NATS subject.
    pub subject: String,
    /// Per-attempt request timeout.
    pub timeout_ms: u64,
    /// Backoff policy of the step.
    pub retry: RetryPolicy,
    /// Correlation id for headers and logs.
    pub correlation_id: String,
    /// The envelope.
    pub message: saga_wire::Command,
    /// The schema a forward command's output must match (the step's
    /// `output_schema`), for the dispatcher's check of the reply. Not
    /// stored: taken from the saga's definition when the entry is built or
    /// re-sent ([`OutboxEntry::with_output_schema`]).
    #[serde(skip)]
    pub output_schema: Option<OutputSchema>,
}

impl OutboxEntry {
    /// The outbox entry of `command` for `saga`.
    pub(crate) fn new(saga: &Saga, command: &Command) -> Self {
        OutboxEntry {
            saga_id: saga.id.clone(),
            step: command.step,
            kind: command.kind,
            subject: command.subject.clone(),
            timeout_ms: command.timeout_ms,
            retry: command.retry,
            correlation_id: saga.correlation_id.clone(),
            message: command.message.clone(),
            output_schema: None,
        }
        .with_output_schema(saga)
    }

    /// The entry with its step's `output_schema` from `saga`'s definition
    /// (forward commands only: a compensation's output is not kept).
    pub(crate) fn with_output_schema(mut self, saga: &Saga) -> Self {
        self.output_schema = match self.kind {
            CommandKind::Forward => saga
                .definition
                .steps
                .get(self.step)
                .and_then(|s| s.output_schema.clone()),
            CommandKind::Compensate => None,
        };
        self
    }
}

/// The record of a saga that entered FAILED: an operator must act
/// (`RetrySaga`). Published on `saga.dlq` as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeadLetter {
    /// The failed saga.
    pub saga_id: String,
    /// `name@version`.
    pub definition: String,
    /// Correlation id of the saga.
    pub correlation_id: String,
    /// Step whose compensation failed.
    pub step: String,
    /// Why.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub failed_at_ms: u64,
    /// The order.
    pub order: saga_wire::OrderPayload,
}

impl DeadLetter {
    /// The dead letter a transition written from `previous` owes: one when
    /// it made `saga` enter FAILED ([`crate::engine::enters_failed`]).
    pub(crate) fn on_entering(saga: &Saga, previous: Option<crate::engine::StateTag>) -> Option<Self> {
        Self::of(saga).filter(|_| crate::engine::enters_failed(saga, previous))
    }

    /// The dead letter of `saga` when it is FAILED.
    pub(crate) fn of(saga: &Saga) -> Option<Self> {
        let crate::engine::SagaState::Failed { step } = saga.state else {
            return None;
        };
        Some(DeadLetter {
            saga_id: saga.id.clone(),
            definition: saga.definition.id(),
            correlation_id: saga.correlation_id.clone(),
            step: saga
                .definition
                .steps
                .get(step)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            reason: saga.reason.clone().unwrap_or_default(),
            failed_at_ms: saga.updated_at_ms,
            order: saga.order.clone(),
        })
    }
}

/// A saga event waiting to be published to JetStream: the event and the
/// subjects it goes to (fixed when the transition is written, so a definition
/// reload never changes where an already-committed event goes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EventRecord {
    /// `saga.events.<definition>.<event>`.
    pub subject: String,
    /// The definition's domain alias for this event, if any (`orders.completed`).
    pub alias: Option<String>,
    /// The event.
    pub event: saga_wire::SagaEvent,
}

impl EventRecord {
    /// The event of history entry `h` of `saga`.
    pub(crate) fn new(saga: &Saga, h: &HistoryEntry) -> Self {
        Self::build(
            &saga.id,
            &saga.definition,
            &saga.order,
            &saga.correlation_id,
            saga.created_at_ms,
            h,
        )
    }

    pub(crate) fn build(
        saga_id: &str,
        d: &SagaDefinition,
        order: &saga_wire::OrderPayload,
        correlation_id: &str,
        created_at_ms: u64,
        h: &HistoryEntry,
    ) -> Self {
        EventRecord {
            subject: saga_wire::event_subject(&d.name, h.kind.as_str()),
            alias: d.events.get(h.kind.as_str()).cloned(),
            event: saga_wire::SagaEvent {
                v: saga_wire::EVENT_FORMAT_VERSION,
                saga_id: saga_id.to_string(),
                definition: d.id(),
                sequence: h.seq,
                event: h.kind.as_str().to_string(),
                step: h.step.clone(),
                attempt: h.attempt,
                detail: h.detail.clone(),
                state: h.state.as_str().to_string(),
                at_ms: h.at_ms,
                saga_created_at_ms: created_at_ms,
                correlation_id: correlation_id.to_string(),
                order: order.clone(),
            },
        }
    }
}
