//! Saga participants: a small runtime shared by every participant and the
//! two services of the order saga.
//!
//! - [`runtime`]: subscribe in the participant's queue group, decode, hand
//!   the command to a [`runtime::Handler`], reply; malformed messages get an
//!   `error` reply and a log line, never a panic;
//! - [`store`]: the [`store::ParticipantStore`] trait handlers write through
//!   (the effect and the reply stored under the idempotency key together,
//!   durable before the reply leaves; tombstones for compensations that
//!   overtake their forward) and its two implementations, sled (embedded,
//!   one process) and JetStream KV (shared by replicas);
//! - [`inventory`] and [`payment`]: the handlers and their `run` functions;
//! - [`telemetry`]: `GET /metrics`, `/health` and `/ready` on each
//!   participant's HTTP port, and the metrics the others record;
//! - [`cli`]: the three processes (config, tracing, signals), for their
//!   binaries and the multi-call `saga` binary.
//!
//! - [`kit`]: a participant written as its actions alone (the settings,
//!   protocol, store and admin subjects done for it).
//!
//! A new participant is a [`kit::Participant`] (or, for one that calls out,
//! a [`runtime::Handler`] of its own) plus a YAML step.
//!
//! This root holds only process plumbing shared by the binaries (config
//! errors, tracing set-up, NATS connection, signals, opening sled, the
//! serve-until-shutdown sequence of a participant process); it holds no
//! business rule and no saga state (that is the coordinator's).
#![deny(unreachable_pub)]

pub mod analytics;
pub mod cli;
pub mod inventory;
pub mod kit;
pub mod payment;
pub mod runtime;
pub mod shipping;
pub mod store;
pub mod telemetry;

/// The store's codec and tombstone under their former name.
pub use store as dedupe;

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
    Nats(#[from] saga_nats::ConnectError),
    /// Shutdown was requested before NATS became reachable.
    #[error("shut down before NATS was reachable")]
    ShutDown,
}

/// Log output format (one type for every process).
pub use saga_trace::LogFormat;

/// Sets up the global tracing subscriber and, when `trace` names an OTLP
/// endpoint, span export as `service` (only binaries call this).
///
/// # Errors
/// Invalid trace export settings.
pub fn init_tracing(
    format: LogFormat,
    trace: &saga_trace::TraceArgs,
    service: &str,
) -> Result<saga_trace::Telemetry, saga_trace::TraceError> {
    saga_trace::init(trace, service, format)
}

/// Connects to NATS (see [`saga_nats::connect`]) until it succeeds or
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
    let role = saga_nats::Role::Participant(name.to_string());
    let connecting = saga_nats::connect(&nats.url, &role, &nats.security, move |up| {
        readiness.set_nats(up);
        std::future::ready(())
    });
    tokio::select! {
        client = connecting => Ok(client?),
        _ = shutdown.cancelled() => Err(ConnectError::ShutDown),
    }
}

/// How long a participant keeps the replies it stored under idempotency keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct ReplyRetention {
    /// How long the reply stored for a command (and a tombstone) is kept,
    /// counted from when this participant stored it (its own clock, never
    /// the saga id's timestamp); `0s` keeps them forever. A command
    /// repeated after its reply is gone would be applied again, so this must
    /// be at least the coordinator's `--command-horizon` (also 30d).
    #[arg(
        long = "reply-retention",
        env = "PARTICIPANT_REPLY_RETENTION",
        default_value = "30d",
        value_parser = humantime::parse_duration
    )]
    pub reply_retention: std::time::Duration,
}

