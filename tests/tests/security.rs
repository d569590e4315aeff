//! Security knobs: gRPC over TLS (and mutual TLS) for clients and sagactl,
//! NATS user/password and NATS over TLS, against a real nats-server.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use saga_proto::pb::{self, saga_service_client::SagaServiceClient};
use saga_testkit::{pki::Pki, *};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

async fn tls_client(
    addr: SocketAddr,
    pki: &Pki,
    identity: bool,
) -> Result<SagaServiceClient<tonic::transport::Channel>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca)?))
        .domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&pki.client_cert)?,
            std::fs::read(&pki.client_key)?,
        ));
    }
    let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(SagaServiceClient::new(channel))
}

async fn definitions(g: &mut SagaServiceClient<tonic::transport::Channel>) -> Result<usize> {
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        g.list_definitions(pb::ListDefinitionsRequest {}),
    )
    .await??;
    Ok(r.into_inner().definitions.len())
}

/// Runs the sagactl binary without blocking the runtime the coordinator serves on.
async fn sagactl(args: &[&str]) -> Result<std::process::Output> {
    let bin = bin_dir()?.join("sagactl");
    let run = tokio::process::Command::new(&bin)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .context("sagactl did not finish in 20 s")?
        .with_context(|| {
            format!(
                "running {} (build it: cargo build --workspace --bins)",
                bin.display()
            )
        })
}

#[tokio::test]
async fn grpc_over_mutual_tls_for_clients_and_sagactl() -> Result<()> {
    let s = System::bare(None).await?;
    let pki = Pki::generate(&s.path("pki"))?;
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
        c.tls_client_ca = Some(pki.ca.clone());
    })
    .await?;
    // A client with a certificate from the CA is served.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut g = loop {
        match tls_client(c.addr, &pki, true).await {
            Ok(g) => break g,
            Err(e) if std::time::Instant::now() > deadline => return Err(e.context("TLS gRPC up")),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    };
    ensure!(definitions(&mut g).await? >= 1);
    // Without a client certificate, or in plaintext, nothing is served.
    let anonymous = async { definitions(&mut tls_client(c.addr, &pki, false).await?).await };
    let anonymous = !matches!(
        tokio::time::timeout(Duration::from_secs(5), anonymous).await,
        Ok(Ok(_))
    );
    ensure!(anonymous, "a client without a certificate was served");
    // (A plaintext HTTP/2 client never completes its handshake with a TLS server: bound the wait.)
    let plain = async {
        let ch = Endpoint::from_shared(format!("http://{}", c.addr))?
            .connect()
            .await?;
        definitions(&mut SagaServiceClient::new(ch)).await
    };
    let plain = !matches!(
        tokio::time::timeout(Duration::from_secs(3), plain).await,
        Ok(Ok(_))
    );
    ensure!(plain, "a plaintext client was served");

    // sagactl speaks TLS with the same files.
    let addr = format!("https://localhost:{}", c.addr.port());
    let p = |p: &Path| p.display().to_string();
    let (ca, cert, key) = (p(&pki.ca), p(&pki.client_cert), p(&pki.client_key));
    let out = sagactl(&[
        "--addr",
        &addr,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "definitions",
    ])
    .await?;
    ensure!(
        out.status.success(),
        "sagactl over TLS failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("order"));
    let out = sagactl(&["--addr", &addr, "--tls-ca", &ca, "definitions"]).await?;
    ensure!(
        !out.status.success(),
        "sagactl without a client certificate was served"
    );
    c.stop().await
}

async fn ready(c: &RunningCoordinator) -> Result<bool> {
    Ok(http_get(c.http_addr, "/ready").await?.0 == 200)
}

#[tokio::test]
async fn nats_user_and_password_are_required_and_used() -> Result<()> {
    init_logs();
    let nats = NatsServer::start_with(&["--user", "saga", "--pass", "correct-horse"])?;
    let dir = tempfile::tempdir()?;
    let wrong = RunningCoordinator::start_with(
        &nats.access(),
        &dir.path().join("c1"),
        &shipped_definitions(),
        |c| {
            c.nats_security.nats_user = Some("saga".into());
            c.nats_security.nats_password = Some("battery-staple".into());
        },
    )
    .await?;
    let right = RunningCoordinator::start_with(
        &nats.access(),
        &dir.path().join("c2"),
        &shipped_definitions(),
        |c| {
            c.nats_security.nats_user = Some("saga".into());
            c.nats_security.nats_password = Some("correct-horse".into());
        },
    )
    .await?;
    eventually(
        Duration::from_secs(10),
        "ready with the right password",
        || async { ready(&right).await.unwrap_or(false) },
    )
    .await?;
    // The participants with the same credentials: an order runs end to end.
    let security = saga_nats::NatsSecurity {
        nats_user: Some("saga".into()),
        nats_password: Some("correct-horse".into()),
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let mut inv = participants::inventory::InventoryConfig::for_tests(
        &nats.url(),
        &dir.path().join("inventory"),
        vec![("A-1".into(), 5)],
    );
    inv.nats_security = security.clone();
    let mut pay = participants::payment::PaymentConfig::for_tests(
        &nats.url(),
        &dir.path().join("payment"),
        100_000,
        Duration::from_millis(1),
        0.0,
    );
    pay.nats_security = security;
    let listener = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let inv_task = tokio::spawn(participants::inventory::run(inv, listener().await?, stop.clone()));
    let pay_task = tokio::spawn(participants::payment::run(pay, listener().await?, stop.clone()));
    let client = async_nats::ConnectOptions::with_user_and_password("saga".into(), "correct-horse".into())
        .connect(nats.url())
        .await?;
    wait_participant(&client, "inventory").await?;
    wait_participant(&client, "payment").await?;
    let mut g = right.client().await?;
    let created = g
        .create_order(order("c-1", &[("A-1", 2)], 700))
        .await?
        .into_inner();
    let saga = wait_terminal(&mut g, &created.saga_id, Duration::from_secs(20)).await?;
    ensure!(saga.state == pb::SagaState::Completed as i32, "{saga:?}");
    stop.cancel();
    inv_task.await??;
    pay_task.await??;
    // By now the other one has been refused at least once; it must not be ready.
    ensure!(!ready(&wrong).await?, "ready with a wrong password");
    let mut g = wrong.client().await?;
    ensure!(
        definitions(&mut g).await? >= 1,
        "reads work while NATS is refused"
    );
    wrong.stop().await?;
    right.stop().await
}

#[tokio::test]
async fn nats_over_tls_with_the_ca() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(&dir.path().join("pki"))?;
    let (cert, key) = (
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
    );
    let nats = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key])?;
    let c = RunningCoordinator::start_with(
        &nats.access(),
        &dir.path().join("c"),
        &shipped_definitions(),
        |c| {
            c.nats_security.nats_tls_ca = Some(pki.ca.clone());
        },
    )
    .await?;
    eventually(Duration::from_secs(10), "ready over TLS", || async {
        ready(&c).await.unwrap_or(false)
    })
    .await?;
    c.stop().await
}
