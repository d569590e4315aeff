//! Sends outbox commands to participants over NATS request-reply and turns
//! whatever comes back into an engine [`Outcome`].
//!
//! One task drives every command in flight. A command is a compact row in a
//! table (saga, step, kind, attempt, its route and a timer key), not a task
//! of its own: one reply subscription (`<inbox>.*`) serves them all, each
//! request carrying its row's token as the last token of its reply subject,
//! and one timer wheel ([`DelayQueue`]) holds both the backoff waits before
//! a retry and the reply deadlines. So 100,000 sagas waiting on a slow
//! participant cost a few hundred bytes each here, not a task, a future, a
//! timer, a span and a reply slot each.
//!
//! The reply subscription's buffer holds every reply of a burst (see
//! `saga_nats::connect`): async-nats drops messages past it as a
//! slow consumer, and a burst of 100,000 replies after a restart is normal.
//!
//! A reply is untrusted: anyone who may publish to the reply subject can
//! answer. Nothing in the reply envelope names the command it answers, so
//! the reply subject's last token is random per command (not a counter one
//! reply subject would let a participant guess the others from), and an
//! `ok` reply's output must be at most `--max-output-bytes` of JSON and match
//! its step's `output_schema`; anything else is a malformed reply (outcome
//! unknown, logged, counted as `outcome="malformed"`), never stored.
//!
//! For each command: wait the step's backoff for attempts after the first
//! (`RetryPolicy::delay_before`, jittered by the `backon` crate), send with
//! the step's timeout, classify the answer, report it to the saga runner.
//! Retrying is the engine's decision, recorded before the next attempt
//! leaves; this module never retries on its own and never touches the store.
//! Callers hand it only commands whose state is flushed. While the NATS
//! connection is down a command due to leave waits (re-checked every
//! [`PARKED_RECHECK`]) instead of burning its attempt: nothing could be
//! delivered, and the outbox still holds it if the coordinator stops.
//!
//! Every participant sits behind its own failsafe circuit breaker: after
//! `failures` consecutive failures (no responders, timeouts, `error` or
//! unreadable replies) it opens for `wait`; a command meant for an open
//! breaker waits out the rest of that `wait` before it is sent (so sagas do
//! not burn their attempts hammering a dead service), and one still refused
//! fails fast as a transient "circuit open" outcome. Each change is logged.
//!
//! A participant may have a limit on its commands in flight
//! (`--max-in-flight`): a command due past it waits in a queue of its
//! participant, its attempt not spent and no deadline running, and leaves
//! in turn when one of the participant's commands is answered or times out
//! (`saga_dispatch_queued` counts the queue). So a restart with 100,000
//! sagas in flight sends each participant at most its limit at once.

mod limits;
mod traced;

pub use limits::InFlightLimits;

use traced::AttemptTrace;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::{connection::State as NatsState, header::HeaderMap, StatusCode};
use futures::{future::BoxFuture, StreamExt};
use saga_wire::{self as wire, CommandKind, Reply};
use tokio::sync::mpsc;
use tokio_util::{
    sync::CancellationToken,
    task::TaskTracker,
    time::{delay_queue, DelayQueue},
};
use tracing::{debug, info, warn};

use crate::{
    definition::OutputSchema,
    effects::Durable,
    engine::{Event, Outcome},
    sink::CommandSink,
    store::{DeadLetter, OutboxEntry},
    telemetry,
};

/// Subject of dead-letter records.
pub(crate) const DLQ_SUBJECT: &str = "saga.dlq";

/// How often the commands due while NATS is disconnected look whether it is back.
pub(crate) const PARKED_RECHECK: Duration = Duration::from_millis(100);

/// Why a call produced no participant answer (style: the two kinds
/// async-nats distinguishes, plus a reply we cannot read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CallError {
    /// Nobody listens on the subject (or the connection is down): nothing was
    /// delivered; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Sent, but no answer in time: the effect may exist; retry with the same key.
    #[error("timeout after {0:?}")]
    OutcomeUnknown(Duration),
    /// An answer that is not a valid reply envelope.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The participant answered `error`: it recorded nothing.
    #[error("error: {0}")]
    ErrorReply(String),
    /// The participant's circuit breaker is open: nothing was sent.
    #[error("circuit open for {0}")]
    CircuitOpen(String),
}

