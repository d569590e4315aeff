//! Spans leave the process through one bounded queue and one exporter
//! thread with its own small tokio runtime, so a slow or unreachable
//! collector costs a saga nothing: ending a span is a `try_send` (a full
//! queue drops it, counted), and the OTLP calls, their timeouts and their
//! failures (the batch dropped, counted) all happen on that thread.

use std::{
    sync::{mpsc as std_mpsc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use opentelemetry::Context;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    error::{OTelSdkError, OTelSdkResult},
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
    Resource,
};
use tokio::sync::{mpsc, oneshot};

use crate::{Protocol, TraceError};

/// Counter of spans dropped, by `reason` (`queue_full`, `export_failed`).
pub const SPANS_DROPPED: &str = "otlp_spans_dropped_total";
/// Counter of spans the collector accepted.
pub const SPANS_EXPORTED: &str = "otlp_spans_exported_total";

/// Spans per OTLP request at most.
const MAX_BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_millis(500);
/// A failed export is logged at most this often (the counter has them all).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where finished spans go: the sending half of the export queue.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    tx: mpsc::Sender<SpanData>,
}

impl Queue {
    /// Queues `span` for export, or drops it (counted) when the queue is full.
    pub(crate) fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            metrics::counter!(SPANS_DROPPED, "reason" => "queue_full").increment(1);
        }
    }
}

/// The SDK's view of the queue (what `tracing` spans end into).
#[derive(Debug)]
pub(crate) struct QueueProcessor(pub(crate) Queue);

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.0.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The exporter thread; [`Exporter::shutdown`] sends what is queued and stops it.
pub(crate) struct Exporter {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Exporter {
    /// Starts the thread exporting to `endpoint` (a full URL: `/v1/traces`
    /// already on it for HTTP) with `resource`, and the queue feeding it.
    ///
    /// # Errors
    /// The thread or its runtime cannot start, or the exporter cannot be
    /// built from these settings.
    pub(crate) fn start(
        endpoint: String,
        protocol: Protocol,
        resource: Resource,
        capacity: usize,
    ) -> Result<(Exporter, Queue), TraceError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(TraceError::Start(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let exporter = match build(&endpoint, protocol, &resource) {
                        Ok(exporter) => exporter,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    run(exporter, rx, stop_rx).await;
                });
            })
            .map_err(|e| TraceError::Start(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| TraceError::Start("the exporter thread ended".into()))??;
        Ok((
            Exporter {
                stop: Mutex::new(Some(stop_tx)),
                thread: Mutex::new(Some(thread)),
            },
            Queue { tx },
        ))
    }

    /// Exports what is queued (for at most `timeout`) and stops the thread.
    pub(crate) fn shutdown(&self, timeout: Duration) {
        let stop = self.stop.lock().ok().and_then(|mut s| s.take());
        let Some(stop) = stop else { return };
        let _ = stop.send(());
        let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) else {
            return;
        };
        let started = Instant::now();
        while !thread.is_finished() && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

/// The OTLP exporter (headers, timeout and compression from the standard
/// `OTEL_EXPORTER_OTLP_*` variables, read by the crate).
fn build(
    endpoint: &str,
    protocol: Protocol,
    resource: &Resource,
) -> Result<opentelemetry_otlp::SpanExporter, TraceError> {
    let built = match protocol {
        Protocol::Grpc if endpoint.starts_with("https://") => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
            .with_endpoint(endpoint)
            .build(),
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build(),
    };
    let mut exporter = built.map_err(|e| TraceError::Exporter(e.to_string()))?;
    exporter.set_resource(resource);
    Ok(exporter)
}

async fn run(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut warned: Option<Instant> = None;
    let mut stopping = false;
    while !stopping {
        if batch.is_empty() {
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { break },
                _ = &mut stop => stopping = true,
            }
        }
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while !stopping && batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { stopping = true },
                _ = &mut stop => stopping = true,
                () = &mut linger => break,
            }
        }
        if stopping {
            // What was queued before the stop goes too.
            while batch.len() < MAX_BATCH * 8 {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
        }
        while !batch.is_empty() {
            let part: Vec<SpanData> = batch.drain(..batch.len().min(MAX_BATCH)).collect();
            send(&exporter, part, &mut warned).await;
        }
    }
    let _ = exporter.shutdown_with_timeout(Duration::from_secs(1));
}

async fn send(
    exporter: &opentelemetry_otlp::SpanExporter,
    part: Vec<SpanData>,
    warned: &mut Option<Instant>,
) {
    let n = part.len() as u64;
    match exporter.export(part).await {
        Ok(()) => metrics::counter!(SPANS_EXPORTED).increment(n),
        Err(e) => {
            metrics::counter!(SPANS_DROPPED, "reason" => "export_failed").increment(n);
            if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                *warned = Some(Instant::now());
                tracing::warn!(error = %describe(&e), spans = n,
                    "trace export failed; spans dropped (otlp_spans_dropped_total counts them)");
            }
        }
    }
}

fn describe(e: &OTelSdkError) -> String {
    e.to_string().chars().take(300).collect()
}
