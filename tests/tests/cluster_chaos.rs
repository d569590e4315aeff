//! Beyond one machine: a 3-node NATS cluster (routes between the nodes,
//! JetStream with replicas 3), three coordinators on the `jetstream` store
//! and the participants, all as separate OS processes on loopback. Orders go
//! to the coordinators in turn; mid-run one coordinator is kill -9'd for good
//! and one NATS node is kill -9'd (and restarted a few seconds later); the
//! participants run three replicas each on the jetstream store, two of which
//! are kill -9'd (and restarted) and one paused with SIGSTOP for longer than
//! a step's timeout (then SIGCONT). Then
//! the chaos suite's invariants: every saga terminal in the state its order
//! implies, stock and money conserved, nothing applied twice, every event
//! once. It prints the failover time: from the kill to the first transition,
//! on another coordinator, of a saga the killed one was running.
//!
//! `CLUSTER_ORDERS` (default 300; `make chaos-cluster` uses 1000),
//! `CLUSTER_SECONDS` (default 15), `CLUSTER_SEED`.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use rand::{rngs::StdRng, SeedableRng};
use saga_proto::pb;
use saga_testkit::{chaos::*, *};
use tokio::sync::Semaphore;

const PARTITIONS: u32 = 12;
const LEASE_TTL: &str = "2s";
/// Replicas of each participant (jetstream store).
const REPLICAS: usize = 3;

/// A fault of a participant replica, at an order's index.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9.
    Kill(usize),
    /// Started again.
    Start(usize),
    /// SIGSTOP: alive to NATS, answering nothing.
    Pause(usize),
    /// SIGCONT.
    Resume(usize),
}

