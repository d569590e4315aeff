//! The inventory participant: stock per SKU, on either store.
//!
//! `reserve` moves the order's quantities from available to reserved for
//! every line or for none (`rejected: insufficient_stock`); the reserved
//! lines are kept under the forward idempotency key so `release` puts back
//! exactly what was taken, whatever its payload says, and leaves the
//! reservation empty (not removed: on sled the row carries the stored
//! replies of the reserve and the release). Invariant: per SKU,
//! available + reserved only changes by seeding.
//!
//! It owns the `stock/<sku>` and `reservation/<forward key>` entries of its
//! state tree (the latter its reply rows, [`InventoryConfig::store_target`])
//! and nothing else; idempotency and durability are
//! [`crate::store`]'s, NATS is [`crate::runtime`]'s, metrics and HTTP are
//! [`crate::telemetry`]'s.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use saga_wire::{saga_of_key, Command, CommandKind, Item, Reply};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    runtime::{BoxFuture, Handler},
    store::{self, tx_get, tx_put, SharedStore, StateTx, StoreError, StoreKind, TxError, TxResult},
    telemetry, ConfigError, LogFormat,
};

/// Inventory settings: defaults, environment, flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "inventory",
    version,
    about = "Inventory participant: reserves and releases stock"
)]
pub struct InventoryConfig {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_security: saga_nats::NatsSecurity,
    /// Directory of the sled database (sled store).
    #[arg(long, env = "INVENTORY_DATA_DIR", default_value = "./data/inventory")]
    pub data_dir: PathBuf,
    /// Where idempotency records and stock live: `sled` (embedded, this process only) or
    /// `jetstream` (KV buckets `PART_inventory_*`, shared by replicas).
    #[arg(long, env = "INVENTORY_STORE", value_enum, default_value = "sled")]
    pub store: StoreKind,
    /// Replicas of the KV buckets when this participant creates them (jetstream store).
    #[arg(long, env = "INVENTORY_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// JSON file of initial stock: `{"A-1": 100, ...}`.
    #[arg(long, env = "INVENTORY_STOCK_FILE")]
    pub stock_file: Option<PathBuf>,
    /// Initial stock as `SKU=N,SKU=N`.
    #[arg(long, env = "INVENTORY_STOCK", value_delimiter = ',', value_parser = parse_stock)]
    pub stock: Vec<(String, u64)>,
    /// Set the seeded SKUs' available stock to the seed even when stored
    /// (otherwise only SKUs not yet stored are seeded). Reservations held are kept.
    #[arg(long, env = "INVENTORY_RESET_STOCK")]
    pub reset_stock: bool,
    /// Address of the HTTP server: `GET /metrics`, `/health`, `/ready`
    /// (port 0 picks a free port; the address is logged).
    #[arg(long, env = "INVENTORY_HTTP_ADDR", default_value = "127.0.0.1:9465")]
    pub http_addr: SocketAddr,
    /// Once the HTTP server listens, write `{"http":"<addr>"}` to this file
    /// (with port 0: how a supervisor or a test learns the port).
    #[arg(long, env = "INVENTORY_PORTS_FILE")]
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

fn parse_stock(s: &str) -> Result<(String, u64), String> {
    let (sku, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected SKU=N"))?;
    let n = n
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: N must be a whole number"))?;
    let sku = sku.trim();
    if sku.is_empty() {
        return Err(format!("`{s}`: empty SKU"));
    }
    Ok((sku.to_string(), n))
}

impl InventoryConfig {
    /// Settings for an embedded (test) instance.
    pub fn for_tests(nats_url: &str, data_dir: &Path, stock: Vec<(String, u64)>) -> Self {
        InventoryConfig {
            nats_url: nats_url.into(),
            nats_security: saga_nats::NatsSecurity::default(),
            data_dir: data_dir.into(),
            store: StoreKind::Sled,
            kv_replicas: 1,
            stock_file: None,
            stock,
            reset_stock: false,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ports_file: None,
            retention: crate::ReplyRetention::default(),
            log_format: LogFormat::Pretty,
            trace: saga_trace::TraceArgs::default(),
        }
    }

    /// The seed: the stock file's entries, then the `--stock` ones (which
    /// win for a SKU named in both).
    ///
    /// # Errors
    /// Unreadable or invalid stock file, an empty SKU.
    pub fn seed(&self) -> Result<BTreeMap<String, u64>, ConfigError> {
        let mut seed = BTreeMap::new();
        if let Some(path) = &self.stock_file {
            let bad = |reason: String| ConfigError::StockFile {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let map: BTreeMap<String, u64> =
                serde_json::from_str(&text).map_err(|e| bad(format!("expected {{\"SKU\": N, …}}: {e}")))?;
            if map.keys().any(|sku| sku.trim().is_empty()) {
                return Err(bad("empty SKU".into()));
            }
            seed.extend(map);
        }
        seed.extend(self.stock.iter().cloned());
        Ok(seed)
    }

    /// Checks the settings (and reads the stock file) before anything starts.
    ///
    /// # Errors
    /// An empty NATS URL or data dir, an unreadable or invalid stock file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nats_url.trim().is_empty() {
            return Err(ConfigError::Invalid {
                setting: "nats-url",
                reason: "empty".into(),
            });
        }
        if let Err(reason) = self.nats_security.validate() {
            return Err(ConfigError::Invalid {
                setting: "nats-security",
                reason,
            });
        }
        self.store_target().validate()?;
        self.seed().map(|_| ())
    }

    /// The store this configuration opens.
    pub fn store_target(&self) -> crate::StoreTarget {
        crate::StoreTarget {
            kind: self.store,
            data_dir: self.data_dir.clone(),
            kv_replicas: self.kv_replicas,
            root_prefixes: vec![STOCK_PREFIX.to_string()],
            reply_rows: Some(RESERVATION_PREFIX.to_string()),
        }
    }
}

/// Stock of one SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Level {
    /// Units that can be reserved.
    pub available: u64,
    /// Units held by reservations.
    pub reserved: u64,
}

