//! `sagactl conformance`: drives one running participant through the rules of
//! the protocol ([docs/protocol.md](../../../docs/protocol.md)) over NATS and
//! prints a pass/fail row per rule.
//!
//! It plays the coordinator: it connects as the coordinator role (its seed,
//! its inbox prefix), sends commands on `saga.cmd.<participant>.<action>`
//! and reads the participant's admin subjects (`stats`, paged `effects`) to
//! see what each command did. Every run uses fresh UUID v7 saga ids and
//! undoes what it applied (the forward it applies is compensated; the
//! other commands leave only stored replies and a tombstone), so it can be
//! re-run against the same participant. The `stats` figures are compared
//! before and after, so run it against a participant no other traffic
//! reaches while it runs.
//!
//! The judging (what moved in `stats`, how often a saga appears in the
//! effects) is pure functions, unit-tested here; [`Probe`] is the only part
//! that talks to NATS.

use std::time::Duration;

use anyhow::Context;
use saga_wire::{self as wire, Command, CommandKind, Item, OrderPayload, Reply};
use serde_json::{json, Value};

/// The `rejected` reason a late forward gets once its compensation came
/// first (the tombstone; docs/protocol.md).
pub(crate) const TOMBSTONE_REASON: &str = "compensated_before_forward";

/// Top-level `stats` fields that count deliveries (or report health), not
/// effects: a repeat may move them. Every other figure must stay put.
pub(crate) const DELIVERY_FIGURES: &[&str] = &["commands", "dedupe_hits", "breaker_open"];

/// The action name the unknown-action rule sends.
const UNKNOWN_ACTION: &str = "no-such-action";

/// The rules, in the order they run (their names are the table's rows).
pub(crate) mod rule {
    pub(crate) const ADMIN: &str = "admin subjects answer";
    pub(crate) const FORWARD: &str = "forward applied once";
    pub(crate) const FORWARD_REPEAT_REPLY: &str = "forward repeat: same reply";
    pub(crate) const FORWARD_REPEAT_EFFECT: &str = "forward repeat: no second effect";
    pub(crate) const COMPENSATION: &str = "compensation undoes the forward";
    pub(crate) const COMPENSATION_REPEAT_REPLY: &str = "compensation repeat: same reply";
    pub(crate) const COMPENSATION_REPEAT_EFFECT: &str = "compensation repeat: no second effect";
    pub(crate) const EARLY_COMPENSATION: &str = "compensation before forward: ok, tombstone";
    pub(crate) const LATE_FORWARD: &str = "late forward refused by the tombstone";
    pub(crate) const MALFORMED_JSON: &str = "malformed: not JSON -> error";
    pub(crate) const MALFORMED_SAGA_ID: &str = "malformed: bad saga id -> error";
    pub(crate) const ALIVE: &str = "answers after malformed commands";
    pub(crate) const UNKNOWN: &str = "unknown action -> error";
    /// Every rule, in order: every run prints one row for each.
    pub(crate) const ALL: &[&str] = &[
        ADMIN,
        FORWARD,
        FORWARD_REPEAT_REPLY,
        FORWARD_REPEAT_EFFECT,
        COMPENSATION,
        COMPENSATION_REPEAT_REPLY,
        COMPENSATION_REPEAT_EFFECT,
        EARLY_COMPENSATION,
        LATE_FORWARD,
        MALFORMED_JSON,
        MALFORMED_SAGA_ID,
        ALIVE,
        UNKNOWN,
    ];
}

