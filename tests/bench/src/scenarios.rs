//! The scenarios: the concurrency sweep, recovery after the coordinator is
//! stopped with K sagas in flight, the soak at a steady rate, and the
//! stored-store read latencies. Each started cluster has fresh data dirs
//! (and, on the jetstream store, emptied buckets); the clusters of one
//! configuration share its NATS.

use std::{
    io::IsTerminal,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use saga_proto::pb::{self, SagaState};

use super::{
    cli::{Args, Setup, StopSignal},
    drive::{Closed, Driver, Mix, Open, Tally},
    reads,
    sys::{self, Cluster, ClusterSpec, Nats, ProcSample},
};

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub(crate) fn bar(len: u64, prefix: String) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target).with_prefix(prefix);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Says what is happening, on stderr (the report goes to stdout).
pub(crate) fn phase(msg: &str) {
    eprintln!("saga-bench: {msg}");
}

/// CPU and memory of one process over a run.
#[derive(Debug, Clone)]
pub(crate) struct ProcFigures {
    pub(crate) name: String,
    /// CPU seconds used during the run.
    pub(crate) cpu_s: f64,
    /// CPU seconds per second of the run (1.0 = one core busy).
    pub(crate) cores: f64,
    /// Peak RSS since the process started (VmHWM), KiB.
    pub(crate) peak_rss_kib: u64,
    /// RSS at the end of the run, KiB.
    pub(crate) rss_kib: u64,
}

/// `(exported, dropped)` spans of the processes at `addrs` so far.
async fn otlp_counters(addrs: &[SocketAddr]) -> (Option<f64>, Option<f64>) {
    (
        sys::counter(addrs, saga_trace::SPANS_EXPORTED).await,
        sys::counter(addrs, saga_trace::SPANS_DROPPED).await,
    )
}

/// The processes whose CPU and memory are sampled.
pub(crate) struct Probes {
    list: Vec<(String, u32)>,
    ticks: f64,
}

/// A [`Probes::snapshot`]: each process and its sample, if it could be read.
pub(crate) type Snapshot = Vec<(String, Option<ProcSample>)>;

impl Probes {
    /// The NATS nodes, the cluster's processes and this one.
    pub(crate) fn new(nats: Option<&Nats>, cluster: Option<&Cluster>, ticks: f64) -> Self {
        let mut list = Vec::new();
        if let Some(n) = nats {
            list.extend(n.pids());
        }
        if let Some(c) = cluster {
            list.extend(c.pids());
        }
        list.push(("saga-bench".to_string(), std::process::id()));
        Probes { list, ticks }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        self.list
            .iter()
            .map(|(n, p)| (n.clone(), sys::sample(*p, self.ticks).ok()))
            .collect()
    }

    /// Figures between two snapshots over `elapsed`.
    pub(crate) fn figures(before: &Snapshot, after: &Snapshot, elapsed: Duration) -> Vec<ProcFigures> {
        before
            .iter()
            .zip(after)
            .filter_map(|((name, b), (_, a))| {
                let (b, a) = ((*b)?, (*a)?);
                let cpu_s = (a.cpu_s - b.cpu_s).max(0.0);
                Some(ProcFigures {
                    name: name.clone(),
                    cpu_s,
                    cores: cpu_s / elapsed.as_secs_f64().max(1e-9),
                    peak_rss_kib: a.hwm_kib,
                    rss_kib: a.rss_kib,
                })
            })
            .collect()
    }
}

/// What every scenario needs.
#[derive(Clone)]
pub(crate) struct Ctx<'a> {
    pub(crate) args: &'a Args,
    /// The configuration its clusters are started with.
    pub(crate) setup: Setup,
    pub(crate) seed: u64,
    pub(crate) ticks: f64,
    pub(crate) dir: &'a Path,
    pub(crate) bin_dir: PathBuf,
    pub(crate) nats: Option<&'a Nats>,
    /// Comma-separated URLs of `nats` (or of the target's NATS).
    pub(crate) nats_url: String,
    pub(crate) nats_client: async_nats::Client,
    /// Environment of every process started (`--otlp`: the exporters' settings).
    pub(crate) env: &'a [(String, String)],
}

