//! A command attempt's span (only while spans are exported): the
//! dispatcher keeps a row per command, not a task, so the span is written
//! whole when the attempt ends — its id (derived from the command's key and
//! attempt, so a re-send after a crash is the same span) already sent in
//! the request's `traceparent`, so the participant's span hangs under it.
//!
//! Forward attempts hang under the saga's root span, compensations under
//! its compensation phase (ids derived from the saga id: the tree holds
//! across restarts). A wait before a retry is a `backoff` span beside them.

use std::time::SystemTime;

use saga_trace::{ids, KeyValue, SpanId, SpanKind, SpanRecord, Spans, Status, TraceId};
use saga_wire::CommandKind;

use crate::store::OutboxEntry;

/// What an attempt's span needs beyond its row.
pub(super) struct AttemptTrace {
    trace: TraceId,
    span: SpanId,
    sampled: bool,
    /// When the command reached the dispatcher (its backoff began).
    admitted: SystemTime,
    /// When its request left.
    sent: Option<SystemTime>,
    step: Box<str>,
    idempotency_key: Box<str>,
}

impl AttemptTrace {
    /// The trace of `entry`'s attempt, when spans are exported and its saga
    /// id is a trace id.
    pub(super) fn start(spans: Option<&Spans>, entry: &OutboxEntry) -> Option<Box<AttemptTrace>> {
        let spans = spans?;
        let trace = ids::saga_trace_id(&entry.saga_id)?;
        Some(Box::new(AttemptTrace {
            trace,
            span: ids::attempt_span_id(trace, &entry.message.idempotency_key, entry.message.attempt),
            sampled: spans.sampled(trace),
            admitted: SystemTime::now(),
            sent: None,
            step: entry.message.step.as_str().into(),
            idempotency_key: entry.message.idempotency_key.as_str().into(),
        }))
    }

    /// `(trace, span, sampled)` for the request's `traceparent`.
    pub(super) fn context(&self) -> (TraceId, SpanId, bool) {
        (self.trace, self.span, self.sampled)
    }

    /// The request left now.
    pub(super) fn sent(&mut self) {
        self.sent = Some(SystemTime::now());
    }

    /// Writes the attempt's span (and its backoff's) now that it ended with
    /// `outcome` (the metric's label) and, for a failure, `error`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
        self,
        spans: &Spans,
        saga_id: &str,
        correlation_id: &str,
        participant: &str,
        action: &str,
        kind: CommandKind,
        attempt: u32,
        outcome: &'static str,
        error: Option<String>,
    ) {
        let parent = match kind {
            CommandKind::Forward => ids::root_span_id(self.trace),
            CommandKind::Compensate => ids::compensation_span_id(self.trace),
        };
        let now = SystemTime::now();
        let sent = self.sent.unwrap_or(now);
        if attempt > 1 && sent > self.admitted {
            let mut backoff = SpanRecord::new(
                self.trace,
                ids::random_span_id(),
                parent,
                "backoff",
                self.admitted,
                sent,
            );
            backoff.attributes = vec![
                KeyValue::new("saga.step", self.step.to_string()),
                KeyValue::new("saga.attempt", i64::from(attempt)),
            ];
            spans.emit(backoff);
        }
        let mut span = SpanRecord::new(
            self.trace,
            self.span,
            parent,
            format!("{participant} {action}"),
            sent,
            now,
        );
        span.kind = SpanKind::Client;
        span.attributes = vec![
            KeyValue::new("saga.id", saga_id.to_string()),
            KeyValue::new("saga.correlation_id", correlation_id.to_string()),
            KeyValue::new("saga.step", self.step.to_string()),
            KeyValue::new("saga.participant", participant.to_string()),
            KeyValue::new("saga.action", action.to_string()),
            KeyValue::new("saga.kind", kind.as_str()),
            KeyValue::new("saga.attempt", i64::from(attempt)),
            KeyValue::new("saga.outcome", outcome),
            KeyValue::new("saga.idempotency_key", self.idempotency_key.to_string()),
            KeyValue::new("messaging.system", "nats"),
        ];
        span.status = match (outcome, error) {
            ("ok" | "rejected", _) => Status::Ok,
            (_, Some(e)) => Status::error(e),
            (_, None) => Status::error(outcome),
        };
        if self.sent.is_none() {
            // Refused before it left (an open breaker): nothing was sent.
            span.attributes.push(KeyValue::new("saga.sent", false));
        }
        spans.emit(span);
    }
}
