//! OpenTelemetry export, end to end: nats-server, the coordinator and both
//! participants as separate processes, exporting over OTLP to an in-test
//! receiver (the collector's gRPC `TraceService` and `POST /v1/traces`;
//! the coordinator on gRPC, the participants on HTTP/protobuf).
//!
//! - A saga's spans, from three processes, share its trace id (the saga id)
//!   and form one tree under its `saga` root; every attempt the saga made is
//!   a span (retries included, each with the participant's span under it);
//!   a compensated saga's compensations hang under its `compensation` span.
//! - With the receiver down, sagas still complete and
//!   `otlp_spans_dropped_total` moves.
//! - A saga in flight when the coordinator is kill -9'd continues the same
//!   trace after the restart, and its tree still closes.
//! - `RUST_LOG=warn` (the inventory's) silences log lines, not spans.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use saga_proto::pb::{self, saga_service_client::SagaServiceClient};
use saga_testkit::{otlp, *};
use tonic::transport::Channel;

const LIMIT_CENTS: i64 = 100_000;
const STOCK: &str = "A-1=100000,B-2=100000";

struct Traced {
    _nats: NatsServer,
    receiver: otlp::Receiver,
    coordinator: Proc,
    inventory: Proc,
    payment: Proc,
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Traced {
    /// Starts everything; `payment` gets `gateway` (`--gateway-latency`,
    /// `--gateway-failure-rate`).
    async fn start(dir: &Path, gateway: (&str, &str)) -> Result<Traced> {
        let bin = bin_dir()?;
        let nats = NatsServer::start()?;
        let receiver = otlp::Receiver::start().await?;
        let url = nats.url();
        let access = nats.access();
        let defs = fast_definitions(dir, "5s", 20)?;
        let path = |p: &str| dir.join(p).display().to_string();
        let http_otlp = |p: Proc| {
            p.env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.http_endpoint())
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        };
        let mut inventory = http_otlp(
            Proc::new(
                "inventory",
                bin.join("inventory"),
                args(&[
                    "--nats-url",
                    &url,
                    "--data-dir",
                    &path("inventory"),
                    "--stock",
                    STOCK,
                ]),
                dir.join("inventory.log"),
            )
            .envs(access.env(&Role::Participant("inventory".into())))
            // Logging at `warn` filters its log lines, not its spans.
            .env("RUST_LOG", "warn"),
        );
        let mut payment = http_otlp(
            Proc::new(
                "payment",
                bin.join("payment"),
                args(&[
                    "--nats-url",
                    &url,
                    "--data-dir",
                    &path("payment"),
                    "--customer-limit-cents",
                    &LIMIT_CENTS.to_string(),
                    "--gateway-latency",
                    gateway.0,
                    "--gateway-failure-rate",
                    gateway.1,
                ]),
                dir.join("payment.log"),
            )
            .envs(access.env(&Role::Participant("payment".into()))),
        );
        let mut coordinator = Proc::new(
            "coordinator",
            bin.join("coordinator"),
            args(&[
                "--nats-url",
                &url,
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
                &path("coordinator"),
                "--definitions-dir",
                &defs.display().to_string(),
            ]),
            dir.join("coordinator.log"),
        )
        .envs(access.env(&Role::Coordinator))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc_endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
        .ports_file(dir.join("coordinator.ports"));
        inventory.start()?;
        payment.start()?;
        coordinator.start()?;
        let client = nats.connect().await?;
        wait_participant(&client, "inventory").await?;
        wait_participant(&client, "payment").await?;
        Ok(Traced {
            _nats: nats,
            receiver,
            coordinator,
            inventory,
            payment,
        })
    }

    fn addrs(&mut self) -> Result<(SocketAddr, SocketAddr)> {
        let ports = self.coordinator.ports(Duration::from_secs(30))?;
        Ok((ports.get("grpc")?, ports.get("http")?))
    }

    async fn client(&mut self) -> Result<SagaServiceClient<Channel>> {
        let (grpc, http) = self.addrs()?;
        eventually(Duration::from_secs(30), "the coordinator ready", || async move {
            http_get(http, "/ready").await.is_ok_and(|(code, _)| code == 200)
        })
        .await?;
        connect(grpc).await
    }

    /// What the processes logged last, for a failure's message.
    fn logs(&self) -> String {
        [&self.coordinator, &self.inventory, &self.payment]
            .iter()
            .map(|p| format!("--- {}\n{}", p.name, p.log_tail(30)))
            .collect()
    }
}

async fn place(client: &mut SagaServiceClient<Channel>, amount_cents: i64) -> Result<String> {
    Ok(client
        .create_order(order("c-1", &[("A-1", 1), ("B-2", 2)], amount_cents))
        .await?
        .into_inner()
        .saga_id)
}

fn trace_id(saga_id: &str) -> String {
    saga_id.replace('-', "")
}

