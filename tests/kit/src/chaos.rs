//! The chaos suites' shared parts: the order mix, placing orders through
//! restarts, and the invariants checked once everything is quiet (used by
//! `tests/chaos.rs` on one coordinator and `tests/cluster_chaos.rs` on a
//! cluster).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng};
use saga_proto::pb::{self, SagaState};

use crate::{connect, ledger, stats, stock, stream_events, wait_participant};

/// The SKUs and their initial stock.
pub const SKUS: &[(&str, u64)] = &[("A-1", 1_000_000), ("B-2", 1_000_000), ("RARE-1", 3)];
/// Amounts above this are declined by the payment service.
pub const LIMIT_CENTS: i64 = 10_000;

/// The operator token the chaos coordinators run with (`SAGA_OPERATOR_TOKEN`): the drivers
/// signal the `order-wait` sagas with it.
pub const OPERATOR_TOKEN: &str = "chaos-operator-token-for-signals";

/// What must become of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Both effects, COMPLETED.
    Completed,
    /// Rejected by the inventory, COMPENSATED.
    OutOfStock,
    /// Declined by the payment, COMPENSATED.
    Declined,
    /// `order-wait`: signalled by the driver; COMPLETED when the coordinator took the signal
    /// (consumed, kept or duplicate), COMPENSATED when it answered that the await was over.
    Signalled,
    /// `order-wait` never signalled: the await times out, COMPENSATED, nothing held.
    TimedOut,
}

/// An order placed, with what must become of it.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Its saga.
    pub saga_id: String,
    /// The expected end.
    pub expect: Expect,
    /// Its lines.
    pub items: Vec<(String, u32)>,
    /// Its amount.
    pub amount: i64,
    /// Whether it ran `order-wait` (an await and a sleep on the way).
    pub waits: bool,
}

/// An environment variable parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The order for index `i`: its request and what must become of it.
pub fn order_for(rng: &mut StdRng, i: usize, seed: u64) -> (pb::CreateOrderRequest, Expect) {
    let roll: f64 = rng.random();
    let (items, amount, mut expect) = if roll < 0.15 {
        (
            vec![("A-1".to_string(), 1), ("RARE-1".to_string(), 1000)],
            500,
            Expect::OutOfStock,
        )
    } else if roll < 0.30 {
        (
            vec![("B-2".to_string(), rng.random_range(1..4))],
            LIMIT_CENTS + rng.random_range(1..5000),
            Expect::Declined,
        )
    } else {
        let mut items = vec![("A-1".to_string(), rng.random_range(1..4))];
        if rng.random_bool(0.5) {
            items.push(("B-2".to_string(), rng.random_range(1..3)));
        }
        (items, rng.random_range(100..LIMIT_CENTS), Expect::Completed)
    };
    // A quarter of the orders that would complete wait for a signal (and sleep) on the way;
    // one in five of those never gets it.
    let mut definition = String::new();
    if expect == Expect::Completed && rng.random_bool(0.25) {
        definition = "order-wait".into();
        expect = if rng.random_bool(0.2) {
            Expect::TimedOut
        } else {
            Expect::Signalled
        };
    }
    let req = pb::CreateOrderRequest {
        definition,
        customer_id: format!("c-{}", i % 37),
        items: items
            .iter()
            .map(|(s, q)| pb::OrderItem {
                sku: s.clone(),
                quantity: *q,
            })
            .collect(),
        amount_cents: amount,
        currency: "EUR".into(),
        idempotency_key: format!("chaos-{seed}-{i}"),
        order_id: format!("order-{i}"),
        ..Default::default()
    };
    (req, expect)
}

