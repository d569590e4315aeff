//! Saga participants: a small runtime shared by every participant and the
//! two services of the order saga.
//!
//! - [`runtime`]: subscribe in the participant's queue group, decode, hand
//!   the command to a [`runtime::Handler`], reply; malformed messages get an
//!   `error` reply and a log line, never a panic;
//! - [`dedupe`]: the sled store shared by handlers: the effect and the reply
//!   stored under the idempotency key in ONE transaction, flushed before the
//!   reply leaves; tombstones for compensations that overtake their forward;
//! - [`inventory`] and [`payment`]: the handlers and their `run` functions;
//! - [`telemetry`]: `GET /metrics`, `/health` and `/ready` on each
//!   participant's HTTP port, and the metrics the others record.
//!
//! A third participant is a new [`runtime::Handler`] plus a YAML step.
//!
//! This root holds only process plumbing shared by the binaries (config
//! errors, tracing set-up, NATS connection, signals, opening sled, the
//! serve-until-shutdown sequence of a participant process); it holds no
//! business rule and no saga state (that is the coordinator's).
#![deny(unreachable_pub)]

pub mod analytics;
pub mod dedupe;
pub mod inventory;
pub mod payment;
pub mod runtime;
pub mod shipping;
pub mod telemetry;

/// Invalid settings, found by a config's `validate()` before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting is out of range or inconsistent.
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The flag's name.
        setting: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The stock file cannot be read or is not `{"SKU": N, …}`.
    #[error("stock file {path}: {reason}")]
    StockFile {
        /// Path as given.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The first connection to NATS did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL, options or credentials are unusable (retrying would not help).
    #[error(transparent)]
    Nats(#[from] saga_proto::nats::ConnectError),
    /// Shutdown was requested before NATS became reachable.
    #[error("shut down before NATS was reachable")]
    ShutDown,
}

/// Log output format of the participant binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Sets up the global tracing subscriber (only binaries call this).
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

/// Connects to NATS (see [`saga_proto::nats::connect`]) until it succeeds or
/// `shutdown` fires. `readiness` follows the connection (`/ready` and
/// `participant_nats_connected`).
///
/// # Errors
/// An unparsable URL or unreadable credentials, or shutdown before the first connection.
pub async fn connect(
    nats: &NatsTarget,
    name: &str,
    readiness: &telemetry::Readiness,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<async_nats::Client, ConnectError> {
    let readiness = readiness.clone();
    let connecting = saga_proto::nats::connect(&nats.url, name, &nats.security, move |up| {
        readiness.set_nats(up);
        std::future::ready(())
    });
    tokio::select! {
        client = connecting => Ok(client?),
        _ = shutdown.cancelled() => Err(ConnectError::ShutDown),
    }
}

/// Where a participant's NATS is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct NatsTarget {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Credentials and TLS.
    pub security: saga_proto::nats::NatsSecurity,
}

/// Runs one participant process around an opened `handler`: its HTTP surface
/// on `http` (up while NATS is still being reached, so `/ready` can say so),
/// the NATS connection named `client_name`, [`runtime::serve`] until
/// `shutdown`, then a bounded NATS drain and the HTTP server's stop.
///
/// # Errors
/// Shutdown before NATS was reachable, an unusable NATS URL, a subscription
/// failure.
pub async fn serve_participant(
    handler: std::sync::Arc<dyn runtime::Handler>,
    nats: &NatsTarget,
    client_name: &str,
    http: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let readiness = telemetry::Readiness::new(handler.participant());
    let http = telemetry::spawn(http, readiness.clone(), handler.store().clone(), &shutdown);
    let client = connect(nats, client_name, &readiness, &shutdown).await?;
    runtime::serve(client.clone(), handler, shutdown).await?;
    let _ = tokio::time::timeout(runtime::NATS_GRACE, client.drain()).await;
    http.stop().await;
    Ok(())
}

/// Binds a participant's HTTP address (`--http-addr`; port 0 picks a free one).
///
/// # Errors
/// The address cannot be bound; the message names it.
pub async fn bind_http(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("http-addr {addr}"))
}

/// Opens (creating it if needed) the sled database in `dir`.
///
/// sled releases its file lock from a background thread a moment after the
/// last handle is dropped (a restart in the same process, or a previous
/// process still exiting), so a lock conflict is retried for up to 3 s.
///
/// # Errors
/// The directory cannot be created, or sled cannot open it (e.g. another
/// live process holds its lock); the message names the directory.
pub fn open_db(dir: &std::path::Path) -> anyhow::Result<sled::Db> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("data dir {}", dir.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        // sled's page cache is bounded (its default is 1 GiB).
        match sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .open()
        {
            Err(sled::Error::Io(e))
                if std::time::Instant::now() < deadline && e.to_string().contains("lock") =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.with_context(|| format!("sled database in {}", dir.display())),
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM (used by the binaries).
pub async fn shutdown_on_signal(token: tokio_util::sync::CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("signal received; shutting down");
    token.cancel();
}
