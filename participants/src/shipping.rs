//! The shipping participant: shipments, on either store. It exists to show that a new
//! participant is a handler and a YAML step, with no coordinator change
//! (`saga-definitions/order-with-shipping.yaml`).
//!
//! `create-shipment` books a shipment for the order and answers
//! `{"shipment_id", "carrier", "reservation_id"}`; it needs the stock
//! reservation it ships (`input.reservation_id`, a reference to the inventory
//! step's output in the definition) and refuses customers it cannot deliver
//! to (`rejected: address_unreachable`). `cancel-shipment` cancels it; when
//! the definition passes `input.shipment_id` it must name the shipment booked
//! under the same saga, or the cancellation is refused.
//!
//! It owns the `shipment/<forward key>` entries of its state tree;
//! idempotency and durability are [`crate::store`]'s, NATS is
//! [`crate::runtime`]'s.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use saga_wire::{saga_of_key, Command, CommandKind, Reply};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    runtime::{BoxFuture, Handler},
    store::{self, tx_get, tx_put, SharedStore, StoreError, StoreKind, TxError},
    telemetry, ConfigError, LogFormat,
};

/// Shipping settings: defaults, environment, flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "shipping",
    version,
    about = "Shipping participant: books and cancels shipments"
)]
pub struct ShippingConfig {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_security: saga_nats::NatsSecurity,
    /// Directory of the sled database (sled store).
    #[arg(long, env = "SHIPPING_DATA_DIR", default_value = "./data/shipping")]
    pub data_dir: PathBuf,
    /// Where idempotency records and shipments live: `sled` (embedded, this process only)
    /// or `jetstream` (KV buckets `PART_shipping_*`, shared by replicas).
    #[arg(long, env = "SHIPPING_STORE", value_enum, default_value = "sled")]
    pub store: StoreKind,
    /// Replicas of the KV buckets when this participant creates them (jetstream store).
    #[arg(long, env = "SHIPPING_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// Carrier named on every shipment.
    #[arg(long, env = "SHIPPING_CARRIER", default_value = "saga-express")]
    pub carrier: String,
    /// Customers whose address cannot be served (`rejected: address_unreachable`).
    #[arg(long, env = "SHIPPING_UNREACHABLE_CUSTOMERS", value_delimiter = ',')]
    pub unreachable_customers: Vec<String>,
    /// Address of the HTTP server: `GET /metrics`, `/health`, `/ready`.
    #[arg(long, env = "SHIPPING_HTTP_ADDR", default_value = "127.0.0.1:9467")]
    pub http_addr: SocketAddr,
    /// Once the HTTP server listens, write `{"http":"<addr>"}` to this file
    /// (with port 0: how a supervisor or a test learns the port).
    #[arg(long, env = "SHIPPING_PORTS_FILE")]
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

impl ShippingConfig {
    /// Settings for an embedded (test) instance.
    pub fn for_tests(nats_url: &str, data_dir: &std::path::Path) -> Self {
        ShippingConfig {
            nats_url: nats_url.into(),
            nats_security: saga_nats::NatsSecurity::default(),
            data_dir: data_dir.into(),
            store: StoreKind::Sled,
            kv_replicas: 1,
            carrier: "saga-express".into(),
            unreachable_customers: Vec::new(),
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
    /// An empty URL or carrier, or inconsistent NATS security settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, reason: String| Err(ConfigError::Invalid { setting, reason });
        if self.nats_url.trim().is_empty() {
            return invalid("nats-url", "empty".into());
        }
        if self.carrier.trim().is_empty() {
            return invalid("carrier", "empty".into());
        }
        if let Err(reason) = self.nats_security.validate() {
            return invalid("nats-security", reason);
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
            reply_rows: Some(SHIPMENT_PREFIX.to_string()),
        }
    }
}

const SHIPMENT_PREFIX: &str = "shipment/";
const ACTIONS: &[&str] = &["create-shipment", "cancel-shipment"];

/// Where the shipment counters live in the state tree (outside `shipment/`).
const COUNTS_KEY: &str = "meta/counts";

/// The figures of `saga.admin.shipping.stats`, kept in the transaction of
/// each booking and cancellation (never a scan of the shipments).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCounts {
    /// Shipments booked and not cancelled.
    pub shipments: u64,
    /// Shipments cancelled.
    pub cancelled: u64,
}

fn shipment_key(forward_key: &str) -> String {
    format!("{SHIPMENT_PREFIX}{forward_key}")
}

/// A booked shipment (stored form, `{"v":1,"data":…}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// `shp_<uuid>`.
    pub shipment_id: String,
    /// Carrier.
    pub carrier: String,
    /// The stock reservation shipped.
    pub reservation_id: String,
    /// Units in the parcel.
    pub units: u64,
    /// Cancelled by compensation.
    pub cancelled: bool,
}

