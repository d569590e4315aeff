//! The participant in another language (issue 17): the Python `loyalty`
//! participant (`participants/examples/python/loyalty.py`, nats-py) runs as a
//! child process on a permissioned nats-server, as the user
//! `participant-loyalty` with its nkey seed, its data in the test's temp dir.
//!
//! - `sagactl conformance` finds every rule of docs/protocol.md kept;
//! - real sagas of the shipped `order-with-loyalty.yaml` (inventory, payment and the
//!   coordinator in this process): one completes and grants its points, which
//!   survive a kill -9 of the Python process; a customer the participant
//!   refuses compensates the saga and refunds the charge.
//!
//! Needs `.venv/bin/python` with nats-py (`make tools` installs both).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use saga_proto::pb::{SagaState, StepStatus};
use saga_testkit::*;
use serde_json::Value;

const LOYALTY: &str = "loyalty";

/// `participants/examples/python/`.
fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../participants/examples/python")
}

/// The venv's python, with nats-py importable, or how to install it.
fn python() -> Result<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let how = "install it with `make tools`, or `.venv/bin/pip install -r participants/examples/python/requirements.txt`";
    ensure!(python.is_file(), "{} not found: {how}", python.display());
    let check = std::process::Command::new(&python)
        .args(["-c", "import nats, nkeys"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    ensure!(
        check.status.success(),
        "nats-py is not installed in .venv ({}): {how}",
        String::from_utf8_lossy(&check.stderr).trim()
    );
    Ok(python)
}

/// The Python participant as a child process (not started yet), connecting
/// with the `loyalty` role's URL and seed, its SQLite file in `dir/loyalty`.
fn loyalty_proc(s: &System) -> Result<Proc> {
    let script = example_dir().join("loyalty.py");
    let args = vec![
        script.display().to_string(),
        "--data-dir".into(),
        s.path(LOYALTY).display().to_string(),
    ];
    Ok(Proc::new(LOYALTY, python()?, args, s.path("loyalty.log"))
        .envs(s.nats.access().env(&Role::Participant(LOYALTY.into())))
        .env("PYTHONUNBUFFERED", "1"))
}

/// Starts it and waits until it answers `saga.admin.loyalty.stats`.
async fn start(proc: &mut Proc, client: &async_nats::Client) -> Result<()> {
    proc.start()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match stats(client, LOYALTY).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "loyalty not up within 30s ({e}); log tail:\n{}",
                    proc.log_tail(20)
                )
            }
            Err(_) => {
                proc.check_alive()?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A figure of the loyalty stats.
async fn figure(client: &async_nats::Client, name: &str) -> Result<i64> {
    let s = stats(client, LOYALTY).await?;
    s[name].as_i64().with_context(|| format!("no {name} in {s}"))
}

/// Runs the built `sagactl conformance` for loyalty as the coordinator role.
async fn conformance(s: &System, json: bool) -> Result<(Option<i32>, String)> {
    let bin = bin_dir()?.join("sagactl");
    let mut args = vec![
        "conformance",
        "--participant",
        LOYALTY,
        "--forward",
        "grant",
        "--compensate",
        "revoke",
    ];
    if json {
        args.push("--json");
    }
    let out = tokio::process::Command::new(&bin)
        .args(&args)
        .envs(s.nats.access().env(&Role::Coordinator))
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok((out.status.code(), format!("{stdout}{stderr}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participant_passes_every_conformance_rule() -> Result<()> {
    let s = System::bare(None).await?;
    let mut loyalty = loyalty_proc(&s)?;
    start(&mut loyalty, &s.client).await?;

    let (code, out) = conformance(&s, true).await?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("not JSON:\n{out}"))?;
    let checks = v["checks"].as_array().context("no checks")?;
    let failed: Vec<&Value> = checks.iter().filter(|c| c["pass"] != Value::Bool(true)).collect();
    ensure!(
        checks.len() == 13 && failed.is_empty() && code == Some(0),
        "exit {code:?}, failed {failed:#?}"
    );
    // The table, as an operator reads it (shown with --nocapture).
    let (code, table) = conformance(&s, false).await?;
    ensure!(code == Some(0) && table.contains("all 13 rules pass"), "{table}");
    println!("{table}");

    // The runs undid what they applied.
    let (granted, revoked) = (
        figure(&s.client, "points_granted").await?,
        figure(&s.client, "points_revoked").await?,
    );
    ensure!(
        granted == 2 && revoked == 2,
        "granted {granted}, revoked {revoked}"
    );
    loyalty.check_alive()?;
    let took = loyalty.terminate(Duration::from_secs(10));
    ensure!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_through_the_python_participant_complete_and_compensate() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    let mut loyalty = loyalty_proc(&s)?;
    start(&mut loyalty, &s.client).await?;
    s.start_coordinator().await?;
    let loyalty_order = |customer: &str, amount_cents: i64| {
        let mut o = order(customer, &[("A-1", 2)], amount_cents);
        o.definition = "order-with-loyalty".into();
        o
    };

    let saga = s.run_order(loyalty_order("c-1", 1999)).await?;
    ensure!(saga.state == SagaState::Completed as i32, "{saga:#?}");
    ensure!(saga.definition == "order-with-loyalty@1", "{}", saga.definition);
    ensure!(
        figure(&s.client, "points_granted").await? == 19,
        "1999 cents are 19 points"
    );
    ensure!(figure(&s.client, "grants").await? == 1);
    ensure!(ledger(&s.client).await? == (1999, 0));

    // The grant is in SQLite, committed before the reply: a kill -9 keeps it.
    loyalty.kill();
    start(&mut loyalty, &s.client).await?;
    ensure!(
        figure(&s.client, "points_granted").await? == 19,
        "points lost in a restart"
    );

    // The participant refuses the customer `blocked`: the charge is refunded,
    // the stock released, no points granted.
    let before = stock(&s.client, "A-1").await?;
    let saga = s.run_order(loyalty_order("blocked", 500)).await?;
    ensure!(saga.state == SagaState::Compensated as i32, "{saga:#?}");
    ensure!(saga.reason.contains("customer_blocked"), "{}", saga.reason);
    let statuses: Vec<i32> = saga.steps.iter().map(|p| p.status).collect();
    ensure!(
        statuses
            == [
                StepStatus::Compensated as i32,
                StepStatus::Compensated as i32,
                StepStatus::Rejected as i32
            ],
        "{saga:#?}"
    );
    ensure!(ledger(&s.client).await? == (2499, 500), "the charge is refunded");
    ensure!(stock(&s.client, "A-1").await? == before, "the stock is released");
    ensure!(figure(&s.client, "grants").await? == 1, "no points for `blocked`");
    ensure!(figure(&s.client, "revokes").await? == 0);

    loyalty.check_alive()?;
    loyalty.stop();
    s.shutdown().await
}
