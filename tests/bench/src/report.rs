//! The report: tables on stdout (comfy-table) and the same figures as JSON,
//! with the engine's figures as ratios to the floors and the issue's
//! targets checked where a scenario measured them.

use std::time::Duration;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::{json, Value};

use super::{
    cli::{Args, Setup, Store},
    drive::{max_ms, ms, Tally},
    floors::{NatsFloor, SledFloor},
    scenarios::{ProcFigures, RecoveryReport, RunReport, SoakReport, StoredReport, Sweep},
};

/// Steps of a completed saga of the mix: reserve at inventory, then charge
/// at payment.
const CHAIN_STEPS: u32 = 2;
/// Coordinator flushes on a completed saga's path: the create+start
/// transition is durable before the first command is sent, and the
/// transition after each step's reply is durable before the next command
/// is sent (after the last reply, the terminal transition, before the
/// client sees COMPLETED): one plus one per step.
const CHAIN_COORDINATOR_FLUSHES: u32 = 1 + CHAIN_STEPS;
/// Each participant flushes its effect and its stored reply before
/// replying: one per step.
const CHAIN_PARTICIPANT_FLUSHES: u32 = CHAIN_STEPS;
/// One NATS request-reply per step: the command out, its reply back.
const CHAIN_ROUND_TRIPS: u32 = CHAIN_STEPS;

/// The floor chain: the floors a completed saga cannot avoid at C=1, in
/// sequence on its critical path (its sled flushes and its NATS round
/// trips), each at the floor's p50 measured in the same run.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FloorChain {
    flushes: u32,
    round_trips: u32,
    /// A flushed sled write, p50 µs.
    flush_us: f64,
    /// A sequential NATS round trip, p50 µs.
    round_trip_us: f64,
}

impl FloorChain {
    /// The chain of a completed two-step saga at these floors.
    fn of(flush_us: f64, round_trip_us: f64) -> Self {
        FloorChain {
            flushes: CHAIN_COORDINATOR_FLUSHES + CHAIN_PARTICIPANT_FLUSHES,
            round_trips: CHAIN_ROUND_TRIPS,
            flush_us,
            round_trip_us,
        }
    }

    /// Its sum, µs.
    fn us(&self) -> f64 {
        f64::from(self.flushes) * self.flush_us + f64::from(self.round_trips) * self.round_trip_us
    }

    /// `p50_us` as a multiple of the chain.
    fn ratio(&self, p50_us: f64) -> f64 {
        p50_us / self.us().max(1.0)
    }
}

/// The floor chain and the C=1 p50 (`c1_p50_us`, µs) as a multiple of it,
/// when the chain applies: both floors measured, the coordinator and the
/// participants on sled (`on_sled`: the chain counts sled flushes, which a
/// jetstream store does not make) and a C=1 run with sagas.
fn floor_chain(
    nats: Option<&NatsFloor>,
    sled: Option<&SledFloor>,
    on_sled: bool,
    c1_p50_us: Option<f64>,
) -> Option<(FloorChain, f64)> {
    let chain = FloorChain::of(sled?.flush_p50_us, nats?.rtt_p50_us);
    let p50_us = c1_p50_us.filter(|_| on_sled)?;
    Some((chain, chain.ratio(p50_us)))
}

/// The p50 in µs of the C=1 run of `runs`, when it placed sagas.
fn c1_p50_us(runs: &[RunReport]) -> Option<f64> {
    runs.iter()
        .find(|r| r.concurrency == 1 && !r.tally.latency.is_empty())
        .map(|r| ms(&r.tally.latency, 0.5) * 1000.0)
}

/// Everything one invocation measured.
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) clock_ticks: f64,
    pub(crate) nats: Option<NatsFloor>,
    pub(crate) sled: Option<SledFloor>,
    /// The configuration of `runs` and the other scenarios (none with --target).
    pub(crate) setup: Option<Setup>,
    /// The started participants' store (their `--store`).
    pub(crate) participant_store: Store,
    /// The sweep of `setup`.
    pub(crate) runs: Vec<RunReport>,
    /// With several configurations (--compare-stores, --smoke): each one's
    /// sweep, the first being `runs`.
    pub(crate) stores: Vec<Sweep>,
    pub(crate) recovery: Option<RecoveryReport>,
    pub(crate) soak: Option<SoakReport>,
    pub(crate) stored: Option<StoredReport>,
    /// Scenarios that failed, mismatches, dead processes.
    pub(crate) failures: Vec<String>,
    pub(crate) total: Duration,
    /// `--otlp`: the spans the harness's receiver got, by service.
    pub(crate) otlp_spans: Option<std::collections::BTreeMap<String, usize>>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.iter().map(|h| (*h).to_string()).collect::<Vec<_>>());
    t
}