/// Sends `signal` (`-STOP`, `-CONT`) to `p`.
fn signal(p: &Proc, signal: &str) -> Result<()> {
    let pid = p
        .pid()
        .ok_or_else(|| anyhow::anyhow!("{} is not running", p.name))?;
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_a_nats_node_die_and_every_saga_still_ends_once() -> Result<()> {
    init_logs();
    let orders: usize = env_or("CLUSTER_ORDERS", 300);
    let window = Duration::from_secs(env_or("CLUSTER_SECONDS", 15));
    let seed: u64 = env_or(
        "CLUSTER_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7),
    );
    println!("cluster chaos: seed {seed} (CLUSTER_SEED={seed}), {orders} orders over {window:?}");
    // Kept when the test fails (logs), removed at the end when it passes.
    let dir = tempfile::tempdir()?.keep();
    println!("cluster chaos: processes' data and logs in {}", dir.display());
    let defs = dir.as_path().join("defs");
    write_definitions(&defs)?;
    let bin = bin_dir()?;

    let mut cluster = NatsCluster::start(dir.as_path(), 3, "saga")?;
    let urls = cluster.url();
    let access = cluster.access();
    let nats = cluster.jetstream_ready().await?;
    let nodes: Vec<Arc<std::sync::Mutex<NatsServer>>> = cluster
        .nodes
        .into_iter()
        .map(|n| Arc::new(std::sync::Mutex::new(n)))
        .collect();

    let arg = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let path = |p: &str| dir.as_path().join(p).display().to_string();
    let stock = SKUS
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    // Three replicas of each participant in its queue group, on the jetstream
    // store (state and stored replies in R3 KV buckets shared by the replicas).
    let replica = |name: &str, r: usize, extra: &[&str]| {
        let mut args = arg(&[
            "--store",
            "jetstream",
            "--kv-replicas",
            "3",
            "--nats-url",
            &urls,
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            &path(&format!("{name}-{r}")),
        ]);
        args.extend(arg(extra));
        Proc::new(
            &format!("{name}-{r}"),
            bin.join(name),
            args,
            dir.as_path().join(format!("{name}-{r}.log")),
        )
        .envs(access.env(&Role::Participant(name.into())))
    };
    let limit = LIMIT_CENTS.to_string();
    let mut replicas: Vec<Proc> = Vec::new();
    for r in 0..REPLICAS {
        replicas.push(replica("inventory", r, &["--stock", &stock]));
        replicas.push(replica(
            "payment",
            r,
            &[
                "--customer-limit-cents",
                &limit,
                // Slow enough that sagas are in flight when the coordinator dies.
                "--gateway-latency",
                "300ms",
                "--gateway-failure-rate",
                "0.05",
            ],
        ));
    }
    for p in &mut replicas {
        p.start()?;
    }
    let mut coordinators = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let mut c = Proc::new(
            &format!("coord-{i}"),
            bin.join("coordinator"),
            arg(&[
                "--store",
                "jetstream",
                "--kv-replicas",
                "3",
                "--events-replicas",
                "3",
                "--partitions",
                &PARTITIONS.to_string(),
                "--lease-ttl",
                LEASE_TTL,
                "--instance-id",
                &format!("coord-{i}"),
                "--nats-url",
                &urls,
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
                &path(&format!("coord-{i}")),
                "--definitions-dir",
                &defs.display().to_string(),
            ]),
            dir.as_path().join(format!("coord-{i}.log")),
        )
        .envs(access.env(&Role::Coordinator))
        .env("SAGA_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .ports_file(dir.as_path().join(format!("coord-{i}.ports")));
        c.start()?;
        addrs.push(c.ports(Duration::from_secs(60))?.get("grpc")?);
        coordinators.push(c);
    }
    for a in &addrs {
        wait_grpc_ready(*a, Duration::from_secs(60)).await?;
    }
    wait_participant(&nats, "inventory").await?;
    wait_participant(&nats, "payment").await?;
    // Every partition held, spread over the three.
    eventually(
        Duration::from_secs(30),
        "partitions spread over 3 coordinators",
        || async {
            cluster::holders(&nats).await.is_ok_and(|h| {
                let per: BTreeSet<&String> = h.values().collect();
                h.len() == PARTITIONS as usize && per.len() == 3
            })
        },
    )
    .await?;

    // Orders, round-robin over the coordinators, retried elsewhere on failure.
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let plan: Vec<_> = (0..orders).map(|i| order_for(&mut rng, i, seed)).collect();
    let pace = window / u32::try_from(orders.max(1)).unwrap_or(u32::MAX);
    let gate = Arc::new(Semaphore::new(16));
    let addrs = Addrs::new(addrs);
    let mut tasks = Vec::new();
    let (mut victim_partitions, mut kill_ms) = (BTreeSet::new(), 0u64);
    let mut restart = None;
    // Replicas (inventory-0 0, payment-0 1, inventory-1 2, payment-1 3, …):
    // inventory-0 killed at 20% and back 2 s later; payment-1 paused at 30%
    // for 2.5 s (longer than a step's 1 s timeout: its commands time out and
    // are retried on the others); payment-2 killed at 50% and back 2 s later.
    let steps = |d: Duration| {
        usize::try_from(d.as_nanos() / pace.as_nanos().max(1))
            .unwrap_or(usize::MAX)
            .max(1)
    };
    let mut faults = vec![
        (orders / 5, Fault::Kill(0)),
        (orders / 5 + steps(Duration::from_secs(2)), Fault::Start(0)),
        (orders * 3 / 10, Fault::Pause(3)),
        (
            orders * 3 / 10 + steps(Duration::from_millis(2500)),
            Fault::Resume(3),
        ),
        (orders / 2, Fault::Kill(5)),
        (orders / 2 + steps(Duration::from_secs(2)), Fault::Start(5)),
    ];
    faults.sort_by_key(|(at, _)| *at);
    let (mut pauses, mut faults) = (0u32, faults.into_iter().peekable());
    for (i, (req, expect)) in plan.into_iter().enumerate() {
        while let Some((_, fault)) = faults.next_if(|(at, _)| *at <= i) {
            match fault {
                Fault::Kill(r) => replicas[r].kill(),
                Fault::Start(r) => replicas[r].start()?,
                Fault::Pause(r) => {
                    signal(&replicas[r], "-STOP")?;
                    pauses += 1;
                }
                Fault::Resume(r) => signal(&replicas[r], "-CONT")?,
            }
            println!(
                "cluster chaos: {fault:?} ({})",
                replicas[fault_target(fault)].name
            );
        }
        // At 40% of the orders the first coordinator dies for good; at 60% a NATS node.
        if i == orders * 2 / 5 {
            victim_partitions = cluster::holders(&nats)
                .await?
                .into_iter()
                .filter(|(_, h)| h == "coord-0")
                .map(|(p, _)| p)
                .collect();
            kill_ms = now_ms();
            coordinators[0].kill();
            println!("cluster chaos: coord-0 killed holding partitions {victim_partitions:?}");
        }
        if i == orders * 3 / 5 {
            lock(&nodes[1]).kill();
            println!("cluster chaos: nats node-1 killed");
            // It comes back 3 s later, whatever the orders are doing.
            let node = nodes[1].clone();
            restart = Some(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                println!("cluster chaos: nats node-1 restarted");
                // Waits for the node's ports file: not on an async worker.
                tokio::task::spawn_blocking(move || lock(&node).restart()).await?
            }));
        }
        let permit = gate.clone().acquire_owned().await?;
        // The coordinators in turn; once coord-0 is dead, the two others.
        let first = if kill_ms == 0 { i % 3 } else { 1 + i % 2 };
        tasks.push(spawn_place(addrs.clone(), first, req, expect, permit));
        tokio::time::sleep(pace).await;
    }
    // Whatever was not reached (few orders): every replica running again.
    for (_, fault) in faults {
        match fault {
            Fault::Start(r) => replicas[r].start()?,
            Fault::Resume(r) => signal(&replicas[r], "-CONT")?,
            Fault::Kill(_) | Fault::Pause(_) => {}
        }
    }
    let mut placed = Vec::with_capacity(orders);
    for t in tasks {
        placed.push(t.await??);
    }
    if let Some(r) = restart {
        r.await??;
    }
    let placed_in = started.elapsed();

    // Quiescence, read through a surviving coordinator.
    let live = addrs.get(1);
    let quiet_start = Instant::now();
    loop {
        let all = all_sagas(live, None).await.unwrap_or_default();
        let busy = all.iter().filter(|s| !is_terminal(s.state)).count();
        if all.len() == orders && busy == 0 {
            break;
        }
        if quiet_start.elapsed() > Duration::from_secs(env_or("CLUSTER_QUIET_SECONDS", 120)) {
            // The stuck ones by name: their partition says which coordinator to read.
            let stuck: Vec<String> = all
                .iter()
                .filter(|s| !is_terminal(s.state))
                .take(10)
                .map(|s| {
                    let p = coordinator::kv::partition_of(&s.saga_id, PARTITIONS);
                    format!("{} (state {}, partition {p})", s.saga_id, s.state)
                })
                .collect();
            bail!(
                "{busy} of {} sagas still in flight (logs kept in {}): {}\ncoord-1 log tail:\n{}",
                all.len(),
                dir.display(),
                stuck.join(", "),
                coordinators[1].log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let quiet_in = quiet_start.elapsed();
    let verdict = verify(&nats, live, orders, &placed).await?;

    // Failover: the first transition after the kill of a saga in the victim's
    // partitions that was running then.
    let mut g = connect(live).await?;
    let mut failover: Option<u64> = None;
    let mut orphans = 0;
    for s in &verdict.sagas {
        let p = coordinator::kv::partition_of(&s.saga_id, PARTITIONS);
        if !victim_partitions.contains(&p) || timestamp_ms(&s.created_at) > kill_ms {
            continue;
        }
        let saga = g
            .get_saga(pb::GetSagaRequest {
                saga_id: s.saga_id.clone(),
            })
            .await?
            .into_inner();
        let before = saga.history.iter().any(|h| timestamp_ms(&h.at) <= kill_ms);
        let after = saga
            .history
            .iter()
            .map(|h| timestamp_ms(&h.at))
            .filter(|t| *t > kill_ms)
            .min();
        if let (true, Some(t)) = (before, after) {
            orphans += 1;
            failover = Some(failover.map_or(t - kill_ms, |f: u64| f.min(t - kill_ms)));
        }
    }
    // The dead coordinator's partitions are all taken over.
    let taken_over = eventually(
        Duration::from_secs(20),
        "every partition held by a live coordinator",
        || async {
            cluster::holders(&nats)
                .await
                .is_ok_and(|h| h.len() == PARTITIONS as usize && !h.values().any(|v| v == "coord-0"))
        },
    )
    .await;
    let holders_after = cluster::holders(&nats).await?;
    if taken_over.is_err() {
        bail!(
            "partitions not all taken over: {holders_after:?} (logs in {})\ncoord-1:\n{}\ncoord-2:\n{}",
            dir.display(),
            coordinators[1].log_tail(40),
            coordinators[2].log_tail(40)
        );
    }
    let mut rows = vec![("seed".to_string(), seed.to_string())];
    rows.extend(verdict.rows(orders));
    rows.extend([
        (
            "coordinators / partitions / lease ttl".to_string(),
            format!("3 / {PARTITIONS} / {LEASE_TTL}"),
        ),
        (
            "participant replicas / kill -9 / SIGSTOP > timeout".to_string(),
            format!(
                "{REPLICAS} each (jetstream) / {} / {pauses}",
                replicas.iter().map(|p| p.kills).sum::<u32>()
            ),
        ),
        (
            "coord-0 killed holding partitions".to_string(),
            format!("{}", victim_partitions.len()),
        ),
        (
            "orphaned sagas / failover (kill → 1st move)".to_string(),
            format!(
                "{orphans} / {}",
                failover.map_or("n/a".to_string(), |f| format!("{f} ms"))
            ),
        ),
        (
            "partitions held at the end by coord-1 / coord-2".to_string(),
            format!(
                "{} / {}",
                holders_after.values().filter(|h| *h == "coord-1").count(),
                holders_after.values().filter(|h| *h == "coord-2").count()
            ),
        ),
        (
            "orders placed in / quiescent after".to_string(),
            format!("{placed_in:.1?} / {quiet_in:.1?}"),
        ),
    ]);
    print_table(&rows);
    ensure!(
        verdict.wrong.is_empty(),
        "{} invariant violations (seed {seed}):\n{}",
        verdict.wrong.len(),
        verdict.wrong.join("\n")
    );
    for c in &mut coordinators {
        c.stop();
    }
    for p in &mut replicas {
        p.stop();
    }
    for n in &nodes {
        lock(n).kill();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn lock(node: &std::sync::Mutex<NatsServer>) -> std::sync::MutexGuard<'_, NatsServer> {
    node.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fault_target(f: Fault) -> usize {
    match f {
        Fault::Kill(r) | Fault::Start(r) | Fault::Pause(r) | Fault::Resume(r) => r,
    }
}
