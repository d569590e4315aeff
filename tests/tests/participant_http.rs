//! The participants' HTTP surface end to end: a real nats-server, the
//! coordinator and both participants, orders driven over gRPC, then
//! `GET /metrics`, `/health` and `/ready` on each participant's own port.
//!
//! The participants' recorder is process-wide, so counters are compared before
//! and after (they only grow), never to absolute values; and the tests of this
//! file take turns ([`SERIAL`]): a participant that stops sets the shared
//! `participant_nats_connected` gauge to 0 while another test may be reading it.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use saga_proto::pb::SagaState;
use saga_testkit::*;
use saga_wire::{self as wire, CommandKind, Item, OrderPayload, Reply};

/// Sum of the samples of `name` whose labels include all of `labels`
/// (`None` when there is no such series).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric != name
            || !labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The participant's `/metrics` text (status 200 required).
async fn scrape(addr: SocketAddr) -> Result<String> {
    let (code, text) = http_get(addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}: {text}");
    Ok(text)
}

/// `participant_commands_total` for one participant, action and outcome (0 when absent).
async fn commands(addr: SocketAddr, participant: &str, action: &str, outcome: &str) -> Result<f64> {
    let text = scrape(addr).await?;
    Ok(sample(
        &text,
        "participant_commands_total",
        &[
            ("participant", participant),
            ("action", action),
            ("outcome", outcome),
        ],
    )
    .unwrap_or(0.0))
}

