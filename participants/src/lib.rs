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
#![deny(unreachable_pub)]

pub mod dedupe;
pub mod inventory;
pub mod payment;
pub mod runtime;

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

/// Connects to NATS, retrying the first connection until the server is up.
///
/// # Errors
/// Invalid connection options.
pub async fn connect(nats_url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connect(nats_url)
        .await?;
    Ok(client)
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
