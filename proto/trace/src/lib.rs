//! Logs and traces, the same in every process of the engine.
//!
//! [`init`] installs the `tracing` subscriber: the log lines (text or JSON)
//! and, when an OTLP endpoint is configured ([`TraceArgs`], the standard
//! `OTEL_*` variables), the OpenTelemetry bridge that turns `tracing` spans
//! into exported spans. Without an endpoint nothing is exported and nothing
//! costs.
//!
//! A saga is one trace whose id is the saga id ([`ids`]). Spans that have no
//! `tracing` span behind them — a command attempt lives in the dispatcher as
//! a table row, not a task — are written whole with [`Spans::emit`], with
//! the ids the whole engine derives the same way, so a saga's tree holds
//! across processes and restarts. Export never blocks a saga (see `export`).
#![deny(unreachable_pub)]
#![warn(missing_docs)]

mod export;
pub mod ids;
pub mod propagation;

use std::{
    borrow::Cow,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

pub use export::{SPANS_DROPPED, SPANS_EXPORTED};
pub use opentelemetry::{
    trace::{Event, Link, SpanContext, SpanId, SpanKind, Status, TraceId},
    Context, KeyValue,
};
pub use tracing_opentelemetry::OpenTelemetrySpanExt;

use opentelemetry::{
    trace::{TraceFlags, TraceState, TracerProvider as _},
    InstrumentationScope,
};
use opentelemetry_sdk::{
    trace::{Config, SamplingDecision, SdkTracerProvider, ShouldSample, SpanData, SpanEvents, SpanLinks},
    Resource,
};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};

/// OTLP trace export settings, the same flags and variables on every process.
#[derive(Clone, Debug, clap::Args)]
pub struct TraceArgs {
    /// Base URL of the OTLP collector (e.g. `http://jaeger:4318` for
    /// HTTP/protobuf, `http://jaeger:4317` for gRPC). Unset: no trace export.
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) wins over it.
    /// Credentials go in `OTEL_EXPORTER_OTLP_HEADERS`, never in the URL.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` or `grpc`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "http/protobuf", value_parser = ["http/protobuf", "grpc"])]
    pub otlp_protocol: String,
    /// `service.name` of this process's spans (default: the program's name;
    /// `OTEL_RESOURCE_ATTRIBUTES` may set it and any other attribute).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
    /// Finished spans waiting for export at most; past it they are dropped
    /// (counted in `otlp_spans_dropped_total`) rather than slow anything.
    #[arg(long, env = "SAGA_OTLP_QUEUE", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub otlp_queue: u32,
}

impl Default for TraceArgs {
    fn default() -> Self {
        TraceArgs {
            otlp_endpoint: None,
            otlp_protocol: "http/protobuf".into(),
            otel_service_name: None,
            otlp_queue: 16_384,
        }
    }
}

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A setting is wrong.
    #[error("{0}")]
    Config(String),
    /// The exporter thread could not start.
    #[error("cannot start the trace exporter: {0}")]
    Start(String),
    /// The OTLP exporter refused its settings.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Log line format (`--log-format` of every process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    Pretty,
    /// One JSON object per line, span fields included.
    Json,
}

/// Where export stands for this process; [`Telemetry::shutdown`] sends what
/// is queued before the process exits.
#[must_use = "shut it down before exiting, or the last spans are lost"]
pub struct Telemetry {
    exporting: Option<(Arc<export::Exporter>, SdkTracerProvider)>,
}

impl Telemetry {
    /// Exports what is queued (at most 3 s) and stops exporting.
    pub fn shutdown(self) {
        if let Some((exporter, provider)) = self.exporting {
            let _ = provider.shutdown();
            exporter.shutdown(Duration::from_secs(3));
        }
    }
}

/// The process's span writer, when spans are exported.
static SPANS: OnceLock<Spans> = OnceLock::new();

/// The span writer, or `None` when this process exports no spans.
pub fn spans() -> Option<&'static Spans> {
    SPANS.get()
}

