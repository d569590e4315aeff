//! The command line of `saga-bench`: every knob is a flag; `--smoke` shrinks
//! everything to a run of a few seconds (used by a test so the harness
//! cannot rot).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};

/// How each order is followed to its terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Follow {
    /// The `WatchSaga` server stream (GetSaga polling if the stream fails).
    Watch,
    /// `GetSaga` polling only.
    Poll,
}

/// Where the started coordinators keep their sagas (their `--store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Store {
    /// Embedded sled, one coordinator.
    Sled,
    /// Replicated JetStream KV buckets, partitions shared by lease among the coordinators.
    Jetstream,
}

impl Store {
    /// Its name on the command line and in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Store::Sled => "sled",
            Store::Jetstream => "jetstream",
        }
    }
}

/// One system configuration the sweep runs against: the store, the NATS
/// servers and the coordinators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Setup {
    pub(crate) store: Store,
    /// nats-server processes (1: a single server; more: a cluster).
    pub(crate) nats_nodes: usize,
    /// Coordinator processes (more than one only with jetstream).
    pub(crate) coordinators: usize,
    /// jetstream: partitions (the coordinators' `--partitions`).
    pub(crate) partitions: u32,
    /// jetstream: lease TTL (the coordinators' `--lease-ttl`).
    pub(crate) lease_ttl: Duration,
}

impl Setup {
    /// Replicas of the KV buckets and the events stream: one per NATS node, at most 3.
    pub(crate) fn replicas(&self) -> usize {
        self.nats_nodes.clamp(1, 3)
    }

    /// A short name for tags, directories and instance ids, e.g. `jetstream-n3-c3`.
    pub(crate) fn slug(&self) -> String {
        format!(
            "{}-n{}-c{}",
            self.store.name(),
            self.nats_nodes,
            self.coordinators
        )
    }

    /// A label for tables, e.g. `jetstream R3, 3 NATS nodes, 3 coordinators`.
    pub(crate) fn label(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let store = match self.store {
            Store::Sled => "sled".to_string(),
            Store::Jetstream => format!("jetstream R{}", self.replicas()),
        };
        format!(
            "{store}, {}, {}",
            plural(self.nats_nodes, "NATS node"),
            plural(self.coordinators, "coordinator")
        )
    }
}

/// How the coordinator is stopped in the recovery scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StopSignal {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a graceful stop (SIGKILL after 10 s).
    Term,
}