impl Ctx<'_> {
    /// A fresh cluster under `<dir>/<name>`, or none when driving a target.
    async fn cluster(
        &self,
        name: &str,
        gateway_latency: Duration,
        charge_timeout: &str,
    ) -> Result<Option<Cluster>> {
        if self.args.target.is_some() {
            return Ok(None);
        }
        phase(&format!(
            "starting inventory, payment and coordinators ({name}: {}; participants: {} × {})",
            self.setup.label(),
            self.args.participant_replicas,
            self.args.participant_store.name()
        ));
        let spec = ClusterSpec {
            bin_dir: &self.bin_dir,
            nats_url: &self.nats_url,
            access: self.nats.map(|n| &n.access),
            dir: self.dir.join(name),
            setup: self.setup,
            gateway_latency,
            customer_limit_cents: self.args.customer_limit_cents,
            charge_timeout,
            log_level: &self.args.log_level,
            coordinator_args: &self.args.coordinator_arg,
            participant_store: self.args.participant_store,
            participant_replicas: self.args.participant_replicas,
            env: self.env,
        };
        Ok(Some(Cluster::start(&spec, &self.nats_client).await?))
    }

    /// The gRPC addresses of the coordinators (or the target).
    fn grpc(&self, cluster: Option<&Cluster>) -> Result<Vec<SocketAddr>> {
        match (cluster, self.args.target) {
            (Some(c), _) => Ok(c.grpc.clone()),
            (None, Some(t)) => Ok(vec![t]),
            (None, None) => bail!("no cluster and no --target"),
        }
    }

    /// The `/metrics` addresses of the coordinators (or the target's, when given).
    fn metrics(&self, cluster: Option<&Cluster>) -> Vec<SocketAddr> {
        match cluster {
            Some(c) => c.http.clone(),
            None => self.args.metrics_addr.into_iter().collect(),
        }
    }

    fn mix(&self) -> Mix {
        Mix {
            declined_share: self.args.declined_share,
            out_of_stock_share: self.args.out_of_stock_share,
            customer_limit_cents: self.args.customer_limit_cents,
        }
    }
}

/// One run of the sweep.
#[derive(Debug, Clone)]
pub(crate) struct RunReport {
    pub(crate) concurrency: usize,
    pub(crate) connections: usize,
    pub(crate) tally: Tally,
    pub(crate) elapsed: Duration,
    pub(crate) procs: Vec<ProcFigures>,
    /// Coordinator group-commit flushes during the run.
    pub(crate) flushes: Option<f64>,
    /// Store writes during the run: the coordinators' (sled inserts and
    /// removes), the participants' (sled, or jetstream KV writes).
    pub(crate) coordinator_writes: Option<f64>,
    pub(crate) participant_writes: Option<f64>,
    /// What a console tab open during the run fetched (`--console-tab`).
    pub(crate) console_tab: Option<crate::console::TabFigures>,
    /// `--otlp`: spans every process exported and dropped during the run.
    pub(crate) otlp: Option<(f64, f64)>,
}