/// Sets up logging (to stderr, filtered by `RUST_LOG`, `info` by default)
/// and, when `args` name an endpoint, span export as `default_service`.
/// Call once, inside no particular runtime; the exporter has its own thread.
///
/// # Errors
/// Invalid export settings (a URL that does not parse or carries
/// credentials), or the exporter cannot start. Logging is set up anyway.
pub fn init(args: &TraceArgs, default_service: &str, format: LogFormat) -> Result<Telemetry, TraceError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Pretty => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let setup = exporting(args, default_service);
    // `RUST_LOG` filters the log lines only: a deployment that logs at
    // `warn` still exports its spans (those at `info` and above).
    let bridge = setup
        .as_ref()
        .ok()
        .and_then(|t| t.exporting.as_ref())
        .map(|(_, provider)| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(default_service.to_string()))
                .with_tracked_inactivity(false)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(bridge)
        .try_init();
    if let Ok(Telemetry { exporting: Some(_) }) = &setup {
        tracing::info!(
            endpoint = %endpoint_for_logs(args),
            protocol = %args.otlp_protocol,
            "exporting traces over OTLP"
        );
    }
    setup
}

/// The endpoint as a log may show it: scheme, host and port only.
fn endpoint_for_logs(args: &TraceArgs) -> String {
    let url = traces_endpoint(args).unwrap_or_default();
    let (scheme, host, _, _) = split_url(&url);
    format!("{scheme}://{host}")
}

/// `(scheme, host and port, whether user info was cut out, the rest)` of `url`.
fn split_url(url: &str) -> (&str, &str, bool, &str) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let host = authority.rsplit('@').next().unwrap_or(authority);
    (scheme, host, authority.contains('@'), path)
}

/// The full traces URL: the signal's own variable, else the base endpoint
/// (with `/v1/traces` for HTTP, as the specification says).
fn traces_endpoint(args: &TraceArgs) -> Option<String> {
    if let Some(url) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        return Some(url.trim().to_string());
    }
    let base = args.otlp_endpoint.as_deref()?.trim();
    if base.is_empty() {
        return None;
    }
    Some(match protocol(args) {
        Protocol::Grpc => base.to_string(),
        Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
    })
}

fn protocol(args: &TraceArgs) -> Protocol {
    if args.otlp_protocol == "grpc" {
        Protocol::Grpc
    } else {
        Protocol::HttpProtobuf
    }
}