/// The spans of `saga`'s trace once its root and what `ready` wants have arrived.
async fn trace_of(
    receiver: &otlp::Receiver,
    saga_id: &str,
    ready: impl Fn(&[otlp::ReceivedSpan]) -> bool,
) -> Result<Vec<otlp::ReceivedSpan>> {
    let trace = trace_id(saga_id);
    let done = |spans: &[otlp::ReceivedSpan]| spans.iter().any(|s| s.name == "saga") && ready(spans);
    let found = eventually(
        Duration::from_secs(20),
        &format!("the spans of saga {saga_id}"),
        || {
            let spans = receiver.trace(&trace);
            let ok = done(&spans);
            async move { ok }
        },
    )
    .await;
    let spans = receiver.trace(&trace);
    found.with_context(|| format!("saga {saga_id}: spans so far:\n{}", otlp::draw(&spans)))?;
    Ok(spans)
}

/// One tree: exactly one root (`saga`, no parent), every other span's
/// parent in the trace, no span id twice.
fn check_one_tree(spans: &[otlp::ReceivedSpan]) -> Result<()> {
    let drawn = otlp::draw(spans);
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    ensure!(ids.len() == spans.len(), "a span id twice:\n{drawn}");
    let roots: Vec<&otlp::ReceivedSpan> = spans
        .iter()
        .filter(|s| s.parent.is_empty() || s.parent == "0000000000000000")
        .collect();
    ensure!(
        roots.len() == 1 && roots[0].name == "saga" && roots[0].service == "coordinator",
        "not one `saga` root:\n{drawn}"
    );
    for s in spans {
        ensure!(
            s.parent.is_empty() || s.parent == "0000000000000000" || ids.contains(s.parent.as_str()),
            "{}: {} has a parent outside the trace:\n{drawn}",
            s.service,
            s.name
        );
    }
    Ok(())
}

fn by_id(spans: &[otlp::ReceivedSpan]) -> BTreeMap<&str, &otlp::ReceivedSpan> {
    spans.iter().map(|s| (s.span_id.as_str(), s)).collect()
}