const STOCK_PREFIX: &str = "stock/";
const RESERVATION_PREFIX: &str = "reservation/";

fn stock_key(sku: &str) -> String {
    format!("{STOCK_PREFIX}{sku}")
}

fn reservation_key(forward_key: &str) -> String {
    format!("{RESERVATION_PREFIX}{forward_key}")
}

/// The inventory handler.
pub struct Inventory {
    store: SharedStore,
    commands: AtomicU64,
    dedupe_hits: AtomicU64,
}

const ACTIONS: &[&str] = &["reserve", "release"];

/// The `rejected` reason of a reserve naming a SKU without a stock row
/// (nothing is reserved, nothing is stored).
pub const UNKNOWN_SKU: &str = "unknown_sku";

impl Inventory {
    /// Opens the inventory in `store` and applies `seed` in one durable
    /// transaction: only to SKUs not stored yet, so a restart never re-seeds
    /// over live stock; with `reset`, a stored SKU's `available` is set to
    /// the seed and its `reserved` units (held by live reservations, which a
    /// release will return) are kept.
    ///
    /// # Errors
    /// The store failed, corrupt stored stock.
    pub async fn open(
        store: SharedStore,
        seed: &BTreeMap<String, u64>,
        reset: bool,
    ) -> Result<Self, StoreError> {
        store
            .update_state(&|state| {
                for (sku, n) in seed {
                    let key = stock_key(sku);
                    let stored: Option<Level> = tx_get(state, &key)?;
                    let level = match stored {
                        None => Level {
                            available: *n,
                            reserved: 0,
                        },
                        Some(level) if reset => Level {
                            available: *n,
                            ..level
                        },
                        Some(_) => continue,
                    };
                    tx_put(state, &key, &level)?;
                }
                Ok(())
            })
            .await?;
        Ok(Inventory {
            store,
            commands: AtomicU64::new(0),
            dedupe_hits: AtomicU64::new(0),
        })
    }

    /// Stock levels by SKU.
    ///
    /// # Errors
    /// The store failed; corrupt values.
    pub async fn levels(&self) -> Result<BTreeMap<String, Level>, StoreError> {
        Ok(store::scan_all(self.store.as_ref(), STOCK_PREFIX)
            .await?
            .into_iter()
            .collect())
    }

