//! `await` steps, signals, `sleep` steps and deadlines end to end: a real
//! coordinator and nats-server, a scripted participant `fake`, signals by
//! gRPC `SignalSaga` and by NATS `saga.signal` (as the signals role), and a
//! coordinator killed with SIGKILL while its timers are pending.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use saga_proto::pb::{self, SagaState, StepStatus};
use saga_testkit::*;

const WAIT_DEFS: &str = r#"name: wait
version: 1
defaults:
  timeout: 400ms
  retry: { max_attempts: 3, initial_backoff: 10ms, max_backoff: 20ms, multiplier: 2.0, jitter: false }
steps:
  - name: fake-step
    participant: fake
    action: do
    compensation: undo
  - name: confirm
    await: payment-confirmed
    timeout: 2s
    output_schema: { type: object, required: [code] }
  - name: settle
    sleep: 200ms
  - name: ship
    participant: fake
    action: ship
    compensation: unship
    input:
      code: "${steps.confirm.output.code}"
"#;

const DEADLINE_DEFS: &str = r#"name: wait-deadline
version: 1
deadline: 1s
steps:
  - name: fake-step
    participant: fake
    action: do
    compensation: undo
    timeout: 3s
    retry: { max_attempts: 1 }
"#;

fn definitions(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let defs = dir.join("wait-defs");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(defs.join("wait.yaml"), WAIT_DEFS)?;
    std::fs::write(defs.join("wait-deadline.yaml"), DEADLINE_DEFS)?;
    Ok(defs)
}

type Seen = Arc<Mutex<Vec<saga_wire::Command>>>;

/// Participant `fake`: records every command; `do` is never answered for
/// customer `slow` and not on its first attempt for customer `late`;
/// everything else is `ok` at once.
async fn fake(client: &async_nats::Client) -> Result<(Seen, tokio::task::JoinHandle<()>)> {
    let mut sub = client.subscribe("saga.cmd.fake.*").await?;
    client.flush().await?;
    let seen: Seen = Arc::default();
    let (c, log) = (client.clone(), seen.clone());
    let task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Ok(cmd) = serde_json::from_slice::<saga_wire::Command>(&msg.payload) else {
                continue;
            };
            let silent = cmd.action == "do"
                && (cmd.payload.customer_id == "slow"
                    || (cmd.payload.customer_id == "late" && cmd.attempt == 1));
            if let Ok(mut l) = log.lock() {
                l.push(cmd);
            }
            if silent {
                continue;
            }
            let ok = saga_wire::Reply::Ok {
                data: serde_json::json!({}),
            };
            if let (Some(reply), Ok(body)) = (msg.reply, serde_json::to_vec(&ok)) {
                let _ = c.publish(reply, body.into()).await;
            }
        }
    });
    Ok((seen, task))
}

fn create(definition: &str, customer: &str) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        definition: definition.into(),
        ..order(customer, &[("A-1", 1)], 100)
    }
}

/// The operator token the coordinators here run with (gRPC `SignalSaga` needs it).
const TOKEN: &str = "waits-test-operator-token";

fn signal(saga_id: &str, signal_id: &str, payload: &str) -> tonic::Request<pb::SignalSagaRequest> {
    named(saga_id, "payment-confirmed", signal_id, payload)
}

fn named(saga_id: &str, name: &str, signal_id: &str, payload: &str) -> tonic::Request<pb::SignalSagaRequest> {
    let mut r = tonic::Request::new(pb::SignalSagaRequest {
        saga_id: saga_id.into(),
        name: name.into(),
        signal_id: signal_id.into(),
        payload_json: payload.into(),
    });
    if let Ok(v) = format!("Bearer {TOKEN}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

fn step<'a>(saga: &'a pb::Saga, name: &str) -> Option<&'a pb::Step> {
    saga.steps.iter().find(|s| s.name == name)
}

fn kinds(saga: &pb::Saga) -> Vec<&str> {
    saga.history.iter().map(|h| h.kind.as_str()).collect()
}