/// Checks a traces URL: `http` or `https`, a host, no user or password.
fn check_endpoint(url: &str) -> Result<(), TraceError> {
    let bad = |why: &str| TraceError::Config(format!("OTLP endpoint {}: {why}", redact(url)));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not a URL"))?;
    if scheme != "http" && scheme != "https" {
        return Err(bad("the scheme must be http or https"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(bad(
            "credentials do not belong in the URL; put them in OTEL_EXPORTER_OTLP_HEADERS",
        ));
    }
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if url.len() > 2048 {
        return Err(bad("longer than 2048 bytes"));
    }
    Ok(())
}

/// A URL for an error message, with any user info cut out.
fn redact(url: &str) -> String {
    if !url.contains("://") {
        return url.chars().take(100).collect();
    }
    let (scheme, host, cut, path) = split_url(url);
    let cut = if cut { "…@" } else { "" };
    format!(
        "{scheme}://{cut}{host}{}",
        path.chars().take(200).collect::<String>()
    )
}

fn exporting(args: &TraceArgs, default_service: &str) -> Result<Telemetry, TraceError> {
    let Some(url) = traces_endpoint(args) else {
        return Ok(Telemetry { exporting: None });
    };
    check_endpoint(&url)?;
    if protocol(args) == Protocol::HttpProtobuf && url.starts_with("https://") {
        // The HTTP exporter's client (hyper, plain TCP) has no TLS.
        return Err(TraceError::Config(format!(
            "OTLP endpoint {}: https needs OTEL_EXPORTER_OTLP_PROTOCOL=grpc (OTLP/HTTP is sent in plain HTTP only)",
            redact(&url)
        )));
    }
    let resource = resource(args, default_service);
    let (exporter, queue) =
        export::Exporter::start(url, protocol(args), resource.clone(), args.otlp_queue as usize)?;
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(export::QueueProcessor(queue.clone()))
        .build();
    let spans = Spans {
        queue,
        // The standard OTEL_TRACES_SAMPLER(_ARG), as the SDK reads them.
        sampler: Arc::from(Config::default().sampler),
        scope: InstrumentationScope::builder(default_service.to_string())
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    };
    let _ = SPANS.set(spans);
    Ok(Telemetry {
        exporting: Some((Arc::new(exporter), provider)),
    })
}

/// The resource: the standard detectors (`OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_SERVICE_NAME`), the service name defaulting to the program's.
fn resource(args: &TraceArgs, default_service: &str) -> Resource {
    let builder = Resource::builder();
    let named_by_attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES")
        .is_ok_and(|a| a.split(',').any(|kv| kv.trim().starts_with("service.name=")));
    match &args.otel_service_name {
        Some(name) => builder.with_service_name(name.clone()),
        None if named_by_attributes => builder,
        None => builder.with_service_name(default_service.to_string()),
    }
    .build()
}

/// Writes whole spans into the export queue (the spans no `tracing` span
/// stands for); cheap to clone.
#[derive(Debug, Clone)]
pub struct Spans {
    queue: export::Queue,
    sampler: Arc<dyn ShouldSample>,
    scope: InstrumentationScope,
}

/// A finished span of a saga's trace.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// The saga's trace.
    pub trace: TraceId,
    /// This span.
    pub id: SpanId,
    /// Its parent; [`SpanId::INVALID`] for the saga's root.
    pub parent: SpanId,
    /// What it is (`saga`, `command`, `backoff`, …).
    pub name: Cow<'static, str>,
    /// Client, server or internal.
    pub kind: SpanKind,
    /// When it began.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes.
    pub attributes: Vec<KeyValue>,
    /// Events inside it.
    pub events: Vec<Event>,
    /// Links to spans of other traces.
    pub links: Vec<Link>,
    /// Ok, error, or unset.
    pub status: Status,
}

impl SpanRecord {
    /// An internal span of `trace` with no attributes yet.
    pub fn new(
        trace: TraceId,
        id: SpanId,
        parent: SpanId,
        name: impl Into<Cow<'static, str>>,
        start: SystemTime,
        end: SystemTime,
    ) -> Self {
        SpanRecord {
            trace,
            id,
            parent,
            name: name.into(),
            kind: SpanKind::Internal,
            start,
            end: end.max(start),
            attributes: Vec::new(),
            events: Vec::new(),
            links: Vec::new(),
            status: Status::Unset,
        }
    }
}

impl Spans {
    /// Whether the spans of `trace` are sampled (the same answer for every
    /// span of a saga: the standard samplers decide by trace id at the root).
    pub fn sampled(&self, trace: TraceId) -> bool {
        let r = self
            .sampler
            .should_sample(None, trace, "saga", &SpanKind::Internal, &[], &[]);
        r.decision == SamplingDecision::RecordAndSample
    }

    /// Queues `span` for export when its trace is sampled.
    pub fn emit(&self, span: SpanRecord) {
        if !self.sampled(span.trace) {
            return;
        }
        let mut events = SpanEvents::default();
        events.events = span.events;
        let mut links = SpanLinks::default();
        links.links = span.links;
        self.queue.push(SpanData {
            span_context: SpanContext::new(
                span.trace,
                span.id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: span.parent,
            parent_span_is_remote: false,
            span_kind: span.kind,
            name: span.name,
            start_time: span.start,
            end_time: span.end,
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events,
            links,
            status: span.status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: &str, protocol: &str) -> TraceArgs {
        TraceArgs {
            otlp_endpoint: Some(endpoint.into()),
            otlp_protocol: protocol.into(),
            ..TraceArgs::default()
        }
    }

    #[test]
    fn the_http_endpoint_gets_the_traces_path_and_grpc_keeps_the_base() {
        if std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() {
            return;
        }
        assert_eq!(
            traces_endpoint(&args("http://jaeger:4318/", "http/protobuf")).as_deref(),
            Some("http://jaeger:4318/v1/traces")
        );
        assert_eq!(
            traces_endpoint(&args("http://jaeger:4317", "grpc")).as_deref(),
            Some("http://jaeger:4317")
        );
        assert_eq!(traces_endpoint(&args("  ", "grpc")), None);
        assert_eq!(traces_endpoint(&TraceArgs::default()), None);
    }

    #[test]
    fn an_endpoint_with_credentials_or_no_host_is_refused_without_echoing_them() {
        for bad in [
            "http://user:s3cret@collector:4318/v1/traces",
            "ftp://collector/v1/traces",
            "collector:4318",
            "http:///v1/traces",
        ] {
            let e = check_endpoint(bad).expect_err(bad).to_string();
            assert!(!e.contains("s3cret") && !e.contains("user:"), "{e}");
        }
        assert!(check_endpoint("https://collector.example:4318/v1/traces").is_ok());
        let https = args("https://collector.example:4318", "http/protobuf");
        if std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() {
            let e = exporting(&https, "t")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("https needs OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), "{e}");
        }
        let shown = endpoint_for_logs(&args("http://u:p@c:4318/x", "http/protobuf"));
        if std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() {
            assert_eq!(shown, "http://c:4318");
        }
    }
}
