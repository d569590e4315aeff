//! The saga state machine: data plus one pure function, [`transition`].
//!
//! `transition(saga, event, now)` returns the next saga, the history entries
//! that explain the change and the commands the coordinator must send once
//! (and only once) the new state is durable. No I/O, no clock reads, no
//! randomness here: time comes in as `now_ms`, retry delays are computed by
//! the dispatcher from the step's [`RetryPolicy`].
//!
//! Life cycle (docs/overview.md, ARCHITECTURE.md "States"): `PENDING → RUNNING(i) → COMPLETED`; on a business
//! rejection, or a step's retries exhausted, `→ COMPENSATING` walking back,
//! newest first, over every step that succeeded or whose outcome is unknown,
//! `→ COMPENSATED`; a compensation refused or out of retries `→ FAILED`.
//! Replies that do not match the command in flight (late, duplicate, stale
//! attempt) and any event on a terminal saga are explicit no-ops.

use saga_wire::{self as wire, CommandKind, OrderPayload};
use serde::{Deserialize, Serialize};

pub use crate::definition::EventKind;
use crate::definition::{InputValue, OnFailure, RetryPolicy, SagaDefinition, StepDefinition, StepKind};

/// Where a saga is in its life cycle. Indices point into the definition's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SagaState {
    /// Created and durable; no command sent yet.
    Pending,
    /// Running the forward action of `step`.
    Running {
        /// Index of the step in flight.
        step: usize,
    },
    /// Running the compensation of `step`.
    Compensating {
        /// Index of the step being undone.
        step: usize,
    },
    /// Every step succeeded.
    Completed,
    /// Every effect that existed (or may have) was undone.
    Compensated,
    /// A compensation could not be done; needs an operator.
    Failed {
        /// Index of the step whose compensation failed.
        step: usize,
    },
}

impl SagaState {
    /// No further event changes a terminal saga (until an operator acts on a FAILED one).
    pub fn is_terminal(self) -> bool {
        match self {
            SagaState::Completed | SagaState::Compensated | SagaState::Failed { .. } => true,
            SagaState::Pending | SagaState::Running { .. } | SagaState::Compensating { .. } => false,
        }
    }

    /// Stable one-byte tag, used by the store's state index.
    pub fn tag(self) -> StateTag {
        match self {
            SagaState::Pending => StateTag::Pending,
            SagaState::Running { .. } => StateTag::Running,
            SagaState::Compensating { .. } => StateTag::Compensating,
            SagaState::Completed => StateTag::Completed,
            SagaState::Compensated => StateTag::Compensated,
            SagaState::Failed { .. } => StateTag::Failed,
        }
    }

    /// Index of the step in flight (or failed), if any.
    pub fn current_step(self) -> Option<usize> {
        match self {
            SagaState::Running { step } | SagaState::Compensating { step } | SagaState::Failed { step } => {
                Some(step)
            }
            SagaState::Pending | SagaState::Completed | SagaState::Compensated => None,
        }
    }
}

/// A [`SagaState`] without its data: what indexes and filters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum StateTag {
    /// See [`SagaState::Pending`].
    Pending = 1,
    /// See [`SagaState::Running`].
    Running = 2,
    /// See [`SagaState::Compensating`].
    Compensating = 3,
    /// See [`SagaState::Completed`].
    Completed = 4,
    /// See [`SagaState::Compensated`].
    Compensated = 5,
    /// See [`SagaState::Failed`].
    Failed = 6,
}

impl StateTag {
    /// Every tag, in life-cycle order.
    pub const ALL: [StateTag; 6] = [
        StateTag::Pending,
        StateTag::Running,
        StateTag::Compensating,
        StateTag::Completed,
        StateTag::Compensated,
        StateTag::Failed,
    ];

    /// The tag of a stored byte.
    pub fn from_byte(b: u8) -> Option<StateTag> {
        StateTag::ALL.into_iter().find(|t| *t as u8 == b)
    }

    /// Whether sagas in this state are terminal.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StateTag::Completed | StateTag::Compensated | StateTag::Failed
        )
    }

    /// Upper-case name as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            StateTag::Pending => "PENDING",
            StateTag::Running => "RUNNING",
            StateTag::Compensating => "COMPENSATING",
            StateTag::Completed => "COMPLETED",
            StateTag::Compensated => "COMPENSATED",
            StateTag::Failed => "FAILED",
        }
    }
}

/// Progress of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached.
    Pending,
    /// Forward command in flight.
    Running,
    /// Forward action done.
    Succeeded,
    /// Participant said no; no effect.
    Rejected,
    /// Retries exhausted without a definite answer; the effect may exist.
    Unknown,
    /// Compensation in flight.
    Compensating,
    /// Compensation done.
    Compensated,
    /// Compensation refused or out of retries.
    CompensationFailed,
    /// Retries exhausted, and no attempt can have had an effect (none was
    /// delivered, or the participant answered `error`): nothing to undo.
    /// Also an `await` that timed out or was cut short.
    Failed,
    /// An `await` step waiting for its signal.
    Waiting,
    /// A `sleep` step waiting for its timer.
    Sleeping,
    /// Not run: its `when:` condition was false.
    Skipped,
}

impl StepStatus {
    /// Whether the step has not ended yet (a command, a wait or a sleep in flight).
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            StepStatus::Running | StepStatus::Waiting | StepStatus::Sleeping
        )
    }
}

/// What is known of one step of one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepProgress {
    /// Status of the step.
    pub status: StepStatus,
    /// Forward attempts made.
    pub attempts: u32,
    /// Compensation attempts made.
    pub compensation_attempts: u32,
    /// Whether some forward attempt may have reached the participant without
    /// a definite answer (timeout, unreadable reply).
    #[serde(default)]
    pub maybe_applied: bool,
    /// Last outcome, for operators ("ok", "rejected: …", "timeout", …).
    pub last_outcome: Option<String>,
    /// `data` of the participant's `ok` reply to the forward action.
    pub output: Option<serde_json::Value>,
    /// When the forward action was first sent.
    pub started_at_ms: Option<u64>,
    /// When the step reached its last status.
    pub finished_at_ms: Option<u64>,
    /// When a waiting or sleeping step's timer fires (its timeout, its wake-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at_ms: Option<u64>,
    /// The id of the signal an `await` step consumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_id: Option<String>,
}

impl StepProgress {
    fn new() -> Self {
        StepProgress {
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            maybe_applied: false,
            last_outcome: None,
            output: None,
            started_at_ms: None,
            finished_at_ms: None,
            due_at_ms: None,
            signal_id: None,
        }
    }
}

/// A signal that arrived before its `await` step was reached, kept until it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceivedSignal {
    /// Signal name.
    pub name: String,
    /// The sender's id for it (a repeat with the same id is a no-op).
    pub id: String,
    /// Its payload, the await step's output once consumed.
    pub payload: serde_json::Value,
    /// When it arrived.
    pub at_ms: u64,
}

/// One saga: its definition snapshot, its order and its progress.
///
/// The definition is stored with the saga so a saga finishes with the
/// version it started with, even after that version is unloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saga {
    /// UUID v7 (time-ordered) as text.
    pub id: String,
    /// Snapshot of the definition the saga runs (shared: cloning a saga at
    /// every transition must not copy its definition).
    pub definition: std::sync::Arc<SagaDefinition>,
    /// The order.
    pub order: OrderPayload,
    /// Correlation id carried in logs and NATS headers.
    pub correlation_id: String,
    /// Client idempotency key of `CreateOrder`, if given.
    pub idempotency_key: Option<String>,
    /// Life-cycle state.
    pub state: SagaState,
    /// One entry per definition step.
    pub steps: Vec<StepProgress>,
    /// Why the saga compensated or failed.
    pub reason: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Last transition time.
    pub updated_at_ms: u64,
    /// Sequence number of the last history entry.
    pub seq: u64,
    /// When the definition's `deadline` passes (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at_ms: Option<u64>,
    /// Signals received before their step waits (one per name at most).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<ReceivedSignal>,
}

/// Something that happened to a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Send the first step (PENDING → RUNNING).
    Start,
    /// A participant answered (or failed to) the command for `step`/`kind`/`attempt`.
    Reply {
        /// Step index.
        step: usize,
        /// Forward or compensate.
        kind: CommandKind,
        /// Attempt the outcome belongs to.
        attempt: u32,
        /// What came back.
        outcome: Outcome,
    },
    /// Operator: stop a running saga and compensate what it did (RUNNING →
    /// COMPENSATING; PENDING → COMPENSATED). The step in flight counts as
    /// unknown and is compensated too.
    Abort {
        /// Why, for the history and the saga's reason.
        reason: String,
    },
    /// Operator: resume the compensation of a FAILED saga, from the step
    /// that failed, with fresh attempts (FAILED → COMPENSATING).
    Retry,
    /// A signal for an `await` step ([`check_signal`] says what it will do).
    Signal {
        /// Signal name.
        name: String,
        /// Sender's id for idempotency.
        id: String,
        /// Payload (the await step's output).
        payload: serde_json::Value,
    },
    /// A durable timer of the saga came due ([`timers`]).
    Timer(Timer),
}

/// Most bytes (as JSON) of the payloads a saga keeps for steps not reached
/// yet: each kept signal rewrites the saga's record whole.
pub const MAX_KEPT_SIGNAL_BYTES: usize = 64 * 1024;

/// A timer a saga has pending, derived from its state: the runner arms what
/// [`timers`] lists after every transition and at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// The definition's `deadline`.
    Deadline,
    /// Step `step`'s: an await's timeout or a sleep's wake-up.
    Step {
        /// Step index.
        step: usize,
    },
}