fn outcomes(t: &Tally) -> String {
    let mut parts: Vec<String> = t.states.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if t.errors > 0 {
        parts.push(format!("errors {}", t.errors));
    }
    parts.join(", ")
}

/// CPU seconds of the processes whose name starts with `prefix` (all the
/// coordinators, all the NATS nodes), when there are any.
fn cpu_of(r: &RunReport, prefix: &str) -> Option<f64> {
    let mut found = r.procs.iter().filter(|p| p.name.starts_with(prefix)).peekable();
    found.peek()?;
    Some(found.map(|p| p.cpu_s).sum())
}

/// CPU seconds per saga of a run, in µs.
fn per_saga_us(r: &RunReport, cpu_s: f64) -> f64 {
    cpu_s * 1e6 / (r.tally.placed.max(1) as f64)
}

fn not_found_note(t: &Tally) -> String {
    format!(
        "{} of {} sagas were NOT_FOUND by WatchSaga/GetSaga right after CreateOrder acknowledged \
         them (a stale read; read again, they reached their expected state)",
        t.not_found, t.placed
    )
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "n/a".into())
}

/// A target of issue 4 and whether this run met it.
struct Target {
    what: String,
    measured: String,
    met: bool,
}

impl Report {
    /// The floor chain of a sweep on `setup` (none with --target: its
    /// stores are unknown) and its C=1 p50 over it, when it applies.
    fn chain_of(&self, setup: Option<&Setup>, runs: &[RunReport]) -> Option<(FloorChain, f64)> {
        let on_sled = setup.is_some_and(|s| s.store == Store::Sled) && self.participant_store == Store::Sled;
        floor_chain(self.nats.as_ref(), self.sled.as_ref(), on_sled, c1_p50_us(runs))
    }

    /// The engine's figures over the floors, per run.
    fn ratios(&self, r: &RunReport) -> Value {
        let p50_us = ms(&r.tally.latency, 0.5) * 1000.0;
        let nats_rps = self.nats.as_ref().and_then(|n| n.at(r.concurrency));
        let flushes_per_s = r.flushes.map(|f| f / r.elapsed.as_secs_f64().max(1e-9));
        let per_saga = |cpu_s: f64| per_saga_us(r, cpu_s);
        // Every coordinator of the run.
        let coordinator_cpu = cpu_of(r, "coordinator");
        let engine_cpu: f64 = r
            .procs
            .iter()
            .filter(|p| p.name != "saga-bench")
            .map(|p| p.cpu_s)
            .sum();
        json!({
            "coordinator_cpu_us_per_saga": coordinator_cpu.map(per_saga),
            // nats-server, coordinator and participants together.
            "system_cpu_us_per_saga": (!r.procs.is_empty()).then(|| per_saga(engine_cpu)),
            "p50_over_nats_rtt": self.nats.as_ref().map(|n| p50_us / n.rtt_p50_us.max(1.0)),
            "sagas_per_s_over_nats_req_per_s": nats_rps.map(|n| r.sagas_per_s() / n),
            "sagas_per_s_over_sled_flushed_writes_per_s":
                self.sled.as_ref().map(|s| r.sagas_per_s() / s.per_write_per_s),
            "sagas_per_flush": r.sagas_per_flush(),
            "coordinator_writes_per_saga": r.per_saga(r.coordinator_writes),
            "participant_writes_per_saga": r.per_saga(r.participant_writes),
            "flushes_per_s": flushes_per_s,
            // Share of the run's wall time the flushes would take at the floor's flush cost.
            "flush_time_share": flushes_per_s
                .zip(self.sled.as_ref())
                .map(|(f, s)| f * s.flush_p50_us / 1e6),
        })
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let run = |c: usize| self.runs.iter().find(|r| r.concurrency == c);
        if let Some(r) = run(256) {
            t.push(Target {
                what: "≥ 5,000 completed sagas/s at C=256".into(),
                measured: format!("{:.0}/s", r.completed_per_s()),
                met: r.completed_per_s() >= 5000.0,
            });
        }
        if let Some(r) = run(64) {
            t.push(Target {
                what: "≥ 2,000 completed sagas/s at C=64".into(),
                measured: format!("{:.0}/s", r.completed_per_s()),
                met: r.completed_per_s() >= 2000.0,
            });
            t.push(Target {
                what: "p99 ≤ 25 ms at C=64".into(),
                measured: format!("{:.2} ms", ms(&r.tally.latency, 0.99)),
                met: ms(&r.tally.latency, 0.99) <= 25.0,
            });
        }
        if let Some(r) = run(1) {
            t.push(Target {
                what: "p50 ≤ 2 ms at C=1".into(),
                measured: format!("{:.2} ms", ms(&r.tally.latency, 0.5)),
                met: ms(&r.tally.latency, 0.5) <= 2.0,
            });
        }
        if let Some(r) = &self.recovery {
            t.push(Target {
                what: format!(
                    "restart with {} in flight: all terminal ≤ 5 s (target: 10,000)",
                    r.k
                ),
                measured: format!("{:.2} s", r.to_all_terminal.as_secs_f64()),
                met: r.to_all_terminal <= Duration::from_secs(5),
            });
            // Only a large K says something per saga: at 1,000 the runtime's and
            // sled's fixed start-up growth dominates.
            if let Some(b) = r.rss_bytes_per_saga().filter(|_| r.k >= 10_000) {
                t.push(Target {
                    what: format!(
                        "{} in flight: coordinator RSS growth ≤ 1 KiB per saga (target: 100,000)",
                        r.k
                    ),
                    measured: format!("{b:.0} B"),
                    met: b <= 1024.0,
                });
            }
            if let Some(b) = r.rss_marginal_bytes_per_saga().filter(|_| r.k >= 10_000) {
                t.push(Target {
                    what: format!("  the same, marginal ({} → {} in flight)", r.k / 2, r.k),
                    measured: format!("{b:.0} B"),
                    met: b <= 1024.0,
                });
            }
        }
        if let Some(s) = &self.stored {
            t.push(Target {
                what: format!("{} stored: GetSaga p99 ≤ 1 ms (target: 1,000,000)", s.n),
                measured: format!("{:.3} ms", ms(&s.get, 0.99)),
                met: ms(&s.get, 0.99) <= 1.0,
            });
            t.push(Target {
                what: format!("{} stored: ListSagas page ≤ 5 ms (p99)", s.n),
                measured: format!("{:.3} ms", ms(&s.list, 0.99)),
                met: ms(&s.list, 0.99) <= 5.0,
            });
        }
        t
    }