/// The chaos definition: the order saga with retries longer than any outage
/// the suites cause, and the domain aliases.
///
/// # Errors
/// The file cannot be written.
pub fn write_definitions(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("order.yaml"),
        "name: order\nversion: 1\ndefaults:\n  timeout: 1s\n  retry: { max_attempts: 300, initial_backoff: 20ms, \
         max_backoff: 500ms, multiplier: 2.0, jitter: true }\nsteps:\n  - name: reserve-inventory\n    \
         participant: inventory\n    action: reserve\n    compensation: release\n  - name: charge-payment\n    \
         participant: payment\n    action: charge\n    compensation: refund\nevents:\n  started: orders.created\n  \
         completed: orders.completed\n  compensated: orders.cancelled\n",
    )?;
    // The order saga with an await (timeout 4 s, past any outage here but the
    // longest), a durable sleep and a deadline that never passes in a run.
    std::fs::write(
        dir.join("order-wait.yaml"),
        "name: order-wait\nversion: 1\ndeadline: 10m\ndefaults:\n  timeout: 1s\n  retry: { max_attempts: 300, \
         initial_backoff: 20ms, max_backoff: 500ms, multiplier: 2.0, jitter: true }\nsteps:\n  \
         - name: reserve-inventory\n    participant: inventory\n    action: reserve\n    compensation: release\n  \
         - name: confirm\n    await: go\n    timeout: 4s\n  - name: settle\n    sleep: 300ms\n  \
         - name: charge-payment\n    participant: payment\n    action: charge\n    compensation: refund\n\
         events:\n  started: orders.created\n  completed: orders.completed\n  compensated: orders.cancelled\n",
    )?;
    Ok(())
}

/// The gRPC addresses of the coordinators under test. A coordinator killed
/// and restarted binds port 0 again and reports a new address, so drivers
/// read the current one before each attempt.
#[derive(Debug, Clone)]
pub struct Addrs(std::sync::Arc<std::sync::RwLock<Vec<SocketAddr>>>);

impl Addrs {
    /// The addresses, in coordinator order.
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        Addrs(std::sync::Arc::new(std::sync::RwLock::new(addrs)))
    }

    /// The current address of coordinator `i` (modulo their number).
    pub fn get(&self, i: usize) -> SocketAddr {
        let v = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        v[i % v.len()]
    }

    /// Records coordinator `i`'s new address after a restart.
    pub fn set(&self, i: usize, addr: SocketAddr) {
        let mut v = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        v[i] = addr;
    }
}