/// Circuit-breaker settings, the same for every participant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BreakerSettings {
    /// Consecutive failures that open a breaker.
    pub failures: u32,
    /// How long an open breaker refuses calls.
    pub wait: Duration,
}

/// Logs a participant breaker's changes and remembers when it opened.
#[derive(Debug, Clone)]
struct BreakerWatch {
    participant: String,
    opened_at: Arc<Mutex<Option<Instant>>>,
}

impl failsafe::Instrument for BreakerWatch {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        warn!(participant = %self.participant, "circuit breaker open: commands wait before being sent");
        metrics::gauge!(telemetry::BREAKER_OPEN, "participant" => self.participant.clone()).set(1.0);
        if let Ok(mut t) = self.opened_at.lock() {
            *t = Some(Instant::now());
        }
    }
    fn on_half_open(&self) {
        info!(participant = %self.participant, "circuit breaker half-open: probing");
    }
    fn on_closed(&self) {
        info!(participant = %self.participant, "circuit breaker closed");
        metrics::gauge!(telemetry::BREAKER_OPEN, "participant" => self.participant.clone()).set(0.0);
        if let Ok(mut t) = self.opened_at.lock() {
            *t = None;
        }
    }
}

type BreakerMachine = failsafe::StateMachine<
    failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::Constant>,
    BreakerWatch,
>;

#[derive(Clone)]
struct Breaker {
    machine: BreakerMachine,
    watch: BreakerWatch,
    wait: Duration,
}

impl Breaker {
    fn new(participant: &str, settings: BreakerSettings) -> Self {
        let watch = BreakerWatch {
            participant: participant.to_string(),
            opened_at: Arc::default(),
        };
        let policy = failsafe::failure_policy::consecutive_failures(
            settings.failures,
            failsafe::backoff::constant(settings.wait),
        );
        let machine = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(watch.clone())
            .build();
        Breaker {
            machine,
            watch,
            wait: settings.wait,
        }
    }

    /// How long the breaker stays open from now (zero when closed).
    fn remaining_open(&self) -> Duration {
        match self.watch.opened_at.lock().ok().and_then(|t| *t) {
            Some(opened) => self.wait.saturating_sub(opened.elapsed()),
            None => Duration::ZERO,
        }
    }
}

pub(crate) use crate::sink::Reported;

enum Order {
    Send(Box<OutboxEntry>),
    Withdraw {
        saga_id: String,
        step: usize,
        kind: CommandKind,
    },
}

/// Sends commands; cheap to clone.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    orders: mpsc::UnboundedSender<Order>,
    /// For the dead letters ([`CommandSink::publish_dead_letter`]).
    client: async_nats::Client,
}

impl Dispatcher {
    /// A dispatcher reporting outcomes on `outcomes`. Its task is tracked by
    /// `tracker` and stops when `cancel` fires, abandoning the commands in
    /// flight unreported: they stay in the outbox and are re-sent on the next
    /// start. Must be called inside a tokio runtime.
    pub(crate) fn new(
        client: async_nats::Client,
        breaker_settings: BreakerSettings,
        limits: InFlightLimits,
        max_output_bytes: usize,
        outcomes: mpsc::UnboundedSender<Reported>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            inbox: client.new_inbox(),
            client: client.clone(),
            settings: breaker_settings,
            breakers: HashMap::new(),
            routes: HashMap::new(),
            rows: HashMap::new(),
            timers: DelayQueue::new(),
            parked: Vec::new(),
            limits,
            lanes: HashMap::new(),
            max_output_bytes,
            outcomes,
            spans: saga_trace::spans(),
        };
        tracker.spawn(driver.run(rx, cancel));
        Dispatcher { orders: tx, client }
    }

    /// Sends `entry` in the background. The caller guarantees the state that
    /// implies this command is durable.
    pub(crate) fn dispatch(&self, entry: OutboxEntry) {
        // Gone only after shutdown: the outbox keeps the command.
        let _ = self.orders.send(Order::Send(Box::new(entry)));
    }

    /// Withdraws the command for `saga_id`/`step`/`kind` if it has not been
    /// answered yet (an operator abort settled it). A request already on the
    /// wire may still arrive: participants' tombstones make that harmless.
    pub(crate) fn withdraw(&self, saga_id: &str, step: usize, kind: CommandKind) {
        let _ = self.orders.send(Order::Withdraw {
            saga_id: saga_id.to_string(),
            step,
            kind,
        });
    }
}

