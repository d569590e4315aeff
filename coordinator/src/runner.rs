//! The saga runner: the one owner of every in-flight saga.
//!
//! A single task receives creations (from the API, through a [`RunnerHandle`])
//! and outcomes (from the dispatcher), applies them with the pure engine,
//! writes every resulting transition to the store, flushes ONCE for the whole
//! batch (group commit), and only then answers the creators and hands the
//! new commands to the dispatcher. So no command ever leaves before the state
//! that implies it is durable, and a crash at any point leaves either the old
//! state (the event is redelivered: the command is still in the outbox and
//! is re-sent on start) or the new one with its commands in the outbox.
//!
//! On start it resumes every non-terminal saga: PENDING ones are started,
//! outbox commands are re-sent with their original idempotency keys.
//! In-flight sagas live in memory (a map, removed when terminal); terminal
//! ones are only in the store.
//!
//! Operator events (`AbortSaga`, `RetrySaga`) go through the same path. A
//! saga entering FAILED gets a dead-letter record in the same transaction;
//! after the flush it is published on `saga.dlq` (and again after a restart
//! if the publication was not confirmed).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use saga_proto::wire::OrderPayload;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::{
    definition::SagaDefinition,
    dispatch::{Dispatcher, Reported},
    engine::{self, Event, Saga, StateTag, Transition},
    store::{OutboxEntry, Store, StoreError},
    telemetry,
};

/// Most events applied under one flush.
const BATCH: usize = 512;
/// Subject of dead-letter records.
pub const DLQ_SUBJECT: &str = "saga.dlq";

/// A saga to create.
#[derive(Debug, Clone)]
pub struct NewSaga {
    /// Definition to run (snapshotted into the saga).
    pub definition: Arc<SagaDefinition>,
    /// Whether the client asked for this exact version (idempotency check).
    pub version_requested: bool,
    /// The order.
    pub order: OrderPayload,
    /// Whether the client supplied `order.order_id` (otherwise it was generated).
    pub order_id_given: bool,
    /// Correlation id for logs and NATS headers.
    pub correlation_id: String,
    /// Client idempotency key.
    pub idempotency_key: Option<String>,
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new saga, durable and started.
    New {
        /// Its id.
        saga_id: String,
        /// Order id (given or generated).
        order_id: String,
    },
    /// The idempotency key already named this saga.
    Existing {
        /// Its id.
        saga_id: String,
        /// Its order id.
        order_id: String,
        /// Its current state.
        state: StateTag,
    },
}

/// Why a saga could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The key was used before for a different order.
    #[error("idempotency_key was already used for a different order (saga {0})")]
    KeyReused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runner stopped (shutdown or a fatal store error).
    #[error("the coordinator is shutting down")]
    Stopped,
}

type CreateReply = oneshot::Sender<Result<Created, CreateError>>;
type OperateReply = oneshot::Sender<Result<Operated, OperateError>>;

enum Request {
    Create {
        new: NewSaga,
        reply: CreateReply,
    },
    Operate {
        saga_id: Uuid,
        event: Event,
        reply: OperateReply,
    },
}

/// What an operator event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operated {
    /// The saga moved; its state now.
    Changed(StateTag),
    /// The event does not apply in the saga's state (e.g. abort of a completed saga).
    Unchanged(StateTag),
}

/// Why an operator event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    /// No such saga.
    #[error("saga {0} not found")]
    NotFound(Uuid),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runner stopped.
    #[error("the coordinator is shutting down")]
    Stopped,
}

/// Handle to the runner; cheap to clone.
#[derive(Clone)]
pub struct RunnerHandle {
    tx: mpsc::Sender<Request>,
    changes: broadcast::Sender<Arc<Saga>>,
}

impl RunnerHandle {
    /// Creates (and starts) a saga; returns once it is durable.
    ///
    /// # Errors
    /// [`CreateError`].
    pub async fn create(&self, new: NewSaga) -> Result<Created, CreateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Create { new, reply })
            .await
            .map_err(|_| CreateError::Stopped)?;
        rx.await.map_err(|_| CreateError::Stopped)?
    }

    /// Every saga after each transition, once that transition is durable
    /// (for `WatchSaga`). A slow receiver may lag and must re-read the store.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Saga>> {
        self.changes.subscribe()
    }

    /// Applies an operator event (`Abort`, `Retry`) to a saga; returns once
    /// the resulting state is durable.
    ///
    /// # Errors
    /// [`OperateError`].
    pub async fn operate(&self, saga_id: Uuid, event: Event) -> Result<Operated, OperateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Operate {
                saga_id,
                event,
                reply,
            })
            .await
            .map_err(|_| OperateError::Stopped)?;
        rx.await.map_err(|_| OperateError::Stopped)?
    }
}

