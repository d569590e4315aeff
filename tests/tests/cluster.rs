//! Several coordinators on the `jetstream` store, in this process, on one
//! real nats-server with JetStream: sagas created on either run to the end,
//! either answers GetSaga for any saga, operator events reach the holder of
//! the saga's partition, and a coordinator that stops hands its sagas over.
//! (The multi-node, kill -9 version is `cluster_chaos.rs`.)

use std::time::Duration;

use anyhow::{ensure, Result};
use futures::StreamExt;
use saga_proto::pb::{self, SagaState};
use saga_testkit::*;

const PARTITIONS: u32 = 8;

async fn coordinator(nats: &NatsAccess, instance: &str) -> Result<RunningCoordinator> {
    let instance = instance.to_string();
    // The jetstream store keeps nothing on local disk: the data dir is not used.
    let unused = std::env::temp_dir();
    let c = RunningCoordinator::start_with(nats, &unused, &shipped_definitions(), move |c| {
        c.store = coordinator::StoreKind::Jetstream;
        c.partitions = PARTITIONS;
        c.lease_ttl = Duration::from_millis(800);
        c.instance_id = Some(instance);
        c.operator_token = Some("cluster-test-operator-token".into());
    })
    .await?;
    c.wait_ready().await?;
    Ok(c)
}

