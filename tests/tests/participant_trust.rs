//! What a participant does with commands and admin requests no coordinator
//! sent (issue 15): a real nats-server per test and the participants in
//! this process, driven over raw NATS, no coordinator.
//!
//! - forged commands with values no order could have are refused and change
//!   nothing (finding 2);
//! - `effects` comes in pages, each reply far under NATS's 1 MiB, past the
//!   size that used to stop it answering (finding 3);
//! - `stats` are counters kept with the effects, answered while commands run
//!   (finding 4);
//! - an upper-case, future-dated saga id is refused, and one stored by an
//!   older release does not stop pruning (finding 5).

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use saga_testkit::{chaos::effects, *};
use saga_wire::{self as wire, CommandKind, Item, OrderPayload, Reply};
use serde_json::json;

const NATS_LIMIT: usize = 1024 * 1024;
const HOUR_MS: u64 = 3_600_000;

/// A UUID v7 whose timestamp is `ms`.
fn v7_at(ms: u64) -> String {
    uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        ms / 1000,
        u32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
    ))
    .to_string()
}

fn order() -> OrderPayload {
    OrderPayload {
        order_id: "o-1".into(),
        customer_id: "c-1".into(),
        items: vec![Item {
            sku: "A-1".into(),
            quantity: 1,
        }],
        amount_cents: 700,
        currency: "EUR".into(),
    }
}

/// A well-formed command of `saga_id` for `action` (the order saga's steps).
fn command(saga_id: &str, action: &str) -> wire::Command {
    order_command(saga_id, action, order())
}

fn participant_of(action: &str) -> &'static str {
    match action {
        "reserve" | "release" => "inventory",
        _ => "payment",
    }
}

/// Sends `cmd` as JSON on its subject; the reply.
async fn send(client: &async_nats::Client, cmd: &wire::Command) -> Result<Reply> {
    let subject = wire::command_subject(participant_of(&cmd.action), &cmd.action);
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject, serde_json::to_vec(cmd)?.into()),
    )
    .await
    .context("command timed out")??;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// Everything a forged command could have changed: stock, ledger, both effects.