/// The saga's pending timers with their due times (ms since the Unix epoch).
pub fn timers(saga: &Saga) -> Vec<(u64, Timer)> {
    let mut out = Vec::new();
    if let (Some(due), SagaState::Pending | SagaState::Running { .. }) = (saga.deadline_at_ms, saga.state) {
        out.push((due, Timer::Deadline));
    }
    if let SagaState::Running { step: g } = saga.state {
        for k in saga.definition.group(g) {
            let p = &saga.steps[k];
            if let (Some(due), StepStatus::Waiting | StepStatus::Sleeping) = (p.due_at_ms, p.status) {
                out.push((due, Timer::Step { step: k }));
            }
        }
    }
    out
}

/// What a signal will do to a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalFate {
    /// Its step waits: the step succeeds with the payload.
    Consumed,
    /// Its step is not reached yet: kept until it is.
    Kept,
    /// The same signal id was already taken: nothing changes.
    Duplicate,
}

/// Why a signal is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "refused", rename_all = "snake_case")]
pub enum SignalRefused {
    /// The saga has ended.
    #[error("saga is {}; it takes no signal", .state.as_str())]
    Finished {
        /// Its state.
        state: StateTag,
    },
    /// No `await` step of the definition waits for this name.
    #[error("no step of {definition} awaits signal `{name}` (awaited: {awaited})")]
    UnknownName {
        /// The signal name given.
        name: String,
        /// `name@version`.
        definition: String,
        /// The names it awaits, comma-separated (or "none").
        awaited: String,
    },
    /// The step already took, or holds, another signal of this name.
    #[error("signal `{name}` was already received with id `{id}`")]
    AlreadyReceived {
        /// Signal name.
        name: String,
        /// Id of the signal taken.
        id: String,
    },
    /// The await is over (timed out, cut short) or the saga is undoing its steps.
    #[error("step `{step}` no longer waits for `{name}` (it is {status})")]
    NotWaiting {
        /// Signal name.
        name: String,
        /// Step name.
        step: String,
        /// Its status, or the saga's state.
        status: String,
    },
    /// Keeping it would pass [`MAX_KEPT_SIGNAL_BYTES`] for the saga.
    #[error("the saga already keeps {kept} bytes of signals for steps not reached; at most {limit}")]
    TooMuchKept {
        /// Bytes kept now.
        kept: usize,
        /// The bound.
        limit: usize,
    },
    /// The payload does not match the step's `output_schema`.
    #[error("payload: {reason}")]
    Payload {
        /// What does not match.
        reason: String,
    },
}

impl SignalFate {
    /// `consumed`, `kept` or `duplicate`.
    pub fn as_str(self) -> &'static str {
        match self {
            SignalFate::Consumed => "consumed",
            SignalFate::Kept => "kept",
            SignalFate::Duplicate => "duplicate",
        }
    }
}

/// What a signal `name`/`id` with `payload` would do to `saga`, or why it is refused.
///
/// # Errors
/// [`SignalRefused`] for a signal that must change nothing.
pub fn check_signal(
    saga: &Saga,
    name: &str,
    id: &str,
    payload: &serde_json::Value,
) -> Result<SignalFate, SignalRefused> {
    let def = &saga.definition;
    let Some(k) = def.await_step(name) else {
        let awaited: Vec<&str> = def.steps.iter().filter_map(|s| s.awaits()).collect();
        return Err(SignalRefused::UnknownName {
            name: name.to_string(),
            definition: def.id(),
            awaited: if awaited.is_empty() {
                "none".into()
            } else {
                awaited.join(", ")
            },
        });
    };
    let p = &saga.steps[k];
    let held = saga
        .signals
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.id.as_str());
    if let Some(taken) = p.signal_id.as_deref().or(held) {
        return if taken == id {
            Ok(SignalFate::Duplicate)
        } else {
            Err(SignalRefused::AlreadyReceived {
                name: name.to_string(),
                id: taken.to_string(),
            })
        };
    }
    if saga.state.is_terminal() {
        return Err(SignalRefused::Finished {
            state: saga.state.tag(),
        });
    }
    let not_waiting = |status: String| SignalRefused::NotWaiting {
        name: name.to_string(),
        step: def.steps[k].name.clone(),
        status,
    };
    let fate = match (saga.state, p.status) {
        (SagaState::Running { .. }, StepStatus::Waiting) => SignalFate::Consumed,
        (SagaState::Pending | SagaState::Running { .. }, StepStatus::Pending) => SignalFate::Kept,
        (SagaState::Compensating { .. }, _) => return Err(not_waiting("compensating".into())),
        (_, status) => return Err(not_waiting(format!("{status:?}").to_lowercase())),
    };
    def.check_output(k, payload)
        .map_err(|reason| SignalRefused::Payload { reason })?;
    if fate == SignalFate::Kept {
        let size = |v: &serde_json::Value| serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        let kept: usize = saga.signals.iter().map(|s| size(&s.payload)).sum();
        if kept.saturating_add(size(payload)) > MAX_KEPT_SIGNAL_BYTES {
            return Err(SignalRefused::TooMuchKept {
                kept,
                limit: MAX_KEPT_SIGNAL_BYTES,
            });
        }
    }
    Ok(fate)
}

/// A command's outcome as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The participant did it.
    Ok(serde_json::Value),
    /// Business "no": no effect; do not retry.
    Rejected(String),
    /// Sent but no definite answer (timeout, malformed reply): the effect
    /// may exist. Retry with the same idempotency key while attempts remain.
    Transient(String),
    /// Definitely without effect: no responders, or an `error` reply (a
    /// participant records nothing when it answers `error`). Retried the same way.
    NotApplied(String),
}

/// A command to send after the transition is durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Step index.
    pub step: usize,
    /// Forward or compensate.
    pub kind: CommandKind,
    /// NATS subject.
    pub subject: String,
    /// The JSON envelope.
    pub message: wire::Command,
    /// Per-attempt request timeout.
    pub timeout_ms: u64,
    /// Backoff policy; the dispatcher waits `retry.delay_before(attempt)` first.
    pub retry: RetryPolicy,
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// 1-based, contiguous per saga.
    pub seq: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// Step name, when the entry is about a step.
    pub step: Option<String>,
    /// Attempt, when the entry is about one.
    pub attempt: Option<u32>,
    /// Free text: reason, outcome.
    pub detail: Option<String>,
    /// State after the entry.
    pub state: StateTag,
}

/// The result of an event that changed the saga.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The saga after the event.
    pub saga: Saga,
    /// New history entries, in order.
    pub history: Vec<HistoryEntry>,
    /// Commands to send once `saga` and `history` are durable.
    pub commands: Vec<Command>,
    /// The commands whose outcome this event recorded or made moot (their
    /// outbox entries are done).
    pub settled: Vec<(usize, CommandKind)>,
}

/// An event that cannot happen in the saga's state: a bug or corrupt data, never input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The event names a step the definition does not have.
    #[error("saga {saga_id}: step index {step} out of range ({len} steps); stored data is corrupt")]
    NoSuchStep {
        /// Saga.
        saga_id: String,
        /// Index given.
        step: usize,
        /// Steps in the definition.
        len: usize,
    },
    /// A reply before the saga was started.
    #[error("saga {saga_id}: {event} while {state}")]
    Unexpected {
        /// Saga.
        saga_id: String,
        /// The event, described.
        event: String,
        /// The state, described.
        state: &'static str,
    },
}

