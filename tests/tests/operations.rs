//! Stuck and poison sagas, operator actions and circuit breakers, with a real
//! nats-server and a scripted fake participant where a fault must be exact.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;
use futures::StreamExt;
use saga_proto::pb::{self, SagaState, StepStatus};
use saga_testkit::*;
use saga_wire::Reply;
use tonic::{metadata::MetadataValue, Code};

const TOKEN: &str = "operator-token-0123456789";

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = MetadataValue::try_from(format!("Bearer {t}")) {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

/// Places an order for `items` on the `fake` definition and waits until
/// its saga is terminal; returns its id and final state.
async fn run_fake_saga(
    g: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
    items: &[(&str, u32)],
) -> Result<(String, pb::Saga)> {
    let req = pb::CreateOrderRequest {
        definition: "fake".into(),
        ..order("c-1", items, 100)
    };
    let id = g.create_order(req).await?.into_inner().saga_id;
    let done = wait_terminal(g, &id, WAIT).await?;
    Ok((id, done))
}

async fn start_coordinator(s: &mut System) -> Result<()> {
    start_coordinator_with(s, |_| {}).await
}

/// The coordinator with the operator token and `tweak` applied.
async fn start_coordinator_with(s: &mut System, tweak: impl FnOnce(&mut coordinator::Config)) -> Result<()> {
    let c = RunningCoordinator::start_with(
        &s.nats.access(),
        &s.dir.path().join("coordinator"),
        &s.definitions,
        |c| {
            c.operator_token = Some(TOKEN.into());
            tweak(c);
        },
    )
    .await?;
    c.wait_ready().await?;
    s.coordinator = Some(c);
    Ok(())
}

async fn saga(s: &System, id: &str) -> Result<pb::Saga> {
    Ok(s.grpc()
        .await?
        .get_saga(pb::GetSagaRequest { saga_id: id.into() })
        .await?
        .into_inner())
}

/// A saga held in `charge-payment` retries (payment is not running).
async fn stuck_in_payment() -> Result<(System, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let defs = fast_definitions(dir.path(), "300ms", 1000)?;
    let mut s = System::bare(Some(defs)).await?;
    s.start_inventory().await?;
    start_coordinator(&mut s).await?;
    let id = s
        .grpc()
        .await?
        .create_order(order("c-1", &[("A-1", 2)], 1999))
        .await?
        .into_inner()
        .saga_id;
    let probe = s.grpc().await?;
    wait_saga(&probe, &id, "saga waiting on payment", |r| {
        r.current_step == "charge-payment" && r.steps[1].attempts >= 2
    })
    .await?;
    Ok((s, id, dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_rpcs_need_the_bearer_token_and_change_nothing_without_it() -> Result<()> {
    let (s, id, _defs) = stuck_in_payment().await?;
    let mut g = s.grpc().await?;
    let abort = || pb::AbortSagaRequest {
        saga_id: id.clone(),
        reason: "test".into(),
    };
    let err = g
        .abort_saga(with_token(abort(), None))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = g
        .abort_saga(with_token(abort(), Some("operator-token-wrong-000000")))
        .await
        .expect_err("bad");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = g
        .retry_saga(with_token(pb::RetrySagaRequest { saga_id: id.clone() }, None))
        .await
        .expect_err("no");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let now = saga(&s, &id).await?;
    assert_eq!(now.state, SagaState::Running as i32, "nothing changed");
    assert!(!now.history.iter().any(|h| h.kind == "aborted"));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_compensates_a_running_saga_including_the_step_in_flight() -> Result<()> {
    let (s, id, _defs) = stuck_in_payment().await?;
    assert_eq!(stock(&s.client, "A-1").await?, (8, 2));
    let mut g = s.grpc().await?;
    let resp = g
        .abort_saga(with_token(
            pb::AbortSagaRequest {
                saga_id: id.clone(),
                reason: "customer called".into(),
            },
            Some(TOKEN),
        ))
        .await?
        .into_inner();
    assert_eq!(resp.saga_id, id);
    // The charge in flight is compensated too; payment is down, so start it.
    let mut s = s;
    s.start_payment(&PaymentSettings::default()).await?;
    let done = wait_terminal(&mut g, &id, WAIT).await?;
    assert_eq!(done.state, SagaState::Compensated as i32, "{done:#?}");
    assert_eq!(done.reason, "aborted: customer called");
    assert!(done
        .history
        .iter()
        .any(|h| h.kind == "aborted" && h.detail == "customer called"));
    assert_eq!(stock(&s.client, "A-1").await?, (10, 0));
    // A retry of the charge that was already waiting may reach payment before
    // or after the refund: either the tombstone keeps it out, or the refund
    // undoes it. Either way no money moves in the end.
    let (charged, refunded) = ledger(&s.client).await?;
    assert_eq!(charged, refunded, "net effect of an aborted saga");
    assert!(charged == 0 || charged == 1999, "at most one charge: {charged}");
    let again = pb::AbortSagaRequest {
        saga_id: id.clone(),
        reason: String::new(),
    };
    let err = g
        .abort_saga(with_token(again, Some(TOKEN)))
        .await
        .expect_err("terminal");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let unknown = pb::AbortSagaRequest {
        saga_id: "0190b8a4-0000-7000-8000-0000000000ff".into(),
        reason: String::new(),
    };
    assert_eq!(
        g.abort_saga(with_token(unknown, Some(TOKEN)))
            .await
            .map_err(|e| e.code())
            .err(),
        Some(Code::NotFound)
    );
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_out_of_retries_fails_with_a_dead_letter_and_an_operator_retry_finishes_it(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = System::bare(Some(fake_definitions(dir.path(), 3)?)).await?;
    s.start_inventory().await?;
    // The fake step succeeds; its compensation fails while `broken` is set.
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let fake = FakeParticipant::start(&s.client, "fake", move |cmd, _| match cmd.action.as_str() {
        "undo" if b.load(Ordering::SeqCst) => FakeAnswer::Reply(Reply::error("undo backend down")),
        _ => FakeAnswer::Reply(Reply::ok(serde_json::json!({}))),
    })
    .await?;
    let mut dlq = s.client.subscribe("saga.dlq").await?;
    s.client.flush().await?;
    start_coordinator(&mut s).await?;
    let mut g = s.grpc().await?;
    // RARE-1 has 1 unit: the reservation is rejected, so fake-step is compensated.
    let (id, failed) = run_fake_saga(&mut g, &[("RARE-1", 5)]).await?;
    assert_eq!(failed.state, SagaState::Failed as i32, "{failed:#?}");
    assert_eq!(failed.steps[0].status, StepStatus::CompensationFailed as i32);
    assert_eq!(failed.steps[0].compensation_attempts, 3);
    assert!(failed.reason.contains("undo backend down"), "{}", failed.reason);

    let msg = tokio::time::timeout(Duration::from_secs(10), dlq.next()).await?;
    let letter: serde_json::Value = serde_json::from_slice(&msg.map(|m| m.payload).unwrap_or_default())?;
    assert_eq!(letter["saga_id"], id.as_str());
    assert_eq!(letter["step"], "fake-step");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("undo backend down")),
        "{letter}"
    );

    // Retry is refused for a non-failed saga and needs the token; then it finishes the saga.
    let err = g
        .retry_saga(with_token(
            pb::RetrySagaRequest { saga_id: id.clone() },
            Some("x".repeat(20).as_str()),
        ))
        .await;
    assert_eq!(err.map_err(|e| e.code()).err(), Some(Code::PermissionDenied));
    broken.store(false, Ordering::SeqCst);
    let resp = g
        .retry_saga(with_token(
            pb::RetrySagaRequest { saga_id: id.clone() },
            Some(TOKEN),
        ))
        .await?
        .into_inner();
    assert_eq!(resp.state, SagaState::Compensating as i32);
    let done = wait_terminal(&mut g, &id, WAIT).await?;
    assert_eq!(done.state, SagaState::Compensated as i32, "{done:#?}");
    assert!(done.history.iter().any(|h| h.kind == "retried"));
    let undo_calls = fake.calls().iter().filter(|c| c.0 == "undo").count();
    assert_eq!(undo_calls, 4, "three failed attempts, one after the retry");
    let err = g
        .retry_saga(with_token(
            pb::RetrySagaRequest { saga_id: id.clone() },
            Some(TOKEN),
        ))
        .await;
    assert_eq!(err.map_err(|e| e.code()).err(), Some(Code::FailedPrecondition));
    assert_eq!(stock(&s.client, "RARE-1").await?, (1, 0));
    s.shutdown().await
}

/// A saga older than the command horizon is neither retried nor aborted:
/// the participants may have forgotten its keys, so a repeated command could
/// be applied twice. The refusal names the horizon and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_or_abort_past_the_command_horizon_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = System::bare(Some(fake_definitions(dir.path(), 2)?)).await?;
    s.start_inventory().await?;
    let _fake = FakeParticipant::start(&s.client, "fake", |cmd, _| match cmd.action.as_str() {
        "undo" => FakeAnswer::Reply(Reply::error("undo backend down")),
        _ => FakeAnswer::Reply(Reply::ok(serde_json::json!({}))),
    })
    .await?;
    start_coordinator_with(&mut s, |c| c.command_horizon = Duration::from_secs(1)).await?;
    let mut g = s.grpc().await?;
    let (id, failed) = run_fake_saga(&mut g, &[("RARE-1", 5)]).await?;
    assert_eq!(failed.state, SagaState::Failed as i32, "{failed:#?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = g
        .retry_saga(with_token(
            pb::RetrySagaRequest { saga_id: id.clone() },
            Some(TOKEN),
        ))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a retry past the horizon was accepted"))?;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("command horizon"), "{}", err.message());
    // An abort's compensations would look for forward replies that may be gone.
    let err = g
        .abort_saga(with_token(
            pb::AbortSagaRequest {
                saga_id: id.clone(),
                reason: String::new(),
            },
            Some(TOKEN),
        ))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("an abort past the horizon was accepted"))?;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let after = g
        .get_saga(pb::GetSagaRequest { saga_id: id.clone() })
        .await?
        .into_inner();
    assert_eq!(after.history.len(), failed.history.len(), "nothing changed");
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_is_retried_as_transient() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = System::bare(Some(fake_definitions(dir.path(), 5)?)).await?;
    s.start_inventory().await?;
    let fake = FakeParticipant::start(&s.client, "fake", |_, n| match n {
        0 => FakeAnswer::Raw(b"\xff\xfe not json".to_vec()),
        1 => FakeAnswer::Raw(br#"{"outcome":"maybe"}"#.to_vec()),
        _ => FakeAnswer::Reply(Reply::ok(serde_json::json!({"n": n}))),
    })
    .await?;
    start_coordinator(&mut s).await?;
    let mut g = s.grpc().await?;
    let (_, done) = run_fake_saga(&mut g, &[("A-1", 1)]).await?;
    assert_eq!(done.state, SagaState::Completed as i32, "{done:#?}");
    assert_eq!(done.steps[0].attempts, 3);
    let retries: Vec<&str> = done
        .history
        .iter()
        .filter(|h| h.kind == "step_retry")
        .map(|h| h.detail.as_str())
        .collect();
    assert_eq!(retries.len(), 2, "{retries:?}");
    assert!(
        retries.iter().all(|d| d.starts_with("malformed reply")),
        "{retries:?}"
    );
    assert_eq!(fake.calls().len(), 3);
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_holds_commands_back_instead_of_hammering() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = System::bare(Some(fake_definitions(dir.path(), 6)?)).await?;
    s.start_inventory().await?;
    let fake =
        FakeParticipant::start(&s.client, "fake", |_, _| FakeAnswer::Reply(Reply::error("down"))).await?;
    let wait = Duration::from_millis(400);
    let c = RunningCoordinator::start_with(
        &s.nats.access(),
        &s.dir.path().join("coordinator"),
        &s.definitions,
        |c| {
            c.breaker_failures = 2;
            c.breaker_wait = wait;
        },
    )
    .await?;
    c.wait_ready().await?;
    s.coordinator = Some(c);
    let mut g = s.grpc().await?;
    let (_, done) = run_fake_saga(&mut g, &[("A-1", 1)]).await?;
    // Every attempt failed without effect: nothing to undo, the saga is compensated.
    assert_eq!(done.state, SagaState::Compensated as i32, "{done:#?}");
    assert_eq!(done.steps[0].status, StepStatus::Failed as i32);
    let calls = fake.calls();
    assert_eq!(calls.len(), 6, "{calls:?}");
    // The policy's own backoff is 10-20 ms; once two failures opened the
    // breaker, each later attempt waited out the breaker first.
    for pair in calls[1..].windows(2) {
        let gap = pair[1].2.duration_since(pair[0].2);
        assert!(
            gap >= wait - Duration::from_millis(50),
            "attempt {} came after {gap:?}",
            pair[1].1
        );
    }
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_finishes_with_its_definition_version_after_that_version_is_unloaded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let v1 = fast_definitions(dir.path(), "300ms", 1000)?;
    let mut s = System::bare(Some(v1.clone())).await?;
    s.start_inventory().await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let id = g
        .create_order(order("c-1", &[("A-1", 2)], 1999))
        .await?
        .into_inner()
        .saga_id;
    let probe = g.clone();
    wait_saga(&probe, &id, "waiting on payment", |r| {
        r.current_step == "charge-payment"
    })
    .await?;
    s.stop_coordinator().await?;
    // Only version 2 (a different shape) is loaded now.
    let v2 = dir.path().join("v2");
    std::fs::create_dir_all(&v2)?;
    std::fs::write(
        v2.join("order.yaml"),
        "name: order\nversion: 2\nsteps:\n  - name: charge-first\n    participant: payment\n    action: charge\n    compensation: refund\n",
    )?;
    s.definitions = v2;
    s.start_payment(&PaymentSettings::default()).await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let done = wait_terminal(&mut g, &id, WAIT).await?;
    assert_eq!(done.state, SagaState::Completed as i32, "{done:#?}");
    assert_eq!(done.definition, "order@1");
    assert_eq!(
        done.steps.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["reserve-inventory", "charge-payment"]
    );
    let defs = g
        .list_definitions(pb::ListDefinitionsRequest {})
        .await?
        .into_inner();
    assert_eq!(
        defs.definitions.iter().map(|d| d.version).collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(ledger(&s.client).await?, (1999, 0));
    s.shutdown().await
}
