//! The NATS permissions the kit's servers enforce (`saga-auth`), tried as a
//! hostile process on the bus would: every forgery of issue 15's first
//! finding is refused by the server with a permissions violation, and a
//! harness listening on the targeted subjects sees that nothing got through.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use saga_proto::pb::SagaState;
use saga_testkit::*;
use tokio::sync::mpsc;

/// A client of `role`, with the server's errors (permission violations)
/// sent to the receiver.
async fn as_role(
    access: &NatsAccess,
    role: &Role,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let options = async_nats::ConnectOptions::new()
        .custom_inbox_prefix(role.inbox_prefix())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        });
    let client = access
        .security(role)
        .apply(options)
        .await?
        .connect(access.url())
        .await
        .with_context(|| format!("connecting as {role}"))?;
    Ok((client, rx))
}

/// Waits for the server to refuse `what` (the subject it names).
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .with_context(|| format!("no permissions violation for {what} within 5 s"))?
            .context("connection closed")?;
        if e.to_lowercase().contains("permissions violation") && e.contains(what) {
            return Ok(());
        }
    }
}

#[tokio::test]
async fn nobody_but_the_payment_service_hears_charges_and_nobody_joins_without_a_user() -> Result<()> {
    let s = System::up().await?;
    let access = s.nats.access();

    // No user: refused at the door.
    let anonymous = async_nats::ConnectOptions::new().connect(access.url()).await;
    ensure!(
        anonymous
            .as_ref()
            .is_err_and(|e| e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation),
        "an anonymous client was let in: {:?}",
        anonymous.map(drop)
    );

    // The inventory's user joining the payment queue group (the first
    // finding: 6 of 10 charges answered `ok` by an impostor), and listening
    // to every command, are both refused.
    let (impostor, mut errors) = as_role(&access, &Role::Participant("inventory".into())).await?;
    let mut queue = impostor
        .queue_subscribe("saga.cmd.payment.*", "payment".into())
        .await?;
    refused(&mut errors, "saga.cmd.payment.*").await?;
    let mut all = impostor.subscribe("saga.cmd.>").await?;
    refused(&mut errors, "saga.cmd.>").await?;

    let mut g = s.grpc().await?;
    for k in 0..5 {
        let id = g
            .create_order(order(&format!("c-{k}"), &[("A-1", 1)], 100))
            .await?
            .into_inner()
            .saga_id;
        let saga = wait_terminal(&mut g, &id, WAIT).await?;
        ensure!(saga.state == SagaState::Completed as i32, "saga {id}: {saga:?}");
    }
    let (charged, _refunded) = ledger(&s.client).await?;
    ensure!(
        charged == 500,
        "every charge reached the payment service: {charged}"
    );
    let heard = tokio::time::timeout(
        Duration::from_millis(300),
        futures::future::select(queue.next(), all.next()),
    )
    .await;
    ensure!(heard.is_err(), "the impostor heard a command");
    s.shutdown().await
}

#[tokio::test]
async fn forged_commands_replies_events_and_admin_requests_are_refused_by_the_server() -> Result<()> {
    let nats = NatsServer::start()?;
    let access = nats.access();
    // The harness hears whatever would get through.
    let harness = access.connect().await?;
    let mut commands = harness.subscribe("saga.cmd.>").await?;
    let mut replies = harness.subscribe("_INBOX_coordinator.>").await?;
    let mut events = harness.subscribe("saga.events.>").await?;
    let mut admin = harness.subscribe("saga.admin.>").await?;
    let mut signals = harness.subscribe("saga.signal").await?;
    harness.flush().await?;

    // A participant's user: a forged charge (amount -50,000), a forged `ok`
    // and a forged `rejected` reply to the coordinator's inbox.
    let (inventory, mut errors) = as_role(&access, &Role::Participant("inventory".into())).await?;
    inventory
        .publish("saga.cmd.payment.charge", r#"{"amount_cents":-50000}"#.into())
        .await?;
    refused(&mut errors, "saga.cmd.payment.charge").await?;
    inventory
        .publish("_INBOX_coordinator.abc.1", r#"{"status":"ok"}"#.into())
        .await?;
    refused(&mut errors, "_INBOX_coordinator.abc.1").await?;
    // And it may not read the coordinator's inbox to learn where replies go.
    let _spy = inventory.subscribe("_INBOX_coordinator.>").await?;
    refused(&mut errors, "_INBOX_coordinator.>").await?;

    // The events reader: may not write the events stream, send commands or
    // ask the participants' admin subjects.
    let (reader, mut errors) = as_role(&access, &Role::Events).await?;
    reader.publish("saga.events.order.completed", "{}".into()).await?;
    refused(&mut errors, "saga.events.order.completed").await?;
    reader.publish("saga.cmd.inventory.release", "{}".into()).await?;
    refused(&mut errors, "saga.cmd.inventory.release").await?;
    reader.publish("saga.admin.payment.effects", "{}".into()).await?;
    refused(&mut errors, "saga.admin.payment.effects").await?;
    // Nor read the signals (their payloads are a provider's confirmations) or send one.
    let _eavesdrop = reader.subscribe("saga.signal").await?;
    refused(&mut errors, "saga.signal").await?;
    reader.publish("saga.signal", "{}".into()).await?;
    refused(&mut errors, "saga.signal").await?;

    // The admin user asks admin subjects and nothing else.
    let (operator, mut errors) = as_role(&access, &Role::Admin).await?;
    operator.publish("saga.cmd.payment.refund", "{}".into()).await?;
    refused(&mut errors, "saga.cmd.payment.refund").await?;
    operator.publish("saga.admin.payment.stats", "{}".into()).await?;
    operator.flush().await?;
    let asked = tokio::time::timeout(Duration::from_secs(5), admin.next()).await?;
    ensure!(asked.is_some_and(|m| m.subject.as_str() == "saga.admin.payment.stats"));

    // The signals user sends signals and nothing else; a participant sends none.
    let (webhooks, mut errors) = as_role(&access, &Role::Signals).await?;
    webhooks.publish("saga.cmd.payment.refund", "{}".into()).await?;
    refused(&mut errors, "saga.cmd.payment.refund").await?;
    let _spy = webhooks.subscribe("saga.signal").await?;
    refused(&mut errors, "saga.signal").await?;
    webhooks.publish("saga.signal", "{}".into()).await?;
    webhooks.flush().await?;
    let sent = tokio::time::timeout(Duration::from_secs(5), signals.next()).await?;
    ensure!(sent.is_some_and(|m| m.subject.as_str() == "saga.signal"));
    let (payment, mut errors) = as_role(&access, &Role::Participant("payment".into())).await?;
    payment.publish("saga.signal", "{}".into()).await?;
    refused(&mut errors, "saga.signal").await?;

    for c in [&inventory, &reader, &operator, &webhooks, &payment] {
        c.flush().await?;
    }
    let leaked = tokio::time::timeout(
        Duration::from_millis(300),
        futures::future::select_all([commands.next(), replies.next(), events.next(), signals.next()]),
    )
    .await;
    ensure!(
        leaked.is_err(),
        "a forged message reached the bus: {:?}",
        leaked.map(|(m, ..)| m)
    );
    Ok(())
}