/// Retries `CreateOrder` (same idempotency key) through coordinator
/// restarts, moving on to the next of `addrs` after each failure (several
/// coordinators of a cluster; one address for a single coordinator).
///
/// # Errors
/// Still failing after 120 s.
pub async fn place(addrs: &Addrs, first: usize, req: pb::CreateOrderRequest) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut k = first;
    loop {
        let addr = addrs.get(k);
        let attempt = async {
            let mut g = tokio::time::timeout(Duration::from_secs(3), connect(addr)).await??;
            let r = tokio::time::timeout(Duration::from_secs(5), g.create_order(req.clone())).await??;
            anyhow::Ok(r.into_inner().saga_id)
        };
        match attempt.await {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() > deadline => return Err(e.context("CreateOrder kept failing")),
            Err(_) => {
                k += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// [`place`] in a task that gives `permit` back once the order is placed,
/// returning what must become of it.
pub fn spawn_place(
    addrs: Addrs,
    first: usize,
    req: pb::CreateOrderRequest,
    expect: Expect,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> tokio::task::JoinHandle<Result<Placed>> {
    let items = req.items.iter().map(|i| (i.sku.clone(), i.quantity)).collect();
    let amount = req.amount_cents;
    tokio::spawn(async move {
        let id = place(&addrs, first, req).await;
        let waits = matches!(expect, Expect::Signalled | Expect::TimedOut);
        let expect = match (&id, expect) {
            (Ok(saga_id), Expect::Signalled) => signal(&addrs, first, saga_id).await?,
            _ => expect,
        };
        drop(permit);
        id.map(|saga_id| Placed {
            saga_id,
            expect,
            items,
            amount,
            waits,
        })
    })
}

/// Sends the `go` signal of an `order-wait` saga, retried (same signal id) through restarts
/// until a coordinator answers: taken (the saga must complete) or refused because the await
/// is over (it must compensate).
///
/// # Errors
/// Still failing after 120 s, or refused for another reason.
pub async fn signal(addrs: &Addrs, first: usize, saga_id: &str) -> Result<Expect> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut k = first;
    loop {
        let addr = addrs.get(k);
        let attempt = async {
            let mut g = tokio::time::timeout(Duration::from_secs(3), connect(addr)).await??;
            let mut request = tonic::Request::new(pb::SignalSagaRequest {
                saga_id: saga_id.into(),
                name: "go".into(),
                signal_id: format!("go-{saga_id}"),
                payload_json: "{}".into(),
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {OPERATOR_TOKEN}").parse()?);
            anyhow::Ok(tokio::time::timeout(Duration::from_secs(5), g.signal_saga(request)).await?)
        };
        match attempt.await {
            Ok(Ok(_)) => return Ok(Expect::Completed),
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                return Ok(Expect::TimedOut)
            }
            Ok(Err(status))
                if !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                ) =>
            {
                anyhow::bail!("signal for {saga_id} refused: {status}")
            }
            Err(e) if Instant::now() > deadline => return Err(e.context("SignalSaga kept failing")),
            Ok(Err(status)) if Instant::now() > deadline => {
                anyhow::bail!("SignalSaga kept failing: {status}")
            }
            _ => {
                k += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Every saga, by paging `ListSagas` (retrying through restarts).
///
/// # Errors
/// gRPC failed.
pub async fn all_sagas(addr: SocketAddr, state: Option<SagaState>) -> Result<Vec<pb::SagaSummary>> {
    let mut g = connect(addr).await?;
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = g
            .list_sagas(pb::ListSagasRequest {
                state: state.map(|s| s as i32).unwrap_or(0),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.sagas);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// A participant's effects per saga (`saga.admin.<participant>.effects`),
/// every page of them, as one `{saga_id: effect}` map.
///
/// # Errors
/// A page not answered in 10 s, or not an effects page.
pub async fn effects(client: &async_nats::Client, participant: &str) -> Result<serde_json::Value> {
    let subject = saga_wire::effects_subject(participant);
    let mut request = saga_wire::EffectsRequest::default();
    let mut all = serde_json::Map::new();
    loop {
        let body = serde_json::to_vec(&request)?;
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subject.clone(), body.into()),
        )
        .await
        .with_context(|| format!("{subject} timed out"))??;
        let page: saga_wire::EffectsPage = serde_json::from_slice(&msg.payload)
            .with_context(|| format!("{subject}: {}", String::from_utf8_lossy(&msg.payload)))?;
        all.extend(page.effects);
        match page.next_cursor {
            Some(cursor) => request.cursor = Some(cursor),
            None => return Ok(serde_json::Value::Object(all)),
        }
    }
}

/// Waits until a coordinator answers gRPC; returns how long it took.
///
/// # Errors
/// Not within `timeout`.
pub async fn wait_grpc_ready(addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let ok = async {
            let mut g = connect(addr).await?;
            tokio::time::timeout(
                Duration::from_secs(2),
                g.list_definitions(pb::ListDefinitionsRequest {}),
            )
            .await??;
            anyhow::Ok(())
        };
        if ok.await.is_ok() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("coordinator not answering after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The median (sorts `v`).
pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// What the invariants found.
#[derive(Debug)]
pub struct Verdict {
    /// Every saga stored.
    pub sagas: Vec<pb::SagaSummary>,
    /// Sagas per state name.
    pub states: BTreeMap<String, usize>,
    /// Every violation, described.
    pub wrong: Vec<String>,
    /// available + reserved = initial for every SKU.
    pub stock_ok: bool,
    /// Ledger totals.
    pub charged: i64,
    /// Ledger totals.
    pub refunded: i64,
    /// Sum of the COMPLETED orders.
    pub completed_cents: i64,
    /// Saga events in the stream (alias copies excluded).
    pub events: usize,
    /// Domain-alias copies in the stream.
    pub alias_copies: usize,
    /// Every saga's events once, contiguous, ending terminal.
    pub events_ok: bool,
    /// The participants' figures.
    pub pay_stats: serde_json::Value,
    /// `order-wait` sagas: (completed after their signal, compensated after their await timed out).
    pub waited: (usize, usize),
    /// The participants' figures.
    pub inv_stats: serde_json::Value,
}

impl Verdict {
    /// The rows every chaos table shows.
    pub fn rows(&self, orders: usize) -> Vec<(String, String)> {
        let mut rows = vec![(
            "orders / sagas stored".to_string(),
            format!("{orders} / {}", self.sagas.len()),
        )];
        for (state, n) in &self.states {
            rows.push((
                format!("  {}", state.trim_start_matches("SAGA_STATE_")),
                n.to_string(),
            ));
        }
        rows.extend([
            ("violations".to_string(), self.wrong.len().to_string()),
            (
                "saga events / alias copies / each once, in order".to_string(),
                format!("{} / {} / {}", self.events, self.alias_copies, self.events_ok),
            ),
            (
                "with await + sleep: signalled / timed out".to_string(),
                format!("{} / {}", self.waited.0, self.waited.1),
            ),
            ("stock conserved per SKU".to_string(), self.stock_ok.to_string()),
            (
                "charged - refunded = completed".to_string(),
                format!("{} = {}", self.charged - self.refunded, self.completed_cents),
            ),
            (
                "ledger charges (one per key) / refunds".to_string(),
                format!("{} / {}", self.pay_stats["charges"], self.pay_stats["refunds"]),
            ),
            (
                "dedupe hits since last restart: inv / pay".to_string(),
                format!(
                    "{} / {}",
                    self.inv_stats["dedupe_hits"], self.pay_stats["dedupe_hits"]
                ),
            ),
        ]);
        rows
    }
}

/// Prints a two-column table.
pub fn print_table(rows: &[(String, String)]) {
    println!("┌{}┬{}┐", "─".repeat(50), "─".repeat(30));
    for (k, v) in rows {
        println!("│ {k:<48} │ {v:<28} │");
    }
    println!("└{}┴{}┘", "─".repeat(50), "─".repeat(30));
}

/// Checks, once nothing is in flight: one saga per order, each in the state
/// its order implies, each COMPLETED one holding exactly its reservation and
/// charge and each COMPENSATED one nothing, stock conserved per SKU,
/// charged − refunded = the COMPLETED orders, and every saga's events in the
/// stream once, in order, ending terminal (with one alias copy for `started`
/// and one for the end).
///
/// # Errors
/// A participant or the coordinator cannot be asked.
pub async fn verify(
    nats: &async_nats::Client,
    addr: SocketAddr,
    orders: usize,
    placed: &[Placed],
) -> Result<Verdict> {
    // The last restart may still be connecting.
    wait_participant(nats, "inventory").await?;
    wait_participant(nats, "payment").await?;
    let sagas = all_sagas(addr, None).await?;
    let by_id: HashMap<&str, &pb::SagaSummary> = sagas.iter().map(|s| (s.saga_id.as_str(), s)).collect();
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &sagas {
        *states
            .entry(
                pb::SagaState::try_from(s.state)
                    .map(|x| x.as_str_name())
                    .unwrap_or("?"),
            )
            .or_default() += 1;
    }
    let inv_effects = effects(nats, "inventory").await?;
    let pay_effects = effects(nats, "payment").await?;
    let mut completed_cents = 0i64;
    let mut wrong = Vec::new();
    if sagas.len() != orders {
        wrong.push(format!(
            "{} sagas stored for {orders} orders: CreateOrder was not idempotent",
            sagas.len()
        ));
    }
    for p in placed {
        let Some(s) = by_id.get(p.saga_id.as_str()) else {
            wrong.push(format!("{}: not listed", p.saga_id));
            continue;
        };
        let want = match p.expect {
            Expect::Completed => SagaState::Completed,
            Expect::OutOfStock | Expect::Declined | Expect::TimedOut => SagaState::Compensated,
            // Resolved by the driver from the coordinator's answer.
            Expect::Signalled => SagaState::Unspecified,
        };
        if s.state != want as i32 {
            wrong.push(format!(
                "{} ({:?}): {:?}",
                p.saga_id,
                p.expect,
                SagaState::try_from(s.state)
            ));
        }
        let held = &inv_effects[&p.saga_id];
        let charge = &pay_effects[&p.saga_id];
        let net = match (charge["amount_cents"].as_i64(), charge["refunded"].as_bool()) {
            (Some(a), Some(false)) => a,
            _ => 0,
        };
        if s.state == SagaState::Completed as i32 {
            completed_cents += p.amount;
            let mut want_held: BTreeMap<String, u64> = BTreeMap::new();
            for (sku, q) in &p.items {
                *want_held.entry(sku.clone()).or_default() += u64::from(*q);
            }
            let got: BTreeMap<String, u64> = serde_json::from_value(held.clone()).unwrap_or_default();
            if got != want_held || net != p.amount {
                wrong.push(format!(
                    "{} COMPLETED without both effects: held {got:?}, charged {net}",
                    p.saga_id
                ));
            }
        } else if !held.is_null() || net != 0 {
            wrong.push(format!(
                "{} COMPENSATED with a net effect: held {held}, charged {net}",
                p.saga_id
            ));
        }
    }
    let mut stock_ok = true;
    for (sku, initial) in SKUS {
        let (a, r) = stock(nats, sku).await?;
        stock_ok &= a + r == *initial;
        if a + r != *initial {
            wrong.push(format!("{sku}: available {a} + reserved {r} != {initial}"));
        }
    }
    let (charged, refunded) = ledger(nats).await?;
    if charged - refunded != completed_cents {
        wrong.push(format!(
            "charged {charged} - refunded {refunded} != completed {completed_cents}"
        ));
    }
    // Saga events: every saga's events in the stream exactly once, contiguous
    // from 1, ending with its terminal event, through every kill. The last
    // coordinator may still be publishing: wait for the stream to settle.
    let terminal_event = |state: i32| match SagaState::try_from(state) {
        Ok(SagaState::Completed) => "completed",
        Ok(SagaState::Compensated) => "compensated",
        Ok(SagaState::Failed) => "failed",
        _ => "?",
    };
    let events_ok = |events: &[(String, saga_wire::SagaEvent)]| -> Vec<String> {
        let mut per_saga: HashMap<&str, Vec<&saga_wire::SagaEvent>> = HashMap::new();
        for (subject, e) in events {
            if subject.starts_with("saga.events.") {
                per_saga.entry(e.saga_id.as_str()).or_default().push(e);
            }
        }
        let mut bad = Vec::new();
        for s in &sagas {
            let evs = per_saga.get(s.saga_id.as_str()).cloned().unwrap_or_default();
            let seqs: Vec<u64> = evs.iter().map(|e| e.sequence).collect();
            let want: Vec<u64> = (1..=seqs.len() as u64).collect();
            if seqs != want {
                bad.push(format!("{}: event sequences {seqs:?}", s.saga_id));
            } else if evs.last().map(|e| e.event.as_str()) != Some(terminal_event(s.state)) {
                bad.push(format!(
                    "{}: last event {:?}, saga {}",
                    s.saga_id,
                    evs.last().map(|e| &e.event),
                    terminal_event(s.state)
                ));
            }
        }
        bad
    };
    let settle = Instant::now();
    let (events, event_problems) = loop {
        // Right after a NATS node restart a JetStream API call can time out while
        // the cluster elects leaders again: that is retried inside the same window.
        match stream_events(nats, "SAGA_EVENTS").await {
            Ok(events) => {
                let problems = events_ok(&events);
                if problems.is_empty() || settle.elapsed() > Duration::from_secs(30) {
                    break (events, problems);
                }
            }
            Err(e) if settle.elapsed() > Duration::from_secs(30) => {
                return Err(e.context("reading the saga events stream"));
            }
            Err(e) => eprintln!("chaos: events stream not readable yet ({e:#}), retrying"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let events_ok = event_problems.is_empty();
    // One alias copy per saga for `started`, one for its terminal event.
    let alias_copies = events
        .iter()
        .filter(|(subj, _)| subj.starts_with("orders."))
        .count();
    if alias_copies != 2 * sagas.len() {
        wrong.push(format!(
            "{alias_copies} domain-alias events for {} sagas",
            sagas.len()
        ));
    }
    wrong.extend(event_problems);
    let pay_stats = stats(nats, "payment").await?;
    let inv_stats = stats(nats, "inventory").await?;

    Ok(Verdict {
        states: states.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        sagas,
        wrong,
        stock_ok,
        charged,
        refunded,
        completed_cents,
        events: events.len() - alias_copies,
        alias_copies,
        events_ok,
        pay_stats,
        inv_stats,
        waited: (
            placed
                .iter()
                .filter(|p| p.waits && p.expect == Expect::Completed)
                .count(),
            placed
                .iter()
                .filter(|p| p.waits && p.expect == Expect::TimedOut)
                .count(),
        ),
    })
}