/// `sagactl conformance` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The participant's name (subject token and queue group).
    #[arg(long)]
    participant: String,
    /// Its forward action (default for the shipped participants: inventory
    /// `reserve`, payment `charge`, shipping `create-shipment`).
    #[arg(long)]
    forward: Option<String>,
    /// The forward's compensation (default: `release`, `refund`, `cancel-shipment`).
    #[arg(long)]
    compensate: Option<String>,
    /// The forward's `input` object, JSON (default for shipping:
    /// `{"reservation_id": "conformance"}`, which its create-shipment needs).
    #[arg(long, value_parser = parse_object)]
    input: Option<Value>,
    /// The compensation's `input` object, JSON.
    #[arg(long, value_parser = parse_object)]
    compensation_input: Option<Value>,
    /// Step name in the commands (part of the idempotency key).
    #[arg(long, default_value = "conformance")]
    step: String,
    /// Definition reference in the commands.
    #[arg(long, default_value = "conformance@1")]
    definition: String,
    /// SKU of the order's one line (must be in the inventory's stock table).
    #[arg(long, default_value = "A-1")]
    sku: String,
    /// Units of that line.
    #[arg(long, default_value_t = 1)]
    quantity: u32,
    /// The order's amount, minor units (under payment's customer limit).
    #[arg(long, default_value_t = 100)]
    amount_cents: i64,
    /// The order's currency.
    #[arg(long, default_value = "EUR")]
    currency: String,
    /// The order's customer (not one payment declines or shipping cannot reach).
    #[arg(long, default_value = "conformance")]
    customer: String,
    /// How long to wait for each reply.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Sends of a valid command while it is answered `error` (transient),
    /// the same key each time, as the coordinator retries.
    #[arg(long, default_value_t = 5)]
    attempts: u32,
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials and TLS: the coordinator's (`--nats-nkey` its seed file).
    #[command(flatten)]
    security: saga_nats::NatsSecurity,
}

fn parse_object(s: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The forward, compensation and forward input of a shipped participant.
fn shipped(participant: &str) -> Option<(&'static str, &'static str, Option<Value>)> {
    match participant {
        "inventory" => Some(("reserve", "release", None)),
        "payment" => Some(("charge", "refund", None)),
        "shipping" => Some((
            "create-shipment",
            "cancel-shipment",
            Some(json!({"reservation_id": "conformance"})),
        )),
        _ => None,
    }
}

/// One rule's verdict.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Check {
    pub(crate) rule: &'static str,
    pub(crate) pass: bool,
    pub(crate) detail: String,
}

impl Check {
    fn new(rule: &'static str, pass: bool, detail: impl Into<String>) -> Self {
        Check {
            rule,
            pass,
            detail: detail.into(),
        }
    }
}

/// What the run needs to build its commands.
struct Plan {
    participant: String,
    forward: String,
    compensate: String,
    input: Value,
    compensation_input: Value,
    step: String,
    definition: String,
    order: OrderPayload,
}

impl Plan {
    fn from_args(a: &Args) -> anyhow::Result<Self> {
        wire::check_name("--participant", &a.participant).map_err(anyhow::Error::msg)?;
        let defaults = shipped(&a.participant);
        let pick = |given: &Option<String>, default: Option<&str>, flag: &str| {
            given
                .clone()
                .or_else(|| default.map(str::to_string))
                .with_context(|| format!("`{}` is not a shipped participant: give {flag}", a.participant))
        };
        let forward = pick(&a.forward, defaults.as_ref().map(|d| d.0), "--forward")?;
        let compensate = pick(&a.compensate, defaults.as_ref().map(|d| d.1), "--compensate")?;
        for (flag, name) in [("--forward", &forward), ("--compensate", &compensate)] {
            wire::check_name(flag, name).map_err(anyhow::Error::msg)?;
        }
        wire::check_name("--step", &a.step).map_err(anyhow::Error::msg)?;
        wire::check_definition("--definition", &a.definition).map_err(anyhow::Error::msg)?;
        let order = OrderPayload {
            order_id: "conformance".into(),
            customer_id: a.customer.clone(),
            items: vec![Item {
                sku: a.sku.clone(),
                quantity: a.quantity,
            }],
            amount_cents: a.amount_cents,
            currency: a.currency.clone(),
        };
        order
            .validate()
            .map_err(|e| anyhow::anyhow!("the order the commands carry: {e}"))?;
        let input = a
            .input
            .clone()
            .or_else(|| defaults.and_then(|d| d.2))
            .unwrap_or(Value::Null);
        Ok(Plan {
            participant: a.participant.clone(),
            forward,
            compensate,
            input,
            compensation_input: a.compensation_input.clone().unwrap_or(Value::Null),
            step: a.step.clone(),
            definition: a.definition.clone(),
            order,
        })
    }