    /// The index of the first line whose SKU has no stock row.
    async fn first_unknown_sku(&self, items: &[Item]) -> Result<Option<usize>, StoreError> {
        for (i, item) in items.iter().enumerate() {
            if self.store.get(&stock_key(&item.sku)).await?.is_none() {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    async fn run(&self, cmd: Command) -> Result<Reply, StoreError> {
        let key = cmd.idempotency_key.clone();
        let (reply, hit) = match (cmd.kind, cmd.action.as_str()) {
            (CommandKind::Forward, "reserve") => {
                let wanted = totals(&cmd.payload.items);
                // A reserve never creates a stock row: a SKU the stock table
                // does not hold is refused before anything is written (stock
                // rows are never removed, so the answer cannot change under it).
                if let Some(i) = self.first_unknown_sku(&cmd.payload.items).await? {
                    warn!(
                        field = %format!("payload.items[{i}].sku"),
                        "reserve of a SKU the stock table does not hold refused unapplied"
                    );
                    return Ok(Reply::rejected(UNKNOWN_SKU));
                }
                self.store
                    .apply_forward(&key, &|state| reserve(state, &key, &wanted))
                    .await?
            }
            (CommandKind::Compensate, "release") => {
                // The definition may pass the reservation to release (the reserve
                // step's output): it must be the one held under this saga.
                let expected = cmd
                    .input
                    .get("reservation_id")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                self.store
                    .apply_compensation(&key, &|state, forward, data| {
                        if expected.as_deref().is_some_and(|id| id != forward) {
                            return Ok(Reply::rejected("reservation_id_mismatch"));
                        }
                        release(state, forward, data)
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

/// Quantities per SKU (an order may name a SKU twice).
fn totals(items: &[Item]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i.sku.clone()).or_insert(0) += u64::from(i.quantity);
    }
    m
}

fn reserve(state: &mut dyn StateTx, key: &str, wanted: &BTreeMap<String, u64>) -> TxResult<Reply> {
    let mut levels = Vec::with_capacity(wanted.len());
    for (sku, qty) in wanted {
        let Some(level) = tx_get::<Level>(state, &stock_key(sku))? else {
            return Ok(Reply::rejected(UNKNOWN_SKU));
        };
        if level.available < *qty {
            return Ok(Reply::rejected("insufficient_stock"));
        }
        levels.push((sku, *qty, level));
    }
    for (sku, qty, level) in &levels {
        let next = Level {
            available: level.available - qty,
            reserved: level.reserved + qty,
        };
        tx_put(state, &stock_key(sku), &next)?;
    }
    tx_put(state, &reservation_key(key), wanted)?;
    let items: Vec<_> = wanted
        .iter()
        .map(|(s, q)| serde_json::json!({"sku": s, "quantity": q}))
        .collect();
    Ok(Reply::ok(
        serde_json::json!({"reservation_id": key, "items": items}),
    ))
}

fn release(state: &mut dyn StateTx, forward: &str, _data: &serde_json::Value) -> TxResult<Reply> {
    let Some(lines) = tx_get::<BTreeMap<String, u64>>(state, &reservation_key(forward))? else {
        return Err(TxError::Abort(format!("reservation {forward} missing")));
    };
    for (sku, qty) in &lines {
        let level: Level = tx_get(state, &stock_key(sku))?.unwrap_or_default();
        let reserved = level
            .reserved
            .checked_sub(*qty)
            .ok_or_else(|| TxError::Abort(format!("{sku}: reserved {} < {qty}", level.reserved)))?;
        tx_put(
            state,
            &stock_key(sku),
            &Level {
                available: level.available + qty,
                reserved,
            },
        )?;
    }
    // Emptied, not removed: the row is the reserve's reply row (one write
    // either way; see `Store::with_reply_rows`).
    tx_put(state, &reservation_key(forward), &BTreeMap::<String, u64>::new())?;
    Ok(Reply::ok(serde_json::json!({"undone": true, "released": lines})))
}

impl Handler for Inventory {
    fn participant(&self) -> &str {
        "inventory"
    }

    fn actions(&self) -> &[&str] {
        ACTIONS
    }

    fn handle(&self, cmd: Command) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            self.commands.fetch_add(1, Ordering::Relaxed);
            crate::runtime::store_reply("inventory", self.run(cmd).await)
        })
    }

    fn stats(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let stock = match self.levels().await {
                Ok(l) => serde_json::to_value(l).unwrap_or_default(),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            };
            serde_json::json!({
                "stock": stock,
                "commands": self.commands.load(Ordering::Relaxed),
                "dedupe_hits": self.dedupe_hits.load(Ordering::Relaxed),
            })
        })
    }

    /// `{saga_id: {sku: units held}}` for every reservation not released
    /// (a released one is kept empty, and skipped).
    fn effects<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<crate::runtime::Effects, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut after = cursor.map(str::to_string);
            loop {
                let page = self
                    .store
                    .scan(RESERVATION_PREFIX, after.as_deref(), limit)
                    .await?;
                let last_page = page.len() < limit;
                for (key, bytes) in page {
                    after = Some(key.clone());
                    let lines: BTreeMap<String, u64> =
                        store::decode(format!("{RESERVATION_PREFIX}{key}").as_bytes(), &bytes)?;
                    if lines.is_empty() {
                        continue;
                    }
                    let saga = saga_of_key(&key).to_string();
                    out.push((key, saga, serde_json::json!(lines)));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
                if last_page || limit == 0 {
                    return Ok(out);
                }
            }
        })
    }

