//! The saga coordinator: keeps a persistent state machine for every saga in
//! sled, sends commands to participants over NATS request-reply and serves
//! `saga.v1.SagaService` (with reflection and health) over gRPC.
//!
//! Modules, from the pure core outwards:
//! - [`definition`]: YAML saga definitions, validated at start-up;
//! - [`engine`]: the pure state machine (no I/O);
//! - [`store`]: sled trees, one atomic write per transition, group flush;
//! - [`runner`]: the single owner of in-flight sagas (event in → transition →
//!   persist and flush → send);
//! - [`dispatch`]: NATS request-reply with timeouts and backoff;
//! - [`api`]: the gRPC service.
//!
//! [`run`] wires them; `main.rs` only parses config and handles signals, and
//! tests call the same `run` on an ephemeral port.
//!
//! # Why no command can leave before its state is durable
//!
//! Every path that sends something goes through [`runner`]'s commit:
//! 1. an input (a `CreateOrder`, a reply, an operator event) is applied by the
//!    pure [`engine`], which returns the new saga and the commands it implies;
//! 2. [`store::Store::write`] puts the saga record, its history, its state
//!    index entry, the outbox entries of those commands (and a dead letter
//!    when it entered FAILED) in ONE sled transaction;
//! 3. after the batch, ONE `flush` makes all of it durable; only when it
//!    returns are `CreateOrder`/operator callers answered, commands handed to
//!    [`dispatch`] and dead letters published. A failed flush stops the runner
//!    (and the process) before anything is sent.
//!
//! [`dispatch`] has no other source of commands, and the API never writes to
//! the store. A crash before step 3 completes loses only work nobody heard of:
//! the caller sees an error and retries with the same idempotency key, or
//! the previous state's command is still in the outbox and is re-sent with
//! the same key on start. A crash after it replays commands whose replies
//! were not recorded; participants answer those from their stored replies.
//! Participants keep the mirror rule: effect and stored reply in one
//! transaction, flushed before the reply is published.
#![deny(unreachable_pub)]

pub mod api;
pub mod definition;
pub mod dispatch;
pub mod engine;
pub mod runner;
pub mod store;
pub mod telemetry;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use saga_proto::pb::saga_service_server::SagaServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{api::SagaApi, definition::Definitions, dispatch::Dispatcher, store::Store};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Coordinator settings: defaults, then environment, then flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Saga coordinator: gRPC front door, sled state, NATS dispatch"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "COORDINATOR_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP address of `/metrics`, `/health` and `/ready`.
    #[arg(long, env = "COORDINATOR_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub http_addr: SocketAddr,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Directory of the sled database.
    #[arg(long, env = "COORDINATOR_DATA_DIR", default_value = "./data/coordinator")]
    pub data_dir: PathBuf,
    /// Directory of the saga definition files (`*.yaml`).
    #[arg(long, env = "SAGA_DEFINITIONS_DIR", default_value = "./saga-definitions")]
    pub definitions_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Bearer token that `RetrySaga` and `AbortSaga` require; the operator
    /// RPCs are refused when none is set. Never logged.
    #[arg(long, env = "SAGA_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// Consecutive failures that open a participant's circuit breaker.
    #[arg(long, env = "COORDINATOR_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long an open breaker holds commands back.
    #[arg(long, env = "COORDINATOR_BREAKER_WAIT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub breaker_wait: Duration,
}

