//! gRPC server reflection (v1 and v1alpha) and health, checked with Rust
//! reflection clients, as grpcurl and buf curl use them.

use std::time::Duration;

use anyhow::{bail, Result};
use saga_testkit::*;
use tonic_health::pb::{
    health_check_response::ServingStatus::{self, NotServing, Serving},
    health_client::HealthClient,
    HealthCheckRequest,
};
use tonic_reflection::pb::{v1, v1alpha};

async fn coordinator() -> Result<(NatsServer, tempfile::TempDir, RunningCoordinator)> {
    init_logs();
    let nats = NatsServer::start()?;
    let dir = tempfile::tempdir()?;
    let c =
        RunningCoordinator::start(&nats.access(), &dir.path().join("data"), &shipped_definitions()).await?;
    Ok((nats, dir, c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_lists_and_describes_the_service() -> Result<()> {
    let (_nats, _dir, c) = coordinator().await?;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(c.addr).await?);
    let requests = vec![
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "saga.v1.SagaService".into(),
                ),
            ),
        },
    ];
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut services = Vec::new();
    let mut described = false;
    while let Some(resp) = tokio::time::timeout(Duration::from_secs(5), stream.message()).await?? {
        match resp.message_response {
            Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
                services = l.service.into_iter().map(|s| s.name).collect();
            }
            Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f)) => {
                described = !f.file_descriptor_proto.is_empty();
            }
            other => bail!("unexpected reflection answer {other:?}"),
        }
        if !services.is_empty() && described {
            break;
        }
    }
    for name in ["saga.v1.SagaService", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == name),
            "{name} missing from {services:?}"
        );
    }
    assert!(described, "the file describing saga.v1.SagaService is served");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_for_grpcurl_and_health_serving() -> Result<()> {
    let (_nats, _dir, c) = coordinator().await?;
    let ch = channel(c.addr).await?;
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let Some(resp) = tokio::time::timeout(Duration::from_secs(5), stream.message()).await?? else {
        bail!("no reflection answer");
    };
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        bail!("unexpected answer {resp:?}");
    };
    assert!(
        list.service.iter().any(|s| s.name == "saga.v1.SagaService"),
        "{list:?}"
    );

    let health = tonic_health::pb::health_client::HealthClient::new(ch);
    wait_health(&health, Serving).await?;
    c.stop().await
}

/// Polls `grpc.health.v1.Health/Check` for `saga.v1.SagaService` and the
/// overall service until both report `want`.
async fn wait_health(health: &HealthClient<tonic::transport::Channel>, want: ServingStatus) -> Result<()> {
    let h = health.clone();
    eventually(Duration::from_secs(15), &format!("health {want:?}"), || {
        let mut h = h.clone();
        async move {
            let mut all = true;
            for service in ["saga.v1.SagaService", ""] {
                let r = h
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await;
                all &= r.is_ok_and(|r| r.into_inner().status == want as i32);
            }
            all
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_ready_while_nats_is_down() -> Result<()> {
    let (mut nats, _dir, c) = coordinator().await?;
    let health = HealthClient::new(channel(c.addr).await?);
    wait_health(&health, Serving).await?;
    nats.kill();
    wait_health(&health, NotServing).await?;
    nats.restart()?;
    wait_health(&health, Serving).await?;
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_started_before_nats_serves_reads_and_becomes_ready() -> Result<()> {
    init_logs();
    let mut nats = NatsServer::start()?;
    nats.kill();
    let dir = tempfile::tempdir()?;
    let c =
        RunningCoordinator::start(&nats.access(), &dir.path().join("data"), &shipped_definitions()).await?;
    let health = HealthClient::new(channel(c.addr).await?);
    wait_health(&health, NotServing).await?;
    let mut g = c.client().await?;
    let defs = g
        .list_definitions(saga_proto::pb::ListDefinitionsRequest {})
        .await?
        .into_inner();
    assert_eq!(defs.definitions.len(), 4, "reads work before NATS is reachable");
    // Writes are refused at once (not queued until NATS comes), so clients retry.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        g.create_order(order("c-1", &[("A-1", 1)], 100)),
    )
    .await?
    .expect_err("no NATS yet");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    nats.restart()?;
    wait_health(&health, Serving).await?;
    let created = g
        .create_order(order("c-1", &[("A-1", 1)], 100))
        .await?
        .into_inner();
    assert!(created.created);
    c.stop().await
}
