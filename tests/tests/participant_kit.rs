//! The participant kit (issue 17): `participants/examples/loyalty.rs`, a
//! participant written as two actions with `participants::kit`, run as the
//! built example process on a permissioned nats-server (the user
//! `participant-loyalty`, its nkey seed).
//!
//! - on sled, and as two replicas on the jetstream store, `sagactl
//!   conformance` finds every rule of docs/protocol.md kept;
//! - real sagas of the shipped `order-with-loyalty.yaml`: one completes and
//!   grants its points, which survive a kill -9; the customer `blocked` is
//!   refused and the saga compensates (the charge refunded).

use std::{path::PathBuf, time::Duration};

use anyhow::{ensure, Context, Result};
use saga_proto::pb::SagaState;
use saga_testkit::*;
use serde_json::Value;

const LOYALTY: &str = "loyalty";

/// The built example (`cargo build --workspace --examples`; `make test` does).
fn example() -> Result<PathBuf> {
    let path = bin_dir()?.join("examples").join(LOYALTY);
    ensure!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins --examples`",
        path.display()
    );
    Ok(path)
}

/// One loyalty process (not started yet): on sled in `s.path(name)`, or on
/// the jetstream store when `jetstream`.
fn loyalty_proc(s: &System, name: &str, jetstream: bool) -> Result<Proc> {
    let mut args = vec!["--log-format".to_string(), "json".into()];
    if jetstream {
        args.extend(["--store".into(), "jetstream".into()]);
    } else {
        args.extend(["--data-dir".into(), s.path(name).display().to_string()]);
    }
    Ok(Proc::new(name, example()?, args, s.path(&format!("{name}.log")))
        .envs(s.nats.access().env(&Role::Participant(LOYALTY.into()))))
}

/// Starts `proc` and waits until loyalty answers its stats subject.
async fn start(proc: &mut Proc, client: &async_nats::Client) -> Result<()> {
    proc.start()?;
    let up = eventually(Duration::from_secs(30), "loyalty answering stats", || async {
        stats(client, LOYALTY).await.is_ok()
    })
    .await;
    if let Err(e) = up {
        anyhow::bail!("{e}; log tail:\n{}", proc.log_tail(20));
    }
    Ok(())
}

/// Runs the built `sagactl conformance` for loyalty as the coordinator role.
async fn conformance(s: &System) -> Result<Value> {
    let bin = bin_dir()?.join("sagactl");
    let out = tokio::process::Command::new(&bin)
        .args([
            "--json",
            "conformance",
            "--participant",
            LOYALTY,
            "--forward",
            "grant",
            "--compensate",
            "revoke",
        ])
        .envs(s.nats.access().env(&Role::Coordinator))
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("not JSON:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)))?;
    let failed: Vec<&Value> = v["checks"]
        .as_array()
        .context("no checks")?
        .iter()
        .filter(|c| c["pass"] != Value::Bool(true))
        .collect();
    ensure!(
        failed.is_empty() && out.status.code() == Some(0),
        "exit {:?}, failed {failed:#?}",
        out.status.code()
    );
    Ok(v)
}

/// A figure of loyalty's stats.
async fn figure(client: &async_nats::Client, name: &str) -> Result<u64> {
    let s = stats(client, LOYALTY).await?;
    s[name].as_u64().with_context(|| format!("no {name} in {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_participant_passes_every_conformance_rule_on_sled() -> Result<()> {
    let s = System::bare(None).await?;
    let mut loyalty = loyalty_proc(&s, LOYALTY, false)?;
    start(&mut loyalty, &s.client).await?;
    let v = conformance(&s).await?;
    ensure!(v["checks"].as_array().map(Vec::len) == Some(13), "{v}");
    // The run undid what it applied.
    ensure!(figure(&s.client, "effects").await? == 0);
    ensure!(figure(&s.client, "applied").await? == 1);
    ensure!(figure(&s.client, "compensated").await? == 1);
    loyalty.check_alive()?;
    let took = loyalty.terminate(Duration::from_secs(10));
    ensure!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kit_replicas_on_jetstream_pass_conformance_and_serve_sagas_through_a_kill() -> Result<()> {
    let mut s = System::bare(None).await?;
    let mut a = loyalty_proc(&s, "loyalty-a", true)?;
    let mut b = loyalty_proc(&s, "loyalty-b", true)?;
    start(&mut a, &s.client).await?;
    start(&mut b, &s.client).await?;
    conformance(&s).await?;

    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    s.start_coordinator().await?;
    let loyalty_order = |customer: &str, amount_cents: i64| {
        let mut o = order(customer, &[("A-1", 1)], amount_cents);
        o.definition = "order-with-loyalty".into();
        o
    };
    let saga = s.run_order(loyalty_order("c-1", 1999)).await?;
    ensure!(saga.state == SagaState::Completed as i32, "{saga:#?}");
    let effects = saga_testkit::chaos::effects(&s.client, LOYALTY).await?;
    let granted = &effects[&saga.saga_id]["data"];
    ensure!(granted["points"] == 19, "1999 cents are 19 points: {effects}");

    // One replica is killed: the other, on the same buckets, serves the next
    // saga and keeps the first one's points.
    a.kill();
    let saga = s.run_order(loyalty_order("c-1", 500)).await?;
    ensure!(saga.state == SagaState::Completed as i32, "{saga:#?}");
    let effects = saga_testkit::chaos::effects(&s.client, LOYALTY).await?;
    ensure!(
        effects[&saga.saga_id]["data"]["balance"] == 24,
        "19 + 5 points: {effects}"
    );

    // A refused customer: the saga compensates, the charge is refunded.
    let saga = s.run_order(loyalty_order("blocked", 700)).await?;
    ensure!(saga.state == SagaState::Compensated as i32, "{saga:#?}");
    ensure!(saga.reason.contains("customer_blocked"), "{}", saga.reason);
    ensure!(ledger(&s.client).await? == (1999 + 500 + 700, 700));
    ensure!(figure(&s.client, "rejected").await? == 1);

    b.check_alive()?;
    b.stop();
    s.shutdown().await
}