    /// The table comparing the configurations' sweeps, row by row.
    fn print_comparison(&self) {
        let Some(first) = self.stores.first() else {
            return;
        };
        println!("\nStores compared (same order mix and concurrency; NATS cores: all its nodes)");
        let base = format!("÷ {}", first.setup.slug());
        let mut t = table(&[
            "configuration",
            "C",
            "sagas",
            "sagas/s",
            &base,
            "p50 ms",
            "p99 ms",
            "ack p50 ms",
            "coordinator CPU µs/saga",
            "system CPU µs/saga",
            "coordinator cores",
            "NATS cores",
            "create retries",
            "NOT_FOUND after create",
            "mismatch",
        ]);
        for sweep in &self.stores {
            for r in &sweep.runs {
                let l = &r.tally.latency;
                let cores = |prefix: &str| cpu_of(r, prefix).map(|c| c / r.elapsed.as_secs_f64().max(1e-9));
                let x = self.ratios(r);
                let relative = first
                    .runs
                    .iter()
                    .find(|b| b.concurrency == r.concurrency)
                    .map(|b| r.sagas_per_s() / b.sagas_per_s().max(1e-9));
                t.add_row(vec![
                    sweep.setup.label(),
                    r.concurrency.to_string(),
                    r.tally.placed.to_string(),
                    format!("{:.0}", r.sagas_per_s()),
                    format!("{}×", opt(relative, 2)),
                    format!("{:.2}", ms(l, 0.5)),
                    format!("{:.2}", ms(l, 0.99)),
                    format!("{:.2}", ms(&r.tally.acked, 0.5)),
                    opt(x["coordinator_cpu_us_per_saga"].as_f64(), 0),
                    opt(x["system_cpu_us_per_saga"].as_f64(), 0),
                    opt(cores("coordinator"), 2),
                    opt(cores("nats"), 2),
                    r.tally.retries.to_string(),
                    r.tally.not_found.to_string(),
                    r.tally.mismatches.to_string(),
                ]);
            }
            if let Some(e) = &sweep.error {
                t.add_row(vec![sweep.setup.label(), "—".into(), format!("FAILED: {e}")]);
            }
        }
        println!("{t}");
    }