    /// A command of a fresh or given saga, attempt 1.
    fn command(&self, saga_id: &str, kind: CommandKind) -> Command {
        let (action, input) = match kind {
            CommandKind::Forward => (&self.forward, &self.input),
            CommandKind::Compensate => (&self.compensate, &self.compensation_input),
        };
        Command {
            saga_id: saga_id.to_string(),
            definition: self.definition.clone(),
            step: self.step.clone(),
            action: action.clone(),
            kind,
            attempt: 1,
            idempotency_key: wire::idempotency_key(saga_id, &self.step, kind),
            payload: self.order.clone(),
            input: input.clone(),
        }
    }
}

/// A fresh saga id: a UUID v7, canonical form.
fn new_saga() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `stats` without the [`DELIVERY_FIGURES`].
pub(crate) fn figures(stats: &Value) -> Value {
    match stats {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !DELIVERY_FIGURES.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The figures that differ between two `stats` answers, as
/// `path: before -> after` (the delivery figures left out).
pub(crate) fn moved(before: &Value, after: &Value) -> Vec<String> {
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let none = Value::Null;
                    walk(&p, x.get(k).unwrap_or(&none), y.get(k).unwrap_or(&none), out);
                }
            }
            _ if a == b => {}
            _ => out.push(format!("{path}: {a} -> {b}")),
        }
    }
    let mut out = Vec::new();
    walk("", &figures(before), &figures(after), &mut out);
    out
}

/// How often `saga` appears in the effects pages, and its (last) effect.
pub(crate) fn effect_of<'a>(entries: &'a [(String, Value)], saga: &str) -> (usize, Option<&'a Value>) {
    let mine: Vec<&Value> = entries
        .iter()
        .filter(|(s, _)| s == saga)
        .map(|(_, v)| v)
        .collect();
    (mine.len(), mine.last().copied())
}

fn show(reply: &Reply) -> String {
    match reply {
        Reply::Ok { data } => format!("ok {data}"),
        Reply::Rejected { reason } => format!("rejected: {reason}"),
        Reply::Error { reason } => format!("error: {reason}"),
    }
}

fn show_moved(m: &[String]) -> String {
    if m.is_empty() {
        "no figure moved".into()
    } else {
        format!("stats moved: {}", m.join(", "))
    }
}

/// The NATS side: commands, stats and effects of one participant.
struct Probe {
    client: async_nats::Client,
    participant: String,
    timeout: Duration,
    attempts: u32,
}

impl Probe {
    async fn request(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let asked = self
            .client
            .request_with_headers(subject.clone(), headers, body.into());
        match tokio::time::timeout(self.timeout, asked).await {
            Err(_) => Err(format!("no reply on {subject} within {:?}", self.timeout)),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Err(format!(
                "no responders on {subject} (is `{}` running?)",
                self.participant
            )),
            Ok(Err(e)) => Err(format!("{subject}: {e}")),
            Ok(Ok(msg)) => Ok(msg.payload.to_vec()),
        }
    }