impl CommandSink for Dispatcher {
    fn dispatch(&self, entry: Durable<OutboxEntry>) {
        Dispatcher::dispatch(self, entry.into_inner());
    }

    fn withdraw(&self, saga_id: &str, step: usize, kind: CommandKind) {
        Dispatcher::withdraw(self, saga_id, step, kind);
    }

    fn publish_dead_letter(&self, letter: DeadLetter) -> BoxFuture<'static, Result<(), String>> {
        let nats = self.client.clone();
        Box::pin(async move {
            let body = serde_json::to_vec(&letter).map_err(|e| e.to_string())?;
            nats.publish(DLQ_SUBJECT, body.into())
                .await
                .map_err(|e| e.to_string())?;
            nats.flush().await.map_err(|e| e.to_string())
        })
    }
}

/// Where a command goes, shared by every row with the same subject.
struct Route {
    subject: String,
    participant: String,
    action: String,
    breaker: Breaker,
    /// The participant's `--max-in-flight`, if any.
    limit: Option<usize>,
}

/// A participant's commands under its limit: how many are sent and not
/// finished, and the tokens of those due that wait for room, oldest first.
#[derive(Default)]
struct Lane {
    sent: usize,
    queued: VecDeque<u64>,
}

/// A command in flight: waiting out its backoff (with the whole entry, to
/// send it) or sent (with only what its outcome and metrics need).
struct Row {
    saga_id: Box<str>,
    correlation_id: Box<str>,
    step: usize,
    kind: CommandKind,
    attempt: u32,
    route: Arc<Route>,
    /// The row's one live timer, if any. A key is forgotten the moment its
    /// timer fires: the queue reuses keys, so a stale one must never be used.
    timer: Option<delay_queue::Key>,
    /// What an `ok` reply's output must match (forward commands of steps with an `output_schema`).
    output_schema: Option<OutputSchema>,
    stage: Stage,
    /// Its span's data, while spans are exported.
    trace: Option<Box<AttemptTrace>>,
}

enum Stage {
    Waiting(Box<OutboxEntry>),
    Sent { started: Instant, timeout: Duration },
}

/// The one task behind a [`Dispatcher`].
struct Driver {
    client: async_nats::Client,
    /// Replies come to `<inbox>.<token>`.
    inbox: String,
    settings: BreakerSettings,
    /// One breaker per participant, shared by the routes of its actions.
    breakers: HashMap<String, Breaker>,
    routes: HashMap<String, Arc<Route>>,
    rows: HashMap<u64, Row>,
    /// Fires a row's token: a backoff over (send it) or a deadline (timeout).
    timers: DelayQueue<u64>,
    /// Rows due while NATS was disconnected: sent once it is back (one
    /// connection check every [`PARKED_RECHECK`] for all of them).
    parked: Vec<u64>,
    limits: InFlightLimits,
    /// Per limited participant.
    lanes: HashMap<String, Lane>,
    /// Largest output (`data` of an `ok` reply, as compact JSON) a step may return.
    max_output_bytes: usize,
    outcomes: mpsc::UnboundedSender<Reported>,
    /// Where attempt spans go, when this process exports spans.
    spans: Option<&'static saga_trace::Spans>,
}