impl RunReport {
    pub(crate) fn sagas_per_s(&self) -> f64 {
        self.tally.placed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn completed_per_s(&self) -> f64 {
        self.tally.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Store writes per saga placed, of `writes`.
    pub(crate) fn per_saga(&self, writes: Option<f64>) -> Option<f64> {
        writes
            .filter(|_| self.tally.placed > 0)
            .map(|w| w / self.tally.placed as f64)
    }

    pub(crate) fn sagas_per_flush(&self) -> Option<f64> {
        self.flushes
            .filter(|f| *f > 0.0)
            .map(|f| self.tally.placed as f64 / f)
    }
}

/// The concurrency sweep of one configuration.
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    pub(crate) setup: Setup,
    /// Its runs, one per concurrency (fewer when it failed part-way).
    pub(crate) runs: Vec<RunReport>,
    /// Why it stopped, when it failed.
    pub(crate) error: Option<String>,
}

/// The concurrency sweep on `ctx.setup`: a warm-up, then one closed-loop
/// run per value of `--concurrency` on one cluster; the runs done, and the
/// error that stopped it, if any.
pub(crate) async fn sweep(ctx: &Ctx<'_>) -> Sweep {
    let mut runs = Vec::new();
    let error = sweep_into(ctx, &mut runs).await.err().map(|e| format!("{e:#}"));
    Sweep {
        setup: ctx.setup,
        runs,
        error,
    }
}

/// [`sweep`], pushing each run as it is done.
///
/// # Errors
/// The cluster did not start, the warm-up failed, or a process died.
async fn sweep_into(ctx: &Ctx<'_>, runs: &mut Vec<RunReport>) -> Result<()> {
    let args = ctx.args;
    let slug = ctx.setup.slug();
    let mut cluster = ctx
        .cluster(&format!("sweep-{slug}"), args.gateway_latency, "5s")
        .await?;
    let grpc = ctx.grpc(cluster.as_ref())?;
    let metrics = ctx.metrics(cluster.as_ref());
    let probes = Probes::new(ctx.nats, cluster.as_ref(), ctx.ticks);
    if args.warmup > 0 {
        warm_up(ctx, &grpc, &slug).await?;
    }
    for (n, &c) in args.concurrency.iter().enumerate() {
        // Each coordinator gets its share of the orders in flight.
        let per_coordinator = args.connections_for(c.div_ceil(grpc.len()));
        let connections = per_coordinator * grpc.len();
        let driver = Driver::connect(&grpc, per_coordinator, args.follow, args.order_timeout).await?;
        phase(&format!(
            "run: {} orders, C={c} ({connections} connection{}, at most {:?}) on {}",
            args.orders,
            if connections == 1 { "" } else { "s" },
            args.max_run_time,
            ctx.setup.label()
        ));
        let b = bar(args.orders as u64, format!("C={c}"));
        let parts = cluster
            .as_ref()
            .map(|c| c.participant_http.clone())
            .unwrap_or_default();
        let flushes_before = sys::flushes(&metrics).await;
        let writes_before = (
            sys::counter(&metrics, "saga_store_writes_total").await,
            sys::counter(&parts, "participant_store_writes_total").await,
        );
        let all: Vec<SocketAddr> = metrics.iter().chain(parts.iter()).copied().collect();
        let spans_before = otlp_counters(&all).await;
        let before = probes.snapshot();
        let tab = match (args.console_tab, metrics.first()) {
            (true, Some(http)) => Some(crate::console::Tab::open(*http)),
            _ => None,
        };
        let (tally, elapsed) = Closed {
            driver: &driver,
            mix: ctx.mix(),
            seed: ctx.seed,
            tag: format!("{slug}-run{n}-c{c}"),
            orders: args.orders,
            concurrency: c,
            max_time: args.max_run_time,
            keep_ids: false,
        }
        .run(&b)
        .await?;
        let after = probes.snapshot();
        let console_tab = match tab {
            Some(t) => t.close().await,
            None => None,
        };
        let flushes_after = sys::flushes(&metrics).await;
        let writes_after = (
            sys::counter(&metrics, "saga_store_writes_total").await,
            sys::counter(&parts, "participant_store_writes_total").await,
        );
        b.finish_and_clear();
        let run = RunReport {
            concurrency: c,
            connections,
            elapsed,
            procs: Probes::figures(&before, &after, elapsed),
            flushes: flushes_before.zip(flushes_after).map(|(b, a)| a - b),
            coordinator_writes: writes_before.0.zip(writes_after.0).map(|(b, a)| a - b),
            participant_writes: writes_before.1.zip(writes_after.1).map(|(b, a)| a - b),
            tally,
            console_tab,
            otlp: match (args.otlp, spans_before, otlp_counters(&all).await) {
                (true, (Some(e0), Some(d0)), (Some(e1), Some(d1))) => Some((e1 - e0, d1 - d0)),
                _ => None,
            },
        };
        phase(&format!(
            "  C={c}: {} sagas in {:.1?}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} mismatches{}",
            run.tally.placed,
            elapsed,
            run.sagas_per_s(),
            super::drive::ms(&run.tally.latency, 0.5),
            super::drive::ms(&run.tally.latency, 0.99),
            run.tally.mismatches,
            run.otlp.map_or(String::new(), |(e, d)| format!(
                "; OTLP: {e:.0} spans exported, {d:.0} dropped"
            )) + &run.console_tab.as_ref().map_or(String::new(), |t| format!(
                "; console tab: {} fetches ({} failed), p50 {:.2} ms",
                t.fetches,
                t.failures,
                super::drive::ms(&t.latency, 0.5)
            ))
        ));
        runs.push(run);
        if let Some(c) = cluster.as_mut() {
            c.check_alive()?;
        }
    }
    if let Some(mut c) = cluster {
        c.stop();
    }
    Ok(())
}

/// The warm-up before a sweep: `--warmup` orders at C=16, not measured.
///
/// # Errors
/// An order failed.
async fn warm_up(ctx: &Ctx<'_>, grpc: &[SocketAddr], slug: &str) -> Result<()> {
    let args = ctx.args;
    phase(&format!("warm-up: {} orders at C=16", args.warmup));
    let driver = Driver::connect(grpc, 1, args.follow, args.order_timeout).await?;
    let b = bar(args.warmup as u64, "warm-up".into());
    let (t, _) = Closed {
        driver: &driver,
        mix: ctx.mix(),
        seed: ctx.seed,
        tag: format!("{slug}-warmup"),
        orders: args.warmup,
        concurrency: 16,
        max_time: args.max_run_time,
        keep_ids: false,
    }
    .run(&b)
    .await?;
    b.finish_and_clear();
    ensure!(
        t.errors == 0,
        "warm-up: {} orders failed: {:?}",
        t.errors,
        t.examples
    );
    Ok(())
}

/// The recovery scenario's figures.
#[derive(Debug, Clone)]
pub(crate) struct RecoveryReport {
    pub(crate) k: usize,
    pub(crate) signal: StopSignal,
    /// Sagas not terminal when the coordinator was stopped.
    pub(crate) in_flight_at_stop: usize,
    pub(crate) placed_in: Duration,
    pub(crate) stop_took: Duration,
    /// Restart (spawn) → first gRPC answer.
    pub(crate) to_grpc: Duration,
    /// Restart (spawn) → every saga terminal.
    pub(crate) to_all_terminal: Duration,
    pub(crate) completed: usize,
    pub(crate) coordinator_cpu_s: Option<f64>,
    pub(crate) coordinator_peak_rss_kib: Option<u64>,
    /// Coordinator RSS before the first order, with K/2 and with all K in flight, KiB.
    pub(crate) rss_idle_kib: Option<u64>,
    pub(crate) rss_half_kib: Option<u64>,
    pub(crate) rss_in_flight_kib: Option<u64>,
    /// The most charges each payment replica handled at once after the
    /// restart (they restart just before the coordinator, so this is the
    /// burst of resumed commands alone): `(replica, most)`.
    pub(crate) payment_most_in_flight: Vec<(String, Option<f64>)>,
}

impl RecoveryReport {
    /// Coordinator RSS growth per saga in flight, bytes.
    pub(crate) fn rss_bytes_per_saga(&self) -> Option<f64> {
        let (idle, loaded) = (self.rss_idle_kib?, self.rss_in_flight_kib?);
        Some(loaded.saturating_sub(idle) as f64 * 1024.0 / self.k.max(1) as f64)
    }

