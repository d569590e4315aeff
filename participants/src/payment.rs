//! The payment participant: a ledger (on either store) and a simulated card
//! gateway behind a failsafe circuit breaker (one per replica).
//!
//! `charge`: a stored reply (repeat or tombstone) is returned at once;
//! deterministic declines (amount above the customer limit, or a declined
//! customer) are `rejected: card_declined`; otherwise the gateway is called
//! (latency, transient failures) OUTSIDE any transaction, and then one
//! transaction re-checks the key (a duplicate or a refund may have won
//! meanwhile: then no ledger entry) and writes the ledger entry with the
//! stored reply. `refund` marks the charge refunded, once.
//!
//! It owns the `charge/<forward key>` ledger entries of its state tree; it
//! never holds a transaction (or anything else) across the gateway call, and
//! leaves idempotency and durability to [`crate::store`], NATS to
//! [`crate::runtime`], metrics and HTTP to [`crate::telemetry`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use failsafe::{futures::CircuitBreaker, Config as BreakerConfig, Instrument};
use rand::Rng;
use saga_wire::{saga_of_key, Command, CommandKind, Reply};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    runtime::{BoxFuture, Handler},
    store::{self, tx_get, tx_put, SharedStore, StoreError, StoreKind, TxError},
    telemetry, ConfigError, LogFormat,
};

/// Payment settings: defaults, environment, flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "payment",
    version,
    about = "Payment participant: charges and refunds through a gateway"
)]
pub struct PaymentConfig {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_security: saga_nats::NatsSecurity,
    /// Directory of the sled database (sled store).
    #[arg(long, env = "PAYMENT_DATA_DIR", default_value = "./data/payment")]
    pub data_dir: PathBuf,
    /// Where idempotency records and the ledger live: `sled` (embedded, this process only)
    /// or `jetstream` (KV buckets `PART_payment_*`, shared by replicas).
    #[arg(long, env = "PAYMENT_STORE", value_enum, default_value = "sled")]
    pub store: StoreKind,
    /// Replicas of the KV buckets when this participant creates them (jetstream store).
    #[arg(long, env = "PAYMENT_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// Charges above this amount (minor units) are declined.
    #[arg(long, env = "PAYMENT_CUSTOMER_LIMIT_CENTS", default_value_t = 100_000)]
    pub customer_limit_cents: i64,
    /// Customers whose cards are always declined.
    #[arg(long, env = "PAYMENT_DECLINED_CUSTOMERS", value_delimiter = ',')]
    pub declined_customers: Vec<String>,
    /// Simulated gateway latency per charge.
    #[arg(long, env = "PAYMENT_GATEWAY_LATENCY", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub gateway_latency: Duration,
    /// Share (0.0..=1.0) of gateway calls failing transiently.
    #[arg(long, env = "PAYMENT_GATEWAY_FAILURE_RATE", default_value_t = 0.0)]
    pub gateway_failure_rate: f64,
    /// Consecutive gateway failures that open the circuit breaker.
    #[arg(long, env = "PAYMENT_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long an open breaker first rejects calls before trying again;
    /// doubled each time the trial call fails, up to `--breaker-max-wait`.
    #[arg(long, env = "PAYMENT_BREAKER_WAIT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub breaker_wait: Duration,
    /// Longest time an open breaker rejects calls.
    #[arg(long, env = "PAYMENT_BREAKER_MAX_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub breaker_max_wait: Duration,
    /// Address of the HTTP server: `GET /metrics`, `/health`, `/ready`
    /// (port 0 picks a free port; the address is logged).
    #[arg(long, env = "PAYMENT_HTTP_ADDR", default_value = "127.0.0.1:9466")]
    pub http_addr: SocketAddr,
    /// Once the HTTP server listens, write `{"http":"<addr>"}` to this file
    /// (with port 0: how a supervisor or a test learns the port).
    #[arg(long, env = "PAYMENT_PORTS_FILE")]
    pub ports_file: Option<std::path::PathBuf>,
    /// Retention of the replies stored under idempotency keys.
    #[command(flatten)]
    pub retention: crate::ReplyRetention,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// OTLP trace export (off unless an endpoint is set).
    #[command(flatten)]
    pub trace: saga_trace::TraceArgs,
}

