//! Saga events on JetStream: every transition published after it is durable,
//! in order, exactly once, with the definition's domain aliases, through a
//! JetStream outage and a re-publish after a restart.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use saga_proto::pb::{self, SagaState};
use saga_testkit::*;
use saga_wire::SagaEvent;

const STREAM: &str = "SAGA_EVENTS";

/// A validator of `saga-event.v1.json`, with `order.v1.json` registered for its `$ref`.
fn event_schema() -> Result<jsonschema::Validator> {
    let dir = shipped_definitions().join("schemas");
    let read = |f: &str| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(dir.join(f))?)?)
    };
    let registry = jsonschema::Registry::new()
        .add(
            "https://saga-engine.invalid/schemas/order.v1.json",
            read("order.v1.json")?,
        )?
        .prepare()?;
    Ok(jsonschema::options()
        .with_registry(&registry)
        .build(&read("saga-event.v1.json")?)?)
}

/// The stream's events of `saga_id` under `saga.events.…`, in stream order.
fn of_saga(all: &[(String, SagaEvent)], saga_id: &str) -> Vec<SagaEvent> {
    all.iter()
        .filter(|(subject, e)| subject.starts_with("saga.events.") && e.saga_id == saga_id)
        .map(|(_, e)| e.clone())
        .collect()
}

/// Sequences 1..=n in order, each once, matching the saga's history kinds.
fn check_against_history(events: &[SagaEvent], saga: &pb::Saga) -> Result<()> {
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    let want: Vec<u64> = (1..=saga.history.len() as u64).collect();
    ensure!(
        seqs == want,
        "saga {}: sequences {seqs:?}, want {want:?}",
        saga.saga_id
    );
    for (e, h) in events.iter().zip(&saga.history) {
        ensure!(
            e.event == h.kind,
            "seq {}: event {} but history {}",
            e.sequence,
            e.event,
            h.kind
        );
        ensure!(e.definition == saga.definition && e.correlation_id == saga.correlation_id);
    }
    Ok(())
}