    fn store(&self) -> &SharedStore {
        &self.store
    }
}

/// Runs the inventory service until `shutdown` fires, with its HTTP surface
/// (`/metrics`, `/health`, `/ready`) on `http` (the binary binds
/// `--http-addr`; tests bind port 0).
///
/// # Errors
/// Invalid settings or stock file, the store cannot be opened, shutdown
/// before NATS was reachable, NATS subscription failure.
pub async fn run(
    config: InventoryConfig,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let seed = config.seed()?;
    let nats = crate::NatsTarget {
        url: config.nats_url.clone(),
        security: config.nats_security.clone(),
    };
    let reset = config.reset_stock;
    let target = config.store_target();
    crate::serve_participant(
        "inventory",
        &target,
        &nats,
        http,
        config.retention,
        shutdown,
        |store| async move {
            let inventory = Arc::new(Inventory::open(store, &seed, reset).await?);
            let skus = inventory.levels().await?.len();
            info!(skus, "inventory opened");
            Ok(inventory as Arc<dyn Handler>)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use saga_wire::{self as wire, OrderPayload};

    use super::*;

    /// The sled store as the inventory opens it (its reply rows).
    fn sled(dir: &Path) -> SharedStore {
        let target = InventoryConfig::for_tests("nats://unused", dir, Vec::new()).store_target();
        Arc::new(
            target
                .open_sled(crate::ReplyRetention::default().reply_retention)
                .expect("store"),
        )
    }

    async fn inventory(dir: &Path) -> Inventory {
        let seed = BTreeMap::from([("A".to_string(), 10), ("B".to_string(), 1)]);
        Inventory::open(sled(dir), &seed, false).await.expect("open")
    }

    fn cmd(saga: &str, kind: CommandKind, items: &[(&str, u32)]) -> Command {
        let (step, action) = (
            "reserve-inventory",
            if kind == CommandKind::Forward {
                "reserve"
            } else {
                "release"
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
                items: items
                    .iter()
                    .map(|(s, q)| Item {
                        sku: (*s).into(),
                        quantity: *q,
                    })
                    .collect(),
                amount_cents: 1,
                currency: "EUR".into(),
            },
            input: serde_json::Value::Null,
        }
    }

    async fn level(inv: &Inventory, sku: &str) -> (u64, u64) {
        let l = inv
            .levels()
            .await
            .expect("levels")
            .get(sku)
            .copied()
            .unwrap_or_default();
        (l.available, l.reserved)
    }

    #[tokio::test]
    async fn reserve_is_all_or_nothing_and_release_restores() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = inventory(dir.path()).await;
        let r = inv
            .handle(cmd("s1", CommandKind::Forward, &[("A", 3), ("B", 2)]))
            .await;
        assert_eq!(r, Reply::rejected("insufficient_stock"));
        assert_eq!(
            (level(&inv, "A").await, level(&inv, "B").await),
            ((10, 0), (1, 0))
        );
        let r = inv
            .handle(cmd("s2", CommandKind::Forward, &[("A", 3), ("A", 2), ("B", 1)]))
            .await;
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
        assert_eq!((level(&inv, "A").await, level(&inv, "B").await), ((5, 5), (0, 1)));
        let r = inv.handle(cmd("s2", CommandKind::Compensate, &[])).await;
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
        assert_eq!(
            (level(&inv, "A").await, level(&inv, "B").await),
            ((10, 0), (1, 0))
        );
        let r = inv
            .handle(cmd("s3", CommandKind::Forward, &[("A", 1), ("NOPE\u{202E}", 1)]))
            .await;
        assert_eq!(r, Reply::rejected(UNKNOWN_SKU));
        assert!(
            !inv.levels().await.expect("levels").contains_key("NOPE\u{202E}"),
            "no stock row"
        );
        assert_eq!(level(&inv, "A").await, (10, 0));
        assert_eq!(
            inv.store
                .stored_reply("s3/reserve-inventory/forward")
                .await
                .expect("reads"),
            None,
            "nothing stored: the refusal is not an effect"
        );
    }

    #[tokio::test]
    async fn repeats_return_the_stored_reply_without_effect() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = inventory(dir.path()).await;
        let first = inv.handle(cmd("s1", CommandKind::Forward, &[("A", 4)])).await;
        let again = inv.handle(cmd("s1", CommandKind::Forward, &[("A", 4)])).await;
        assert_eq!(first, again);
        assert_eq!(level(&inv, "A").await, (6, 4));
        let rel1 = inv.handle(cmd("s1", CommandKind::Compensate, &[])).await;
        let rel2 = inv.handle(cmd("s1", CommandKind::Compensate, &[])).await;
        assert_eq!(rel1, rel2);
        assert_eq!(level(&inv, "A").await, (10, 0));
        assert_eq!(inv.stats().await["dedupe_hits"], 2);
    }

    #[tokio::test]
    async fn a_release_before_its_reserve_leaves_a_tombstone() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = inventory(dir.path()).await;
        let r = inv.handle(cmd("s1", CommandKind::Compensate, &[])).await;
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
        let late = inv.handle(cmd("s1", CommandKind::Forward, &[("A", 4)])).await;
        assert_eq!(late, Reply::rejected(crate::store::TOMBSTONE_REASON));
        assert_eq!(level(&inv, "A").await, (10, 0));
    }

    #[tokio::test]
    async fn stock_survives_a_restart_and_is_not_reseeded() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let inv = inventory(dir.path()).await;
            inv.handle(cmd("s1", CommandKind::Forward, &[("A", 4)])).await;
        }
        let inv = inventory(dir.path()).await;
        assert_eq!(level(&inv, "A").await, (6, 4));
        let again = inv.handle(cmd("s1", CommandKind::Forward, &[("A", 4)])).await;
        assert!(matches!(again, Reply::Ok { .. }));
        assert_eq!(level(&inv, "A").await, (6, 4));
    }

    #[tokio::test]
    async fn effects_come_a_page_at_a_time_and_the_pages_hold_every_reservation() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = inventory(dir.path()).await;
        for i in 0..5 {
            inv.handle(cmd(&format!("s{i}"), CommandKind::Forward, &[("A", 1)]))
                .await;
        }
        let mut request = wire::EffectsRequest {
            cursor: None,
            limit: Some(2),
        };
        let mut pages = Vec::new();
        loop {
            let page = crate::runtime::effects_page(&inv, &request).await.expect("page");
            assert!(page.effects.len() <= 2);
            pages.push(page.effects.keys().cloned().collect::<Vec<_>>());
            match page.next_cursor {
                Some(c) => request.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(pages, [vec!["s0", "s1"], vec!["s2", "s3"], vec!["s4"]]);
        let zero = wire::EffectsRequest {
            cursor: None,
            limit: Some(0),
        };
        assert_eq!(
            crate::runtime::effects_page(&inv, &zero)
                .await
                .expect("page")
                .effects
                .len(),
            1
        );
    }

    async fn writes_of(inv: &Inventory, cmd: Command) -> (Reply, u64) {
        let before = inv.store.writes();
        let reply = inv.handle(cmd).await;
        (reply, inv.store.writes() - before)
    }

    /// The writes of each command, as `participant_store_writes_total`
    /// counts them: a reserve writes its stock rows and its reservation,
    /// which carries the stored reply; a release the same rows; a repeat
    /// nothing. A write added back fails here.
    #[tokio::test]
    async fn a_reserve_and_its_release_write_each_stock_row_and_the_reservation_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = inventory(dir.path()).await;
        let ok = |r: &Reply| matches!(r, Reply::Ok { .. });
        let (r, n) = writes_of(&inv, cmd("s1", CommandKind::Forward, &[("A", 1), ("A", 2)])).await;
        assert!(ok(&r), "{r:?}");
        assert_eq!(n, 2, "reserve of one SKU: its stock row and the reservation");
        let (again, n) = writes_of(&inv, cmd("s1", CommandKind::Forward, &[("A", 1)])).await;
        assert_eq!((again, n), (r, 0), "a repeat");
        let (r, n) = writes_of(&inv, cmd("s1", CommandKind::Compensate, &[])).await;
        assert!(ok(&r), "{r:?}");
        assert_eq!(n, 2, "release: the stock row and the reservation");
        assert_eq!(
            writes_of(&inv, cmd("s1", CommandKind::Compensate, &[])).await,
            (r, 0)
        );
        let (r, n) = writes_of(&inv, cmd("s2", CommandKind::Forward, &[("A", 1), ("B", 1)])).await;
        assert!(ok(&r), "{r:?}");
        assert_eq!(n, 3, "two SKUs: two stock rows and the reservation");
        let (r, n) = writes_of(&inv, cmd("s2", CommandKind::Compensate, &[])).await;
        assert!(ok(&r), "{r:?}");
        assert_eq!(n, 3);
        let (r, n) = writes_of(&inv, cmd("s3", CommandKind::Forward, &[("B", 5)])).await;
        assert_eq!(
            (r, n),
            (Reply::rejected("insufficient_stock"), 1),
            "the refusal's reply only"
        );
        let (r, n) = writes_of(&inv, cmd("s3", CommandKind::Compensate, &[])).await;
        assert!(ok(&r) && n == 1, "{r:?}: the reply only ({n})");
        let (r, n) = writes_of(&inv, cmd("s4", CommandKind::Compensate, &[])).await;
        assert!(ok(&r) && n == 2, "{r:?}: the tombstone and the reply ({n})");
        assert_eq!(
            (level(&inv, "A").await, level(&inv, "B").await),
            ((10, 0), (1, 0))
        );
        assert_eq!(
            crate::runtime::all_effects(&inv).await,
            serde_json::json!({}),
            "released reservations are kept empty and not listed"
        );
    }

    #[tokio::test]
    async fn reservations_and_replies_of_the_layout_before_reply_rows_are_read_and_released() {
        let dir = tempfile::tempdir().expect("tmp");
        let seed = BTreeMap::from([("A".to_string(), 10), ("B".to_string(), 1)]);
        let (first, kept) = {
            // The previous release: replies in windows, reservations plain.
            let old =
                Arc::new(crate::store::Store::new(crate::open_db(dir.path()).expect("sled")).expect("store"));
            let inv = Inventory::open(old, &seed, false).await.expect("open");
            let first = inv.handle(cmd("s1", CommandKind::Forward, &[("A", 4)])).await;
            let kept = inv.handle(cmd("s2", CommandKind::Forward, &[("B", 1)])).await;
            (first, kept)
        };
        let inv = inventory(dir.path()).await;
        assert_eq!(level(&inv, "A").await, (6, 4));
        assert_eq!(
            writes_of(&inv, cmd("s1", CommandKind::Forward, &[("A", 4)])).await,
            (first, 0),
            "the stored reply of the old layout"
        );
        let (released, n) = writes_of(&inv, cmd("s1", CommandKind::Compensate, &[])).await;
        assert!(matches!(released, Reply::Ok { .. }), "{released:?}");
        assert_eq!(n, 2);
        assert_eq!(level(&inv, "A").await, (10, 0));
        assert_eq!(
            writes_of(&inv, cmd("s1", CommandKind::Compensate, &[])).await,
            (released, 0)
        );
        assert_eq!(
            writes_of(&inv, cmd("s2", CommandKind::Forward, &[("B", 1)])).await,
            (kept, 0)
        );
        assert_eq!(
            crate::runtime::all_effects(&inv).await,
            serde_json::json!({"s2": {"B": 1}})
        );
    }

    #[tokio::test]
    async fn an_effects_page_skips_released_reservations_and_still_fills_up() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = inventory(dir.path()).await;
        for i in 0..6 {
            inv.handle(cmd(&format!("s{i}"), CommandKind::Forward, &[("A", 1)]))
                .await;
        }
        for i in [0, 1, 2, 4] {
            inv.handle(cmd(&format!("s{i}"), CommandKind::Compensate, &[]))
                .await;
        }
        let request = wire::EffectsRequest {
            cursor: None,
            limit: Some(1),
        };
        let page = crate::runtime::effects_page(&inv, &request).await.expect("page");
        assert_eq!(page.effects.keys().collect::<Vec<_>>(), ["s3"]);
        assert!(page.next_cursor.is_some(), "s5 follows");
        assert_eq!(
            crate::runtime::all_effects(&inv).await,
            serde_json::json!({"s3": {"A": 1}, "s5": {"A": 1}})
        );
    }

    #[test]
    fn stock_flags_parse() {
        assert_eq!(parse_stock("A-1=5"), Ok(("A-1".into(), 5)));
        assert!(parse_stock("A-1").is_err());
        assert!(parse_stock("=5").is_err());
        assert!(parse_stock("A=x").is_err());
    }

    async fn total(inv: &Inventory) -> BTreeMap<String, u64> {
        let levels = inv.levels().await.expect("levels");
        levels
            .into_iter()
            .map(|(s, l)| (s, l.available + l.reserved))
            .collect()
    }

    #[tokio::test]
    async fn a_release_after_a_rejected_reserve_undoes_nothing_and_stock_is_conserved() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = inventory(dir.path()).await;
        let before = total(&inv).await;
        inv.handle(cmd("s1", CommandKind::Forward, &[("A", 2)])).await;
        let no = inv
            .handle(cmd("s2", CommandKind::Forward, &[("A", 1), ("B", 5)]))
            .await;
        assert_eq!(no, Reply::rejected("insufficient_stock"));
        let r = inv.handle(cmd("s2", CommandKind::Compensate, &[])).await;
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
        assert_eq!((level(&inv, "A").await, level(&inv, "B").await), ((8, 2), (1, 0)));
        assert_eq!(
            total(&inv).await,
            before,
            "available + reserved is conserved per SKU"
        );
        assert_eq!(
            crate::runtime::all_effects(&inv).await,
            serde_json::json!({"s1": {"A": 2}})
        );
        assert_eq!(
            inv.stats().await["stock"]["A"],
            serde_json::json!({"available": 8, "reserved": 2})
        );
    }

    #[tokio::test]
    async fn reset_stock_sets_available_and_keeps_reservations() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let inv = inventory(dir.path()).await;
            inv.handle(cmd("s1", CommandKind::Forward, &[("A", 4)])).await;
        }
        let seed = BTreeMap::from([("A".to_string(), 50), ("C".to_string(), 7)]);
        let inv = Inventory::open(sled(dir.path()), &seed, true)
            .await
            .expect("open");
        assert_eq!(
            (
                level(&inv, "A").await,
                level(&inv, "B").await,
                level(&inv, "C").await
            ),
            ((50, 4), (1, 0), (7, 0))
        );
        inv.handle(cmd("s1", CommandKind::Compensate, &[])).await;
        assert_eq!(level(&inv, "A").await, (54, 0));
    }

    #[test]
    fn config_reads_the_stock_file_and_flags() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("stock.json");
        std::fs::write(&file, r#"{"A-1": 100, "B-2": 5}"#).expect("write");
        let path = file.display().to_string();
        let config =
            InventoryConfig::try_parse_from(["inventory", "--stock-file", &path, "--stock", "B-2=9,C-3=1"])
                .expect("parses");
        config.validate().expect("valid");
        let want = BTreeMap::from([("A-1".into(), 100), ("B-2".into(), 9), ("C-3".into(), 1)]);
        assert_eq!(config.seed().expect("seed"), want);
        assert_eq!(config.data_dir, PathBuf::from("./data/inventory"));
        assert_eq!(config.http_addr, SocketAddr::from(([127, 0, 0, 1], 9465)));
        let any_port =
            InventoryConfig::try_parse_from(["inventory", "--http-addr", "127.0.0.1:0"]).expect("parses");
        assert_eq!(any_port.http_addr.port(), 0);
        assert!(InventoryConfig::try_parse_from(["inventory", "--http-addr", "localhost"]).is_err());

        std::fs::write(&file, r#"["A-1"]"#).expect("write");
        assert!(matches!(config.validate(), Err(ConfigError::StockFile { .. })));
        let missing = InventoryConfig::try_parse_from(["inventory", "--stock-file", "/nonexistent.json"]);
        assert!(missing.expect("parses").validate().is_err());
        assert!(InventoryConfig::try_parse_from(["inventory", "--stock", "A-1"]).is_err());
    }
}
