//! Saga participants: a small runtime shared by every participant and the
//! two services of the order saga.
//!
//! - [`runtime`]: subscribe in the participant's queue group, decode, hand
//!   the command to a [`runtime::Handler`], reply; malformed messages get an
//!   `error` reply and a log line, never a panic;
//! - [`dedupe`]: the sled store shared by handlers: the effect and the reply
//!   stored under the idempotency key in ONE transaction, flushed before the
//!   reply leaves; tombstones for compensations that overtake their forward;
//! - [`inventory`] and [`payment`]: the handlers and their `run` functions.
//!
//! A third participant is a new [`runtime::Handler`] plus a YAML step.
//!
//! This root holds only process plumbing shared by the binaries (config
//! errors, tracing set-up, NATS connection, signals, opening sled); it holds
//! no business rule and no saga state (that is the coordinator's).
#![deny(unreachable_pub)]

pub mod dedupe;
pub mod inventory;
pub mod payment;
pub mod runtime;

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
    /// The URL or options are unusable (retrying would not help).
    #[error("nats connect: {0}")]
    Nats(#[from] async_nats::ConnectError),
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

/// Connects to NATS. The first connection is retried with exponential
/// backoff and jitter (`backon`) until it succeeds or `shutdown` fires;
/// afterwards async-nats reconnects by itself, without limit.
///
/// # Errors
/// An unparsable URL, or shutdown before the first connection.
pub async fn connect(
    nats_url: &str,
    name: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<async_nats::Client, ConnectError> {
    use backon::Retryable;
    let attempt = || async {
        async_nats::ConnectOptions::new()
            .name(name)
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::info!(event = %other, "nats event"),
                }
            })
            .connect(nats_url)
            .await
    };
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(100))
        .with_max_delay(std::time::Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let connecting = attempt
        .retry(backoff)
        .when(|e| e.kind() != async_nats::ConnectErrorKind::ServerParse)
        .notify(|e, delay| tracing::warn!(error = %e, retry_in = ?delay, "cannot reach NATS; retrying"));
    tokio::select! {
        client = connecting => Ok(client?),
        _ = shutdown.cancelled() => Err(ConnectError::ShutDown),
    }
}

/// Opens (creating it if needed) the sled database in `dir`.
///
/// # Errors
/// The directory cannot be created, or sled cannot open it (e.g. another
/// process holds its lock); the message names the directory.
pub fn open_db(dir: &std::path::Path) -> anyhow::Result<sled::Db> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("data dir {}", dir.display()))?;
    sled::open(dir).with_context(|| format!("sled database in {}", dir.display()))
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
