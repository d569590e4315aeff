//! `saga-bench`: the engine's benchmark harness, run by `make bench`
//! (docs/benchmarks.md has its figures).
//!
//! By default it starts nats-server and the release binaries of the
//! inventory, payment and coordinator (next to this executable, or
//! `--bin-dir`) as separate processes on loopback with data in a temp dir,
//! measures the NATS and sled floors, sweeps `--concurrency` with a mix of
//! orders that complete, are declined or run out of stock (each followed to
//! its terminal state with `WatchSaga`), then a short recovery run. It
//! prints tables and writes JSON (`--json-out`); the exit code is non-zero
//! when a saga did not reach its expected state or a scenario failed.
//! `--store jetstream --coordinators N` runs against the jetstream store
//! (on a 3-node NATS cluster by default); `--compare-stores` sweeps sled,
//! jetstream with one coordinator and jetstream with three in one go and
//! prints them side by side. `saga-bench --help` lists every flag.

//!
//! The modules:
//! - `cli`: the flags;
//! - `sys`: the processes (the test kit's), their CPU and memory from `/proc`, `/metrics` scrapes;
//! - `drive`: order generation, driving N orders with C in flight, following each to its end;
//! - `floors`: the NATS and sled floors;
//! - `scenarios`: the sweep, recovery, soak and stored-store scenarios;
//! - `report`: the tables and the JSON.
//!
//! Nothing here is part of the engine: it only talks to it the way a client
//! and an operator would (gRPC, `/metrics`, signals).

mod cli;
mod console;
mod drive;
mod floors;
mod reads;
mod report;
mod scenarios;
mod sys;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context, Result};
use clap::Parser;

use crate::{
    cli::{Args, Setup},
    report::Report,
    scenarios::{phase, Ctx, Sweep},
    sys::Nats,
};

