//! A participant's operational surface over plain HTTP: Prometheus text on
//! `GET /metrics`, liveness on `GET /health`, readiness on `GET /ready`
//! (NATS connected and the sled database writable), plus the names of the
//! metrics the other modules record and the small functions that record them.
//!
//! The recorder is this crate's own, process-wide [`PrometheusRecorder`], not
//! the `metrics` crate's global one: a test process that also runs the
//! coordinator (which installs the global recorder) must keep both
//! `/metrics` endpoints working. Every series carries a `participant` label,
//! so participants sharing a process (tests) stay apart.
//!
//! This module owns no business state and decides nothing: it only counts
//! what the runtime and the handlers report, and answers HTTP. It never
//! touches NATS (the connection state comes in through [`Readiness`]) and
//! reaches the store only through [`crate::store::ParticipantStore::probe_writable`].

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use saga_wire::Reply;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::store::SharedStore;

/// Commands answered, by `participant`, `action` and `outcome`
/// (`ok`, `rejected`, `error`, `malformed`).
pub const COMMANDS: &str = "participant_commands_total";
/// Repeated idempotency keys answered from the stored reply, by `participant`.
pub const DEDUPE_HITS: &str = "participant_dedupe_hits_total";
/// Time to handle a decoded command (effect, stored reply, flush), by
/// `participant` and `action`.
pub const COMMAND_SECONDS: &str = "participant_command_duration_seconds";
/// 1 while the participant's NATS connection is up, else 0, by `participant`.
pub const NATS_CONNECTED: &str = "participant_nats_connected";
/// Gauge: commands being handled right now (received, not yet answered), by `participant`.
pub const IN_FLIGHT: &str = "participant_commands_in_flight";
/// Gauge: the most commands this process handled at once since it started,
/// by `participant`: what a coordinator's `--max-in-flight` is meant to bound.
pub const IN_FLIGHT_MAX: &str = "participant_commands_in_flight_max";
/// Counter: stored replies removed past their retention, by participant.
pub const REPLIES_PRUNED: &str = "participant_replies_pruned_total";
/// Counter: writes the store committed (sled: inserts and removes;
/// jetstream: KV writes), by `participant` and `store`.
pub const STORE_WRITES: &str = "participant_store_writes_total";

/// Bucket bounds (seconds) of [`COMMAND_SECONDS`]: from a flush on a fast
/// disk to a gateway call near the coordinator's timeout.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded in when nobody scrapes, so that
/// they do not pile up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process-wide recorder of the participants (built on first use).
fn recorder() -> &'static PrometheusRecorder {
    static RECORDER: OnceLock<PrometheusRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let builder = match PrometheusBuilder::new().set_buckets(BUCKETS) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "histogram buckets refused; durations rendered as summaries");
                PrometheusBuilder::new()
            }
        };
        builder.build_recorder()
    })
}

/// Runs `f` with this crate's recorder, so the `metrics` macros inside it
/// register there (the handles they return keep recording there).
fn record(f: impl FnOnce()) {
    metrics::with_local_recorder(recorder(), f);
}

/// The handle rendering this process's participant metrics.
pub fn prometheus() -> PrometheusHandle {
    recorder().handle()
}

/// How a command ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (or found applied): an `ok` reply.
    Ok,
    /// A business refusal: a `rejected` reply.
    Rejected,
    /// A transient failure: an `error` reply, nothing stored.
    Error,
    /// The message did not decode (or had no reply subject): never handled.
    Malformed,
}

impl Outcome {
    /// The outcome of a handled command's reply.
    pub fn of(reply: &Reply) -> Self {
        match reply {
            Reply::Ok { .. } => Outcome::Ok,
            Reply::Rejected { .. } => Outcome::Rejected,
            Reply::Error { .. } => Outcome::Error,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Malformed => "malformed",
        }
    }
}

/// Counts one answered (or dropped malformed) command. `action` must come
/// from the participant's own list (or be `"unknown"`), never straight from
/// the wire, so the label set stays bounded.
pub fn command(participant: &str, action: &str, outcome: Outcome) {
    record(|| {
        metrics::counter!(
            COMMANDS,
            "participant" => participant.to_string(),
            "action" => action.to_string(),
            "outcome" => outcome.as_str(),
        )
        .increment(1);
    });
}