async fn system(dir: &std::path::Path) -> Result<System> {
    let mut s = System::bare(Some(definitions(dir)?)).await?;
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.operator_token = Some(TOKEN.into());
    })
    .await?;
    c.wait_ready().await?;
    s.coordinator = Some(c);
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_for_a_waiting_step_completes_the_saga_with_its_payload_and_repeats_change_nothing(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = system(dir.path()).await?;
    let (seen, _task) = fake(&s.client).await?;
    let mut g = s.grpc().await?;
    let id = g.create_order(create("wait", "c-1")).await?.into_inner().saga_id;
    wait_saga(&g, &id, "the await waiting", |x| {
        step(x, "confirm").is_some_and(|c| c.status == StepStatus::Waiting as i32 && c.due_at.is_some())
    })
    .await?;
    let first = g
        .signal_saga(signal(&id, "psp-1", r#"{"code":"ok-123"}"#))
        .await?
        .into_inner();
    ensure!(first.outcome == "consumed", "{first:?}");
    // The same signal again (a webhook retried): nothing changes.
    let again = g
        .signal_saga(signal(&id, "psp-1", r#"{"code":"other"}"#))
        .await?
        .into_inner();
    ensure!(again.outcome == "duplicate", "{again:?}");
    // Another signal id for the same name: refused.
    let other = g.signal_saga(signal(&id, "psp-2", r#"{"code":"x"}"#)).await;
    ensure!(
        other
            .as_ref()
            .is_err_and(|e| e.code() == tonic::Code::FailedPrecondition && e.message().contains("psp-1")),
        "{other:?}"
    );
    let done = wait_terminal(&mut g, &id, WAIT).await?;
    ensure!(done.state == SagaState::Completed as i32, "{done:#?}");
    let confirm = step(&done, "confirm").context("confirm")?;
    ensure!(confirm.kind == "await" && confirm.signal == "payment-confirmed");
    ensure!(
        confirm.signal_id == "psp-1" && confirm.output_json == r#"{"code":"ok-123"}"#,
        "{confirm:?}"
    );
    let settle = step(&done, "settle").context("settle")?;
    ensure!(settle.kind == "sleep" && settle.status == StepStatus::Succeeded as i32);
    ensure!(settle.duration_ms >= 200, "slept {} ms", settle.duration_ms);
    ensure!(kinds(&done).contains(&"step_waiting") && kinds(&done).contains(&"step_sleeping"));
    // The payload travelled into the next command.
    let ship = seen
        .lock()
        .map(|l| l.iter().find(|c| c.action == "ship").cloned())
        .ok()
        .flatten()
        .context("no ship command")?;
    ensure!(
        ship.input == serde_json::json!({"code": "ok-123"}),
        "{:?}",
        ship.input
    );
    // A finished saga refuses a new signal (a repeat is still a no-op).
    let late = g.signal_saga(signal(&id, "psp-3", r#"{"code":"x"}"#)).await;
    ensure!(
        late.as_ref()
            .is_err_and(|e| e.code() == tonic::Code::FailedPrecondition),
        "{late:?}"
    );
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_over_nats_before_the_await_is_kept_and_taken_when_the_step_is_reached() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = system(dir.path()).await?;
    let (_seen, _task) = fake(&s.client).await?;
    let access = s.nats.access();
    let webhooks = access
        .security(&Role::Signals)
        .apply(async_nats::ConnectOptions::new().custom_inbox_prefix(Role::Signals.inbox_prefix()))
        .await?
        .connect(access.url())
        .await?;
    let mut g = s.grpc().await?;
    // Customer `late`: the first step's first attempt is not answered, so
    // the saga is still on it when the signal comes.
    let id = g.create_order(create("wait", "late")).await?.into_inner().saga_id;
    let ask = |body: serde_json::Value| {
        let webhooks = webhooks.clone();
        async move {
            let bytes = serde_json::to_vec(&body)?;
            let reply = tokio::time::timeout(WAIT, webhooks.request("saga.signal", bytes.into())).await??;
            anyhow::Ok(serde_json::from_slice::<saga_wire::SignalReply>(&reply.payload)?)
        }
    };
    let body = |signal_id: &str, payload: serde_json::Value| serde_json::json!({"saga_id": id, "name": "payment-confirmed", "signal_id": signal_id, "payload": payload});
    let kept = ask(body("evt-1", serde_json::json!({"code": "early"}))).await?;
    ensure!(
        matches!(&kept, saga_wire::SignalReply::Ok { outcome, state } if outcome == "kept" && state == "RUNNING"),
        "{kept:?}"
    );
    let repeat = ask(body("evt-1", serde_json::json!({"code": "early"}))).await?;
    ensure!(
        matches!(&repeat, saga_wire::SignalReply::Ok { outcome, .. } if outcome == "duplicate"),
        "{repeat:?}"
    );
    // Malformed or invalid requests are answered with an error, never dropped.
    let bad = ask(serde_json::json!({"saga_id": id, "name": "Payment!", "signal_id": "x"})).await?;
    ensure!(
        matches!(&bad, saga_wire::SignalReply::Error { code, message } if code == "invalid_argument" && message.starts_with("name:")),
        "{bad:?}"
    );
    let unknown = ask(serde_json::json!({"saga_id": id, "name": "no-such", "signal_id": "x"})).await?;
    ensure!(
        matches!(&unknown, saga_wire::SignalReply::Error { code, .. } if code == "invalid_argument"),
        "{unknown:?}"
    );
    let reply = tokio::time::timeout(WAIT, webhooks.request("saga.signal", "{not json".into())).await??;
    let garbage: saga_wire::SignalReply = serde_json::from_slice(&reply.payload)?;
    ensure!(matches!(&garbage, saga_wire::SignalReply::Error { code, .. } if code == "invalid_argument"));
    let done = wait_terminal(&mut g, &id, WAIT).await?;
    ensure!(done.state == SagaState::Completed as i32, "{done:#?}");
    let confirm = step(&done, "confirm").context("confirm")?;
    ensure!(confirm.output_json == r#"{"code":"early"}"# && confirm.signal_id == "evt-1");
    let history = kinds(&done);
    ensure!(history.contains(&"signal_received"), "{history:?}");
    ensure!(
        !history.contains(&"step_waiting"),
        "the kept signal was taken at once: {history:?}"
    );
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_await_that_times_out_compensates_and_bad_signals_are_refused_by_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = system(dir.path()).await?;
    let (seen, _task) = fake(&s.client).await?;
    let mut g = s.grpc().await?;
    let id = g.create_order(create("wait", "c-2")).await?.into_inner().saga_id;
    wait_saga(&g, &id, "the await waiting", |x| {
        step(x, "confirm").is_some_and(|c| c.status == StepStatus::Waiting as i32)
    })
    .await?;
    let code = |r: Result<tonic::Response<pb::SignalSagaResponse>, tonic::Status>| {
        r.err().map(|e| (e.code(), e.message().to_string()))
    };
    let unknown = code(g.signal_saga(named(&id, "refund-confirmed", "s", "{}")).await);
    ensure!(
        unknown
            .as_ref()
            .is_some_and(|(c, m)| *c == tonic::Code::InvalidArgument
                && m.starts_with("name:")
                && m.contains("payment-confirmed")),
        "{unknown:?}"
    );
    let not_json = code(g.signal_saga(signal(&id, "s", "{code")).await);
    ensure!(
        not_json
            .as_ref()
            .is_some_and(|(c, m)| *c == tonic::Code::InvalidArgument && m.starts_with("payload_json")),
        "{not_json:?}"
    );
    let schema = code(g.signal_saga(signal(&id, "s", r#"{"no":1}"#)).await);
    ensure!(
        schema
            .as_ref()
            .is_some_and(|(c, m)| *c == tonic::Code::InvalidArgument && m.starts_with("payload")),
        "{schema:?}"
    );
    let no_saga = code(
        g.signal_saga(signal("0190f7a2-1c3b-7def-8123-456789abcdef", "s", "{}"))
            .await,
    );
    ensure!(
        no_saga.as_ref().is_some_and(|(c, _)| *c == tonic::Code::NotFound),
        "{no_saga:?}"
    );
    let no_id = code(g.signal_saga(signal(&id, "", "{}")).await);
    ensure!(
        no_id
            .as_ref()
            .is_some_and(|(c, m)| *c == tonic::Code::InvalidArgument && m.starts_with("signal_id")),
        "{no_id:?}"
    );
    // No signal within 2 s: the step fails and the first step is undone.
    let done = wait_terminal(&mut g, &id, WAIT).await?;
    ensure!(done.state == SagaState::Compensated as i32, "{done:#?}");
    ensure!(
        done.reason == "step confirm: no signal payment-confirmed within 2s",
        "{}",
        done.reason
    );
    let undone = seen
        .lock()
        .map(|l| l.iter().filter(|c| c.action == "undo").count())
        .unwrap_or(0);
    ensure!(undone == 1, "undo sent {undone} times");
    let late = code(g.signal_saga(signal(&id, "s", r#"{"code":"late"}"#)).await);
    ensure!(
        late.as_ref()
            .is_some_and(|(c, m)| *c == tonic::Code::FailedPrecondition && m.contains("COMPENSATED")),
        "{late:?}"
    );
    s.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_mid_step_compensates_the_step_in_flight_as_unknown() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = system(dir.path()).await?;
    let (seen, _task) = fake(&s.client).await?;
    let mut g = s.grpc().await?;
    // Customer `slow`: the step's command is never answered (timeout 3 s).
    let id = g
        .create_order(create("wait-deadline", "slow"))
        .await?
        .into_inner()
        .saga_id;
    let started = std::time::Instant::now();
    let done = wait_terminal(&mut g, &id, WAIT).await?;
    ensure!(done.state == SagaState::Compensated as i32, "{done:#?}");
    ensure!(
        started.elapsed() < Duration::from_millis(2_900),
        "ended by the deadline, not the step's timeout"
    );
    ensure!(
        done.reason == "deadline passed (1s after creation)",
        "{}",
        done.reason
    );
    ensure!(done.deadline_at.is_some());
    ensure!(kinds(&done).contains(&"deadline_passed"), "{:?}", kinds(&done));
    let actions: Vec<String> = seen
        .lock()
        .map(|l| l.iter().map(|c| c.action.clone()).collect())
        .unwrap_or_default();
    ensure!(
        actions == ["do", "undo"],
        "the step in flight was undone: {actions:?}"
    );
    s.shutdown().await
}

/// The coordinator as an OS process (to kill it with SIGKILL).
fn coordinator_proc(dir: &std::path::Path, defs: &std::path::Path, nats: &NatsServer) -> Result<Proc> {
    // Fewer in memory than waiting: timers of evicted sagas fire too.
    Ok(Proc::coordinator(dir, defs, nats, &["--resident-sagas", "4"])?.env("SAGA_OPERATOR_TOKEN", TOKEN))
}

/// A client of the coordinator process once `/ready` says so (NATS connected, sagas resumed).
async fn ready(
    c: &mut Proc,
) -> Result<pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>> {
    let ports = c.ports(WAIT)?;
    let http = ports.get("http")?;
    eventually(WAIT, "the coordinator ready", || async {
        http_get(http, "/ready").await.is_ok_and(|(code, _)| code == 200)
    })
    .await?;
    connect(ports.get("grpc")?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_pending_at_a_kill_9_fire_once_after_the_restart_and_signals_still_land() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let defs = definitions(dir.path())?;
    let nats = NatsServer::start()?;
    let client = nats.connect().await?;
    let (seen, _task) = fake(&client).await?;
    let mut coordinator = coordinator_proc(dir.path(), &defs, &nats)?;
    coordinator.start()?;
    let mut g = ready(&mut coordinator).await?;
    let mut ids = Vec::new();
    for k in 0..12 {
        ids.push(
            g.create_order(create("wait", &format!("c-{k}")))
                .await?
                .into_inner()
                .saga_id,
        );
    }
    for id in &ids {
        wait_saga(&g, id, "waiting", |x| {
            step(x, "confirm").is_some_and(|c| c.status == StepStatus::Waiting as i32)
        })
        .await?;
    }
    coordinator.kill();
    // Down past the awaits' 2 s timeout: they are due when it comes back.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    coordinator.start()?;
    let mut g = ready(&mut coordinator).await?;
    for id in &ids {
        let done = wait_terminal(&mut g, id, WAIT).await?;
        ensure!(done.state == SagaState::Compensated as i32, "{id}: {done:#?}");
        let timeouts = done
            .history
            .iter()
            .filter(|h| h.kind == "step_failed" && h.step == "confirm")
            .count();
        ensure!(timeouts == 1, "{id}: the timeout fired {timeouts} times");
    }
    let undos = seen
        .lock()
        .map(|l| l.iter().filter(|c| c.action == "undo").count())
        .unwrap_or(0);
    ensure!(undos == ids.len(), "{undos} undos for {} sagas", ids.len());

    // Timers not yet due at the kill fire on time after it, and a signal sent
    // after the restart lands.
    let fresh = g
        .create_order(create("wait", "c-fresh"))
        .await?
        .into_inner()
        .saga_id;
    let timed = g
        .create_order(create("wait", "c-timed"))
        .await?
        .into_inner()
        .saga_id;
    for id in [&fresh, &timed] {
        wait_saga(&g, id, "waiting", |x| {
            step(x, "confirm").is_some_and(|c| c.status == StepStatus::Waiting as i32)
        })
        .await?;
    }
    coordinator.kill();
    coordinator.start()?;
    let mut g = ready(&mut coordinator).await?;
    let taken = g
        .signal_saga(signal(&fresh, "after-restart", r#"{"code":"ok"}"#))
        .await?
        .into_inner();
    ensure!(taken.outcome == "consumed", "{taken:?}");
    let done = wait_terminal(&mut g, &fresh, WAIT).await?;
    ensure!(done.state == SagaState::Completed as i32, "{done:#?}");
    let done = wait_terminal(&mut g, &timed, WAIT).await?;
    ensure!(done.state == SagaState::Compensated as i32, "{done:#?}");
    coordinator.stop();
    Ok(())
}

/// The cost of sagas parked on a timer: `N` sagas each waiting on a one-hour
/// await, created through one coordinator process, its resident memory read
/// from /proc before and after (`cargo test -p saga-tests --test waits --
/// --ignored --nocapture`; docs/benchmarks.md has the figures). Run by hand:
/// a measurement, with the gauge checked, not a bound asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn memory_per_pending_timer() -> Result<()> {
    init_logs();
    let n: usize = std::env::var("TIMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let resident = std::env::var("RESIDENT").unwrap_or_else(|_| "100000".into());
    let dir = tempfile::tempdir()?;
    let defs = dir.path().join("mem-defs");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(
        defs.join("parked.yaml"),
        "name: parked\nversion: 1\ndeadline: 2h\nsteps:\n  - name: confirm\n    await: go\n    timeout: 1h\n",
    )?;
    let nats = NatsServer::start()?;
    let mut c = coordinator_proc(dir.path(), &defs, &nats)?;
    c.set_arg("--resident-sagas", &resident);
    c.start()?;
    let g = ready(&mut c).await?;
    let http = c.ports(WAIT)?.get("http")?;
    let rss = |pid: u32| -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("VmRSS")?;
        Ok(kib * 1024)
    };
    let create = |count: usize| {
        let g = g.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for k in 0..32 {
                let mut g = g.clone();
                tasks.spawn(async move {
                    for i in (k..count).step_by(32) {
                        g.create_order(create("parked", &format!("c-{i}"))).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            anyhow::Ok(())
        }
    };
    let pid = c.pid().context("pid")?;
    create(2_000).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss(pid)?;
    create(n).await?;
    let want = format!("saga_timers_pending {}", 2 * (n + 2_000));
    eventually(WAIT, "the timers armed", || async {
        http_get(http, "/metrics")
            .await
            .is_ok_and(|(_, body)| body.lines().any(|l| l == want))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(pid)?;
    println!(
        "{n} sagas parked (2 timers each: await timeout, deadline), --resident-sagas {resident}: \
         RSS {} -> {} MiB, {} bytes per parked saga",
        before >> 20,
        after >> 20,
        after.saturating_sub(before) / n as u64
    );
    c.stop();
    Ok(())
}