/// Benchmark harness for the saga engine: drives orders over gRPC against
/// real processes and reports throughput, latency, CPU and memory next to
/// the NATS and sled floors measured in the same run.
#[derive(Debug, Clone, Parser)]
#[command(name = "saga-bench", version)]
pub(crate) struct Args {
    /// Drive a running coordinator at this gRPC address instead of starting
    /// processes (needs --nats-url; CPU/RSS figures and --recovery are then
    /// unavailable). Its inventory must stock A-1, B-2 and C-3 plentifully and
    /// RARE-1 below 1000; its payment's customer limit must match
    /// --customer-limit-cents.
    #[arg(long, value_name = "GRPC_ADDR", requires = "nats_url")]
    pub(crate) target: Option<SocketAddr>,
    /// NATS server of the running system (with --target); the NATS floor is
    /// measured against it.
    #[arg(long, value_name = "URL")]
    pub(crate) nats_url: Option<String>,
    /// The running coordinator's HTTP address (`/metrics`), with --target.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// Where the coordinator, inventory and payment binaries are (default:
    /// the directory of this executable).
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
    /// Where the started coordinators keep their sagas.
    #[arg(long, value_enum, default_value = "sled", conflicts_with = "target")]
    pub(crate) store: Store,
    /// Coordinators started (more than one needs --store jetstream); orders
    /// are spread round-robin over them and each is followed on the one
    /// that created it.
    #[arg(long, default_value_t = 1, conflicts_with = "target")]
    pub(crate) coordinators: usize,
    /// Where the started inventory and payment services keep their state
    /// and stored replies (their `--store`).
    #[arg(long, value_enum, default_value = "sled", conflicts_with = "target")]
    pub(crate) participant_store: Store,
    /// Replicas of each participant in its queue group (more than one needs
    /// --participant-store jetstream).
    #[arg(long, default_value_t = 1, conflicts_with = "target")]
    pub(crate) participant_replicas: usize,
    /// nats-server processes: 1 is a single server, 3 a cluster (default:
    /// 3 with --store jetstream, else 1). The jetstream store replicates its
    /// buckets on min(nodes, 3) of them.
    #[arg(long, value_name = "N", conflicts_with = "target")]
    pub(crate) nats_nodes: Option<usize>,
    /// jetstream store: partitions (the coordinators' --partitions).
    #[arg(long, default_value_t = 12)]
    pub(crate) partitions: u32,
    /// jetstream store: lease TTL (the coordinators' --lease-ttl).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) lease_ttl: Duration,
    /// Run the sweep three times and compare: sled with a single
    /// nats-server and one coordinator; jetstream on a NATS cluster of
    /// --nats-nodes (default 3) with one coordinator; the same cluster
    /// with three coordinators. The other scenarios run on the first.
    #[arg(long, conflicts_with_all = ["target", "store", "coordinators"])]
    pub(crate) compare_stores: bool,
    /// Orders per run of the sweep (a run also ends at --max-run-time).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) orders: usize,
    /// Orders in flight; a comma list is a sweep, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub(crate) concurrency: Vec<usize>,
    /// A run stops placing orders after this long and reports what it did.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) max_run_time: Duration,
    /// Orders placed (at C=16) before the sweep, not measured.
    #[arg(long, default_value_t = 500)]
    pub(crate) warmup: usize,
    /// Share of orders above the payment's customer limit (→ COMPENSATED).
    #[arg(long, default_value_t = 0.05)]
    pub(crate) declined_share: f64,
    /// Share of orders with an item of a SKU that has (almost) no stock (→ COMPENSATED).
    #[arg(long, default_value_t = 0.05)]
    pub(crate) out_of_stock_share: f64,
    /// The payment's simulated gateway latency (its --gateway-latency).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub(crate) gateway_latency: Duration,
    /// Orders above this amount are declined (the payment's --customer-limit-cents).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) customer_limit_cents: i64,
    /// How each order is followed to its terminal state.
    #[arg(long, value_enum, default_value = "watch")]
    pub(crate) follow: Follow,
    /// gRPC connections (HTTP/2) the orders are spread over; 0 = one per 64 in flight.
    #[arg(long, default_value_t = 0)]
    pub(crate) connections: usize,
    /// An order not terminal after this long counts as a mismatch.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) order_timeout: Duration,
    /// Recovery scenario: K sagas in flight (against a slow payment gateway)
    /// when the coordinator is stopped; 0 = skip.
    #[arg(long, default_value_t = 1000, value_name = "K")]
    pub(crate) recovery: usize,
    /// How the coordinator is stopped in the recovery scenario.
    #[arg(long, value_enum, default_value = "kill")]
    pub(crate) recovery_signal: StopSignal,
    /// Soak scenario: a steady --rate for this long, coordinator RSS sampled every second.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) soak: Option<Duration>,
    /// Orders per second in the soak scenario.
    #[arg(long, default_value_t = 500.0)]
    pub(crate) rate: f64,
    /// Stored scenario: fill a fresh store with N terminal sagas, then time
    /// GetSaga and ListSagas; 0 = skip.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub(crate) stored: usize,
    /// Orders in flight while the store is filled.
    #[arg(long, default_value_t = 256)]
    pub(crate) stored_concurrency: usize,
    /// GetSaga calls over random stored ids.
    #[arg(long, default_value_t = 2000)]
    pub(crate) stored_samples: usize,
    /// ListSagas pages walked (by state COMPLETED).
    #[arg(long, default_value_t = 200)]
    pub(crate) stored_pages: usize,
    /// ListSagas page size in the stored scenario.
    #[arg(long, default_value_t = 100)]
    pub(crate) page_size: u32,
    /// Skip the sweep (to run only the scenarios).
    #[arg(long)]
    pub(crate) no_sweep: bool,
    /// Skip the floors.
    #[arg(long)]
    pub(crate) no_floors: bool,
    /// Export every process's spans over OTLP/gRPC to a receiver inside the
    /// harness (what tracing costs; the receiver keeps the spans and counts them).
    #[arg(long, conflicts_with = "target")]
    pub(crate) otlp: bool,
    /// Keep a console sagas list open during each sweep run (the page, then
    /// its rows every 2 s, as in a browser tab) and report what it fetched.
    #[arg(long, conflicts_with = "target")]
    pub(crate) console_tab: bool,
    /// Fetches of each console page timed in the stored scenario (0: none).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub(crate) stored_console_pages: usize,
    /// Duration of each NATS throughput floor measurement (one per concurrency).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) floor_time: Duration,
    /// Sequential NATS round trips of the latency floor.
    #[arg(long, default_value_t = 3000)]
    pub(crate) floor_round_trips: usize,
    /// sled inserts, each flushed, of the per-write floor.
    #[arg(long, default_value_t = 2000)]
    pub(crate) sled_writes: usize,
    /// Batches of 100 inserts sharing a flush, of the batched floor.
    #[arg(long, default_value_t = 300)]
    pub(crate) sled_batches: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/saga-bench.json")]
    pub(crate) json_out: PathBuf,
    /// A tiny run of every part (a few seconds), for the smoke test.
    #[arg(long)]
    pub(crate) smoke: bool,
    /// Seed of the order mix (default: from the clock; printed).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// RUST_LOG of the started processes (their logs go to files in the data dir).
    #[arg(long, default_value = "warn")]
    pub(crate) log_level: String,
    /// An extra argument for the started coordinator (repeatable), e.g.
    /// `--coordinator-arg=--no-events`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) coordinator_arg: Vec<String>,
    /// Keep the temp dir with the processes' data and logs.
    #[arg(long)]
    pub(crate) keep_data: bool,
}