/// One test of this file at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn http_addrs(s: &System) -> Result<(SocketAddr, SocketAddr)> {
    let inventory = s.inventory.as_ref().context("no inventory")?.http_addr;
    let payment = s.payment.as_ref().context("no payment")?.http_addr;
    Ok((inventory, payment))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_serve_metrics_health_and_readiness_over_http() -> Result<()> {
    let _turn = SERIAL.lock().await;
    let mut s = System::up().await?;
    let (inventory, payment) = http_addrs(&s)?;
    assert_ne!(inventory, payment, "each participant has its own port");
    for addr in [inventory, payment] {
        assert_eq!(http_get(addr, "/health").await?, (200, "ok\n".to_string()));
        assert_eq!(http_get(addr, "/ready").await?, (200, "ready\n".to_string()));
    }

    let reserved_before = commands(inventory, "inventory", "reserve", "ok").await?;
    let charged_before = commands(payment, "payment", "charge", "ok").await?;
    let saga = s.run_order(order("c-1", &[("A-1", 1)], 100)).await?;
    assert_eq!(saga.state, SagaState::Completed as i32, "{saga:#?}");
    let reserved = commands(inventory, "inventory", "reserve", "ok").await?;
    let charged = commands(payment, "payment", "charge", "ok").await?;
    assert!(
        reserved > reserved_before,
        "reserve ok: {reserved_before} -> {reserved}"
    );
    assert!(
        charged > charged_before,
        "charge ok: {charged_before} -> {charged}"
    );

    let saga = s.run_order(order("c-2", &[("B-2", 1)], 200)).await?;
    assert_eq!(saga.state, SagaState::Completed as i32, "{saga:#?}");
    let moved = commands(inventory, "inventory", "reserve", "ok").await?;
    assert!(moved > reserved, "the counter moves: {reserved} -> {moved}");

    let text = scrape(inventory).await?;
    for needle in [
        "# TYPE participant_commands_total counter",
        "# TYPE participant_command_duration_seconds histogram",
        "participant_command_duration_seconds_bucket{participant=\"inventory\",action=\"reserve\"",
        "participant_command_duration_seconds_count{participant=\"inventory\",action=\"reserve\"}",
        "participant_nats_connected{participant=\"inventory\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing from /metrics:\n{text}");
    }
    let text = scrape(payment).await?;
    assert!(
        text.contains("participant_nats_connected{participant=\"payment\"} 1"),
        "{text}"
    );

    s.nats.kill();
    for addr in [inventory, payment] {
        eventually(Duration::from_secs(10), "/ready 503", || async {
            http_get(addr, "/ready")
                .await
                .is_ok_and(|(code, body)| code == 503 && body.contains("nats disconnected"))
        })
        .await?;
        assert_eq!(http_get(addr, "/health").await?.0, 200, "alive while not ready");
    }
    let text = scrape(inventory).await?;
    assert_eq!(
        sample(
            &text,
            "participant_nats_connected",
            &[("participant", "inventory")]
        ),
        Some(0.0),
        "{text}"
    );
    s.nats.restart()?;
    for addr in [inventory, payment] {
        eventually(Duration::from_secs(15), "/ready 200", || async {
            http_get(addr, "/ready").await.is_ok_and(|(code, _)| code == 200)
        })
        .await?;
    }
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_and_malformed_commands_are_counted() -> Result<()> {
    let _turn = SERIAL.lock().await;
    let s = System::up().await?;
    let (inventory, _) = http_addrs(&s)?;
    let saga_id = "0190b8a4-0000-7000-8000-0000000000aa";
    let step = "reserve-inventory";
    let cmd = wire::Command {
        saga_id: saga_id.into(),
        definition: "order@1".into(),
        step: step.into(),
        action: "reserve".into(),
        kind: CommandKind::Forward,
        attempt: 1,
        idempotency_key: wire::idempotency_key(saga_id, step, CommandKind::Forward),
        payload: OrderPayload {
            order_id: "o-1".into(),
            customer_id: "c-1".into(),
            items: vec![Item {
                sku: "A-1".into(),
                quantity: 1,
            }],
            amount_cents: 100,
            currency: "EUR".into(),
        },
        input: serde_json::Value::Null,
    };
    let text = scrape(inventory).await?;
    let hits_before = sample(
        &text,
        "participant_dedupe_hits_total",
        &[("participant", "inventory")],
    )
    .unwrap_or(0.0);
    let malformed_before = commands(inventory, "inventory", "reserve", "malformed").await?;
    let unknown_before = commands(inventory, "inventory", "unknown", "malformed").await?;

    let subject = wire::command_subject("inventory", "reserve");
    let mut replies = Vec::new();
    for attempt in 1..=3 {
        let cmd = wire::Command {
            attempt,
            ..cmd.clone()
        };
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            s.client
                .request(subject.clone(), serde_json::to_vec(&cmd)?.into()),
        )
        .await??;
        replies.push(serde_json::from_slice::<Reply>(&msg.payload)?);
    }
    assert!(matches!(replies[0], Reply::Ok { .. }), "{replies:?}");
    assert!(replies.iter().all(|r| r == &replies[0]), "{replies:?}");
    for (subject, body) in [
        ("saga.cmd.inventory.reserve", &b"not json"[..]),
        ("saga.cmd.inventory.explode", b"{}"),
    ] {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            s.client.request(subject, body.to_vec().into()),
        )
        .await??;
        let reply: Reply = serde_json::from_slice(&msg.payload)?;
        assert!(matches!(reply, Reply::Error { .. }), "{reply:?}");
    }

    let text = scrape(inventory).await?;
    let hits = sample(
        &text,
        "participant_dedupe_hits_total",
        &[("participant", "inventory")],
    )
    .unwrap_or(0.0);
    assert!(
        hits >= hits_before + 2.0,
        "dedupe hits: {hits_before} -> {hits}\n{text}"
    );
    let malformed = commands(inventory, "inventory", "reserve", "malformed").await?;
    assert!(
        malformed > malformed_before,
        "malformed: {malformed_before} -> {malformed}"
    );
    let unknown = commands(inventory, "inventory", "unknown", "malformed").await?;
    assert!(
        unknown > unknown_before,
        "unknown action: {unknown_before} -> {unknown}"
    );
    assert!(
        !text.contains("action=\"explode\""),
        "an action from the wire never becomes a label"
    );
    // The stats subject keeps its own per-instance figures.
    assert_eq!(stats(&s.client, "inventory").await?["dedupe_hits"], 2);
    s.shutdown().await
}