    /// One run of a sweep, as JSON; the C=1 run's ratios with the floor
    /// chain of its sweep, when there is one.
    fn run_json(&self, r: &RunReport, chain: Option<(FloorChain, f64)>) -> Value {
        let mut ratios = self.ratios(r);
        if let (Some((c, over)), Value::Object(m)) = (chain.filter(|_| r.concurrency == 1), &mut ratios) {
            m.insert("floor_chain_us".into(), json!(c.us()));
            m.insert("floor_chain_flushes".into(), json!(c.flushes));
            m.insert("floor_chain_round_trips".into(), json!(c.round_trips));
            m.insert("p50_over_floor_chain".into(), json!(over));
        }
        json!({
            "concurrency": r.concurrency,
            "connections": r.connections,
            "orders": r.tally.placed,
            "seconds": r.elapsed.as_secs_f64(),
            "sagas_per_s": r.sagas_per_s(),
            "completed_per_s": r.completed_per_s(),
            "latency_ms": latency(&r.tally.latency),
            "create_ack_ms": latency(&r.tally.acked),
            "outcomes": r.tally.states,
            "mismatches": r.tally.mismatches,
            "errors": r.tally.errors,
            "watch_fallbacks": r.tally.fallbacks,
            "create_retries": r.tally.retries,
            "not_found_after_create": r.tally.not_found,
            "examples": r.tally.examples,
            "flushes": r.flushes,
            "processes": procs(&r.procs),
            "ratios": ratios,
            "otlp": r.otlp.map(|(exported, dropped)| json!({"exported": exported, "dropped": dropped})),
            "console_tab": r.console_tab.as_ref().map(|t| json!({
                "fetches": t.fetches, "failures": t.failures, "latency_ms": latency(&t.latency),
            })),
        })
    }

