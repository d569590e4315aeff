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
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use saga_proto::pb::SagaState;
use saga_testkit::{chaos::*, *};
use tokio::sync::{Mutex, Semaphore};

struct Cluster {
    nats: NatsServer,
    coordinator: Proc,
    inventory: Proc,
    payment: Proc,
}

impl Cluster {
    fn start(dir: &std::path::Path, defs: &std::path::Path) -> Result<Self> {
        let bin = bin_dir()?;
        let nats = NatsServer::start()?;
        let url = nats.url();
        let access = nats.access();
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
        )
        .envs(access.env(&Role::Participant("inventory".into())));
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
        )
        .envs(access.env(&Role::Participant("payment".into())));
        let mut coordinator = Proc::new(
            "coordinator",
            bin.join("coordinator"),
            arg(&[
                "--nats-url",
                &url,
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
                &path("coordinator"),
                "--definitions-dir",
                &defs.display().to_string(),
                // Fewer in memory than in flight (16 orders at a time): sagas
                // are evicted and read back all along, through every kill.
                "--resident-sagas",
                "8",
            ]),
            dir.join("coordinator.log"),
        )
        .envs(access.env(&Role::Coordinator))
        .env("SAGA_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .ports_file(dir.join("coordinator.ports"));
        inventory.start()?;
        payment.start()?;
        coordinator.start()?;
        Ok(Cluster {
            nats,
            coordinator,
            inventory,
            payment,
        })
    }

    /// The coordinator's gRPC address once it has bound it (port 0: a new
    /// one at every start).
    fn grpc(&mut self) -> Result<SocketAddr> {
        self.coordinator.ports(Duration::from_secs(30))?.get("grpc")
    }

    fn check_alive(&mut self) -> Result<()> {
        self.coordinator.check_alive()?;
        self.inventory.check_alive()?;
        self.payment.check_alive()
    }
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
    write_definitions(&defs)?;
    let cluster = Arc::new(Mutex::new(Cluster::start(dir.path(), &defs)?));
    let addrs = Addrs::new(vec![cluster.lock().await.grpc()?]);
    wait_grpc_ready(addrs.get(0), Duration::from_secs(30)).await?;
    let started = Instant::now();

    let window = Duration::from_secs(env_or("CHAOS_SECONDS", 15));
    let pace = window / u32::try_from(orders.max(1)).unwrap_or(u32::MAX);
    let done_placing = tokio_util::sync::CancellationToken::new();

    // The monkey: kill -9 a random process at random moments while orders flow.
    let monkey = {
        let (cluster, addrs) = (cluster.clone(), addrs.clone());
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
                        let grpc = c.grpc()?;
                        addrs.set(0, grpc);
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
        tasks.push(spawn_place(addrs.clone(), 0, req, expect, permit));
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
            busy += all_sagas(addrs.get(0), Some(state))
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
    let nats = cluster.lock().await.nats.connect().await?;
    let verdict = verify(&nats, addrs.get(0), orders, &placed).await?;
    let (ck, ik, pk) = {
        let c = cluster.lock().await;
        (c.coordinator.kills, c.inventory.kills, c.payment.kills)
    };
    let rec_median = median(&mut recoveries);
    let rec_max = recoveries.iter().max().copied().unwrap_or_default();
    let mut rows = vec![("seed".to_string(), seed.to_string())];
    rows.extend(verdict.rows(orders));
    rows.extend([
        (
            "kills: coordinator / inventory / payment / nats".to_string(),
            format!("{ck} / {ik} / {pk} / {nats_kills}"),
        ),
        (
            "coordinator back after kill: median / max".to_string(),
            format!("{rec_median:?} / {rec_max:?}"),
        ),
        (
            "orders placed in / quiescent after".to_string(),
            format!("{placed_in:.1?} / {quiet_in:.1?}"),
        ),
    ]);
    print_table(&rows);
    let wrong = verdict.wrong;
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