async fn metric(http: SocketAddr, name: &str) -> Result<f64> {
    let (_, body) = http_get(http, "/metrics").await?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sagas_spans_from_three_processes_form_one_tree_with_every_attempt_and_compensation() -> Result<()>
{
    init_logs();
    let dir = tempfile::tempdir()?;
    // Half the gateway calls fail (an `error` reply): retries in most sagas.
    let mut sys = Traced::start(dir.path(), ("1ms", "0.5")).await?;
    let mut client = sys.client().await?;
    let mut ids = Vec::new();
    // 12: at a 50% failure rate, the chance that none retries is 1 in 4,096 (6 was 1 in 64).
    for _ in 0..12 {
        ids.push(place(&mut client, 1_000).await?);
    }
    let over = place(&mut client, LIMIT_CENTS + 1).await?;
    let mut retried = 0;
    for id in &ids {
        let saga = wait_terminal(&mut client, id, WAIT).await?;
        ensure!(
            saga.state == pb::SagaState::Completed as i32,
            "{saga:#?}\n{}",
            sys.logs()
        );
        let attempts: u32 = saga.steps.iter().map(|s| s.attempts).sum();
        let spans = trace_of(&sys.receiver, id, |spans| {
            spans
                .iter()
                .filter(|s| {
                    s.service == "coordinator" && !s.attr("saga.attempt").is_empty() && s.name != "backoff"
                })
                .count()
                == attempts as usize
                && spans.iter().filter(|s| s.service != "coordinator").count() >= saga.steps.len()
        })
        .await?;
        let drawn = otlp::draw(&spans);
        check_one_tree(&spans)?;
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        ensure!(
            services == HashSet::from(["coordinator", "inventory", "payment"]),
            "{services:?}\n{drawn}"
        );
        let ids = by_id(&spans);
        let root = spans.iter().find(|s| s.name == "saga").context("root")?;
        ensure!(root.attr("saga.state") == "COMPLETED", "{drawn}");
        ensure!(
            spans
                .iter()
                .any(|s| s.name == "CreateOrder" && s.parent == root.span_id),
            "no CreateOrder span under the root:\n{drawn}"
        );
        // One span per attempt, each under the root, numbered 1..=n per step.
        for step in &saga.steps {
            let mut seen: Vec<u32> = spans
                .iter()
                .filter(|s| {
                    s.attr("saga.step") == step.name && s.name != "backoff" && s.service == "coordinator"
                })
                .map(|s| s.attr("saga.attempt").parse().unwrap_or(0))
                .collect();
            seen.sort_unstable();
            let want: Vec<u32> = (1..=step.attempts).collect();
            ensure!(
                seen == want,
                "step {}: attempts {seen:?}, want {want:?}\n{drawn}",
                step.name
            );
        }
        // Every participant span is the child of a coordinator attempt span.
        for s in spans.iter().filter(|s| s.service != "coordinator") {
            let parent = ids.get(s.parent.as_str()).context("parent")?;
            ensure!(
                parent.service == "coordinator"
                    && parent.attr("saga.idempotency_key") == s.attr("idempotency_key")
                    && parent.attr("saga.attempt") == s.attr("attempt"),
                "{} {} is not under its attempt:\n{drawn}",
                s.service,
                s.name
            );
        }
        if attempts > saga.steps.len() as u32 {
            retried += 1;
            ensure!(
                spans.iter().any(|s| s.name == "backoff"),
                "a retry without a backoff span:\n{drawn}"
            );
        }
    }
    ensure!(
        retried > 0,
        "no saga retried a step at a 50% gateway failure rate"
    );

    // The compensated one: the rejected charge, the compensation phase, its release.
    let saga = wait_terminal(&mut client, &over, WAIT).await?;
    ensure!(saga.state == pb::SagaState::Compensated as i32, "{saga:#?}");
    let spans = trace_of(&sys.receiver, &over, |spans| {
        spans.iter().any(|s| s.name == "compensation")
            && spans
                .iter()
                .any(|s| s.service == "inventory" && s.attr("kind") == "compensate")
    })
    .await?;
    let drawn = otlp::draw(&spans);
    check_one_tree(&spans)?;
    let ids = by_id(&spans);
    let phase = spans.iter().find(|s| s.name == "compensation").context("phase")?;
    let release = spans
        .iter()
        .find(|s| s.service == "coordinator" && s.attr("saga.kind") == "compensate")
        .context("no compensation attempt span")?;
    ensure!(
        release.parent == phase.span_id,
        "the compensation is not under its phase:\n{drawn}"
    );
    ensure!(
        spans
            .iter()
            .any(|s| s.service == "coordinator" && s.attr("saga.outcome") == "rejected"),
        "no rejected charge:\n{drawn}"
    );
    ensure!(
        ids.get(phase.parent.as_str()).is_some_and(|p| p.name == "saga"),
        "{drawn}"
    );
    println!("a compensated saga's trace:\n{drawn}");

    // The receiver down: sagas still complete, and the dropped spans are counted.
    let (_, http) = sys.addrs()?;
    let dropped_before = metric(http, "otlp_spans_dropped_total").await?;
    sys.receiver.stop().await;
    let mut down = Vec::new();
    for _ in 0..10 {
        down.push(place(&mut client, 1_000).await?);
    }
    for id in &down {
        let saga = wait_terminal(&mut client, id, WAIT).await?;
        ensure!(saga.state == pb::SagaState::Completed as i32, "{saga:#?}");
    }
    eventually(
        Duration::from_secs(20),
        "otlp_spans_dropped_total to move",
        || async {
            metric(http, "otlp_spans_dropped_total")
                .await
                .is_ok_and(|n| n > dropped_before)
        },
    )
    .await
    .with_context(|| sys.logs())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_resumed_after_the_coordinator_is_killed_continues_its_trace() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    // A slow gateway keeps the charge in flight while the coordinator dies.
    let mut sys = Traced::start(dir.path(), ("1500ms", "0")).await?;
    let mut client = sys.client().await?;
    let id = place(&mut client, 1_000).await?;
    wait_saga(&client, &id, "the charge in flight", |s| {
        s.steps
            .iter()
            .any(|st| st.name == "charge-payment" && st.status == pb::StepStatus::Running as i32)
    })
    .await?;
    // What the first run exported (CreateOrder, the reserve attempt) is in.
    let trace = trace_id(&id);
    eventually(Duration::from_secs(10), "the first run's spans", || {
        let n = sys
            .receiver
            .trace(&trace)
            .iter()
            .filter(|s| s.service == "coordinator")
            .count();
        async move { n >= 2 }
    })
    .await?;
    sys.coordinator.kill();
    sys.coordinator.start()?;
    let mut client = sys.client().await?;
    let saga = wait_terminal(&mut client, &id, WAIT).await?;
    ensure!(
        saga.state == pb::SagaState::Completed as i32,
        "{saga:#?}\n{}",
        sys.logs()
    );
    let spans = trace_of(&sys.receiver, &id, |spans| {
        spans
            .iter()
            .any(|s| s.service == "coordinator" && s.attr("saga.step") == "charge-payment")
            && spans.iter().any(|s| s.service == "payment")
    })
    .await?;
    let drawn = otlp::draw(&spans);
    check_one_tree(&spans)?;
    ensure!(spans.iter().any(|s| s.name == "CreateOrder"), "{drawn}");
    // The charge the first run sent and the one the second re-sent are one
    // attempt (same key, same attempt): the payment's span(s) hang under it.
    let charge = spans
        .iter()
        .filter(|s| s.service == "coordinator" && s.attr("saga.step") == "charge-payment")
        .collect::<Vec<_>>();
    ensure!(charge.len() == 1, "{drawn}");
    ensure!(
        spans
            .iter()
            .filter(|s| s.service == "payment")
            .all(|s| s.parent == charge[0].span_id),
        "{drawn}"
    );
    println!("a saga resumed after kill -9:\n{drawn}");
    Ok(())
}
