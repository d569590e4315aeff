//! Sends outbox commands to participants over NATS request-reply and turns
//! whatever comes back into an engine [`Outcome`].
//!
//! Each command runs in its own tracked task: wait the step's backoff for
//! attempts after the first (`RetryPolicy::delay_before`, jittered by the
//! `backon` crate), send with the step's timeout, classify the answer, report
//! it to the saga runner. Retrying is the engine's decision, recorded before
//! the next attempt leaves; this module never retries on its own and never
//! touches the store. Callers hand it only commands whose state is flushed.
//!
//! Every participant sits behind its own failsafe circuit breaker: after
//! `failures` consecutive failures (no responders, timeouts, `error` or
//! unreadable replies) it opens for `wait`; a command meant for an open
//! breaker waits out the rest of that `wait` before it is sent (so sagas do
//! not burn their attempts hammering a dead service), and one still refused
//! fails fast as a transient "circuit open" outcome. Each change is logged.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use failsafe::futures::CircuitBreaker as _;

use async_nats::{header::HeaderMap, RequestErrorKind};
use saga_proto::wire::{self, CommandKind, Reply};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    engine::{Event, Outcome},
    store::OutboxEntry,
    telemetry,
};

/// Why a call produced no participant answer (style: the two kinds
/// async-nats distinguishes, plus a reply we cannot read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
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
}

/// Circuit-breaker settings, the same for every participant.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
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

/// An outcome for the saga runner.
#[derive(Debug)]
pub struct Reported {
    /// Saga the outcome belongs to.
    pub saga_id: String,
    /// The engine event.
    pub event: Event,
}

/// A command's identity: saga, step, kind.
type CommandId = (String, usize, CommandKind);

