//! The saga coordinator: keeps a persistent state machine for every saga in
//! sled, sends commands to participants over NATS request-reply and serves
//! `saga.v1.SagaService` (with reflection and health) over gRPC.
//!
//! Modules, from the pure core outwards (no module imports one that imports it):
//! - `definition`: YAML saga definitions, validated at start-up;
//! - `engine`: the pure state machine (no I/O);
//! - `clock`, `partition`, `ops`: leaf vocabulary (time, partition
//!   ownership, what creations and operator events answer);
//! - `store`: the `store::SagaStore` trait and its sled, jetstream and
//!   in-memory implementations (stage, one group commit, reads);
//! - `effects`: a batch's commands, replies and wake-ups, releasable only
//!   through the store's commit;
//! - `sink`: where committed commands go (`dispatch` implements it);
//! - `runner`: the single owner of in-flight sagas (event in → transition →
//!   stage, commit → release);
//! - `dispatch`: NATS request-reply with timeouts and backoff;
//! - `cluster`: partition leases on the jetstream store (talks to the
//!   runner through `cluster::SagaHost`);
//! - `create_forward`: a retried creation only another coordinator may make,
//!   sent there over NATS (talks to the API through `CreateHere`);
//! - `api`: the gRPC service.
//!
//! [`run`] wires them; [`cli::main`] is the process (config, tracing,
//! signals) for the `coordinator` binary and the multi-call `saga` binary, and
//! tests call the same `run` on an ephemeral port.
//!
//! # Why no command can leave before its state is durable
//!
//! Every path that sends something goes through `runner`'s commit:
//! 1. an input (a `CreateOrder`, a reply, an operator event) is applied by the
//!    pure `engine`, which returns the new saga and the commands it implies;
//! 2. `store::SagaStore::stage` stages the saga record, its history, its
//!    state index entry, the outbox entries of those commands (and a dead
//!    letter when it entered FAILED);
//! 3. after the batch, ONE commit (with sled: one transaction and one
//!    `flush`) makes every staged transition durable; only when it returns
//!    `Ok` are `CreateOrder`/operator callers answered, commands handed to
//!    `dispatch` and dead letters published — the types keep this: those
//!    effects come out of an `effects` batch only with the store's
//!    `store::Committed`. A failed commit stops the runner (and the
//!    process) before anything is sent.
//!
//! `dispatch` has no other source of commands, and the API never writes to
//! the store. A crash before step 3 completes loses only work nobody heard of:
//! the caller sees an error and retries with the same idempotency key, or
//! the previous state's command is still in the outbox and is re-sent with
//! the same key on start. A crash after it replays commands whose replies
//! were not recorded; participants answer those from their stored replies.
//! Participants keep the mirror rule: effect and stored reply in one
//! transaction, flushed before the reply is published.
#![deny(unreachable_pub)]

// The pure core, under the names the server's modules have always used.
use saga_core::{definition, engine};
use store::jetstream;

mod api;
mod backend;
pub mod cli;
mod clock;
mod cluster;
mod console;
mod create_forward;
mod dispatch;
mod effects;
mod events;
mod ops;
mod partition;
mod runner;
mod saga_spans;
mod signals;
mod sink;
mod store;
mod telemetry;

// The public surface: what `main.rs`, the test kit, saga-bench and the fuzz
// targets need, and nothing else.
pub use backend::StoreKind;
pub use dispatch::InFlightLimits;
pub use saga_core::definition::DefinitionError;

/// Checks a `CreateOrderRequest` exactly as `CreateOrder` does, storing
/// nothing: the boundary the fuzz target drives.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the first bad field, as the API answers.
pub fn check_create_order(
    req: saga_proto::pb::CreateOrderRequest,
    definitions: &saga_core::definition::Definitions,
) -> Result<(), tonic::Status> {
    api::validate_create(req, definitions, String::new()).map(drop)
}

/// Names in the JetStream KV layout that tools outside the coordinator read
/// (the bench's clean-up, the cluster tests' checks of who owns a saga).
pub mod kv {
    pub use crate::cluster::LEASES_BUCKET;
    pub use crate::store::jetstream::{partition_of, ACTIVE_BUCKET, KEYS_BUCKET, RECORDS_BUCKET};
}

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use saga_proto::pb::saga_service_server::SagaServiceServer;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    api::SagaApi,
    definition::Catalog,
    dispatch::Dispatcher,
    store::{PartitionedStore, SharedStore, Store},
};