fn main() -> ExitCode {
    let args = match Args::parse().finish() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("saga-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("saga-bench: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("saga-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A single nats-server (`nodes` = 1) or a cluster, in `dir`.
///
/// # Errors
/// It did not start.
fn start_nats(dir: &Path, nodes: usize) -> Result<Nats> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if nodes <= 1 {
        phase("starting nats-server");
        Nats::start(dir)
    } else {
        phase(&format!("starting a NATS cluster of {nodes} nodes"));
        Nats::cluster(dir, nodes)
    }
}

/// The sweep of every configuration in `setups`, in order: those on the
/// NATS of `ctx` (same number of nodes) on it, the others on one more NATS
/// started for them (shared by those of the same size, stopped at the end).
async fn sweeps(ctx: &Ctx<'_>, setups: &[Setup]) -> Vec<Sweep> {
    let mut out = Vec::with_capacity(setups.len());
    let mut extra: Option<(usize, Nats, async_nats::Client)> = None;
    for &setup in setups {
        if ctx.args.target.is_some() || setup.nats_nodes == ctx.setup.nats_nodes {
            out.push(scenarios::sweep(&Ctx { setup, ..ctx.clone() }).await);
            continue;
        }
        if extra.as_ref().is_none_or(|(n, _, _)| *n != setup.nats_nodes) {
            drop(extra.take());
            let dir = ctx.dir.join(format!("nats-{}-nodes", setup.nats_nodes));
            let started = async {
                let mut nats = start_nats(&dir, setup.nats_nodes)?;
                let client = nats.jetstream_ready().await?;
                anyhow::Ok((setup.nats_nodes, nats, client))
            };
            match started.await {
                Ok(e) => extra = Some(e),
                Err(e) => {
                    out.push(Sweep {
                        setup,
                        runs: Vec::new(),
                        error: Some(format!("{e:#}")),
                    });
                    continue;
                }
            }
        }
        if let Some((_, nats, client)) = &extra {
            let on = Ctx {
                setup,
                nats: Some(nats),
                nats_url: nats.url.clone(),
                nats_client: client.clone(),
                ..ctx.clone()
            };
            out.push(scenarios::sweep(&on).await);
        }
    }
    out
}

/// What failed in a sweep: its error and its runs with mismatches (named
/// by configuration when there are `several`).
fn sweep_failures(w: &Sweep, several: bool) -> Vec<String> {
    let on = if several {
        format!(" ({})", w.setup.label())
    } else {
        String::new()
    };
    let mut out: Vec<String> = w
        .runs
        .iter()
        .filter(|r| r.tally.mismatches > 0)
        .map(|r| {
            format!(
                "C={}{on}: {} of {} sagas did not reach their expected state, e.g. {:?}",
                r.concurrency, r.tally.mismatches, r.tally.placed, r.tally.examples
            )
        })
        .collect();
    if let Some(e) = &w.error {
        out.push(format!("sweep{on}: {e}"));
    }
    out
}

/// The whole run; `Ok(false)` when a saga or a scenario failed.
async fn run(args: Args) -> Result<bool> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7)
    });
    let dir = tempfile::Builder::new()
        .prefix("saga-bench-")
        .tempdir()
        .context("creating the temp dir")?;
    phase(&format!("seed {seed}; data and logs in {}", dir.path().display()));
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .context("locating the directory of saga-bench")?,
    };
    let setup = args.setup();
    let mut nats = match args.target {
        Some(_) => None,
        None => Some(start_nats(dir.path(), setup.nats_nodes)?),
    };
    let nats_url = match (&nats, &args.nats_url) {
        (Some(n), _) => n.url.clone(),
        (None, Some(u)) => u.clone(),
        (None, None) => anyhow::bail!("--target needs --nats-url"),
    };
    let nats_client = match nats.as_mut() {
        Some(n) => n.jetstream_ready().await?,
        None => sys::client(None, &nats_url).await?,
    };
    let ticks = sys::clock_ticks();
    let mut report = Report {
        seed,
        clock_ticks: ticks,
        nats: None,
        sled: None,
        setup: args.target.is_none().then_some(setup),
        participant_store: args.participant_store,
        runs: Vec::new(),
        stores: Vec::new(),
        recovery: None,
        soak: None,
        stored: None,
        failures: Vec::new(),
        total: Default::default(),
        otlp_spans: None,
    };

    if !args.no_floors {
        phase(&format!(
            "floor: NATS request-reply ({} sequential, then {:?} per concurrency)",
            args.floor_round_trips, args.floor_time
        ));
        report.nats = Some(
            floors::nats(
                sys::client(nats.as_ref(), sys::first_url(&nats_url)).await?,
                sys::client(nats.as_ref(), sys::first_url(&nats_url)).await?,
                args.floor_round_trips,
                &args.concurrency,
                args.floor_time,
            )
            .await?,
        );
        phase(&format!(
            "floor: sled ({} flushed writes, {} batches of 100)",
            args.sled_writes, args.sled_batches
        ));
        let sled_dir = dir.path().join("sled-floor");
        let (w, b) = (args.sled_writes, args.sled_batches);
        report.sled = Some(tokio::task::spawn_blocking(move || floors::sled(&sled_dir, w, b)).await??);
    }

    // `--otlp`: every process exports to a receiver here, for the whole run.
    let receiver = match args.otlp {
        true => Some(saga_testkit::otlp::Receiver::start().await?),
        false => None,
    };
    let env: Vec<(String, String)> = receiver
        .as_ref()
        .map(|r| {
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), r.grpc_endpoint()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()),
            ]
        })
        .unwrap_or_default();
    let ctx = Ctx {
        env: &env,
        args: &args,
        setup,
        seed,
        ticks,
        dir: dir.path(),
        bin_dir,
        nats: nats.as_ref(),
        nats_url: nats_url.clone(),
        nats_client,
    };
    if !args.no_sweep {
        let sweeps = sweeps(&ctx, &args.setups()).await;
        let several = sweeps.len() > 1;
        for w in &sweeps {
            report.failures.extend(sweep_failures(w, several));
        }
        if let Some(first) = sweeps.first() {
            report.runs = first.runs.clone();
        }
        if several {
            report.stores = sweeps;
        }
    }
    if args.recovery > 0 {
        match scenarios::recovery(&ctx).await {
            Ok(r) => report.recovery = Some(r),
            Err(e) => report.failures.push(format!("recovery: {e:#}")),
        }
    }
    if let Some(d) = args.soak {
        match scenarios::soak(&ctx, d).await {
            Ok(s) => {
                if s.tally.mismatches > 0 {
                    report.failures.push(format!(
                        "soak: {} sagas did not reach their expected state, e.g. {:?}",
                        s.tally.mismatches, s.tally.examples
                    ));
                }
                report.soak = Some(s);
            }
            Err(e) => report.failures.push(format!("soak: {e:#}")),
        }
    }
    if args.stored > 0 {
        match scenarios::stored(&ctx).await {
            Ok(s) => report.stored = Some(s),
            Err(e) => report.failures.push(format!("stored: {e:#}")),
        }
    }
    drop(ctx);
    report.otlp_spans = receiver.as_ref().map(saga_testkit::otlp::Receiver::count);

    report.total = started.elapsed();
    report.print();
    let json = report.json(&args);
    if let Some(parent) = args.json_out.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&args.json_out, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", args.json_out.display()))?;
    println!("JSON: {}", args.json_out.display());
    drop(nats);
    if args.keep_data || !report.ok() {
        let kept = dir.keep();
        eprintln!("saga-bench: data and logs kept in {}", kept.display());
    }
    Ok(report.ok())
}