/// Records how long handling a decoded command took.
pub fn command_duration(participant: &str, action: &str, took: Duration) {
    record(|| {
        metrics::histogram!(
            COMMAND_SECONDS,
            "participant" => participant.to_string(),
            "action" => action.to_string(),
        )
        .record(took.as_secs_f64());
    });
}

/// Counts a repeated idempotency key answered from the stored reply.
pub fn dedupe_hit(participant: &str) {
    // The command's span (its trace): answered from the stored reply.
    tracing::Span::current().record("effect", "replayed");
    record(|| {
        metrics::counter!(DEDUPE_HITS, "participant" => participant.to_string()).increment(1);
    });
}

/// Counts the commands a participant handles at once ([`IN_FLIGHT`]) and
/// the most it ever did ([`IN_FLIGHT_MAX`]); shared by its command tasks.
#[derive(Clone)]
pub struct InFlight(Arc<Counts>);

struct Counts {
    now: AtomicUsize,
    most: AtomicUsize,
    now_gauge: metrics::Gauge,
    most_gauge: metrics::Gauge,
}

impl InFlight {
    /// None in flight yet (both gauges read 0).
    pub fn new(participant: &str) -> Self {
        let (mut now_gauge, mut most_gauge) = (None, None);
        record(|| {
            now_gauge = Some(metrics::gauge!(IN_FLIGHT, "participant" => participant.to_string()));
            most_gauge = Some(metrics::gauge!(IN_FLIGHT_MAX, "participant" => participant.to_string()));
        });
        let counts = Counts {
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            now_gauge: now_gauge.unwrap_or_else(metrics::Gauge::noop),
            most_gauge: most_gauge.unwrap_or_else(metrics::Gauge::noop),
        };
        counts.now_gauge.set(0.0);
        counts.most_gauge.set(0.0);
        InFlight(Arc::new(counts))
    }

    /// One more command in flight until the returned guard is dropped.
    pub fn enter(&self) -> Held {
        let now = self.0.now.fetch_add(1, Ordering::SeqCst) + 1;
        let most = self.0.most.fetch_max(now, Ordering::SeqCst).max(now);
        self.0.now_gauge.set(now as f64);
        self.0.most_gauge.set(most as f64);
        Held(self.clone())
    }

    /// Commands in flight now.
    pub fn now(&self) -> usize {
        self.0.now.load(Ordering::SeqCst)
    }

    /// The most in flight at once so far.
    pub fn most(&self) -> usize {
        self.0.most.load(Ordering::SeqCst)
    }
}

/// A command in flight, counted until dropped.
#[must_use = "the command counts as in flight only while this is held"]
pub struct Held(InFlight);

impl Drop for Held {
    fn drop(&mut self) {
        let now = self.0 .0.now.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        self.0 .0.now_gauge.set(now as f64);
    }
}

/// The NATS side of readiness, set from the connection's events; shared by
/// `GET /ready` and the [`NATS_CONNECTED`] gauge.
#[derive(Clone)]
pub struct Readiness {
    participant: String,
    nats: Arc<AtomicBool>,
}

impl Readiness {
    /// Not connected yet (the gauge reads 0 until the first connection).
    pub fn new(participant: &str) -> Self {
        let r = Readiness {
            participant: participant.to_string(),
            nats: Arc::default(),
        };
        r.set_nats(false);
        r
    }

    /// Records the NATS connection state.
    pub fn set_nats(&self, connected: bool) {
        self.nats.store(connected, Ordering::SeqCst);
        record(|| {
            metrics::gauge!(NATS_CONNECTED, "participant" => self.participant.clone()).set(if connected {
                1.0
            } else {
                0.0
            });
        });
    }

    /// Whether NATS is connected.
    pub fn nats(&self) -> bool {
        self.nats.load(Ordering::SeqCst)
    }
}

/// The store the readiness probe checks, set once it is open (a jetstream
/// store opens only after NATS is reached; until then `/ready` says so).
#[derive(Clone, Default)]
pub struct StoreSlot(std::sync::Arc<std::sync::OnceLock<SharedStore>>);

impl StoreSlot {
    /// Sets the store (the first call wins).
    pub fn set(&self, store: SharedStore) {
        let _ = self.0.set(store);
    }

    fn get(&self) -> Option<&SharedStore> {
        self.0.get()
    }
}

#[derive(Clone)]
struct Http {
    ready: Readiness,
    store: StoreSlot,
    metrics: PrometheusHandle,
}