/// Log output format (one type for every process).
pub use saga_trace::LogFormat;

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
    /// Once both sockets listen, write their addresses to this file as JSON
    /// (`{"grpc":"127.0.0.1:50051","http":"127.0.0.1:9464"}`): with port 0,
    /// how a supervisor or a test learns the ports the OS picked.
    #[arg(long, env = "COORDINATOR_PORTS_FILE")]
    pub ports_file: Option<PathBuf>,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Directory of the sled database.
    #[arg(long, env = "COORDINATOR_DATA_DIR", default_value = "./data/coordinator")]
    pub data_dir: PathBuf,
    /// Where sagas are kept: `sled` (embedded, one coordinator) or
    /// `jetstream` (replicated KV buckets, several coordinators sharing the
    /// sagas by partition leases).
    #[arg(long, env = "COORDINATOR_STORE", value_enum, default_value = "sled")]
    pub store: StoreKind,
    /// jetstream store: number of partitions (the same on every coordinator
    /// of a cluster, never changed once sagas exist).
    #[arg(long, env = "COORDINATOR_PARTITIONS", default_value_t = 16)]
    pub partitions: u32,
    /// jetstream store: replicas of the KV buckets (3 on a 3-node cluster).
    #[arg(long, env = "COORDINATOR_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// jetstream store: how long a partition lease lasts without renewal
    /// (the failover time after a coordinator dies).
    #[arg(long, env = "COORDINATOR_LEASE_TTL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// jetstream store: this coordinator's name in the leases (default: a fresh UUID).
    #[arg(long, env = "COORDINATOR_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Directory of the saga definition files (`*.yaml`).
    #[arg(long, env = "SAGA_DEFINITIONS_DIR", default_value = "./saga-definitions")]
    pub definitions_dir: PathBuf,
    /// Most steps a definition may hold (those of its `parallel:` groups
    /// included); a file with more is refused at load and on reload.
    #[arg(long, env = "COORDINATOR_MAX_STEPS", default_value_t = saga_core::definition::Limits::DEFAULT_MAX_STEPS)]
    pub max_steps: usize,
    /// Most steps one `parallel:` group may hold.
    #[arg(long, env = "COORDINATOR_MAX_GROUP_STEPS", default_value_t = saga_core::definition::Limits::DEFAULT_MAX_GROUP_STEPS)]
    pub max_group_steps: usize,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// OTLP trace export (off unless an endpoint is set).
    #[command(flatten)]
    pub trace: saga_trace::TraceArgs,
    /// Bearer token that `RetrySaga` and `AbortSaga` require; the operator
    /// RPCs are refused when none is set. Never logged.
    #[arg(long, env = "SAGA_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// Do not serve the web console (`/console` on the HTTP port; on by default).
    #[arg(long, env = "COORDINATOR_NO_CONSOLE")]
    pub no_console: bool,
    /// When set, the console's pages need it as well (HTTP Basic: any user
    /// name, this as the password); actions still need the operator token.
    /// Never logged.
    #[arg(long, env = "SAGA_CONSOLE_TOKEN", hide_env_values = true)]
    pub console_token: Option<String>,
    /// Consecutive failures that open a participant's circuit breaker.
    #[arg(long, env = "COORDINATOR_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    /// Largest output a step may return (the `data` of an `ok` reply, as
    /// compact JSON, in bytes): a larger one is a malformed reply (outcome
    /// unknown, retried), never stored.
    #[arg(long, env = "COORDINATOR_MAX_OUTPUT_BYTES", default_value_t = 64 * 1024)]
    pub max_output_bytes: usize,
    /// Most commands in flight at once per participant, e.g.
    /// `inventory=200,payment=100` (a participant not named has no limit):
    /// the commands past a limit wait in the dispatcher, spending no attempt
    /// and running no deadline, until one of that participant's commands is
    /// answered or times out.
    #[arg(long, env = "COORDINATOR_MAX_IN_FLIGHT", default_value = "")]
    pub max_in_flight: InFlightLimits,
    /// How long an open breaker holds commands back.
    #[arg(long, env = "COORDINATOR_BREAKER_WAIT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub breaker_wait: Duration,
    /// PEM certificate (chain) of the gRPC server: serve gRPC over TLS (with `--tls-key`).
    #[arg(long, env = "COORDINATOR_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "COORDINATOR_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of client certificates: require mutual TLS from gRPC clients.
    #[arg(long, env = "COORDINATOR_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_security: saga_nats::NatsSecurity,
    /// How long COMPLETED and COMPENSATED sagas (record, history, client
    /// idempotency key) are kept after their last transition; `0s` keeps them
    /// forever. FAILED sagas are always kept.
    #[arg(long, env = "COORDINATOR_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Bound of sled's page cache, in MiB (memory stays flat as the store grows).
    #[arg(long, env = "COORDINATOR_CACHE_MIB", default_value_t = 128)]
    pub cache_mib: u64,
    /// How long after its start a saga may still send a command again: the
    /// participants forget stored replies after their `--reply-retention`
    /// (at least this), and a command repeated after that would be applied
    /// again, and a compensation would find nothing to undo. `RetrySaga` and
    /// `AbortSaga` refuse an older saga (FAILED_PRECONDITION); `0s`: no limit
    /// (for participants that keep replies forever).
    #[arg(long, env = "COORDINATOR_COMMAND_HORIZON", default_value = "30d", value_parser = humantime::parse_duration)]
    pub command_horizon: Duration,
    /// sled store: most in-flight sagas kept in memory; beyond that, sagas
    /// waiting for a reply are evicted once durable and read back from the
    /// store on their next event (memory stays small with many in flight).
    #[arg(long, env = "COORDINATOR_RESIDENT_SAGAS", default_value_t = 10_000)]
    pub resident_sagas: usize,
    /// Do not publish saga events to JetStream.
    #[arg(long, env = "COORDINATOR_NO_EVENTS")]
    pub no_events: bool,
    /// JetStream stream of the saga events (created on start if absent).
    #[arg(long, env = "COORDINATOR_EVENTS_STREAM", default_value = "SAGA_EVENTS")]
    pub events_stream: String,
    /// Oldest event the stream keeps (`0s`: no age limit).
    #[arg(long, env = "COORDINATOR_EVENTS_MAX_AGE", default_value = "7d", value_parser = humantime::parse_duration)]
    pub events_max_age: Duration,
    /// Largest size of the stream in bytes (default 1 GiB; `-1`: no limit);
    /// the oldest events go first. Applied to an existing stream on start.
    #[arg(long, env = "COORDINATOR_EVENTS_MAX_BYTES", default_value_t = events::DEFAULT_MAX_BYTES, allow_negative_numbers = true)]
    pub events_max_bytes: i64,
    /// Replicas of the events stream (3 on a 3-node cluster).
    #[arg(long, env = "COORDINATOR_EVENTS_REPLICAS", default_value_t = 1)]
    pub events_replicas: usize,
    /// Window in which JetStream drops a re-published event (same `Nats-Msg-Id`).
    #[arg(long, env = "COORDINATOR_EVENTS_DUPLICATE_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub events_duplicate_window: Duration,
    /// How long the events publisher waits, once it has caught up and is woken
    /// again, before it publishes: events of several commits go out together
    /// (`0s`: at once). Events are that much later; sagas are not.
    #[arg(long, env = "COORDINATOR_EVENTS_LINGER", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub events_linger: Duration,
}