    /// Prints every table on stdout.
    pub(crate) fn print(&self) {
        if self.nats.is_some() || self.sled.is_some() {
            println!("\nFloors (this machine, this run)");
            let mut t = table(&["floor", "figure"]);
            if let Some(n) = &self.nats {
                t.add_row(vec![
                    "NATS request-reply, sequential round trip p50 / p99".to_string(),
                    format!("{:.0} µs / {:.0} µs", n.rtt_p50_us, n.rtt_p99_us),
                ]);
                for (c, rps) in &n.throughput {
                    t.add_row(vec![
                        format!("NATS request-reply, {c} in flight"),
                        format!("{rps:.0} req/s"),
                    ]);
                }
            }
            if let Some(s) = &self.sled {
                t.add_row(vec![
                    "sled insert + flush, per write (p50)".to_string(),
                    format!("{:.0} µs ({:.0} writes/s)", s.flush_p50_us, s.per_write_per_s),
                ]);
                t.add_row(vec![
                    "sled 100 inserts per flush".to_string(),
                    format!("{:.0} writes/s", s.batched_per_s),
                ]);
            }
            println!("{t}");
        }
        if !self.runs.is_empty() {
            println!(
                "\nConcurrency sweep{} (end to end: CreateOrder sent → terminal state seen)",
                self.setup
                    .map(|s| format!(" on {}", s.label()))
                    .unwrap_or_default()
            );
            let mut t = table(&[
                "C",
                "sagas",
                "s",
                "sagas/s",
                "completed/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "ack p50 ms",
                "outcomes",
                "mismatch",
            ]);
            for r in &self.runs {
                let l = &r.tally.latency;
                t.add_row(vec![
                    r.concurrency.to_string(),
                    r.tally.placed.to_string(),
                    format!("{:.1}", r.elapsed.as_secs_f64()),
                    format!("{:.0}", r.sagas_per_s()),
                    format!("{:.0}", r.completed_per_s()),
                    format!("{:.2}", ms(l, 0.5)),
                    format!("{:.2}", ms(l, 0.9)),
                    format!("{:.2}", ms(l, 0.99)),
                    format!("{:.1}", max_ms(l)),
                    format!("{:.2}", ms(&r.tally.acked, 0.5)),
                    outcomes(&r.tally),
                    r.tally.mismatches.to_string(),
                ]);
            }
            println!("{t}");
            if let Some((c, over)) = self.chain_of(self.setup.as_ref(), &self.runs) {
                println!(
                    "floor chain {:.2} ms ({} flushes × {:.0} µs + {} round trips × {:.0} µs); \
                     C=1 p50 = {over:.2}× the chain",
                    c.us() / 1000.0,
                    c.flushes,
                    c.flush_us,
                    c.round_trips,
                    c.round_trip_us
                );
            }

            println!("\nCPU seconds (cores busy) and peak RSS per process, per run");
            let names: Vec<&str> = self.runs[0].procs.iter().map(|p| p.name.as_str()).collect();
            let mut header = vec!["C"];
            header.extend(names.iter().copied());
            let mut t = table(&header);
            for r in &self.runs {
                let mut row = vec![r.concurrency.to_string()];
                for p in &r.procs {
                    row.push(proc_cell(p));
                }
                t.add_row(row);
            }
            println!("{t}");

            println!("\nRatios to the floors");
            let mut t = table(&[
                "C",
                "p50 ÷ NATS RTT",
                "sagas/s ÷ NATS req/s (same C)",
                "sagas/s ÷ sled flushed writes/s",
                "flushes/s",
                "sagas per flush",
                "coordinator writes/saga",
                "participant writes/saga",
                "flush time share",
                "coordinator CPU µs/saga",
                "system CPU µs/saga",
            ]);
            for r in &self.runs {
                let x = self.ratios(r);
                let f = |k: &str, d: usize| opt(x[k].as_f64(), d);
                t.add_row(vec![
                    r.concurrency.to_string(),
                    format!("{}×", f("p50_over_nats_rtt", 1)),
                    f("sagas_per_s_over_nats_req_per_s", 3),
                    f("sagas_per_s_over_sled_flushed_writes_per_s", 2),
                    f("flushes_per_s", 0),
                    f("sagas_per_flush", 2),
                    f("coordinator_writes_per_saga", 1),
                    f("participant_writes_per_saga", 1),
                    f("flush_time_share", 2),
                    f("coordinator_cpu_us_per_saga", 0),
                    f("system_cpu_us_per_saga", 0),
                ]);
            }
            println!("{t}");
        }
        if self.stores.len() > 1 {
            self.print_comparison();
        }
        if let Some(r) = &self.recovery {
            println!(
                "\nRecovery ({} sagas in flight, coordinator stopped with {:?})",
                r.k, r.signal
            );
            let mut t = table(&["figure", "value"]);
            t.add_row(vec![
                "orders placed in".to_string(),
                format!("{:.2?}", r.placed_in),
            ]);
            t.add_row(vec![
                "in flight at the stop".to_string(),
                r.in_flight_at_stop.to_string(),
            ]);
            for (name, most) in &r.payment_most_in_flight {
                t.add_row(vec![
                    format!("{name}: most charges at once after the restart"),
                    most.map_or_else(|| "no /metrics".to_string(), |m| format!("{m:.0}")),
                ]);
            }
            if let (Some(idle), Some(loaded), Some(b)) =
                (r.rss_idle_kib, r.rss_in_flight_kib, r.rss_bytes_per_saga())
            {
                t.add_row(vec![
                    "coordinator RSS idle → all in flight".to_string(),
                    format!("{} → {} MiB ({b:.0} B per saga)", idle / 1024, loaded / 1024),
                ]);
            }
            if let (Some(half), Some(loaded), Some(b)) = (
                r.rss_half_kib,
                r.rss_in_flight_kib,
                r.rss_marginal_bytes_per_saga(),
            ) {
                t.add_row(vec![
                    format!("coordinator RSS {} → {} in flight", r.k / 2, r.k),
                    format!(
                        "{} → {} MiB ({b:.0} B per added saga)",
                        half / 1024,
                        loaded / 1024
                    ),
                ]);
            }
            t.add_row(vec!["stop took".to_string(), format!("{:.2?}", r.stop_took)]);
            t.add_row(vec![
                "restart → gRPC answers".to_string(),
                format!("{:.2?}", r.to_grpc),
            ]);
            t.add_row(vec![
                "restart → all terminal".to_string(),
                format!("{:.2?}", r.to_all_terminal),
            ]);
            t.add_row(vec![
                "COMPLETED after restart".to_string(),
                r.completed.to_string(),
            ]);
            t.add_row(vec![
                "coordinator CPU s / peak RSS (since restart)".to_string(),
                format!(
                    "{} s / {} MiB",
                    opt(r.coordinator_cpu_s, 2),
                    opt(r.coordinator_peak_rss_kib.map(mib), 1)
                ),
            ]);
            println!("{t}");
        }
        if let Some(s) = &self.soak {
            println!("\nSoak ({:.0} orders/s for {:?})", s.rate, s.duration);
            let mut t = table(&["figure", "value"]);
            t.add_row(vec![
                "sagas / achieved rate".to_string(),
                format!(
                    "{} / {:.0}/s",
                    s.tally.placed,
                    s.tally.placed as f64 / s.duration.as_secs_f64().max(1e-9)
                ),
            ]);
            t.add_row(vec![
                "latency p50 / p99 / max".to_string(),
                format!(
                    "{:.2} / {:.2} / {:.1} ms",
                    ms(&s.tally.latency, 0.5),
                    ms(&s.tally.latency, 0.99),
                    max_ms(&s.tally.latency)
                ),
            ]);
            t.add_row(vec!["outcomes".to_string(), outcomes(&s.tally)]);
            t.add_row(vec![
                "coordinator RSS start / end / max".to_string(),
                format!(
                    "{} / {} / {} MiB ({} samples)",
                    opt(s.rss_start().map(mib), 1),
                    opt(s.rss_end().map(mib), 1),
                    opt(s.rss_max().map(mib), 1),
                    s.rss.len()
                ),
            ]);
            for p in &s.procs {
                t.add_row(vec![p.name.to_string(), proc_cell(p)]);
            }
            println!("{t}");
        }
        if let Some(s) = &self.stored {
            println!("\nStored ({} sagas)", s.n);
            let mut t = table(&["figure", "value"]);
            t.add_row(vec![
                "fill".to_string(),
                format!(
                    "{:.1?} ({:.0} sagas/s)",
                    s.fill_time,
                    s.n as f64 / s.fill_time.as_secs_f64().max(1e-9)
                ),
            ]);
            t.add_row(vec![
                "then: the fill's events published; its dirty pages written (sync)".to_string(),
                format!(
                    "{}; {} (reads timed after both)",
                    s.events_drained
                        .map_or_else(|| "not measured".to_string(), |d| format!("{d:.1?}")),
                    s.synced
                        .map_or_else(|| "sync failed".to_string(), |d| format!("{d:.1?}")),
                ),
            ]);
            t.add_row(vec![
                "GetSaga p50 / p99 / max (random ids)".to_string(),
                format!(
                    "{:.3} / {:.3} / {:.3} ms",
                    ms(&s.get, 0.5),
                    ms(&s.get, 0.99),
                    max_ms(&s.get)
                ),
            ]);
            t.add_row(vec![
                format!("ListSagas COMPLETED, pages of {}: p50 / p99 / max", s.page_size),
                format!(
                    "{:.3} / {:.3} / {:.3} ms ({} pages)",
                    ms(&s.list, 0.5),
                    ms(&s.list, 0.99),
                    max_ms(&s.list),
                    s.list.len()
                ),
            ]);
            t.add_row(vec![
                "coordinator RSS / store on disk".to_string(),
                format!(
                    "{} MiB / {} MiB",
                    opt(s.coordinator_rss_kib.map(mib), 1),
                    opt(s.store_bytes.map(|b| b as f64 / 1048576.0), 1)
                ),
            ]);
            for p in &s.console {
                t.add_row(vec![
                    format!("console: {} ({} B), p50 / p99", p.name, p.bytes),
                    format!(
                        "{:.3} / {:.3} ms, coordinator CPU {} µs per page",
                        ms(&p.latency, 0.5),
                        ms(&p.latency, 0.99),
                        opt(p.cpu_us, 0)
                    ),
                ]);
            }
            println!("{t}");
        }
        let targets = self.targets();
        if !targets.is_empty() {
            println!("\nTargets of issue 4");
            let mut t = table(&["target", "measured", "met"]);
            for x in targets {
                t.add_row(vec![
                    x.what,
                    x.measured,
                    if x.met { "yes" } else { "no" }.to_string(),
                ]);
            }
            println!("{t}");
        }
        for n in self.stale_read_notes() {
            println!("NOTE: {n}");
        }
        for f in &self.failures {
            println!("FAILED: {f}");
        }
        if let Some(by) = &self.otlp_spans {
            let all: usize = by.values().sum();
            println!("OTLP receiver: {all} spans ({by:?})");
        }
        println!(
            "\nseed {} · {} in total · {}",
            self.seed,
            humantime::format_duration(Duration::from_secs(self.total.as_secs())),
            if self.ok() {
                "all sagas reached their expected state"
            } else {
                "FAILURES (see above)"
            }
        );
    }

