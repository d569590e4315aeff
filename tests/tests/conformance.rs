//! `sagactl conformance` against real participants (issue 17): a real
//! nats-server per test, with the roles' permissions; the participants run
//! in this process; the built `sagactl` binary connects as the coordinator.
//!
//! - inventory, payment and shipping pass every rule, on sled and on the
//!   jetstream store, and a run leaves the inventory's stock as it found it
//!   (so the check can be re-run);
//! - a participant in this file, on the harness client, passes when it keeps
//!   the rules and fails, naming exactly the rules it breaks, when it applies
//!   every command again or stores no tombstone.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use saga_testkit::*;
use saga_wire::{self as wire, Command, CommandKind, Reply};
use serde_json::{json, Value};

/// Every rule, as `sagactl conformance` names its rows.
const RULES: &[&str] = &[
    "admin subjects answer",
    "forward applied once",
    "forward repeat: same reply",
    "forward repeat: no second effect",
    "compensation undoes the forward",
    "compensation repeat: same reply",
    "compensation repeat: no second effect",
    "compensation before forward: ok, tombstone",
    "late forward refused by the tombstone",
    "malformed: not JSON -> error",
    "malformed: bad saga id -> error",
    "answers after malformed commands",
    "unknown action -> error",
];

/// What `sagactl conformance` printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The `--json` result, with the rows as `rule → (pass, detail)`.
    fn checks(&self) -> Result<BTreeMap<String, (bool, String)>> {
        let v: Value = serde_json::from_str(&self.stdout)
            .with_context(|| format!("not JSON:\n{}\n{}", self.stdout, self.stderr))?;
        let rows = v["checks"].as_array().context("no checks")?;
        let checks: BTreeMap<String, (bool, String)> = rows
            .iter()
            .map(|c| {
                (
                    c["rule"].as_str().unwrap_or_default().to_string(),
                    (
                        c["pass"].as_bool().unwrap_or(false),
                        c["detail"].as_str().unwrap_or_default().to_string(),
                    ),
                )
            })
            .collect();
        let names: Vec<&str> = checks.keys().map(String::as_str).collect();
        let mut want: Vec<&str> = RULES.to_vec();
        want.sort_unstable();
        ensure!(names == want, "rows {names:?}");
        ensure!(
            v["passed"].as_bool() == Some(checks.values().all(|(p, _)| *p)),
            "passed disagrees with the rows: {v}"
        );
        Ok(checks)
    }

    /// The rules that failed.
    fn failed(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .checks()?
            .into_iter()
            .filter(|(_, (pass, _))| !pass)
            .map(|(r, _)| r)
            .collect())
    }
}

