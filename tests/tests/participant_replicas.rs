//! Several replicas of a participant on the jetstream store (issue 17): a
//! real nats-server with JetStream and permissions, the replicas in this
//! process in one queue group (each connected as its role), driven over raw
//! NATS by the harness client, no coordinator.
//!
//! - the same command sent twice at the same moment (each copy may land on
//!   either replica) makes one effect and two identical replies — inventory
//!   and payment;
//! - a command retried after the replica that answered it was killed is
//!   answered by the other from the stored reply, and a tombstone left by
//!   the dead one holds on the other;
//! - a hot SKU under 20 concurrent distinct reserves ends with exact stock.
//! - a replica whose cached root is older than another's commit decides
//!   again on a fresh root before it refuses a compensation.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use participants::store::StoreKind;
use saga_testkit::{chaos::effects, order_command, stats, NatsAccess, NatsServer, Role};
use saga_wire::{self as wire, Item, OrderPayload, Reply};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One replica running in this process.
struct Replica {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    http: std::net::SocketAddr,
}

impl Replica {
    /// Kills it: the task is dropped mid-flight, its NATS connection with it.
    fn kill(self) {
        self.task.abort();
        drop(self.shutdown);
    }
}

async fn listener() -> Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

async fn inventory(access: &NatsAccess, stock: &[(&str, u64)]) -> Result<Replica> {
    let dir = std::env::temp_dir(); // unused by the jetstream store
    let mut config = participants::inventory::InventoryConfig::for_tests(
        access.url(),
        &dir,
        stock.iter().map(|(s, n)| ((*s).to_string(), *n)).collect(),
    );
    config.nats_security = access.security(&Role::Participant("inventory".into()));
    config.store = StoreKind::Jetstream;
    let (http, addr) = listener().await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(participants::inventory::run(config, http, shutdown.clone()));
    Ok(Replica {
        shutdown,
        task,
        http: addr,
    })
}

async fn payment(access: &NatsAccess) -> Result<Replica> {
    let dir = std::env::temp_dir();
    // Gateway latency: both copies of a charge pass the fast path and meet at the write.
    let mut config = participants::payment::PaymentConfig::for_tests(
        access.url(),
        &dir,
        1_000_000,
        Duration::from_millis(20),
        0.0,
    );
    config.nats_security = access.security(&Role::Participant("payment".into()));
    config.store = StoreKind::Jetstream;
    let (http, addr) = listener().await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(participants::payment::run(config, http, shutdown.clone()));
    Ok(Replica {
        shutdown,
        task,
        http: addr,
    })
}

/// Waits until `n` replicas of `participant` answer its stats subject
/// (each subscribes to its commands before its admin subject).
async fn wait_replicas(client: &async_nats::Client, participant: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await?;
        client
            .publish_with_reply(wire::stats_subject(participant), inbox, "{}".into())
            .await?;
        let mut got = 0;
        let window = tokio::time::sleep(Duration::from_millis(300));
        tokio::pin!(window);
        loop {
            tokio::select! {
                _ = &mut window => break,
                m = answers.next() => if m.is_some() { got += 1 } else { break },
            }
        }
        if got >= n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{participant}: {got} of {n} replicas up"
        );
    }
}

fn command(saga_id: &str, action: &str, items: &[(&str, u32)], amount: i64) -> wire::Command {
    let payload = OrderPayload {
        order_id: format!("o-{saga_id}"),
        customer_id: "c-1".into(),
        items: items
            .iter()
            .map(|(s, q)| Item {
                sku: (*s).into(),
                quantity: *q,
            })
            .collect(),
        amount_cents: amount,
        currency: "EUR".into(),
    };
    order_command(saga_id, action, payload)
}

