//! The order saga end to end: a real nats-server per test, the coordinator
//! and both participants on temp-dir sled databases, driven over gRPC.
//! Assertions are on stock and ledger figures, not only on states.

use std::time::Duration;

use anyhow::Result;
use saga_proto::pb::{self, SagaState, StepStatus};
use saga_testkit::*;
use saga_wire::{self as wire, CommandKind, Reply};

fn step_statuses(s: &pb::Saga) -> Vec<StepStatus> {
    s.steps
        .iter()
        .map(|p| StepStatus::try_from(p.status).unwrap_or(StepStatus::Unspecified))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_with_stock_reserved_and_money_charged() -> Result<()> {
    let s = System::up().await?;
    let saga = s.run_order(order("c-1", &[("A-1", 2)], 1999)).await?;
    assert_eq!(saga.state, SagaState::Completed as i32, "{saga:#?}");
    assert_eq!(saga.definition, "order@1");
    assert_eq!(
        step_statuses(&saga),
        [StepStatus::Succeeded, StepStatus::Succeeded]
    );
    assert!(saga
        .steps
        .iter()
        .all(|p| p.attempts == 1 && p.started_at.is_some() && p.finished_at.is_some()));
    let kinds: Vec<&str> = saga.history.iter().map(|h| h.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "started",
            "step_succeeded",
            "step_succeeded",
            "completed"
        ]
    );
    assert!(saga.history.iter().all(|h| h.at.is_some()));
    assert!(saga.current_step.is_empty());
    assert_eq!(stock(&s.client, "A-1").await?, (8, 2));
    assert_eq!(ledger(&s.client).await?, (1999, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_stock_compensates_with_nothing_charged() -> Result<()> {
    let s = System::up().await?;
    let saga = s
        .run_order(order("c-1", &[("A-1", 1), ("RARE-1", 5)], 4500))
        .await?;
    assert_eq!(saga.state, SagaState::Compensated as i32, "{saga:#?}");
    assert_eq!(step_statuses(&saga), [StepStatus::Rejected, StepStatus::Pending]);
    assert!(saga.reason.contains("insufficient_stock"), "{}", saga.reason);
    assert_eq!(
        stock(&s.client, "A-1").await?,
        (10, 0),
        "all or nothing: A-1 untouched"
    );
    assert_eq!(stock(&s.client, "RARE-1").await?, (1, 0));
    assert_eq!(ledger(&s.client).await?, (0, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_payment_compensates_and_restores_stock() -> Result<()> {
    let s = System::up().await?;
    let saga = s.run_order(order("c-1", &[("B-2", 3)], 60_000)).await?;
    assert_eq!(saga.state, SagaState::Compensated as i32, "{saga:#?}");
    assert_eq!(
        step_statuses(&saga),
        [StepStatus::Compensated, StepStatus::Rejected]
    );
    assert!(saga.reason.contains("card_declined"), "{}", saga.reason);
    let kinds: Vec<&str> = saga.history.iter().map(|h| h.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "started",
            "step_succeeded",
            "step_rejected",
            "compensating",
            "compensation_succeeded",
            "compensated"
        ]
    );
    assert_eq!(stock(&s.client, "B-2").await?, (5, 0));
    assert_eq!(ledger(&s.client).await?, (0, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_started_late_is_reached_through_retries() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let defs = fast_definitions(dir.path(), "300ms", 60)?;
    let mut s = System::bare(Some(defs)).await?;
    s.start_inventory().await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let created = g
        .create_order(order("c-1", &[("A-1", 2)], 1999))
        .await?
        .into_inner();
    // Payment is down: the charge is retried.
    let id = created.saga_id.clone();
    let probe = g.clone();
    wait_saga(&probe, &id, "charge retried", |r| {
        r.steps.get(1).is_some_and(|p| p.attempts >= 3)
    })
    .await?;
    s.start_payment(&PaymentSettings::default()).await?;
    let saga = wait_terminal(&mut g, &created.saga_id, WAIT).await?;
    assert_eq!(saga.state, SagaState::Completed as i32, "{saga:#?}");
    assert!(saga.steps[1].attempts >= 3);
    assert!(saga
        .history
        .iter()
        .any(|h| h.kind == "step_retry" && h.detail.contains("no responders")));
    assert_eq!(stock(&s.client, "A-1").await?, (8, 2));
    assert_eq!(ledger(&s.client).await?, (1999, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_never_answers_is_compensated_including_the_unknown_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let defs = fast_definitions(dir.path(), "200ms", 3)?;
    let mut s = System::bare(Some(defs)).await?;
    s.start_inventory().await?;
    // The gateway answers long after the coordinator gave up: the charge's outcome is unknown.
    let slow = PaymentSettings {
        gateway_latency: Duration::from_millis(2500),
        ..PaymentSettings::default()
    };
    s.start_payment(&slow).await?;
    s.start_coordinator().await?;
    let saga = s.run_order(order("c-1", &[("A-1", 2)], 1999)).await?;
    assert_eq!(saga.state, SagaState::Compensated as i32, "{saga:#?}");
    assert_eq!(
        step_statuses(&saga),
        [StepStatus::Compensated, StepStatus::Compensated]
    );
    assert_eq!(saga.steps[1].attempts, 3);
    let kinds: Vec<&str> = saga.history.iter().map(|h| h.kind.as_str()).collect();
    assert!(kinds.contains(&"step_unknown"), "{kinds:?}");
    assert_eq!(stock(&s.client, "A-1").await?, (10, 0));
    // The refund overtook the charges: it left a tombstone, so the charges
    // that finish later have no effect.
    let client = s.client.clone();
    eventually(Duration::from_secs(10), "late charges processed", || {
        let client = client.clone();
        async move {
            stats(&client, "payment")
                .await
                .ok()
                .and_then(|v| v["commands"].as_u64())
                .is_some_and(|n| n >= 4)
        }
    })
    .await?;
    assert_eq!(ledger(&s.client).await?, (0, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_command_returns_the_stored_reply_and_applies_nothing_twice() -> Result<()> {
    let s = System::up().await?;
    let payload = wire::OrderPayload {
        order_id: "o-1".into(),
        customer_id: "c-1".into(),
        items: vec![wire::Item {
            sku: "A-1".into(),
            quantity: 3,
        }],
        amount_cents: 700,
        currency: "EUR".into(),
    };
    let command = |participant: &str, step: &str, action: &str| {
        wire::Command {
            saga_id: "0190b8a4-0000-7000-8000-000000000001".into(),
            definition: "order@1".into(),
            step: step.into(),
            action: action.into(),
            kind: CommandKind::Forward,
            attempt: 1,
            idempotency_key: wire::idempotency_key(
                "0190b8a4-0000-7000-8000-000000000001",
                step,
                CommandKind::Forward,
            ),
            payload: payload.clone(),
            input: serde_json::Value::Null,
        }
        .with_subject(participant)
    };
    let mut replies = Vec::new();
    for (subject, cmd) in [
        command("inventory", "reserve-inventory", "reserve"),
        command("payment", "charge-payment", "charge"),
    ] {
        for attempt in 1..=3 {
            let cmd = wire::Command {
                attempt,
                ..cmd.clone()
            };
            let msg = s
                .client
                .request(subject.clone(), serde_json::to_vec(&cmd)?.into())
                .await?;
            replies.push((subject.clone(), serde_json::from_slice::<Reply>(&msg.payload)?));
        }
    }
    for pair in replies.chunks(3) {
        assert!(matches!(pair[0].1, Reply::Ok { .. }), "{pair:?}");
        assert!(
            pair.iter().all(|r| r.1 == pair[0].1),
            "same stored reply each time: {pair:?}"
        );
    }
    assert_eq!(stock(&s.client, "A-1").await?, (7, 3));
    assert_eq!(ledger(&s.client).await?, (700, 0));
    s.shutdown().await
}

/// Subject helper for raw commands.
trait WithSubject {
    fn with_subject(self, participant: &str) -> (String, wire::Command);
}

impl WithSubject for wire::Command {
    fn with_subject(self, participant: &str) -> (String, wire::Command) {
        (wire::command_subject(participant, &self.action), self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_get_an_error_reply() -> Result<()> {
    let s = System::up().await?;
    for body in [&b"not json"[..], br#"{"saga_id":"x"}"#, b""] {
        let msg = s
            .client
            .request("saga.cmd.inventory.reserve", body.to_vec().into())
            .await?;
        let reply: Reply = serde_json::from_slice(&msg.payload)?;
        assert!(matches!(reply, Reply::Error { .. }), "{reply:?}");
    }
    assert_eq!(stock(&s.client, "A-1").await?, (10, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_creates_one_saga() -> Result<()> {
    let s = System::up().await?;
    let mut g = s.grpc().await?;
    let req = pb::CreateOrderRequest {
        idempotency_key: "client-42".into(),
        ..order("c-1", &[("A-1", 1)], 500)
    };
    let first = g.create_order(req.clone()).await?.into_inner();
    let second = g.create_order(req.clone()).await?.into_inner();
    assert!(first.created && !second.created);
    assert_eq!(first.saga_id, second.saga_id);
    assert_eq!(first.order_id, second.order_id);
    wait_terminal(&mut g, &first.saga_id, WAIT).await?;
    let third = g.create_order(req.clone()).await?.into_inner();
    assert_eq!(third.saga_id, first.saga_id);
    assert_eq!(third.state, SagaState::Completed as i32);
    let other = pb::CreateOrderRequest {
        amount_cents: 501,
        ..req
    };
    let err = g
        .create_order(other)
        .await
        .expect_err("key reused for another order");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(err.message().starts_with("idempotency_key"), "{}", err.message());
    let all = g.list_sagas(pb::ListSagasRequest::default()).await?.into_inner();
    assert_eq!(all.sagas.len(), 1);
    assert_eq!(stock(&s.client, "A-1").await?, (9, 1));
    assert_eq!(ledger(&s.client).await?, (500, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_stopped_mid_saga_finishes_it_after_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let defs = fast_definitions(dir.path(), "300ms", 1000)?;
    let mut s = System::bare(Some(defs)).await?;
    s.start_inventory().await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let created = g
        .create_order(order("c-1", &[("A-1", 2)], 1999))
        .await?
        .into_inner();
    let id = created.saga_id.clone();
    let g2 = g.clone();
    wait_saga(&g2, &id, "saga waiting on payment", |r| {
        r.current_step == "charge-payment"
    })
    .await?;
    s.stop_coordinator().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    // Nothing moves while the coordinator is down.
    assert_eq!(ledger(&s.client).await?, (0, 0));
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let saga = wait_terminal(&mut g, &created.saga_id, WAIT).await?;
    assert_eq!(saga.state, SagaState::Completed as i32, "{saga:#?}");
    assert_eq!(stock(&s.client, "A-1").await?, (8, 2));
    assert_eq!(ledger(&s.client).await?, (1999, 0));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_input_is_refused_naming_the_field() -> Result<()> {
    let s = System::up().await?;
    let mut g = s.grpc().await?;
    let cases = [
        (order("", &[("A-1", 1)], 100), "customer_id"),
        (order("c-1", &[], 100), "items"),
        (order("c-1", &[("A-1", 0)], 100), "items[0].quantity"),
        (order("c-1", &[("", 1)], 100), "items[0].sku"),
        (order("c-1", &[("A-1", 1)], 0), "amount_cents"),
        (
            pb::CreateOrderRequest {
                definition: "nope".into(),
                ..order("c-1", &[("A-1", 1)], 100)
            },
            "definition",
        ),
        // The order schema's bounds, kept by saga-wire's rules too.
        (
            order("c-1", &[("A-1", 1), ("B-2", 1001)], 100),
            "items[1].quantity",
        ),
        (order("c-1", &[(&"S".repeat(65), 1)], 100), "items[0].sku"),
        (order("c-1", &[("A-1", 1)], 100_000_001), "amount_cents"),
        // Unicode format characters and separators pass no id (issue 15, finding 6).
        (order("c-\u{202E}1", &[("A-1", 1)], 100), "customer_id"),
        (order("c-1", &[("A-\u{200B}1", 1)], 100), "items[0].sku"),
        (
            pb::CreateOrderRequest {
                order_id: "o-\u{2028}1".into(),
                ..order("c-1", &[("A-1", 1)], 100)
            },
            "order_id",
        ),
    ];
    for (req, field) in cases {
        let err = g.create_order(req).await.expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    let err = g
        .get_saga(pb::GetSagaRequest {
            saga_id: "nope".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let unknown = "0190b8a4-0000-7000-8000-0000000000ff";
    let err = g
        .get_saga(pb::GetSagaRequest {
            saga_id: unknown.into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains(unknown));
    let err = g
        .list_sagas(pb::ListSagasRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect_err("size");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Hostile sizes: too many items, absurd strings, an oversized request.
    let many: Vec<(&str, u32)> = (0..101).map(|_| ("A-1", 1)).collect();
    let err = g.create_order(order("c-1", &many, 100)).await.expect_err("items");
    assert!(err.message().starts_with("items:"), "{}", err.message());
    let long = "x".repeat(129);
    let err = g
        .create_order(order("c-1", &[(long.as_str(), 1)], 100))
        .await
        .expect_err("sku");
    assert!(err.message().starts_with("items[0].sku:"), "{}", err.message());
    let err = g
        .create_order(order("c-\u{7}", &[("A-1", 1)], 100))
        .await
        .expect_err("control");
    assert!(err.message().starts_with("customer_id:"), "{}", err.message());
    let huge = "y".repeat(100_000);
    let err = g
        .create_order(order(&huge, &[("A-1", 1)], 100))
        .await
        .expect_err("too big");
    assert!(
        matches!(
            err.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "oversized request: {err:?}"
    );
    let all = g.list_sagas(pb::ListSagasRequest::default()).await?.into_inner();
    assert!(all.sagas.is_empty(), "refused requests created nothing");
    assert_eq!(stock(&s.client, "A-1").await?, (10, 0));
    s.shutdown().await
}

/// Every id of `req`'s pages, following the tokens to the end.
async fn listed(
    g: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
    mut req: pb::ListSagasRequest,
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    loop {
        let page = g.list_sagas(req.clone()).await?.into_inner();
        ids.extend(page.sagas.into_iter().map(|x| x.saga_id));
        if page.next_page_token.is_empty() {
            return Ok(ids);
        }
        req.page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_sagas_finds_sagas_by_customer_order_definition_and_time() -> Result<()> {
    let s = System::up().await?;
    let mut ids = Vec::new();
    let mut created = Vec::new();
    for (i, customer) in ["c-1", "c-2", "c-1"].into_iter().enumerate() {
        let mut req = order(customer, &[("A-1", 1)], 100);
        req.order_id = format!("ord-{i}");
        let saga = s.run_order(req).await?;
        ids.push(saga.saga_id.clone());
        created.push(saga.created_at);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut g = s.grpc().await?;
    let q = |f: fn(&mut pb::ListSagasRequest)| {
        let mut r = pb::ListSagasRequest {
            page_size: 1,
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let pick = |which: &[usize]| which.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>();
    assert_eq!(
        listed(&mut g, q(|r| r.customer_id = "c-1".into())).await?,
        pick(&[0, 2])
    );
    let newest = q(|r| {
        r.customer_id = "c-1".into();
        r.newest_first = true;
    });
    assert_eq!(listed(&mut g, newest).await?, pick(&[2, 0]));
    assert_eq!(
        listed(&mut g, q(|r| r.order_id = "ord-1".into())).await?,
        pick(&[1])
    );
    assert_eq!(
        listed(&mut g, q(|r| r.definition = "order".into())).await?,
        pick(&[0, 1, 2])
    );
    assert_eq!(
        listed(&mut g, q(|r| r.definition = "order@1".into())).await?,
        pick(&[0, 1, 2])
    );
    assert!(listed(&mut g, q(|r| r.definition = "order@9".into()))
        .await?
        .is_empty());
    assert!(listed(&mut g, q(|r| r.definition = "order-with-shipping".into()))
        .await?
        .is_empty());
    let both = q(|r| {
        r.customer_id = "c-1".into();
        r.state = SagaState::Completed as i32;
    });
    assert_eq!(listed(&mut g, both).await?, pick(&[0, 2]));
    let since_second = pb::ListSagasRequest {
        created_after: created[1],
        ..q(|_| {})
    };
    assert_eq!(listed(&mut g, since_second).await?, pick(&[1, 2]));
    let before_second = pb::ListSagasRequest {
        created_before: created[1],
        ..q(|_| {})
    };
    assert_eq!(listed(&mut g, before_second).await?, pick(&[0]));
    let summary = g
        .list_sagas(q(|r| r.order_id = "ord-1".into()))
        .await?
        .into_inner();
    assert_eq!(summary.sagas[0].customer_id, "c-2");

    // Each bad filter is refused naming its field.
    let ts = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    let refused = [
        ("customer_id", q(|r| r.customer_id = "c-\u{7}".into())),
        ("order_id", q(|r| r.order_id = "o".repeat(129))),
        ("definition", q(|r| r.definition = "Order Flow".into())),
        ("definition", q(|r| r.definition = "order@x".into())),
        ("page_token", q(|r| r.page_token = "nope".into())),
        (
            "created_after",
            pb::ListSagasRequest {
                created_after: ts(-1, 0),
                ..Default::default()
            },
        ),
        (
            "created_after",
            pb::ListSagasRequest {
                created_after: ts(1, -5),
                ..Default::default()
            },
        ),
        (
            "created_before",
            pb::ListSagasRequest {
                created_after: ts(100, 0),
                created_before: ts(100, 0),
                ..Default::default()
            },
        ),
    ];
    for (field, req) in refused {
        let err = g.list_sagas(req).await.expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_sagas_filters_by_state_and_pages() -> Result<()> {
    let s = System::up().await?;
    let mut done = Vec::new();
    for i in 0..5 {
        // Even orders complete, odd ones are declined.
        let amount = if i % 2 == 0 { 100 } else { 90_000 };
        done.push(s.run_order(order("c-1", &[("A-1", 1)], amount)).await?.saga_id);
    }
    let mut g = s.grpc().await?;
    let completed = pb::ListSagasRequest {
        state: SagaState::Completed as i32,
        page_size: 2,
        ..Default::default()
    };
    let p1 = g.list_sagas(completed.clone()).await?.into_inner();
    assert_eq!(p1.sagas.len(), 2);
    assert!(!p1.next_page_token.is_empty());
    let p2 = g
        .list_sagas(pb::ListSagasRequest {
            page_token: p1.next_page_token.clone(),
            ..completed
        })
        .await?
        .into_inner();
    assert_eq!(p2.sagas.len(), 1);
    assert!(p2.next_page_token.is_empty());
    let ids: Vec<String> = p1
        .sagas
        .iter()
        .chain(&p2.sagas)
        .map(|x| x.saga_id.clone())
        .collect();
    assert_eq!(ids, [done[0].clone(), done[2].clone(), done[4].clone()]);
    let compensated = pb::ListSagasRequest {
        state: SagaState::Compensated as i32,
        ..Default::default()
    };
    assert_eq!(g.list_sagas(compensated).await?.into_inner().sagas.len(), 2);
    let all = g.list_sagas(pb::ListSagasRequest::default()).await?.into_inner();
    assert_eq!(
        all.sagas.iter().map(|x| x.saga_id.clone()).collect::<Vec<_>>(),
        done
    );
    let defs = g
        .list_definitions(pb::ListDefinitionsRequest {})
        .await?
        .into_inner();
    let order = defs
        .definitions
        .iter()
        .find(|d| d.name == "order" && d.version == 1)
        .ok_or_else(|| anyhow::anyhow!("order@1 not listed"))?;
    assert_eq!(order.steps.len(), 2);
    assert!(defs.definitions.iter().any(|d| d.name == "order-with-shipping"));
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_definition_file_stops_start_up_with_file_and_line() -> Result<()> {
    let nats = NatsServer::start()?;
    let dir = tempfile::tempdir()?;
    let defs = dir.path().join("defs");
    std::fs::create_dir_all(&defs)?;
    let good = std::fs::read_to_string(shipped_definitions().join("order.yaml"))?;
    std::fs::write(
        defs.join("order.yaml"),
        good.replace(
            "    compensation: refund\n",
            "    compensation: refund\n    retries: 3\n",
        ),
    )?;
    let c = RunningCoordinator::start(&nats.access(), &dir.path().join("data"), &defs).await?;
    let err = c.stop().await.expect_err("start-up refused");
    let text = err.to_string();
    assert!(text.contains("order.yaml:") && text.contains("retries"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_saga_streams_the_transitions_until_terminal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let defs = fast_definitions(dir.path(), "300ms", 1000)?;
    let mut s = System::bare(Some(defs)).await?;
    s.start_inventory().await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    let id = g
        .create_order(order("c-1", &[("A-1", 2)], 1999))
        .await?
        .into_inner()
        .saga_id;
    let mut stream = g
        .watch_saga(pb::WatchSagaRequest { saga_id: id.clone() })
        .await?
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await??;
    let first = first.ok_or_else(|| anyhow::anyhow!("no first message"))?;
    assert_eq!(first.saga_id, id);
    assert!(!is_terminal(first.state), "payment is down: {first:#?}");
    s.start_payment(&PaymentSettings::default()).await?;
    let mut last = first;
    let mut updates = 1;
    while let Some(next) = tokio::time::timeout(WAIT, stream.message()).await?? {
        assert!(next.history.len() >= last.history.len(), "history only grows");
        // Each message is one consistent state: the saga's state is its last entry's.
        assert_eq!(
            next.history.last().map(|h| h.state),
            Some(next.state),
            "{next:#?}"
        );
        last = next;
        updates += 1;
    }
    assert_eq!(last.state, SagaState::Completed as i32, "{last:#?}");
    assert!(updates >= 2, "at least the initial state and the completion");
    let seqs: Vec<u64> = last.history.iter().map(|h| h.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // What the stream assembled from the transitions it was handed is what is stored.
    let stored = g
        .get_saga(pb::GetSagaRequest { saga_id: id.clone() })
        .await?
        .into_inner();
    assert_eq!(last, stored);
    // A finished saga: its state, then the end of the stream.
    let mut again = g
        .watch_saga(pb::WatchSagaRequest { saga_id: id.clone() })
        .await?
        .into_inner();
    assert_eq!(
        again.message().await?.map(|x| x.state),
        Some(SagaState::Completed as i32)
    );
    assert!(again.message().await?.is_none());
    let unknown = pb::WatchSagaRequest {
        saga_id: "0190b8a4-0000-7000-8000-0000000000ff".into(),
    };
    assert_eq!(
        g.watch_saga(unknown).await.map(|_| ()).map_err(|e| e.code()),
        Err(tonic::Code::NotFound)
    );
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_over_http() -> Result<()> {
    let mut s = System::up().await?;
    let saga = s.run_order(order("c-1", &[("A-1", 1)], 100)).await?;
    assert_eq!(saga.state, SagaState::Completed as i32);
    let http = s
        .coordinator
        .as_ref()
        .map(|c| c.http_addr)
        .ok_or_else(|| anyhow::anyhow!("no coordinator"))?;
    assert_eq!(http_get(http, "/health").await?.0, 200);
    assert_eq!(http_get(http, "/ready").await?.0, 200);
    let (code, text) = http_get(http, "/metrics").await?;
    assert_eq!(code, 200);
    for needle in [
        "saga_started_total{definition=\"order@1\"}",
        "saga_finished_total{definition=\"order@1\",state=\"COMPLETED\"}",
        "saga_step_duration_seconds",
        "participant=\"payment\"",
        // Present (its value is process-wide: other tests' coordinators share it).
        "saga_nats_connected",
    ] {
        assert!(text.contains(needle), "{needle} missing from /metrics:\n{text}");
    }
    s.nats.kill();
    eventually(Duration::from_secs(10), "/ready 503", || async {
        http_get(http, "/ready")
            .await
            .is_ok_and(|(code, body)| code == 503 && body.contains("nats disconnected"))
    })
    .await?;
    assert_eq!(http_get(http, "/health").await?.0, 200, "alive while not ready");
    s.nats.restart()?;
    eventually(Duration::from_secs(10), "/ready 200", || async {
        http_get(http, "/ready").await.is_ok_and(|(code, _)| code == 200)
    })
    .await?;
    s.shutdown().await
}

#[tokio::test]
async fn finished_sagas_are_removed_after_the_retention() -> Result<()> {
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.retention = Duration::from_secs(1);
    })
    .await?;
    c.wait_ready().await?;
    let mut g = c.client().await?;
    let done = g
        .create_order(pb::CreateOrderRequest {
            idempotency_key: "retained-key".into(),
            ..order("c-1", &[("A-1", 1)], 100)
        })
        .await?
        .into_inner();
    let saga = wait_terminal(&mut g, &done.saga_id, WAIT).await?;
    assert_eq!(saga.state, SagaState::Completed as i32);
    eventually(Duration::from_secs(10), "the finished saga pruned", || {
        let mut g = g.clone();
        let id = done.saga_id.clone();
        async move {
            g.get_saga(pb::GetSagaRequest { saga_id: id })
                .await
                .is_err_and(|e| e.code() == tonic::Code::NotFound)
        }
    })
    .await?;
    // Its client key was released with it: the same key starts a new saga.
    let again = g
        .create_order(pb::CreateOrderRequest {
            idempotency_key: "retained-key".into(),
            ..order("c-1", &[("A-1", 1)], 100)
        })
        .await?
        .into_inner();
    assert!(again.created && again.saga_id != done.saga_id);
    c.stop().await?;
    s.shutdown().await
}

/// More sagas in flight than the coordinator keeps in memory
/// (`resident_sagas`): the excess is evicted once durable and read back from
/// the store on its next reply. Every saga still ends as it would have, with
/// each effect applied once, including a compensation of an evicted saga and
/// an operator abort of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_evicted_from_memory_are_read_back_and_finish() -> Result<()> {
    const TOKEN: &str = "operator-token-0123456789";
    let mut s = System::bare(None).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings {
        gateway_latency: Duration::from_millis(600),
        ..PaymentSettings::default()
    })
    .await?;
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.resident_sagas = 2;
        c.operator_token = Some(TOKEN.into());
    })
    .await?;
    c.wait_ready().await?;
    let mut g = c.client().await?;
    // 14 orders of one unit (the test stock is A-1 × 10, B-2 × 5): 9 of A-1, 5 of B-2.
    let sku = |i: i64| if i < 9 { "A-1" } else { "B-2" };
    let mut ids = Vec::new();
    for i in 0..14 {
        // The last one is above the customer limit: declined, then released.
        let amount = if i == 13 { 60_000 } else { 100 + i };
        let created = g
            .create_order(order(&format!("c-{i}"), &[(sku(i), 1)], amount))
            .await?
            .into_inner();
        ids.push(created.saga_id);
    }
    // All 14 now wait on the slow gateway, 12 of them out of memory: abort one.
    let mut abort = tonic::Request::new(pb::AbortSagaRequest {
        saga_id: ids[0].clone(),
        reason: "customer called".into(),
    });
    abort
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    g.abort_saga(abort).await?;

    let mut charged = 0;
    for (i, id) in ids.iter().enumerate() {
        let saga = wait_terminal(&mut g, id, WAIT).await?;
        let want = match i {
            0 | 13 => SagaState::Compensated,
            _ => SagaState::Completed,
        };
        assert_eq!(saga.state, want as i32, "saga {i}: {saga:#?}");
        if want == SagaState::Completed {
            charged += 100 + i as i64;
            // One attempt per step: nothing was re-sent for having been evicted.
            assert!(saga.steps.iter().all(|p| p.attempts == 1), "saga {i}: {saga:#?}");
        }
    }
    // 12 units reserved for good (8 of A-1, 4 of B-2); the aborted and the
    // declined order's released; money only for the completed ones.
    eventually(Duration::from_secs(10), "stock and money settled", || async {
        let a = stock(&s.client, "A-1").await.ok();
        let b = stock(&s.client, "B-2").await.ok();
        let money = ledger(&s.client).await.ok();
        a == Some((2, 8)) && b == Some((1, 4)) && money.is_some_and(|(c, r)| c - r == charged)
    })
    .await?;
    c.stop().await?;
    s.shutdown().await
}

/// A command that falls due while NATS is down waits for NATS instead of
/// spending its attempts on a connection that cannot deliver: the outage
/// outlasts a step timeout (2 s), yet no attempt fails before NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_due_while_nats_is_down_waits_for_it() -> Result<()> {
    let mut s = System::up().await?;
    let mut g = s.grpc().await?;
    s.nats.kill();
    let created = g
        .create_order(order("c-1", &[("A-1", 1)], 100))
        .await?
        .into_inner();
    // The outage: longer than the step's timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let back_ms = now_ms();
    s.nats.restart()?;
    let saga = wait_terminal(&mut g, &created.saga_id, WAIT).await?;
    assert_eq!(saga.state, SagaState::Completed as i32, "{saga:#?}");
    // Each process reconnects on its own backoff, so a command may reach the
    // restarted server before its participant has resubscribed: that attempt
    // fails fast with "no responders", after the outage, and is retried.
    let retries: Vec<&pb::HistoryEvent> = saga.history.iter().filter(|h| h.kind == "step_retry").collect();
    assert!(
        retries
            .iter()
            .all(|h| timestamp_ms(&h.at) >= back_ms && h.detail.contains("no responders")),
        "no attempt was spent during the outage (NATS back at {back_ms} ms): {saga:#?}"
    );
    s.shutdown().await
}
