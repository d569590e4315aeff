//! An OTLP trace receiver for tests: the collector's `TraceService` over
//! gRPC (tonic, from the OpenTelemetry protobuf definitions) and
//! `POST /v1/traces` over HTTP/protobuf, on loopback listeners the test
//! binds and keeps. It keeps every span it is sent, flattened.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue, KeyValue},
};
use prost::Message;
use tokio::task::JoinHandle;

/// One received span.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// Hex trace id (the saga id without dashes).
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id; empty for a root.
    pub parent: String,
    /// Span name.
    pub name: String,
    /// Its attributes, as text.
    pub attributes: BTreeMap<String, String>,
    /// Hex span ids of its links.
    pub links: Vec<String>,
    /// Start and end, ns since the epoch.
    pub start_ns: u64,
    /// End, ns since the epoch.
    pub end_ns: u64,
    /// Status code (0 unset, 1 ok, 2 error).
    pub status: i32,
}

impl ReceivedSpan {
    /// Attribute `key` as text, or "".
    pub fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

type Spans = Arc<Mutex<Vec<ReceivedSpan>>>;

/// The receiver; stops serving when dropped or [`Receiver::stop`]ped.
pub struct Receiver {
    grpc: SocketAddr,
    http: SocketAddr,
    spans: Spans,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Clone)]
struct Service(Spans);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn keep(spans: &Spans, request: ExportTraceServiceRequest) {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name,
                    attributes: attrs(&s.attributes),
                    links: s.links.iter().map(|l| hex(&l.span_id)).collect(),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    status: s.status.map_or(0, |st| st.code),
                });
            }
        }
    }
    if let Ok(mut all) = spans.lock() {
        all.extend(out);
    }
}

impl Receiver {
    /// Starts both listeners on loopback.
    ///
    /// # Errors
    /// A listener cannot be bound.
    pub async fn start() -> Result<Receiver> {
        let spans: Spans = Arc::default();
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (grpc, http) = (grpc_listener.local_addr()?, http_listener.local_addr()?);
        let service = TraceServiceServer::new(Service(spans.clone()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut s = stopped.clone();
            async move {
                let _ = s.wait_for(|v| *v).await;
            }
        };
        let grpc_stopped = stopped();
        let grpc_task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                    grpc_stopped,
                )
                .await;
        });
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            keep(&kept, request);
                            let body = ExportTraceServiceResponse {
                                partial_success: None,
                            }
                            .encode_to_vec();
                            (
                                axum::http::StatusCode::OK,
                                [("content-type", "application/x-protobuf")],
                                body,
                            )
                        }
                        Err(_) => (
                            axum::http::StatusCode::BAD_REQUEST,
                            [("content-type", "text/plain")],
                            b"not an ExportTraceServiceRequest".to_vec(),
                        ),
                    }
                }
            }),
        );
        let http_stopped = stopped();
        let http_task = tokio::spawn(async move {
            let _ = axum::serve(http_listener, app)
                .with_graceful_shutdown(http_stopped)
                .await;
        });
        Ok(Receiver {
            grpc,
            http,
            spans,
            stop,
            tasks: vec![grpc_task, http_task],
        })
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for OTLP/gRPC.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for OTLP/HTTP (the exporter adds `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many spans were received so far, by `service.name`.
    pub fn count(&self) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        if let Ok(spans) = self.spans.lock() {
            for s in spans.iter() {
                *by.entry(s.service.clone()).or_insert(0) += 1;
            }
        }
        by
    }

    /// The spans of trace `trace_id` (hex) received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Stops serving: open connections are closed (HTTP/2 `GOAWAY`) and
    /// the ports refuse new ones, within 5 s.
    pub async fn stop(&mut self) {
        let _ = self.stop.send(true);
        for mut t in self.tasks.drain(..) {
            // Past the grace, the connections go with the task.
            if tokio::time::timeout(std::time::Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

/// A trace as an indented tree (`service: name [attributes]`), children in
/// start order, for assertions' messages and the closing note.
pub fn draw(spans: &[ReceivedSpan]) -> String {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut out = String::new();
    let mut roots: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.parent.is_empty() || s.parent == "0000000000000000" || !ids.contains(s.parent.as_str()))
        .collect();
    roots.sort_by_key(|s| s.start_ns);
    fn walk(s: &ReceivedSpan, all: &[ReceivedSpan], depth: usize, out: &mut String) {
        let keys = ["saga.state", "saga.attempt", "saga.outcome", "effect", "outcome"];
        let shown: Vec<String> = keys
            .iter()
            .filter(|k| !s.attr(k).is_empty())
            .map(|k| format!("{k}={}", s.attr(k)))
            .collect();
        let ms = s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6;
        out.push_str(&format!(
            "{}{}: {} ({ms:.1} ms){}\n",
            "  ".repeat(depth),
            s.service,
            s.name,
            if shown.is_empty() {
                String::new()
            } else {
                format!(" [{}]", shown.join(" "))
            }
        ));
        let mut children: Vec<&ReceivedSpan> = all.iter().filter(|c| c.parent == s.span_id).collect();
        children.sort_by_key(|c| c.start_ns);
        for c in children {
            walk(c, all, depth + 1, out);
        }
    }
    for r in roots {
        if !(r.parent.is_empty() || r.parent == "0000000000000000") {
            out.push_str(&format!("(parent {} missing)\n", r.parent));
        }
        walk(r, spans, 0, &mut out);
    }
    out
}
