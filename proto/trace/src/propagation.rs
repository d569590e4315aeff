//! W3C trace context in NATS headers, through the standard propagator
//! (`traceparent`, and `tracestate` when there is one).
//!
//! What arrives is untrusted: the propagator rejects malformed values, and
//! [`parent_in_saga`] keeps a parent only when it belongs to the command's
//! own saga, so a sender cannot graft a command's spans onto another trace.

use async_nats::header::HeaderMap;
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    Context,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use crate::ids;

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Writes the context of span `span` of trace `trace` into `headers`.
pub fn inject(headers: &mut HeaderMap, trace: TraceId, span: SpanId, sampled: bool) {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let cx = Context::new().with_remote_span_context(SpanContext::new(
        trace,
        span,
        flags,
        true,
        TraceState::default(),
    ));
    TraceContextPropagator::new().inject_context(&cx, &mut Inject(headers));
}

/// The valid span context `headers` carry, if any.
pub fn extract(headers: &HeaderMap) -> Option<SpanContext> {
    let cx = TraceContextPropagator::new().extract(&Extract(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The valid span context of a `traceparent` value (and `tracestate`), as a
/// gRPC client sends them in its metadata.
pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The parent for a span handling a command of saga `saga_id`: the context
/// in `headers` when it is in that saga's trace, else the saga's root span
/// (a command from an older coordinator, or a header that lies). `None` when
/// `saga_id` is not a UUID.
pub fn parent_in_saga(headers: Option<&HeaderMap>, saga_id: &str) -> Option<Context> {
    let trace = ids::saga_trace_id(saga_id)?;
    let sc = headers
        .and_then(extract)
        .filter(|sc| sc.trace_id() == trace)
        .unwrap_or_else(|| {
            SpanContext::new(
                trace,
                ids::root_span_id(trace),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )
        });
    Some(Context::new().with_remote_span_context(sc))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAGA: &str = "0190b8a4-0000-7000-8000-0000000000aa";

    #[test]
    fn what_is_injected_is_extracted() {
        let trace = ids::saga_trace_id(SAGA).expect("uuid");
        let span = ids::random_span_id();
        let mut h = HeaderMap::new();
        inject(&mut h, trace, span, true);
        let tp = h.get("traceparent").map(|v| v.as_str().to_string());
        assert_eq!(tp, Some(format!("00-{trace}-{span}-01")));
        let sc = extract(&h).expect("a context");
        assert_eq!(
            (sc.trace_id(), sc.span_id(), sc.is_sampled()),
            (trace, span, true)
        );
        let mut unsampled = HeaderMap::new();
        inject(&mut unsampled, trace, span, false);
        assert_eq!(extract(&unsampled).map(|sc| sc.is_sampled()), Some(false));
    }

    #[test]
    fn a_malformed_or_foreign_traceparent_falls_back_to_the_sagas_root() {
        let trace = ids::saga_trace_id(SAGA).expect("uuid");
        let root = ids::root_span_id(trace);
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", bad);
            let cx = parent_in_saga(Some(&h), SAGA).expect("a uuid saga");
            let sc = cx.span().span_context().clone();
            assert_eq!((sc.trace_id(), sc.span_id()), (trace, root), "{bad}");
        }
        assert!(parent_in_saga(None, "not-a-uuid").is_none());
        assert!(parse("garbage", None).is_none());
        let client = parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("k=v"),
        )
        .expect("valid");
        assert_eq!(client.span_id().to_string(), "00f067aa0ba902b7");
        let cx = parent_in_saga(None, SAGA).expect("a uuid saga");
        assert_eq!(cx.span().span_context().span_id(), root);
    }
}