impl PaymentConfig {
    /// Settings for an embedded (test) instance.
    pub fn for_tests(
        nats_url: &str,
        data_dir: &Path,
        customer_limit_cents: i64,
        gateway_latency: Duration,
        gateway_failure_rate: f64,
    ) -> Self {
        PaymentConfig {
            nats_url: nats_url.into(),
            nats_security: saga_nats::NatsSecurity::default(),
            data_dir: data_dir.into(),
            store: StoreKind::Sled,
            kv_replicas: 1,
            customer_limit_cents,
            declined_customers: Vec::new(),
            gateway_latency,
            gateway_failure_rate,
            breaker_failures: 5,
            breaker_wait: Duration::from_millis(200),
            breaker_max_wait: Duration::from_millis(800),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ports_file: None,
            retention: crate::ReplyRetention::default(),
            log_format: LogFormat::Pretty,
            trace: saga_trace::TraceArgs::default(),
        }
    }

    /// Checks the settings before anything starts.
    ///
    /// # Errors
    /// An empty NATS URL, a failure rate outside 0..=1, a limit ≤ 0, a breaker
    /// threshold of 0, a zero breaker wait or a max wait below it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, reason: &str| {
            Err(ConfigError::Invalid {
                setting,
                reason: reason.into(),
            })
        };
        if self.nats_url.trim().is_empty() {
            return invalid("nats-url", "empty");
        }
        if let Err(reason) = self.nats_security.validate() {
            return invalid("nats-security", &reason);
        }
        if !(0.0..=1.0).contains(&self.gateway_failure_rate) {
            return invalid("gateway-failure-rate", "must be within 0.0..=1.0");
        }
        if self.customer_limit_cents <= 0 {
            return invalid("customer-limit-cents", "must be > 0");
        }
        if self.breaker_failures == 0 {
            return invalid("breaker-failures", "must be ≥ 1");
        }
        if self.breaker_wait.is_zero() {
            return invalid("breaker-wait", "must be > 0");
        }
        if self.breaker_max_wait < self.breaker_wait {
            return invalid("breaker-max-wait", "must be ≥ breaker-wait");
        }
        self.store_target().validate()
    }

    /// The store this configuration opens.
    pub fn store_target(&self) -> crate::StoreTarget {
        crate::StoreTarget {
            kind: self.store,
            data_dir: self.data_dir.clone(),
            kv_replicas: self.kv_replicas,
            root_prefixes: vec!["meta/".to_string()],
            reply_rows: Some(LEDGER_PREFIX.to_string()),
        }
    }
}

/// A ledger entry, stored under the charge's forward idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// Gateway charge id.
    pub charge_id: String,
    /// Order charged.
    pub order_id: String,
    /// Customer charged.
    pub customer_id: String,
    /// Amount in minor units.
    pub amount_cents: i64,
    /// Currency.
    pub currency: String,
    /// Whether it was refunded.
    pub refunded: bool,
}

/// Ledger totals: the figures of `saga.admin.payment.stats`, kept in the
/// transaction of each charge and refund (never a scan of the ledger).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Sum of all charges.
    pub charged_cents: i64,
    /// Sum of refunded charges.
    pub refunded_cents: i64,
    /// Number of charges.
    pub charges: u64,
    /// Number of refunds.
    pub refunds: u64,
}

/// Logs breaker state changes.
#[derive(Debug, Clone, Copy)]
struct BreakerLog;

impl Instrument for BreakerLog {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        warn!("gateway circuit breaker open: failing charges fast");
    }
    fn on_half_open(&self) {
        info!("gateway circuit breaker half-open: trying the gateway");
    }
    fn on_closed(&self) {
        info!("gateway circuit breaker closed");
    }
}

#[derive(Debug)]
struct GatewayDown;

/// How long the breaker stays open: `start`, doubled per failed trial call,
/// capped at `max`; the policy starts again from `start` once a call succeeds.
/// (failsafe's own `exponential` refuses durations under one second.)
#[derive(Debug, Clone)]
struct OpenBackoff {
    next: Duration,
    max: Duration,
}

impl Iterator for OpenBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = current.saturating_mul(2).min(self.max);
        Some(current)
    }
}

type Breaker = failsafe::StateMachine<failsafe::failure_policy::ConsecutiveFailures<OpenBackoff>, BreakerLog>;

/// The payment handler.
pub struct Payment {
    store: SharedStore,
    config: PaymentConfig,
    breaker: Breaker,
    commands: AtomicU64,
    dedupe_hits: AtomicU64,
}

const ACTIONS: &[&str] = &["charge", "refund"];

