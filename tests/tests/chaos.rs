//! The chaos suite: nats-server, the coordinator and both participants as
//! separate OS processes on loopback; N orders driven over gRPC with a mix of
//! outcomes while processes are kill -9'd and restarted at random moments;
//! then quiescence and the invariants, printed as a table.
//!
//! `CHAOS_ORDERS` (default 200; `make chaos` uses 2000), `CHAOS_SEED` (a
//! printed seed replays the same orders and kill schedule),
//! `CHAOS_CONCURRENCY` (default 16). The binaries must be built first
//! (`cargo build --workspace --bins`; `make test` and `make chaos` do).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use saga_proto::pb::{self, SagaState};
use saga_tests::{procs::Proc, *};
use tokio::sync::{Mutex, Semaphore};

const SKUS: &[(&str, u64)] = &[("A-1", 1_000_000), ("B-2", 1_000_000), ("RARE-1", 3)];
const LIMIT_CENTS: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Completed,
    OutOfStock,
    Declined,
}

#[derive(Debug, Clone)]
struct Placed {
    saga_id: String,
    expect: Expect,
    items: Vec<(String, u32)>,
    amount: i64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The order for index `i`: its request and what must become of it.
fn order_for(rng: &mut StdRng, i: usize, seed: u64) -> (pb::CreateOrderRequest, Expect) {
    let roll: f64 = rng.random();
    let (items, amount, expect) = if roll < 0.15 {
        (
            vec![("A-1".to_string(), 1), ("RARE-1".to_string(), 1000)],
            500,
            Expect::OutOfStock,
        )
    } else if roll < 0.30 {
        (
            vec![("B-2".to_string(), rng.random_range(1..4))],
            LIMIT_CENTS + rng.random_range(1..5000),
            Expect::Declined,
        )
    } else {
        let mut items = vec![("A-1".to_string(), rng.random_range(1..4))];
        if rng.random_bool(0.5) {
            items.push(("B-2".to_string(), rng.random_range(1..3)));
        }
        (items, rng.random_range(100..LIMIT_CENTS), Expect::Completed)
    };
    let req = pb::CreateOrderRequest {
        customer_id: format!("c-{}", i % 37),
        items: items
            .iter()
            .map(|(s, q)| pb::OrderItem {
                sku: s.clone(),
                quantity: *q,
            })
            .collect(),
        amount_cents: amount,
        currency: "EUR".into(),
        idempotency_key: format!("chaos-{seed}-{i}"),
        order_id: format!("order-{i}"),
        ..Default::default()
    };
    (req, expect)
}

struct Cluster {
    nats: NatsServer,
    coordinator: Proc,
    inventory: Proc,
    payment: Proc,
    grpc: SocketAddr,
}

impl Cluster {
    fn start(dir: &std::path::Path, defs: &std::path::Path) -> Result<Self> {
        let bin = procs::bin_dir()?;
        let nats = NatsServer::start()?;
        let url = nats.url();
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let stock = SKUS
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        let arg = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let path = |p: &str| dir.join(p).display().to_string();
        let mut inventory = Proc::new(
            "inventory",
            bin.join("inventory"),
            arg(&[
                "--nats-url",
                &url,
                "--data-dir",
                &path("inventory"),
                "--stock",
                &stock,
            ]),
            dir.join("inventory.log"),
        );
        let mut payment = Proc::new(
            "payment",
            bin.join("payment"),
            arg(&[
                "--nats-url",
                &url,
                "--data-dir",
                &path("payment"),
                "--customer-limit-cents",
                &LIMIT_CENTS.to_string(),
                "--gateway-latency",
                "1ms",
                "--gateway-failure-rate",
                "0.1",
            ]),
            dir.join("payment.log"),
        );
        let mut coordinator = Proc::new(
            "coordinator",
            bin.join("coordinator"),
            arg(&[
                "--nats-url",
                &url,
                "--grpc-addr",
                &grpc.to_string(),
                "--http-addr",
                &format!("127.0.0.1:{}", free_port()?),
                "--data-dir",
                &path("coordinator"),
                "--definitions-dir",
                &defs.display().to_string(),
            ]),
            dir.join("coordinator.log"),
        );
        inventory.start()?;
        payment.start()?;
        coordinator.start()?;
        Ok(Cluster {
            nats,
            coordinator,
            inventory,
            payment,
            grpc,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        self.coordinator.check_alive()?;
        self.inventory.check_alive()?;
        self.payment.check_alive()
    }
}

/// Retries `CreateOrder` (same idempotency key) through coordinator restarts.
async fn place(addr: SocketAddr, req: pb::CreateOrderRequest) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let mut g = connect(addr).await?;
            let r = tokio::time::timeout(Duration::from_secs(5), g.create_order(req.clone())).await??;
            anyhow::Ok(r.into_inner().saga_id)
        };
        match attempt.await {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() > deadline => return Err(e.context("CreateOrder kept failing")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Every saga, by paging `ListSagas` (retrying through restarts).
async fn all_sagas(addr: SocketAddr, state: Option<SagaState>) -> Result<Vec<pb::SagaSummary>> {
    let mut g = connect(addr).await?;
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = g
            .list_sagas(pb::ListSagasRequest {
                state: state.map(|s| s as i32).unwrap_or(0),
                page_size: 1000,
                page_token: token.clone(),
            })
            .await?
            .into_inner();
        out.extend(page.sagas);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

async fn effects(client: &async_nats::Client, participant: &str) -> Result<serde_json::Value> {
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(saga_proto::wire::effects_subject(participant), "".into()),
    )
    .await
    .context("effects timed out")??;
    Ok(serde_json::from_slice(&msg.payload)?)
}

async fn wait_grpc_ready(addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let ok = async {
            let mut g = connect(addr).await?;
            tokio::time::timeout(
                Duration::from_secs(2),
                g.list_definitions(pb::ListDefinitionsRequest {}),
            )
            .await??;
            anyhow::Ok(())
        };
        if ok.await.is_ok() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("coordinator not answering after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_saga_ends_terminal_and_nothing_is_applied_twice() -> Result<()> {
    init_logs();
    let orders: usize = env_or("CHAOS_ORDERS", 200);
    let concurrency: usize = env_or("CHAOS_CONCURRENCY", 16);
    let seed: u64 = env_or(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7),
    );
    println!(
        "chaos: seed {seed} (replay with CHAOS_SEED={seed}), {orders} orders, concurrency {concurrency}"
    );
    let dir = tempfile::tempdir()?;
    println!("chaos: processes' data and logs in {}", dir.path().display());
    let defs = dir.path().join("defs");
    std::fs::create_dir_all(&defs)?;
    // Generous retries: every outage in this test is shorter than the retry window.
    std::fs::write(
        defs.join("order.yaml"),
        "name: order\nversion: 1\ndefaults:\n  timeout: 1s\n  retry: { max_attempts: 300, initial_backoff: 20ms, \
         max_backoff: 500ms, multiplier: 2.0, jitter: true }\nsteps:\n  - name: reserve-inventory\n    \
         participant: inventory\n    action: reserve\n    compensation: release\n  - name: charge-payment\n    \
         participant: payment\n    action: charge\n    compensation: refund\n",
    )?;
    let cluster = Arc::new(Mutex::new(Cluster::start(dir.path(), &defs)?));
    let addr = cluster.lock().await.grpc;
    wait_grpc_ready(addr, Duration::from_secs(30)).await?;
    let started = Instant::now();

    let window = Duration::from_secs(env_or("CHAOS_SECONDS", 15));
    let pace = window / u32::try_from(orders.max(1)).unwrap_or(u32::MAX);
    let done_placing = tokio_util::sync::CancellationToken::new();

    // The monkey: kill -9 a random process at random moments while orders flow.
    let monkey = {
        let cluster = cluster.clone();
        let done = done_placing.clone();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        tokio::spawn(async move {
            let mut recoveries = Vec::new();
            while !done.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
                let victim = rng.random_range(0..4);
                let down = Duration::from_millis(rng.random_range(50..600));
                let mut c = cluster.lock().await;
                match victim {
                    0 => {
                        c.coordinator.kill();
                        tokio::time::sleep(down).await;
                        c.coordinator.start()?;
                        let grpc = c.grpc;
                        drop(c);
                        recoveries.push(wait_grpc_ready(grpc, Duration::from_secs(30)).await?);
                    }
                    1 => {
                        c.inventory.kill();
                        tokio::time::sleep(down).await;
                        c.inventory.start()?;
                    }
                    2 => {
                        c.payment.kill();
                        tokio::time::sleep(down).await;
                        c.payment.start()?;
                    }
                    _ => {
                        c.nats.kill();
                        tokio::time::sleep(down).await;
                        c.nats.restart()?;
                    }
                }
            }
            anyhow::Ok(recoveries)
        })
    };

    // The driver: N orders, C at a time, each retried with its idempotency key.
    let mut rng = StdRng::seed_from_u64(seed);
    let plan: Vec<_> = (0..orders).map(|i| order_for(&mut rng, i, seed)).collect();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for (req, expect) in plan {
        let permit = gate.clone().acquire_owned().await?;
        let items = req.items.iter().map(|i| (i.sku.clone(), i.quantity)).collect();
        let amount = req.amount_cents;
        tasks.push(tokio::spawn(async move {
            let id = place(addr, req).await;
            drop(permit);
            id.map(|saga_id| Placed {
                saga_id,
                expect,
                items,
                amount,
            })
        }));
        // Spread the orders over the chaos window so kills land while sagas are in flight.
        tokio::time::sleep(pace).await;
    }
    done_placing.cancel();

    let mut placed = Vec::with_capacity(orders);
    for t in tasks {
        placed.push(t.await??);
    }
    let placed_in = started.elapsed();
    let mut recoveries = monkey.await??;
    let nats_kills = {
        let mut c = cluster.lock().await;
        c.check_alive()?;
        c.nats.kill_count()
    };

    // Quiescence: nothing PENDING, RUNNING or COMPENSATING.
    let quiet_start = Instant::now();
    loop {
        let mut busy = 0;
        for state in [SagaState::Pending, SagaState::Running, SagaState::Compensating] {
            busy += all_sagas(addr, Some(state))
                .await
                .map(|v| v.len())
                .unwrap_or(usize::MAX / 4);
        }
        if busy == 0 {
            break;
        }
        let limit = Duration::from_secs(env_or("CHAOS_QUIET_SECONDS", 180));
        if quiet_start.elapsed() > limit {
            let c = cluster.lock().await;
            let kept = dir.keep();
            bail!(
                "{busy} sagas still in flight after {limit:?} (logs kept in {})\ncoordinator log tail:\n{}",
                kept.display(),
                c.coordinator.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet_in = quiet_start.elapsed();

    // The invariants.
    let nats = async_nats::connect(cluster.lock().await.nats.url()).await?;
    // The last restart may still be connecting.
    wait_participant(&nats, "inventory").await?;
    wait_participant(&nats, "payment").await?;
    let sagas = all_sagas(addr, None).await?;
    let by_id: HashMap<&str, &pb::SagaSummary> = sagas.iter().map(|s| (s.saga_id.as_str(), s)).collect();
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &sagas {
        *states
            .entry(
                pb::SagaState::try_from(s.state)
                    .map(|x| x.as_str_name())
                    .unwrap_or("?"),
            )
            .or_default() += 1;
    }
    ensure!(
        sagas.len() == orders,
        "{} sagas stored for {orders} orders: CreateOrder was not idempotent",
        sagas.len()
    );
    let inv_effects = effects(&nats, "inventory").await?;
    let pay_effects = effects(&nats, "payment").await?;
    let mut completed_cents = 0i64;
    let mut wrong = Vec::new();
    for p in &placed {
        let Some(s) = by_id.get(p.saga_id.as_str()) else {
            wrong.push(format!("{}: not listed", p.saga_id));
            continue;
        };
        let want = match p.expect {
            Expect::Completed => SagaState::Completed,
            Expect::OutOfStock | Expect::Declined => SagaState::Compensated,
        };
        if s.state != want as i32 {
            wrong.push(format!(
                "{} ({:?}): {:?}",
                p.saga_id,
                p.expect,
                SagaState::try_from(s.state)
            ));
        }
        let held = &inv_effects[&p.saga_id];
        let charge = &pay_effects[&p.saga_id];
        let net = match (charge["amount_cents"].as_i64(), charge["refunded"].as_bool()) {
            (Some(a), Some(false)) => a,
            _ => 0,
        };
        if s.state == SagaState::Completed as i32 {
            completed_cents += p.amount;
            let mut want_held: BTreeMap<String, u64> = BTreeMap::new();
            for (sku, q) in &p.items {
                *want_held.entry(sku.clone()).or_default() += u64::from(*q);
            }
            let got: BTreeMap<String, u64> = serde_json::from_value(held.clone()).unwrap_or_default();
            if got != want_held || net != p.amount {
                wrong.push(format!(
                    "{} COMPLETED without both effects: held {got:?}, charged {net}",
                    p.saga_id
                ));
            }
        } else if !held.is_null() || net != 0 {
            wrong.push(format!(
                "{} COMPENSATED with a net effect: held {held}, charged {net}",
                p.saga_id
            ));
        }
    }
    let mut stock_ok = true;
    for (sku, initial) in SKUS {
        let (a, r) = stock(&nats, sku).await?;
        stock_ok &= a + r == *initial;
        if a + r != *initial {
            wrong.push(format!("{sku}: available {a} + reserved {r} != {initial}"));
        }
    }
    let (charged, refunded) = ledger(&nats).await?;
    if charged - refunded != completed_cents {
        wrong.push(format!(
            "charged {charged} - refunded {refunded} != completed {completed_cents}"
        ));
    }
    let pay_stats = stats(&nats, "payment").await?;
    let inv_stats = stats(&nats, "inventory").await?;

    let (ck, ik, pk) = {
        let c = cluster.lock().await;
        (c.coordinator.kills, c.inventory.kills, c.payment.kills)
    };
    let rec_median = median(&mut recoveries);
    let rec_max = recoveries.iter().max().copied().unwrap_or_default();
    println!("┌──────────────────────────────────────────────┬──────────────────────────────┐");
    let row = |k: &str, v: String| println!("│ {k:<44} │ {v:<28} │");
    row("seed", seed.to_string());
    row("orders / sagas stored", format!("{orders} / {}", sagas.len()));
    for (state, n) in &states {
        row(
            &format!("  {}", state.trim_start_matches("SAGA_STATE_")),
            n.to_string(),
        );
    }
    row(
        "kills: coordinator / inventory / payment / nats",
        format!("{ck} / {ik} / {pk} / {nats_kills}"),
    );
    row(
        "coordinator back after kill: median / max",
        format!("{rec_median:?} / {rec_max:?}"),
    );
    row(
        "orders placed in / quiescent after",
        format!("{placed_in:.1?} / {quiet_in:.1?}"),
    );
    row("violations", wrong.len().to_string());
    row("stock conserved per SKU", stock_ok.to_string());
    row(
        "charged - refunded = completed",
        format!("{} = {completed_cents}", charged - refunded),
    );
    row(
        "ledger charges (one per key) / refunds",
        format!("{} / {}", pay_stats["charges"], pay_stats["refunds"]),
    );
    row(
        "dedupe hits: inventory / payment",
        format!("{} / {}", inv_stats["dedupe_hits"], pay_stats["dedupe_hits"]),
    );
    println!("└──────────────────────────────────────────────┴──────────────────────────────┘");
    ensure!(
        wrong.is_empty(),
        "{} invariant violations (seed {seed}):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let mut c = cluster.lock().await;
    c.coordinator.stop();
    c.payment.stop();
    c.inventory.stop();
    Ok(())
}