#[tokio::test]
async fn completed_and_compensated_sagas_publish_their_events_in_order_with_aliases() -> Result<()> {
    let s = System::up().await?;
    let mut aliases = s.client.subscribe("orders.>").await?;
    let done = s.run_order(order("c-1", &[("A-1", 2)], 1500)).await?;
    let undone = s
        .run_order(order("c-1", &[("A-1", 1), ("RARE-1", 5)], 700))
        .await?;
    assert_eq!(done.state, SagaState::Completed as i32);
    assert_eq!(undone.state, SagaState::Compensated as i32);

    let all = events_until(&s.client, |all| {
        of_saga(all, &done.saga_id).len() >= done.history.len()
            && of_saga(all, &undone.saga_id).len() >= undone.history.len()
    })
    .await?;
    let schema = event_schema()?;
    for saga in [&done, &undone] {
        let events = of_saga(&all, &saga.saga_id);
        check_against_history(&events, saga)?;
        for e in &events {
            let json = serde_json::to_value(e)?;
            let first = schema.iter_errors(&json).next().map(|err| err.to_string());
            if let Some(err) = first {
                anyhow::bail!("event {} #{} violates the schema: {err}", e.event, e.sequence);
            }
        }
    }
    let last = |id: &str| of_saga(&all, id).last().map(|e| e.event.clone());
    assert_eq!(last(&done.saga_id).as_deref(), Some("completed"));
    assert_eq!(last(&undone.saga_id).as_deref(), Some("compensated"));
    // Subjects carry the definition name and the event.
    assert!(all
        .iter()
        .any(|(subj, e)| subj == "saga.events.order.step_rejected" && e.saga_id == undone.saga_id));

    // The domain aliases of order.yaml: created ×2, completed, cancelled, with the same payload.
    let mut got: BTreeMap<String, Vec<SagaEvent>> = BTreeMap::new();
    while got.values().map(Vec::len).sum::<usize>() < 4 {
        let msg = tokio::time::timeout(Duration::from_secs(10), aliases.next())
            .await
            .context("alias events")?
            .context("alias subscription closed")?;
        got.entry(msg.subject.to_string())
            .or_default()
            .push(serde_json::from_slice(&msg.payload)?);
    }
    let ids = |subject: &str| -> Vec<String> {
        got.get(subject)
            .map(|v| v.iter().map(|e| e.saga_id.clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        ids("orders.created"),
        [done.saga_id.clone(), undone.saga_id.clone()]
    );
    assert_eq!(ids("orders.completed"), std::slice::from_ref(&done.saga_id));
    assert_eq!(ids("orders.cancelled"), std::slice::from_ref(&undone.saga_id));
    let cancelled = &got["orders.cancelled"][0];
    assert_eq!(Some(cancelled), of_saga(&all, &undone.saga_id).last());
    // The alias copies are in the stream too.
    assert!(all.iter().any(|(subj, _)| subj == "orders.completed"));

    // `sagactl tail --from-start` shows the same events, in order.
    let bin = bin_dir()?;
    let url = s.nats.url();
    let nkey = s
        .nats
        .access()
        .security(&Role::Events)
        .nats_nkey
        .context("the kit's server has users")?
        .display()
        .to_string();
    let n = (done.history.len() + undone.history.len()).to_string();
    let out = run(
        &bin.join("sagactl"),
        &[
            "--json",
            "tail",
            "--from-start",
            "--limit",
            &n,
            "--nats-url",
            &url,
            "--nats-nkey",
            &nkey,
        ],
    )
    .await?;
    let tailed: Vec<SagaEvent> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("sagactl tail --json lines")?;
    let streamed: Vec<SagaEvent> = all
        .iter()
        .filter(|(subj, _)| subj.starts_with("saga.events."))
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(tailed, streamed);

    // `sagactl watch` of a finished saga prints its history and ends.
    let coordinator = s.coordinator.as_ref().context("coordinator")?;
    let addr = format!("http://{}", coordinator.addr);
    let watched = run(&bin.join("sagactl"), &["--addr", &addr, "watch", &undone.saga_id]).await?;
    ensure!(
        watched.lines().count() == undone.history.len()
            && watched
                .lines()
                .last()
                .is_some_and(|l| l.contains("COMPENSATED") && l.ends_with("compensated")),
        "{watched}"
    );

    // The revenue example, a durable consumer, counts each saga once.
    let example = bin.join("examples").join("revenue");
    ensure!(
        example.is_file(),
        "{} missing: cargo build --workspace --bins --examples (make test does)",
        example.display()
    );
    let out = run(
        &example,
        &["--nats-url", &url, "--nats-nkey", &nkey, "--limit", "2"],
    )
    .await?;
    ensure!(
        out.lines()
            .last()
            .is_some_and(|l| l.ends_with("completed 1, cancelled 1, failed 0, revenue 15.00 EUR")),
        "{out}"
    );
    s.shutdown().await
}

/// The stream's events once `enough` holds for them (10 s at most).
async fn events_until(
    client: &async_nats::Client,
    enough: impl Fn(&[(String, SagaEvent)]) -> bool,
) -> Result<Vec<(String, SagaEvent)>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = stream_events(client, STREAM).await.unwrap_or_default();
        if enough(&all) || std::time::Instant::now() > deadline {
            return Ok(all);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a binary of the workspace to completion (20 s at most); its stdout.
async fn run(bin: &Path, args: &[&str]) -> Result<String> {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .with_context(|| format!("{} did not finish", bin.display()))??;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

async fn backlog(c: &RunningCoordinator) -> Option<f64> {
    let (_, text) = http_get(c.http_addr, "/metrics").await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("saga_events_backlog "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn events_wait_out_an_outage_and_a_republish_after_a_crash_is_stored_once() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    s.start_coordinator().await?;

    // NATS (and JetStream) down: a saga is created; its first events are
    // committed but cannot be published. Stop the coordinator with them waiting.
    s.nats.kill();
    let mut g = s.grpc().await?;
    let created = g
        .create_order(order("c-1", &[("A-1", 1)], 900))
        .await?
        .into_inner();
    s.stop_coordinator().await?;
    // A copy of the store in that state: starting from it later is exactly a
    // coordinator killed after publishing but before it recorded the publication.
    let snapshot = s.path("coordinator-snapshot");
    copy_dir(&s.path("coordinator"), &snapshot)?;

    // NATS back, coordinator back: the waiting events go out, the saga finishes.
    s.nats.restart()?;
    s.client = s.nats.connect().await?;
    wait_participant(&s.client, "inventory").await?;
    wait_participant(&s.client, "payment").await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let saga = wait_terminal(&mut g, &created.saga_id, Duration::from_secs(30)).await?;
    ensure!(saga.state == SagaState::Completed as i32, "{saga:?}");
    let events = of_saga(
        &events_until(&s.client, |all| {
            of_saga(all, &created.saga_id).len() >= saga.history.len()
        })
        .await?,
        &created.saga_id,
    );
    check_against_history(&events, &saga)?;
    s.stop_coordinator().await?;

    // The stale copy re-publishes its waiting events (same saga, same sequences)
    // and resumes the saga (participants answer from their stored replies):
    // JetStream drops every copy, the stream still holds each event once.
    let replay = RunningCoordinator::start(&s.nats.access(), &snapshot, &s.definitions).await?;
    replay.wait_ready().await?;
    let mut g2 = replay.client().await?;
    wait_terminal(&mut g2, &created.saga_id, Duration::from_secs(30)).await?;
    eventually(
        Duration::from_secs(10),
        "the replayed outbox published",
        || async { backlog(&replay).await == Some(0.0) },
    )
    .await?;
    let all = stream_events(&s.client, STREAM).await?;
    check_against_history(&of_saga(&all, &created.saga_id), &saga)?;
    ensure!(
        get_from(&mut g2, &created.saga_id).await?.history.len() == saga.history.len(),
        "the replay wrote a different history"
    );
    replay.stop().await?;
    s.shutdown().await
}

async fn get_from(
    g: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
    id: &str,
) -> Result<pb::Saga> {
    Ok(g.get_saga(pb::GetSagaRequest { saga_id: id.into() })
        .await?
        .into_inner())
}

#[tokio::test]
async fn no_events_when_disabled() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.no_events = true;
    })
    .await?;
    c.wait_ready().await?;
    let mut g = c.client().await?;
    let created = g
        .create_order(order("c-1", &[("A-1", 1)], 900))
        .await?
        .into_inner();
    wait_terminal(&mut g, &created.saga_id, Duration::from_secs(20)).await?;
    let js = async_nats::jetstream::new(s.client.clone());
    ensure!(
        js.get_stream(STREAM).await.is_err(),
        "the stream exists although events are off"
    );
    c.stop().await?;
    s.shutdown().await
}

/// With a linger the publisher, once caught up, waits before it publishes what
/// woke it: the first event of a saga reaches NATS no sooner than the linger
/// after it happened, and every event still goes out once and in order.
#[tokio::test]
async fn a_linger_holds_events_back_and_loses_none() -> Result<()> {
    let linger = Duration::from_millis(400);
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.events_linger = linger;
    })
    .await?;
    c.wait_ready().await?;
    let mut live = s.client.subscribe("saga.events.>").await?;
    s.client.flush().await?;
    let mut g = c.client().await?;
    let created = g
        .create_order(order("c-1", &[("A-1", 1)], 900))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .context("the first event")?
        .context("subscription closed")?;
    let seen_ms = now_ms();
    let first: SagaEvent = serde_json::from_slice(&first.payload)?;
    ensure!(
        first.saga_id == created.saga_id && first.sequence == 1,
        "{first:?}"
    );
    // Both clocks are the host's, in whole milliseconds.
    let held = seen_ms.saturating_sub(first.at_ms);
    ensure!(
        u128::from(held) + 1 >= linger.as_millis(),
        "the first event came {held} ms after it happened, within the {linger:?} linger"
    );
    let saga = wait_terminal(&mut g, &created.saga_id, Duration::from_secs(20)).await?;
    let all = events_until(&s.client, |all| {
        of_saga(all, &created.saga_id).len() >= saga.history.len()
    })
    .await?;
    check_against_history(&of_saga(&all, &created.saga_id), &saga)?;
    c.stop().await?;
    s.shutdown().await
}