const LEDGER_PREFIX: &str = "charge/";
/// Where the ledger totals live in the state tree (outside `charge/`).
const TOTALS_KEY: &str = "meta/totals";

fn ledger_key(forward_key: &str) -> String {
    format!("{LEDGER_PREFIX}{forward_key}")
}

impl Payment {
    /// Opens the ledger in `store`.
    ///
    /// # Errors
    /// The store failed.
    pub async fn open(store: SharedStore, config: PaymentConfig) -> Result<Self, StoreError> {
        let backoff = OpenBackoff {
            next: config.breaker_wait,
            max: config.breaker_max_wait.max(config.breaker_wait),
        };
        let policy = failsafe::failure_policy::consecutive_failures(config.breaker_failures, backoff);
        let breaker = BreakerConfig::new()
            .failure_policy(policy)
            .instrument(BreakerLog)
            .build();
        let payment = Payment {
            store,
            config,
            breaker,
            commands: AtomicU64::new(0),
            dedupe_hits: AtomicU64::new(0),
        };
        // A ledger without totals (written by an older release) gets them
        // here, from one scan.
        if payment.store.get(TOTALS_KEY).await?.is_none() {
            let totals = payment.scan_totals().await?;
            payment
                .store
                .update_state(&|state| tx_put(state, TOTALS_KEY, &totals))
                .await?;
        }
        Ok(payment)
    }

    /// Ledger totals, as stored with the entries (O(1)).
    ///
    /// # Errors
    /// The store failed; a corrupt value.
    pub async fn totals(&self) -> Result<Totals, StoreError> {
        Ok(store::get_as(self.store.as_ref(), TOTALS_KEY)
            .await?
            .unwrap_or_default())
    }

    /// Ledger totals worked out from every entry (at open, and to check
    /// [`Payment::totals`]).
    ///
    /// # Errors
    /// The store failed; corrupt entries.
    pub async fn scan_totals(&self) -> Result<Totals, StoreError> {
        let mut t = Totals::default();
        for (_, c) in store::scan_all::<Charge>(self.store.as_ref(), LEDGER_PREFIX).await? {
            t.charged_cents += c.amount_cents;
            t.charges += 1;
            if c.refunded {
                t.refunded_cents += c.amount_cents;
                t.refunds += 1;
            }
        }
        Ok(t)
    }

    /// The simulated gateway: latency, then a transient failure with the configured probability.
    async fn gateway(&self) -> Result<String, GatewayDown> {
        // No zero sleep: tokio would round it up to its next 1 ms timer tick.
        if !self.config.gateway_latency.is_zero() {
            tokio::time::sleep(self.config.gateway_latency).await;
        }
        // Never panics, whatever the (unvalidated, in tests) rate: 0 never fails, ≥ 1 always does.
        let fail = rand::rng().random::<f64>() < self.config.gateway_failure_rate;
        if fail {
            Err(GatewayDown)
        } else {
            Ok(format!("ch_{}", uuid::Uuid::new_v4().simple()))
        }
    }

    async fn charge(&self, cmd: &Command) -> Result<(Reply, bool), StoreError> {
        let key = cmd.idempotency_key.as_str();
        if let Some(stored) = self.store.stored_reply(key).await? {
            return Ok((stored, true));
        }
        let p = &cmd.payload;
        let declined = p.amount_cents > self.config.customer_limit_cents
            || self.config.declined_customers.contains(&p.customer_id);
        let charge_id = if declined {
            None
        } else {
            match self.breaker.call(self.gateway()).await {
                Ok(id) => Some(id),
                Err(failsafe::Error::Inner(GatewayDown)) => {
                    return Ok((Reply::error("gateway_unavailable"), false))
                }
                Err(failsafe::Error::Rejected) => return Ok((Reply::error("gateway_circuit_open"), false)),
            }
        };
        self.store
            .apply_forward(key, &|state| match &charge_id {
                None => Ok(Reply::rejected("card_declined")),
                Some(id) => {
                    let entry = Charge {
                        charge_id: id.clone(),
                        order_id: p.order_id.clone(),
                        customer_id: p.customer_id.clone(),
                        amount_cents: p.amount_cents,
                        currency: p.currency.clone(),
                        refunded: false,
                    };
                    tx_put(state, &ledger_key(key), &entry)?;
                    let mut totals: Totals = tx_get(state, TOTALS_KEY)?.unwrap_or_default();
                    totals.charges += 1;
                    totals.charged_cents += p.amount_cents;
                    tx_put(state, TOTALS_KEY, &totals)?;
                    Ok(Reply::ok(
                        serde_json::json!({"charge_id": id, "amount_cents": p.amount_cents}),
                    ))
                }
            })
            .await
    }

