//! A saga is one trace: its trace id is the saga id's 16 bytes, and the
//! spans every process hangs under it have ids any process can compute
//! from the saga id alone, so a coordinator resuming a saga after a crash
//! (or another coordinator adopting it) continues the same tree.

use opentelemetry::trace::{SpanId, TraceId};

/// The trace of saga `saga_id` (its UUID's bytes), if `saga_id` is a UUID.
pub fn saga_trace_id(saga_id: &str) -> Option<TraceId> {
    let id = uuid::Uuid::parse_str(saga_id).ok()?;
    let trace = TraceId::from_bytes(*id.as_bytes());
    (trace != TraceId::INVALID).then_some(trace)
}

/// The saga's root span (`saga`), parent of everything else in its trace.
pub fn root_span_id(trace: TraceId) -> SpanId {
    derived(trace, b"saga")
}

/// The saga's compensation phase (`compensation`), parent of its
/// compensation attempts.
pub fn compensation_span_id(trace: TraceId) -> SpanId {
    derived(trace, b"compensation")
}

/// Attempt `attempt` of the command with `idempotency_key`: derived, so
/// the attempt a coordinator re-sends after a crash (same key, same
/// attempt) is the same span, and the participant's span of the delivery
/// before the crash still has its parent.
pub fn attempt_span_id(trace: TraceId, idempotency_key: &str, attempt: u32) -> SpanId {
    let mut tag = Vec::with_capacity(idempotency_key.len() + 12);
    tag.extend_from_slice(b"attempt/");
    tag.extend_from_slice(idempotency_key.as_bytes());
    tag.extend_from_slice(&attempt.to_be_bytes());
    derived(trace, &tag)
}

/// A fresh random span id (a command attempt, a `CreateOrder` call).
pub fn random_span_id() -> SpanId {
    loop {
        let (a, _) = uuid::Uuid::new_v4().as_u64_pair();
        if a != 0 {
            return SpanId::from_bytes(a.to_be_bytes());
        }
    }
}

/// FNV-1a over a tag and the trace id: fixed forever (unlike std's
/// hasher), so every build of every process derives the same ids.
fn derived(trace: TraceId, tag: &[u8]) -> SpanId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.iter().chain(trace.to_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    SpanId::from_bytes(h.max(1).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAGA: &str = "0190b8a4-0000-7000-8000-0000000000aa";

    #[test]
    fn the_trace_id_is_the_saga_id_and_the_derived_ids_are_stable_and_distinct() {
        let trace = saga_trace_id(SAGA).expect("a uuid");
        assert_eq!(trace.to_string(), SAGA.replace('-', ""));
        assert_eq!(root_span_id(trace), root_span_id(trace));
        assert_ne!(root_span_id(trace), compensation_span_id(trace));
        assert_ne!(root_span_id(trace), SpanId::INVALID);
        let key = format!("{SAGA}/charge-payment/forward");
        assert_eq!(attempt_span_id(trace, &key, 2), attempt_span_id(trace, &key, 2));
        assert_ne!(attempt_span_id(trace, &key, 1), attempt_span_id(trace, &key, 2));
        let other = saga_trace_id("0190b8a4-0000-7000-8000-0000000000ab").expect("a uuid");
        assert_ne!(root_span_id(trace), root_span_id(other));
        // Pinned: a change here would break the trees of sagas in flight across an upgrade.
        assert_eq!(root_span_id(trace).to_string(), "4bddf866bd8fc032");
        assert_eq!(compensation_span_id(trace).to_string(), "1e85606a33f4fa04");
    }

    #[test]
    fn a_saga_id_that_is_not_a_uuid_has_no_trace() {
        assert_eq!(saga_trace_id("not-a-uuid"), None);
        assert_eq!(saga_trace_id("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(saga_trace_id(""), None);
    }
}