/// The shipping handler.
pub struct Shipping {
    store: SharedStore,
    config: ShippingConfig,
    commands: AtomicU64,
    dedupe_hits: AtomicU64,
}

impl Shipping {
    /// Opens the shipments in `store`.
    /// A database without counters (written by an older release) gets them
    /// here, from one scan.
    ///
    /// # Errors
    /// The store failed.
    pub async fn open(store: SharedStore, config: ShippingConfig) -> Result<Self, StoreError> {
        let shipping = Shipping {
            store,
            config,
            commands: AtomicU64::new(0),
            dedupe_hits: AtomicU64::new(0),
        };
        if shipping.store.get(COUNTS_KEY).await?.is_none() {
            let counts = shipping.scan_counts().await?;
            shipping
                .store
                .update_state(&|state| tx_put(state, COUNTS_KEY, &counts))
                .await?;
        }
        Ok(shipping)
    }

    /// The counters as stored.
    ///
    /// # Errors
    /// The store failed; a corrupt value.
    pub async fn counts(&self) -> Result<ShipmentCounts, StoreError> {
        Ok(store::get_as(self.store.as_ref(), COUNTS_KEY)
            .await?
            .unwrap_or_default())
    }

    /// The counters worked out from every shipment (at open, and to check them).
    ///
    /// # Errors
    /// The store failed; corrupt values.
    pub async fn scan_counts(&self) -> Result<ShipmentCounts, StoreError> {
        let mut c = ShipmentCounts::default();
        for (_, s) in self.shipments().await? {
            if s.cancelled {
                c.cancelled += 1;
            } else {
                c.shipments += 1;
            }
        }
        Ok(c)
    }

    /// Every shipment, by forward key.
    ///
    /// # Errors
    /// The store failed; corrupt values.
    pub async fn shipments(&self) -> Result<Vec<(String, Shipment)>, StoreError> {
        store::scan_all(self.store.as_ref(), SHIPMENT_PREFIX).await
    }