    /// Sends `body` on `subject` once, with the protocol's headers for `saga_id`.
    async fn send_raw(&self, subject: String, saga_id: &str, body: Vec<u8>) -> Result<Reply, String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            wire::CORRELATION_HEADER,
            format!("conformance-{saga_id}").as_str(),
        );
        let trace: String = saga_id.chars().filter(char::is_ascii_hexdigit).collect();
        if trace.len() == 32 {
            let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
            headers.insert(wire::TRACEPARENT_HEADER, format!("00-{trace}-{span}-01").as_str());
        }
        let bytes = self.request(subject, headers, body).await?;
        serde_json::from_slice::<Reply>(&bytes).map_err(|e| {
            format!(
                "the answer is not a reply envelope ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    }

    /// Sends `cmd` on its subject; while it is answered `error` (transient),
    /// again with the same key and the next attempt, up to `attempts` sends.
    async fn send(&self, cmd: &mut Command) -> Result<Reply, String> {
        let subject = wire::command_subject(&self.participant, &cmd.action);
        let mut delay = Duration::from_millis(50);
        loop {
            let body = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
            let reply = self.send_raw(subject.clone(), &cmd.saga_id, body).await?;
            if !matches!(reply, Reply::Error { .. }) || cmd.attempt >= self.attempts {
                return Ok(reply);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            cmd.attempt += 1;
        }
    }

    /// Sends `cmd` as a repeat (a coordinator's retry: the next attempt).
    async fn repeat(&self, cmd: &mut Command) -> Result<Reply, String> {
        cmd.attempt += 1;
        self.send(cmd).await
    }

    async fn admin(&self, subject: String, body: Vec<u8>) -> Result<Value, String> {
        let bytes = self
            .request(subject.clone(), async_nats::HeaderMap::new(), body)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{subject}: not JSON: {e}"))
    }

    async fn stats(&self) -> Result<Value, String> {
        let v = self
            .admin(wire::stats_subject(&self.participant), Vec::new())
            .await?;
        if !v.is_object() {
            return Err(format!("stats is not a JSON object: {v}"));
        }
        Ok(v)
    }

    /// Every effects page, entries in order (a saga appearing twice stays twice).
    async fn effects(&self) -> Result<Vec<(String, Value)>, String> {
        const MAX_PAGES: usize = 100_000;
        let subject = wire::effects_subject(&self.participant);
        let mut request = wire::EffectsRequest {
            cursor: None,
            limit: Some(wire::EFFECTS_PAGE_MAX),
        };
        let mut entries = Vec::new();
        for _ in 0..MAX_PAGES {
            let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
            let v = self.admin(subject.clone(), body).await?;
            if let Some(e) = v.get("error") {
                return Err(format!("{subject} answered an error: {e}"));
            }
            let page: wire::EffectsPage =
                serde_json::from_value(v).map_err(|e| format!("{subject}: not an effects page: {e}"))?;
            entries.extend(page.effects);
            match page.next_cursor {
                Some(c) if request.cursor.as_deref() == Some(c.as_str()) => {
                    return Err(format!("{subject}: next_cursor {c:?} repeats the request's"))
                }
                Some(c) => request.cursor = Some(c),
                None => return Ok(entries),
            }
        }
        Err(format!("{subject}: more than {MAX_PAGES} pages"))
    }

    /// `stats` and the effects of `saga` (count, effect).
    async fn look(&self, saga: &str) -> Result<(Value, usize, Option<Value>), String> {
        let stats = self.stats().await?;
        let entries = self.effects().await?;
        let (n, effect) = effect_of(&entries, saga);
        Ok((stats, n, effect.cloned()))
    }
}

/// Runs every rule against the participant on `client`.
async fn run_rules(probe: &Probe, plan: &Plan) -> Vec<Check> {
    let mut checks = Vec::new();
    // The admin subjects first: every other rule reads them.
    if let Err(e) = probe.look("").await {
        checks.push(Check::new(rule::ADMIN, false, e));
        for r in &rule::ALL[1..] {
            checks.push(Check::new(r, false, "not run: the admin subjects failed"));
        }
        return checks;
    }
    checks.push(Check::new(
        rule::ADMIN,
        true,
        "stats and every effects page parse",
    ));
    forward_and_compensation(probe, plan, &mut checks).await;
    early_compensation(probe, plan, &mut checks).await;
    malformed(probe, plan, &mut checks).await;
    unknown_action(probe, plan, &mut checks).await;
    checks
}

/// Rules 1-6: a forward, its repeat, its compensation, that one's repeat.
async fn forward_and_compensation(probe: &Probe, plan: &Plan, checks: &mut Vec<Check>) {
    let saga = new_saga();
    let skip_all = |checks: &mut Vec<Check>, rules: &[&'static str], why: &str| {
        for r in rules {
            checks.push(Check::new(r, false, format!("not run: {why}")));
        }
    };
    let after_forward = [
        rule::FORWARD_REPEAT_REPLY,
        rule::FORWARD_REPEAT_EFFECT,
        rule::COMPENSATION,
        rule::COMPENSATION_REPEAT_REPLY,
        rule::COMPENSATION_REPEAT_EFFECT,
    ];
    let s0 = match probe.stats().await {
        Ok(s) => s,
        Err(e) => return skip_all(checks, &[&[rule::FORWARD][..], &after_forward[..]].concat(), &e),
    };
    let mut fwd = plan.command(&saga, CommandKind::Forward);
    let r1 = match probe.send(&mut fwd).await {
        Ok(r @ Reply::Ok { .. }) => r,
        Ok(other) => {
            checks.push(Check::new(
                rule::FORWARD,
                false,
                format!(
                    "the forward was not applied: {} (pick an order it accepts: --sku, --amount-cents, --input)",
                    show(&other)
                ),
            ));
            return skip_all(checks, &after_forward, "the forward was not applied");
        }
        Err(e) => {
            checks.push(Check::new(rule::FORWARD, false, e));
            return skip_all(checks, &after_forward, "the forward was not answered");
        }
    };
    let (s1, n1, e1) = match probe.look(&saga).await {
        Ok(l) => l,
        Err(e) => {
            checks.push(Check::new(rule::FORWARD, false, e));
            return skip_all(checks, &after_forward, "the admin subjects failed");
        }
    };
    let m1 = moved(&s0, &s1);
    checks.push(Check::new(
        rule::FORWARD,
        n1 == 1,
        match (&e1, n1) {
            (Some(e), 1) => format!("{}; effect {e}; {}", show(&r1), show_moved(&m1)),
            (_, 0) => format!("{}, but the saga has no effect in `effects`", show(&r1)),
            (_, n) => format!("{}, but the saga appears {n} times in `effects`", show(&r1)),
        },
    ));

    match probe.repeat(&mut fwd).await {
        Ok(r2) => checks.push(Check::new(
            rule::FORWARD_REPEAT_REPLY,
            r2 == r1,
            if r2 == r1 {
                "the stored reply".to_string()
            } else {
                format!("first {}, then {}", show(&r1), show(&r2))
            },
        )),
        Err(e) => checks.push(Check::new(rule::FORWARD_REPEAT_REPLY, false, e)),
    }
    checks.push(match probe.look(&saga).await {
        Ok((s2, n2, e2)) => no_second_effect(rule::FORWARD_REPEAT_EFFECT, (&s1, n1, &e1), (&s2, n2, &e2)),
        Err(e) => Check::new(rule::FORWARD_REPEAT_EFFECT, false, e),
    });

    let mut undo = plan.command(&saga, CommandKind::Compensate);
    let r3 = match probe.send(&mut undo).await {
        Ok(r @ Reply::Ok { .. }) => r,
        Ok(other) => {
            checks.push(Check::new(
                rule::COMPENSATION,
                false,
                format!("the compensation was answered {}", show(&other)),
            ));
            return skip_all(
                checks,
                &[rule::COMPENSATION_REPEAT_REPLY, rule::COMPENSATION_REPEAT_EFFECT],
                "the compensation failed",
            );
        }
        Err(e) => {
            checks.push(Check::new(rule::COMPENSATION, false, e));
            return skip_all(
                checks,
                &[rule::COMPENSATION_REPEAT_REPLY, rule::COMPENSATION_REPEAT_EFFECT],
                "the compensation was not answered",
            );
        }
    };
    let (s3, n3, e3) = match probe.look(&saga).await {
        Ok(l) => l,
        Err(e) => {
            checks.push(Check::new(rule::COMPENSATION, false, e));
            return skip_all(
                checks,
                &[rule::COMPENSATION_REPEAT_REPLY, rule::COMPENSATION_REPEAT_EFFECT],
                "the admin subjects failed",
            );
        }
    };
    let undone = n3 == 0 || (n3 == 1 && e3 != e1);
    checks.push(Check::new(
        rule::COMPENSATION,
        undone,
        match (&e3, undone) {
            (None, _) => format!(
                "{}; the effect is gone; {}",
                show(&r3),
                show_moved(&moved(&s1, &s3))
            ),
            (Some(e), true) => format!(
                "{}; the effect is now {e}; {}",
                show(&r3),
                show_moved(&moved(&s1, &s3))
            ),
            (Some(e), false) => format!(
                "{}, but the effect is unchanged ({e}, {n3} time(s) in `effects`)",
                show(&r3)
            ),
        },
    ));

    match probe.repeat(&mut undo).await {
        Ok(r4) => checks.push(Check::new(
            rule::COMPENSATION_REPEAT_REPLY,
            r4 == r3,
            if r4 == r3 {
                "the stored reply".to_string()
            } else {
                format!("first {}, then {}", show(&r3), show(&r4))
            },
        )),
        Err(e) => checks.push(Check::new(rule::COMPENSATION_REPEAT_REPLY, false, e)),
    }
    checks.push(match probe.look(&saga).await {
        Ok((s4, n4, e4)) => {
            no_second_effect(rule::COMPENSATION_REPEAT_EFFECT, (&s3, n3, &e3), (&s4, n4, &e4))
        }
        Err(e) => Check::new(rule::COMPENSATION_REPEAT_EFFECT, false, e),
    });
}

/// A repeat changed nothing: the saga's effect (and how often it appears)
/// and every figure but the delivery counters are what they were.
fn no_second_effect(
    rule: &'static str,
    (s_before, n_before, e_before): (&Value, usize, &Option<Value>),
    (s_after, n_after, e_after): (&Value, usize, &Option<Value>),
) -> Check {
    let m = moved(s_before, s_after);
    let mut wrong = Vec::new();
    if n_after != n_before {
        wrong.push(format!(
            "the saga appears {n_after} time(s) in `effects`, {n_before} before"
        ));
    } else if e_after != e_before {
        let show = |e: &Option<Value>| e.as_ref().map_or("none".to_string(), Value::to_string);
        wrong.push(format!(
            "its effect went from {} to {}",
            show(e_before),
            show(e_after)
        ));
    }
    if !m.is_empty() {
        wrong.push(show_moved(&m));
    }
    if wrong.is_empty() {
        Check::new(rule, true, "effects and stats figures unchanged")
    } else {
        Check::new(rule, false, format!("applied again: {}", wrong.join("; ")))
    }
}

/// Rules 7-8: a compensation before its forward stores a tombstone; the
/// late forward is refused by it, with no effect.
async fn early_compensation(probe: &Probe, plan: &Plan, checks: &mut Vec<Check>) {
    let saga = new_saga();
    let s0 = match probe.stats().await {
        Ok(s) => s,
        Err(e) => {
            checks.push(Check::new(rule::EARLY_COMPENSATION, false, e.clone()));
            checks.push(Check::new(rule::LATE_FORWARD, false, format!("not run: {e}")));
            return;
        }
    };
    let mut undo = plan.command(&saga, CommandKind::Compensate);
    checks.push(match probe.send(&mut undo).await {
        Ok(r @ Reply::Ok { .. }) => Check::new(rule::EARLY_COMPENSATION, true, show(&r)),
        Ok(other) => Check::new(
            rule::EARLY_COMPENSATION,
            false,
            format!("answered {} (a compensation of nothing is `ok`)", show(&other)),
        ),
        Err(e) => Check::new(rule::EARLY_COMPENSATION, false, e),
    });
    let mut fwd = plan.command(&saga, CommandKind::Forward);
    let late = match probe.send(&mut fwd).await {
        Ok(r) => r,
        Err(e) => return checks.push(Check::new(rule::LATE_FORWARD, false, e)),
    };
    let again = probe.repeat(&mut fwd).await;
    let look = probe.look(&saga).await;
    let mut wrong = Vec::new();
    if late != Reply::rejected(TOMBSTONE_REASON) {
        wrong.push(format!(
            "answered {}, not rejected: {TOMBSTONE_REASON}",
            show(&late)
        ));
    }
    match &again {
        Ok(r) if *r != late => wrong.push(format!("its repeat answered {}", show(r))),
        Ok(_) => {}
        Err(e) => wrong.push(format!("its repeat: {e}")),
    }
    match &look {
        Ok((s1, n, effect)) => {
            if *n > 0 {
                let e = effect.as_ref().map_or(String::new(), Value::to_string);
                wrong.push(format!("the saga has an effect: {e}"));
            }
            let m = moved(&s0, s1);
            if !m.is_empty() {
                wrong.push(show_moved(&m));
            }
        }
        Err(e) => wrong.push(e.clone()),
    }
    checks.push(if wrong.is_empty() {
        Check::new(
            rule::LATE_FORWARD,
            true,
            format!("{} (and its repeat); no effect", show(&late)),
        )
    } else {
        Check::new(rule::LATE_FORWARD, false, wrong.join("; "))
    });
}

/// Rules 9-11: malformed commands get `error` and nothing applied; the
/// participant answers a valid command afterwards.
async fn malformed(probe: &Probe, plan: &Plan, checks: &mut Vec<Check>) {
    let subject = wire::command_subject(&plan.participant, &plan.forward);
    let saga = new_saga();
    let body = format!(r#"{{"saga_id": "{saga}", "definition": "#).into_bytes();
    checks.push(expect_error(
        rule::MALFORMED_JSON,
        probe.send_raw(subject.clone(), &saga, body).await,
    ));

    let bad = "conformance-not-a-uuid";
    let mut cmd = plan.command(&new_saga(), CommandKind::Forward);
    cmd.saga_id = bad.into();
    cmd.idempotency_key = wire::idempotency_key(bad, &plan.step, CommandKind::Forward);
    let body = serde_json::to_vec(&cmd).unwrap_or_default();
    let mut check = expect_error(rule::MALFORMED_SAGA_ID, probe.send_raw(subject, bad, body).await);
    if check.pass {
        match probe.look(bad).await {
            Ok((_, 0, _)) => {}
            Ok((_, _, e)) => {
                check = Check::new(
                    rule::MALFORMED_SAGA_ID,
                    false,
                    format!("{}, but it left an effect: {e:?}", check.detail),
                )
            }
            Err(e) => check = Check::new(rule::MALFORMED_SAGA_ID, false, e),
        }
    }
    checks.push(check);

    // A valid command that leaves no effect: a compensation of nothing.
    let mut undo = plan.command(&new_saga(), CommandKind::Compensate);
    checks.push(match probe.send(&mut undo).await {
        Ok(r) => Check::new(rule::ALIVE, true, format!("a valid compensation: {}", show(&r))),
        Err(e) => Check::new(rule::ALIVE, false, e),
    });
}

/// Rule 12: an action the participant does not have gets `error`, nothing applied.
async fn unknown_action(probe: &Probe, plan: &Plan, checks: &mut Vec<Check>) {
    let saga = new_saga();
    let mut cmd = plan.command(&saga, CommandKind::Forward);
    cmd.action = UNKNOWN_ACTION.into();
    let subject = wire::command_subject(&plan.participant, UNKNOWN_ACTION);
    let body = serde_json::to_vec(&cmd).unwrap_or_default();
    let mut check = expect_error(rule::UNKNOWN, probe.send_raw(subject, &saga, body).await);
    if check.pass {
        match probe.look(&saga).await {
            Ok((_, 0, _)) => {}
            Ok((_, _, e)) => {
                check = Check::new(
                    rule::UNKNOWN,
                    false,
                    format!("{}, but it left an effect: {e:?}", check.detail),
                )
            }
            Err(e) => check = Check::new(rule::UNKNOWN, false, e),
        }
    }
    checks.push(check);
}

fn expect_error(rule: &'static str, reply: Result<Reply, String>) -> Check {
    match reply {
        Ok(r @ Reply::Error { .. }) => Check::new(rule, true, show(&r)),
        Ok(other) => Check::new(rule, false, format!("answered {}, not error", show(&other))),
        Err(e) => Check::new(rule, false, e),
    }
}

/// The result as JSON (`--json`).
fn report_json(plan: &Plan, checks: &[Check]) -> Value {
    json!({
        "participant": plan.participant,
        "forward": plan.forward,
        "compensate": plan.compensate,
        "passed": checks.iter().all(|c| c.pass),
        "checks": checks.iter().map(|c| json!({"rule": c.rule, "pass": c.pass, "detail": c.detail}))
            .collect::<Vec<_>>(),
    })
}

/// `sagactl conformance`: runs the rules, prints the table (or JSON) and
/// exits 1 when a rule failed.
///
/// # Errors
/// Bad options, or NATS cannot be reached.
pub(crate) async fn main(args: &Args, json_out: bool) -> anyhow::Result<()> {
    let plan = Plan::from_args(args)?;
    args.security.validate().map_err(anyhow::Error::msg)?;
    let options = args
        .security
        .apply(
            async_nats::ConnectOptions::new()
                .name("sagactl-conformance")
                // It plays the coordinator: the inbox its permissions allow.
                .custom_inbox_prefix(saga_nats::Role::Coordinator.inbox_prefix()),
        )
        .await?;
    let client = options
        .connect(args.nats_url.as_str())
        .await
        .with_context(|| format!("cannot reach NATS at {}", args.nats_url))?;
    let probe = Probe {
        client,
        participant: plan.participant.clone(),
        timeout: args.timeout,
        attempts: args.attempts.max(1),
    };
    let checks = run_rules(&probe, &plan).await;
    let passed = checks.iter().all(|c| c.pass);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report_json(&plan, &checks))?);
    } else {
        let mut t = super::table(&["rule", "result", "detail"]);
        for c in &checks {
            t.add_row(vec![
                c.rule.to_string(),
                if c.pass { "pass" } else { "FAIL" }.to_string(),
                c.detail.clone(),
            ]);
        }
        println!(
            "conformance of `{}` ({} / {}):\n{t}",
            plan.participant, plan.forward, plan.compensate
        );
        let failed = checks.iter().filter(|c| !c.pass).count();
        if failed == 0 {
            println!("all {} rules pass", checks.len());
        } else {
            println!("{failed} of {} rules FAIL", checks.len());
        }
    }
    let _ = probe.client.drain().await;
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_effect_figures_count_as_moved() {
        let before =
            json!({"stock": {"A-1": {"available": 10, "reserved": 0}}, "commands": 3, "dedupe_hits": 0});
        let after =
            json!({"stock": {"A-1": {"available": 9, "reserved": 1}}, "commands": 4, "dedupe_hits": 1});
        assert_eq!(
            moved(&before, &after),
            vec!["stock.A-1.available: 10 -> 9", "stock.A-1.reserved: 0 -> 1"]
        );
        let repeat =
            json!({"stock": {"A-1": {"available": 9, "reserved": 1}}, "commands": 5, "dedupe_hits": 2});
        assert!(moved(&after, &repeat).is_empty());
        let new_figure = json!({"charges": 1, "breaker_open": true});
        assert_eq!(
            moved(&json!({"breaker_open": false}), &new_figure),
            vec!["charges: null -> 1"]
        );
    }

    #[test]
    fn a_saga_twice_in_the_effects_pages_is_counted_twice() {
        let entries = vec![
            ("s1".to_string(), json!({"A-1": 1})),
            ("s2".to_string(), json!({"A-1": 2})),
            ("s1".to_string(), json!({"A-1": 3})),
        ];
        assert_eq!(effect_of(&entries, "s1"), (2, Some(&json!({"A-1": 3}))));
        assert_eq!(effect_of(&entries, "s2").0, 1);
        assert_eq!(effect_of(&entries, "s3"), (0, None));
    }

    #[test]
    fn a_repeat_that_changes_the_effect_or_a_figure_fails() {
        let s = json!({"charges": 1, "commands": 1});
        let e = Some(json!({"amount_cents": 100}));
        let same = no_second_effect("r", (&s, 1, &e), (&json!({"charges": 1, "commands": 2}), 1, &e));
        assert!(same.pass, "{same:?}");
        let twice = no_second_effect("r", (&s, 1, &e), (&json!({"charges": 2, "commands": 2}), 1, &e));
        assert!(
            !twice.pass && twice.detail.contains("charges: 1 -> 2"),
            "{twice:?}"
        );
        let other = Some(json!({"amount_cents": 200}));
        let changed = no_second_effect("r", (&s, 1, &e), (&s, 1, &other));
        assert!(
            !changed.pass && changed.detail.contains("went from"),
            "{changed:?}"
        );
    }

    #[test]
    fn the_shipped_participants_have_defaults_and_others_must_name_their_actions() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        let plan = |argv: &[&str]| {
            let t = T::try_parse_from(std::iter::once("t").chain(argv.iter().copied())).expect("parses");
            Plan::from_args(&t.a)
        };
        let p = plan(&["--participant", "shipping"]).expect("shipped");
        assert_eq!(
            (p.forward.as_str(), p.compensate.as_str()),
            ("create-shipment", "cancel-shipment")
        );
        assert_eq!(p.input, json!({"reservation_id": "conformance"}));
        let cmd = p.command("0190b8a4-0000-7000-8000-0000000000aa", CommandKind::Compensate);
        cmd.validate().expect("the commands it sends are valid");
        assert!(plan(&["--participant", "loyalty"]).is_err());
        let own = plan(&[
            "--participant",
            "loyalty",
            "--forward",
            "grant",
            "--compensate",
            "revoke",
        ])
        .expect("named");
        assert_eq!(own.forward, "grant");
        assert!(plan(&["--participant", "payment", "--amount-cents", "0"]).is_err());
    }
}
