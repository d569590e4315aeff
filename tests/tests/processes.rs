//! What the long-running binaries set up for themselves before they serve:
//! transparent huge pages off (docs/operations.md, *Memory*, says why).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use saga_testkit::*;

/// The `THP_enabled:` line of a process's status (Linux 5.0 and later).
fn thp_enabled(pid: u32) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
        .context("no THP_enabled line in /proc/<pid>/status")
}

#[tokio::test]
async fn the_coordinator_and_a_participant_run_with_transparent_huge_pages_off() -> Result<()> {
    let nats = NatsServer::start()?;
    let dir = tempfile::tempdir()?;
    let bin = bin_dir()?;
    let path = |name: &str| dir.path().join(name).display().to_string();
    let mut coordinator = Proc::coordinator(dir.path(), &shipped_definitions(), &nats, &[])?;
    let mut inventory = Proc::new(
        "inventory",
        bin.join("inventory"),
        ["--nats-url", &nats.url(), "--data-dir", &path("inventory")]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        dir.path().join("inventory.log"),
    )
    .envs(nats.access().env(&Role::Participant("inventory".into())))
    .ports_file(dir.path().join("inventory.ports"));
    for p in [&mut coordinator, &mut inventory] {
        p.start()?;
        // Its ports file is written after the flag was set.
        p.ports(Duration::from_secs(30))
            .with_context(|| format!("{} did not start: {}", p.name, p.log_tail(20)))?;
        let pid = p.pid().context("the process is not running")?;
        let thp = thp_enabled(pid)?;
        ensure!(thp == "0", "{}: THP_enabled {thp}, want 0", p.name);
        p.kill();
    }
    Ok(())
}
