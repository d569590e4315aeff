//! Operational surface over plain HTTP: Prometheus text exposition on
//! `GET /metrics`, liveness on `GET /health`, readiness on `GET /ready`
//! (NATS connected and sled writable), plus the names of the metrics the
//! other modules record.
//!
//! The metrics recorder is process-wide (the `metrics` crate's global); a
//! process running several coordinators (tests) shares it. Nothing here
//! decides anything about sagas.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::SharedStore;

/// Sagas created, by `definition`.
pub(crate) const SAGAS_STARTED: &str = "saga_started_total";
/// Sagas that reached a terminal state, by `definition` and `state`.
pub(crate) const SAGAS_FINISHED: &str = "saga_finished_total";
/// Sagas not terminal, in this coordinator's memory.
pub(crate) const SAGAS_IN_FLIGHT: &str = "saga_in_flight";
/// Durable timers armed: awaits' timeouts, sleeps, deadlines.
pub(crate) const TIMERS_PENDING: &str = "saga_timers_pending";
/// One command's round trip, by `participant`, `action`, `outcome`.
pub(crate) const STEP_SECONDS: &str = "saga_step_duration_seconds";
/// Attempts after the first, by `participant`.
pub(crate) const STEP_RETRIES: &str = "saga_step_retries_total";
/// 1 while a participant's circuit breaker is open.
pub(crate) const BREAKER_OPEN: &str = "saga_breaker_open";
/// Commands due that wait for room under their participant's `--max-in-flight`.
pub(crate) const DISPATCH_QUEUED: &str = "saga_dispatch_queued";
/// 1 while NATS is connected.
pub(crate) const NATS_CONNECTED: &str = "saga_nats_connected";
/// Finished sagas removed after the retention.
pub(crate) const SAGAS_PRUNED: &str = "saga_pruned_total";
/// Saga events acknowledged by JetStream.
pub(crate) const EVENTS_PUBLISHED: &str = "saga_events_published_total";
/// Saga events durable but not yet acknowledged by JetStream.
pub(crate) const EVENTS_BACKLOG: &str = "saga_events_backlog";
/// Definition reloads (SIGHUP), by `result` (`ok`, `refused`).
pub(crate) const DEFINITION_RELOADS: &str = "saga_definition_reloads_total";
/// Operator RPCs refused, by `reason` (`disabled`, `missing`, `malformed`, `wrong`).
pub(crate) const OPERATOR_AUTH_FAILURES: &str = "saga_operator_auth_failures_total";
/// Console requests refused before any page or action ran, by `reason`
/// (`read_token`, `cross_site`, `csrf`); operator-token refusals of its
/// actions count in [`OPERATOR_AUTH_FAILURES`].
pub(crate) const CONSOLE_REFUSED: &str = "saga_console_refused_total";
/// Group-commit flushes and the transitions they covered.
pub(crate) const FLUSHES: &str = "saga_store_flushes_total";
/// sled inserts and removes the group commits wrote (saga-bench divides them by sagas).
pub(crate) const STORE_WRITES: &str = "saga_store_writes_total";
/// How long one group-commit flush took (the store's write latency on the hot path).
pub(crate) const FLUSH_SECONDS: &str = "saga_store_flush_duration_seconds";

/// The process-wide Prometheus recorder (installed on first use).
pub(crate) fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(error = %e, "metrics recorder not installed");
                None
            }
        })
        .clone()
}

/// Readiness shared by gRPC health and `GET /ready`: NATS connected and the
/// saga runner taking requests (it starts after the first NATS connection
/// and recovery).
#[derive(Clone, Default)]
pub(crate) struct Readiness {
    nats: Arc<AtomicBool>,
    runner: Arc<AtomicBool>,
}

impl Readiness {
    /// Records the NATS connection state.
    pub(crate) fn set_nats(&self, connected: bool) {
        self.nats.store(connected, Ordering::SeqCst);
        metrics::gauge!(NATS_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    }

    /// Records whether the saga runner takes requests.
    pub(crate) fn set_runner(&self, running: bool) {
        self.runner.store(running, Ordering::SeqCst);
    }

    /// Whether NATS is connected.
    pub(crate) fn nats(&self) -> bool {
        self.nats.load(Ordering::SeqCst)
    }

    /// Whether the runner takes requests.
    pub(crate) fn runner(&self) -> bool {
        self.runner.load(Ordering::SeqCst)
    }

    /// Both: new sagas are accepted and their commands can leave.
    pub(crate) fn ready(&self) -> bool {
        self.nats() && self.runner()
    }
}

#[derive(Clone)]
struct Http {
    ready: Readiness,
    store: SharedStore,
    metrics: Option<PrometheusHandle>,
}

/// Serves `/metrics`, `/health` and `/ready` on `listener` until `shutdown`.
///
/// # Errors
/// The listener failed.
pub(crate) async fn serve(
    listener: TcpListener,
    ready: Readiness,
    store: SharedStore,
    console: Option<Router>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let state = Http {
        ready,
        store,
        metrics: prometheus(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(readiness))
        .with_state(state);
    let app = match console {
        Some(console) => {
            info!(?addr, "web console on HTTP at /console");
            app.merge(console)
        }
        None => app,
    };
    info!(?addr, "metrics and health on HTTP");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics_text(State(s): State<Http>) -> (StatusCode, String) {
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n".into(),
        ),
    }
}

async fn readiness(State(s): State<Http>) -> (StatusCode, String) {
    let probe = s.store.probe().await;
    let what = s.store.name();
    match (s.ready.nats(), s.ready.runner(), probe) {
        (true, true, Ok(())) => (StatusCode::OK, "ready\n".into()),
        (nats, runner, probe) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: nats {}, saga runner {}, {what} {}\n",
                if nats { "connected" } else { "disconnected" },
                if runner { "running" } else { "not started" },
                probe
                    .map(|()| "writable".to_string())
                    .unwrap_or_else(|e| e.to_string())
            ),
        ),
    }
}

/// Counts a console request refused by its guard.
pub(crate) fn console_refused(reason: &'static str) {
    metrics::counter!(CONSOLE_REFUSED, "reason" => reason).increment(1);
}