impl Args {
    /// `--smoke` shrinks every part; then the checks.
    ///
    /// # Errors
    /// Contradictory or out-of-range flags.
    pub(crate) fn finish(mut self) -> Result<Self> {
        if self.smoke {
            self.orders = 20;
            self.concurrency = vec![4];
            self.warmup = 4;
            self.max_run_time = Duration::from_secs(60);
            self.floor_time = Duration::from_millis(200);
            self.floor_round_trips = 100;
            self.sled_writes = 50;
            self.sled_batches = 5;
            if self.target.is_none() {
                self.recovery = 5;
            }
            self.soak = Some(Duration::from_secs(2));
            self.rate = 20.0;
            self.stored = 30;
            self.stored_concurrency = 8;
            self.stored_samples = 20;
            self.stored_pages = 3;
            self.stored_console_pages = 3;
            self.page_size = 10;
        }
        if self.coordinators == 0 {
            bail!("--coordinators must be at least 1");
        }
        if self.coordinators > 1 && self.store == Store::Sled {
            bail!("--coordinators above 1 needs --store jetstream (sled serves one coordinator)");
        }
        if !(1..=9).contains(&self.participant_replicas) {
            bail!("--participant-replicas must be 1 to 9");
        }
        if self.participant_replicas > 1 && self.participant_store == Store::Sled {
            bail!("--participant-replicas above 1 needs --participant-store jetstream (a sled participant is one process)");
        }
        if self.nats_nodes.is_some_and(|n| !(1..=5).contains(&n)) {
            bail!("--nats-nodes must be 1 to 5");
        }
        if !(1..=4096).contains(&self.partitions) {
            bail!("--partitions must be 1 to 4096");
        }
        if self.lease_ttl < Duration::from_millis(200) {
            bail!("--lease-ttl must be at least 200ms");
        }
        if let Some(s) = self
            .setups()
            .iter()
            .find(|s| s.coordinators > s.partitions as usize)
        {
            bail!(
                "{} coordinators need at least as many --partitions (not {})",
                s.coordinators,
                s.partitions
            );
        }
        if self.setup().coordinators > 1 && self.recovery > 0 {
            // It kills the coordinator and waits on it; with several, the others take over.
            self.recovery = 0;
            eprintln!("saga-bench: several coordinators: the recovery scenario is skipped");
        }
        if self.target.is_some() && self.recovery > 0 {
            // The recovery scenario stops and restarts the coordinator: only ours.
            self.recovery = 0;
            eprintln!("saga-bench: --target: the recovery scenario is skipped (it restarts the coordinator)");
        }
        let shares = self.declined_share + self.out_of_stock_share;
        if !(0.0..=1.0).contains(&self.declined_share)
            || !(0.0..=1.0).contains(&self.out_of_stock_share)
            || shares > 1.0
        {
            bail!("--declined-share and --out-of-stock-share must be in 0..=1 and add up to at most 1");
        }
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            bail!("--concurrency needs values ≥ 1");
        }
        if self.customer_limit_cents < 200 {
            bail!("--customer-limit-cents must be at least 200");
        }
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            bail!("--rate must be positive");
        }
        if self.page_size == 0 || self.page_size > 1000 {
            bail!("--page-size must be in 1..=1000");
        }
        Ok(self)
    }

    /// The configuration of `--store`, `--coordinators` and `--nats-nodes`
    /// (with --compare-stores: its first, sled): the recovery, soak and
    /// stored scenarios run on it, and the floors on its NATS.
    pub(crate) fn setup(&self) -> Setup {
        self.setups()[0]
    }

    /// The configurations the sweep runs against, in order: one, or the
    /// three of --compare-stores. `--smoke` with the default sled store adds
    /// a jetstream run on the same single nats-server with two coordinators
    /// (few partitions, short leases), so that path cannot rot either.
    pub(crate) fn setups(&self) -> Vec<Setup> {
        let nodes = self.nats_nodes.unwrap_or(match self.store {
            Store::Sled if !self.compare_stores => 1,
            _ => 3,
        });
        let base = Setup {
            store: self.store,
            nats_nodes: nodes,
            coordinators: self.coordinators,
            partitions: self.partitions,
            lease_ttl: self.lease_ttl,
        };
        if self.compare_stores {
            let sled = Setup {
                store: Store::Sled,
                nats_nodes: 1,
                coordinators: 1,
                ..base
            };
            let js = |coordinators| Setup {
                store: Store::Jetstream,
                coordinators,
                ..base
            };
            return vec![sled, js(1), js(3)];
        }
        if self.smoke && self.store == Store::Sled && self.target.is_none() {
            let js = Setup {
                store: Store::Jetstream,
                coordinators: 2,
                partitions: 4,
                lease_ttl: Duration::from_secs(1),
                ..base
            };
            return vec![base, js];
        }
        vec![base]
    }

    /// gRPC connections for `concurrency` orders in flight.
    pub(crate) fn connections_for(&self, concurrency: usize) -> usize {
        if self.connections > 0 {
            self.connections
        } else {
            concurrency.div_ceil(64).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Result<Args> {
        let argv = std::iter::once("saga-bench").chain(flags.iter().copied());
        Args::try_parse_from(argv)?.finish()
    }

    #[test]
    fn compare_stores_runs_sled_then_jetstream_with_one_and_three_coordinators() -> Result<()> {
        let a = args(&["--compare-stores"])?;
        let got: Vec<(Store, usize, usize)> = a
            .setups()
            .iter()
            .map(|s| (s.store, s.nats_nodes, s.coordinators))
            .collect();
        assert_eq!(
            got,
            [
                (Store::Sled, 1, 1),
                (Store::Jetstream, 3, 1),
                (Store::Jetstream, 3, 3)
            ]
        );
        assert_eq!(a.setup().store, Store::Sled);
        assert!(args(&["--compare-stores", "--store", "jetstream"]).is_err());
        Ok(())
    }

    #[test]
    fn jetstream_defaults_to_a_three_node_cluster_and_sled_to_one_coordinator() -> Result<()> {
        let a = args(&["--store", "jetstream", "--coordinators", "3"])?;
        assert_eq!(a.setups().len(), 1);
        assert_eq!((a.setup().nats_nodes, a.setup().replicas()), (3, 3));
        assert_eq!(a.recovery, 0, "recovery needs a single coordinator");
        assert_eq!(
            args(&["--store", "jetstream", "--nats-nodes", "1"])?
                .setup()
                .replicas(),
            1
        );
        assert!(args(&["--coordinators", "2"]).is_err());
        assert!(args(&["--store", "jetstream", "--coordinators", "4", "--partitions", "3"]).is_err());
        Ok(())
    }

    #[test]
    fn smoke_adds_a_small_jetstream_run_on_the_same_nats() -> Result<()> {
        let s = args(&["--smoke"])?.setups();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].store, s[0].nats_nodes), (Store::Sled, 1));
        assert_eq!(
            (s[1].store, s[1].nats_nodes, s[1].coordinators),
            (Store::Jetstream, 1, 2)
        );
        Ok(())
    }
}