/// Sends `cmd` on its subject; the reply.
async fn send(client: &async_nats::Client, cmd: &wire::Command) -> Result<Reply> {
    let participant = if cmd.step == "reserve-inventory" {
        "inventory"
    } else {
        "payment"
    };
    let msg = tokio::time::timeout(
        Duration::from_secs(15),
        client.request(
            wire::command_subject(participant, &cmd.action),
            serde_json::to_vec(cmd)?.into(),
        ),
    )
    .await
    .context("command timed out")??;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// Sends `cmd` until it is not an `error` (as the coordinator retries).
async fn send_until_decided(client: &async_nats::Client, cmd: &wire::Command) -> Result<Reply> {
    for _ in 0..20 {
        match send(client, cmd).await? {
            Reply::Error { .. } => continue,
            decided => return Ok(decided),
        }
    }
    anyhow::bail!("{}: still error after 20 attempts", cmd.idempotency_key)
}

async fn stock(client: &async_nats::Client, sku: &str) -> Result<(u64, u64)> {
    let s = stats(client, "inventory").await?;
    let row = &s["stock"][sku];
    Ok((
        row["available"].as_u64().context("available")?,
        row["reserved"].as_u64().context("reserved")?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reserve_at_the_same_moment_on_two_replicas_is_applied_once() -> Result<()> {
    let server = NatsServer::start()?;
    let access = server.access();
    let client = access.connect().await?;
    let a = inventory(&access, &[("A-1", 1000)]).await?;
    let b = inventory(&access, &[("A-1", 1000)]).await?;
    wait_replicas(&client, "inventory", 2).await?;
    let n = 30;
    for _ in 0..n {
        let cmd = command(&uuid::Uuid::now_v7().to_string(), "reserve", &[("A-1", 2)], 1);
        let (r1, r2) = tokio::join!(
            send_until_decided(&client, &cmd),
            send_until_decided(&client, &cmd)
        );
        let (r1, r2) = (r1?, r2?);
        ensure!(matches!(r1, Reply::Ok { .. }), "{r1:?}");
        ensure!(r1 == r2, "the same stored reply: {r1:?} / {r2:?}");
    }
    ensure!(
        stock(&client, "A-1").await? == (1000 - 2 * n, 2 * n),
        "one effect per command"
    );
    let held = effects(&client, "inventory").await?;
    ensure!(held.as_object().map(|m| m.len()) == Some(n as usize), "{held}");
    a.kill();
    b.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_charge_at_the_same_moment_on_two_replicas_books_one_ledger_entry() -> Result<()> {
    let server = NatsServer::start()?;
    let access = server.access();
    let client = access.connect().await?;
    let a = payment(&access).await?;
    let b = payment(&access).await?;
    wait_replicas(&client, "payment", 2).await?;
    let n = 20;
    for _ in 0..n {
        let cmd = command(&uuid::Uuid::now_v7().to_string(), "charge", &[("A-1", 1)], 700);
        let (r1, r2) = tokio::join!(
            send_until_decided(&client, &cmd),
            send_until_decided(&client, &cmd)
        );
        let (r1, r2) = (r1?, r2?);
        ensure!(matches!(r1, Reply::Ok { .. }), "{r1:?}");
        ensure!(r1 == r2, "one charge id: {r1:?} / {r2:?}");
    }
    let s = stats(&client, "payment").await?;
    ensure!(s["charges"] == n && s["charged_cents"] == 700 * n, "{s}");
    let ledger = effects(&client, "payment").await?;
    ensure!(
        ledger.as_object().map(|m| m.len()) == Some(n as usize),
        "{ledger}"
    );
    a.kill();
    b.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_its_replica_died_gets_the_stored_reply_from_the_other() -> Result<()> {
    let server = NatsServer::start()?;
    let access = server.access();
    let client = access.connect().await?;
    let first = inventory(&access, &[("A-1", 10)]).await?;
    wait_replicas(&client, "inventory", 1).await?;
    let saga = uuid::Uuid::now_v7().to_string();
    let reserve = command(&saga, "reserve", &[("A-1", 3)], 1);
    let answered = send(&client, &reserve).await?;
    ensure!(matches!(answered, Reply::Ok { .. }), "{answered:?}");
    // A compensation that overtakes its forward, on the first replica.
    let late = uuid::Uuid::now_v7().to_string();
    let release = send(&client, &command(&late, "release", &[("A-1", 1)], 1)).await?;
    ensure!(matches!(release, Reply::Ok { .. }), "{release:?}");

    let second = inventory(&access, &[("A-1", 10)]).await?;
    let http = second.http;
    first.kill();
    wait_replicas(&client, "inventory", 1).await?;
    ensure!(
        saga_testkit::http_get(http, "/ready").await?.0 == 200,
        "the survivor is ready"
    );
    let retried = send(&client, &reserve).await?;
    ensure!(retried == answered, "{retried:?} != {answered:?}");
    ensure!(stock(&client, "A-1").await? == (7, 3), "applied once");
    let forward = send(&client, &command(&late, "reserve", &[("A-1", 1)], 1)).await?;
    ensure!(
        forward == Reply::rejected(participants::store::TOMBSTONE_REASON),
        "{forward:?}"
    );
    ensure!(
        stock(&client, "A-1").await? == (7, 3),
        "the late forward did nothing"
    );
    second.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_sku_under_twenty_concurrent_reserves_ends_with_exact_stock() -> Result<()> {
    let server = NatsServer::start()?;
    let access = server.access();
    let client = access.connect().await?;
    let a = inventory(&access, &[("HOT", 15)]).await?;
    let b = inventory(&access, &[("HOT", 15)]).await?;
    wait_replicas(&client, "inventory", 2).await?;
    let sends = (0..20).map(|_| {
        let client = client.clone();
        let cmd = command(&uuid::Uuid::now_v7().to_string(), "reserve", &[("HOT", 1)], 1);
        tokio::spawn(async move { send_until_decided(&client, &cmd).await })
    });
    let mut ok = 0;
    for reply in futures::future::join_all(sends).await {
        match reply?? {
            Reply::Ok { .. } => ok += 1,
            Reply::Rejected { reason } => ensure!(reason == "insufficient_stock", "{reason}"),
            Reply::Error { reason } => anyhow::bail!("{reason}"),
        }
    }
    ensure!(ok == 15, "{ok} reserves succeeded");
    ensure!(stock(&client, "HOT").await? == (0, 15), "exact stock");
    a.kill();
    b.kill();
    Ok(())
}

/// Two stores on the same buckets, as two replicas' are: `a` caches the
/// root of its last write; `b` then commits a forward that holds 2 of the
/// counter; a compensation of it on `a` must see that, not `a`'s older root
/// (the compose cluster once failed a saga this way: every replica but the
/// one that reserved refused the release for 1.3 s, `reserved 0 < 1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_an_older_root_decides_again_before_it_refuses() -> Result<()> {
    use participants::store::{jetstream::JsStore, tx_get, tx_put, ParticipantStore, StateTx, TxError};
    let nats = NatsServer::start()?;
    let client = nats.connect().await?;
    let prefixes = ["meta/".to_string()];
    let open = || JsStore::open(&client, "inventory", 1, Duration::from_secs(3600), &prefixes);
    let (a, b) = (open().await?, open().await?);
    let hold = |n: u64| {
        move |tx: &mut dyn StateTx| {
            let held: u64 = tx_get(tx, "meta/held")?.unwrap_or(0);
            tx_put(tx, "meta/held", &(held + n))?;
            Ok(Reply::ok(serde_json::json!({ "held": n })))
        }
    };
    let release = |tx: &mut dyn StateTx, _: &str, data: &serde_json::Value| {
        let held: u64 = tx_get(tx, "meta/held")?.unwrap_or(0);
        let n = data["held"].as_u64().unwrap_or(0);
        if held < n {
            return Err(TxError::Abort(format!("held {held} < {n}")));
        }
        tx_put(tx, "meta/held", &(held - n))?;
        Ok(Reply::ok(serde_json::json!({ "undone": true })))
    };
    let (s1, s2) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let key = |s: &uuid::Uuid, kind| wire::idempotency_key(&s.to_string(), "hold", kind);
    a.apply_forward(&key(&s1, wire::CommandKind::Forward), &hold(1))
        .await?;
    b.apply_forward(&key(&s2, wire::CommandKind::Forward), &hold(2))
        .await?;
    let (reply, hit) = a
        .apply_compensation(&key(&s2, wire::CommandKind::Compensate), &release)
        .await
        .context("the compensation on the replica with the older root")?;
    ensure!(!hit && matches!(reply, Reply::Ok { .. }), "{reply:?}");
    let held: Option<Vec<u8>> = b.get("meta/held").await?;
    let held: u64 = participants::store::decode(b"meta/held", &held.context("no meta/held")?)?;
    ensure!(held == 1, "held {held}, expected the first forward's 1");
    Ok(())
}
