//! The definition language beyond a straight line, end to end with real
//! participants: `order-with-shipping.yaml` runs reserve ∥ charge, then the
//! shipping participant (added by YAML alone) with the group's outputs;
//! compensations carry the forward steps' outputs; a crash mid-group resumes.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use saga_proto::pb::{self, SagaState, StepStatus};
use saga_testkit::{chaos::effects, *};
use saga_wire as wire;

/// Customer the shipping service cannot deliver to.
const FAR: &str = "c-far";

fn shipped(customer: &str, items: &[(&str, u32)], amount: i64) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        definition: "order-with-shipping".into(),
        ..order(customer, items, amount)
    }
}

async fn system(payment: PaymentSettings) -> Result<(System, RunningParticipant)> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&payment).await?;
    let shipping = start_shipping(&s.nats.access(), &s.path("shipping"), &[FAR]).await?;
    wait_participant(&s.client, "shipping").await?;
    s.start_coordinator().await?;
    Ok((s, shipping))
}

fn status(saga: &pb::Saga, step: &str) -> Option<StepStatus> {
    saga.steps
        .iter()
        .find(|s| s.name == step)
        .and_then(|s| StepStatus::try_from(s.status).ok())
}

/// The next command published on `subject` (seen by a plain subscriber next to the participant).
async fn next_command(sub: &mut async_nats::Subscriber) -> Result<wire::Command> {
    let msg = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .context("no command seen")?
        .context("subscription closed")?;
    Ok(serde_json::from_slice(&msg.payload)?)
}

#[tokio::test]
async fn the_shipping_saga_runs_the_group_at_once_then_ships_with_its_outputs() -> Result<()> {
    let (s, shipping) = system(PaymentSettings::default()).await?;
    let mut shipments = s.client.subscribe("saga.cmd.shipping.create-shipment").await?;
    let saga = s.run_order(shipped("c-1", &[("A-1", 2)], 1500)).await?;
    ensure!(saga.state == SagaState::Completed as i32, "{saga:?}");
    assert_eq!(saga.definition, "order-with-shipping@1");
    // Both branches of the group left in the same transition.
    let started = |name: &str| {
        saga.steps
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.started_at)
    };
    assert_eq!(started("reserve-inventory"), started("charge-payment"));
    assert!(started("reserve-inventory").is_some());
    // GetSaga's timeline: the group each step ran in and how long it took.
    let groups: Vec<u32> = saga.steps.iter().map(|s| s.group).collect();
    assert_eq!(groups, [0, 0, 2]);
    let ms =
        |t: Option<prost_types::Timestamp>| t.map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000);
    for step in &saga.steps {
        assert_eq!(step.on_failure, "compensate");
        let (Some(a), Some(b)) = (ms(step.started_at), ms(step.finished_at)) else {
            panic!("{} has no start or end: {step:?}", step.name);
        };
        assert_eq!(step.duration_ms, b - a, "{step:?}");
    }
    // The shipment started once both branches had finished.
    let group_end = saga.steps[..2].iter().filter_map(|s| ms(s.finished_at)).max();
    assert!(ms(saga.steps[2].started_at) >= group_end, "{saga:?}");
    // The shipment got the reservation and the charge from the group's outputs.
    let cmd = next_command(&mut shipments).await?;
    let reservation = wire::idempotency_key(&saga.saga_id, "reserve-inventory", wire::CommandKind::Forward);
    assert_eq!(cmd.input["reservation_id"], reservation.as_str());
    assert!(cmd.input["charge_id"]
        .as_str()
        .is_some_and(|c| c.starts_with("ch_")));
    let held = effects(&s.client, "shipping").await?;
    assert_eq!(held[&saga.saga_id]["reservation_id"], reservation.as_str());
    shipping.stop().await?;
    s.shutdown().await
}

