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
#![deny(unreachable_pub)]

pub mod api;
pub mod definition;
pub mod dispatch;
pub mod engine;
pub mod runner;
pub mod store;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use saga_proto::pb::saga_service_server::SagaServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

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
}

impl Config {
    /// A configuration with the defaults and the given directories (for tests and embedding).
    pub fn new(nats_url: impl Into<String>, data_dir: PathBuf, definitions_dir: PathBuf) -> Self {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            nats_url: nats_url.into(),
            data_dir,
            definitions_dir,
            log_format: LogFormat::Pretty,
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
/// # Errors
/// [`RunError`]: bad config or definitions (nothing started), store or
/// server failures.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<(), RunError> {
    config.validate()?;
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
    let nats = async_nats::ConnectOptions::new()
        .name("saga-coordinator")
        .retry_on_initial_connect()
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| RunError::Nats(e.to_string()))?;

    let tracker = TaskTracker::new();
    let stop_work = shutdown.child_token();
    let (handle, outcomes, inputs) = runner::channel();
    let dispatcher = Dispatcher::new(nats.clone(), outcomes, tracker.clone(), stop_work.clone());
    let runner_task = {
        let (store, stop, shutdown) = (store.clone(), stop_work.clone(), shutdown.clone());
        tokio::spawn(async move {
            let result = runner::run(store, dispatcher, inputs, stop).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "saga runner failed; shutting down");
                shutdown.cancel();
            }
            result
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SagaServiceServer<SagaApi>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(saga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(saga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let api = SagaApi::new(store.clone(), definitions, handle);
    let addr = listener
        .local_addr()
        .map_err(|e| RunError::Config(e.to_string()))?;
    info!(%addr, nats = %config.nats_url, data_dir = %config.data_dir.display(), "coordinator serving");

    let grpc_shutdown = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        async move {
            shutdown.cancelled().await;
            health.set_not_serving::<SagaServiceServer<SagaApi>>().await;
            info!("shutting down: no new requests");
        }
    };
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SagaServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), grpc_shutdown)
        .await;

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
    match tokio::time::timeout(std::time::Duration::from_secs(2), nats.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => info!(error = %e, "nats drain failed"),
        Err(_) => info!("nats drain timed out"),
    }
    served?;
    runner_result?;
    info!("coordinator stopped");
    Ok(())
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
