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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use saga_core::engine::{self, Event, Outcome};
    use saga_wire::CommandKind;

    use super::*;

    const SAGA: &str = "0190b8a4-0000-7000-8000-0000000000aa";

    fn saga_of(definition: saga_core::definition::SagaDefinition) -> Saga {
        let order = crate::store::fixtures::order();
        engine::create(
            SAGA.into(),
            Arc::new(definition),
            order,
            "corr".into(),
            None,
            1_000,
        )
        .saga
    }

    /// Applies `event` at `now`, feeding the spans it writes to `traces`.
    fn step(traces: &mut Traces, saga: &mut Saga, event: Event, now: u64) -> Vec<SpanRecord> {
        let t = engine::transition(saga, &event, now)
            .expect("a valid event")
            .expect("a transition");
        let spans = traces.transition(Some(saga), &t.saga, saga.state.tag(), now);
        *saga = t.saga;
        spans
    }

    fn reply(step: usize, kind: CommandKind, outcome: Outcome) -> Event {
        Event::Reply {
            step,
            kind,
            attempt: 1,
            outcome,
        }
    }

    fn ms(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    #[test]
    fn a_compensated_saga_ends_with_its_root_and_its_compensation_phase() {
        let mut traces = Traces::default();
        let mut saga = saga_of(crate::store::fixtures::two_step_order());
        let trace = ids::saga_trace_id(SAGA).expect("uuid");
        assert!(step(&mut traces, &mut saga, Event::Start, 1_010).is_empty());
        let ok = Outcome::Ok(serde_json::json!({"reservation_id": "r"}));
        assert!(step(&mut traces, &mut saga, reply(0, CommandKind::Forward, ok), 1_020).is_empty());
        let no = Outcome::Rejected("card_declined".into());
        assert!(step(&mut traces, &mut saga, reply(1, CommandKind::Forward, no), 1_030).is_empty());
        let undone = Outcome::Ok(serde_json::json!({}));
        let spans = step(
            &mut traces,
            &mut saga,
            reply(0, CommandKind::Compensate, undone),
            1_050,
        );
        assert_eq!(saga.state, SagaState::Compensated);
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names, ["compensation", "saga"]);
        let (phase, root) = (&spans[0], &spans[1]);
        assert_eq!(
            (root.trace, root.id, root.parent),
            (trace, ids::root_span_id(trace), SpanId::INVALID)
        );
        assert_eq!((ms(root.start), ms(root.end)), (1_000, 1_050));
        assert_eq!(
            (phase.id, phase.parent),
            (ids::compensation_span_id(trace), root.id)
        );
        assert_eq!((ms(phase.start), ms(phase.end)), (1_030, 1_050));
        assert!(root
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "saga.state" && kv.value.as_str() == "COMPENSATED"));
        assert!(traces.compensating_since.is_empty() && traces.retried.is_empty());
    }

    #[test]
    fn a_completed_saga_writes_its_root_only_and_a_resumed_one_starts_its_phase_at_adoption() {
        let mut traces = Traces::default();
        let mut saga = saga_of(crate::store::fixtures::two_step_order());
        step(&mut traces, &mut saga, Event::Start, 1_010);
        let ok = || Outcome::Ok(serde_json::json!({}));
        step(
            &mut traces,
            &mut saga,
            reply(0, CommandKind::Forward, ok()),
            1_020,
        );
        let spans = step(
            &mut traces,
            &mut saga,
            reply(1, CommandKind::Forward, ok()),
            1_030,
        );
        assert_eq!(
            spans.iter().map(|s| s.name.as_ref()).collect::<Vec<_>>(),
            ["saga"]
        );
        assert_eq!(spans[0].status, Status::Ok);

        // A coordinator that adopts a compensating saga did not see it begin.
        let mut resumed = Traces::default();
        let mut saga = saga_of(crate::store::fixtures::two_step_order());
        step(&mut resumed, &mut saga, Event::Start, 1_010);
        step(
            &mut resumed,
            &mut saga,
            reply(0, CommandKind::Forward, ok()),
            1_020,
        );
        let no = Outcome::Rejected("card_declined".into());
        step(&mut resumed, &mut saga, reply(1, CommandKind::Forward, no), 1_030);
        let mut fresh = Traces::default();
        fresh.adopted(&saga, 5_000);
        let spans = step(
            &mut fresh,
            &mut saga,
            reply(0, CommandKind::Compensate, ok()),
            5_100,
        );
        let phase = spans.iter().find(|s| s.name == "compensation").expect("a phase");
        assert_eq!((ms(phase.start), ms(phase.end)), (5_000, 5_100));
    }

    #[test]
    fn a_failed_saga_retried_by_an_operator_ends_again_under_its_root() {
        let mut traces = Traces::default();
        let mut saga = saga_of(crate::store::fixtures::two_step_order());
        let ok = || Outcome::Ok(serde_json::json!({}));
        step(&mut traces, &mut saga, Event::Start, 1_010);
        step(
            &mut traces,
            &mut saga,
            reply(0, CommandKind::Forward, ok()),
            1_020,
        );
        step(
            &mut traces,
            &mut saga,
            reply(1, CommandKind::Forward, Outcome::Rejected("no".into())),
            1_030,
        );
        let refused = Outcome::Rejected("cannot release".into());
        let spans = step(
            &mut traces,
            &mut saga,
            reply(0, CommandKind::Compensate, refused),
            1_040,
        );
        assert!(matches!(saga.state, SagaState::Failed { .. }), "{:?}", saga.state);
        let root = spans.iter().find(|s| s.name == "saga").expect("the root");
        assert!(matches!(root.status, Status::Error { .. }));
        assert!(step(&mut traces, &mut saga, Event::Retry, 9_000).is_empty());
        let spans = step(
            &mut traces,
            &mut saga,
            reply(0, CommandKind::Compensate, ok()),
            9_100,
        );
        assert_eq!(saga.state, SagaState::Compensated);
        assert_eq!(spans.len(), 1, "{spans:?}");
        let again = &spans[0];
        assert_eq!(again.name, "saga retried");
        assert_eq!(again.parent, ids::root_span_id(again.trace));
        assert_ne!(again.id, ids::root_span_id(again.trace));
        assert_eq!((ms(again.start), ms(again.end)), (9_000, 9_100));
    }

    #[test]
    fn an_await_that_ends_writes_its_wait_and_a_saga_not_a_uuid_writes_nothing() {
        let yaml =
            "name: wait\nversion: 1\nsteps:\n  - name: confirm\n    await: confirmed\n    timeout: 1m\n";
        let definition =
            saga_core::definition::parse(std::path::Path::new("wait.yaml"), yaml).expect("a definition");
        let mut traces = Traces::default();
        let mut saga = saga_of(definition);
        step(&mut traces, &mut saga, Event::Start, 1_010);
        assert_eq!(saga.steps[0].status, StepStatus::Waiting);
        let signal = Event::Signal {
            name: "confirmed".into(),
            id: "s-1".into(),
            payload: serde_json::json!({}),
        };
        let spans = step(&mut traces, &mut saga, signal, 1_500);
        let wait = spans
            .iter()
            .find(|s| s.name == "await confirmed")
            .expect("the wait's span");
        assert_eq!(wait.parent, ids::root_span_id(wait.trace));
        assert_eq!((ms(wait.start), ms(wait.end)), (1_010, 1_500));
        assert!(spans.iter().any(|s| s.name == "saga"));

        let mut other = saga.clone();
        other.id = "not-a-uuid".into();
        assert!(ended(&other, 2_000, None, false).is_empty());
        assert!(create_order("not-a-uuid", "c", SystemTime::now(), true, None).is_none());
    }
}