/// Runs the built `sagactl conformance` as the coordinator role.
async fn conformance(s: &System, args: &[&str]) -> Result<Run> {
    let bin = bin_dir()?.join("sagactl");
    let out = tokio::process::Command::new(&bin)
        .arg("conformance")
        .args(args)
        .envs(s.nats.access().env(&Role::Coordinator))
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Asserts a run passed every rule and exited 0.
fn assert_passes(run: &Run) -> Result<()> {
    let failed = run.failed()?;
    ensure!(
        failed.is_empty() && run.code == Some(0),
        "failed {failed:?}, exit {:?}:\n{}\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_passes_and_is_left_as_found() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    let before = stats(&s.client, "inventory").await?["stock"].clone();
    // The table, as an operator sees it.
    let table = conformance(&s, &["--participant", "inventory"]).await?;
    ensure!(table.code == Some(0), "{}\n{}", table.stdout, table.stderr);
    ensure!(table.stdout.contains("all 13 rules pass"), "{}", table.stdout);
    println!("{}", table.stdout);
    // Again, as CI reads it: fresh saga ids, so a second run passes too.
    assert_passes(&conformance(&s, &["--json", "--participant", "inventory"]).await?)?;
    let after = stats(&s.client, "inventory").await?["stock"].clone();
    ensure!(before == after, "stock {before} became {after}");
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_passes() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_payment(&PaymentSettings::default()).await?;
    assert_passes(&conformance(&s, &["--json", "--participant", "payment"]).await?)?;
    let (charged, refunded) = ledger(&s.client).await?;
    ensure!(charged == refunded, "charged {charged}, refunded {refunded}");
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_passes() -> Result<()> {
    let s = System::bare(None).await?;
    let shipping = start_shipping(&s.nats.access(), &s.path("shipping"), &[]).await?;
    wait_participant(&s.client, "shipping").await?;
    assert_passes(&conformance(&s, &["--json", "--participant", "shipping"]).await?)?;
    let figures = stats(&s.client, "shipping").await?;
    ensure!(figures["shipments"] == json!(0), "{figures}");
    shipping.stop().await?;
    s.shutdown().await
}

/// Serves `run(config, http, shutdown)` in this process until the returned token is cancelled.
async fn serve<F>(
    run: F,
) -> Result<(
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)>
where
    F: FnOnce(
        tokio::net::TcpListener,
        tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>>,
{
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    Ok((shutdown.clone(), run(http, shutdown)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_participants_pass_on_the_jetstream_store_too() -> Result<()> {
    use participants::{inventory, payment, shipping, store::StoreKind};
    let s = System::bare(None).await?;
    let access = s.nats.access();
    let role = |p: &str| access.security(&Role::Participant(p.into()));
    let dir = s.path("unused-by-jetstream");
    let mut inv = inventory::InventoryConfig::for_tests(
        access.url(),
        &dir,
        STOCK.iter().map(|(k, n)| ((*k).to_string(), *n)).collect(),
    );
    inv.store = StoreKind::Jetstream;
    inv.nats_security = role("inventory");
    let mut pay =
        payment::PaymentConfig::for_tests(access.url(), &dir, 50_000, std::time::Duration::ZERO, 0.0);
    pay.store = StoreKind::Jetstream;
    pay.nats_security = role("payment");
    let mut ship = shipping::ShippingConfig::for_tests(access.url(), &dir);
    ship.store = StoreKind::Jetstream;
    ship.nats_security = role("shipping");
    let running = vec![
        serve(|h, t| tokio::spawn(inventory::run(inv, h, t))).await?,
        serve(|h, t| tokio::spawn(payment::run(pay, h, t))).await?,
        serve(|h, t| tokio::spawn(shipping::run(ship, h, t))).await?,
    ];
    for p in ["inventory", "payment", "shipping"] {
        wait_participant(&s.client, p).await?;
        let run = conformance(&s, &["--json", "--participant", p]).await?;
        assert_passes(&run).with_context(|| format!("{p} on jetstream"))?;
    }
    let (charged, refunded) = ledger(&s.client).await?;
    ensure!(charged == refunded, "charged {charged}, refunded {refunded}");
    for (shutdown, task) in running {
        shutdown.cancel();
        task.await??;
    }
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_the_participant_refuses_fails_the_forward_rule_and_says_why() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    let run = conformance(&s, &["--json", "--participant", "inventory", "--sku", "NOPE-9"]).await?;
    ensure!(run.code == Some(1), "exit {:?}", run.code);
    let checks = run.checks()?;
    let (pass, detail) = &checks["forward applied once"];
    ensure!(!pass && detail.contains("rejected: unknown_sku"), "{detail}");
    let (pass, detail) = &checks["forward repeat: same reply"];
    ensure!(!pass && detail.starts_with("not run"), "{detail}");
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_is_not_running_fails_every_rule() -> Result<()> {
    let s = System::bare(None).await?;
    let run = conformance(
        &s,
        &[
            "--json",
            "--participant",
            "ghost",
            "--forward",
            "do",
            "--compensate",
            "undo",
        ],
    )
    .await?;
    ensure!(run.code == Some(1), "exit {:?}", run.code);
    let checks = run.checks()?;
    ensure!(checks.values().all(|(pass, _)| !pass), "{checks:?}");
    let (_, detail) = &checks["admin subjects answer"];
    ensure!(detail.contains("no responders"), "{detail}");
    s.shutdown().await
}

/// How the participant in this file breaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Flaw {
    /// None: it keeps every rule.
    None,
    /// It applies every command again and answers a fresh reply each time.
    Reapplies,
    /// It dedupes, but a compensation before its forward stores no
    /// tombstone, so the late forward is applied and answered `ok`.
    NoTombstone,
}

#[derive(Default)]
struct FakeState {
    /// Units applied per saga (the effect; absent when zero).
    units: BTreeMap<String, i64>,
    replies: HashMap<String, Reply>,
    commands: u64,
}

const FAKE_ACTIONS: &[&str] = &["grant", "revoke"];

impl FakeState {
    fn handle(&mut self, flaw: Flaw, subject: &str, body: &[u8]) -> Reply {
        self.commands += 1;
        let cmd: Command = match serde_json::from_slice(body) {
            Ok(c) => c,
            Err(e) => return Reply::error(format!("malformed command: {e}")),
        };
        let token = subject.rsplit('.').next().unwrap_or_default();
        if token != cmd.action || !FAKE_ACTIONS.contains(&token) {
            return Reply::error(format!("unknown action `{token}`"));
        }
        if let Err(e) = cmd.validate() {
            return Reply::error(format!("invalid command: {e}"));
        }
        let key = cmd.idempotency_key.clone();
        if flaw != Flaw::Reapplies {
            if let Some(stored) = self.replies.get(&key) {
                return stored.clone();
            }
        }
        let fresh = uuid::Uuid::new_v4().to_string();
        let reply = match cmd.kind {
            CommandKind::Forward => {
                *self.units.entry(cmd.saga_id.clone()).or_insert(0) += 1;
                Reply::ok(json!({"receipt": fresh}))
            }
            CommandKind::Compensate => {
                let forward = wire::forward_key(&key).unwrap_or_default();
                match self.replies.get(&forward) {
                    Some(Reply::Ok { .. }) => {
                        let n = self.units.entry(cmd.saga_id.clone()).or_insert(0);
                        *n -= 1;
                        if *n == 0 {
                            self.units.remove(&cmd.saga_id);
                        }
                        Reply::ok(json!({"undone": true, "receipt": fresh}))
                    }
                    Some(_) => Reply::ok(json!({"undone": false})),
                    None => {
                        if flaw != Flaw::NoTombstone {
                            self.replies
                                .insert(forward, Reply::rejected("compensated_before_forward"));
                        }
                        Reply::ok(json!({"undone": false, "receipt": fresh}))
                    }
                }
            }
        };
        self.replies.insert(key, reply.clone());
        reply
    }

    fn admin(&self, subject: &str) -> Value {
        if subject.ends_with(".stats") {
            json!({"units": self.units.values().sum::<i64>(), "commands": self.commands})
        } else {
            let effects: serde_json::Map<String, Value> = self
                .units
                .iter()
                .map(|(s, n)| (s.clone(), json!({"units": n})))
                .collect();
            json!({"effects": effects})
        }
    }
}

/// A participant `name` (actions `grant`/`revoke`) on the harness client:
/// its commands in the queue group `name`, its admin subjects answered from
/// the same state.
async fn start_fake(client: &async_nats::Client, name: &str, flaw: Flaw) -> Result<()> {
    let mut commands = client
        .queue_subscribe(format!("saga.cmd.{name}.*"), name.to_string())
        .await?;
    let mut admin = client.subscribe(format!("saga.admin.{name}.>")).await?;
    client.flush().await?;
    let state = Arc::new(Mutex::new(FakeState::default()));
    let client = client.clone();
    tokio::spawn(async move {
        loop {
            let (msg, body) = tokio::select! {
                Some(msg) = commands.next() => {
                    let reply = state.lock().expect("fake state").handle(flaw, &msg.subject, &msg.payload);
                    let body = serde_json::to_vec(&reply).unwrap_or_default();
                    (msg, body)
                }
                Some(msg) = admin.next() => {
                    let answer = state.lock().expect("fake state").admin(&msg.subject);
                    (msg, serde_json::to_vec(&answer).unwrap_or_default())
                }
                else => break,
            };
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, body.into()).await;
            }
        }
    });
    Ok(())
}

async fn check_fake(flaw: Flaw) -> Result<(Run, BTreeSet<String>)> {
    let s = System::bare(None).await?;
    start_fake(&s.client, "loyalty", flaw).await?;
    let run = conformance(
        &s,
        &[
            "--json",
            "--participant",
            "loyalty",
            "--forward",
            "grant",
            "--compensate",
            "revoke",
        ],
    )
    .await?;
    let failed = run.failed()?;
    s.shutdown().await?;
    Ok((run, failed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_in_the_test_that_keeps_the_rules_passes() -> Result<()> {
    let (run, _) = check_fake(Flaw::None).await?;
    assert_passes(&run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_applies_every_command_again_fails_naming_the_rules() -> Result<()> {
    let (run, failed) = check_fake(Flaw::Reapplies).await?;
    ensure!(run.code == Some(1), "exit {:?}", run.code);
    let want: BTreeSet<String> = [
        "forward repeat: same reply",
        "forward repeat: no second effect",
        "compensation undoes the forward",
        "compensation repeat: same reply",
        "compensation repeat: no second effect",
        "late forward refused by the tombstone",
    ]
    .map(String::from)
    .into();
    ensure!(failed == want, "failed {failed:?}:\n{}", run.stdout);
    let checks = run.checks()?;
    let (_, reply) = &checks["forward repeat: same reply"];
    ensure!(
        reply.starts_with("first ok") && reply.contains(", then ok"),
        "{reply}"
    );
    let (_, effect) = &checks["forward repeat: no second effect"];
    ensure!(
        effect.contains("applied again") && effect.contains("units: 1 -> 2"),
        "{effect}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_without_tombstones_fails_the_late_forward_rule_only() -> Result<()> {
    let (run, failed) = check_fake(Flaw::NoTombstone).await?;
    ensure!(run.code == Some(1), "exit {:?}", run.code);
    let want: BTreeSet<String> = ["late forward refused by the tombstone".to_string()].into();
    ensure!(failed == want, "failed {failed:?}:\n{}", run.stdout);
    let (_, detail) = &run.checks()?["late forward refused by the tombstone"];
    ensure!(
        detail.contains("not rejected: compensated_before_forward")
            && detail.contains("the saga has an effect"),
        "{detail}"
    );
    Ok(())
}