/// A new saga in PENDING, with its `created` history entry.
pub fn create(
    id: String,
    definition: std::sync::Arc<SagaDefinition>,
    order: OrderPayload,
    correlation_id: String,
    idempotency_key: Option<String>,
    now_ms: u64,
) -> Transition {
    let steps = vec![StepProgress::new(); definition.steps.len()];
    let deadline_at_ms = definition
        .deadline
        .map(|d| now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    let mut saga = Saga {
        id,
        definition,
        order,
        correlation_id,
        idempotency_key,
        state: SagaState::Pending,
        steps,
        reason: None,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        seq: 0,
        deadline_at_ms,
        signals: Vec::new(),
    };
    let mut b = Builder::new(now_ms);
    let detail = format!("definition {}", saga.definition.id());
    b.log(&mut saga, EventKind::Created, None, None, Some(detail));
    b.finish(saga, Vec::new())
}

/// Applies `event` to `saga` at `now_ms`.
///
/// Returns `Ok(None)` for events that change nothing: a reply that does not
/// match the command in flight (late, duplicated or superseded attempt), a
/// repeated `Start`, anything on a terminal saga.
///
/// # Errors
/// [`TransitionError`] for an event that cannot happen in this state or names
/// a step that does not exist: a bug or corrupt data.
pub fn transition(saga: &Saga, event: &Event, now_ms: u64) -> Result<Option<Transition>, TransitionError> {
    if let Event::Reply { step, .. } | Event::Timer(Timer::Step { step }) = event {
        if *step >= saga.steps.len() || *step >= saga.definition.steps.len() {
            return Err(TransitionError::NoSuchStep {
                saga_id: saga.id.clone(),
                step: *step,
                len: saga.definition.steps.len(),
            });
        }
    }
    let mut s = saga.clone();
    let mut b = Builder::new(now_ms);
    let def = &saga.definition;
    match (saga.state, event) {
        (SagaState::Pending, Event::Start) => {
            b.run_group(&mut s, 0);
            b.log(&mut s, EventKind::Started, None, None, None);
            Ok(Some(b.finish(s, Vec::new())))
        }
        (SagaState::Pending, Event::Reply { step, kind, .. }) => Err(TransitionError::Unexpected {
            saga_id: saga.id.clone(),
            event: format!("reply for step {step} ({})", kind.as_str()),
            state: "PENDING",
        }),
        (
            SagaState::Running { .. }
            | SagaState::Compensating { .. }
            | SagaState::Completed
            | SagaState::Compensated
            | SagaState::Failed { .. },
            Event::Start,
        ) => Ok(None),
        (
            SagaState::Running { step: group },
            Event::Reply {
                step,
                kind,
                attempt,
                outcome,
            },
        ) => {
            // Only the reply to a forward command of this group still in flight, for its current attempt.
            let p = &saga.steps[*step];
            if *kind != CommandKind::Forward
                || def.group_of(*step) != group
                || p.status != StepStatus::Running
                || *attempt != p.attempts
            {
                return Ok(None);
            }
            b.forward_outcome(&mut s, *step, *attempt, outcome);
            Ok(Some(b.finish(s, vec![(*step, CommandKind::Forward)])))
        }
        (
            SagaState::Compensating { step: group },
            Event::Reply {
                step,
                kind,
                attempt,
                outcome,
            },
        ) => {
            let p = &saga.steps[*step];
            if *kind != CommandKind::Compensate
                || def.group_of(*step) != group
                || p.status != StepStatus::Compensating
                || *attempt != p.compensation_attempts
            {
                return Ok(None);
            }
            b.compensation_outcome(&mut s, *step, *attempt, outcome);
            Ok(Some(b.finish(s, vec![(*step, CommandKind::Compensate)])))
        }
        (SagaState::Completed | SagaState::Compensated | SagaState::Failed { .. }, Event::Reply { .. }) => {
            Ok(None)
        }
        (SagaState::Pending | SagaState::Running { .. }, Event::Abort { reason }) => Ok(Some(b.stop(
            s,
            EventKind::Aborted,
            format!("aborted: {reason}"),
            reason.clone(),
        ))),
        (
            SagaState::Compensating { .. }
            | SagaState::Completed
            | SagaState::Compensated
            | SagaState::Failed { .. },
            Event::Abort { .. },
        ) => Ok(None),
        (SagaState::Failed { step }, Event::Retry) => {
            // Every compensation of the group that failed gets fresh attempts.
            let group = def.group_of(step);
            s.state = SagaState::Compensating { step: group };
            b.log(&mut s, EventKind::Retried, Some(step), None, None);
            for k in def.group(group) {
                if s.steps[k].status == StepStatus::CompensationFailed {
                    let p = &mut s.steps[k];
                    p.status = StepStatus::Compensating;
                    p.compensation_attempts = 1;
                    p.finished_at_ms = None;
                    b.send(&s, k, CommandKind::Compensate, 1);
                }
            }
            Ok(Some(b.finish(s, Vec::new())))
        }
        (
            SagaState::Pending
            | SagaState::Running { .. }
            | SagaState::Compensating { .. }
            | SagaState::Completed
            | SagaState::Compensated,
            Event::Retry,
        ) => Ok(None),
        (_, Event::Signal { name, id, payload }) => {
            match check_signal(saga, name, id, payload) {
                Ok(SignalFate::Consumed) => {
                    let Some(k) = def.await_step(name) else {
                        return Ok(None);
                    };
                    b.signal_consumed(&mut s, k, id, payload.clone(), None);
                    b.settle_group(&mut s, def.group_of(k));
                }
                Ok(SignalFate::Kept) => {
                    s.signals.push(ReceivedSignal {
                        name: name.clone(),
                        id: id.clone(),
                        payload: payload.clone(),
                        at_ms: now_ms,
                    });
                    let step = def.await_step(name);
                    b.log(
                        &mut s,
                        EventKind::SignalReceived,
                        step,
                        None,
                        Some(format!("signal {name} (id {id}), kept until the step waits")),
                    );
                }
                Ok(SignalFate::Duplicate) | Err(_) => return Ok(None),
            }
            Ok(Some(b.finish(s, Vec::new())))
        }
        (SagaState::Pending | SagaState::Running { .. }, Event::Timer(Timer::Deadline)) => {
            match saga.deadline_at_ms {
                Some(due) if now_ms >= due => {}
                _ => return Ok(None),
            }
            let after = def
                .deadline
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_default();
            let reason = format!("deadline passed ({after} after creation)");
            Ok(Some(b.stop(s, EventKind::DeadlinePassed, reason.clone(), reason)))
        }
        (SagaState::Running { step: group }, Event::Timer(Timer::Step { step })) => {
            let k = *step;
            let p = &saga.steps[k];
            let due = p.due_at_ms.is_some_and(|due| now_ms >= due);
            if def.group_of(k) != group || !due {
                return Ok(None);
            }
            match p.status {
                StepStatus::Sleeping => {
                    let p = &mut s.steps[k];
                    p.status = StepStatus::Succeeded;
                    p.last_outcome = Some("slept".into());
                    p.finished_at_ms = Some(now_ms);
                    p.due_at_ms = None;
                    let slept = humantime::format_duration(def.steps[k].timeout).to_string();
                    b.log(
                        &mut s,
                        EventKind::StepSucceeded,
                        Some(k),
                        None,
                        Some(format!("slept {slept}")),
                    );
                }
                StepStatus::Waiting => {
                    let waited = humantime::format_duration(def.steps[k].timeout).to_string();
                    let signal = def.steps[k].awaits().unwrap_or_default().to_string();
                    let why = format!("no signal {signal} within {waited}");
                    b.wait_failed(&mut s, k, why);
                }
                _ => return Ok(None),
            }
            b.settle_group(&mut s, group);
            Ok(Some(b.finish(s, Vec::new())))
        }
        (_, Event::Timer(_)) => Ok(None),
    }
}

/// The value of `path` inside `value` (`null` when absent).
fn lookup(value: &serde_json::Value, path: &[String]) -> serde_json::Value {
    let mut v = value;
    for key in path {
        v = match v {
            serde_json::Value::Object(m) => match m.get(key) {
                Some(x) => x,
                None => return serde_json::Value::Null,
            },
            serde_json::Value::Array(a) => match key.parse::<usize>().ok().and_then(|i| a.get(i)) {
                Some(x) => x,
                None => return serde_json::Value::Null,
            },
            _ => return serde_json::Value::Null,
        };
    }
    v.clone()
}

/// The command of attempt `attempt` of step `i` in direction `kind`, carrying
/// `input` (what [`step_input`] resolved when it was sent); `None` when the
/// definition has no step `i`. It reads only what a saga fixes at creation
/// (id, definition, order), so a store may keep `(step, kind, attempt,
/// input)` alone and build the same command again when it reads it back.
pub fn command(
    saga: &Saga,
    i: usize,
    kind: CommandKind,
    attempt: u32,
    input: serde_json::Value,
) -> Option<Command> {
    let def = saga.definition.steps.get(i)?;
    Some(step_command(saga, def, i, kind, attempt, input))
}

/// [`command`] for step `i`, whose definition is `def`.
fn step_command(
    saga: &Saga,
    def: &StepDefinition,
    i: usize,
    kind: CommandKind,
    attempt: u32,
    input: serde_json::Value,
) -> Command {
    let action = match kind {
        CommandKind::Forward => def.action.clone(),
        // Only reached for steps that have a compensation (see `compensate_from`).
        CommandKind::Compensate => def.compensation.clone().unwrap_or_default(),
    };
    Command {
        step: i,
        kind,
        subject: wire::command_subject(&def.participant, &action),
        message: wire::Command {
            saga_id: saga.id.clone(),
            definition: saga.definition.id(),
            step: def.name.clone(),
            action,
            kind,
            attempt,
            idempotency_key: wire::idempotency_key(&saga.id, &def.name, kind),
            payload: saga.order.clone(),
            input,
        },
        timeout_ms: u64::try_from(def.timeout.as_millis()).unwrap_or(u64::MAX),
        retry: def.retry,
    }
}

/// The `input` that step `k`'s command of `kind` carries, `null` when the step
/// declares none (`None`: no such step). It is resolved from the order and the
/// outputs of earlier steps, which never change once recorded, so a view computes
/// the same value the command was sent with.
pub fn step_input(saga: &Saga, k: usize, kind: CommandKind) -> Option<serde_json::Value> {
    let def = saga.definition.steps.get(k)?;
    Some(match kind {
        CommandKind::Forward => resolve_input(saga, &def.input),
        CommandKind::Compensate => resolve_input(saga, &def.compensation_input),
    })
}

/// A step's `input` / `compensation_input` with its references resolved
/// against the saga (`null` when there is none).
fn resolve_input(saga: &Saga, input: &std::collections::BTreeMap<String, InputValue>) -> serde_json::Value {
    if input.is_empty() {
        return serde_json::Value::Null;
    }
    let order = serde_json::to_value(&saga.order).unwrap_or_default();
    let resolved = input
        .iter()
        .map(|(k, v)| {
            let value = match v {
                InputValue::Literal { value } => serde_json::Value::String(value.clone()),
                InputValue::Order { path } => lookup(&order, path),
                InputValue::StepOutput { step, path } => saga
                    .steps
                    .get(*step)
                    .and_then(|p| p.output.as_ref())
                    .map(|out| lookup(out, path))
                    .unwrap_or_default(),
            };
            (k.clone(), value)
        })
        .collect();
    serde_json::Value::Object(resolved)
}

/// Accumulates history and commands while one event is applied.
struct Builder {
    now_ms: u64,
    history: Vec<HistoryEntry>,
    commands: Vec<Command>,
}

impl Builder {
    fn new(now_ms: u64) -> Self {
        Builder {
            now_ms,
            history: Vec::new(),
            commands: Vec::new(),
        }
    }

    /// An abort or the deadline: a PENDING saga ends COMPENSATED; a RUNNING
    /// one compensates, its commands in flight counted as unknown (they may
    /// have been applied) and its waits and sleeps cut short (nothing to undo).
    fn stop(mut self, mut saga: Saga, kind: EventKind, reason: String, detail: String) -> Transition {
        saga.reason = Some(reason);
        let SagaState::Running { step: group } = saga.state else {
            self.log(&mut saga, kind, None, None, Some(detail));
            self.compensate_from(&mut saga, None);
            return self.finish(saga, Vec::new());
        };
        let mut settled = Vec::new();
        let members = saga.definition.group(group);
        for k in members.clone() {
            let p = &mut saga.steps[k];
            match p.status {
                StepStatus::Running => {
                    p.status = StepStatus::Unknown;
                    p.last_outcome = Some(match kind {
                        EventKind::DeadlinePassed => "deadline passed while in flight".into(),
                        _ => "aborted while in flight".into(),
                    });
                    settled.push((k, CommandKind::Forward));
                }
                StepStatus::Waiting | StepStatus::Sleeping => {
                    cut_short(p, "cut short", self.now_ms);
                    continue;
                }
                _ => continue,
            }
            p.finished_at_ms = Some(self.now_ms);
        }
        let about = (settled.len() == 1).then(|| settled[0].0);
        self.log(&mut saga, kind, about, None, Some(detail));
        self.begin_compensation(&mut saga, members.end.checked_sub(1));
        self.finish(saga, settled)
    }

    /// Evaluates step `i`'s `when:`. False: the step is SKIPPED (a signal
    /// kept for it is dropped); an evaluation error: the step FAILED without
    /// effect, its `on_failure` deciding what follows. Either way it is not run.
    fn condition_holds(&mut self, saga: &mut Saga, i: usize, when: &crate::condition::Condition) -> bool {
        let order = serde_json::to_value(&saga.order).unwrap_or_default();
        let outputs: std::collections::BTreeMap<String, serde_json::Value> = saga
            .definition
            .steps
            .iter()
            .zip(&saga.steps)
            .filter_map(|(d, p)| p.output.clone().map(|o| (d.name.clone(), o)))
            .collect();
        let now = self.now_ms;
        let verdict = when.eval(&order, &outputs);
        if verdict != Ok(true) {
            // Not run: a signal kept for it would never be taken.
            if let Some(signal) = saga.definition.steps[i].awaits() {
                saga.signals.retain(|s| s.name != signal);
            }
        }
        match verdict {
            Ok(true) => true,
            Ok(false) => {
                let p = &mut saga.steps[i];
                p.status = StepStatus::Skipped;
                p.last_outcome = Some("skipped".into());
                p.finished_at_ms = Some(now);
                let detail = format!("when: {} is false", when.source());
                self.log(saga, EventKind::StepSkipped, Some(i), None, Some(detail));
                false
            }
            Err(e) => {
                let why = format!("when: {} cannot be evaluated: {e}", when.source());
                saga.steps[i].started_at_ms = Some(now);
                self.wait_failed(saga, i, why);
                false
            }
        }
    }

    /// Await step `k` takes its signal: it succeeds with the payload as output.
    fn signal_consumed(
        &mut self,
        saga: &mut Saga,
        k: usize,
        id: &str,
        payload: serde_json::Value,
        received_at: Option<u64>,
    ) {
        let name = saga.definition.steps[k].awaits().unwrap_or_default().to_string();
        let p = &mut saga.steps[k];
        p.status = StepStatus::Succeeded;
        p.last_outcome = Some("signalled".into());
        p.output = Some(payload);
        p.signal_id = Some(id.to_string());
        p.due_at_ms = None;
        p.started_at_ms.get_or_insert(self.now_ms);
        p.finished_at_ms = Some(self.now_ms);
        let detail = match received_at {
            Some(_) => format!("signal {name} (id {id}), received before the step"),
            None => format!("signal {name} (id {id})"),
        };
        self.log(saga, EventKind::StepSucceeded, Some(k), None, Some(detail));
    }

    /// Step `k` ends without effect before sending anything (an await timed
    /// out, a `when:` that cannot be evaluated): nothing to undo; the saga
    /// goes on or compensates as its `on_failure` says.
    fn wait_failed(&mut self, saga: &mut Saga, k: usize, why: String) {
        let continuing = saga.definition.steps[k].on_failure == OnFailure::Continue;
        let name = saga.definition.steps[k].name.clone();
        let p = &mut saga.steps[k];
        p.status = StepStatus::Failed;
        p.last_outcome = Some(why.clone());
        p.due_at_ms = None;
        p.finished_at_ms = Some(self.now_ms);
        let detail = if continuing {
            format!("{why} (on_failure: continue)")
        } else {
            Self::set_reason(saga, format!("step {name}: {why}"));
            why
        };
        self.log(saga, EventKind::StepFailed, Some(k), None, Some(detail));
    }

    fn finish(self, mut saga: Saga, settled: Vec<(usize, CommandKind)>) -> Transition {
        saga.updated_at_ms = self.now_ms;
        Transition {
            saga,
            history: self.history,
            commands: self.commands,
            settled,
        }
    }

    fn log(
        &mut self,
        saga: &mut Saga,
        kind: EventKind,
        step: Option<usize>,
        attempt: Option<u32>,
        detail: Option<String>,
    ) {
        saga.seq += 1;
        self.history.push(HistoryEntry {
            seq: saga.seq,
            at_ms: self.now_ms,
            kind,
            step: step
                .and_then(|i| saga.definition.steps.get(i))
                .map(|d| d.name.clone()),
            attempt,
            detail,
            state: saga.state.tag(),
        });
    }

    /// RUNNING(g): the first attempt of every command step of the group
    /// starting at `g`, its waits and sleeps begun (an await whose signal came
    /// early takes it at once); a group with nothing left in flight settles.
    fn run_group(&mut self, saga: &mut Saga, g: usize) {
        saga.state = SagaState::Running { step: g };
        let def = saga.definition.clone();
        for i in def.group(g) {
            let step = &def.steps[i];
            if let Some(when) = &step.when {
                if !self.condition_holds(saga, i, when) {
                    continue;
                }
            }
            let wait = u64::try_from(step.timeout.as_millis()).unwrap_or(u64::MAX);
            let p = &mut saga.steps[i];
            p.started_at_ms = Some(self.now_ms);
            match &step.kind {
                StepKind::Command => {
                    p.status = StepStatus::Running;
                    p.attempts = 1;
                    self.send(saga, i, CommandKind::Forward, 1);
                }
                StepKind::Await { signal } => {
                    if let Some(at) = saga.signals.iter().position(|s| &s.name == signal) {
                        let early = saga.signals.remove(at);
                        self.signal_consumed(saga, i, &early.id, early.payload, Some(early.at_ms));
                        continue;
                    }
                    p.status = StepStatus::Waiting;
                    p.due_at_ms = Some(self.now_ms.saturating_add(wait));
                    let detail = format!(
                        "signal {signal}, timeout {}",
                        humantime::format_duration(step.timeout)
                    );
                    self.log(saga, EventKind::StepWaiting, Some(i), None, Some(detail));
                }
                StepKind::Sleep { duration } => {
                    p.status = StepStatus::Sleeping;
                    p.due_at_ms = Some(self.now_ms.saturating_add(wait));
                    let detail = format!("for {}", humantime::format_duration(*duration));
                    self.log(saga, EventKind::StepSleeping, Some(i), None, Some(detail));
                }
            }
        }
        if !def.group(g).any(|k| saga.steps[k].status.in_flight()) {
            self.settle_group(saga, g);
        }
    }

    fn send(&mut self, saga: &Saga, i: usize, kind: CommandKind, attempt: u32) {
        let input = step_input(saga, i, kind).unwrap_or_default();
        let c = step_command(saga, &saga.definition.steps[i], i, kind, attempt, input);
        self.commands.push(c);
    }

    /// Whether step `k` failed in a way that stops the saga (not `on_failure: continue`).
    fn stops(saga: &Saga, k: usize) -> bool {
        matches!(
            saga.steps[k].status,
            StepStatus::Rejected | StepStatus::Failed | StepStatus::Unknown
        ) && saga.definition.steps[k].on_failure != OnFailure::Continue
    }

    fn set_reason(saga: &mut Saga, reason: String) {
        // The first failure of a group explains the saga; later ones are in the history.
        if saga.reason.is_none() {
            saga.reason = Some(reason);
        }
    }

    fn forward_outcome(&mut self, saga: &mut Saga, i: usize, attempt: u32, outcome: &Outcome) {
        let now = self.now_ms;
        let g = saga.definition.group_of(i);
        let step_name = saga.definition.steps[i].name.clone();
        let on_failure = saga.definition.steps[i].on_failure;
        let continuing = on_failure == OnFailure::Continue;
        match outcome {
            Outcome::Ok(data) => {
                let p = &mut saga.steps[i];
                p.status = StepStatus::Succeeded;
                p.last_outcome = Some("ok".into());
                p.output = Some(data.clone());
                p.finished_at_ms = Some(now);
                self.log(saga, EventKind::StepSucceeded, Some(i), Some(attempt), None);
            }
            Outcome::Rejected(reason) => {
                let p = &mut saga.steps[i];
                p.status = StepStatus::Rejected;
                p.last_outcome = Some(format!("rejected: {reason}"));
                p.finished_at_ms = Some(now);
                let detail = if continuing {
                    format!("{reason} (on_failure: continue)")
                } else {
                    Self::set_reason(saga, format!("step {step_name} rejected: {reason}"));
                    reason.clone()
                };
                self.log(
                    saga,
                    EventKind::StepRejected,
                    Some(i),
                    Some(attempt),
                    Some(detail),
                );
            }
            Outcome::Transient(reason) | Outcome::NotApplied(reason) => {
                let max = saga.definition.steps[i].retry.max_attempts;
                // Once a sibling of the group failed, nothing more is retried
                // forward: the group will be compensated anyway.
                let group_failing = saga.definition.group(g).any(|k| k != i && Self::stops(saga, k));
                let may_retry = !group_failing && (attempt < max || on_failure == OnFailure::RetryForever);
                let p = &mut saga.steps[i];
                p.last_outcome = Some(reason.clone());
                p.maybe_applied |= matches!(outcome, Outcome::Transient(_));
                if may_retry {
                    p.attempts = attempt + 1;
                    self.log(
                        saga,
                        EventKind::StepRetry,
                        Some(i),
                        Some(attempt),
                        Some(reason.clone()),
                    );
                    self.send(saga, i, CommandKind::Forward, attempt + 1);
                    return;
                }
                p.finished_at_ms = Some(now);
                let unknown = p.maybe_applied;
                // Unknown: the step itself may have an effect to undo; Failed: none can have.
                p.status = if unknown {
                    StepStatus::Unknown
                } else {
                    StepStatus::Failed
                };
                let why = if group_failing {
                    format!("step {step_name}: stopped after a sibling failed, last: {reason}")
                } else {
                    format!("step {step_name}: {attempt} attempts failed, last: {reason}")
                };
                let detail = if continuing {
                    format!("{reason} (on_failure: continue)")
                } else {
                    Self::set_reason(saga, why);
                    reason.clone()
                };
                let kind = if unknown {
                    EventKind::StepUnknown
                } else {
                    EventKind::StepFailed
                };
                self.log(saga, kind, Some(i), Some(attempt), Some(detail));
            }
        }
        self.settle_group(saga, g);
    }

    /// Once no step of group `g` is in flight: the next group, COMPLETED, or
    /// compensation of everything done so far (this group included).
    fn settle_group(&mut self, saga: &mut Saga, g: usize) {
        let members = saga.definition.group(g);
        let failing = members.clone().any(|k| Self::stops(saga, k));
        if failing {
            // Waits and sleeps of a failing group are cut short (they have no
            // effect): only its commands in flight are worth waiting for.
            for k in members.clone() {
                if matches!(saga.steps[k].status, StepStatus::Waiting | StepStatus::Sleeping) {
                    cut_short(&mut saga.steps[k], "cut short: a sibling failed", self.now_ms);
                    self.log(
                        saga,
                        EventKind::StepFailed,
                        Some(k),
                        None,
                        Some("cut short: a sibling failed".into()),
                    );
                }
            }
        }
        if members.clone().any(|k| saga.steps[k].status.in_flight()) {
            return;
        }
        if failing {
            self.begin_compensation(saga, members.end.checked_sub(1));
            return;
        }
        match saga.definition.next_group(g) {
            Some(next) => self.run_group(saga, next),
            None => {
                saga.state = SagaState::Completed;
                self.log(saga, EventKind::Completed, None, None, None);
            }
        }
    }

    fn compensation_outcome(&mut self, saga: &mut Saga, i: usize, attempt: u32, outcome: &Outcome) {
        let now = self.now_ms;
        let g = saga.definition.group_of(i);
        match outcome {
            Outcome::Ok(_) => {
                let p = &mut saga.steps[i];
                p.status = StepStatus::Compensated;
                p.last_outcome = Some("compensated".into());
                p.finished_at_ms = Some(now);
                self.log(
                    saga,
                    EventKind::CompensationSucceeded,
                    Some(i),
                    Some(attempt),
                    None,
                );
            }
            Outcome::Rejected(reason) => {
                self.compensation_failed(saga, i, attempt, format!("compensation refused: {reason}"));
            }
            Outcome::Transient(reason) | Outcome::NotApplied(reason) => {
                let max = saga.definition.steps[i].retry.max_attempts;
                let p = &mut saga.steps[i];
                p.last_outcome = Some(reason.clone());
                if attempt < max {
                    p.compensation_attempts = attempt + 1;
                    self.log(
                        saga,
                        EventKind::CompensationRetry,
                        Some(i),
                        Some(attempt),
                        Some(reason.clone()),
                    );
                    self.send(saga, i, CommandKind::Compensate, attempt + 1);
                    return;
                }
                self.compensation_failed(
                    saga,
                    i,
                    attempt,
                    format!("compensation out of retries, last: {reason}"),
                );
            }
        }
        self.settle_compensation(saga, g);
    }

    /// Step `i`'s compensation cannot be done. The saga becomes FAILED once
    /// the rest of its group has settled (at once when nothing else is in flight).
    fn compensation_failed(&mut self, saga: &mut Saga, i: usize, attempt: u32, why: String) {
        let p = &mut saga.steps[i];
        p.status = StepStatus::CompensationFailed;
        p.last_outcome = Some(why.clone());
        p.finished_at_ms = Some(self.now_ms);
        let step_name = saga.definition.steps[i].name.clone();
        let earlier = saga
            .reason
            .take()
            .map(|r| format!(" (after: {r})"))
            .unwrap_or_default();
        saga.reason = Some(format!("step {step_name}: {why}{earlier}"));
        let g = saga.definition.group_of(i);
        let others_busy = saga
            .definition
            .group(g)
            .any(|k| saga.steps[k].status == StepStatus::Compensating);
        if !others_busy {
            saga.state = SagaState::Failed { step: i };
        }
        self.log(
            saga,
            EventKind::CompensationFailed,
            Some(i),
            Some(attempt),
            Some(why),
        );
    }

    /// Once no compensation of group `g` is in flight: FAILED if one of them
    /// failed, else on to the newest earlier group with something to undo.
    fn settle_compensation(&mut self, saga: &mut Saga, g: usize) {
        let members = saga.definition.group(g);
        if members
            .clone()
            .any(|k| saga.steps[k].status == StepStatus::Compensating)
        {
            return;
        }
        if let Some(k) = members
            .clone()
            .find(|&k| saga.steps[k].status == StepStatus::CompensationFailed)
        {
            saga.state = SagaState::Failed { step: k };
            self.log(saga, EventKind::Failed, None, None, None);
            return;
        }
        self.compensate_from(saga, g.checked_sub(1));
    }

    /// RUNNING → COMPENSATING, starting at step `from` (inclusive) and walking back.
    fn begin_compensation(&mut self, saga: &mut Saga, from: Option<usize>) {
        saga.state = SagaState::Compensating {
            step: from.map(|f| saga.definition.group_of(f)).unwrap_or(0),
        };
        self.log(saga, EventKind::Compensating, None, None, saga.reason.clone());
        self.compensate_from(saga, from);
    }

    /// Sends, at once, the compensations of the newest group at or before step
    /// `from` that has a step that succeeded or whose outcome is unknown and
    /// that has a compensation; when none is left the saga is COMPENSATED.
    fn compensate_from(&mut self, saga: &mut Saga, from: Option<usize>) {
        let undoable = |saga: &Saga, k: usize| {
            matches!(saga.steps[k].status, StepStatus::Succeeded | StepStatus::Unknown)
                && saga.definition.steps[k].compensation.is_some()
        };
        let newest = from.and_then(|from| (0..=from).rev().find(|&k| undoable(saga, k)));
        let Some(k) = newest else {
            saga.state = SagaState::Compensated;
            self.log(saga, EventKind::Compensated, None, None, None);
            return;
        };
        let g = saga.definition.group_of(k);
        saga.state = SagaState::Compensating { step: g };
        for j in saga.definition.group(g) {
            if undoable(saga, j) {
                let p = &mut saga.steps[j];
                p.status = StepStatus::Compensating;
                p.compensation_attempts = 1;
                self.send(saga, j, CommandKind::Compensate, 1);
            }
        }
    }
}

/// A wait or sleep ends without effect (the saga stops, a sibling failed): nothing to undo.
fn cut_short(p: &mut StepProgress, why: &str, now_ms: u64) {
    p.status = StepStatus::Failed;
    p.last_outcome = Some(why.into());
    p.due_at_ms = None;
    p.finished_at_ms = Some(now_ms);
}

/// Whether a transition written from `previous` (`None`: a new saga) puts
/// `saga` into FAILED: it then gets a dead letter, once per entry (an
/// operator must act).
pub fn enters_failed(saga: &Saga, previous: Option<StateTag>) -> bool {
    saga.state.tag() == StateTag::Failed && previous != Some(StateTag::Failed)
}

/// What a `CreateOrder` asked for, compared with the saga its idempotency
/// key already names (a repeat must ask for the same thing).
#[derive(Debug, Clone, Copy)]
pub struct CreateRequest<'a> {
    /// The definition it resolved to.
    pub definition: &'a SagaDefinition,
    /// Whether it named that exact version.
    pub version_requested: bool,
    /// The order.
    pub order: &'a OrderPayload,
    /// Whether it gave `order.order_id` (otherwise one was generated).
    pub order_id_given: bool,
}