/// The runner task's inputs, built by [`channel`].
pub struct RunnerInputs {
    requests: mpsc::Receiver<Request>,
    outcomes: mpsc::UnboundedReceiver<Reported>,
    changes: broadcast::Sender<Arc<Saga>>,
}

/// A handle for creators, the sender for the dispatcher and the runner's inputs.
pub fn channel() -> (RunnerHandle, mpsc::UnboundedSender<Reported>, RunnerInputs) {
    let (tx, requests) = mpsc::channel(4096);
    let (otx, outcomes) = mpsc::unbounded_channel();
    let (changes, _) = broadcast::channel(1024);
    (
        RunnerHandle {
            tx,
            changes: changes.clone(),
        },
        otx,
        RunnerInputs {
            requests,
            outcomes,
            changes,
        },
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Runner {
    store: Store,
    dispatcher: Dispatcher,
    nats: async_nats::Client,
    active: HashMap<String, Saga>,
    dlq_inflight: Arc<Mutex<HashSet<Vec<u8>>>>,
    // Per batch:
    to_send: Vec<OutboxEntry>,
    acks: Vec<(CreateReply, Result<Created, CreateError>)>,
    operated: Vec<(OperateReply, Result<Operated, OperateError>)>,
    batch_keys: HashMap<String, String>,
    dirty: bool,
    new_dead_letters: bool,
    changes: broadcast::Sender<Arc<Saga>>,
    changed: Vec<Arc<Saga>>,
}

/// Runs the saga runner until `shutdown` fires.
///
/// # Errors
/// A store failure: the runner stops at once, sending nothing more (a
/// restart recovers from what is durable).
pub async fn run(
    store: Store,
    dispatcher: Dispatcher,
    nats: async_nats::Client,
    mut inputs: RunnerInputs,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let mut r = Runner {
        store,
        dispatcher,
        nats,
        active: HashMap::new(),
        dlq_inflight: Arc::new(Mutex::new(HashSet::new())),
        to_send: Vec::new(),
        acks: Vec::new(),
        operated: Vec::new(),
        batch_keys: HashMap::new(),
        dirty: false,
        new_dead_letters: true, // publish what a previous run left unconfirmed
        changes: inputs.changes.clone(),
        changed: Vec::new(),
    };
    r.recover().await?;
    let mut requests = Vec::with_capacity(BATCH);
    let mut outcomes = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            n = inputs.outcomes.recv_many(&mut outcomes, BATCH) => if n == 0 { break },
            n = inputs.requests.recv_many(&mut requests, BATCH) => if n == 0 { break },
        }
        // Take whatever else is already waiting so it shares this flush.
        while outcomes.len() < BATCH {
            match inputs.outcomes.try_recv() {
                Ok(o) => outcomes.push(o),
                Err(_) => break,
            }
        }
        while requests.len() < BATCH {
            match inputs.requests.try_recv() {
                Ok(q) => requests.push(q),
                Err(_) => break,
            }
        }
        let now = now_ms();
        for Reported { saga_id, event } in outcomes.drain(..) {
            r.apply(&saga_id, &event, now)?;
        }
        for request in requests.drain(..) {
            match request {
                Request::Create { new, reply } => {
                    let result = r.create(new, now);
                    r.acks.push((reply, result));
                }
                Request::Operate {
                    saga_id,
                    event,
                    reply,
                } => {
                    let result = r.operate(saga_id, &event, now);
                    r.operated.push((reply, result));
                }
            }
        }
        r.commit().await?;
    }
    r.store.flush().await?;
    info!(
        in_flight = r.active.len(),
        "saga runner stopped; in-flight sagas resume on next start"
    );
    Ok(())
}

