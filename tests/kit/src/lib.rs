//! The test kit of the saga engine, shared by the integration tests
//! (`tests/tests`) and `saga-bench`:
//!
//! - [`nats`]: the one nats-server starter, a single node or a cluster, on
//!   ports the server picks and reports (killed on drop, restartable);
//! - [`process`]: the one process wrapper for the system's binaries, which
//!   report the ports they bound in a ports file;
//! - this module: the coordinator and the participants run in-process
//!   through their library `run` functions on temp-dir sled databases, on
//!   listeners bound here and handed over, and gRPC/NATS/HTTP helpers;
//! - [`chaos`]: the chaos suite's orders, driver and invariants;
//!   [`cluster`]: the coordinators' partition leases; [`pki`]: test TLS.
#![deny(unreachable_pub)]

pub mod chaos;
pub mod cluster;
pub mod nats;
pub mod otlp;
pub mod pki;
pub mod process;

pub use nats::{jetstream_ready, nats_server_bin, NatsAccess, NatsCluster, NatsServer};
pub use process::{bin_dir, Ports, Proc};
pub use saga_nats::Role;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use saga_proto::pb::{self, saga_service_client::SagaServiceClient};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a test waits for a saga to finish.
pub const WAIT: Duration = Duration::from_secs(20);

/// The order definition shipped in `saga-definitions/`.
pub fn shipped_definitions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../saga-definitions")
}

/// Logs for tests: `RUST_LOG=info cargo test` shows the processes' lines.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A coordinator running in this test process through `coordinator::run`.
pub struct RunningCoordinator {
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its HTTP address (`/metrics`, `/health`, `/ready`).
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    reloads: tokio::sync::mpsc::Sender<coordinator::ReloadRequest>,
    task: JoinHandle<Result<(), coordinator::RunError>>,
}

impl RunningCoordinator {
    /// Starts a coordinator on an ephemeral port.
    ///
    /// # Errors
    /// Bind failure.
    pub async fn start(nats: &NatsAccess, data_dir: &Path, definitions_dir: &Path) -> Result<Self> {
        Self::start_with(nats, data_dir, definitions_dir, |_| {}).await
    }

    /// Starts a coordinator with settings adjusted by `tweak`.
    ///
    /// # Errors
    /// Bind failure.
    pub async fn start_with(
        nats: &NatsAccess,
        data_dir: &Path,
        definitions_dir: &Path,
        tweak: impl FnOnce(&mut coordinator::Config),
    ) -> Result<Self> {
        let mut config =
            coordinator::Config::new(nats.url(), data_dir.to_path_buf(), definitions_dir.to_path_buf());
        config.nats_security = nats.security(&Role::Coordinator);
        config.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        tweak(&mut config);
        // Bound here and handed over: the addresses are known before `run`
        // starts, and no port is released in between.
        let listeners = coordinator::Listeners::bind(&config).await?;
        let (addr, http_addr) = listeners.local_addrs()?;
        let shutdown = CancellationToken::new();
        let (reloads, reload_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(coordinator::run_with_reload(
            config,
            listeners,
            shutdown.clone(),
            reload_rx,
        ));
        Ok(RunningCoordinator {
            addr,
            http_addr,
            shutdown,
            reloads,
            task,
        })
    }

    /// What SIGHUP does to the binary: re-read the definitions directory.
    /// Returns the ids `(added, removed)`, or why the old set stays.
    ///
    /// # Errors
    /// The coordinator is not running.
    pub async fn reload(&self) -> Result<Result<(Vec<String>, Vec<String>), coordinator::DefinitionError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.reloads
            .send(tx)
            .await
            .map_err(|_| anyhow!("coordinator stopped"))?;
        Ok(rx.await?)
    }

    /// Waits until `/ready` says 200: NATS connected and the saga runner
    /// taking requests (before that, `CreateOrder` is refused with UNAVAILABLE).
    ///
    /// # Errors
    /// Not ready within 15 s.
    pub async fn wait_ready(&self) -> Result<()> {
        let addr = self.http_addr;
        eventually(Duration::from_secs(15), "coordinator ready", || async move {
            http_get(addr, "/ready").await.is_ok_and(|(code, _)| code == 200)
        })
        .await
    }

    /// A connected gRPC client (retries while the server comes up).
    ///
    /// # Errors
    /// No connection within 10 s.
    pub async fn client(&self) -> Result<SagaServiceClient<Channel>> {
        connect(self.addr).await
    }