impl Driver {
    async fn run(mut self, mut orders: mpsc::UnboundedReceiver<Order>, cancel: CancellationToken) {
        // No request leaves before its reply subscription is taken.
        let mut replies = tokio::select! {
            s = self.subscribe() => s,
            _ = cancel.cancelled() => return,
        };
        let mut batch = Vec::with_capacity(256);
        let recheck = tokio::time::sleep(PARKED_RECHECK);
        tokio::pin!(recheck);
        loop {
            if !self.limits.is_empty() {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    () = self.release_queued() => {}
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                message = replies.next() => match message {
                    Some(message) => self.on_reply(message),
                    // The client closed (it does not while reconnecting): subscribe again.
                    None => replies = tokio::select! {
                        s = self.subscribe() => s,
                        _ = cancel.cancelled() => break,
                    },
                },
                n = orders.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    let work = async {
                        for order in batch.drain(..) {
                            match order {
                                Order::Send(entry) => self.admit(entry).await,
                                Order::Withdraw { saga_id, step, kind } => self.withdraw(&saga_id, step, kind),
                            }
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        () = work => {}
                    }
                }
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    let token = expired.into_inner();
                    if let Some(row) = self.rows.get_mut(&token) {
                        row.timer = None;
                    }
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        () = self.on_timer(token) => {}
                    }
                }
                () = &mut recheck, if !self.parked.is_empty() => {
                    recheck.as_mut().reset(tokio::time::Instant::now() + PARKED_RECHECK);
                    if self.client.connection_state() == NatsState::Connected {
                        debug!(commands = self.parked.len(), "NATS is back: sending the commands that waited");
                        // Through the timer path, each at its turn.
                        for token in std::mem::take(&mut self.parked) {
                            if let Some(row) = self.rows.get_mut(&token) {
                                row.timer = Some(self.timers.insert(token, Duration::ZERO));
                            }
                        }
                    }
                }
            }
        }
        debug!(
            in_flight = self.rows.len(),
            "dispatcher stopped; in-flight commands stay in the outbox"
        );
    }

    /// The reply subscription, retried until it is taken.
    async fn subscribe(&self) -> async_nats::Subscriber {
        let subject = format!("{}.*", self.inbox);
        let mut wait = Duration::from_millis(50);
        loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(s) => return s,
                Err(e) => {
                    warn!(error = %e, "cannot subscribe to command replies; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn route(&mut self, subject: &str) -> Arc<Route> {
        if let Some(r) = self.routes.get(subject) {
            return r.clone();
        }
        let participant = wire_part(subject, 2).to_string();
        let breaker = self
            .breakers
            .entry(participant.clone())
            .or_insert_with(|| Breaker::new(&participant, self.settings))
            .clone();
        let route = Arc::new(Route {
            subject: subject.to_string(),
            action: wire_part(subject, 3).to_string(),
            limit: self.limits.of(&participant),
            participant,
            breaker,
        });
        self.routes.insert(subject.to_string(), route.clone());
        route
    }

    /// A new command: a row waiting out its backoff (and at least until an
    /// open breaker may close), due at once on a first attempt.
    async fn admit(&mut self, entry: Box<OutboxEntry>) {
        let route = self.route(&entry.subject);
        let delay = entry
            .retry
            .delay_before(entry.message.attempt)
            .max(route.breaker.remaining_open());
        // Random, not a counter: the reply subject of one command (which its
        // participant sees) must not tell how to answer another one.
        let token = loop {
            let t = uuid::Uuid::new_v4().as_u64_pair().0;
            if !self.rows.contains_key(&t) {
                break t;
            }
        };
        // Not even a zero sleep on a first attempt: tokio's timer rounds a
        // deadline up to its next 1 ms tick, which a saga would pay per step.
        let timer = (!delay.is_zero()).then(|| self.timers.insert(token, delay));
        self.rows.insert(
            token,
            Row {
                saga_id: entry.saga_id.as_str().into(),
                correlation_id: entry.correlation_id.as_str().into(),
                step: entry.step,
                kind: entry.kind,
                attempt: entry.message.attempt,
                route,
                timer,
                output_schema: entry.output_schema.clone(),
                trace: AttemptTrace::start(self.spans, &entry),
                stage: Stage::Waiting(entry),
            },
        );
        if timer.is_none() {
            self.send(token).await;
        }
    }

    /// A sent command of `route`'s participant finished: room for the next.
    fn lane_done(&mut self, route: &Route) {
        if route.limit.is_some() {
            if let Some(lane) = self.lanes.get_mut(&route.participant) {
                lane.sent = lane.sent.saturating_sub(1);
            }
        }
    }

    fn withdraw(&mut self, saga_id: &str, step: usize, kind: CommandKind) {
        // Only an operator abort withdraws: a scan is cheap enough for it.
        let tokens: Vec<u64> = self
            .rows
            .iter()
            .filter(|(_, r)| &*r.saga_id == saga_id && r.step == step && r.kind == kind)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            if let Some(row) = self.rows.remove(&token) {
                if let Some(key) = row.timer {
                    self.timers.try_remove(&key);
                }
                match row.stage {
                    Stage::Sent { .. } => self.lane_done(&row.route),
                    Stage::Waiting(_) => {
                        if let Some(lane) = self.lanes.get_mut(&row.route.participant) {
                            lane.queued.retain(|t| *t != token);
                        }
                    }
                }
                debug!(saga_id, correlation_id = %row.correlation_id, step, attempt = row.attempt,
                       "command withdrawn");
            }
        }
    }

    async fn on_timer(&mut self, token: u64) {
        let Some(row) = self.rows.get(&token) else {
            return;
        };
        match row.stage {
            Stage::Waiting(_) => self.send(token).await,
            Stage::Sent { timeout, .. } => self.finish(token, Err(CallError::OutcomeUnknown(timeout))),
        }
    }

    /// Sends a due row (the publish only queues on the connection, waiting
    /// for room in it when NATS stalls), or parks it while NATS is down.
    async fn send(&mut self, token: u64) {
        if self.client.connection_state() != NatsState::Connected {
            self.parked.push(token);
            return;
        }
        if self.held_back(token) {
            return;
        }
        self.publish(token).await;
    }

    /// Publishes a waiting row's request (the publish only queues on the
    /// connection, waiting for room in it when NATS stalls).
    async fn publish(&mut self, token: u64) {
        let Some((subject, reply, headers, body)) = self.request_parts(token) else {
            return;
        };
        let result = self
            .client
            .publish_with_reply_and_headers(subject, reply, headers, body)
            .await;
        self.sent(token, result);
    }

    /// Queues `token` when its participant has no room under its limit (or
    /// older commands wait for it); returns whether it did.
    fn held_back(&mut self, token: u64) -> bool {
        let Some(route) = self.rows.get(&token).map(|r| r.route.clone()) else {
            return false;
        };
        let Some(limit) = route.limit else {
            return false;
        };
        let lane = self.lanes.entry(route.participant.clone()).or_default();
        if lane.sent < limit && lane.queued.is_empty() {
            return false;
        }
        lane.queued.push_back(token);
        metrics::gauge!(telemetry::DISPATCH_QUEUED, "participant" => route.participant.clone())
            .set(lane.queued.len() as f64);
        true
    }

    /// Sends the queued commands of limited participants while they have
    /// room (after commands finished).
    async fn release_queued(&mut self) {
        let participants: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, l)| !l.queued.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        for participant in participants {
            let limit = self.limits.of(&participant).unwrap_or(usize::MAX);
            while let Some(lane) = self.lanes.get_mut(&participant) {
                if self.client.connection_state() != NatsState::Connected {
                    // Parked, they leave when NATS is back (nothing else may
                    // wake this task then), through `send` and the queue again.
                    self.parked.extend(lane.queued.drain(..));
                    metrics::gauge!(telemetry::DISPATCH_QUEUED, "participant" => participant.clone())
                        .set(0.0);
                    break;
                }
                if lane.sent >= limit {
                    break;
                }
                let Some(token) = lane.queued.pop_front() else {
                    break;
                };
                let left = lane.queued.len();
                metrics::gauge!(telemetry::DISPATCH_QUEUED, "participant" => participant.clone())
                    .set(left as f64);
                // Withdrawn meanwhile: nothing to send.
                // A withdrawn row is gone: `request_parts` finds nothing to send.
                self.publish(token).await;
            }
        }
    }

    /// The request of a waiting row, or its failure reported (an open
    /// breaker, an envelope that cannot be encoded).
    fn request_parts(&mut self, token: u64) -> Option<(String, String, HeaderMap, bytes::Bytes)> {
        let row = self.rows.get(&token)?;
        let Stage::Waiting(entry) = &row.stage else {
            return None;
        };
        if !row.route.breaker.machine.is_call_permitted() {
            let participant = row.route.participant.clone();
            self.finish(token, Err(CallError::CircuitOpen(participant)));
            return None;
        }
        let body = match serde_json::to_vec(&entry.message) {
            Ok(b) => b,
            Err(e) => {
                self.finish(token, Err(CallError::Malformed(e.to_string())));
                return None;
            }
        };
        Some((
            row.route.subject.clone(),
            format!("{}.{token}", self.inbox),
            headers(entry, row.trace.as_deref()),
            body.into(),
        ))
    }

    /// The publish of a row went (or failed): it now waits for its reply
    /// until its deadline, keeping only what its outcome needs.
    fn sent(&mut self, token: u64, result: Result<(), async_nats::PublishError>) {
        if let Err(e) = result {
            self.finish(token, Err(CallError::Unavailable(e.to_string())));
            return;
        }
        let Some(row) = self.rows.get_mut(&token) else {
            return;
        };
        let Stage::Waiting(entry) = &row.stage else {
            return;
        };
        let timeout = Duration::from_millis(entry.timeout_ms);
        row.timer = Some(self.timers.insert(token, timeout));
        if let Some(t) = row.trace.as_mut() {
            t.sent();
        }
        row.stage = Stage::Sent {
            started: Instant::now(),
            timeout,
        };
        if row.route.limit.is_some() {
            self.lanes.entry(row.route.participant.clone()).or_default().sent += 1;
        }
    }

    fn on_reply(&mut self, message: async_nats::Message) {
        let token = message
            .subject
            .rsplit_once('.')
            .and_then(|(_, t)| t.parse::<u64>().ok());
        let Some(token) =
            token.filter(|t| matches!(self.rows.get(t), Some(r) if matches!(r.stage, Stage::Sent { .. })))
        else {
            debug!(subject = %message.subject, "reply for no command in flight (late, or withdrawn); ignored");
            return;
        };
        let result = if message.status == Some(StatusCode::NO_RESPONDERS) {
            Err(CallError::Unavailable("no responders".into()))
        } else {
            match self.read_reply(token, &message.payload) {
                Ok(Reply::Error { reason }) => Err(CallError::ErrorReply(reason)),
                Ok(reply) => Ok(reply),
                Err(reason) => {
                    let body: String = String::from_utf8_lossy(&message.payload)
                        .chars()
                        .take(200)
                        .collect();
                    if let Some(row) = self.rows.get(&token) {
                        warn!(saga_id = %row.saga_id, correlation_id = %row.correlation_id, step = row.step,
                              attempt = row.attempt, error = %reason, bytes = message.payload.len(), body,
                              "malformed reply from participant; treated as transient (outcome unknown)");
                    }
                    Err(CallError::Malformed(reason))
                }
            }
        };
        self.finish(token, result);
    }

    /// Decodes a reply and checks an `ok` reply's output: at most
    /// `max_output_bytes` of JSON (a body far larger is not even parsed) and
    /// matching the step's `output_schema`. Nothing in the envelope names the
    /// command it answers; the reply subject's random token is what ties the
    /// two together.
    fn read_reply(&self, token: u64, payload: &[u8]) -> Result<Reply, String> {
        // The envelope around the output is a few dozen bytes.
        let body_limit = self.max_output_bytes.saturating_add(ENVELOPE_BYTES);
        if payload.len() > body_limit {
            return Err(format!(
                "reply of {} bytes; a step output is at most {} bytes",
                payload.len(),
                self.max_output_bytes
            ));
        }
        let reply = serde_json::from_slice::<Reply>(payload).map_err(|e| e.to_string())?;
        if let Reply::Ok { data } = &reply {
            let size = json_size(data);
            if size > self.max_output_bytes {
                return Err(format!(
                    "output of {size} bytes; a step output is at most {} bytes",
                    self.max_output_bytes
                ));
            }
            if let Some(schema) = self.rows.get(&token).and_then(|r| r.output_schema.as_ref()) {
                schema
                    .check(data)
                    .map_err(|e| format!("output does not match the step's output_schema: {e}"))?;
            }
        }
        Ok(reply)
    }

    /// Ends a row: breaker bookkeeping, metrics, the outcome to the runner.
    fn finish(&mut self, token: u64, result: Result<Reply, CallError>) {
        let Some(row) = self.rows.remove(&token) else {
            return;
        };
        if let Some(key) = row.timer {
            self.timers.try_remove(&key);
        }
        let route = &row.route;
        let sent = match row.stage {
            Stage::Sent { started, .. } => Some(started),
            Stage::Waiting(_) => None,
        };
        if sent.is_some() {
            self.lane_done(route);
        }
        // A command refused before it left (open breaker) is not a call.
        match &result {
            Ok(_) => route.breaker.machine.on_success(),
            Err(CallError::CircuitOpen(_)) => {}
            Err(_) => route.breaker.machine.on_error(),
        }
        // A failure's reason, for the attempt's span only.
        let error = match (&row.trace, &result) {
            (None, _) | (_, Ok(Reply::Ok { .. } | Reply::Rejected { .. })) => None,
            (_, Ok(Reply::Error { reason })) => Some(format!("error: {reason}")),
            (_, Err(e)) => Some(e.to_string()),
        };
        let (label, outcome) = match result {
            Ok(Reply::Ok { data }) => ("ok", Outcome::Ok(data)),
            Ok(Reply::Rejected { reason }) => ("rejected", Outcome::Rejected(reason)),
            Ok(Reply::Error { reason }) | Err(CallError::ErrorReply(reason)) => {
                ("error", Outcome::NotApplied(format!("error: {reason}")))
            }
            Err(e @ CallError::CircuitOpen(_)) => ("circuit_open", Outcome::NotApplied(e.to_string())),
            Err(e @ CallError::Unavailable(_)) => ("unavailable", Outcome::NotApplied(e.to_string())),
            Err(e @ CallError::OutcomeUnknown(_)) => ("timeout", Outcome::Transient(e.to_string())),
            Err(e @ CallError::Malformed(_)) => ("malformed", Outcome::Transient(e.to_string())),
        };
        metrics::histogram!(
            telemetry::STEP_SECONDS,
            "participant" => route.participant.clone(),
            "action" => route.action.clone(),
            "outcome" => label,
        )
        .record(sent.map_or(0.0, |s| s.elapsed().as_secs_f64()));
        if row.attempt > 1 {
            metrics::counter!(telemetry::STEP_RETRIES, "participant" => route.participant.clone())
                .increment(1);
        }
        debug!(saga_id = %row.saga_id, correlation_id = %row.correlation_id, step = row.step,
               kind = row.kind.as_str(), attempt = row.attempt, ?outcome, "outcome");
        if let (Some(trace), Some(spans)) = (row.trace, self.spans) {
            trace.finish(
                spans,
                &row.saga_id,
                &row.correlation_id,
                &route.participant,
                &route.action,
                row.kind,
                row.attempt,
                label,
                error,
            );
        }
        // The runner is gone only during shutdown; the outbox keeps the command.
        let _ = self.outcomes.send(Reported {
            saga_id: row.saga_id.into(),
            event: Event::Reply {
                step: row.step,
                kind: row.kind,
                attempt: row.attempt,
                outcome,
            },
        });
    }
}

/// What a reply body may hold beyond its output (`{"outcome":"ok","data":…}`, whitespace).
const ENVELOPE_BYTES: usize = 1024;

/// The size of `value` as compact JSON, counted without building it.
fn json_size(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// The `n`th dot-separated part of `saga.cmd.<participant>.<action>`.
fn wire_part(subject: &str, n: usize) -> &str {
    subject.split('.').nth(n).unwrap_or(subject)
}

/// `X-Correlation-ID` and a W3C `traceparent` whose trace id is the saga id,
/// so every command of one saga shares a trace; its span is the attempt's
/// when spans are exported (the participant's span is then its child).
fn headers(entry: &OutboxEntry, trace: Option<&AttemptTrace>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(wire::CORRELATION_HEADER, entry.correlation_id.as_str());
    match trace.map(AttemptTrace::context) {
        Some((trace, span, sampled)) => saga_trace::propagation::inject(&mut h, trace, span, sampled),
        None => {
            if let Some(trace) = saga_trace::ids::saga_trace_id(&entry.saga_id) {
                saga_trace::propagation::inject(&mut h, trace, saga_trace::ids::random_span_id(), true);
            }
        }
    }
    h
}