    async fn run(&self, cmd: Command) -> Result<Reply, StoreError> {
        let (reply, hit) = match (cmd.kind, cmd.action.as_str()) {
            (CommandKind::Forward, "charge") => self.charge(&cmd).await?,
            (CommandKind::Compensate, "refund") => {
                // The definition may pass the charge to refund (a reference to the
                // charge step's output): it must be the one booked under this saga.
                let expected = cmd
                    .input
                    .get("charge_id")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                self.store
                    .apply_compensation(&cmd.idempotency_key, &|state, forward, _| {
                        let key = ledger_key(forward);
                        let Some(mut charge) = tx_get::<Charge>(state, &key)? else {
                            return Err(TxError::Abort(format!("ledger entry {key} missing")));
                        };
                        if expected.as_ref().is_some_and(|id| *id != charge.charge_id) {
                            return Ok(Reply::rejected("charge_id_mismatch"));
                        }
                        if !charge.refunded {
                            let mut totals: Totals = tx_get(state, TOTALS_KEY)?.unwrap_or_default();
                            totals.refunds += 1;
                            totals.refunded_cents += charge.amount_cents;
                            tx_put(state, TOTALS_KEY, &totals)?;
                        }
                        charge.refunded = true;
                        tx_put(state, &key, &charge)?;
                        Ok(Reply::ok(
                            serde_json::json!({"undone": true, "refunded": charge.charge_id}),
                        ))
                    })
                    .await?
            }
            (kind, action) => return Ok(crate::runtime::wrong_direction(kind, action)),
        };
        if hit {
            self.dedupe_hits.fetch_add(1, Ordering::Relaxed);
            telemetry::dedupe_hit(self.participant());
        }
        Ok(reply)
    }
}

impl Handler for Payment {
    fn participant(&self) -> &str {
        "payment"
    }

    fn actions(&self) -> &[&str] {
        ACTIONS
    }

    fn handle(&self, cmd: Command) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            let reply = crate::runtime::store_reply("payment", self.run(cmd).await);
            // Counted once handled, so a test can wait for in-flight commands to finish.
            self.commands.fetch_add(1, Ordering::Relaxed);
            reply
        })
    }

    fn stats(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let totals = match self.totals().await {
                Ok(t) => serde_json::to_value(t).unwrap_or_default(),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            };
            let mut v = totals;
            v["commands"] = self.commands.load(Ordering::Relaxed).into();
            v["dedupe_hits"] = self.dedupe_hits.load(Ordering::Relaxed).into();
            v["breaker_open"] = (!self.breaker.is_call_permitted()).into();
            v
        })
    }

    /// `{saga_id: {"amount_cents": n, "refunded": bool}}` for every ledger entry.
    fn effects<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<crate::runtime::Effects, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for (key, bytes) in self.store.scan(LEDGER_PREFIX, cursor, limit).await? {
                let c: Charge = store::decode(format!("{LEDGER_PREFIX}{key}").as_bytes(), &bytes)?;
                let saga = saga_of_key(&key).to_string();
                let effect = serde_json::json!({"amount_cents": c.amount_cents, "refunded": c.refunded});
                out.push((key, saga, effect));
            }
            Ok(out)
        })
    }

    fn store(&self) -> &SharedStore {
        &self.store
    }
}