    /// Runs in which sagas were NOT_FOUND right after CreateOrder: not a
    /// failure (they were read again and reached their expected state) but
    /// a read-after-write gap a client sees.
    fn stale_read_notes(&self) -> Vec<String> {
        let sweeps: Vec<(String, &RunReport)> = if self.stores.is_empty() {
            self.runs.iter().map(|r| (String::new(), r)).collect()
        } else {
            self.stores
                .iter()
                .flat_map(|w| w.runs.iter().map(|r| (format!(" ({})", w.setup.label()), r)))
                .collect()
        };
        let mut notes: Vec<String> = sweeps
            .into_iter()
            .filter(|(_, r)| r.tally.not_found > 0)
            .map(|(on, r)| format!("C={}{on}: {}", r.concurrency, not_found_note(&r.tally)))
            .collect();
        if let Some(s) = self.soak.as_ref().filter(|s| s.tally.not_found > 0) {
            notes.push(format!("soak: {}", not_found_note(&s.tally)));
        }
        notes
    }

    /// Whether every saga reached its expected state and no scenario failed.
    pub(crate) fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The JSON report.
    pub(crate) fn json(&self, args: &Args) -> Value {
        let chain = self.chain_of(self.setup.as_ref(), &self.runs);
        let runs: Vec<Value> = self.runs.iter().map(|r| self.run_json(r, chain)).collect();
        let stores: Vec<Value> = self
            .stores
            .iter()
            .map(|w| {
                json!({
                    "label": w.setup.label(),
                    "setup": setup_json(&w.setup),
                    "runs": w.runs.iter()
                        .map(|r| self.run_json(r, self.chain_of(Some(&w.setup), &w.runs)))
                        .collect::<Vec<_>>(),
                    "error": w.error,
                })
            })
            .collect();
        json!({
            "version": 1,
            "seed": self.seed,
            "total_seconds": self.total.as_secs_f64(),
            "machine": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "clock_ticks": self.clock_ticks,
            },
            "config": {
                "target": args.target.map(|t| t.to_string()),
                "orders": args.orders,
                "concurrency": args.concurrency,
                "max_run_seconds": args.max_run_time.as_secs_f64(),
                "warmup": args.warmup,
                "declined_share": args.declined_share,
                "out_of_stock_share": args.out_of_stock_share,
                "gateway_latency_ms": args.gateway_latency.as_secs_f64() * 1000.0,
                "customer_limit_cents": args.customer_limit_cents,
                "follow": format!("{:?}", args.follow).to_lowercase(),
                "coordinator_args": args.coordinator_arg,
                "setup": self.setup.as_ref().map(setup_json),
                "compare_stores": args.compare_stores,
                "smoke": args.smoke,
            },
            "floors": {
                "nats": self.nats.as_ref().map(|n| json!({
                    "rtt_p50_us": n.rtt_p50_us,
                    "rtt_p99_us": n.rtt_p99_us,
                    "throughput": n.throughput.iter()
                        .map(|(c, r)| json!({"concurrency": c, "req_per_s": r}))
                        .collect::<Vec<_>>(),
                })),
                "sled": self.sled.as_ref().map(|s| json!({
                    "flush_p50_us": s.flush_p50_us,
                    "per_write_per_s": s.per_write_per_s,
                    "batched_100_per_s": s.batched_per_s,
                })),
            },
            "runs": runs,
            "stores": stores,
            "recovery": self.recovery.as_ref().map(|r| json!({
                "k": r.k,
                "signal": format!("{:?}", r.signal).to_lowercase(),
                "in_flight_at_stop": r.in_flight_at_stop,
                "placed_s": r.placed_in.as_secs_f64(),
                "stop_s": r.stop_took.as_secs_f64(),
                "restart_to_grpc_s": r.to_grpc.as_secs_f64(),
                "restart_to_all_terminal_s": r.to_all_terminal.as_secs_f64(),
                "completed": r.completed,
                "coordinator_cpu_s": r.coordinator_cpu_s,
                "coordinator_peak_rss_kib": r.coordinator_peak_rss_kib,
                "coordinator_rss_idle_kib": r.rss_idle_kib,
                "coordinator_rss_half_kib": r.rss_half_kib,
                "coordinator_rss_in_flight_kib": r.rss_in_flight_kib,
                "coordinator_rss_marginal_bytes_per_saga_in_flight": r.rss_marginal_bytes_per_saga(),
                "coordinator_rss_bytes_per_saga_in_flight": r.rss_bytes_per_saga(),
                "payment_most_in_flight_after_restart": r.payment_most_in_flight.iter()
                    .map(|(name, most)| json!({"replica": name, "most": most}))
                    .collect::<Vec<_>>(),
            })),
            "soak": self.soak.as_ref().map(|s| json!({
                "seconds": s.duration.as_secs_f64(),
                "rate": s.rate,
                "seconds_until_all_terminal": s.elapsed.as_secs_f64(),
                "orders": s.tally.placed,
                "achieved_rate": s.tally.placed as f64 / s.duration.as_secs_f64().max(1e-9),
                "latency_ms": latency(&s.tally.latency),
                "outcomes": s.tally.states,
                "mismatches": s.tally.mismatches,
                "not_found_after_create": s.tally.not_found,
                "coordinator_rss_kib": {
                    "start": s.rss_start(), "end": s.rss_end(), "max": s.rss_max(),
                    "samples": s.rss.iter().map(|(t, k)| json!([t, k])).collect::<Vec<_>>(),
                },
                "processes": procs(&s.procs),
            })),
            "stored": self.stored.as_ref().map(|s| json!({
                "n": s.n,
                "fill_s": s.fill_time.as_secs_f64(),
                "fill_per_s": s.n as f64 / s.fill_time.as_secs_f64().max(1e-9),
                "fill_outcomes": s.fill.states,
                "fill_latency_ms": latency(&s.fill.latency),
                "get_saga_ms": latency(&s.get),
                "list_sagas_page_ms": latency(&s.list),
                "page_size": s.page_size,
                "coordinator_rss_kib": s.coordinator_rss_kib,
                "store_bytes": s.store_bytes,
                "events_drained_s": s.events_drained.map(|d| d.as_secs_f64()),
                "sync_s": s.synced.map(|d| d.as_secs_f64()),
                "console_pages": s.console.iter().map(|p| json!({
                    "page": p.name, "latency_ms": latency(&p.latency),
                    "coordinator_cpu_us_per_page": p.cpu_us, "bytes": p.bytes,
                })).collect::<Vec<_>>(),
            })),
            "targets": self.targets().into_iter()
                .map(|t| json!({"target": t.what, "measured": t.measured, "met": t.met}))
                .collect::<Vec<_>>(),
            "failures": self.failures,
            "otlp_spans": self.otlp_spans.as_ref().map(|by| by.values().sum::<usize>()),
            "otlp_spans_by_service": self.otlp_spans,
            "ok": self.ok(),
        })
    }
}

