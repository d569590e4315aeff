//! The spans of a saga's trace that the runner writes, from its
//! transitions (only while spans are exported): the saga's root span and
//! its compensation phase when it ends, and a span for each `await` or
//! `sleep` step when its wait ends. They ride the batch of the transition
//! and leave with its commit, like a command: a transition that never
//! became durable leaves no span.
//!
//! The root and the compensation phase have ids derived from the saga id,
//! so the attempts sent before a restart and those sent after it hang
//! under the same spans.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use saga_core::{
    definition::StepKind,
    engine::{Saga, SagaState, StateTag, StepStatus},
};
use saga_trace::{ids, KeyValue, Link, SpanContext, SpanId, SpanKind, SpanRecord, Status};

/// What the runner remembers for the spans of its sagas' ends.
#[derive(Debug, Default)]
pub(crate) struct Traces {
    /// Since when each compensating saga compensates (ms).
    compensating_since: HashMap<String, u64>,
    /// FAILED sagas an operator retried: their root span is already written.
    retried: HashSet<String>,
}

impl Traces {
    /// A saga resumed from the store at `now_ms`: when its compensation
    /// began is not stored, so its phase span starts at the resumption.
    pub(crate) fn adopted(&mut self, saga: &Saga, now_ms: u64) {
        if saga.state.tag() == StateTag::Compensating {
            self.compensating_since.entry(saga.id.clone()).or_insert(now_ms);
        }
    }

    /// Saga `id` is no longer this runner's (another coordinator has it).
    pub(crate) fn forget(&mut self, id: &str) {
        self.compensating_since.remove(id);
        self.retried.remove(id);
    }

    /// The spans a transition to `after` (from `before`, whose state was
    /// `previous`) writes at `now_ms`: its waits that ended, its end.
    pub(crate) fn transition(
        &mut self,
        before: Option<&Saga>,
        after: &Saga,
        previous: StateTag,
        now_ms: u64,
    ) -> Vec<SpanRecord> {
        let tag = after.state.tag();
        let mut out = match before {
            Some(before) => waits_ended(before, after, now_ms),
            None => Vec::new(),
        };
        if previous == StateTag::Failed && tag != StateTag::Failed {
            self.retried.insert(after.id.clone());
        }
        if tag == StateTag::Compensating && previous != StateTag::Compensating {
            self.compensating_since.insert(after.id.clone(), now_ms);
        }
        if tag.is_terminal() {
            let since = self.compensating_since.remove(&after.id);
            let again = self.retried.remove(&after.id);
            out.extend(ended(after, now_ms, since, again));
        }
        out
    }
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The root span (`saga`) of a saga that just ended at `now_ms`, and its
/// compensation phase (`compensation`) when it compensated since
/// `compensating_since` (ms). `again`: an operator's retry of a FAILED saga
/// ended it once more, so this end is a span of its own under the root
/// already written.
fn ended(saga: &Saga, now_ms: u64, compensating_since: Option<u64>, again: bool) -> Vec<SpanRecord> {
    let Some(trace) = ids::saga_trace_id(&saga.id) else {
        return Vec::new();
    };
    let root = ids::root_span_id(trace);
    let (id, parent, name) = if again {
        (ids::random_span_id(), root, "saga retried")
    } else {
        (root, SpanId::INVALID, "saga")
    };
    let start = if again {
        compensating_since.unwrap_or(now_ms)
    } else {
        saga.created_at_ms
    };
    let mut span = SpanRecord::new(trace, id, parent, name, at(start), at(now_ms));
    let state = saga.state.tag();
    span.attributes = vec![
        KeyValue::new("saga.id", saga.id.clone()),
        KeyValue::new("saga.definition", saga.definition.id()),
        KeyValue::new("saga.state", state.as_str()),
        KeyValue::new("saga.correlation_id", saga.correlation_id.clone()),
        KeyValue::new("saga.order_id", saga.order.order_id.clone()),
    ];
    if let Some(reason) = &saga.reason {
        span.attributes.push(KeyValue::new("saga.reason", reason.clone()));
    }
    span.status = match saga.state {
        SagaState::Failed { .. } => Status::error(saga.reason.clone().unwrap_or_else(|| "FAILED".into())),
        _ => Status::Ok,
    };
    let mut out = Vec::with_capacity(2);
    if let Some(since) = compensating_since {
        let mut phase = SpanRecord::new(
            trace,
            ids::compensation_span_id(trace),
            root,
            "compensation",
            at(since),
            at(now_ms),
        );
        phase.attributes = vec![KeyValue::new("saga.state", state.as_str())];
        if let Some(reason) = &saga.reason {
            phase
                .attributes
                .push(KeyValue::new("saga.reason", reason.clone()));
        }
        if !again {
            out.push(phase);
        }
    }
    out.push(span);
    out
}

/// A span per `await` or `sleep` step of `after` whose wait ended in this
/// transition (it was waiting or sleeping in `before`), at `now_ms`.
fn waits_ended(before: &Saga, after: &Saga, now_ms: u64) -> Vec<SpanRecord> {
    let Some(trace) = ids::saga_trace_id(&after.id) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, (was, now)) in before.steps.iter().zip(after.steps.iter()).enumerate() {
        if !matches!(was.status, StepStatus::Waiting | StepStatus::Sleeping)
            || matches!(now.status, StepStatus::Waiting | StepStatus::Sleeping)
        {
            continue;
        }
        let Some(step) = after.definition.steps.get(k) else {
            continue;
        };
        let name = match &step.kind {
            StepKind::Await { signal } => format!("await {signal}"),
            StepKind::Sleep { .. } => "sleep".to_string(),
            StepKind::Command => continue,
        };
        let start = now.started_at_ms.or(was.started_at_ms).unwrap_or(now_ms);
        let mut span = SpanRecord::new(
            trace,
            ids::random_span_id(),
            ids::root_span_id(trace),
            name,
            at(start),
            at(now.finished_at_ms.unwrap_or(now_ms)),
        );
        span.kind = SpanKind::Internal;
        span.attributes = vec![
            KeyValue::new("saga.step", step.name.clone()),
            KeyValue::new("saga.step_status", status_name(now.status)),
        ];
        if let Some(outcome) = &now.last_outcome {
            span.attributes
                .push(KeyValue::new("saga.outcome", outcome.clone()));
        }
        out.push(span);
    }
    out
}