async fn figures(client: &async_nats::Client) -> Result<serde_json::Value> {
    let inventory = stats(client, "inventory").await?;
    let payment = stats(client, "payment").await?;
    Ok(json!({
        "stock": inventory["stock"],
        "ledger": [payment["charged_cents"], payment["refunded_cents"], payment["charges"], payment["refunds"]],
        "held": effects(client, "inventory").await?,
        "charged": effects(client, "payment").await?,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_with_values_no_order_could_have_are_refused_and_change_nothing() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    let before = figures(&s.client).await?;

    let saga = uuid::Uuid::now_v7().to_string();
    let upper = v7_at(now_ms() + 24 * HOUR_MS).to_uppercase();
    type Forge = fn(&mut wire::Command);
    let with_saga = |c: &mut wire::Command, id: &str| {
        c.saga_id = id.into();
        c.idempotency_key = wire::idempotency_key(id, &c.step, c.kind);
    };
    // (what, action, forgery, the field the refusal must name)
    let payload_cases: &[(&str, &str, Forge, &str)] = &[
        (
            "negative amount",
            "charge",
            |c| c.payload.amount_cents = -50_000,
            "amount_cents",
        ),
        (
            "zero amount",
            "charge",
            |c| c.payload.amount_cents = 0,
            "amount_cents",
        ),
        (
            "lower-case currency",
            "charge",
            |c| c.payload.currency = "eur".into(),
            "currency",
        ),
        (
            "made-up currency",
            "charge",
            |c| c.payload.currency = "E1R".into(),
            "currency",
        ),
        (
            "empty customer",
            "charge",
            |c| c.payload.customer_id.clear(),
            "customer_id",
        ),
        (
            "customer with U+202E",
            "charge",
            |c| c.payload.customer_id = "c-\u{202E}1".into(),
            "customer_id",
        ),
        (
            "order id with U+2028",
            "charge",
            |c| c.payload.order_id = "o\u{2028}1".into(),
            "order_id",
        ),
        ("no items", "reserve", |c| c.payload.items.clear(), "items"),
        (
            "quantity 0 of a new SKU named with U+202E",
            "reserve",
            |c| {
                c.payload.items = vec![Item {
                    sku: "\u{202E}1-A".into(),
                    quantity: 0,
                }]
            },
            "items[0]",
        ),
        (
            "an unknown SKU with U+202E",
            "reserve",
            |c| {
                c.payload.items = vec![Item {
                    sku: "Z-\u{202E}9".into(),
                    quantity: 1,
                }]
            },
            "items[0].sku",
        ),
        (
            "SKU with U+200B",
            "reserve",
            |c| c.payload.items[0].sku = "A-1\u{200B}".into(),
            "items[0].sku",
        ),
    ];
    for (what, action, forge, field) in payload_cases {
        let mut cmd = command(&saga, action);
        forge(&mut cmd);
        let reply = send(&s.client, &cmd).await?;
        match &reply {
            Reply::Rejected { reason } => {
                ensure!(reason.starts_with("invalid_payload"), "{what}: {reason}");
                ensure!(reason.contains(field), "{what}: {reason} should name {field}");
            }
            other => anyhow::bail!("{what}: answered {other:?}"),
        }
    }
    let envelope_cases: &[(&str, &str, &str)] = &[
        ("empty saga id", "charge", ""),
        ("saga id not a UUID", "charge", "not-a-uuid"),
        ("upper-case future-dated saga id", "reserve", &upper),
        ("saga id without hyphens", "reserve", &saga.replace('-', "")),
    ];
    for (what, action, id) in envelope_cases {
        let mut cmd = command(&saga, action);
        with_saga(&mut cmd, id);
        let reply = send(&s.client, &cmd).await?;
        ensure!(
            matches!(&reply, Reply::Error { reason } if reason.contains("saga_id")),
            "{what}: answered {reply:?}"
        );
    }
    // A well-formed reserve of a SKU the stock table does not hold.
    let mut unknown = command(&uuid::Uuid::now_v7().to_string(), "reserve");
    unknown.payload.items[0].sku = "NOPE-1".into();
    assert_eq!(send(&s.client, &unknown).await?, Reply::rejected("unknown_sku"));
    // A forged release and refund of something never reserved or charged:
    // the protocol's "nothing to undo" (and its tombstone), no figure moves.
    for action in ["release", "refund"] {
        let reply = send(&s.client, &command(&uuid::Uuid::now_v7().to_string(), action)).await?;
        ensure!(
            matches!(&reply, Reply::Ok { data } if data["undone"] == false),
            "forged {action}: {reply:?}"
        );
    }
    let after = figures(&s.client).await?;
    assert_eq!(after, before, "no refused command changed a figure");
    ensure!(
        !after["stock"]
            .as_object()
            .is_some_and(|m| m.keys().any(|k| k.contains('\u{202E}'))),
        "no stock row for a forged SKU"
    );
    // Nothing was stored under the refused keys: the real charge and reserve
    // of that saga are applied, not answered from a stored refusal.
    assert!(matches!(
        send(&s.client, &command(&saga, "charge")).await?,
        Reply::Ok { .. }
    ));
    assert!(matches!(
        send(&s.client, &command(&saga, "reserve")).await?,
        Reply::Ok { .. }
    ));
    assert_eq!(ledger(&s.client).await?, (700, 0));
    assert_eq!(stock(&s.client, "A-1").await?, (9, 1));
    s.shutdown().await
}

/// Writes `n` reservations of one unit of `A-1` into a stopped inventory's
/// database, as the inventory stores them (`reservation/<forward key>`).
fn seed_reservations(dir: &Path, n: usize) -> Result<Vec<String>> {
    let db = participants::open_db(dir)?;
    let state = db.open_tree("state")?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let key = format!(
            "reservation/{}",
            wire::idempotency_key(&id, "reserve-inventory", CommandKind::Forward)
        );
        state.insert(key.as_bytes(), participants::dedupe::encode(&json!({"A-1": 1}))?)?;
        ids.push(id);
    }
    db.flush()?;
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_come_in_pages_each_far_under_the_nats_limit() -> Result<()> {
    let s = System::bare(None).await?;
    // 60,000 reservations: about 3 MB as one `{saga_id: {...}}` map.
    let ids = seed_reservations(&s.path("inventory"), 60_000)?;
    let inventory = start_inventory(&s.nats.access(), &s.path("inventory"), STOCK).await?;
    wait_participant(&s.client, "inventory").await?;

    let subject = wire::effects_subject("inventory");
    let mut request = wire::EffectsRequest {
        cursor: None,
        limit: Some(1_000_000), // capped by the participant
    };
    let (mut seen, mut pages, mut largest) = (std::collections::BTreeSet::new(), 0, 0);
    loop {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            s.client
                .request(subject.clone(), serde_json::to_vec(&request)?.into()),
        )
        .await
        .context("an effects page timed out")??;
        largest = largest.max(msg.payload.len());
        ensure!(
            msg.payload.len() < NATS_LIMIT,
            "a page of {} bytes",
            msg.payload.len()
        );
        let page: wire::EffectsPage = serde_json::from_slice(&msg.payload)?;
        ensure!(
            page.effects.len() <= wire::EFFECTS_PAGE_MAX as usize,
            "{} entries",
            page.effects.len()
        );
        for (saga, held) in &page.effects {
            assert_eq!(held, &json!({"A-1": 1}));
            ensure!(seen.insert(saga.clone()), "{saga} on two pages");
        }
        pages += 1;
        match page.next_cursor {
            Some(c) => request.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), ids.len(), "every reservation on some page");
    ensure!(ids.iter().all(|id| seen.contains(id)));
    assert!(pages >= 60, "{pages} pages");
    tracing::info!(pages, largest, "effects paged");
    // The kit's helper pages the same way; an empty body is the first page.
    assert_eq!(
        effects(&s.client, "inventory")
            .await?
            .as_object()
            .map(|m| m.len()),
        Some(ids.len())
    );
    let first = s.client.request(subject, "".into()).await?;
    let first: wire::EffectsPage = serde_json::from_slice(&first.payload)?;
    assert_eq!(first.effects.len(), wire::EFFECTS_PAGE_DEFAULT as usize);
    inventory.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_counters_kept_with_the_ledger_and_answered_while_commands_run() -> Result<()> {
    let s = System::bare(None).await?;
    let settings = PaymentSettings {
        gateway_latency: Duration::from_millis(20),
        ..PaymentSettings::default()
    };
    let payment = start_payment(&s.nats.access(), &s.path("payment"), &settings).await?;
    wait_participant(&s.client, "payment").await?;

    // 60 charges in flight while stats are asked for over and over.
    let charges: Vec<_> = (0..60i64)
        .map(|i| {
            let mut cmd = command(&uuid::Uuid::now_v7().to_string(), "charge");
            cmd.payload.amount_cents = 100 + i;
            let client = s.client.clone();
            tokio::spawn(async move { send(&client, &cmd).await })
        })
        .collect();
    let mut last = 0;
    for _ in 0..100 {
        let figures = stats(&s.client, "payment").await?;
        let charged = figures["charges"].as_u64().context("charges")?;
        ensure!(charged >= last, "charges went back from {last} to {charged}");
        last = charged;
    }
    for c in charges {
        let reply = c.await??;
        ensure!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
    }
    let want: i64 = (0..60).map(|i| 100 + i).sum();
    let figures = stats(&s.client, "payment").await?;
    assert_eq!(
        (&figures["charges"], &figures["charged_cents"]),
        (&60.into(), &want.into())
    );
    // The counters equal a fresh scan of the ledger (the effects pages).
    let scan: i64 = effects(&s.client, "payment")
        .await?
        .as_object()
        .context("effects")?
        .values()
        .map(|e| e["amount_cents"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(scan, want);
    payment.stop().await?;

    // The figures are read from the counters, not from a scan: an entry
    // written into the ledger behind the service's back shows in the
    // effects (a scan) and not in the stats.
    {
        let db = participants::open_db(&s.path("payment"))?;
        let entry = json!({"charge_id": "ch_planted", "order_id": "o", "customer_id": "c",
                           "amount_cents": 5, "currency": "EUR", "refunded": false});
        let key = format!("charge/{}/charge-payment/forward", uuid::Uuid::now_v7());
        db.open_tree("state")?
            .insert(key.as_bytes(), participants::dedupe::encode(&entry)?)?;
        db.flush()?;
    }
    let payment = start_payment(&s.nats.access(), &s.path("payment"), &settings).await?;
    wait_participant(&s.client, "payment").await?;
    let figures = stats(&s.client, "payment").await?;
    assert_eq!(
        figures["charged_cents"],
        json!(want),
        "kept through the restart, no rescan"
    );
    assert_eq!(
        effects(&s.client, "payment").await?.as_object().map(|m| m.len()),
        Some(61)
    );
    payment.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_dated_upper_case_saga_id_is_refused_and_cannot_stop_pruning() -> Result<()> {
    let s = System::bare(None).await?;
    let dir = s.path("inventory");
    let now = now_ms();
    // A database from before the time index: three replies of sagas started
    // two hours ago, and one under an upper-case saga id dated a day ahead,
    // which sorts before all of them.
    let expired: Vec<String> = (0..3).map(|i| v7_at(now - 2 * HOUR_MS - i * 1000)).collect();
    let forged = v7_at(now + 24 * HOUR_MS).to_uppercase();
    ensure!(expired.iter().all(|e| forged < *e), "{forged} sorts first");
    let stored = Reply::ok(json!({"seeded": true}));
    {
        let db = participants::open_db(&dir)?;
        let replies = db.open_tree("replies")?;
        for id in expired.iter().chain([&forged]) {
            let key = wire::idempotency_key(id, "reserve-inventory", CommandKind::Forward);
            replies.insert(key.as_bytes(), participants::dedupe::encode(&stored)?)?;
        }
        db.flush()?;
    }
    let mut config = participants::inventory::InventoryConfig::for_tests(
        &s.nats.url(),
        &dir,
        STOCK.iter().map(|(k, n)| ((*k).to_string(), *n)).collect(),
    );
    config.nats_security = s.nats.access().security(&Role::Participant("inventory".into()));
    config.retention = participants::ReplyRetention {
        reply_retention: Duration::from_secs(3600),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(participants::inventory::run(config, listener, shutdown.clone()));
    wait_participant(&s.client, "inventory").await?;

    // The forged id itself is refused as a command.
    let reply = send(&s.client, &command(&forged, "reserve")).await?;
    ensure!(
        matches!(&reply, Reply::Error { reason } if reason.contains("saga_id")),
        "{reply:?}"
    );

    // The expired replies are pruned: their commands are applied again
    // instead of being answered from the stored reply.
    for id in &expired {
        let cmd = command(id, "reserve");
        eventually(Duration::from_secs(10), "the expired reply to be pruned", || {
            let (client, cmd, stored) = (s.client.clone(), cmd.clone(), stored.clone());
            async move { send(&client, &cmd).await.is_ok_and(|r| r != stored) }
        })
        .await?;
        let reply = send(&s.client, &cmd).await?;
        ensure!(
            matches!(&reply, Reply::Ok { data } if data["reservation_id"].is_string()),
            "{reply:?}"
        );
    }
    assert_eq!(stock(&s.client, "A-1").await?, (7, 3));
    shutdown.cancel();
    task.await??;

    // The forged reply is kept (indexed at the upgrade, it goes one
    // retention from now), the expired ones were replaced by the new replies.
    let db = participants::open_db(&dir)?;
    let replies = db.open_tree("replies")?;
    let forged_key = wire::idempotency_key(&forged, "reserve-inventory", CommandKind::Forward);
    ensure!(
        replies.contains_key(forged_key.as_bytes())?,
        "the forged reply is still there"
    );
    assert_eq!(
        db.open_tree("replies-by-time")?.len(),
        replies.len(),
        "every reply indexed"
    );
    Ok(())
}