impl Config {
    /// The events publisher's settings.
    pub fn events(&self) -> events::EventsConfig {
        events::EventsConfig {
            enabled: !self.no_events,
            stream: self.events_stream.clone(),
            max_age: self.events_max_age,
            max_bytes: self.events_max_bytes,
            replicas: self.events_replicas,
            duplicate_window: self.events_duplicate_window,
            linger: self.events_linger,
        }
    }
}

impl Config {
    /// The bounds definitions are loaded (and reloaded) within.
    fn definition_limits(&self) -> saga_core::definition::Limits {
        saga_core::definition::Limits {
            max_steps: self.max_steps,
            max_group_steps: self.max_group_steps,
        }
    }
}

impl Config {
    /// A configuration with the defaults and the given directories (for tests and embedding).
    pub fn new(nats_url: impl Into<String>, data_dir: PathBuf, definitions_dir: PathBuf) -> Self {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ports_file: None,
            nats_url: nats_url.into(),
            data_dir,
            store: StoreKind::Sled,
            partitions: 16,
            kv_replicas: 1,
            lease_ttl: Duration::from_secs(3),
            instance_id: None,
            definitions_dir,
            max_steps: saga_core::definition::Limits::DEFAULT_MAX_STEPS,
            max_group_steps: saga_core::definition::Limits::DEFAULT_MAX_GROUP_STEPS,
            log_format: LogFormat::Pretty,
            trace: saga_trace::TraceArgs::default(),
            operator_token: None,
            no_console: false,
            console_token: None,
            breaker_failures: 5,
            max_output_bytes: 64 * 1024,
            breaker_wait: Duration::from_secs(1),
            max_in_flight: InFlightLimits::default(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            nats_security: saga_nats::NatsSecurity::default(),
            retention: Duration::from_secs(30 * 24 * 3600),
            cache_mib: 128,
            resident_sagas: 10_000,
            command_horizon: Duration::from_secs(30 * 24 * 3600),
            no_events: false,
            events_stream: "SAGA_EVENTS".into(),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_bytes: events::DEFAULT_MAX_BYTES,
            events_replicas: 1,
            events_duplicate_window: Duration::from_secs(600),
            events_linger: events::DEFAULT_LINGER,
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
        if self.events_stream.is_empty()
            || self
                .events_stream
                .chars()
                .any(|c| c.is_whitespace() || ".*>".contains(c))
        {
            return Err(RunError::Config(format!(
                "events_stream `{}` is not a stream name (no spaces, `.`, `*` or `>`)",
                self.events_stream
            )));
        }
        if self.events_max_bytes == 0 || self.events_max_bytes < -1 {
            return Err(RunError::Config(
                "events_max_bytes must be -1 (no limit) or a positive number of bytes".into(),
            ));
        }
        if self.events_linger > Duration::from_secs(1) {
            return Err(RunError::Config("events_linger must be at most 1s".into()));
        }
        if !(1..=5).contains(&self.events_replicas) {
            return Err(RunError::Config("events_replicas must be 1 to 5".into()));
        }
        if !(1..=4096).contains(&self.partitions) {
            return Err(RunError::Config("partitions must be 1 to 4096".into()));
        }
        if !(1..=5).contains(&self.kv_replicas) {
            return Err(RunError::Config("kv_replicas must be 1 to 5".into()));
        }
        if self.lease_ttl < Duration::from_millis(200) {
            return Err(RunError::Config("lease_ttl must be at least 200ms".into()));
        }
        if let Some(id) = &self.instance_id {
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(RunError::Config(
                    "instance_id: letters, digits, `-` and `_` only".into(),
                ));
            }
        }
        if !(1..=1000).contains(&self.max_steps) {
            return Err(RunError::Config("max_steps must be 1 to 1000".into()));
        }
        if !(2..=256).contains(&self.max_group_steps) {
            return Err(RunError::Config("max_group_steps must be 2 to 256".into()));
        }
        if !(1..=1024 * 1024).contains(&self.max_output_bytes) {
            return Err(RunError::Config("max_output_bytes must be 1 to 1048576".into()));
        }
        if self.breaker_failures == 0 {
            return Err(RunError::Config("breaker_failures must be at least 1".into()));
        }
        self.nats_security.validate().map_err(RunError::Config)?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(RunError::Config("--tls-cert and --tls-key go together".into()));
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(RunError::Config(
                "--tls-client-ca needs --tls-cert and --tls-key".into(),
            ));
        }
        // An empty token (an unset variable passed through by compose) means none.
        for (name, token) in [
            ("operator_token", &self.operator_token),
            ("console_token", &self.console_token),
        ] {
            if let Some(t) = token.as_ref().filter(|t| !t.is_empty()) {
                if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(RunError::Config(format!(
                        "{name} must be at least 16 characters without whitespace"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// The gRPC server's TLS settings, when `--tls-cert`/`--tls-key` are given.
    ///
    /// # Errors
    /// A certificate or key file that cannot be read.
    fn server_tls(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, RunError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| RunError::Config(format!("{}: {e}", p.display())));
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Ok(Some(tls))
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

/// Runs the coordinator on `listeners` until `shutdown` fires, then stops
/// gracefully: health NOT_SERVING, no new requests, in-flight transitions
/// committed, sled flushed, NATS drained.
///
/// The gRPC server (reads, health) is up before NATS is reached; health says
/// NOT_SERVING until the first connection, and again whenever NATS is lost.
///
/// # Errors
/// [`RunError`]: bad config or definitions (nothing started), store or
/// server failures.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), RunError> {
    let (_keep, reloads) = mpsc::channel(1);
    run_with_reload(config, listeners, shutdown, reloads).await
}

/// The coordinator's two sockets, bound before [`run`] so that the caller
/// knows the addresses (port 0 included) and nothing binds, drops and
/// rebinds a port another process could take in between.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (`saga.v1.SagaService`, reflection, health).
    pub grpc: TcpListener,
    /// HTTP: `/metrics`, `/health`, `/ready`.
    pub http: TcpListener,
}

impl Listeners {
    /// Binds `config.grpc_addr` and `config.http_addr`.
    ///
    /// # Errors
    /// An address cannot be bound ([`RunError::Config`] names it).
    pub async fn bind(config: &Config) -> Result<Self, RunError> {
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Config(format!("{what} {addr}: {e}")))
        };
        Ok(Listeners {
            grpc: bind("grpc_addr", config.grpc_addr).await?,
            http: bind("http_addr", config.http_addr).await?,
        })
    }

    /// The bound addresses, `(grpc, http)`.
    ///
    /// # Errors
    /// The OS cannot say (a socket in a bad state).
    pub fn local_addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.grpc.local_addr()?, self.http.local_addr()?))
    }
}