impl Runner {
    async fn recover(&mut self) -> Result<(), StoreError> {
        let active = self.store.active()?;
        let outbox = self.store.outbox()?;
        let now = now_ms();
        let mut pending = Vec::new();
        for saga in active {
            if saga.state == engine::SagaState::Pending {
                pending.push(saga.id.clone());
            }
            self.active.insert(saga.id.clone(), saga);
        }
        info!(
            active = self.active.len(),
            outbox = outbox.len(),
            "resuming sagas found in the store"
        );
        for id in pending {
            self.apply(&id, &Event::Start, now)?;
        }
        for entry in outbox {
            if self.active.contains_key(&entry.saga_id) {
                info!(saga_id = %entry.saga_id, correlation_id = %entry.correlation_id,
                      step = %entry.message.step, attempt = entry.message.attempt, "re-sending in-flight command");
                self.to_send.push(entry);
            } else {
                warn!(saga_id = %entry.saga_id, "outbox entry of a saga that is not active; ignored");
            }
        }
        self.commit().await
    }

    fn create(&mut self, new: NewSaga, now: u64) -> Result<Created, CreateError> {
        if let Some(key) = &new.idempotency_key {
            let existing = match self.batch_keys.get(key) {
                Some(id) => Uuid::parse_str(id).ok(),
                None => self.store.saga_for_key(key)?,
            };
            if let Some(id) = existing {
                let saga = match self.active.get(&id.to_string()) {
                    Some(s) => s.clone(),
                    None => self.store.get(&id)?.ok_or_else(|| {
                        StoreError::Corrupt(format!("idempotency key names missing saga {id}"))
                    })?,
                };
                if !same_request(&saga, &new) {
                    return Err(CreateError::KeyReused(saga.id));
                }
                return Ok(Created::Existing {
                    saga_id: saga.id,
                    order_id: saga.order.order_id,
                    state: saga.state.tag(),
                });
            }
        }
        let id = Uuid::now_v7().to_string();
        let order_id = new.order.order_id.clone();
        let created = engine::create(
            id.clone(),
            (*new.definition).clone(),
            new.order,
            new.correlation_id,
            new.idempotency_key.clone(),
            now,
        );
        self.store.write(&created, None)?;
        self.dirty = true;
        info!(saga_id = %id, correlation_id = %created.saga.correlation_id, order_id = %order_id,
              definition = %created.saga.definition.id(), "saga created");
        metrics::counter!(telemetry::SAGAS_STARTED, "definition" => created.saga.definition.id())
            .increment(1);
        if let Some(key) = new.idempotency_key {
            self.batch_keys.insert(key, id.clone());
        }
        self.active.insert(id.clone(), created.saga);
        self.apply(&id, &Event::Start, now)?;
        Ok(Created::New {
            saga_id: id,
            order_id,
        })
    }

    /// An operator event: the saga may be terminal (FAILED), so it is loaded
    /// from the store when it is not in memory.
    fn operate(&mut self, id: Uuid, event: &Event, now: u64) -> Result<Operated, OperateError> {
        let key = id.to_string();
        if !self.active.contains_key(&key) {
            let saga = self.store.get(&id)?.ok_or(OperateError::NotFound(id))?;
            self.active.insert(key.clone(), saga);
        }
        match self.apply(&key, event, now)? {
            Some(tag) => Ok(Operated::Changed(tag)),
            None => {
                let tag = self
                    .active
                    .get(&key)
                    .map(|s| s.state.tag())
                    .unwrap_or(StateTag::Failed);
                if tag.is_terminal() {
                    self.active.remove(&key);
                }
                Ok(Operated::Unchanged(tag))
            }
        }
    }

    /// Applies one event to an active saga and writes the transition
    /// (unflushed); returns the new state when the saga changed.
    fn apply(&mut self, saga_id: &str, event: &Event, now: u64) -> Result<Option<StateTag>, StoreError> {
        let Some(saga) = self.active.get(saga_id) else {
            debug!(saga_id, ?event, "event for a saga that is not active; ignored");
            return Ok(None);
        };
        let previous = saga.state.tag();
        let t = match engine::transition(saga, event, now) {
            Ok(Some(t)) => t,
            Ok(None) => {
                debug!(saga_id, correlation_id = %saga.correlation_id, ?event, "late or duplicate event; no-op");
                return Ok(None);
            }
            Err(e) => {
                error!(saga_id, correlation_id = %saga.correlation_id, error = %e, "impossible transition");
                return Ok(None);
            }
        };
        self.store.write(&t, Some(previous))?;
        self.dirty = true;
        if let (Event::Abort { .. }, Some((step, kind))) = (event, t.settled) {
            // The command in flight is moot: stop it if it has not left yet.
            self.dispatcher.withdraw(saga_id, step, kind);
        }
        let tag = t.saga.state.tag();
        if tag == StateTag::Failed && previous != StateTag::Failed {
            self.new_dead_letters = true;
            warn!(saga_id, correlation_id = %t.saga.correlation_id,
                  reason = t.saga.reason.as_deref().unwrap_or(""), "saga FAILED: dead letter written");
        }
        self.log(&t);
        let Transition { saga, commands, .. } = t;
        if self.changes.receiver_count() > 0 {
            self.changed.push(Arc::new(saga.clone()));
        }
        self.to_send
            .extend(commands.iter().map(|c| OutboxEntry::new(&saga, c)));
        if saga.state.is_terminal() {
            metrics::counter!(
                telemetry::SAGAS_FINISHED,
                "definition" => saga.definition.id(),
                "state" => tag.as_str(),
            )
            .increment(1);
            self.active.remove(saga_id);
        } else {
            self.active.insert(saga_id.to_string(), saga);
        }
        Ok(Some(tag))
    }