    /// Coordinator RSS growth per saga from K/2 to K in flight, bytes: the
    /// marginal cost of one more saga in flight, without what fills up once.
    pub(crate) fn rss_marginal_bytes_per_saga(&self) -> Option<f64> {
        let (half, loaded) = (self.rss_half_kib?, self.rss_in_flight_kib?);
        let added = self.k - self.k / 2;
        Some(loaded.saturating_sub(half) as f64 * 1024.0 / added.max(1) as f64)
    }
}

/// Sagas in `state`, by paging `ListSagas`; with `step`, only those whose current step it is.
async fn count_state(grpc: SocketAddr, state: SagaState, step: Option<&str>) -> Result<usize> {
    let mut g = saga_testkit::connect(grpc).await?;
    let (mut n, mut token) = (0, String::new());
    loop {
        let page = g
            .list_sagas(pb::ListSagasRequest {
                state: state as i32,
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        n += page
            .sagas
            .iter()
            .filter(|s| step.is_none_or(|st| s.current_step == st))
            .count();
        if page.next_page_token.is_empty() {
            return Ok(n);
        }
        token = page.next_page_token;
    }
}

/// Whether no saga is PENDING, RUNNING or COMPENSATING (one tiny page per state).
async fn quiescent(
    g: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
) -> Result<bool> {
    for state in [SagaState::Pending, SagaState::Running, SagaState::Compensating] {
        let page = g
            .list_sagas(pb::ListSagasRequest {
                state: state as i32,
                page_size: 1,
                page_token: String::new(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if !page.sagas.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Recovery: K orders against a payment whose gateway takes a minute (or
/// longer for a large K, so that none finishes while the rest are placed),
/// so all K wait at `charge-payment`; the coordinator's RSS is sampled
/// before the first order and then (the memory of K sagas in flight); the
/// coordinator is stopped (SIGKILL or SIGTERM), the payment restarted with
/// the normal gateway, then the coordinator restarted; timed from that spawn
/// until every saga is terminal.
///
/// # Errors
/// A process did not start, the sagas did not reach the charge step, or
/// they were not all terminal within two minutes.
pub(crate) async fn recovery(ctx: &Ctx<'_>) -> Result<RecoveryReport> {
    let args = ctx.args;
    let k = args.recovery;
    // Placing runs at a few thousand orders a second: the gateway outlasts it.
    let gateway = Duration::from_secs(60.max(k as u64 / 500));
    let charge_timeout = humantime::format_duration(gateway * 2).to_string();
    let mut cluster = ctx
        .cluster("recovery", gateway, &charge_timeout)
        .await?
        .context("the recovery scenario needs its own processes (not --target)")?;
    let grpc = cluster.grpc[0];
    let rss = |c: &Cluster| {
        c.coordinators[0]
            .pid()
            .and_then(|p| sys::sample(p, ctx.ticks).ok())
            .map(|s| s.rss_kib)
    };
    let rss_idle_kib = rss(&cluster);
    phase(&format!(
        "recovery: placing {k} orders against a {} payment gateway",
        humantime::format_duration(gateway)
    ));
    let driver = Driver::connect(&[grpc], 2, args.follow, args.order_timeout).await?;
    let b = bar(k as u64, "recovery".into());
    let start = Instant::now();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mix = Mix::all_complete(args.customer_limit_cents);
    // Placed in two halves, each waited for at charge-payment: the RSS with
    // half of them in flight and with all of them gives the marginal cost of
    // a saga in flight, apart from what fills up once (caches, arenas).
    let half = k / 2;
    let mut rss_half_kib = None;
    for (from, to) in [(0, half), (half, k)] {
        let mut tasks = Vec::new();
        for i in from..to {
            let permit = gate.clone().acquire_owned().await?;
            let (mut client, b) = (driver.client(i), b.clone());
            let (req, _) = mix.order(ctx.seed, "recovery", i);
            tasks.push(tokio::spawn(async move {
                let r = client.create_order(req).await;
                drop(permit);
                b.inc(1);
                r.map(|r| r.into_inner().saga_id)
            }));
        }
        for t in tasks {
            t.await?.context("CreateOrder in the recovery scenario")?;
        }
        // Every saga placed so far reserved and waiting for its charge.
        let deadline = Instant::now() + gateway + start.elapsed();
        loop {
            let n = count_state(grpc, SagaState::Running, Some("charge-payment")).await?;
            if n == to {
                break;
            }
            if Instant::now() > deadline {
                bail!("recovery: only {n} of {to} sagas reached charge-payment");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to == half {
            rss_half_kib = rss(&cluster);
        }
    }
    let placed_in = start.elapsed();
    b.finish_and_clear();
    let in_flight_at_stop = count_state(grpc, SagaState::Running, None).await?;
    let rss_in_flight_kib = rss(&cluster);
    phase(&format!(
        "recovery: {in_flight_at_stop} sagas in flight; stopping the coordinator ({:?})",
        args.recovery_signal
    ));
    let stop_took = match args.recovery_signal {
        StopSignal::Kill => {
            let t = Instant::now();
            cluster.coordinators[0].kill();
            t.elapsed()
        }
        StopSignal::Term => cluster.coordinators[0].terminate(Duration::from_secs(10)),
    };
    // The slow charges die with the payment (every replica); it comes back
    // with the normal gateway.
    cluster.restart_payments(args.gateway_latency)?;
    cluster.wait_participants(&ctx.nats_client).await?;
    phase("recovery: restarting the coordinator");
    let t0 = Instant::now();
    cluster.start_coordinator(0)?;
    let grpc = cluster.grpc[0];
    let mut to_grpc = None;
    // Draining K resumed sagas runs at the engine's usual rate.
    let drain_limit = Duration::from_secs(120.max(k as u64 / 250));
    let to_all_terminal = loop {
        let mut probe = async {
            let ch = tonic::transport::Channel::from_shared(format!("http://{grpc}"))?
                .connect()
                .await?;
            anyhow::Ok(pb::saga_service_client::SagaServiceClient::new(ch))
        }
        .await;
        if let Ok(g) = probe.as_mut() {
            if let Ok(done) = quiescent(g).await {
                to_grpc.get_or_insert(t0.elapsed());
                if done {
                    break t0.elapsed();
                }
            }
        }
        cluster.coordinators[0].check_alive()?;
        if t0.elapsed() > drain_limit {
            bail!(
                "recovery: sagas still in flight {drain_limit:?} after the restart; coordinator log tail:\n{}",
                cluster.coordinators[0].log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let sample = cluster.coordinators[0]
        .pid()
        .and_then(|p| sys::sample(p, ctx.ticks).ok());
    let completed = count_state(grpc, SagaState::Completed, None).await?;
    let mut payment_most_in_flight = Vec::new();
    for (name, addr) in cluster.payment_metrics()? {
        let most = sys::gauge(addr, "participant_commands_in_flight_max").await;
        payment_most_in_flight.push((name, most));
    }
    cluster.stop();
    ensure!(
        completed == k,
        "recovery: {completed} of {k} sagas COMPLETED after the restart"
    );
    Ok(RecoveryReport {
        k,
        signal: args.recovery_signal,
        in_flight_at_stop,
        placed_in,
        stop_took,
        to_grpc: to_grpc.unwrap_or(to_all_terminal),
        to_all_terminal,
        completed,
        coordinator_cpu_s: sample.map(|s| s.cpu_s),
        coordinator_peak_rss_kib: sample.map(|s| s.hwm_kib),
        rss_idle_kib,
        rss_half_kib,
        rss_in_flight_kib,
        payment_most_in_flight,
    })
}

/// The soak scenario's figures.
#[derive(Debug, Clone)]
pub(crate) struct SoakReport {
    pub(crate) duration: Duration,
    pub(crate) rate: f64,
    pub(crate) tally: Tally,
    pub(crate) elapsed: Duration,
    /// `(seconds since start, coordinator RSS KiB)`, one a second.
    pub(crate) rss: Vec<(f64, u64)>,
    pub(crate) procs: Vec<ProcFigures>,
}

impl SoakReport {
    pub(crate) fn rss_start(&self) -> Option<u64> {
        self.rss.first().map(|s| s.1)
    }
    pub(crate) fn rss_end(&self) -> Option<u64> {
        self.rss.last().map(|s| s.1)
    }
    pub(crate) fn rss_max(&self) -> Option<u64> {
        self.rss.iter().map(|s| s.1).max()
    }
}

/// Soak: orders at `--rate` per second for `--soak`, the coordinator's RSS
/// sampled every second.
///
/// # Errors
/// The cluster did not start, or a process died.
pub(crate) async fn soak(ctx: &Ctx<'_>, duration: Duration) -> Result<SoakReport> {
    let args = ctx.args;
    let mut cluster = ctx.cluster("soak", args.gateway_latency, "5s").await?;
    let grpc = ctx.grpc(cluster.as_ref())?;
    let probes = Probes::new(ctx.nats, cluster.as_ref(), ctx.ticks);
    let coordinator = cluster
        .as_ref()
        .and_then(|c| c.coordinators.first())
        .and_then(|c| c.pid());
    let driver = Driver::connect(&grpc, 4, args.follow, args.order_timeout).await?;
    let total = (args.rate * duration.as_secs_f64()).round() as u64;
    phase(&format!(
        "soak: {:.0} orders/s for {duration:?} ({total} orders)",
        args.rate
    ));
    let b = bar(total, "soak".into());
    let mut rss = Vec::new();
    let before = probes.snapshot();
    let (tally, elapsed) = Open {
        driver: &driver,
        mix: ctx.mix(),
        seed: ctx.seed,
        tag: "soak".into(),
        rate: args.rate,
        duration,
        max_in_flight: 20_000,
    }
    .run(&b, |t| {
        if let Some(s) = coordinator.and_then(|p| sys::sample(p, ctx.ticks).ok()) {
            rss.push((t.as_secs_f64(), s.rss_kib));
        }
    })
    .await?;
    let after = probes.snapshot();
    b.finish_and_clear();
    if let Some(c) = cluster.as_mut() {
        c.check_alive()?;
        c.stop();
    }
    Ok(SoakReport {
        duration,
        rate: args.rate,
        tally,
        elapsed,
        rss,
        procs: Probes::figures(&before, &after, elapsed),
    })
}

/// The stored scenario's figures.
#[derive(Debug, Clone)]
pub(crate) struct StoredReport {
    pub(crate) n: usize,
    pub(crate) fill: Tally,
    pub(crate) fill_time: Duration,
    pub(crate) get: Histogram<u64>,
    pub(crate) list: Histogram<u64>,
    pub(crate) page_size: u32,
    pub(crate) coordinator_rss_kib: Option<u64>,
    pub(crate) store_bytes: Option<u64>,
    /// How long after the fill the coordinators' events outbox took to
    /// empty (reads are timed after it: a store at rest), when measured.
    pub(crate) events_drained: Option<Duration>,
    /// How long `sync` took to write the fill's dirty pages out, when it ran.
    pub(crate) synced: Option<Duration>,
    /// Each console page's latency and CPU at this many stored sagas.
    pub(crate) console: Vec<crate::console::PageCost>,
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Stored: fills a fresh store with N completed sagas (through the real
/// system, `--stored-concurrency` in flight), lets it come to rest (events
/// published, dirty pages written), then times GetSaga over random ids and
/// a walk through ListSagas pages by state.
///
/// # Errors
/// The cluster did not start, a fill order failed, or a read failed.
pub(crate) async fn stored(ctx: &Ctx<'_>) -> Result<StoredReport> {
    let args = ctx.args;
    let n = args.stored;
    let mut cluster = ctx.cluster("stored", args.gateway_latency, "5s").await?;
    let grpc = ctx.grpc(cluster.as_ref())?;
    let c = args.stored_concurrency.max(1);
    let driver = Driver::connect(
        &grpc,
        args.connections_for(c.div_ceil(grpc.len())),
        args.follow,
        args.order_timeout,
    )
    .await?;
    phase(&format!("stored: filling the store with {n} sagas (C={c})"));
    let b = bar(n as u64, "stored fill".into());
    let (fill, fill_time) = Closed {
        driver: &driver,
        mix: Mix::all_complete(args.customer_limit_cents),
        seed: ctx.seed,
        tag: "stored".into(),
        orders: n,
        concurrency: c,
        max_time: Duration::from_secs(24 * 3600),
        keep_ids: true,
    }
    .run(&b)
    .await?;
    b.finish_and_clear();
    ensure!(
        fill.mismatches == 0,
        "stored: {} fill orders did not complete: {:?}",
        fill.mismatches,
        fill.examples
    );
    let events_drained = events_drained(&ctx.metrics(cluster.as_ref())).await;
    let synced = settle().await;
    phase(&format!(
        "stored: {} GetSaga over random ids, {} ListSagas pages of {}",
        args.stored_samples, args.stored_pages, args.page_size
    ));
    let reads::Timed { get, list } = reads::run(reads::Plan {
        addr: grpc[0],
        ids: fill.ids.clone(),
        seed: ctx.seed,
        samples: args.stored_samples,
        pages: args.stored_pages,
        page_size: args.page_size,
    })
    .await?;
    let pid = cluster
        .as_ref()
        .and_then(|c| c.coordinators.first())
        .and_then(|c| c.pid());
    let console = match (cluster.as_ref().and_then(|c| c.http.first()), fill.ids.last()) {
        (Some(http), Some(id)) if args.stored_console_pages > 0 => {
            phase(&format!(
                "stored: each console page {} times",
                args.stored_console_pages
            ));
            // c-17: one of the mix's thousand customers (`drive`).
            let n = args.stored_console_pages;
            crate::console::page_costs(*http, pid, ctx.ticks, id, "c-17", n).await?
        }
        _ => Vec::new(),
    };
    let coordinator_rss_kib = pid
        .and_then(|p| sys::sample(p, ctx.ticks).ok())
        .map(|s| s.rss_kib);
    let store_bytes = cluster
        .as_ref()
        .map(|_| dir_size(&ctx.dir.join("stored").join("coordinator")));
    if let Some(c) = cluster.as_mut() {
        c.check_alive()?;
        c.stop();
    }
    Ok(StoredReport {
        n,
        fill,
        fill_time,
        get,
        list,
        page_size: args.page_size,
        coordinator_rss_kib,
        store_bytes,
        events_drained,
        synced,
        console,
    })
}

/// Writes the host's dirty pages out (`sync`), so that the kernel's
/// writeback of what the fill left does not run during the reads, on the
/// same two cores. How long it took, or `None` when `sync` could not run.
async fn settle() -> Option<Duration> {
    phase("stored: writing the fill's dirty pages out (sync)");
    let start = Instant::now();
    let status = tokio::task::spawn_blocking(|| std::process::Command::new("sync").status())
        .await
        .ok()?
        .ok()?;
    status.success().then(|| start.elapsed())
}

/// Waits until every coordinator's events outbox is empty (the fill's
/// events published to JetStream): reads timed while they drain measure the
/// publisher as much as the read path. How long that took, or `None` when a
/// `/metrics` does not answer (a --target without --metrics-addr) or it has
/// not emptied within 30 minutes.
async fn events_drained(metrics: &[SocketAddr]) -> Option<Duration> {
    const NAME: &str = "saga_events_backlog";
    if metrics.is_empty() {
        return None;
    }
    phase("stored: waiting for the fill's events to be published");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30 * 60) {
        let mut backlog = 0.0;
        for m in metrics {
            backlog += sys::gauge(*m, NAME).await?;
        }
        if backlog == 0.0 {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}