async fn balanced(client: &async_nats::Client, instances: &[&str]) -> Result<()> {
    eventually(
        Duration::from_secs(20),
        "partitions spread over the coordinators",
        || async {
            let Ok(h) = cluster::holders(client).await else {
                return false;
            };
            h.len() == PARTITIONS as usize
                && instances.iter().all(|i| {
                    let n = h.values().filter(|v| v == i).count();
                    n >= PARTITIONS as usize / instances.len()
                })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_sagas_and_hand_them_over() -> Result<()> {
    init_logs();
    let nats = NatsServer::start()?;
    let client = nats.connect().await?;
    let dirs = tempfile::tempdir()?;
    let inventory = start_inventory(&nats.access(), &dirs.path().join("inv"), &[("A-1", 1000)]).await?;
    let payment = start_payment(
        &nats.access(),
        &dirs.path().join("pay"),
        &PaymentSettings {
            gateway_latency: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await?;
    wait_participant(&client, "inventory").await?;
    wait_participant(&client, "payment").await?;

    let a = coordinator(&nats.access(), "coord-a").await?;
    let b = coordinator(&nats.access(), "coord-b").await?;
    balanced(&client, &["coord-a", "coord-b"]).await?;
    let (mut ga, mut gb) = (a.client().await?, b.client().await?);

    // Orders through both; each read back through the other one.
    let mut ids = Vec::new();
    for k in 0..30 {
        let g = if k % 2 == 0 { &mut ga } else { &mut gb };
        let r = g
            .create_order(order("c-1", &[("A-1", 1)], 100))
            .await?
            .into_inner();
        ids.push((k, r.saga_id));
    }
    for (k, id) in &ids {
        let g = if k % 2 == 0 { &mut gb } else { &mut ga };
        let saga = wait_terminal(g, id, Duration::from_secs(20)).await?;
        ensure!(saga.state == SagaState::Completed as i32, "{saga:?}");
    }
    assert_eq!(stock(&client, "A-1").await?, (970, 30));
    assert_eq!(ledger(&client).await?, (3000, 0));
    // ListSagas on either sees all of them.
    let listed = gb
        .list_sagas(pb::ListSagasRequest {
            state: SagaState::Completed as i32,
            page_size: 100,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.sagas.len(), 30);

    // WatchSaga on the coordinator that does not run the saga still follows it to the end.
    let r = ga
        .create_order(order("c-1", &[("A-1", 1)], 100))
        .await?
        .into_inner();
    let mut stream = gb
        .watch_saga(pb::WatchSagaRequest {
            saga_id: r.saga_id.clone(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(update) = tokio::time::timeout(Duration::from_secs(20), stream.message()).await?? {
        last = Some(update.state);
    }
    assert_eq!(last, Some(SagaState::Completed as i32));

    // A client idempotency key whose saga record never landed (its coordinator
    // died between the two writes): a retry creates that very saga on the
    // partition's holder, also when it reaches another coordinator, which
    // forwards it there.
    let owned_by_a: Vec<u32> = cluster::holders(&client)
        .await?
        .into_iter()
        .filter(|(_, h)| h == "coord-a")
        .map(|(p, _)| p)
        .collect();
    let reserved = loop {
        let id = uuid::Uuid::now_v7().to_string();
        if owned_by_a.contains(&coordinator::kv::partition_of(&id, PARTITIONS)) {
            break id;
        }
    };
    let js = async_nats::jetstream::new(client.clone());
    let keys = js.get_key_value(coordinator::kv::KEYS_BUCKET).await?;
    let hex: String = "half-written".bytes().map(|b| format!("{b:02x}")).collect();
    keys.create(&hex, reserved.clone().into_bytes().into()).await?;
    let mut retry = order("c-1", &[("A-1", 1)], 100);
    retry.idempotency_key = "half-written".into();
    let created = gb.create_order(retry.clone()).await?.into_inner();
    assert_eq!(
        (created.saga_id.as_str(), created.created),
        (reserved.as_str(), true)
    );
    let saga = wait_terminal(&mut ga, &reserved, Duration::from_secs(20)).await?;
    ensure!(saga.state == SagaState::Completed as i32, "{saga:?}");
    // And from then on the key answers with it, on either coordinator.
    for g in [&mut ga, &mut gb] {
        let again = g.create_order(retry.clone()).await?.into_inner();
        assert_eq!(
            (again.saga_id.as_str(), again.created),
            (reserved.as_str(), false)
        );
    }
    // A forwarded creation is checked as an attacker's: garbage gets an error
    // answer from the holder (and from it only), and changes nothing.
    let subject = format!(
        "saga.coordinator.create.{}",
        coordinator::kv::partition_of(&reserved, PARTITIONS)
    );
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject, inbox, vec![0xff, 0x01, 0x02].into())
        .await?;
    let answer = tokio::time::timeout(Duration::from_secs(5), answers.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no answer to a malformed forwarded creation"))?;
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
    assert_eq!(answer["result"], "error", "{answer}");
    assert_eq!(answer["code"], tonic::Code::InvalidArgument as i32, "{answer}");
    let second = tokio::time::timeout(Duration::from_millis(500), answers.next()).await;
    assert!(
        second.is_err(),
        "a coordinator that does not hold the partition answered too"
    );

    // An abort sent to the coordinator that does not hold the saga reaches the one that does.
    let slow = start_payment(
        &nats.access(),
        &dirs.path().join("pay-slow"),
        &PaymentSettings {
            gateway_latency: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await?;
    payment.stop().await?;
    let r = ga
        .create_order(order("c-2", &[("A-1", 2)], 500))
        .await?
        .into_inner();
    let held_by_a =
        cluster::holders(&client).await?[&coordinator::kv::partition_of(&r.saga_id, PARTITIONS)] == "coord-a";
    ensure!(held_by_a, "a saga created on coord-a is in one of its partitions");
    wait_saga(&gb, &r.saga_id, "charging", |s| {
        s.current_step == "charge-payment"
    })
    .await?;
    let mut abort = tonic::Request::new(pb::AbortSagaRequest {
        saga_id: r.saga_id.clone(),
        reason: "customer called".into(),
    });
    abort
        .metadata_mut()
        .insert("authorization", "Bearer cluster-test-operator-token".parse()?);
    let answer = gb.abort_saga(abort).await?.into_inner();
    assert_eq!(answer.state, SagaState::Compensating as i32);
    let saga = wait_terminal(&mut gb, &r.saga_id, Duration::from_secs(20)).await?;
    assert_eq!(saga.state, SagaState::Compensated as i32, "{saga:?}");

    // coord-a stops while sagas are in flight: coord-b takes its partitions and finishes them.
    let mut in_flight = Vec::new();
    for _ in 0..10 {
        in_flight.push(
            ga.create_order(order("c-3", &[("A-1", 1)], 100))
                .await?
                .into_inner()
                .saga_id,
        );
    }
    a.stop().await?;
    balanced(&client, &["coord-b"]).await?;
    for id in &in_flight {
        let saga = wait_terminal(&mut gb, id, Duration::from_secs(30)).await?;
        ensure!(saga.state == SagaState::Completed as i32, "{saga:?}");
    }
    // 30 + 1 + 1 + 10 completed, the aborted one released; the second payment
    // service holds the 10 charges and the aborted one's charge refunded (or never made).
    assert_eq!(stock(&client, "A-1").await?, (958, 42));
    let (charged, refunded) = ledger(&client).await?;
    assert_eq!(charged - refunded, 1000, "charged {charged}, refunded {refunded}");

    b.stop().await?;
    slow.stop().await?;
    inventory.stop().await?;
    Ok(())
}