    fn log(&self, t: &Transition) {
        let s = &t.saga;
        for h in &t.history {
            info!(saga_id = %s.id, correlation_id = %s.correlation_id, step = h.step.as_deref().unwrap_or(""),
                  attempt = h.attempt.unwrap_or(0), event = %h.kind, state = h.state.as_str(),
                  detail = h.detail.as_deref().unwrap_or(""), "saga transition");
        }
    }

    /// Group commit: one flush for the batch, then replies and sends.
    async fn commit(&mut self) -> Result<(), StoreError> {
        self.batch_keys.clear();
        if self.dirty {
            if let Err(e) = self.store.flush().await {
                error!(error = %e, "flush failed; stopping without sending");
                return Err(e);
            }
            self.dirty = false;
            metrics::counter!(telemetry::FLUSHES).increment(1);
        }
        metrics::gauge!(telemetry::SAGAS_IN_FLIGHT).set(self.active.len() as f64);
        for (reply, result) in self.acks.drain(..) {
            let _ = reply.send(result);
        }
        for (reply, result) in self.operated.drain(..) {
            let _ = reply.send(result);
        }
        for entry in self.to_send.drain(..) {
            self.dispatcher.dispatch(entry);
        }
        for saga in self.changed.drain(..) {
            let _ = self.changes.send(saga);
        }
        if std::mem::take(&mut self.new_dead_letters) {
            self.publish_dead_letters()?;
        }
        Ok(())
    }

    /// Publishes the durable dead letters not yet confirmed on `saga.dlq`,
    /// each in its own task; a confirmed one leaves the DLQ outbox.
    fn publish_dead_letters(&mut self) -> Result<(), StoreError> {
        for (key, letter) in self.store.dlq_pending()? {
            let fresh = match self.dlq_inflight.lock() {
                Ok(mut set) => set.insert(key.clone()),
                Err(_) => false,
            };
            if !fresh {
                continue;
            }
            let (nats, store, inflight) = (self.nats.clone(), self.store.clone(), self.dlq_inflight.clone());
            tokio::spawn(async move {
                let published = async {
                    let body = serde_json::to_vec(&letter).map_err(|e| e.to_string())?;
                    nats.publish(DLQ_SUBJECT, body.into())
                        .await
                        .map_err(|e| e.to_string())?;
                    nats.flush().await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(Duration::from_secs(5), published).await {
                    Ok(Ok(())) => {
                        info!(saga_id = %letter.saga_id, correlation_id = %letter.correlation_id, "dead letter published");
                        if let Err(e) = store.dlq_published(&key) {
                            warn!(error = %e, "cannot mark dead letter published");
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(saga_id = %letter.saga_id, error = %e, "dead letter not published; retried on restart")
                    }
                    Err(_) => {
                        warn!(saga_id = %letter.saga_id, "dead letter publication timed out; retried on restart")
                    }
                }
                if let Ok(mut set) = inflight.lock() {
                    set.remove(&key);
                }
            });
        }
        Ok(())
    }
}

/// Whether a repeated `CreateOrder` with the same idempotency key asks for the same thing.
fn same_request(saga: &Saga, new: &NewSaga) -> bool {
    let a = &saga.order;
    let b = &new.order;
    saga.definition.name == new.definition.name
        && (!new.version_requested || saga.definition.version == new.definition.version)
        && (!new.order_id_given || a.order_id == b.order_id)
        && a.customer_id == b.customer_id
        && a.items == b.items
        && a.amount_cents == b.amount_cents
        && a.currency == b.currency
}