/// The running HTTP server; it stops when the shutdown token fires, or when
/// this value is dropped (an early error return of `run`).
pub struct HttpServer {
    stop: DropGuard,
    task: JoinHandle<std::io::Result<()>>,
}

impl HttpServer {
    /// Stops the server and waits for it; a failure is logged.
    pub async fn stop(self) {
        let HttpServer { stop, task } = self;
        drop(stop);
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "metrics HTTP server failed"),
            Err(e) => warn!(error = %e, "metrics HTTP server task failed"),
        }
    }
}

/// Starts serving `/metrics`, `/health` and `/ready` on `listener` until
/// `shutdown` fires (or the returned [`HttpServer`] is stopped or dropped).
pub fn spawn(
    listener: TcpListener,
    ready: Readiness,
    store: StoreSlot,
    shutdown: &CancellationToken,
) -> HttpServer {
    let stop = shutdown.child_token();
    let task = tokio::spawn(serve(listener, ready, store, stop.clone()));
    HttpServer {
        stop: stop.drop_guard(),
        task,
    }
}

/// Serves `/metrics`, `/health` and `/ready` on `listener` until `shutdown`.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    ready: Readiness,
    store: StoreSlot,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let metrics = prometheus();
    let state = Http {
        ready: ready.clone(),
        store,
        metrics: metrics.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(readiness))
        .with_state(state);
    info!(participant = %ready.participant, ?addr, "metrics and health on HTTP");
    let upkeep = async {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    };
    tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned()) => served,
        () = upkeep => Ok(()),
    }
}

async fn metrics_text(State(s): State<Http>) -> (StatusCode, String) {
    if let Some(store) = s.store.get() {
        // The store counts its own writes; the counter shows them as of this scrape.
        record(|| {
            metrics::counter!(STORE_WRITES, "participant" => s.ready.participant.clone(), "store" => store.kind())
                .absolute(store.writes());
        });
    }
    (StatusCode::OK, s.metrics.render())
}

async fn readiness(State(s): State<Http>) -> (StatusCode, String) {
    let (kind, probe) = match s.store.get() {
        Some(store) => (
            store.kind(),
            store.probe_writable().await.map_err(|e| e.to_string()),
        ),
        None => ("store", Err("not open yet".to_string())),
    };
    match (s.ready.nats(), probe) {
        (true, Ok(())) => (StatusCode::OK, "ready\n".into()),
        (nats, probe) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: nats {}, {kind} {}\n",
                if nats { "connected" } else { "disconnected" },
                probe
                    .map(|()| "writable".to_string())
                    .unwrap_or_else(|e| format!("not writable ({e})"))
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_name_their_label() {
        assert_eq!(Outcome::of(&Reply::ok(serde_json::Value::Null)), Outcome::Ok);
        assert_eq!(Outcome::of(&Reply::rejected("x")), Outcome::Rejected);
        assert_eq!(Outcome::of(&Reply::error("x")), Outcome::Error);
        let labels =
            [Outcome::Ok, Outcome::Rejected, Outcome::Error, Outcome::Malformed].map(Outcome::as_str);
        assert_eq!(labels, ["ok", "rejected", "error", "malformed"]);
    }

    #[test]
    fn recorded_series_render_with_their_labels() {
        command("unit-test", "reserve", Outcome::Ok);
        command("unit-test", "reserve", Outcome::Ok);
        dedupe_hit("unit-test");
        command_duration("unit-test", "reserve", Duration::from_millis(3));
        Readiness::new("unit-test").set_nats(true);
        let counted = InFlight::new("unit-test");
        let (a, b) = (counted.enter(), counted.enter());
        drop(a);
        let text = prometheus().render();
        for needle in [
            "participant_commands_total{participant=\"unit-test\",action=\"reserve\",outcome=\"ok\"} 2",
            "participant_dedupe_hits_total{participant=\"unit-test\"} 1",
            "participant_command_duration_seconds_bucket{participant=\"unit-test\",action=\"reserve\",le=\"0.005\"} 1",
            "participant_nats_connected{participant=\"unit-test\"} 1",
            "participant_commands_in_flight{participant=\"unit-test\"} 1",
            "participant_commands_in_flight_max{participant=\"unit-test\"} 2",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        drop(b);
        assert_eq!((counted.now(), counted.most()), (0, 2));
    }
}
