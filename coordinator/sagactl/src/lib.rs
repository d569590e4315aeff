//! `sagactl`: the operator's command line for the saga coordinator, over gRPC.
//!
//! Human tables by default, `--json` for scripts. `demo` places the four
//! orders of `make demo` and checks each ends where it should; `conformance`
//! drives a running participant through the protocol's rules over NATS.
//!
//! The whole command line is [`main`], called by the `sagactl` binary and by
//! the multi-call `saga` binary (`saga ctl …`, deploy/saga); nothing else is
//! public.
#![deny(unreachable_pub)]

mod conformance;

use std::ffi::OsString;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use saga_proto::names::{is_terminal, state as state_name, step_status as step_status_name};
use saga_proto::pb::{self, saga_service_client::SagaServiceClient};
use serde_json::{json, Value};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Inspect and drive the saga coordinator over gRPC"
)]
struct Cli {
    /// Coordinator gRPC address.
    #[arg(
        long,
        env = "SAGACTL_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// PEM CA that signed the coordinator's certificate (for an `https://` address).
    #[arg(long, env = "SAGACTL_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, when the coordinator requires mutual TLS (with `--tls-key`).
    #[arg(long, env = "SAGACTL_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SAGACTL_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Server name to check the certificate against (default: the address' host).
    #[arg(long, env = "SAGACTL_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start an order saga.
    Create {
        /// Customer id.
        #[arg(long)]
        customer: String,
        /// Order line as SKU:QUANTITY; repeat for more lines.
        #[arg(long = "item", required = true, value_parser = parse_item)]
        items: Vec<pb::OrderItem>,
        /// Amount in minor units (cents).
        #[arg(long)]
        amount_cents: i64,
        /// ISO 4217 currency.
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// Business order id (generated when absent).
        #[arg(long)]
        order_id: Option<String>,
        /// Client idempotency key: repeating it returns the same saga.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Definition name.
        #[arg(long, default_value = "order")]
        definition: String,
        /// Wait until the saga is terminal and print it.
        #[arg(long)]
        wait: bool,
    },
    /// Show one saga with its steps and history.
    Get {
        /// Saga id.
        saga_id: String,
    },
    /// Follow one saga live: a line per transition until it is terminal.
    Watch {
        /// Saga id.
        saga_id: String,
    },
    /// Operator: stop a running saga and compensate what it did.
    Abort {
        /// Saga id.
        saga_id: String,
        /// Why (recorded in the history).
        #[arg(long, default_value = "")]
        reason: String,
        /// Operator token (sent as `authorization: Bearer <token>`).
        #[arg(long, env = "SAGA_OPERATOR_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Operator: resume the compensation of a FAILED saga.
    Retry {
        /// Saga id.
        saga_id: String,
        /// Operator token (sent as `authorization: Bearer <token>`).
        #[arg(long, env = "SAGA_OPERATOR_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Deliver a signal to a saga's `await` step of that name (taken at once
    /// when the step waits, kept until it does when the step is not reached yet).
    Signal {
        /// Saga id.
        saga_id: String,
        /// Signal name (what the definition's `await:` names).
        name: String,
        /// The signal's payload, JSON (the await step's output).
        #[arg(long, default_value = "")]
        payload: String,
        /// Id for idempotency: the same id again changes nothing (default: a new one).
        #[arg(long)]
        signal_id: Option<String>,
        /// Operator token (sent as `authorization: Bearer <token>`).
        #[arg(long, env = "SAGA_OPERATOR_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// List sagas, oldest first.
    List {
        /// Only this state: pending, running, compensating, completed, compensated, failed.
        #[arg(long, value_parser = parse_state)]
        state: Option<pb::SagaState>,
        /// Only this definition: a name (any version) or `name@version`.
        #[arg(long)]
        definition: Option<String>,
        /// Only this customer id.
        #[arg(long)]
        customer: Option<String>,
        /// Only this business order id.
        #[arg(long)]
        order: Option<String>,
        /// Created at or after: RFC 3339 (`2026-12-01T10:00:00Z`) or a time ago (`15m`).
        #[arg(long, value_parser = parse_when)]
        since: Option<prost_types::Timestamp>,
        /// Created before: RFC 3339 or a time ago.
        #[arg(long, value_parser = parse_when)]
        until: Option<prost_types::Timestamp>,
        /// Newest first (default: oldest first).
        #[arg(long)]
        newest: bool,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this page token.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// List the loaded saga definitions.
    Definitions,
    /// Follow the saga events on JetStream live (stream SAGA_EVENTS), one line per event.
    Tail {
        /// Only sagas of this definition (name, e.g. `order`).
        #[arg(long)]
        definition: Option<String>,
        /// Start from the oldest event the stream holds instead of new ones.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events (default: follow until Ctrl-C).
        #[arg(long)]
        limit: Option<u64>,
        /// NATS server URL.
        #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Events stream name.
        #[arg(long, env = "COORDINATOR_EVENTS_STREAM", default_value = "SAGA_EVENTS")]
        stream: String,
        /// NATS credentials and TLS.
        #[command(flatten)]
        security: saga_nats::NatsSecurity,
    },
    /// Check saga definition files (or directories of them) exactly as the
    /// coordinator loads them; prints `file:line:column: reason` for each error
    /// and exits 1 if there is one (for a CI job).
    Validate {
        /// Definition files or directories.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Create (first run) or reuse the NATS users of a deployment: one nkey
    /// seed file per role in DIR (mode 0600) and `nats-auth.conf`, the
    /// `authorization` block nats-server loads (`nats-server -c`), which
    /// enforces each role's permissions. Prints the seed files to give each
    /// process (`--nats-nkey` / `NATS_NKEY`). Seeds are never printed.
    NatsAuth {
        /// Directory of the seeds and the server config.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Participant names (the `saga.cmd.<name>.*` they serve); repeat.
        #[arg(long = "participant", default_values_t = saga_auth::SHIPPED_PARTICIPANTS.map(String::from))]
        participants: Vec<String>,
        /// The events stream the events role may read.
        #[arg(long, default_value = "SAGA_EVENTS")]
        events_stream: String,
    },
    /// Show what a definition will do: its groups in order and, for each step
    /// that can fail, the compensations that would run.
    Plan {
        /// Definition files.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        /// A Mermaid flowchart instead of text.
        #[arg(long)]
        mermaid: bool,
    },
    /// Drive a running participant through the protocol's rules (a forward
    /// and its repeat, a compensation and its repeat, a compensation before
    /// its forward, malformed commands, an unknown action) as the coordinator
    /// would, and print a pass/fail row per rule; exits 1 if one fails.
    Conformance(Box<conformance::Args>),
    /// Place the demo's orders (completes, out of stock, declined, shipped; with the operator
    /// token also three `order-3ds` orders: confirmed by a signal, confirmed before the wait
    /// with shipping skipped, never confirmed) and show how each ended.
    Demo {
        /// How long to wait for each saga to finish.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Operator token, to send the 3-D Secure orders' signals (without it they are skipped).
        #[arg(long, env = "SAGA_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

fn parse_item(s: &str) -> Result<pb::OrderItem, String> {
    let (sku, qty) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}`: expected SKU:QUANTITY"))?;
    let quantity = qty
        .parse()
        .map_err(|_| format!("`{qty}`: quantity must be a whole number"))?;
    Ok(pb::OrderItem {
        sku: sku.to_string(),
        quantity,
    })
}

fn parse_state(s: &str) -> Result<pb::SagaState, String> {
    let name = format!("SAGA_STATE_{}", s.trim().to_ascii_uppercase());
    pb::SagaState::from_str_name(&name).ok_or_else(|| format!("unknown state `{s}`"))
}

/// An RFC 3339 time, or a duration before now (`15m`, `2h`).
fn parse_when(s: &str) -> Result<prost_types::Timestamp, String> {
    let at = match humantime::parse_rfc3339_weak(s.trim()) {
        Ok(t) => t,
        Err(_) => {
            let ago = humantime::parse_duration(s.trim())
                .map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration such as 15m"))?;
            std::time::SystemTime::now()
                .checked_sub(ago)
                .ok_or_else(|| format!("`{s}` ago is before 1970"))?
        }
    };
    Ok(prost_types::Timestamp::from(at))
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| {
            let d = Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
            Some(humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + d).to_string())
        })
        .unwrap_or_default()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    t
}

fn saga_json(s: &pb::Saga) -> Value {
    json!({
        "saga_id": s.saga_id, "definition": s.definition, "state": state_name(s.state),
        "current_step": s.current_step, "order_id": s.order_id, "customer_id": s.customer_id,
        "items": s.items.iter().map(|i| json!({"sku": i.sku, "quantity": i.quantity})).collect::<Vec<_>>(),
        "amount_cents": s.amount_cents, "currency": s.currency, "reason": s.reason,
        "correlation_id": s.correlation_id, "created_at": ts(&s.created_at), "updated_at": ts(&s.updated_at),
        "steps": s.steps.iter().map(|p| json!({
            "name": p.name, "participant": p.participant, "action": p.action, "compensation": p.compensation,
            "status": step_status_name(p.status), "attempts": p.attempts,
            "compensation_attempts": p.compensation_attempts, "last_outcome": p.last_outcome,
            "group": p.group, "on_failure": p.on_failure, "started_at": ts(&p.started_at),
            "finished_at": ts(&p.finished_at), "duration_ms": p.duration_ms,
            "kind": p.kind, "signal": p.signal, "due_at": ts(&p.due_at), "signal_id": p.signal_id,
            "input": serde_json::from_str::<Value>(&p.input_json).unwrap_or(Value::Null),
            "output": serde_json::from_str::<Value>(&p.output_json).unwrap_or(Value::Null), "when": p.when,
            "compensation_input": serde_json::from_str::<Value>(&p.compensation_input_json).unwrap_or(Value::Null),
        })).collect::<Vec<_>>(),
        "deadline_at": ts(&s.deadline_at), "kept_signals": s.kept_signals,
        "history": s.history.iter().map(|h| json!({
            "seq": h.seq, "at": ts(&h.at), "kind": h.kind, "step": h.step, "attempt": h.attempt,
            "detail": h.detail, "state": state_name(h.state),
        })).collect::<Vec<_>>(),
    })
}

fn print_saga(s: &pb::Saga) {
    let mut t = table(&[
        "saga",
        "definition",
        "state",
        "order",
        "customer",
        "amount",
        "reason",
    ]);
    t.add_row(vec![
        s.saga_id.clone(),
        s.definition.clone(),
        state_name(s.state).to_string(),
        s.order_id.clone(),
        s.customer_id.clone(),
        format!(
            "{}.{:02} {}",
            s.amount_cents / 100,
            s.amount_cents % 100,
            s.currency
        ),
        s.reason.clone(),
    ]);
    println!("{t}");
    if s.deadline_at.is_some() {
        println!("deadline: {}", ts(&s.deadline_at));
    }
    if !s.kept_signals.is_empty() {
        println!("signals kept for a later step: {}", s.kept_signals.join(", "));
    }
    let mut t = table(&[
        "group",
        "step",
        "participant",
        "action / compensation",
        "status",
        "attempts",
        "last outcome",
        "start / took",
        "timeline",
    ]);
    let ms = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| t.seconds.max(0) as u64 * 1000 + (t.nanos.max(0) as u64) / 1_000_000)
    };
    let origin = ms(&s.created_at).unwrap_or(0);
    let end = s
        .steps
        .iter()
        .filter_map(|p| ms(&p.finished_at).or(ms(&p.started_at)))
        .max()
        .unwrap_or(origin)
        .max(origin + 1);
    let width = 24u64;
    // Groups numbered 1, 2, ... in order (the wire carries each group's first step index).
    let mut group_no = 0u32;
    let mut last_group = None;
    for p in &s.steps {
        if last_group != Some(p.group) {
            group_no += 1;
            last_group = Some(p.group);
        }
        let (timing, bar) = match ms(&p.started_at) {
            Some(start) => {
                let offset = start.saturating_sub(origin);
                let cells = |ms: u64| ms * width / (end - origin);
                let took = if p.duration_ms > 0 || p.finished_at.is_some() {
                    format!("{} ms", p.duration_ms)
                } else {
                    "running".to_string()
                };
                let lead = cells(offset).min(width - 1);
                let len = cells(p.duration_ms).clamp(1, width - lead);
                (
                    format!("+{offset} ms / {took}"),
                    format!("{}{}", " ".repeat(lead as usize), "█".repeat(len as usize)),
                )
            }
            None => (String::new(), String::new()),
        };
        // Awaits and sleeps send nothing: what they wait for, and until when.
        let (who, what) = match p.kind.as_str() {
            "await" => ("await".to_string(), format!("signal {}", p.signal)),
            "sleep" => ("sleep".to_string(), "timer".to_string()),
            _ => (
                p.participant.clone(),
                format!(
                    "{} / {}",
                    p.action,
                    if p.compensation.is_empty() {
                        "none"
                    } else {
                        &p.compensation
                    }
                ),
            ),
        };
        let what = match &p.due_at {
            Some(_) => format!("{what} (until {})", ts(&p.due_at)),
            None => what,
        };
        t.add_row(vec![
            group_no.to_string(),
            p.name.clone(),
            who,
            what,
            step_status_name(p.status).to_string(),
            format!("{} / {}", p.attempts, p.compensation_attempts),
            p.last_outcome.clone(),
            timing,
            bar,
        ]);
    }
    println!("{t}");
    let mut t = table(&["#", "at", "event", "step", "attempt", "state", "detail"]);
    for h in &s.history {
        t.add_row(vec![
            h.seq.to_string(),
            ts(&h.at),
            h.kind.clone(),
            h.step.clone(),
            if h.attempt == 0 {
                String::new()
            } else {
                h.attempt.to_string()
            },
            state_name(h.state).to_string(),
            h.detail.clone(),
        ]);
    }
    println!("{t}");
}

/// A request carrying the operator's bearer token.
fn authorized<T>(msg: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(msg);
    let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .context("the token must be printable ASCII")?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn print_operated(r: &pb::OperatorResponse, json_out: bool, what: &str) {
    if json_out {
        println!("{}", json!({"saga_id": r.saga_id, "state": state_name(r.state)}));
    } else {
        println!("saga {} {what}: now {}", r.saga_id, state_name(r.state));
    }
}

/// Waits until one of the saga's steps waits for a signal.
/// Calls `call` again while the coordinator answers UNAVAILABLE ("retry shortly": a
/// partition changing hands, NATS reconnecting), for up to `timeout`.
async fn retry_unavailable<T, F, Fut>(timeout: Duration, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

async fn get_saga(
    client: &SagaServiceClient<Channel>,
    saga_id: &str,
    timeout: Duration,
) -> Result<pb::Saga, tonic::Status> {
    let request = pb::GetSagaRequest {
        saga_id: saga_id.into(),
    };
    retry_unavailable(timeout, || {
        let (mut c, r) = (client.clone(), request.clone());
        async move { c.get_saga(r).await }
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn wait_waiting(
    client: &mut SagaServiceClient<Channel>,
    saga_id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let saga = get_saga(client, saga_id, timeout).await?;
        if saga
            .steps
            .iter()
            .any(|s| s.status == pb::StepStatus::Waiting as i32)
        {
            return Ok(());
        }
        if is_terminal(saga.state) || tokio::time::Instant::now() >= deadline {
            bail!(
                "saga {saga_id} never waited for a signal (now {})",
                state_name(saga.state)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_terminal(
    client: &mut SagaServiceClient<Channel>,
    saga_id: &str,
    timeout: Duration,
) -> anyhow::Result<pb::Saga> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let saga = get_saga(client, saga_id, timeout)
            .await
            .with_context(|| format!("GetSaga {saga_id}"))?;
        if is_terminal(saga.state) {
            return Ok(saga);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "saga {saga_id} is still {} after {timeout:?}",
                state_name(saga.state)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// When a demo order gets its `payment-confirmed` signal.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DemoSignal {
    /// Never (a plain order, or the 3-D Secure challenge left unanswered).
    None,
    /// Once its await step waits.
    WhenWaiting,
    /// Right after creation, before the step is reached (kept until it is).
    AtOnce,
}

async fn demo(
    client: &mut SagaServiceClient<Channel>,
    json_out: bool,
    timeout: Duration,
    token: Option<&str>,
) -> anyhow::Result<bool> {
    use DemoSignal::{AtOnce, WhenWaiting};
    let mut orders = vec![
        (
            "completes",
            "order",
            "c-alice",
            vec![("A-1", 2)],
            1999,
            pb::SagaState::Completed,
            DemoSignal::None,
        ),
        (
            "out of stock",
            "order",
            "c-bob",
            vec![("A-1", 1), ("RARE-1", 5)],
            4500,
            pb::SagaState::Compensated,
            DemoSignal::None,
        ),
        (
            "declined by payment",
            "order",
            "c-carol",
            vec![("B-2", 1)],
            250_000,
            pb::SagaState::Compensated,
            DemoSignal::None,
        ),
        (
            "shipped (reserve ∥ charge, then ship)",
            "order-with-shipping",
            "c-dave",
            vec![("A-1", 1), ("B-2", 1)],
            3499,
            pb::SagaState::Completed,
            DemoSignal::None,
        ),
    ];
    if token.is_some() {
        orders.extend([
            (
                "3-D Secure confirmed by a signal, then shipped",
                "order-3ds",
                "c-erin",
                vec![("A-1", 1)],
                2599,
                pb::SagaState::Completed,
                WhenWaiting,
            ),
            (
                "digital, confirmed before the wait (shipping skipped)",
                "order-3ds",
                "c-grace",
                vec![("DIGITAL-1", 1)],
                999,
                pb::SagaState::Completed,
                AtOnce,
            ),
            (
                "3-D Secure never confirmed (await timed out)",
                "order-3ds",
                "c-frank",
                vec![("B-2", 1)],
                1500,
                pb::SagaState::Compensated,
                DemoSignal::None,
            ),
        ]);
    } else if !json_out {
        println!("(the order-3ds orders need the operator token to signal them: set SAGA_OPERATOR_TOKEN)");
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut all_ok = true;
    let mut out = Vec::new();
    let mut summary = table(&["order", "saga", "expected", "final state", "reason"]);
    for (label, definition, customer, items, amount, expected, signal) in orders {
        let request = pb::CreateOrderRequest {
            definition: definition.into(),
            customer_id: customer.into(),
            items: items
                .iter()
                .map(|(s, q)| pb::OrderItem {
                    sku: (*s).into(),
                    quantity: *q,
                })
                .collect(),
            amount_cents: amount,
            currency: "EUR".into(),
            // Retried below: the key makes a repeat return the same saga.
            idempotency_key: format!("demo-{run}-{customer}"),
            ..Default::default()
        };
        let created = retry_unavailable(timeout, || {
            let (mut c, r) = (client.clone(), request.clone());
            async move { c.create_order(r).await }
        })
        .await
        .with_context(|| format!("CreateOrder ({label})"))?
        .into_inner();
        if let (Some(token), true) = (token, signal != DemoSignal::None) {
            if signal == WhenWaiting {
                wait_waiting(client, &created.saga_id, timeout).await?;
            }
            let request = authorized(
                pb::SignalSagaRequest {
                    saga_id: created.saga_id.clone(),
                    name: "payment-confirmed".into(),
                    signal_id: format!("demo-{}", created.saga_id),
                    payload_json: json!({"authorization": format!("3ds-{customer}")}).to_string(),
                },
                token,
            )?;
            let r = retry_unavailable(timeout, || {
                let mut c = client.clone();
                let mut r = tonic::Request::new(request.get_ref().clone());
                *r.metadata_mut() = request.metadata().clone();
                async move { c.signal_saga(r).await }
            })
            .await?
            .into_inner();
            if !json_out {
                println!("signal payment-confirmed for saga {}: {}", r.saga_id, r.outcome);
            }
        }
        let saga = wait_terminal(client, &created.saga_id, timeout).await?;
        let ok = saga.state == expected as i32;
        all_ok &= ok;
        if json_out {
            out.push(json!({"order": label, "expected": state_name(expected as i32), "ok": ok, "saga": saga_json(&saga)}));
        } else {
            println!("\n=== order that {label}: {} ===", state_name(saga.state));
            print_saga(&saga);
        }
        summary.add_row(vec![
            label.to_string(),
            saga.saga_id.clone(),
            state_name(expected as i32).to_string(),
            format!(
                "{}{}",
                state_name(saga.state),
                if ok { "" } else { "  <-- unexpected" }
            ),
            saga.reason.clone(),
        ]);
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("\n=== summary ===\n{summary}");
    }
    Ok(all_ok)
}

/// `sagactl tail`: an ordered, ephemeral JetStream consumer on the events stream.
async fn tail(
    cli: &Cli,
    definition: Option<&str>,
    from_start: bool,
    limit: Option<u64>,
    nats_url: &str,
    stream: &str,
    security: &saga_nats::NatsSecurity,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures::StreamExt;
    security.validate().map_err(anyhow::Error::msg)?;
    let options = security
        .apply(
            async_nats::ConnectOptions::new()
                .name("sagactl-tail")
                // The inbox the events role's NATS permissions allow.
                .custom_inbox_prefix(saga_nats::Role::Events.inbox_prefix()),
        )
        .await?;
    let client = options
        .connect(nats_url)
        .await
        .with_context(|| format!("cannot reach NATS at {nats_url}"))?;
    let js = async_nats::jetstream::new(client);
    let events = js
        .get_stream(stream)
        .await
        .with_context(|| format!("events stream {stream} (is the coordinator publishing events?)"))?;
    let filter = saga_wire::event_subject(definition.unwrap_or("*"), "*");
    let consumer = events
        .create_consumer(OrderedConfig {
            filter_subject: filter.clone(),
            deliver_policy: if from_start {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    if !cli.json {
        eprintln!("following {filter} on stream {stream} (Ctrl-C stops)");
    }
    let mut seen = 0u64;
    while let Some(message) = messages.next().await {
        let message = message?;
        match serde_json::from_slice::<saga_wire::SagaEvent>(&message.payload) {
            Ok(e) if cli.json => println!("{}", serde_json::to_string(&e)?),
            Ok(e) => {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms);
                let about = [
                    e.step.clone(),
                    e.attempt.map(|a| format!("#{a}")),
                    e.detail.clone(),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
                println!(
                    "{}  {}  {:<10} #{:<3} {:<24} {:<12} {about}",
                    humantime::format_rfc3339_millis(at),
                    e.saga_id,
                    e.definition,
                    e.sequence,
                    e.event,
                    e.state
                );
            }
            Err(err) => eprintln!("unreadable event on {}: {err}", message.subject),
        }
        seen += 1;
        if limit.is_some_and(|l| seen >= l) {
            break;
        }
    }
    Ok(())
}

/// A channel to `--addr`, over TLS when the address is `https://` or a CA is given.
async fn channel(cli: &Cli) -> anyhow::Result<Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut endpoint = Endpoint::from_shared(cli.addr.clone()).context("--addr is not a URL")?;
    if cli.addr.starts_with("https://") || cli.tls_ca.is_some() {
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("{}", p.display()));
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cli.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &cli.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}

/// `sagactl nats-auth`: the deployment's NATS users, made once and reused;
/// prints where the seeds are, never the seeds.
fn nats_auth(
    dir: &std::path::Path,
    participants: &[String],
    events_stream: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    let names: Vec<&str> = participants.iter().map(String::as_str).collect();
    let bundle = saga_auth::Bundle::create_or_load(dir, &names, events_stream)?;
    let seeds: Vec<(String, String)> = bundle
        .users()
        .map(|r| (r.user(), bundle.seed_file(r).display().to_string()))
        .collect();
    if json_out {
        let seeds: serde_json::Map<String, Value> =
            seeds.into_iter().map(|(u, f)| (u, Value::String(f))).collect();
        println!(
            "{}",
            json!({ "server_config": bundle.server_config_path().display().to_string(), "seeds": seeds })
        );
    } else {
        println!("server config: {}", bundle.server_config_path().display());
        for (user, file) in seeds {
            println!("{user}: {file}");
        }
    }
    Ok(())
}

/// `sagactl validate`: every definition found, every error; exit status 1 on any error.
fn validate(paths: &[std::path::PathBuf], json_out: bool) -> anyhow::Result<()> {
    let (defs, errors) = saga_core::definition::Definitions::validate_paths(paths);
    if json_out {
        let valid: Vec<Value> = defs
            .all()
            .map(|d| json!({"definition": d.id(), "file": d.source.display().to_string(), "steps": d.steps.len(), "groups": d.groups().len()}))
            .collect();
        let errs: Vec<Value> = errors
            .iter()
            .map(|e| match e {
                saga_core::definition::DefinitionError::Invalid { path, line, column, reason } => {
                    json!({"file": path.display().to_string(), "line": line, "column": column, "reason": reason})
                }
                saga_core::definition::DefinitionError::Io { path, reason } => {
                    json!({"file": path.display().to_string(), "line": 0, "column": 0, "reason": reason})
                }
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"valid": valid, "errors": errs}))?
        );
    } else {
        for d in defs.all() {
            println!(
                "ok     {}  {}  ({} steps in {} groups)",
                d.source.display(),
                d.id(),
                d.steps.len(),
                d.groups().len()
            );
        }
        for e in &errors {
            eprintln!("error  {e}");
        }
        let n = defs.all().count();
        println!("{n} definition(s) valid, {} error(s)", errors.len());
    }
    if !errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// `sagactl plan`: the execution graph and the compensation plans, as text or Mermaid.
fn plan(files: &[std::path::PathBuf], mermaid: bool, json_out: bool) -> anyhow::Result<()> {
    let (defs, errors) = saga_core::definition::Definitions::validate_paths(files);
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error  {e}");
        }
        std::process::exit(1);
    }
    let plans: Vec<saga_core::plan::Plan> = defs.all().map(|d| saga_core::plan::Plan::of(d)).collect();
    if json_out {
        println!("{}", serde_json::to_string_pretty(&plans)?);
        return Ok(());
    }
    for (k, p) in plans.iter().enumerate() {
        if k > 0 {
            println!();
        }
        if mermaid {
            print!("{}", p.render_mermaid());
        } else {
            print!("{}", p.render_text());
        }
    }
    Ok(())
}

/// Runs `sagactl` with `args` (`args[0]` is the program name, as in
/// `std::env::args_os`), on a tokio runtime of its own.
///
/// Bad flags exit at once with clap's message and code 2, and `validate` or
/// `plan` with an invalid definition exits 1 after listing the errors; any
/// other failure prints `Error: …` on stderr (as a `main` returning
/// `anyhow::Result` does) and returns `ExitCode::FAILURE`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Validate { paths } => return validate(paths, cli.json),
        Cmd::Plan { files, mermaid } => return plan(files, *mermaid, cli.json),
        Cmd::NatsAuth {
            dir,
            participants,
            events_stream,
        } => return nats_auth(dir, participants, events_stream, cli.json),
        Cmd::Conformance(args) => return conformance::main(args, cli.json).await,
        _ => {}
    }
    if let Cmd::Tail {
        definition,
        from_start,
        limit,
        nats_url,
        stream,
        security,
    } = &cli.command
    {
        return tail(
            &cli,
            definition.as_deref(),
            *from_start,
            *limit,
            nats_url,
            stream,
            security,
        )
        .await;
    }
    let mut client = SagaServiceClient::new(
        channel(&cli)
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", cli.addr))?,
    );
    match cli.command {
        Cmd::Create {
            customer,
            items,
            amount_cents,
            currency,
            order_id,
            idempotency_key,
            definition,
            wait,
        } => {
            let created = client
                .create_order(pb::CreateOrderRequest {
                    definition,
                    customer_id: customer,
                    items,
                    amount_cents,
                    currency,
                    order_id: order_id.unwrap_or_default(),
                    idempotency_key: idempotency_key.unwrap_or_default(),
                    definition_version: 0,
                })
                .await?
                .into_inner();
            if wait {
                let saga = wait_terminal(&mut client, &created.saga_id, Duration::from_secs(60)).await?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&saga_json(&saga))?);
                } else {
                    print_saga(&saga);
                }
            } else if cli.json {
                let v = json!({"saga_id": created.saga_id, "order_id": created.order_id,
                               "created": created.created, "state": state_name(created.state)});
                println!("{v}");
            } else {
                let what = if created.created {
                    "created"
                } else {
                    "already exists"
                };
                println!(
                    "saga {} {what} (order {}, {})",
                    created.saga_id,
                    created.order_id,
                    state_name(created.state)
                );
            }
        }
        Cmd::Get { saga_id } => {
            let saga = client
                .get_saga(pb::GetSagaRequest { saga_id })
                .await?
                .into_inner();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&saga_json(&saga))?);
            } else {
                print_saga(&saga);
            }
        }
        Cmd::Watch { saga_id } => {
            let mut stream = client
                .watch_saga(pb::WatchSagaRequest { saga_id })
                .await?
                .into_inner();
            // A live progress bar (steps done / steps) on a terminal, history lines above it;
            // plain lines when piped, one JSON object per update with --json.
            let bar = indicatif::ProgressBar::hidden();
            if !cli.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{bar:24}] {pos}/{len} steps  {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            let mut seen = 0;
            while let Some(saga) = stream.message().await? {
                if cli.json {
                    println!("{}", saga_json(&saga));
                    continue;
                }
                for h in saga.history.iter().skip(seen) {
                    let step = if h.step.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", h.step)
                    };
                    let attempt = if h.attempt == 0 {
                        String::new()
                    } else {
                        format!(" #{}", h.attempt)
                    };
                    let detail = if h.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", h.detail)
                    };
                    bar.suspend(|| {
                        println!(
                            "{}  {:<12} {}{step}{attempt}{detail}",
                            ts(&h.at),
                            state_name(h.state),
                            h.kind
                        )
                    });
                }
                seen = saga.history.len();
                let done = saga
                    .steps
                    .iter()
                    .filter(|p| p.status == pb::StepStatus::Succeeded as i32)
                    .count();
                bar.set_length(saga.steps.len() as u64);
                bar.set_position(done as u64);
                let at = if saga.current_step.is_empty() {
                    String::new()
                } else {
                    format!(" {}", saga.current_step)
                };
                bar.set_message(format!("{}{at}", state_name(saga.state)));
            }
            bar.finish_and_clear();
        }
        Cmd::Abort {
            saga_id,
            reason,
            token,
        } => {
            let request = authorized(pb::AbortSagaRequest { saga_id, reason }, &token)?;
            let r = client.abort_saga(request).await?.into_inner();
            print_operated(&r, cli.json, "aborted");
        }
        Cmd::Retry { saga_id, token } => {
            let request = authorized(pb::RetrySagaRequest { saga_id }, &token)?;
            let r = client.retry_saga(request).await?.into_inner();
            print_operated(&r, cli.json, "retried");
        }
        Cmd::Signal {
            saga_id,
            name,
            payload,
            signal_id,
            token,
        } => {
            let signal_id = signal_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let request = authorized(
                pb::SignalSagaRequest {
                    saga_id,
                    name,
                    signal_id: signal_id.clone(),
                    payload_json: payload,
                },
                &token,
            )?;
            let r = client.signal_saga(request).await?.into_inner();
            if cli.json {
                println!(
                    "{}",
                    json!({"saga_id": r.saga_id, "signal_id": signal_id, "outcome": r.outcome,
                           "state": state_name(r.state)})
                );
            } else {
                println!(
                    "saga {}: signal {signal_id} {}, now {}",
                    r.saga_id,
                    r.outcome,
                    state_name(r.state)
                );
            }
        }
        Cmd::List {
            state,
            definition,
            customer,
            order,
            since,
            until,
            newest,
            limit,
            page_token,
        } => {
            let page = client
                .list_sagas(pb::ListSagasRequest {
                    state: state.map(|s| s as i32).unwrap_or(0),
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                    definition: definition.unwrap_or_default(),
                    customer_id: customer.unwrap_or_default(),
                    order_id: order.unwrap_or_default(),
                    created_after: since,
                    created_before: until,
                    newest_first: newest,
                })
                .await?
                .into_inner();
            if cli.json {
                let sagas: Vec<Value> = page
                    .sagas
                    .iter()
                    .map(|s| {
                        json!({"saga_id": s.saga_id, "definition": s.definition, "state": state_name(s.state),
                                    "current_step": s.current_step, "order_id": s.order_id,
                                    "customer_id": s.customer_id,
                                    "created_at": ts(&s.created_at), "updated_at": ts(&s.updated_at)})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"sagas": sagas, "next_page_token": page.next_page_token})
                );
            } else {
                let mut t = table(&[
                    "saga",
                    "definition",
                    "state",
                    "current step",
                    "order",
                    "customer",
                    "updated",
                ]);
                for s in &page.sagas {
                    t.add_row(vec![
                        s.saga_id.clone(),
                        s.definition.clone(),
                        state_name(s.state).to_string(),
                        s.current_step.clone(),
                        s.order_id.clone(),
                        s.customer_id.clone(),
                        ts(&s.updated_at),
                    ]);
                }
                println!("{t}");
                if !page.next_page_token.is_empty() {
                    println!("more (same filters): --page-token {}", page.next_page_token);
                }
            }
        }
        // Handled before connecting to gRPC (tail talks to NATS only; validate
        // and plan read files).
        Cmd::Tail { .. }
        | Cmd::Validate { .. }
        | Cmd::Plan { .. }
        | Cmd::NatsAuth { .. }
        | Cmd::Conformance(_) => {}
        Cmd::Definitions => {
            let defs = client
                .list_definitions(pb::ListDefinitionsRequest {})
                .await?
                .into_inner();
            if cli.json {
                let v: Vec<Value> = defs
                    .definitions
                    .iter()
                    .map(|d| {
                        json!({"name": d.name, "version": d.version, "source_file": d.source_file,
                        "steps": d.steps.iter().map(|s| json!({"name": s.name, "participant": s.participant,
                            "action": s.action, "compensation": s.compensation, "timeout_ms": s.timeout_ms,
                            "max_attempts": s.max_attempts})).collect::<Vec<_>>()})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let mut t = table(&[
                    "definition",
                    "step",
                    "participant",
                    "action",
                    "compensation",
                    "timeout",
                    "attempts",
                ]);
                for d in &defs.definitions {
                    for s in &d.steps {
                        t.add_row(vec![
                            format!("{}@{}", d.name, d.version),
                            s.name.clone(),
                            s.participant.clone(),
                            s.action.clone(),
                            if s.compensation.is_empty() {
                                "none".into()
                            } else {
                                s.compensation.clone()
                            },
                            format!("{}ms", s.timeout_ms),
                            s.max_attempts.to_string(),
                        ]);
                    }
                }
                println!("{t}");
            }
        }
        Cmd::Demo { timeout, token } => {
            let token = token.filter(|t| !t.trim().is_empty());
            if !demo(&mut client, cli.json, timeout, token.as_deref()).await? {
                bail!("a demo saga did not end in its expected state");
            }
        }
    }
    Ok(())
}