/// Asks a running coordinator to re-read its definitions directory; the
/// answer says what changed, or why the old set stays in force.
pub type ReloadRequest = oneshot::Sender<Result<(Vec<String>, Vec<String>), DefinitionError>>;

/// [`run`], also re-reading the definitions directory on every request
/// received on `reloads` (the binary sends one on SIGHUP). A directory with
/// a bad file leaves the old set in force and says why in the log and the answer.
///
/// # Errors
/// As [`run`].
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<ReloadRequest>,
) -> Result<(), RunError> {
    config.validate()?;
    let _ = telemetry::prometheus();
    let definitions = Catalog::load_with(&config.definitions_dir, config.definition_limits())?;
    for d in definitions.current().all() {
        info!(definition = %d.id(), file = %d.source.display(), steps = d.steps.len(), "definition loaded");
    }
    let config_dir = config.definitions_dir.clone();
    let reload_task = {
        let (catalog, shutdown) = (definitions.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = reloads.recv() => match r { Some(r) => r, None => return },
                };
                let (c, dir) = (catalog.clone(), config_dir.clone());
                let result = match tokio::task::spawn_blocking(move || c.reload()).await {
                    Ok(r) => r,
                    Err(e) => Err(definition::DefinitionError::Io {
                        path: dir,
                        reason: e.to_string(),
                    }),
                };
                match &result {
                    Ok((added, removed)) => {
                        info!(
                            ?added,
                            ?removed,
                            loaded = catalog.current().all().count(),
                            "definitions reloaded"
                        );
                        metrics::counter!(telemetry::DEFINITION_RELOADS, "result" => "ok").increment(1);
                    }
                    Err(e) => {
                        warn!(error = %e, "definitions reload refused; the previous set stays in force");
                        metrics::counter!(telemetry::DEFINITION_RELOADS, "result" => "refused").increment(1);
                    }
                }
                let _ = request.send(result);
            }
        })
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = Ready {
        health,
        readiness: telemetry::Readiness::default(),
    };
    ready.set(false).await;
    // sled: the store is local, gRPC reads are served before NATS is reached.
    // jetstream: the store IS on NATS, so NATS comes first.
    // The wiring is the one place that knows which store it built: the
    // others get the `SagaStore`, the cluster code the `PartitionedStore`.
    let (store, partitioned, early_nats): (SharedStore, Option<std::sync::Arc<dyn PartitionedStore>>, _) =
        match config.store {
            StoreKind::Sled => {
                std::fs::create_dir_all(&config.data_dir)
                    .map_err(|e| RunError::Config(format!("data_dir {}: {e}", config.data_dir.display())))?;
                let mut store =
                    Store::open_with_cache(&config.data_dir, config.cache_mib.saturating_mul(1024 * 1024))?;
                if config.no_events {
                    store = store.without_events();
                }
                for (state, n) in store.count_by_state()? {
                    if n > 0 {
                        info!(state = state.as_str(), sagas = n, "store opened");
                    }
                }
                (std::sync::Arc::new(store), None, None)
            }
            StoreKind::Jetstream => {
                let nats = tokio::select! {
                    nats = connect_nats(&config.nats_url, &config.nats_security, ready.clone()) => nats?,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                let Some(store) = open_jetstream_store(&config, &nats, &shutdown).await else {
                    return Ok(());
                };
                let store = std::sync::Arc::new(store);
                (store.clone(), Some(store), Some(nats))
            }
        };
    let cluster = partitioned.as_ref().map(|_| {
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        (partition::Ownership::new(config.partitions), lost_tx, lost_rx)
    });
    let Listeners { grpc: listener, http } = listeners;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(saga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(saga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (handle, outcomes, inputs) = runner::channel(config.resident_sagas);
    let api = SagaApi::new(
        store.clone(),
        definitions.clone(),
        handle.clone(),
        config.operator_token.clone(),
    );
    let mut api = api.with_command_horizon(config.command_horizon);
    if let (Some(nats), Some((ownership, _, _))) = (&early_nats, &cluster) {
        api = api.with_forwarding(nats.clone(), ownership.clone());
    }
    let router = api.router();
    let api = std::sync::Arc::new(api);
    // jetstream: answers creations other coordinators forward here.
    let creations_host = api.clone();
    let console = (!config.no_console).then(|| {
        let token = config.console_token.clone().filter(|t| !t.is_empty());
        console::Console::new(api.clone(), store.clone(), definitions.clone(), token).router()
    });
    let http_task = tokio::spawn(telemetry::serve(
        http,
        ready.readiness.clone(),
        store.clone(),
        console,
        shutdown.clone(),
    ));
    // Readiness follows the runner: SERVING once it takes requests.
    let runner_watch = {
        let (handle, ready) = (handle.clone(), ready.clone());
        tokio::spawn(async move {
            handle.wait_running(true).await;
            ready.set_runner(true).await;
            handle.wait_running(false).await;
            ready.set_runner(false).await;
        })
    };
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
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = config.server_tls()? {
        builder = builder.tls_config(tls)?;
    }
    let server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(SagaServiceServer::from_arc(api).max_decoding_message_size(api::MAX_REQUEST_BYTES))
            .serve_with_incoming_shutdown(
                // Nagle off: a small reply must not wait ~40 ms for the client's delayed ACK.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                grpc_shutdown,
            ),
    );
    info!(%addr, tls = config.tls_cert.is_some(), nats = %config.nats_url, data_dir = %config.data_dir.display(),
          "coordinator serving gRPC");

    let nats = match early_nats {
        Some(nats) => nats,
        None => tokio::select! {
            nats = connect_nats(&config.nats_url, &config.nats_security, ready.clone()) => nats?,
            _ = shutdown.cancelled() => {
                join_server(server).await?;
                return Ok(());
            }
        },
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
        config.max_in_flight.clone(),
        config.max_output_bytes,
        outcomes,
        tracker.clone(),
        stop_work.clone(),
    );
    // Retention applies where the store prunes (sled; the jetstream store keeps records, see README).
    let pruner = (store.capabilities().retention && !config.retention.is_zero())
        .then(|| tokio::spawn(prune_forever(store.clone(), config.retention, stop_work.clone())));
    let (runner_cluster, cluster_task, creations_task) = match (cluster, partitioned) {
        (Some((ownership, lost_tx, lost_rx)), Some(partitioned)) => {
            let js = async_nats::jetstream::new(nats.clone());
            let leases = cluster::open_leases(&js, config.kv_replicas).await?;
            let settings = cluster::ClusterSettings {
                instance: config
                    .instance_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
                lease_ttl: config.lease_ttl,
            };
            info!(instance = %settings.instance, partitions = config.partitions, lease_ttl = ?config.lease_ttl,
                  "joining the coordinator cluster");
            let task = tokio::spawn(cluster::run(
                nats.clone(),
                leases,
                partitioned,
                ownership.clone(),
                handle.clone(),
                settings,
                lost_rx,
                stop_work.clone(),
            ));
            let creations = tokio::spawn(create_forward::serve(
                nats.clone(),
                ownership.clone(),
                creations_host,
                stop_work.clone(),
            ));
            (Some((ownership, lost_tx)), Some(task), Some(creations))
        }
        _ => (None, None, None),
    };
    let signals_task = tokio::spawn(signals::serve(nats.clone(), router, stop_work.clone()));
    let events_wake = events::EventsWake::default();
    let events_config = config.events();
    let events_task = events_config.enabled.then(|| {
        tokio::spawn(events::run(
            store.clone(),
            nats.clone(),
            events_config,
            events_wake.clone(),
            stop_work.clone(),
        ))
    });
    let runner_task = {
        let (store, stop, shutdown) = (store.clone(), stop_work.clone(), shutdown.clone());
        tokio::spawn(async move {
            let result = runner::run(
                store,
                runner_cluster,
                std::sync::Arc::new(dispatcher),
                events_wake,
                inputs,
                stop,
            )
            .await;
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
    if let Some(task) = cluster_task {
        let _ = task.await;
    }
    if let Some(task) = creations_task {
        let _ = task.await;
    }
    if let Some(task) = events_task {
        let _ = task.await;
    }
    let _ = signals_task.await;
    if let Some(task) = pruner {
        let _ = task.await;
    }
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
    reload_task.abort();
    runner_watch.abort();
    served?;
    runner_result?;
    info!("coordinator stopped");
    Ok(())
}

/// Opens the jetstream store, retrying while JetStream is not there yet (a
/// cluster electing its leaders); `None` when `shutdown` fires first.
async fn open_jetstream_store(
    config: &Config,
    nats: &async_nats::Client,
    shutdown: &CancellationToken,
) -> Option<jetstream::JsStore> {
    let js = async_nats::jetstream::new(nats.clone());
    let settings = jetstream::JsSettings {
        replicas: config.kv_replicas,
        partitions: config.partitions,
        events: !config.no_events,
    };
    let mut wait = Duration::from_millis(200);
    loop {
        match jetstream::JsStore::open(&js, settings.clone()).await {
            Ok(store) => {
                jetstream::log_opened(&store);
                return Some(store);
            }
            Err(e) => warn!(error = %e, "jetstream store not available yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

async fn join_server(
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<(), RunError> {
    match server.await {
        Ok(r) => Ok(r?),
        Err(e) => Err(RunError::Config(format!("gRPC server task failed: {e}"))),
    }
}

/// Removes finished sagas older than `retention`, in batches, every tenth of
/// the retention (between 100 ms and an hour), until `stop`.
async fn prune_forever(store: SharedStore, retention: Duration, stop: CancellationToken) {
    let every = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(3600));
    let keep_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let cutoff = clock::now_ms().saturating_sub(keep_ms);
        loop {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.prune(cutoff, 1000)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    info!(sagas = n, "finished sagas past the retention removed");
                    metrics::counter!(telemetry::SAGAS_PRUNED).increment(n as u64);
                    if n < 1000 || stop.is_cancelled() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "pruning finished sagas failed; retried later");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "pruning task failed");
                    break;
                }
            }
        }
    }
}

/// Readiness, as gRPC health and `GET /ready` report it: the overall
/// service ("") and `saga.v1.SagaService` are SERVING only while NATS is
/// connected and the saga runner takes requests.
#[derive(Clone)]
struct Ready {
    health: tonic_health::server::HealthReporter,
    readiness: telemetry::Readiness,
}

impl Ready {
    /// NATS (dis)connected.
    async fn set(&self, connected: bool) {
        self.readiness.set_nats(connected);
        self.publish().await;
    }

    /// The runner started or stopped taking requests.
    async fn set_runner(&self, running: bool) {
        self.readiness.set_runner(running);
        self.publish().await;
    }

    async fn publish(&self) {
        let status = if self.readiness.ready() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        let name = <SagaServiceServer<SagaApi> as tonic::server::NamedService>::NAME;
        self.health.set_service_status(name, status).await;
    }
}

/// Connects to NATS (see [`saga_nats::connect`]); every
/// (dis)connection flips readiness.
async fn connect_nats(
    url: &str,
    security: &saga_nats::NatsSecurity,
    ready: Ready,
) -> Result<async_nats::Client, RunError> {
    saga_nats::connect(url, &saga_nats::Role::Coordinator, security, move |up| {
        let ready = ready.clone();
        async move { ready.set(up).await }
    })
    .await
    .map_err(|e| RunError::Nats(e.to_string()))
}

/// Sets up the global tracing subscriber and, when `trace` names an OTLP
/// endpoint, span export (only `main` calls this).
///
/// # Errors
/// Invalid trace export settings.
pub fn init_tracing(
    format: LogFormat,
    trace: &saga_trace::TraceArgs,
) -> Result<saga_trace::Telemetry, saga_trace::TraceError> {
    saga_trace::init(trace, "coordinator", format)
}