/// Whether a repeated `CreateOrder` with the same idempotency key asks for
/// what created `saga`: same definition (and version when named), same
/// order (its id only when given).
pub fn same_create_request(saga: &Saga, request: &CreateRequest<'_>) -> bool {
    let (a, b) = (&saga.order, request.order);
    saga.definition.name == request.definition.name
        && (!request.version_requested || saga.definition.version == request.definition.version)
        && (!request.order_id_given || a.order_id == b.order_id)
        && a.customer_id == b.customer_id
        && a.items == b.items
        && a.amount_cents == b.amount_cents
        && a.currency == b.currency
}

/// The saga's age when it is past the command horizon (`horizon` zero: no
/// limit): participants may have forgotten its commands' idempotency keys,
/// so no command of it may be sent again (`RetrySaga`, `AbortSaga`).
pub fn past_command_horizon(
    saga: &Saga,
    horizon: std::time::Duration,
    now_ms: u64,
) -> Option<std::time::Duration> {
    let age = std::time::Duration::from_millis(now_ms.saturating_sub(saga.created_at_ms));
    (!horizon.is_zero() && age > horizon).then_some(age)
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::definition::StepDefinition;

    fn step(name: &str, participant: &str, action: &str, compensation: Option<&str>) -> StepDefinition {
        StepDefinition {
            name: name.into(),
            participant: participant.into(),
            action: action.into(),
            compensation: compensation.map(Into::into),
            timeout: Duration::from_secs(2),
            retry: RetryPolicy {
                max_attempts: 3,
                ..RetryPolicy::default()
            },
            group: None,
            on_failure: Default::default(),
            input: Default::default(),
            compensation_input: Default::default(),
            output_schema: None,
            kind: Default::default(),
            when: None,
        }
    }

    fn definition(steps: Vec<StepDefinition>) -> SagaDefinition {
        SagaDefinition {
            name: "order".into(),
            version: 1,
            steps,
            input_schema: None,
            events: Default::default(),
            deadline: None,
            source: PathBuf::new(),
        }
    }

    fn order_def() -> SagaDefinition {
        definition(vec![
            step("reserve-inventory", "inventory", "reserve", Some("release")),
            step("charge-payment", "payment", "charge", Some("refund")),
        ])
    }

    fn three_steps() -> SagaDefinition {
        definition(vec![
            step("a", "p1", "do-a", Some("undo-a")),
            step("b", "p2", "do-b", None),
            step("c", "p3", "do-c", Some("undo-c")),
        ])
    }

    fn order() -> OrderPayload {
        OrderPayload {
            order_id: "o-1".into(),
            customer_id: "c-1".into(),
            items: vec![wire::Item {
                sku: "A-1".into(),
                quantity: 2,
            }],
            amount_cents: 1999,
            currency: "EUR".into(),
        }
    }

    fn new_saga(def: SagaDefinition) -> Saga {
        create("s-1".into(), def.into(), order(), "corr".into(), None, 1).saga
    }

    fn apply(saga: &Saga, event: Event) -> Transition {
        match transition(saga, &event, saga.updated_at_ms + 1) {
            Ok(Some(t)) => t,
            other => panic!(
                "expected a transition for {event:?} in {:?}, got {other:?}",
                saga.state
            ),
        }
    }

    fn reply(step: usize, kind: CommandKind, attempt: u32, outcome: Outcome) -> Event {
        Event::Reply {
            step,
            kind,
            attempt,
            outcome,
        }
    }

    fn ok() -> Outcome {
        Outcome::Ok(serde_json::json!({"id": "x"}))
    }

    fn sent(t: &Transition) -> Vec<(String, CommandKind, u32)> {
        t.commands
            .iter()
            .map(|c| (c.subject.clone(), c.kind, c.message.attempt))
            .collect()
    }

    fn kinds(t: &Transition) -> Vec<&str> {
        t.history.iter().map(|h| h.kind.as_str()).collect()
    }

    /// A saga of `order_def` whose first step succeeded and whose payment is in flight.
    fn charging() -> Saga {
        let s = apply(&new_saga(order_def()), Event::Start).saga;
        apply(&s, reply(0, CommandKind::Forward, 1, ok())).saga
    }

    /// reserve ∥ charge, then ship (which gets the reservation and the charge).
    fn grouped() -> SagaDefinition {
        let yaml = r#"name: shipped
version: 1
defaults: { retry: { max_attempts: 2 } }
steps:
  - parallel:
      - name: reserve
        participant: inventory
        action: reserve
        compensation: release
        compensation_input: { reservation_id: "${steps.reserve.output.reservation_id}" }
      - name: charge
        participant: payment
        action: charge
        compensation: refund
        compensation_input: { charge_id: "${steps.charge.output.charge_id}" }
  - name: ship
    participant: shipping
    action: create-shipment
    compensation: cancel-shipment
    input:
      reservation_id: "${steps.reserve.output.reservation_id}"
      charge_id: "${steps.charge.output.charge_id}"
      customer: "${order.customer_id}"
"#;
        crate::definition::parse(std::path::Path::new("shipped.yaml"), yaml).expect("valid")
    }

    fn out(key: &str, value: &str) -> Outcome {
        Outcome::Ok(serde_json::json!({ key: value }))
    }

    #[test]
    fn a_parallel_group_sends_its_steps_at_once_and_the_next_group_gets_their_outputs() {
        let t = apply(&new_saga(grouped()), Event::Start);
        assert_eq!(
            sent(&t),
            [
                ("saga.cmd.inventory.reserve".to_string(), CommandKind::Forward, 1),
                ("saga.cmd.payment.charge".to_string(), CommandKind::Forward, 1)
            ]
        );
        assert_eq!(t.saga.state, SagaState::Running { step: 0 });
        // One branch done: nothing more leaves until the other is.
        let t = apply(
            &t.saga,
            reply(1, CommandKind::Forward, 1, out("charge_id", "ch_1")),
        );
        assert!(t.commands.is_empty());
        assert_eq!(t.saga.state, SagaState::Running { step: 0 });
        let t = apply(
            &t.saga,
            reply(0, CommandKind::Forward, 1, out("reservation_id", "r_1")),
        );
        assert_eq!(t.saga.state, SagaState::Running { step: 2 });
        assert_eq!(
            sent(&t),
            [(
                "saga.cmd.shipping.create-shipment".to_string(),
                CommandKind::Forward,
                1
            )]
        );
        assert_eq!(
            t.commands[0].message.input,
            serde_json::json!({"reservation_id": "r_1", "charge_id": "ch_1", "customer": "c-1"})
        );
        let t = apply(
            &t.saga,
            reply(2, CommandKind::Forward, 1, out("shipment_id", "shp_1")),
        );
        assert_eq!(t.saga.state, SagaState::Completed);
        assert_eq!(kinds(&t), ["step_succeeded", "completed"]);
    }

    #[test]
    fn a_rejected_branch_waits_for_the_other_then_undoes_what_it_did() {
        let t = apply(&new_saga(grouped()), Event::Start);
        let t = apply(
            &t.saga,
            reply(
                1,
                CommandKind::Forward,
                1,
                Outcome::Rejected("card_declined".into()),
            ),
        );
        assert!(t.commands.is_empty(), "the reserve is still in flight");
        assert_eq!(t.saga.state, SagaState::Running { step: 0 });
        let t = apply(
            &t.saga,
            reply(0, CommandKind::Forward, 1, out("reservation_id", "r_1")),
        );
        assert_eq!(t.saga.state, SagaState::Compensating { step: 0 });
        assert_eq!(
            sent(&t),
            [(
                "saga.cmd.inventory.release".to_string(),
                CommandKind::Compensate,
                1
            )]
        );
        // The compensation carries the reserve's output.
        assert_eq!(
            t.commands[0].message.input,
            serde_json::json!({"reservation_id": "r_1"})
        );
        assert_eq!(
            t.saga.reason.as_deref(),
            Some("step charge rejected: card_declined")
        );
        let t = apply(&t.saga, reply(0, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensated);
        assert!(t.commands.is_empty(), "the rejected charge has nothing to refund");
        // A view of the ended saga recomputes the input the release was sent with.
        assert_eq!(
            step_input(&t.saga, 0, CommandKind::Compensate),
            Some(serde_json::json!({"reservation_id": "r_1"}))
        );
        assert_eq!(step_input(&t.saga, 9, CommandKind::Forward), None);
    }

    #[test]
    fn a_failed_sibling_stops_the_other_branch_retrying_and_both_unknowns_are_undone() {
        let t = apply(&new_saga(grouped()), Event::Start);
        // The charge times out (it may have happened): a retry.
        let t = apply(
            &t.saga,
            reply(1, CommandKind::Forward, 1, Outcome::Transient("timeout".into())),
        );
        assert_eq!(
            sent(&t),
            [("saga.cmd.payment.charge".to_string(), CommandKind::Forward, 2)]
        );
        // The reserve is rejected: the charge's next timeout is not retried but unknown.
        let t = apply(
            &t.saga,
            reply(
                0,
                CommandKind::Forward,
                1,
                Outcome::Rejected("insufficient_stock".into()),
            ),
        );
        assert!(t.commands.is_empty());
        let t = apply(
            &t.saga,
            reply(1, CommandKind::Forward, 2, Outcome::Transient("timeout".into())),
        );
        assert_eq!(kinds(&t), ["step_unknown", "compensating"]);
        assert_eq!(t.saga.steps[1].status, StepStatus::Compensating);
        // An unknown charge is refunded; its output is unknown, so the refund names no charge.
        assert_eq!(
            sent(&t),
            [("saga.cmd.payment.refund".to_string(), CommandKind::Compensate, 1)]
        );
        assert_eq!(
            t.commands[0].message.input,
            serde_json::json!({"charge_id": null})
        );
    }

    #[test]
    fn an_abort_mid_group_undoes_every_branch_in_flight_at_once() {
        let t = apply(&new_saga(grouped()), Event::Start);
        let t = apply(
            &t.saga,
            reply(0, CommandKind::Forward, 1, out("reservation_id", "r_1")),
        );
        let t = apply(
            &t.saga,
            Event::Abort {
                reason: "customer called".into(),
            },
        );
        assert_eq!(
            t.settled,
            [(1, CommandKind::Forward)],
            "the charge in flight is withdrawn"
        );
        assert_eq!(t.saga.state, SagaState::Compensating { step: 0 });
        assert_eq!(
            sent(&t),
            [
                (
                    "saga.cmd.inventory.release".to_string(),
                    CommandKind::Compensate,
                    1
                ),
                ("saga.cmd.payment.refund".to_string(), CommandKind::Compensate, 1)
            ]
        );
        // Both must answer before the saga is compensated; a failed one makes it FAILED.
        let t = apply(&t.saga, reply(1, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensating { step: 0 });
        let t = apply(
            &t.saga,
            reply(0, CommandKind::Compensate, 1, Outcome::Rejected("locked".into())),
        );
        assert_eq!(t.saga.state, SagaState::Failed { step: 0 });
        assert_eq!(kinds(&t), ["compensation_failed", "failed"]);
        // An operator retry resends only the failed compensation.
        let t = apply(&t.saga, Event::Retry);
        assert_eq!(
            sent(&t),
            [(
                "saga.cmd.inventory.release".to_string(),
                CommandKind::Compensate,
                1
            )]
        );
        let t = apply(&t.saga, reply(0, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensated);
    }

    #[test]
    fn on_failure_continue_and_retry_forever() {
        let mut def = grouped();
        def.steps[2].on_failure = OnFailure::Continue;
        def.steps[1].on_failure = OnFailure::RetryForever;
        let t = apply(&new_saga(def), Event::Start);
        let t = apply(
            &t.saga,
            reply(0, CommandKind::Forward, 1, out("reservation_id", "r_1")),
        );
        // Far past max_attempts (2): still retried.
        let mut t = t;
        for attempt in 1..6 {
            t = apply(
                &t.saga,
                reply(
                    1,
                    CommandKind::Forward,
                    attempt,
                    Outcome::NotApplied("no responders".into()),
                ),
            );
            assert_eq!(
                sent(&t),
                [(
                    "saga.cmd.payment.charge".to_string(),
                    CommandKind::Forward,
                    attempt + 1
                )]
            );
        }
        let t = apply(
            &t.saga,
            reply(1, CommandKind::Forward, 6, out("charge_id", "ch_1")),
        );
        // The shipment is refused, but it may fail: the saga completes without it.
        let t = apply(
            &t.saga,
            reply(
                2,
                CommandKind::Forward,
                1,
                Outcome::Rejected("address_unreachable".into()),
            ),
        );
        assert_eq!(t.saga.state, SagaState::Completed);
        assert_eq!(t.saga.steps[2].status, StepStatus::Rejected);
        assert!(t.saga.reason.is_none());
    }

    #[test]
    fn create_is_pending_with_a_created_entry() {
        let t = create(
            "s-1".into(),
            order_def().into(),
            order(),
            "corr".into(),
            Some("k".into()),
            7,
        );
        assert_eq!(t.saga.state, SagaState::Pending);
        assert_eq!(kinds(&t), ["created"]);
        assert!(t.commands.is_empty());
        assert_eq!(t.saga.seq, 1);
    }

    #[test]
    fn start_sends_the_first_forward_command() {
        let t = apply(&new_saga(order_def()), Event::Start);
        assert_eq!(t.saga.state, SagaState::Running { step: 0 });
        assert_eq!(
            sent(&t),
            [("saga.cmd.inventory.reserve".into(), CommandKind::Forward, 1)]
        );
        let c = &t.commands[0].message;
        assert_eq!(c.idempotency_key, "s-1/reserve-inventory/forward");
        assert_eq!(c.definition, "order@1");
        assert_eq!(t.saga.steps[0].status, StepStatus::Running);
        assert!(t.settled.is_empty());
    }

    #[test]
    fn happy_path_completes() {
        let s = charging();
        assert_eq!(s.state, SagaState::Running { step: 1 });
        assert_eq!(s.steps[0].status, StepStatus::Succeeded);
        assert_eq!(s.steps[0].output, Some(serde_json::json!({"id": "x"})));
        let t = apply(&s, reply(1, CommandKind::Forward, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Completed);
        assert!(t.commands.is_empty());
        assert_eq!(kinds(&t), ["step_succeeded", "completed"]);
        assert_eq!(t.settled, [(1, CommandKind::Forward)]);
        assert!(t.saga.state.is_terminal());
    }

    #[test]
    fn first_step_rejected_compensates_nothing() {
        let s = apply(&new_saga(order_def()), Event::Start).saga;
        let t = apply(
            &s,
            reply(
                0,
                CommandKind::Forward,
                1,
                Outcome::Rejected("insufficient_stock".into()),
            ),
        );
        assert_eq!(t.saga.state, SagaState::Compensated);
        assert!(t.commands.is_empty());
        assert_eq!(t.saga.steps[0].status, StepStatus::Rejected);
        assert_eq!(kinds(&t), ["step_rejected", "compensating", "compensated"]);
        assert_eq!(
            t.saga.reason.as_deref(),
            Some("step reserve-inventory rejected: insufficient_stock")
        );
    }

    #[test]
    fn payment_declined_after_reserve_releases_the_stock() {
        let t = apply(
            &charging(),
            reply(
                1,
                CommandKind::Forward,
                1,
                Outcome::Rejected("card_declined".into()),
            ),
        );
        assert_eq!(t.saga.state, SagaState::Compensating { step: 0 });
        assert_eq!(
            sent(&t),
            [("saga.cmd.inventory.release".into(), CommandKind::Compensate, 1)]
        );
        assert_eq!(
            t.commands[0].message.idempotency_key,
            "s-1/reserve-inventory/compensate"
        );
        let t = apply(&t.saga, reply(0, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensated);
        assert_eq!(t.saga.steps[0].status, StepStatus::Compensated);
        assert_eq!(t.saga.steps[1].status, StepStatus::Rejected);
    }

    #[test]
    fn transient_failures_retry_with_the_same_key_then_succeed() {
        let s = charging();
        let t = apply(
            &s,
            reply(1, CommandKind::Forward, 1, Outcome::Transient("timeout".into())),
        );
        assert_eq!(t.saga.state, SagaState::Running { step: 1 });
        assert_eq!(
            sent(&t),
            [("saga.cmd.payment.charge".into(), CommandKind::Forward, 2)]
        );
        assert_eq!(
            t.commands[0].message.idempotency_key,
            "s-1/charge-payment/forward"
        );
        assert_eq!(t.saga.steps[1].attempts, 2);
        assert_eq!(kinds(&t), ["step_retry"]);
        let t = apply(&t.saga, reply(1, CommandKind::Forward, 2, ok()));
        assert_eq!(t.saga.state, SagaState::Completed);
        assert_eq!(t.saga.steps[1].attempts, 2);
    }

    #[test]
    fn retries_exhausted_compensate_the_unknown_step_first_then_older_ones() {
        let mut s = charging();
        for attempt in 1..3 {
            s = apply(
                &s,
                reply(
                    1,
                    CommandKind::Forward,
                    attempt,
                    Outcome::Transient("timeout".into()),
                ),
            )
            .saga;
        }
        let t = apply(
            &s,
            reply(1, CommandKind::Forward, 3, Outcome::Transient("timeout".into())),
        );
        assert_eq!(t.saga.steps[1].status, StepStatus::Compensating);
        assert_eq!(t.saga.state, SagaState::Compensating { step: 1 });
        assert_eq!(
            sent(&t),
            [("saga.cmd.payment.refund".into(), CommandKind::Compensate, 1)]
        );
        assert_eq!(kinds(&t), ["step_unknown", "compensating"]);
        let t = apply(&t.saga, reply(1, CommandKind::Compensate, 1, ok()));
        assert_eq!(
            sent(&t),
            [("saga.cmd.inventory.release".into(), CommandKind::Compensate, 1)]
        );
        let t = apply(&t.saga, reply(0, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensated);
        assert!(t.saga.steps.iter().all(|p| p.status == StepStatus::Compensated));
    }

    #[test]
    fn retries_exhausted_without_delivery_skip_the_failed_step() {
        let mut s = charging();
        for attempt in 1..3 {
            let o = Outcome::NotApplied("no responders".into());
            s = apply(&s, reply(1, CommandKind::Forward, attempt, o)).saga;
        }
        let t = apply(
            &s,
            reply(
                1,
                CommandKind::Forward,
                3,
                Outcome::NotApplied("no responders".into()),
            ),
        );
        assert_eq!(t.saga.steps[1].status, StepStatus::Failed);
        assert_eq!(
            sent(&t),
            [("saga.cmd.inventory.release".into(), CommandKind::Compensate, 1)]
        );
        assert_eq!(kinds(&t), ["step_failed", "compensating"]);
        // One timeout among the attempts is enough to make the outcome unknown.
        let mut s = charging();
        s = apply(
            &s,
            reply(1, CommandKind::Forward, 1, Outcome::Transient("timeout".into())),
        )
        .saga;
        s = apply(
            &s,
            reply(1, CommandKind::Forward, 2, Outcome::NotApplied("error: x".into())),
        )
        .saga;
        let t = apply(
            &s,
            reply(1, CommandKind::Forward, 3, Outcome::NotApplied("error: x".into())),
        );
        assert_eq!(
            sent(&t),
            [("saga.cmd.payment.refund".into(), CommandKind::Compensate, 1)]
        );
    }

    #[test]
    fn compensation_walks_back_newest_first_and_skips_steps_without_one() {
        let def = three_steps();
        let mut s = apply(&new_saga(def), Event::Start).saga;
        s = apply(&s, reply(0, CommandKind::Forward, 1, ok())).saga;
        s = apply(&s, reply(1, CommandKind::Forward, 1, ok())).saga;
        let t = apply(
            &s,
            reply(2, CommandKind::Forward, 1, Outcome::Rejected("no".into())),
        );
        // c was rejected (nothing to undo), b has `compensation: none`, so a is next.
        assert_eq!(
            sent(&t),
            [("saga.cmd.p1.undo-a".into(), CommandKind::Compensate, 1)]
        );
        let t = apply(&t.saga, reply(0, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensated);
        assert_eq!(
            t.saga.steps[1].status,
            StepStatus::Succeeded,
            "nothing to undo for b"
        );
    }

    #[test]
    fn compensation_retries_then_fails_for_an_operator() {
        let t = apply(
            &charging(),
            reply(
                1,
                CommandKind::Forward,
                1,
                Outcome::Rejected("card_declined".into()),
            ),
        );
        let mut s = t.saga;
        for attempt in 1..3 {
            let t = apply(
                &s,
                reply(
                    0,
                    CommandKind::Compensate,
                    attempt,
                    Outcome::Transient("boom".into()),
                ),
            );
            assert_eq!(
                sent(&t),
                [(
                    "saga.cmd.inventory.release".into(),
                    CommandKind::Compensate,
                    attempt + 1
                )]
            );
            s = t.saga;
        }
        let t = apply(
            &s,
            reply(0, CommandKind::Compensate, 3, Outcome::Transient("boom".into())),
        );
        assert_eq!(t.saga.state, SagaState::Failed { step: 0 });
        assert_eq!(t.saga.steps[0].status, StepStatus::CompensationFailed);
        assert!(t.commands.is_empty());
        assert_eq!(kinds(&t), ["compensation_failed", "failed"]);
        let reason = t.saga.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("out of retries") && reason.contains("card_declined"),
            "{reason}"
        );
    }

    #[test]
    fn refused_compensation_fails_at_once() {
        let t = apply(
            &charging(),
            reply(
                1,
                CommandKind::Forward,
                1,
                Outcome::Rejected("card_declined".into()),
            ),
        );
        let t = apply(
            &t.saga,
            reply(0, CommandKind::Compensate, 1, Outcome::Rejected("unknown".into())),
        );
        assert_eq!(t.saga.state, SagaState::Failed { step: 0 });
    }

    #[test]
    fn abort_compensates_the_step_in_flight_and_the_ones_before() {
        let s = charging();
        let t = apply(
            &s,
            Event::Abort {
                reason: "customer called".into(),
            },
        );
        assert_eq!(t.saga.state, SagaState::Compensating { step: 1 });
        assert_eq!(
            t.settled,
            [(1, CommandKind::Forward)],
            "the forward command leaves the outbox"
        );
        assert_eq!(
            sent(&t),
            [("saga.cmd.payment.refund".into(), CommandKind::Compensate, 1)]
        );
        assert_eq!(t.saga.reason.as_deref(), Some("aborted: customer called"));
        // The forward reply that arrives afterwards changes nothing.
        assert_eq!(
            transition(&t.saga, &reply(1, CommandKind::Forward, 1, ok()), 9),
            Ok(None)
        );
        let t = apply(&t.saga, reply(1, CommandKind::Compensate, 1, ok()));
        let t = apply(&t.saga, reply(0, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensated);
        // Nothing to abort any more.
        assert_eq!(
            transition(
                &t.saga,
                &Event::Abort {
                    reason: "again".into()
                },
                10
            ),
            Ok(None)
        );
    }

    #[test]
    fn abort_of_a_pending_saga_compensates_nothing() {
        let t = apply(&new_saga(order_def()), Event::Abort { reason: "r".into() });
        assert_eq!(t.saga.state, SagaState::Compensated);
        assert!(t.commands.is_empty());
    }

    #[test]
    fn retry_resumes_a_failed_compensation_with_fresh_attempts() {
        let t = apply(
            &charging(),
            reply(
                1,
                CommandKind::Forward,
                1,
                Outcome::Rejected("card_declined".into()),
            ),
        );
        let t = apply(
            &t.saga,
            reply(0, CommandKind::Compensate, 1, Outcome::Rejected("later".into())),
        );
        assert_eq!(t.saga.state, SagaState::Failed { step: 0 });
        let t = apply(&t.saga, Event::Retry);
        assert_eq!(t.saga.state, SagaState::Compensating { step: 0 });
        assert_eq!(
            sent(&t),
            [("saga.cmd.inventory.release".into(), CommandKind::Compensate, 1)]
        );
        assert_eq!(kinds(&t), ["retried"]);
        let t = apply(&t.saga, reply(0, CommandKind::Compensate, 1, ok()));
        assert_eq!(t.saga.state, SagaState::Compensated);
        assert_eq!(
            transition(&t.saga, &Event::Retry, 10),
            Ok(None),
            "only a FAILED saga is retried"
        );
        assert_eq!(transition(&charging(), &Event::Retry, 10), Ok(None));
    }

    #[test]
    fn stale_duplicate_and_late_events_are_no_ops() {
        let s = charging();
        let late = [
            reply(0, CommandKind::Forward, 1, ok()),    // previous step
            reply(1, CommandKind::Forward, 2, ok()),    // attempt not sent
            reply(1, CommandKind::Compensate, 1, ok()), // wrong kind
            Event::Start,                               // repeated start
        ];
        for e in &late {
            assert_eq!(transition(&s, e, 10), Ok(None), "{e:?}");
        }
        let done = apply(&s, reply(1, CommandKind::Forward, 1, ok())).saga;
        assert_eq!(
            transition(&done, &reply(1, CommandKind::Forward, 1, ok()), 10),
            Ok(None)
        );
        let t = apply(
            &charging(),
            reply(1, CommandKind::Forward, 1, Outcome::Rejected("x".into())),
        );
        assert_eq!(
            transition(&t.saga, &reply(1, CommandKind::Forward, 1, ok()), 10),
            Ok(None)
        );
    }

    #[test]
    fn impossible_events_are_typed_errors() {
        let pending = new_saga(order_def());
        assert!(matches!(
            transition(&pending, &reply(0, CommandKind::Forward, 1, ok()), 2),
            Err(TransitionError::Unexpected { .. })
        ));
        let s = charging();
        assert!(matches!(
            transition(&s, &reply(9, CommandKind::Forward, 1, ok()), 2),
            Err(TransitionError::NoSuchStep { step: 9, .. })
        ));
    }

    #[test]
    fn history_is_contiguous_and_timestamped() {
        let s0 = new_saga(order_def());
        let t1 = apply(&s0, Event::Start);
        let t2 = apply(&t1.saga, reply(0, CommandKind::Forward, 1, ok()));
        let t3 = apply(
            &t2.saga,
            reply(
                1,
                CommandKind::Forward,
                1,
                Outcome::Rejected("card_declined".into()),
            ),
        );
        let seqs: Vec<u64> = [&t1, &t2, &t3]
            .iter()
            .flat_map(|t| t.history.iter().map(|h| h.seq))
            .collect();
        assert_eq!(seqs, (2..2 + seqs.len() as u64).collect::<Vec<_>>());
        assert!(t3.history.iter().all(|h| h.at_ms == t3.saga.updated_at_ms));
        assert_eq!(t3.history[0].step.as_deref(), Some("charge-payment"));
    }

    #[test]
    fn state_tags_round_trip() {
        for t in StateTag::ALL {
            assert_eq!(StateTag::from_byte(t as u8), Some(t));
        }
        assert_eq!(StateTag::from_byte(0), None);
    }

    #[test]
    fn a_repeated_create_must_ask_for_the_same_order() {
        let saga = new_saga(order_def());
        let def = order_def();
        let same = |order: &OrderPayload, order_id_given: bool| {
            same_create_request(
                &saga,
                &CreateRequest {
                    definition: &def,
                    version_requested: false,
                    order,
                    order_id_given,
                },
            )
        };
        assert!(same(&order(), true));
        let mut other = order();
        other.order_id = "generated".into();
        assert!(same(&other, false));
        assert!(!same(&other, true));
        other.amount_cents += 1;
        assert!(!same(&other, false));
    }

    #[test]
    fn the_command_horizon_counts_from_the_sagas_creation() {
        let saga = new_saga(order_def()); // created at 1 ms
        let day = Duration::from_secs(86_400);
        assert_eq!(past_command_horizon(&saga, day, 1 + 86_400_000), None);
        assert_eq!(
            past_command_horizon(&saga, day, 2 + 86_400_000),
            Some(Duration::from_millis(86_400_001))
        );
        assert_eq!(past_command_horizon(&saga, Duration::ZERO, u64::MAX), None);
    }

    #[test]
    fn event_kinds_are_stored_under_the_names_earlier_versions_wrote() {
        for kind in EventKind::ALL {
            let stored = serde_json::to_value(kind).ok();
            assert_eq!(stored, Some(serde_json::Value::String(kind.as_str().into())));
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        let old: Result<HistoryEntry, _> = serde_json::from_str(
            r#"{"seq":1,"at_ms":5,"kind":"step_succeeded","step":"a","attempt":1,"detail":null,"state":"running"}"#,
        );
        assert!(
            matches!(
                old,
                Ok(HistoryEntry {
                    kind: EventKind::StepSucceeded,
                    ..
                })
            ),
            "{old:?}"
        );
    }
}