    async fn run(&self, cmd: Command) -> Result<Reply, StoreError> {
        let key = cmd.idempotency_key.clone();
        let text = |name: &str| cmd.input.get(name).and_then(|v| v.as_str()).map(str::to_string);
        let (reply, hit) = match (cmd.kind, cmd.action.as_str()) {
            (CommandKind::Forward, "create-shipment") => {
                let reservation = text("reservation_id");
                let unreachable = self
                    .config
                    .unreachable_customers
                    .contains(&cmd.payload.customer_id);
                let units: u64 = cmd.payload.items.iter().map(|i| u64::from(i.quantity)).sum();
                let carrier = self.config.carrier.clone();
                self.store
                    .apply_forward(&key, &|state| {
                        let Some(reservation_id) = reservation.clone() else {
                            return Ok(Reply::rejected("no_reservation"));
                        };
                        if unreachable {
                            return Ok(Reply::rejected("address_unreachable"));
                        }
                        let shipment = Shipment {
                            shipment_id: format!("shp_{}", uuid::Uuid::new_v4().simple()),
                            carrier: carrier.clone(),
                            reservation_id,
                            units,
                            cancelled: false,
                        };
                        tx_put(state, &shipment_key(&key), &shipment)?;
                        let mut counts: ShipmentCounts = tx_get(state, COUNTS_KEY)?.unwrap_or_default();
                        counts.shipments += 1;
                        tx_put(state, COUNTS_KEY, &counts)?;
                        Ok(Reply::ok(serde_json::json!({
                            "shipment_id": shipment.shipment_id,
                            "carrier": shipment.carrier,
                            "reservation_id": shipment.reservation_id,
                        })))
                    })
                    .await?
            }
            (CommandKind::Compensate, "cancel-shipment") => {
                let expected = text("shipment_id");
                self.store
                    .apply_compensation(&key, &|state, forward, _| {
                        let k = shipment_key(forward);
                        let Some(mut shipment) = tx_get::<Shipment>(state, &k)? else {
                            return Err(TxError::Abort(format!("shipment {k} missing")));
                        };
                        if expected.as_ref().is_some_and(|id| *id != shipment.shipment_id) {
                            return Ok(Reply::rejected("shipment_id_mismatch"));
                        }
                        if !shipment.cancelled {
                            let mut counts: ShipmentCounts = tx_get(state, COUNTS_KEY)?.unwrap_or_default();
                            counts.shipments = counts.shipments.saturating_sub(1);
                            counts.cancelled += 1;
                            tx_put(state, COUNTS_KEY, &counts)?;
                        }
                        shipment.cancelled = true;
                        tx_put(state, &k, &shipment)?;
                        Ok(Reply::ok(
                            serde_json::json!({"undone": true, "cancelled": shipment.shipment_id}),
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

impl Handler for Shipping {
    fn participant(&self) -> &str {
        "shipping"
    }

    fn actions(&self) -> &[&str] {
        ACTIONS
    }

    fn handle(&self, cmd: Command) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            self.commands.fetch_add(1, Ordering::Relaxed);
            crate::runtime::store_reply("shipping", self.run(cmd).await)
        })
    }

    fn stats(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let counts = match self.counts().await {
                Ok(c) => c,
                Err(e) => return serde_json::json!({"error": e.to_string()}),
            };
            serde_json::json!({
                "shipments": counts.shipments,
                "cancelled": counts.cancelled,
                "commands": self.commands.load(Ordering::Relaxed),
                "dedupe_hits": self.dedupe_hits.load(Ordering::Relaxed),
            })
        })
    }

    /// `{saga_id: shipment}` for every shipment not cancelled.
    fn effects<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<crate::runtime::Effects, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut after = cursor.map(str::to_string);
            // Cancelled shipments are skipped: read on until the page is full.
            loop {
                let batch = self.store.scan(SHIPMENT_PREFIX, after.as_deref(), limit).await?;
                let last = batch.len() < limit;
                for (key, bytes) in batch {
                    after = Some(key.clone());
                    let s: Shipment = store::decode(format!("{SHIPMENT_PREFIX}{key}").as_bytes(), &bytes)?;
                    if s.cancelled {
                        continue;
                    }
                    let saga = saga_of_key(&key).to_string();
                    out.push((key, saga, serde_json::json!(s)));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
                if last {
                    return Ok(out);
                }
            }
        })
    }

    fn store(&self) -> &SharedStore {
        &self.store
    }
}

/// Runs the shipping service until `shutdown` fires, with its HTTP surface on `http`.
///
/// # Errors
/// Invalid settings, the store cannot be opened, shutdown before NATS was
/// reachable, NATS subscription failure.
pub async fn run(
    config: ShippingConfig,
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
        "shipping",
        &target,
        &nats,
        http,
        retention,
        shutdown,
        |store| async move {
            let shipping = Arc::new(Shipping::open(store, config).await?);
            let counts = shipping.counts().await?;
            info!(?counts, "shipping opened");
            Ok(shipping as Arc<dyn Handler>)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use saga_wire::{self as wire, Item, OrderPayload};

    use super::*;

    async fn shipping(dir: &std::path::Path, unreachable: &[&str]) -> Shipping {
        let mut config = ShippingConfig::for_tests("nats://unused", dir);
        config.unreachable_customers = unreachable.iter().map(|c| c.to_string()).collect();
        let store = Arc::new(
            config
                .store_target()
                .open_sled(crate::ReplyRetention::default().reply_retention)
                .expect("store"),
        );
        Shipping::open(store, config).await.expect("open")
    }

    fn cmd(saga: &str, kind: CommandKind, customer: &str, input: serde_json::Value) -> Command {
        let action = if kind == CommandKind::Forward {
            "create-shipment"
        } else {
            "cancel-shipment"
        };
        Command {
            saga_id: saga.into(),
            definition: "order-with-shipping@1".into(),
            step: "create-shipment".into(),
            action: action.into(),
            kind,
            attempt: 1,
            idempotency_key: wire::idempotency_key(saga, "create-shipment", kind),
            payload: OrderPayload {
                order_id: "o".into(),
                customer_id: customer.into(),
                items: vec![Item {
                    sku: "A".into(),
                    quantity: 2,
                }],
                amount_cents: 1,
                currency: "EUR".into(),
            },
            input,
        }
    }

    #[tokio::test]
    async fn books_with_a_reservation_cancels_and_checks_the_shipment_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = shipping(dir.path(), &["far-away"]).await;
        let booked = s
            .handle(cmd(
                "s1",
                CommandKind::Forward,
                "c",
                serde_json::json!({"reservation_id": "r1"}),
            ))
            .await;
        let Reply::Ok { data } = &booked else {
            panic!("{booked:?}")
        };
        let id = data["shipment_id"].as_str().expect("id").to_string();
        assert_eq!(data["reservation_id"], "r1");
        // A repeat answers the stored reply: same shipment.
        let again = s
            .handle(cmd(
                "s1",
                CommandKind::Forward,
                "c",
                serde_json::json!({"reservation_id": "r1"}),
            ))
            .await;
        assert_eq!(again, booked);
        // Without a reservation, or to an unreachable customer: rejected.
        let none = s
            .handle(cmd("s2", CommandKind::Forward, "c", serde_json::Value::Null))
            .await;
        assert_eq!(none, Reply::rejected("no_reservation"));
        let far = s
            .handle(cmd(
                "s3",
                CommandKind::Forward,
                "far-away",
                serde_json::json!({"reservation_id": "r3"}),
            ))
            .await;
        assert_eq!(far, Reply::rejected("address_unreachable"));
        // Cancelling with the wrong shipment id is refused; with the right one it cancels.
        let wrong = s
            .handle(cmd(
                "s1",
                CommandKind::Compensate,
                "c",
                serde_json::json!({"shipment_id": "shp_x"}),
            ))
            .await;
        assert_eq!(wrong, Reply::rejected("shipment_id_mismatch"));
        let s4 = s
            .handle(cmd(
                "s4",
                CommandKind::Forward,
                "c",
                serde_json::json!({"reservation_id": "r4"}),
            ))
            .await;
        let Reply::Ok { data } = &s4 else { panic!("{s4:?}") };
        let id4 = data["shipment_id"].as_str().expect("id").to_string();
        let cancelled = s
            .handle(cmd(
                "s4",
                CommandKind::Compensate,
                "c",
                serde_json::json!({"shipment_id": id4}),
            ))
            .await;
        assert!(matches!(cancelled, Reply::Ok { .. }), "{cancelled:?}");
        let effects = crate::runtime::all_effects(&s).await;
        assert_eq!(effects["s1"]["shipment_id"], id.as_str());
        assert!(effects.get("s4").is_none(), "cancelled shipments hold nothing");
        assert_eq!(
            s.counts().await.expect("counts"),
            s.scan_counts().await.expect("scan")
        );
        assert_eq!(s.stats().await["shipments"], 1);
        assert_eq!(s.stats().await["cancelled"], 1);
    }
}
