//! The benchmark harness cannot rot: `saga-bench --smoke` (a few orders
//! through every scenario against the debug binaries as separate processes)
//! exits 0 and writes a JSON report with the keys `docs/benchmarks.md` and
//! scripts read. The benchmarks themselves never run in `make test`.

use anyhow::{ensure, Context, Result};

#[test]
fn saga_bench_smoke_run_passes_and_writes_its_report() -> Result<()> {
    let bin_dir = saga_testkit::bin_dir()?;
    let nats = saga_testkit::nats_server_bin()?;
    let out_dir = tempfile::tempdir()?;
    let json_path = out_dir.path().join("saga-bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saga-bench"))
        .arg("--smoke")
        .arg("--console-tab")
        .arg("--otlp")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--json-out")
        .arg(&json_path)
        .env("NATS_SERVER_BIN", &nats)
        .output()
        .context("running saga-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "saga-bench --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    ensure!(stdout.contains("Concurrency sweep"), "no sweep table:\n{stdout}");

    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&json_path).with_context(|| format!("reading {}", json_path.display()))?,
    )?;
    ensure!(report["ok"] == true, "report not ok: {report:#}");
    for key in [
        "seed", "machine", "config", "floors", "runs", "recovery", "soak", "stored", "targets", "failures",
    ] {
        ensure!(!report[key].is_null(), "no `{key}` in {report:#}");
    }
    for floor in [
        "/floors/nats/rtt_p50_us",
        "/floors/nats/throughput/0/req_per_s",
        "/floors/sled/flush_p50_us",
        "/floors/sled/batched_100_per_s",
    ] {
        ensure!(
            report.pointer(floor).is_some_and(|v| v.as_f64().is_some()),
            "no {floor} in {report:#}"
        );
    }
    let run = &report["runs"][0];
    for key in ["sagas_per_s", "completed_per_s", "seconds"] {
        ensure!(
            run[key].as_f64().is_some_and(|v| v > 0.0),
            "runs[0].{key} in {run:#}"
        );
    }
    for q in ["p50", "p90", "p99", "max"] {
        ensure!(
            run["latency_ms"][q].as_f64().is_some_and(|v| v > 0.0),
            "runs[0].latency_ms.{q} in {run:#}"
        );
    }
    ensure!(run["orders"] == 20 && run["mismatches"] == 0, "{run:#}");
    for p in ["nats-server", "coordinator", "inventory", "payment"] {
        ensure!(
            run["processes"][p]["cpu_s"].as_f64().is_some()
                && run["processes"][p]["peak_rss_kib"]
                    .as_u64()
                    .is_some_and(|k| k > 0),
            "runs[0].processes.{p} in {run:#}"
        );
    }
    ensure!(run["ratios"]["p50_over_nats_rtt"].as_f64().is_some(), "{run:#}");
    ensure!(
        run["ratios"]["sagas_per_flush"].as_f64().is_some(),
        "the coordinator's flushes were not read: {run:#}"
    );
    ensure!(
        report["recovery"]["completed"] == report["recovery"]["k"],
        "{report:#}"
    );
    ensure!(
        report["recovery"]["restart_to_all_terminal_s"].as_f64().is_some(),
        "{report:#}"
    );
    ensure!(
        report["soak"]["coordinator_rss_kib"]["max"].as_u64().is_some(),
        "{report:#}"
    );
    ensure!(
        report["stored"]["get_saga_ms"]["p99"].as_f64().is_some(),
        "{report:#}"
    );
    ensure!(
        report["stored"]["list_sagas_page_ms"]["p99"].as_f64().is_some(),
        "{report:#}"
    );
    ensure!(
        run["console_tab"]["fetches"].as_u64().is_some_and(|n| n >= 1) && run["console_tab"]["failures"] == 0,
        "the console tab fetched nothing: {run:#}"
    );
    ensure!(
        report["otlp_spans"].as_u64().is_some_and(|n| n > 0),
        "no span reached the harness's OTLP receiver: {}",
        report["otlp_spans"]
    );
    let pages = report["stored"]["console_pages"]
        .as_array()
        .context("no stored.console_pages")?;
    ensure!(pages.len() == 5, "{pages:#?}");
    for p in pages {
        ensure!(
            p["latency_ms"]["p99"].as_f64().is_some() && p["bytes"].as_u64().is_some_and(|b| b > 0),
            "{p:#}"
        );
    }
    Ok(())
}