/// Sends commands; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    client: async_nats::Client,
    breakers: Arc<Mutex<HashMap<String, Breaker>>>,
    /// Commands in flight (or waiting out their backoff), so one made moot
    /// by an operator abort can be withdrawn.
    in_flight: Arc<Mutex<HashMap<CommandId, (u64, CancellationToken)>>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    breaker_settings: BreakerSettings,
    outcomes: mpsc::UnboundedSender<Reported>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Dispatcher {
    /// A dispatcher reporting outcomes on `outcomes`. Tasks are tracked by
    /// `tracker` and abandoned (not reported) when `cancel` fires: their
    /// commands stay in the outbox and are re-sent on the next start.
    pub fn new(
        client: async_nats::Client,
        breaker_settings: BreakerSettings,
        outcomes: mpsc::UnboundedSender<Reported>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Dispatcher {
            client,
            breakers: Arc::default(),
            in_flight: Arc::default(),
            next_id: Arc::default(),
            breaker_settings,
            outcomes,
            tracker,
            cancel,
        }
    }

    /// Sends `entry` in the background. The caller guarantees the state that
    /// implies this command is durable.
    pub fn dispatch(&self, entry: OutboxEntry) {
        let span = info_span!(
            "command",
            saga_id = %entry.saga_id,
            correlation_id = %entry.correlation_id,
            step = %entry.message.step,
            kind = entry.kind.as_str(),
            attempt = entry.message.attempt,
        );
        let this = self.clone();
        let key = (entry.saga_id.clone(), entry.step, entry.kind);
        let withdrawn = self.cancel.child_token();
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut map) = self.in_flight.lock() {
            map.insert(key.clone(), (id, withdrawn.clone()));
        }
        self.tracker.spawn(
            async move {
                let breaker = this.breaker(participant_of(&entry.subject));
                let outcome = tokio::select! {
                    _ = withdrawn.cancelled() => {
                        this.forget(&key, id);
                        return;
                    }
                    outcome = async {
                        // Back off as the step's policy says, and at least until an open breaker may close.
                        let delay = entry.retry.delay_before(entry.message.attempt).max(breaker.remaining_open());
                        // Not even a zero sleep on a first attempt: tokio's timer rounds a
                        // deadline up to its next 1 ms tick, which a saga would pay per step.
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let started = Instant::now();
                        let result = breaker.machine.call(this.call(&entry)).await;
                        let label = match &result {
                            Ok(Reply::Ok { .. }) => "ok",
                            Ok(Reply::Rejected { .. }) => "rejected",
                            Ok(Reply::Error { .. }) | Err(failsafe::Error::Inner(CallError::ErrorReply(_))) => "error",
                            Err(failsafe::Error::Rejected) => "circuit_open",
                            Err(failsafe::Error::Inner(CallError::Unavailable(_))) => "unavailable",
                            Err(failsafe::Error::Inner(CallError::OutcomeUnknown(_))) => "timeout",
                            Err(failsafe::Error::Inner(CallError::Malformed(_))) => "malformed",
                        };
                        let participant = participant_of(&entry.subject).to_string();
                        metrics::histogram!(
                            telemetry::STEP_SECONDS,
                            "participant" => participant.clone(),
                            "action" => entry.message.action.clone(),
                            "outcome" => label,
                        )
                        .record(started.elapsed().as_secs_f64());
                        if entry.message.attempt > 1 {
                            metrics::counter!(telemetry::STEP_RETRIES, "participant" => participant).increment(1);
                        }
                        result
                    } => outcome,
                };
                let outcome = match outcome {
                    Ok(Reply::Ok { data }) => Outcome::Ok(data),
                    Ok(Reply::Rejected { reason }) => Outcome::Rejected(reason),
                    // `call` turns error replies into `CallError::ErrorReply`.
                    Ok(Reply::Error { reason }) => Outcome::NotApplied(format!("error: {reason}")),
                    Err(failsafe::Error::Rejected) => {
                        Outcome::NotApplied(format!("circuit open for {}", participant_of(&entry.subject)))
                    }
                    Err(failsafe::Error::Inner(e @ (CallError::Unavailable(_) | CallError::ErrorReply(_)))) => {
                        Outcome::NotApplied(e.to_string())
                    }
                    Err(failsafe::Error::Inner(e @ (CallError::OutcomeUnknown(_) | CallError::Malformed(_)))) => {
                        Outcome::Transient(e.to_string())
                    }
                };
                debug!(?outcome, "outcome");
                let event = Event::Reply {
                    step: entry.step,
                    kind: entry.kind,
                    attempt: entry.message.attempt,
                    outcome,
                };
                this.forget(&key, id);
                // The runner is gone only during shutdown; the outbox keeps the command.
                let _ = this.outcomes.send(Reported {
                    saga_id: entry.saga_id,
                    event,
                });
            }
            .instrument(span),
        );
    }

    /// Withdraws the command for `saga_id`/`step`/`kind` if it has not been
    /// answered yet (an operator abort settled it). A request already on the
    /// wire may still arrive: participants' tombstones make that harmless.
    pub fn withdraw(&self, saga_id: &str, step: usize, kind: CommandKind) {
        let entry = self
            .in_flight
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&(saga_id.to_string(), step, kind)));
        if let Some((_, token)) = entry {
            token.cancel();
        }
    }

    fn forget(&self, key: &CommandId, id: u64) {
        if let Ok(mut map) = self.in_flight.lock() {
            // Only our own entry: a newer attempt may have replaced it.
            if map.get(key).is_some_and(|(mine, _)| *mine == id) {
                map.remove(key);
            }
        }
    }

    /// The breaker of `participant`, created on first use.
    fn breaker(&self, participant: &str) -> Breaker {
        let mut map = match self.breakers.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(participant.to_string())
            .or_insert_with(|| Breaker::new(participant, self.breaker_settings))
            .clone()
    }

    /// Participants whose breaker is open now.
    pub fn open_breakers(&self) -> Vec<String> {
        let map = match self.breakers.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.iter()
            .filter(|(_, b)| !b.machine.is_call_permitted())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// One request-reply round trip; an `error` reply is a failure for the breaker.
    async fn call(&self, entry: &OutboxEntry) -> Result<Reply, CallError> {
        let body = serde_json::to_vec(&entry.message).map_err(|e| CallError::Malformed(e.to_string()))?;
        let timeout = Duration::from_millis(entry.timeout_ms);
        let request = async_nats::Request::new()
            .payload(body.into())
            .headers(headers(entry))
            .timeout(Some(timeout));
        let msg = match self.client.send_request(entry.subject.clone(), request).await {
            Ok(msg) => msg,
            Err(e) => {
                return Err(match e.kind() {
                    RequestErrorKind::TimedOut => CallError::OutcomeUnknown(timeout),
                    RequestErrorKind::NoResponders => CallError::Unavailable("no responders".into()),
                    RequestErrorKind::InvalidSubject
                    | RequestErrorKind::MaxPayloadExceeded
                    | RequestErrorKind::Other => CallError::Unavailable(e.to_string()),
                })
            }
        };
        match serde_json::from_slice::<Reply>(&msg.payload) {
            Ok(Reply::Error { reason }) => Err(CallError::ErrorReply(reason)),
            Ok(reply) => Ok(reply),
            Err(e) => {
                let body: String = String::from_utf8_lossy(&msg.payload).chars().take(200).collect();
                warn!(error = %e, body, "malformed reply from participant; treated as transient");
                Err(CallError::Malformed(e.to_string()))
            }
        }
    }
}

/// `saga.cmd.<participant>.<action>` → `<participant>`.
fn participant_of(subject: &str) -> &str {
    subject.split('.').nth(2).unwrap_or(subject)
}

/// `X-Correlation-ID` and a W3C `traceparent` whose trace id is the saga id,
/// so every command of one saga shares a trace.
fn headers(entry: &OutboxEntry) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(wire::CORRELATION_HEADER, entry.correlation_id.as_str());
    let trace_id: String = entry.saga_id.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if trace_id.len() == 32 {
        let span_id = uuid::Uuid::new_v4().simple().to_string();
        h.insert(
            wire::TRACEPARENT_HEADER,
            format!("00-{trace_id}-{}-01", &span_id[..16]).as_str(),
        );
    }
    h
}