impl Config {
    /// A configuration with the defaults and the given directories (for tests and embedding).
    pub fn new(nats_url: impl Into<String>, data_dir: PathBuf, definitions_dir: PathBuf) -> Self {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            nats_url: nats_url.into(),
            data_dir,
            definitions_dir,
            log_format: LogFormat::Pretty,
            operator_token: None,
            breaker_failures: 5,
            breaker_wait: Duration::from_secs(1),
        }
    }

    /// Checks what can be checked before anything starts.
    ///
    /// # Errors
    /// A NATS URL that is empty or not `nats://`, `tls://`, `ws://` or `wss://`.
    pub fn validate(&self) -> Result<(), RunError> {
        let ok = !self.nats_url.trim().is_empty()
            && self.nats_url.split(',').all(|u| {
                let u = u.trim();
                ["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|p| u.starts_with(p))
                    || !u.contains("://")
            });
        if !ok {
            return Err(RunError::Config(format!(
                "nats_url `{}` is not a NATS URL",
                self.nats_url
            )));
        }
        if self.breaker_failures == 0 {
            return Err(RunError::Config("breaker_failures must be at least 1".into()));
        }
        if let Some(t) = &self.operator_token {
            if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(RunError::Config(
                    "operator_token must be at least 16 characters without whitespace".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Invalid settings.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A definition file is invalid.
    #[error("saga definitions: {0}")]
    Definitions(#[from] definition::DefinitionError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// NATS connection options were refused.
    #[error("nats: {0}")]
    Nats(String),
    /// The gRPC server failed.
    #[error("grpc: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Runs the coordinator on `listener` until `shutdown` fires, then stops
/// gracefully: health NOT_SERVING, no new requests, in-flight transitions
/// committed, sled flushed, NATS drained.
///
/// The gRPC server (reads, health) is up before NATS is reached; health says
/// NOT_SERVING until the first connection, and again whenever NATS is lost.
///
/// # Errors
/// [`RunError`]: bad config or definitions (nothing started), store or
/// server failures.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<(), RunError> {
    config.validate()?;
    let _ = telemetry::prometheus();
    let definitions = Arc::new(Definitions::load_dir(&config.definitions_dir)?);
    for d in definitions.all() {
        info!(definition = %d.id(), file = %d.source.display(), steps = d.steps.len(), "definition loaded");
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| RunError::Config(format!("data_dir {}: {e}", config.data_dir.display())))?;
    let store = Store::open(&config.data_dir)?;
    for (state, n) in store.count_by_state()? {
        if n > 0 {
            info!(state = state.as_str(), sagas = n, "store opened");
        }
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = Ready {
        health,
        readiness: telemetry::Readiness::default(),
    };
    ready.set(false).await;
    let http = TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| RunError::Config(format!("http_addr {}: {e}", config.http_addr)))?;
    let http_task = tokio::spawn(telemetry::serve(
        http,
        ready.readiness.clone(),
        store.clone(),
        shutdown.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(saga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(saga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (handle, outcomes, inputs) = runner::channel();
    let api = SagaApi::new(store.clone(), definitions, handle, config.operator_token.clone());
    let addr = listener
        .local_addr()
        .map_err(|e| RunError::Config(e.to_string()))?;
    let grpc_shutdown = {
        let shutdown = shutdown.clone();
        let ready = ready.clone();
        async move {
            shutdown.cancelled().await;
            ready.set(false).await;
            info!("shutting down: no new requests");
        }
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(SagaServiceServer::new(api).max_decoding_message_size(api::MAX_REQUEST_BYTES))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), grpc_shutdown),
    );
    info!(%addr, nats = %config.nats_url, data_dir = %config.data_dir.display(), "coordinator serving gRPC");

    let nats = tokio::select! {
                nats = connect_nats(&config.nats_url, ready.clone()) => nats?,
        _ = shutdown.cancelled() => {
            join_server(server).await?;
            return Ok(());
        }
    };
    ready.set(true).await;

    let tracker = TaskTracker::new();
    let stop_work = shutdown.child_token();
    let breakers = dispatch::BreakerSettings {
        failures: config.breaker_failures,
        wait: config.breaker_wait,
    };
    let dispatcher = Dispatcher::new(
        nats.clone(),
        breakers,
        outcomes,
        tracker.clone(),
        stop_work.clone(),
    );
    let runner_task = {
        let (store, stop, shutdown, nats) =
            (store.clone(), stop_work.clone(), shutdown.clone(), nats.clone());
        tokio::spawn(async move {
            let result = runner::run(store, dispatcher, nats, inputs, stop).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "saga runner failed; shutting down");
                shutdown.cancel();
            }
            result
        })
    };

    let served = join_server(server).await;
    // Stop the runner (it flushes what it committed) and abandon in-flight
    // calls: their commands stay in the outbox for the next start.
    stop_work.cancel();
    let runner_result = match runner_task.await {
        Ok(r) => r,
        Err(e) => Err(store::StoreError::Corrupt(format!("saga runner panicked: {e}"))),
    };
    tracker.close();
    tracker.wait().await;
    store.flush().await?;
    // NATS may already be gone at shutdown: never wait on it for long.
    match tokio::time::timeout(Duration::from_secs(2), nats.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => info!(error = %e, "nats drain failed"),
        Err(_) => info!("nats drain timed out"),
    }
    if let Ok(Err(e)) = http_task.await {
        warn!(error = %e, "metrics HTTP server failed");
    }
    served?;
    runner_result?;
    info!("coordinator stopped");
    Ok(())
}

async fn join_server(
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<(), RunError> {
    match server.await {
        Ok(r) => Ok(r?),
        Err(e) => Err(RunError::Config(format!("gRPC server task failed: {e}"))),
    }
}

/// Readiness, as gRPC health and `GET /ready` report it: the overall
/// service ("") and `saga.v1.SagaService` are SERVING only while NATS is connected.
#[derive(Clone)]
struct Ready {
    health: tonic_health::server::HealthReporter,
    readiness: telemetry::Readiness,
}

impl Ready {
    async fn set(&self, ready: bool) {
        self.readiness.set_nats(ready);
        let status = if ready {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        let name = <SagaServiceServer<SagaApi> as tonic::server::NamedService>::NAME;
        self.health.set_service_status(name, status).await;
    }
}

/// Connects to NATS, retrying the first connection with exponential backoff
/// and jitter (`backon`) until it succeeds; afterwards async-nats reconnects
/// by itself and every (dis)connection flips readiness.
async fn connect_nats(url: &str, ready: Ready) -> Result<async_nats::Client, RunError> {
    use backon::Retryable;
    let attempt = || {
        let ready = ready.clone();
        async move {
            async_nats::ConnectOptions::new()
                .name("saga-coordinator")
                .max_reconnects(None)
                .event_callback(move |event| {
                    let ready = ready.clone();
                    async move {
                        match event {
                            async_nats::Event::Connected => {
                                info!("nats connected: ready");
                                ready.set(true).await;
                            }
                            async_nats::Event::Disconnected => {
                                warn!("nats disconnected: not ready");
                                ready.set(false).await;
                            }
                            other => info!(event = %other, "nats event"),
                        }
                    }
                })
                .connect(url)
                .await
        }
    };
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    attempt
        .retry(backoff)
        .when(|e| e.kind() != async_nats::ConnectErrorKind::ServerParse)
        .notify(|e, delay| warn!(error = %e, retry_in = ?delay, "cannot reach NATS; retrying"))
        .await
        .map_err(|e| RunError::Nats(e.to_string()))
}

/// Sets up the global tracing subscriber (only `main` calls this).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}