impl Default for ReplyRetention {
    fn default() -> Self {
        ReplyRetention {
            reply_retention: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// How often the stored replies past their retention are looked for (more
/// often for a retention under 40 minutes: a quarter of it, at least 1 s).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// Most replies removed in one go (one sled batch).
const PRUNE_BATCH: usize = 10_000;

/// Removes stored replies past `retention` now and every [`PRUNE_EVERY`],
/// in batches, until `shutdown`; counted in `participant_replies_pruned_total`.
async fn prune_replies(
    store: store::SharedStore,
    participant: String,
    retention: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if retention.is_zero() {
        return;
    }
    loop {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let cutoff = now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        loop {
            match store.prune_replies(cutoff, PRUNE_BATCH).await {
                Ok(0) => break,
                Ok(n) => {
                    metrics::counter!(telemetry::REPLIES_PRUNED, "participant" => participant.clone())
                        .increment(n as u64);
                    tracing::info!(
                        pruned = n,
                        ?retention,
                        "stored replies past their retention removed"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune stored replies; retried later");
                    break;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
        let every = PRUNE_EVERY
            .min(retention / 4)
            .max(std::time::Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Where a participant's NATS is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct NatsTarget {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Credentials and TLS.
    pub security: saga_nats::NatsSecurity,
}

/// Which store a participant opens (`--store`, `--data-dir`, `--kv-replicas`).
#[derive(Debug, Clone)]
pub struct StoreTarget {
    /// sled or jetstream.
    pub kind: store::StoreKind,
    /// The sled directory (sled store).
    pub data_dir: std::path::PathBuf,
    /// Replicas of the KV buckets when this participant creates them (jetstream store).
    pub kv_replicas: usize,
    /// State keys kept in the jetstream store's root document (the small
    /// shared rows: stock table, counters); every other key is a document
    /// of its own.
    pub root_prefixes: Vec<String>,
    /// The prefix of the handler's per-command rows keyed by the forward
    /// idempotency key (`reservation/`, `charge/`, `shipment/`), which the
    /// sled store makes carry the stored replies of the commands that write
    /// them ([`store::Store::with_reply_rows`]); fixed per participant, never
    /// a setting (a database read without it would miss those replies).
    pub reply_rows: Option<String>,
}

impl StoreTarget {
    /// Checks the settings.
    ///
    /// # Errors
    /// An empty data dir (sled), replicas outside 1..=5 (jetstream).
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.kind {
            store::StoreKind::Sled if self.data_dir.as_os_str().is_empty() => Err(ConfigError::Invalid {
                setting: "data-dir",
                reason: "empty".into(),
            }),
            store::StoreKind::Jetstream if !(1..=5).contains(&self.kv_replicas) => {
                Err(ConfigError::Invalid {
                    setting: "kv-replicas",
                    reason: "must be within 1..=5".into(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Opens the sled store in `data_dir`, with this participant's reply rows.
    ///
    /// # Errors
    /// The database cannot be opened; sled errors.
    pub fn open_sled(&self, retention: std::time::Duration) -> anyhow::Result<store::Store> {
        let store = store::Store::with_retention(open_db(&self.data_dir)?, retention)?;
        Ok(store.with_reply_rows(self.reply_rows.as_deref().unwrap_or_default()))
    }
}

/// Runs one participant process: opens its store (sled before NATS is
/// reached; jetstream once connected), makes its handler with `make` (which
/// may seed the store), serves its HTTP surface on `http` (up while NATS is
/// still being reached, so `/ready` can say so), prunes stored replies past
/// `retention`, runs [`runtime::serve`] until `shutdown`, then a bounded NATS
/// drain and the HTTP server's stop.
///
/// # Errors
/// The store cannot be opened, `make` failed, shutdown before NATS was
/// reachable, an unusable NATS URL, a subscription failure.
pub async fn serve_participant<F, Fut>(
    name: &str,
    target: &StoreTarget,
    nats: &NatsTarget,
    http: tokio::net::TcpListener,
    retention: ReplyRetention,
    shutdown: tokio_util::sync::CancellationToken,
    make: F,
) -> anyhow::Result<()>
where
    F: FnOnce(store::SharedStore) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<std::sync::Arc<dyn runtime::Handler>>>,
{
    let readiness = telemetry::Readiness::new(name);
    let slot = telemetry::StoreSlot::default();
    let sled_store: Option<store::SharedStore> = match target.kind {
        store::StoreKind::Sled => Some(std::sync::Arc::new(target.open_sled(retention.reply_retention)?)),
        store::StoreKind::Jetstream => None,
    };
    if let Some(s) = &sled_store {
        slot.set(s.clone());
    }
    let http = telemetry::spawn(http, readiness.clone(), slot.clone(), &shutdown);
    let client = connect(nats, name, &readiness, &shutdown).await?;
    let store = match sled_store {
        Some(s) => s,
        None => {
            // JetStream may not be ready yet (a cluster still electing its
            // meta leader): retried with backoff, not-ready meanwhile, as the
            // coordinator's jetstream store is.
            let opened = async {
                let mut wait = std::time::Duration::from_millis(200);
                loop {
                    match store::jetstream::JsStore::open(
                        &client,
                        name,
                        target.kv_replicas,
                        retention.reply_retention,
                        &target.root_prefixes,
                    )
                    .await
                    {
                        Ok(s) => break s,
                        Err(e) => {
                            tracing::warn!(participant = name, error = %e, retry_in = ?wait,
                                "cannot open the jetstream store yet; retrying");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(std::time::Duration::from_secs(5));
                        }
                    }
                }
            };
            let s: store::SharedStore = tokio::select! {
                s = opened => std::sync::Arc::new(s),
                _ = shutdown.cancelled() => return Err(ConnectError::ShutDown.into()),
            };
            slot.set(s.clone());
            s
        }
    };
    tracing::info!(participant = name, store = store.kind(), "store opened");
    let handler = make(store.clone()).await?;
    let pruner = tokio::spawn(prune_replies(
        store.clone(),
        name.to_string(),
        retention.reply_retention,
        shutdown.clone(),
    ));
    runtime::serve(client.clone(), handler, shutdown).await?;
    let _ = pruner.await;
    let _ = tokio::time::timeout(runtime::NATS_GRACE, client.drain()).await;
    http.stop().await;
    Ok(())
}

/// Binds a participant's HTTP address (`--http-addr`; port 0 picks a free
/// one) and, with `--ports-file`, writes the bound address there as
/// `{"http":"<addr>"}` (a temp file renamed over it: never read half-written).
///
/// # Errors
/// The address cannot be bound or the file written; the message names it.
pub async fn bind_http(
    addr: std::net::SocketAddr,
    ports_file: Option<&std::path::Path>,
) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("http-addr {addr}"))?;
    if let Some(path) = ports_file {
        let text = serde_json::json!({ "http": listener.local_addr()?.to_string() }).to_string();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("ports file {}", path.display()))?;
    }
    Ok(listener)
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

#[cfg(test)]
mod tests {
    use super::*;
    use saga_wire::Reply;
    use std::time::Duration;

    #[tokio::test]
    async fn the_pruner_removes_replies_past_the_retention_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().expect("tmp");
        let hour_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            - 3600;
        let old = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, hour_ago, 0));
        {
            // A reply stored an hour ago by a release before the time index:
            // the upgrade indexes it at its saga's start.
            let db = open_db(dir.path()).expect("sled");
            let bytes = dedupe::encode(&Reply::ok(serde_json::Value::Null)).expect("encodes");
            db.open_tree("replies")
                .expect("tree")
                .insert(format!("{old}/s/forward"), bytes)
                .expect("insert");
        }
        let store: store::SharedStore =
            std::sync::Arc::new(store::Store::new(open_db(dir.path()).expect("sled")).expect("store"));
        let fresh = uuid::Uuid::now_v7();
        store
            .apply_forward(&format!("{fresh}/s/forward"), &|_| {
                Ok(Reply::ok(serde_json::Value::Null))
            })
            .await
            .expect("applies");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(prune_replies(
            store.clone(),
            "test".into(),
            Duration::from_secs(60),
            shutdown.clone(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store
            .stored_reply(&format!("{old}/s/forward"))
            .await
            .expect("reads")
            .is_some()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the old reply was not pruned"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kept = store
            .stored_reply(&format!("{fresh}/s/forward"))
            .await
            .expect("reads");
        assert!(kept.is_some(), "a reply inside the retention is kept");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the pruner stops on shutdown")
            .expect("no panic");
    }
}