fn proc_cell(p: &ProcFigures) -> String {
    format!(
        "{:.1} s ({:.2}) · {:.0} MiB",
        p.cpu_s,
        p.cores,
        mib(p.peak_rss_kib)
    )
}

fn setup_json(s: &Setup) -> Value {
    let jetstream = s.store == Store::Jetstream;
    json!({
        "store": s.store.name(),
        "nats_nodes": s.nats_nodes,
        "coordinators": s.coordinators,
        "replicas": s.replicas(),
        "partitions": jetstream.then_some(s.partitions),
        "lease_ttl_ms": jetstream.then_some(s.lease_ttl.as_millis() as u64),
    })
}

fn latency(h: &hdrhistogram::Histogram<u64>) -> Value {
    json!({
        "p50": ms(h, 0.5),
        "p90": ms(h, 0.9),
        "p99": ms(h, 0.99),
        "max": max_ms(h),
        "count": h.len(),
    })
}

fn procs(p: &[ProcFigures]) -> Value {
    let mut m = serde_json::Map::new();
    for x in p {
        m.insert(
            x.name.to_string(),
            json!({
                "cpu_s": x.cpu_s,
                "cores": x.cores,
                "peak_rss_kib": x.peak_rss_kib,
                "rss_kib": x.rss_kib,
            }),
        );
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats(rtt_p50_us: f64) -> NatsFloor {
        NatsFloor {
            rtt_p50_us,
            rtt_p99_us: rtt_p50_us * 2.0,
            throughput: Vec::new(),
        }
    }

    fn sled(flush_p50_us: f64) -> SledFloor {
        SledFloor {
            flush_p50_us,
            per_write_per_s: 1e6 / flush_p50_us,
            batched_per_s: 0.0,
        }
    }

    #[test]
    fn the_floor_chain_is_five_flushes_and_two_round_trips() {
        // Different floors so that swapped counts or a swapped pair would show.
        let (chain, over) =
            floor_chain(Some(&nats(200.0)), Some(&sled(300.0)), true, Some(3_400.0)).expect("a chain");
        assert_eq!((chain.flushes, chain.round_trips), (5, 2));
        assert_eq!((chain.flush_us, chain.round_trip_us), (300.0, 200.0));
        // 3 coordinator + 2 participant flushes × 300 µs + 2 round trips × 200 µs.
        assert!((chain.us() - 1_900.0).abs() < 1e-9, "{}", chain.us());
        assert!((over - 3_400.0 / 1_900.0).abs() < 1e-9, "{over}");
    }

    #[test]
    fn no_floor_chain_without_both_floors_sled_stores_and_a_c1_run() {
        let (n, s) = (nats(200.0), sled(300.0));
        assert!(floor_chain(None, Some(&s), true, Some(1_000.0)).is_none());
        assert!(floor_chain(Some(&n), None, true, Some(1_000.0)).is_none());
        assert!(floor_chain(Some(&n), Some(&s), false, Some(1_000.0)).is_none());
        assert!(floor_chain(Some(&n), Some(&s), true, None).is_none());
    }
}