#[tokio::test]
async fn a_rejected_branch_is_awaited_and_the_other_undone_with_its_output() -> Result<()> {
    let (s, shipping) = system(PaymentSettings::default()).await?;
    let mut releases = s.client.subscribe("saga.cmd.inventory.release").await?;
    let before = stock(&s.client, "A-1").await?;
    // Above the customer limit: the charge is declined while the reserve succeeds.
    let saga = s.run_order(shipped("c-1", &[("A-1", 3)], 60_000)).await?;
    ensure!(saga.state == SagaState::Compensated as i32, "{saga:?}");
    assert_eq!(status(&saga, "charge-payment"), Some(StepStatus::Rejected));
    assert_eq!(status(&saga, "reserve-inventory"), Some(StepStatus::Compensated));
    assert_eq!(status(&saga, "create-shipment"), Some(StepStatus::Pending));
    assert!(saga.reason.contains("card_declined"), "{}", saga.reason);
    // The release named the reservation the reserve made.
    let release = next_command(&mut releases).await?;
    assert_eq!(release.saga_id, saga.saga_id);
    assert_eq!(
        release.input["reservation_id"],
        wire::idempotency_key(&saga.saga_id, "reserve-inventory", wire::CommandKind::Forward).as_str()
    );
    assert_eq!(stock(&s.client, "A-1").await?, before, "stock restored");
    shipping.stop().await?;
    s.shutdown().await
}

#[tokio::test]
async fn a_refused_shipment_undoes_both_branches_at_once() -> Result<()> {
    let (s, shipping) = system(PaymentSettings::default()).await?;
    let mut refunds = s.client.subscribe("saga.cmd.payment.refund").await?;
    let before = stock(&s.client, "A-1").await?;
    let (charged_before, refunded_before) = ledger(&s.client).await?;
    let saga = s.run_order(shipped(FAR, &[("A-1", 1)], 2500)).await?;
    ensure!(saga.state == SagaState::Compensated as i32, "{saga:?}");
    assert_eq!(status(&saga, "create-shipment"), Some(StepStatus::Rejected));
    assert_eq!(status(&saga, "reserve-inventory"), Some(StepStatus::Compensated));
    assert_eq!(status(&saga, "charge-payment"), Some(StepStatus::Compensated));
    // Both compensations of the group in one transition, newest group first.
    let compensations: Vec<&pb::HistoryEvent> = saga
        .history
        .iter()
        .filter(|h| h.kind == "compensation_succeeded")
        .collect();
    assert_eq!(compensations.len(), 2);
    // The refund carried the charge id the charge returned.
    let refund = next_command(&mut refunds).await?;
    let charge_id = refund.input["charge_id"].as_str().unwrap_or_default().to_string();
    ensure!(charge_id.starts_with("ch_"), "{refund:?}");
    assert_eq!(stock(&s.client, "A-1").await?, before, "stock restored");
    let (charged, refunded) = ledger(&s.client).await?;
    assert_eq!(
        (charged - charged_before, refunded - refunded_before),
        (2500, 2500),
        "charged once, refunded once"
    );
    shipping.stop().await?;
    s.shutdown().await
}

#[tokio::test]
async fn a_coordinator_stopped_mid_group_resumes_the_group() -> Result<()> {
    // A slow gateway keeps the charge in flight after the reserve is done.
    let (mut s, shipping) = system(PaymentSettings {
        gateway_latency: Duration::from_millis(1500),
        ..PaymentSettings::default()
    })
    .await?;
    let (charged_before, _) = ledger(&s.client).await?;
    let mut g = s.grpc().await?;
    let created = g
        .create_order(shipped("c-1", &[("A-1", 1)], 700))
        .await?
        .into_inner();
    wait_saga(&g, &created.saga_id, "reserve done, charge in flight", |saga| {
        status(saga, "reserve-inventory") == Some(StepStatus::Succeeded)
            && status(saga, "charge-payment") == Some(StepStatus::Running)
    })
    .await?;
    s.stop_coordinator().await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let saga = wait_terminal(&mut g, &created.saga_id, WAIT).await?;
    ensure!(saga.state == SagaState::Completed as i32, "{saga:?}");
    let (charged, _) = ledger(&s.client).await?;
    assert_eq!(
        charged - charged_before,
        700,
        "the re-sent charge was applied once"
    );
    let held = effects(&s.client, "inventory").await?;
    assert_eq!(held[&created.saga_id]["A-1"], 1, "reserved once");
    assert!(effects(&s.client, "shipping").await?[&created.saga_id].is_object());
    shipping.stop().await?;
    s.shutdown().await
}
