//! `make demo` as a user runs it (`deploy/local.sh demo`, real processes):
//! the four orders (three `order` sagas, one `order-with-shipping`) end as they
//! should, and scraping `/metrics` of the coordinator and the three participants
//! before and after shows the counters moving.

use anyhow::{ensure, Context, Result};

#[test]
fn the_demo_runs_and_its_metrics_move() -> Result<()> {
    let bin = saga_testkit::bin_dir()?;
    let nats = saga_testkit::nats_server_bin()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("deploy/local.sh"))
        .arg("demo")
        .env("BIN", &bin)
        .env("NATS_SERVER_BIN", &nats)
        .current_dir(&root)
        .output()
        .context("running deploy/local.sh demo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = |metric: &str, to: &str| {
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with(metric) && l.trim_end().ends_with(&format!("-> {to}")))
    };
    ensure!(
        moved("saga_started_total{definition=\"order@1\"}", "3"),
        "{stdout}"
    );
    // The stores' write counters (what saga-bench divides by sagas) move too.
    let moved_any = |metric: &str| {
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with(metric) && l.contains(" -> "))
    };
    ensure!(moved_any("saga_store_writes_total"), "{stdout}");
    ensure!(
        moved_any("participant_store_writes_total{participant=\"inventory\",store=\"sled\"}"),
        "{stdout}"
    );
    ensure!(
        moved(
            "saga_finished_total{definition=\"order@1\",state=\"COMPLETED\"}",
            "1"
        ),
        "{stdout}"
    );
    ensure!(
        moved(
            "saga_finished_total{definition=\"order@1\",state=\"COMPENSATED\"}",
            "2"
        ),
        "{stdout}"
    );
    ensure!(
        moved(
            "participant_commands_total{participant=\"payment\",action=\"charge\",outcome=\"ok\"}",
            "5"
        ),
        "{stdout}"
    );
    ensure!(
        moved(
            "saga_finished_total{definition=\"order-with-shipping@1\",state=\"COMPLETED\"}",
            "1"
        ),
        "{stdout}"
    );
    ensure!(
        moved(
            "participant_commands_total{participant=\"shipping\",action=\"create-shipment\",outcome=\"ok\"}",
            "2"
        ),
        "{stdout}"
    );
    ensure!(
        moved(
            "participant_commands_total{participant=\"inventory\",action=\"release\",outcome=\"ok\"}",
            "2"
        ),
        "{stdout}"
    );
    // The 3-D Secure orders: one signalled while it waited, one before (its
    // digital order's shipment skipped), one left to time out.
    ensure!(
        moved(
            "saga_finished_total{definition=\"order-3ds@1\",state=\"COMPLETED\"}",
            "2"
        ),
        "{stdout}"
    );
    ensure!(
        moved(
            "saga_finished_total{definition=\"order-3ds@1\",state=\"COMPENSATED\"}",
            "1"
        ),
        "{stdout}"
    );
    ensure!(
        stdout.contains("step_skipped") && stdout.contains(": kept"),
        "{stdout}"
    );
    Ok(())
}