/// A step's status as its span shows it (the wire's lowercase names).
fn status_name(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Pending => "pending",
        StepStatus::Running => "running",
        StepStatus::Succeeded => "succeeded",
        StepStatus::Rejected => "rejected",
        StepStatus::Unknown => "unknown",
        StepStatus::Compensating => "compensating",
        StepStatus::Compensated => "compensated",
        StepStatus::CompensationFailed => "compensation_failed",
        StepStatus::Failed => "failed",
        StepStatus::Waiting => "waiting",
        StepStatus::Sleeping => "sleeping",
        StepStatus::Skipped => "skipped",
    }
}

/// The `CreateOrder` call that made (or found, `created` false) saga
/// `saga_id`, from `start` to now: a server span under the saga's root. The
/// trace is the saga's, so a client's own context (`client`, from its
/// `traceparent`) is linked rather than continued.
pub(crate) fn create_order(
    saga_id: &str,
    correlation_id: &str,
    start: SystemTime,
    created: bool,
    client: Option<SpanContext>,
) -> Option<SpanRecord> {
    let trace = ids::saga_trace_id(saga_id)?;
    let mut span = SpanRecord::new(
        trace,
        ids::random_span_id(),
        ids::root_span_id(trace),
        "CreateOrder",
        start,
        SystemTime::now(),
    );
    span.kind = SpanKind::Server;
    span.status = Status::Ok;
    span.attributes = vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", "saga.v1.SagaService"),
        KeyValue::new("rpc.method", "CreateOrder"),
        KeyValue::new("saga.id", saga_id.to_string()),
        KeyValue::new("saga.correlation_id", correlation_id.to_string()),
        KeyValue::new("saga.created", created),
    ];
    if let Some(client) = client {
        span.links = vec![Link::with_context(client)];
    }
    Some(span)
}