/// Runs the payment service until `shutdown` fires, with its HTTP surface
/// (`/metrics`, `/health`, `/ready`) on `http` (the binary binds
/// `--http-addr`; tests bind port 0).
///
/// # Errors
/// Invalid settings, the store cannot be opened, shutdown before NATS was
/// reachable, NATS subscription failure.
pub async fn run(
    config: PaymentConfig,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let nats = crate::NatsTarget {
        url: config.nats_url.clone(),
        security: config.nats_security.clone(),
    };
    let retention = config.retention;
    let target = config.store_target();
    crate::serve_participant(
        "payment",
        &target,
        &nats,
        http,
        retention,
        shutdown,
        |store| async move {
            let payment = Arc::new(Payment::open(store, config).await?);
            let totals = payment.totals().await?;
            info!(?totals, "payment ledger opened");
            Ok(payment as Arc<dyn Handler>)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use saga_wire::{self as wire, Item, OrderPayload};

    use super::*;

    /// The sled store as the payment opens it (its reply rows).
    fn sled(dir: &Path) -> SharedStore {
        let target = PaymentConfig::for_tests("nats://unused", dir, 1, Duration::ZERO, 0.0).store_target();
        Arc::new(
            target
                .open_sled(crate::ReplyRetention::default().reply_retention)
                .expect("store"),
        )
    }

    async fn payment(dir: &Path, latency: Duration, failure_rate: f64) -> Arc<Payment> {
        let config = PaymentConfig::for_tests("nats://unused", dir, 10_000, latency, failure_rate);
        Arc::new(Payment::open(sled(dir), config).await.expect("open"))
    }

    fn cmd(saga: &str, kind: CommandKind, amount: i64) -> Command {
        let (step, action) = (
            "charge-payment",
            if kind == CommandKind::Forward {
                "charge"
            } else {
                "refund"
            },
        );
        Command {
            saga_id: saga.into(),
            definition: "order@1".into(),
            step: step.into(),
            action: action.into(),
            kind,
            attempt: 1,
            idempotency_key: wire::idempotency_key(saga, step, kind),
            payload: OrderPayload {
                order_id: "o".into(),
                customer_id: "c".into(),
                items: vec![Item {
                    sku: "A".into(),
                    quantity: 1,
                }],
                amount_cents: amount,
                currency: "EUR".into(),
            },
            input: serde_json::Value::Null,
        }
    }

    async fn figures(p: &Payment) -> (i64, i64) {
        let t = p.totals().await.expect("totals");
        (t.charged_cents, t.refunded_cents)
    }

    #[tokio::test]
    async fn charge_refund_and_repeats() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = payment(dir.path(), Duration::ZERO, 0.0).await;
        let a = p.handle(cmd("s1", CommandKind::Forward, 500)).await;
        let b = p.handle(cmd("s1", CommandKind::Forward, 500)).await;
        assert!(matches!(a, Reply::Ok { .. }), "{a:?}");
        assert_eq!(a, b, "the stored reply, same charge id");
        assert_eq!(figures(&p).await, (500, 0));
        let r1 = p.handle(cmd("s1", CommandKind::Compensate, 500)).await;
        let r2 = p.handle(cmd("s1", CommandKind::Compensate, 500)).await;
        assert_eq!(r1, r2);
        assert_eq!(figures(&p).await, (500, 500));
        assert_eq!(p.stats().await["dedupe_hits"], 2);
    }

    #[tokio::test]
    async fn over_the_limit_is_declined_and_stored() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = payment(dir.path(), Duration::ZERO, 0.0).await;
        let r = p.handle(cmd("s1", CommandKind::Forward, 10_001)).await;
        assert_eq!(r, Reply::rejected("card_declined"));
        let refund = p.handle(cmd("s1", CommandKind::Compensate, 10_001)).await;
        assert!(matches!(refund, Reply::Ok { .. }));
        assert_eq!(figures(&p).await, (0, 0));
    }

    #[tokio::test]
    async fn transient_gateway_failures_are_not_stored_and_open_the_breaker() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = payment(dir.path(), Duration::ZERO, 1.0).await;
        for _ in 0..5 {
            assert_eq!(
                p.handle(cmd("s1", CommandKind::Forward, 5)).await,
                Reply::error("gateway_unavailable")
            );
        }
        assert_eq!(
            p.handle(cmd("s1", CommandKind::Forward, 5)).await,
            Reply::error("gateway_circuit_open")
        );
        assert_eq!(p.stats().await["breaker_open"], true);
        assert_eq!(figures(&p).await, (0, 0));
        drop(p);
        // Same data, healthy gateway: the retry succeeds because nothing was stored.
        let p = payment(dir.path(), Duration::ZERO, 0.0).await;
        assert!(matches!(
            p.handle(cmd("s1", CommandKind::Forward, 5)).await,
            Reply::Ok { .. }
        ));
        assert_eq!(figures(&p).await, (5, 0));
    }

    #[tokio::test]
    async fn a_refund_that_overtakes_a_slow_charge_wins() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = payment(dir.path(), Duration::from_millis(300), 0.0).await;
        let slow = {
            let p = p.clone();
            tokio::spawn(async move { p.handle(cmd("s1", CommandKind::Forward, 700)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refund = p.handle(cmd("s1", CommandKind::Compensate, 700)).await;
        assert!(matches!(refund, Reply::Ok { .. }), "{refund:?}");
        let late = slow.await.expect("join");
        assert_eq!(late, Reply::rejected(crate::store::TOMBSTONE_REASON));
        assert_eq!(figures(&p).await, (0, 0));
    }

    #[tokio::test]
    async fn concurrent_duplicate_charges_make_one_ledger_entry() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = payment(dir.path(), Duration::from_millis(50), 0.0).await;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.handle(cmd("s1", CommandKind::Forward, 900)).await })
            })
            .collect();
        let mut replies = Vec::new();
        for h in handles {
            replies.push(h.await.expect("join"));
        }
        assert!(replies.iter().all(|r| r == &replies[0]), "{replies:?}");
        assert_eq!(p.totals().await.expect("totals").charges, 1);
        assert_eq!(figures(&p).await, (900, 0));
    }

    #[tokio::test]
    async fn declined_customers_are_rejected_and_the_decline_is_stored() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = PaymentConfig::for_tests("nats://unused", dir.path(), 10_000, Duration::ZERO, 0.0);
        config.declined_customers = vec!["c".into()];
        let p = Payment::open(sled(dir.path()), config).await.expect("open");
        let r = p.handle(cmd("s1", CommandKind::Forward, 5)).await;
        assert_eq!(r, Reply::rejected("card_declined"));
        assert_eq!(p.handle(cmd("s1", CommandKind::Forward, 5)).await, r);
        assert_eq!(p.stats().await["dedupe_hits"], 1);
        assert_eq!(p.totals().await.expect("totals"), Totals::default());
    }

    #[tokio::test]
    async fn the_ledger_survives_a_restart_and_refunds_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = {
            let p = payment(dir.path(), Duration::ZERO, 0.0).await;
            p.handle(cmd("s1", CommandKind::Forward, 300)).await;
            p.handle(cmd("s2", CommandKind::Forward, 200)).await
        };
        let p = payment(dir.path(), Duration::ZERO, 0.0).await;
        assert_eq!(figures(&p).await, (500, 0));
        assert_eq!(
            p.handle(cmd("s2", CommandKind::Forward, 200)).await,
            first,
            "same charge id"
        );
        assert!(matches!(
            p.handle(cmd("s2", CommandKind::Compensate, 200)).await,
            Reply::Ok { .. }
        ));
        drop(p);
        let p = payment(dir.path(), Duration::ZERO, 0.0).await;
        p.handle(cmd("s2", CommandKind::Compensate, 200)).await;
        let stats = p.stats().await;
        assert_eq!(
            (
                &stats["charged_cents"],
                &stats["refunded_cents"],
                &stats["charges"],
                &stats["refunds"]
            ),
            (&500.into(), &200.into(), &2.into(), &1.into())
        );
        assert_eq!(
            crate::runtime::all_effects(p.as_ref()).await["s2"],
            serde_json::json!({"amount_cents": 200, "refunded": true})
        );
        assert_eq!(
            p.totals().await.expect("totals"),
            p.scan_totals().await.expect("scan")
        );
    }

    #[tokio::test]
    async fn stats_come_from_the_totals_kept_with_the_ledger_and_an_old_ledger_gets_them_on_open() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let p = payment(dir.path(), Duration::ZERO, 0.0).await;
            p.handle(cmd("s1", CommandKind::Forward, 300)).await;
            p.handle(cmd("s2", CommandKind::Forward, 200)).await;
            p.handle(cmd("s2", CommandKind::Compensate, 200)).await;
            let want = Totals {
                charged_cents: 500,
                refunded_cents: 200,
                charges: 2,
                refunds: 1,
            };
            assert_eq!(p.totals().await.expect("totals"), want);
            assert_eq!(p.scan_totals().await.expect("scan"), want);
            // A ledger entry written behind the handler's back is not in the
            // figures: stats read the totals, they do not scan the ledger.
            p.store
                .update_state(&|state| {
                    let entry = Charge {
                        charge_id: "ch_x".into(),
                        order_id: "o".into(),
                        customer_id: "c".into(),
                        amount_cents: 7,
                        currency: "EUR".into(),
                        refunded: false,
                    };
                    tx_put(state, &ledger_key("s9/charge-payment/forward"), &entry)
                })
                .await
                .expect("write");
            assert_eq!(p.stats().await["charged_cents"], 500);
            // An older release's ledger had no totals: removed, they are rebuilt on open.
            p.store
                .update_state(&|state| {
                    state.remove(TOTALS_KEY)?;
                    Ok(())
                })
                .await
                .expect("remove");
        }
        let p = payment(dir.path(), Duration::ZERO, 0.0).await;
        assert_eq!(p.totals().await.expect("totals").charged_cents, 507);
        assert_eq!(
            p.totals().await.expect("totals"),
            p.scan_totals().await.expect("scan")
        );
    }

    async fn writes_of(p: &Payment, cmd: Command) -> (Reply, u64) {
        let before = p.store.writes();
        let reply = p.handle(cmd).await;
        (reply, p.store.writes() - before)
    }

    /// The writes of each command, as `participant_store_writes_total`
    /// counts them: a charge writes its ledger entry, which carries the
    /// stored reply, and the totals; a refund the same two; a decline its
    /// reply; a repeat nothing. A write added back fails here.
    #[tokio::test]
    async fn a_charge_and_its_refund_write_the_ledger_entry_and_the_totals_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = payment(dir.path(), Duration::ZERO, 0.0).await;
        let (charged, n) = writes_of(&p, cmd("s1", CommandKind::Forward, 500)).await;
        assert!(matches!(charged, Reply::Ok { .. }), "{charged:?}");
        assert_eq!(n, 2, "charge: the ledger entry and the totals");
        assert_eq!(
            writes_of(&p, cmd("s1", CommandKind::Forward, 500)).await,
            (charged, 0)
        );
        let (refunded, n) = writes_of(&p, cmd("s1", CommandKind::Compensate, 500)).await;
        assert!(matches!(refunded, Reply::Ok { .. }), "{refunded:?}");
        assert_eq!(n, 2, "refund: the ledger entry and the totals");
        assert_eq!(
            writes_of(&p, cmd("s1", CommandKind::Compensate, 500)).await,
            (refunded, 0)
        );
        let (r, n) = writes_of(&p, cmd("s2", CommandKind::Forward, 10_001)).await;
        assert_eq!(
            (r, n),
            (Reply::rejected("card_declined"), 1),
            "the decline's reply only"
        );
        let (r, n) = writes_of(&p, cmd("s2", CommandKind::Compensate, 10_001)).await;
        assert!(
            matches!(r, Reply::Ok { .. }) && n == 1,
            "{r:?}: the reply only ({n})"
        );
        drop(p);
        // After a restart the ledger entries still answer.
        let p = payment(dir.path(), Duration::ZERO, 1.0).await;
        let (r, n) = writes_of(&p, cmd("s1", CommandKind::Forward, 500)).await;
        assert!(
            matches!(r, Reply::Ok { .. }) && n == 0,
            "{r:?}: the stored reply, no gateway call"
        );
        assert_eq!(figures(&p).await, (500, 500));
    }

    #[test]
    fn flags_parse_and_validate() {
        use clap::Parser;
        let c = PaymentConfig::try_parse_from([
            "payment",
            "--gateway-latency",
            "20ms",
            "--gateway-failure-rate",
            "0.25",
            "--declined-customers",
            "c1,c2",
        ])
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.gateway_latency, Duration::from_millis(20));
        assert_eq!(c.declined_customers, vec!["c1".to_string(), "c2".to_string()]);
        assert_eq!(
            (c.customer_limit_cents, c.data_dir.as_path()),
            (100_000, Path::new("./data/payment"))
        );
        assert_eq!(c.http_addr, SocketAddr::from(([127, 0, 0, 1], 9466)));
        let any_port =
            PaymentConfig::try_parse_from(["payment", "--http-addr", "0.0.0.0:0"]).expect("parses");
        assert_eq!(any_port.http_addr.port(), 0);
        let bad = PaymentConfig {
            gateway_failure_rate: 1.5,
            ..c.clone()
        };
        assert!(
            matches!(bad.validate(), Err(ConfigError::Invalid { setting, .. }) if setting == "gateway-failure-rate")
        );
        let bad = PaymentConfig {
            breaker_max_wait: Duration::from_millis(1),
            ..c
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_breaker_stays_open_longer_after_each_failed_trial() {
        let b = OpenBackoff {
            next: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        let waits: Vec<_> = b.take(4).map(|d| d.as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 350, 350]);
    }
}