    /// Graceful stop; returns `run`'s result.
    ///
    /// # Errors
    /// `run` failed or panicked.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await?.map_err(|e| anyhow!("coordinator: {e}"))
    }
}

/// A plain HTTP/1.1 GET: `(status code, body)`.
///
/// # Errors
/// Connection or malformed response.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut raw)).await??;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Connects a gRPC channel to `addr`, retrying for up to 10 s.
///
/// # Errors
/// No connection within 10 s.
pub async fn channel(addr: SocketAddr) -> Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::from_shared(format!("http://{addr}"))?.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(anyhow!("connect {addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A `SagaService` client for `addr`.
///
/// # Errors
/// As [`channel`].
pub async fn connect(addr: SocketAddr) -> Result<SagaServiceClient<Channel>> {
    Ok(SagaServiceClient::new(channel(addr).await?))
}

/// A running participant service (inventory or payment) in this process.
pub struct RunningParticipant {
    /// Its HTTP address (`/metrics`, `/health`, `/ready`), on a port of its own.
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningParticipant {
    /// Graceful stop.
    ///
    /// # Errors
    /// The service failed.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// A loopback HTTP listener on a free port, so that participants in the
/// same process (or beside another test's) never collide on the defaults.
async fn http_listener() -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Starts the inventory service with `stock` (`SKU=N` entries), its HTTP
/// surface on a free loopback port.
///
/// # Errors
/// The HTTP port cannot be bound.
pub async fn start_inventory(
    nats: &NatsAccess,
    data_dir: &Path,
    stock: &[(&str, u64)],
) -> Result<RunningParticipant> {
    let mut config = participants::inventory::InventoryConfig::for_tests(
        nats.url(),
        data_dir,
        stock.iter().map(|(s, n)| ((*s).to_string(), *n)).collect(),
    );
    config.nats_security = nats.security(&Role::Participant("inventory".into()));
    let (http, http_addr) = http_listener().await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(participants::inventory::run(config, http, shutdown.clone()));
    Ok(RunningParticipant {
        http_addr,
        shutdown,
        task,
    })
}

/// Starts the shipping service; `unreachable` customers are refused
/// (`address_unreachable`).
///
/// # Errors
/// The HTTP port cannot be bound.
pub async fn start_shipping(
    nats: &NatsAccess,
    data_dir: &Path,
    unreachable: &[&str],
) -> Result<RunningParticipant> {
    let mut config = participants::shipping::ShippingConfig::for_tests(nats.url(), data_dir);
    config.nats_security = nats.security(&Role::Participant("shipping".into()));
    config.unreachable_customers = unreachable.iter().map(|c| c.to_string()).collect();
    let (http, http_addr) = http_listener().await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(participants::shipping::run(config, http, shutdown.clone()));
    Ok(RunningParticipant {
        http_addr,
        shutdown,
        task,
    })
}

/// Payment settings for a test.
#[derive(Debug, Clone)]
pub struct PaymentSettings {
    /// Amounts above this are declined.
    pub customer_limit_cents: i64,
    /// Simulated gateway latency.
    pub gateway_latency: Duration,
    /// Share of gateway calls failing transiently.
    pub gateway_failure_rate: f64,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        PaymentSettings {
            customer_limit_cents: 50_000,
            gateway_latency: Duration::ZERO,
            gateway_failure_rate: 0.0,
        }
    }
}

/// Starts the payment service, its HTTP surface on a free loopback port.
///
/// # Errors
/// The HTTP port cannot be bound.
pub async fn start_payment(
    nats: &NatsAccess,
    data_dir: &Path,
    s: &PaymentSettings,
) -> Result<RunningParticipant> {
    let mut config = participants::payment::PaymentConfig::for_tests(
        nats.url(),
        data_dir,
        s.customer_limit_cents,
        s.gateway_latency,
        s.gateway_failure_rate,
    );
    config.nats_security = nats.security(&Role::Participant("payment".into()));
    let (http, http_addr) = http_listener().await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(participants::payment::run(config, http, shutdown.clone()));
    Ok(RunningParticipant {
        http_addr,
        shutdown,
        task,
    })
}

/// Asks a participant for its figures (`saga.admin.<participant>.stats`).
///
/// # Errors
/// No answer within 5 s, or not JSON.
pub async fn stats(nats: &async_nats::Client, participant: &str) -> Result<serde_json::Value> {
    admin_request(
        nats,
        saga_wire::stats_subject(participant),
        Duration::from_secs(5),
    )
    .await
}

/// A participant's read-only admin subject (`saga.admin.<participant>.*`), answered as JSON.
///
/// # Errors
/// No answer within `timeout`, or not JSON.
pub async fn admin_request(
    nats: &async_nats::Client,
    subject: String,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let msg = tokio::time::timeout(timeout, nats.request(subject.clone(), "".into()))
        .await
        .with_context(|| format!("{subject} timed out"))??;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// Waits until `participant` answers its stats subject (it is subscribed).
///
/// # Errors
/// Not up within 10 s.
pub async fn wait_participant(nats: &async_nats::Client, participant: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match stats(nats, participant).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{participant} not up"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `(available, reserved)` of `sku` from the inventory's stats.
///
/// # Errors
/// Stats unavailable or without the SKU.
pub async fn stock(nats: &async_nats::Client, sku: &str) -> Result<(u64, u64)> {
    let s = stats(nats, "inventory").await?;
    let entry = &s["stock"][sku];
    match (entry["available"].as_u64(), entry["reserved"].as_u64()) {
        (Some(a), Some(r)) => Ok((a, r)),
        _ => bail!("no stock figures for {sku} in {s}"),
    }
}

/// `(charged_cents, refunded_cents)` from the payment's stats.
///
/// # Errors
/// Stats unavailable or malformed.
pub async fn ledger(nats: &async_nats::Client) -> Result<(i64, i64)> {
    let s = stats(nats, "payment").await?;
    match (s["charged_cents"].as_i64(), s["refunded_cents"].as_i64()) {
        (Some(c), Some(r)) => Ok((c, r)),
        _ => bail!("no ledger figures in {s}"),
    }
}

/// A well-formed command of the shipped order saga for `saga_id`, as the
/// coordinator sends it at attempt 1: `reserve`/`release` (step
/// `reserve-inventory`) or `charge`/`refund` (step `charge-payment`).
pub fn order_command(saga_id: &str, action: &str, payload: saga_wire::OrderPayload) -> saga_wire::Command {
    use saga_wire::CommandKind;
    let (step, kind) = match action {
        "reserve" => ("reserve-inventory", CommandKind::Forward),
        "release" => ("reserve-inventory", CommandKind::Compensate),
        "charge" => ("charge-payment", CommandKind::Forward),
        _ => ("charge-payment", CommandKind::Compensate),
    };
    saga_wire::Command {
        saga_id: saga_id.into(),
        definition: "order@1".into(),
        step: step.into(),
        action: action.into(),
        kind,
        attempt: 1,
        idempotency_key: saga_wire::idempotency_key(saga_id, step, kind),
        payload,
        input: serde_json::Value::Null,
    }
}

/// An order request.
pub fn order(customer: &str, items: &[(&str, u32)], amount_cents: i64) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        customer_id: customer.into(),
        items: items
            .iter()
            .map(|(s, q)| pb::OrderItem {
                sku: (*s).into(),
                quantity: *q,
            })
            .collect(),
        amount_cents,
        currency: "EUR".into(),
        ..Default::default()
    }
}

pub use saga_proto::names::is_terminal;

/// Now, in ms since the Unix epoch (the unit of the engine's timestamps).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A gRPC timestamp in ms since the Unix epoch (0 when absent or before it).
pub fn timestamp_ms(t: &Option<prost_types::Timestamp>) -> u64 {
    t.as_ref().map_or(0, |t| {
        u64::try_from(t.seconds).unwrap_or(0) * 1000 + u64::try_from(t.nanos).unwrap_or(0) / 1_000_000
    })
}

/// Polls `GetSaga` until the saga is terminal.
///
/// # Errors
/// Not terminal within `timeout`, or GetSaga failed.
pub async fn wait_terminal(
    client: &mut SagaServiceClient<Channel>,
    saga_id: &str,
    timeout: Duration,
) -> Result<pb::Saga> {
    let deadline = Instant::now() + timeout;
    loop {
        let saga = client
            .get_saga(pb::GetSagaRequest {
                saga_id: saga_id.into(),
            })
            .await?
            .into_inner();
        if is_terminal(saga.state) {
            return Ok(saga);
        }
        if Instant::now() > deadline {
            bail!("saga {saga_id} not terminal after {timeout:?}: {saga:#?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `GetSaga` until `check` holds for the saga.
///
/// # Errors
/// Not within [`WAIT`].
pub async fn wait_saga(
    client: &SagaServiceClient<Channel>,
    saga_id: &str,
    what: &str,
    check: impl Fn(&pb::Saga) -> bool,
) -> Result<()> {
    let check = &check;
    eventually(WAIT, what, || {
        let mut g = client.clone();
        async move {
            g.get_saga(pb::GetSagaRequest {
                saga_id: saga_id.into(),
            })
            .await
            .is_ok_and(|r| check(&r.into_inner()))
        }
    })
    .await
}

/// Polls until `check` holds.
///
/// # Errors
/// Still false after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// Writes a definitions directory with the order saga whose `charge-payment`
/// step uses `charge_timeout` and `max_attempts` with fast retries, for
/// fault-injection tests. `reserve-inventory` keeps a generous timeout so a
/// loaded machine cannot turn it into a fault the test did not ask for.
///
/// # Errors
/// I/O.
pub fn fast_definitions(dir: &Path, charge_timeout: &str, max_attempts: u32) -> Result<PathBuf> {
    let defs = dir.join("defs");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(
        defs.join("order.yaml"),
        format!(
            "name: order\nversion: 1\ndefaults:\n  timeout: 5s\n  retry: {{ max_attempts: {max_attempts}, \
             initial_backoff: 20ms, max_backoff: 200ms, multiplier: 2.0, jitter: true }}\nsteps:\n  \
             - name: reserve-inventory\n    participant: inventory\n    action: reserve\n    compensation: release\n  \
             - name: charge-payment\n    participant: payment\n    action: charge\n    compensation: refund\n    \
             timeout: {charge_timeout}\n"
        ),
    )?;
    Ok(defs)
}

/// What a [`FakeParticipant`] answers.
#[derive(Debug, Clone)]
pub enum FakeAnswer {
    /// A proper reply envelope.
    Reply(saga_wire::Reply),
    /// Raw bytes (a malformed reply).
    Raw(Vec<u8>),
    /// No answer at all.
    Silent,
}

type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, u32, Instant)>>>;
type Script = dyn Fn(&saga_wire::Command, usize) -> FakeAnswer + Send + Sync;

/// A scripted participant on `saga.cmd.<name>.*` for fault injection; it
/// records every command it receives with the time it arrived.
pub struct FakeParticipant {
    calls: Calls,
    task: JoinHandle<()>,
}

impl FakeParticipant {
    /// Serves `name`; `script(command, n)` decides the answer to the n-th (0-based) command.
    ///
    /// # Errors
    /// Subscription failure.
    pub async fn start(
        client: &async_nats::Client,
        name: &str,
        script: impl Fn(&saga_wire::Command, usize) -> FakeAnswer + Send + Sync + 'static,
    ) -> Result<Self> {
        use futures::StreamExt;
        let mut sub = client.subscribe(format!("saga.cmd.{name}.*")).await?;
        client.flush().await?;
        let calls: Calls = Calls::default();
        let script: std::sync::Arc<Script> = std::sync::Arc::new(script);
        let (client, log) = (client.clone(), calls.clone());
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(cmd) = serde_json::from_slice::<saga_wire::Command>(&msg.payload) else {
                    continue;
                };
                let n = {
                    let Ok(mut log) = log.lock() else { return };
                    log.push((cmd.action.clone(), cmd.attempt, Instant::now()));
                    log.len() - 1
                };
                let body = match script(&cmd, n) {
                    FakeAnswer::Reply(r) => serde_json::to_vec(&r).unwrap_or_default(),
                    FakeAnswer::Raw(b) => b,
                    FakeAnswer::Silent => continue,
                };
                if let Some(reply) = msg.reply {
                    let _ = client.publish(reply, body.into()).await;
                }
            }
        });
        Ok(FakeParticipant { calls, task })
    }

    /// `(action, attempt, arrival)` of every command received so far, in order.
    pub fn calls(&self) -> Vec<(String, u32, Instant)> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for FakeParticipant {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `fake-defs/fake.yaml`: step `fake-step` on the fake participant
/// (`do` / `undo`), then the inventory's `reserve` (`release`), with fast
/// retries of `max_attempts`.
///
/// # Errors
/// I/O.
pub fn fake_definitions(dir: &Path, max_attempts: u32) -> Result<PathBuf> {
    let defs = dir.join("fake-defs");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(
        defs.join("fake.yaml"),
        format!(
            "name: fake\nversion: 1\ndefaults:\n  timeout: 300ms\n  retry: {{ max_attempts: {max_attempts}, \
             initial_backoff: 10ms, max_backoff: 20ms, multiplier: 2.0, jitter: false }}\nsteps:\n  \
             - name: fake-step\n    participant: fake\n    action: do\n    compensation: undo\n  \
             - name: reserve-inventory\n    participant: inventory\n    action: reserve\n    \
             compensation: release\n    timeout: 5s\n"
        ),
    )?;
    Ok(defs)
}

/// nats-server, inventory, payment and coordinator, each on its own temp dir.
pub struct System {
    /// The nats-server process.
    pub nats: NatsServer,
    /// A plain NATS client for the test (stats, raw commands).
    pub client: async_nats::Client,
    /// Root of the services' data directories.
    pub dir: TempDir,
    /// Definitions directory the coordinator loads.
    pub definitions: PathBuf,
    /// The coordinator, when started.
    pub coordinator: Option<RunningCoordinator>,
    /// The inventory, when started.
    pub inventory: Option<RunningParticipant>,
    /// The payment service, when started.
    pub payment: Option<RunningParticipant>,
}

/// Stock every test system starts with.
pub const STOCK: &[(&str, u64)] = &[("A-1", 10), ("B-2", 5), ("RARE-1", 1)];

impl System {
    /// Starts NATS only; the other parts are started by the test.
    pub async fn bare(definitions: Option<PathBuf>) -> Result<Self> {
        init_logs();
        let nats = NatsServer::start()?;
        let client = nats.connect().await?;
        let dir = tempfile::tempdir()?;
        let definitions = definitions.unwrap_or_else(shipped_definitions);
        Ok(System {
            nats,
            client,
            dir,
            definitions,
            coordinator: None,
            inventory: None,
            payment: None,
        })
    }

    /// Everything up, with the shipped definitions.
    pub async fn up() -> Result<Self> {
        let mut s = System::bare(None).await?;
        s.start_inventory().await?;
        s.start_payment(&PaymentSettings::default()).await?;
        s.start_coordinator().await?;
        Ok(s)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn start_inventory(&mut self) -> Result<()> {
        self.inventory = Some(start_inventory(&self.nats.access(), &self.path("inventory"), STOCK).await?);
        wait_participant(&self.client, "inventory").await
    }

    pub async fn start_payment(&mut self, settings: &PaymentSettings) -> Result<()> {
        self.payment = Some(start_payment(&self.nats.access(), &self.path("payment"), settings).await?);
        wait_participant(&self.client, "payment").await
    }

    pub async fn start_coordinator(&mut self) -> Result<()> {
        let c = RunningCoordinator::start(&self.nats.access(), &self.path("coordinator"), &self.definitions)
            .await?;
        c.wait_ready().await?;
        self.coordinator = Some(c);
        Ok(())
    }

    pub async fn stop_coordinator(&mut self) -> Result<()> {
        match self.coordinator.take() {
            Some(c) => c.stop().await,
            None => Ok(()),
        }
    }

    pub async fn grpc(&self) -> Result<SagaServiceClient<Channel>> {
        match &self.coordinator {
            Some(c) => c.client().await,
            None => anyhow::bail!("coordinator not started"),
        }
    }

    pub async fn run_order(&self, req: pb::CreateOrderRequest) -> Result<pb::Saga> {
        let mut g = self.grpc().await?;
        let created = g.create_order(req).await?.into_inner();
        assert!(created.created);
        wait_terminal(&mut g, &created.saga_id, WAIT).await
    }

    pub async fn shutdown(mut self) -> Result<()> {
        self.stop_coordinator().await?;
        if let Some(p) = self.payment.take() {
            p.stop().await?;
        }
        if let Some(i) = self.inventory.take() {
            i.stop().await?;
        }
        Ok(())
    }
}

/// Every message in the saga events stream now: `(subject, event)` in stream
/// order (the domain-alias copies included, under their own subjects).
///
/// # Errors
/// The stream is missing, or a message is not a saga event.
pub async fn stream_events(
    client: &async_nats::Client,
    stream: &str,
) -> Result<Vec<(String, saga_wire::SagaEvent)>> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures::StreamExt;
    let js = async_nats::jetstream::new(client.clone());
    let mut s = js.get_stream(stream).await?;
    let last = s.info().await?.state.last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return Ok(out);
    }
    let consumer = s
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .context("events stream stalled")?;
        let Some(message) = next else { break };
        let message = message.map_err(|e| anyhow!("{e}"))?;
        let seq = message.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
        out.push((
            message.subject.to_string(),
            serde_json::from_slice(&message.payload).context("event payload")?,
        ));
        if seq >= last {
            break;
        }
    }
    Ok(out)
}
