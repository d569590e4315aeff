//! The saga runner: the one owner of every in-flight saga.
//!
//! A single task receives creations (from the API, through a [`RunnerHandle`])
//! and outcomes (from the dispatcher), applies them with the pure engine,
//! writes every resulting transition to the store, flushes ONCE for the whole
//! batch (group commit), and only then answers the creators and hands the
//! new commands to the command sink. Unless the store needs each batch
//! committed before the next ([`crate::store::Capabilities`]), the commit
//! runs in a task while the runner decides the next batch (one commit in
//! flight, at most 512 inputs waiting; the next starts when it ends and
//! covers everything decided meanwhile). A batch's effects are an
//! [`crate::effects`] value that yields them only with the store's
//! `Committed`. So no command ever leaves before the state
//! that implies it is durable, and a crash at any point leaves either the old
//! state (the event is redelivered: the command is still in the outbox and
//! is re-sent on start) or the new one with its commands in the outbox.
//!
//! On start it resumes every non-terminal saga: PENDING ones are started,
//! outbox commands are re-sent with their original idempotency keys.
//! In-flight sagas live in memory (a map, removed when terminal); terminal
//! ones are only in the store. With a store that can read evicted sagas
//! back (sled), at most `resident` in-flight sagas stay in memory: beyond that, sagas waiting for a reply are evicted
//! after the flush that made them durable (only their 16-byte id is kept) and
//! read back from the store when their next event arrives. Every in-flight
//! saga has a command out (or a retry timer in the dispatcher) whose outcome
//! is such an event, so an evicted saga is never forgotten; and a restart
//! resumes from the store anyway.
//!
//! Each transition's saga events are written by the store in the same
//! transaction; after the flush the runner wakes the events publisher.
//!
//! Operator events (`AbortSaga`, `RetrySaga`) go through the same path. A
//! saga entering FAILED gets a dead-letter record in the same transaction;
//! after the flush it is published on `saga.dlq` (and again after a restart
//! if the publication was not confirmed).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use saga_wire::OrderPayload;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

pub(crate) use crate::effects::Change;
pub(crate) use crate::ops::{CreateError, Created, OperateError, Operated};
use crate::{
    clock::now_ms,
    cluster::SagaHost,
    definition::SagaDefinition,
    effects::{CreateReply, OperateReply, Pending, Released, Unwritten},
    engine::{self, Event, Saga, StateTag, Transition},
    partition::{partition_of, Ownership},
    saga_spans,
    sink::{CommandSink, Reported},
    store::{Capabilities, Committed, Loaded, OutboxEntry, SharedStore, StoreError},
    telemetry,
};

mod timers;

/// Most events applied under one flush.
const BATCH: usize = 512;

/// A batch of at most this many inputs is committed on the runner's thread
/// ([`crate::store::SagaStore::commit_now`]), not in a task: at low load, where each
/// transition is a flush of its own, the two thread hand-offs of a task cost
/// more than deciding the next batch during the flush saves.
const COMMIT_NOW_INPUTS: usize = 2;

/// A saga to create.
#[derive(Debug, Clone)]
pub(crate) struct NewSaga {
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
    /// jetstream store: run these sagas (a partition taken over, or a saga reloaded).
    Adopt {
        sagas: Vec<Loaded>,
        reply: oneshot::Sender<usize>,
    },
    /// jetstream store: stop running the sagas of a partition.
    Release {
        partition: u32,
        partitions: u32,
        reply: oneshot::Sender<Vec<String>>,
    },
}

type WatchMap = HashMap<String, tokio::sync::watch::Sender<Option<Arc<Change>>>>;

/// Who watches which saga (`WatchSaga`): one `watch` channel per watched
/// saga carrying its latest durable transition, so a transition wakes only
/// the watchers of its own saga without a store read, and a slow watcher
/// sees the latest one (and reads the store when it missed some).
#[derive(Clone, Default)]
struct Watchers(Arc<Mutex<WatchMap>>);

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchMap> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether anyone watches `saga_id`.
    fn watched(&self, saga_id: &str) -> bool {
        self.lock().contains_key(saga_id)
    }

    /// Tells the watchers of `saga_id` (if any) it moved, handing them the
    /// change when it was captured (`None`: the watch began after the
    /// transition was decided; they read the store); forgets the saga when
    /// nobody listens any more or it is terminal.
    fn notify(&self, saga_id: &str, terminal: bool, change: Option<Arc<Change>>) {
        let mut map = self.lock();
        if let Some(tx) = map.get(saga_id) {
            tx.send_replace(change);
            if terminal || tx.receiver_count() == 0 {
                map.remove(saga_id);
            }
        }
    }

    /// Drops every channel: watchers see the coordinator stop.
    fn close_all(&self) {
        self.lock().clear();
    }
}

/// A `WatchSaga` subscription: wakes on each durable transition of one saga;
/// ends (`changed()` fails) when the saga is terminal or the runner stops.
pub(crate) struct Subscription {
    saga_id: String,
    rx: tokio::sync::watch::Receiver<Option<Arc<Change>>>,
    watchers: Watchers,
}

impl Subscription {
    /// Waits for the next transition; `false` once no more will come.
    pub(crate) async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// The latest transition handed over (earlier ones a slow watcher
    /// missed are gone).
    pub(crate) fn latest(&mut self) -> Option<Arc<Change>> {
        self.rx.borrow_and_update().clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.watchers.lock();
        // This receiver still counts while it is being dropped.
        if map.get(&self.saga_id).is_some_and(|tx| tx.receiver_count() <= 1) {
            map.remove(&self.saga_id);
        }
    }
}

/// Handle to the runner; cheap to clone.
#[derive(Clone)]
pub(crate) struct RunnerHandle {
    tx: mpsc::Sender<Request>,
    watchers: Watchers,
    running: tokio::sync::watch::Receiver<bool>,
}

impl RunnerHandle {
    /// Creates (and starts) a saga; returns once it is durable.
    ///
    /// # Errors
    /// [`CreateError`].
    pub(crate) async fn create(&self, new: NewSaga) -> Result<Created, CreateError> {
        self.check_running().map_err(|()| CreateError::NotStarted)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Create { new, reply })
            .await
            .map_err(|_| CreateError::Stopped)?;
        rx.await.map_err(|_| CreateError::Stopped)?
    }

    /// The runner starts once NATS was reached (and recovery is done); until
    /// then requests are refused at once instead of waiting.
    fn check_running(&self) -> Result<(), ()> {
        if *self.running.borrow() {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Waits until the runner takes requests, or stopped taking them (`false`).
    pub(crate) async fn wait_running(&self, running: bool) {
        let mut rx = self.running.clone();
        let _ = rx.wait_for(|r| *r == running).await;
    }

    /// Wakes on every durable transition of `saga_id` from now on (for
    /// `WatchSaga`): subscribe first, then read the store, so nothing falls
    /// in between.
    pub(crate) fn subscribe(&self, saga_id: &str) -> Subscription {
        let rx = {
            let mut map = self.watchers.lock();
            map.entry(saga_id.to_string())
                .or_insert_with(|| tokio::sync::watch::channel(None).0)
                .subscribe()
        };
        Subscription {
            saga_id: saga_id.to_string(),
            rx,
            watchers: self.watchers.clone(),
        }
    }

    /// Applies an operator event (`Abort`, `Retry`) to a saga; returns once
    /// the resulting state is durable.
    ///
    /// # Errors
    /// [`OperateError`].
    pub(crate) async fn operate(&self, saga_id: Uuid, event: Event) -> Result<Operated, OperateError> {
        self.check_running().map_err(|()| OperateError::NotStarted)?;
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

    /// Runs `sagas` (jetstream store): each not already running is resumed,
    /// its in-flight commands re-sent with their keys. Returns how many were new.
    ///
    /// # Errors
    /// The runner stopped.
    pub(crate) async fn adopt(&self, sagas: Vec<Loaded>) -> Result<usize, OperateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Adopt { sagas, reply })
            .await
            .map_err(|_| OperateError::Stopped)?;
        rx.await.map_err(|_| OperateError::Stopped)
    }

    /// Stops running the sagas of `partition` (of `partitions`) once what was
    /// decided for them is written; returns their ids.
    ///
    /// # Errors
    /// The runner stopped.
    pub(crate) async fn release(&self, partition: u32, partitions: u32) -> Result<Vec<String>, OperateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Release {
                partition,
                partitions,
                reply,
            })
            .await
            .map_err(|_| OperateError::Stopped)?;
        rx.await.map_err(|_| OperateError::Stopped)
    }
}

impl SagaHost for RunnerHandle {
    async fn adopt(&self, sagas: Vec<Loaded>) -> Result<usize, OperateError> {
        RunnerHandle::adopt(self, sagas).await
    }

    async fn release(&self, partition: u32, partitions: u32) -> Result<Vec<String>, OperateError> {
        RunnerHandle::release(self, partition, partitions).await
    }

    async fn operate(&self, saga_id: Uuid, event: Event) -> Result<Operated, OperateError> {
        RunnerHandle::operate(self, saga_id, event).await
    }
}

/// The runner task's inputs, built by [`channel`].
pub(crate) struct RunnerInputs {
    /// Most in-flight sagas kept in memory (see the module docs).
    resident: usize,
    requests: mpsc::Receiver<Request>,
    outcomes: mpsc::UnboundedReceiver<Reported>,
    watchers: Watchers,
    running: tokio::sync::watch::Sender<bool>,
}

/// A handle for creators, the sender for the dispatcher and the runner's
/// inputs; at most `resident` in-flight sagas are kept in memory when the
/// store can read evicted ones back.
pub(crate) fn channel(resident: usize) -> (RunnerHandle, mpsc::UnboundedSender<Reported>, RunnerInputs) {
    let (tx, requests) = mpsc::channel(4096);
    let (otx, outcomes) = mpsc::unbounded_channel();
    let watchers = Watchers::default();
    let (running, running_rx) = tokio::sync::watch::channel(false);
    (
        RunnerHandle {
            tx,
            watchers: watchers.clone(),
            running: running_rx,
        },
        otx,
        RunnerInputs {
            resident: resident.max(1),
            requests,
            outcomes,
            watchers,
            running,
        },
    )
}

struct Runner {
    store: SharedStore,
    /// How the store differs from the others (asked once).
    caps: Capabilities,
    /// jetstream store: the partitions this coordinator owns (new saga ids are drawn in them).
    ownership: Option<Ownership>,
    /// jetstream store: sagas whose write was lost, to be reloaded by the owner.
    lost: Option<mpsc::UnboundedSender<String>>,
    sink: Arc<dyn CommandSink>,
    events: crate::events::EventsWake,
    active: HashMap<String, Saga>,
    /// In flight but not in memory (a store that evicts): read back on their next event.
    evicted: HashSet<Uuid>,
    /// Most in-flight sagas kept in `active` (a store that evicts).
    resident: usize,
    dlq_inflight: Arc<Mutex<HashSet<Vec<u8>>>>,
    /// What was decided since the last flush began.
    batch: Pending,
    /// The flush under way (at most one), with what it releases when done.
    flushing: Option<Flushing>,
    watchers: Watchers,
    /// The in-flight sagas' timers (awaits, sleeps, deadlines), evicted ones' included.
    timers: timers::Timers,
    /// Where the sagas' spans go, when this process exports spans.
    spans: Option<&'static saga_trace::Spans>,
    /// What the spans of the sagas' ends need (spans only).
    traces: saga_spans::Traces,
}

/// A flush running in its own task while the runner decides the next batch.
struct Flushing {
    batch: Pending,
    task: crate::store::CommitTask,
    started: std::time::Instant,
}

impl Flushing {
    async fn wait(&mut self) -> Result<Committed, StoreError> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Corrupt(format!("flush task failed: {e}"))),
        }
    }
}

/// Waits until `at` (ms since the Unix epoch), if given (else never returns).
async fn due(at: Option<u64>) {
    match at {
        Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}

/// Waits for the flush under way, if any (else never returns).
async fn flushed(flushing: &mut Option<Flushing>) -> Result<Committed, StoreError> {
    match flushing {
        Some(f) => f.wait().await,
        None => std::future::pending().await,
    }
}

/// Runs the saga runner until `shutdown` fires.
///
/// # Errors
/// A store failure: the runner stops at once, sending nothing more (a
/// restart recovers from what is durable).
pub(crate) async fn run(
    store: SharedStore,
    cluster: Option<(Ownership, mpsc::UnboundedSender<String>)>,
    sink: Arc<dyn CommandSink>,
    events: crate::events::EventsWake,
    mut inputs: RunnerInputs,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let (ownership, lost) = match cluster {
        Some((o, l)) => (Some(o), Some(l)),
        None => (None, None),
    };
    let mut r = Runner {
        caps: store.capabilities(),
        store,
        ownership,
        lost,
        sink,
        events,
        active: HashMap::new(),
        evicted: HashSet::new(),
        resident: inputs.resident,
        dlq_inflight: Arc::new(Mutex::new(HashSet::new())),
        // Publishes what a previous run left unconfirmed.
        batch: Pending::resuming(),
        flushing: None,
        watchers: inputs.watchers.clone(),
        timers: timers::Timers::default(),
        spans: saga_trace::spans(),
        traces: saga_spans::Traces::default(),
    };
    let resume = r.store.resume_at_start()?;
    info!(active = resume.len(), "resuming sagas found in the store");
    r.adopt(resume, now_ms())?;
    r.commit().await?;
    inputs.running.send_replace(true);
    let result = serve(&mut r, &mut inputs, &shutdown).await;
    inputs.running.send_replace(false);
    inputs.watchers.close_all();
    result?;
    // The runner decided nothing since its last commit; a final one covers
    // anything a store still holds staged (none lost: nothing is pending).
    match r.store.begin_commit().await {
        Ok(result) => drop(result?),
        Err(e) => return Err(StoreError::Corrupt(format!("final commit task failed: {e}"))),
    }
    info!(
        in_flight = r.active.len() + r.evicted.len(),
        "saga runner stopped; in-flight sagas resume on next start"
    );
    Ok(())
}

/// The runner's loop ([`serve_batches`]). On an error it still waits for
/// the flush under way (releasing nothing), so no write of the runner is
/// committed after it has returned.
async fn serve(
    r: &mut Runner,
    inputs: &mut RunnerInputs,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    let result = serve_batches(r, inputs, shutdown).await;
    if result.is_err() {
        if let Some(mut f) = r.flushing.take() {
            let _ = f.wait().await;
        }
    }
    result
}

/// Batches of inputs, each applied and group-committed.
async fn serve_batches(
    r: &mut Runner,
    inputs: &mut RunnerInputs,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    let mut requests = Vec::with_capacity(BATCH);
    let mut outcomes = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            result = flushed(&mut r.flushing) => {
                r.flush_done(result)?;
                r.begin_commit()?;
                continue;
            }
            // While a flush runs, the next batch takes at most BATCH inputs, then
            // waits for it: a burst (all replies after a restart) is committed in
            // bounded transactions, not one that grows while the flush runs.
            n = inputs.outcomes.recv_many(&mut outcomes, BATCH), if r.batch.inputs() < BATCH => if n == 0 { break },
            n = inputs.requests.recv_many(&mut requests, BATCH), if r.batch.inputs() < BATCH => if n == 0 { break },
            () = due(r.timers.next_due()), if r.batch.inputs() < BATCH => {}
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
        let fired = r
            .timers
            .take_due(now, BATCH.saturating_sub(outcomes.len() + requests.len()).max(1));
        r.batch.took(outcomes.len() + requests.len() + fired.len());
        for Reported { saga_id, event } in outcomes.drain(..) {
            r.apply(&saga_id, &event, now)?;
        }
        for (saga_id, timer) in fired {
            r.apply(&saga_id.to_string(), &Event::Timer(timer), now)?;
        }
        for request in requests.drain(..) {
            match request {
                Request::Create { new, reply } => {
                    let result = r.create(new, now).await;
                    r.batch.ack(reply, result);
                }
                Request::Operate {
                    saga_id,
                    event,
                    reply,
                } => {
                    let result = r.operate(saga_id, &event, now).await;
                    r.batch.operated(reply, saga_id.to_string(), result);
                }
                Request::Adopt { sagas, reply } => {
                    let n = r.adopt(sagas, now)?;
                    let _ = reply.send(n);
                }
                Request::Release {
                    partition,
                    partitions,
                    reply,
                } => {
                    // What was decided for these sagas is written first.
                    r.commit().await?;
                    let ids: Vec<String> = r
                        .active
                        .keys()
                        .filter(|id| partition_of(id, partitions) == partition)
                        .cloned()
                        .collect();
                    for id in &ids {
                        let gone = r.active.remove(id);
                        r.timers.rearm(gone.as_ref(), None);
                        r.traces.forget(id);
                    }
                    r.store.forget(&ids);
                    info!(partition, sagas = ids.len(), "partition released");
                    let _ = reply.send(ids);
                }
            }
        }
        // Flushed now, or when the flush under way is done.
        r.begin_commit()?;
        if r.caps.commit_each_batch {
            // A batch's writes check the revisions the previous one left
            // (jetstream), so its flush completes before the next batch.
            r.settle().await?;
        }
    }
    r.commit().await
}

impl Runner {
    /// Runs `sagas` with their in-flight commands (at start with sled; on a
    /// partition taken over or a saga reloaded with jetstream): PENDING ones
    /// are started, outbox commands re-sent with their original keys. Sagas
    /// already running are left alone. Returns how many were new.
    fn adopt(&mut self, sagas: Vec<Loaded>, now: u64) -> Result<usize, StoreError> {
        let mut fresh = 0;
        for (saga, outbox) in sagas {
            if self.active.contains_key(&saga.id) || saga.state.is_terminal() {
                continue;
            }
            fresh += 1;
            let id = saga.id.clone();
            let pending = saga.state == engine::SagaState::Pending;
            if self.spans.is_some() {
                self.traces.adopted(&saga, now);
            }
            self.timers.rearm(None, Some(&saga));
            self.active.insert(id.clone(), saga);
            if pending {
                self.apply(&id, &Event::Start, now)?;
            }
            let saga = self.active.get(&id);
            for entry in outbox {
                info!(saga_id = %entry.saga_id, correlation_id = %entry.correlation_id,
                      step = %entry.message.step, attempt = entry.message.attempt, "re-sending in-flight command");
                // The schema is not stored with the entry: it comes from the saga's snapshot.
                let entry = match saga {
                    Some(saga) => entry.with_output_schema(saga),
                    None => entry,
                };
                self.batch.send(entry);
            }
        }
        Ok(fresh)
    }

    /// A new saga id: with jetstream, one in a partition this coordinator owns.
    fn new_saga_id(&self) -> Result<String, CreateError> {
        let Some(ownership) = &self.ownership else {
            return Ok(Uuid::now_v7().to_string());
        };
        if ownership.is_empty() {
            return Err(CreateError::NoPartition);
        }
        // Each draw lands in an owned partition with probability owned/total.
        for _ in 0..10_000 {
            let id = Uuid::now_v7().to_string();
            if ownership.owns(&id) {
                return Ok(id);
            }
        }
        Err(CreateError::NoPartition)
    }

    async fn create(&mut self, new: NewSaga, now: u64) -> Result<Created, CreateError> {
        // jetstream: the id a previous attempt with this key reserved.
        let mut reserved = None;
        if let Some(key) = &new.idempotency_key {
            let pending = self
                .batch
                .reserved(key)
                .or_else(|| self.flushing.as_ref().and_then(|f| f.batch.reserved(key)));
            let existing = match pending {
                Some(id) => Uuid::parse_str(id).ok(),
                None => self.store.saga_for_key(key).await?,
            };
            if let Some(id) = existing {
                let found = match self.active.get(&id.to_string()) {
                    Some(s) => Some(s.clone()),
                    None => self.store.get_latest(&id).await?,
                };
                match found {
                    Some(saga) => {
                        let request = engine::CreateRequest {
                            definition: &new.definition,
                            version_requested: new.version_requested,
                            order: &new.order,
                            order_id_given: new.order_id_given,
                        };
                        if !engine::same_create_request(&saga, &request) {
                            return Err(CreateError::KeyReused(saga.id));
                        }
                        return Ok(Created::Existing {
                            saga_id: saga.id,
                            order_id: saga.order.order_id,
                            state: saga.state.tag(),
                        });
                    }
                    // jetstream: the key names a saga whose record write did not
                    // land (its coordinator died, or JetStream failed, in between):
                    // nothing ran. Create it now under that very id, on the
                    // coordinator holding its partition; the record's create-only
                    // write lets one of any racing attempts win.
                    None if self.ownership.is_some() => {
                        if !self.ownership.as_ref().is_some_and(|o| o.owns(&id.to_string())) {
                            return Err(CreateError::HeldElsewhere(id.to_string()));
                        }
                        reserved = Some(id.to_string());
                    }
                    None => {
                        return Err(
                            StoreError::Corrupt(format!("idempotency key names missing saga {id}")).into(),
                        )
                    }
                }
            }
        }
        let id = match reserved {
            Some(id) => id,
            None => self.new_saga_id()?,
        };
        let order_id = new.order.order_id.clone();
        let created = engine::create(
            id.clone(),
            new.definition.clone(),
            new.order,
            new.correlation_id,
            new.idempotency_key.clone(),
            now,
        );
        info!(saga_id = %id, correlation_id = %created.saga.correlation_id, order_id = %order_id,
              definition = %created.saga.definition.id(), "saga created");
        metrics::counter!(telemetry::SAGAS_STARTED, "definition" => created.saga.definition.id())
            .increment(1);
        if let Some(key) = new.idempotency_key {
            self.batch.reserve_key(key, id.clone());
        }
        self.active.insert(id.clone(), created.saga.clone());
        // Written with its start: one record, index entry and events pointer.
        self.apply_after(&id, &Event::Start, now, Some(created))?;
        Ok(Created::New {
            saga_id: id,
            order_id,
        })
    }

    /// An operator event: the saga may be terminal (FAILED), so it is loaded
    /// from the store when it is not in memory.
    async fn operate(&mut self, id: Uuid, event: &Event, now: u64) -> Result<Operated, OperateError> {
        let key = id.to_string();
        self.reload(&key)?;
        if !self.active.contains_key(&key) {
            let (saga, in_flight) = self
                .store
                .load_for_update(&id)
                .await?
                .ok_or(OperateError::NotFound(id))?;
            if saga.state.is_terminal() {
                self.active.insert(key.clone(), saga);
            } else {
                // In flight but not run here (jetstream): a former holder of its
                // partition created or moved it after the takeover's load, then let
                // it go. Run it with its commands re-sent, as a rescan would; only
                // in memory, a rescan would skip it and it would wait forever.
                self.adopt(vec![(saga, in_flight)], now)?;
            }
        }
        if let Event::Signal {
            name,
            id: signal_id,
            payload,
        } = event
        {
            return self.signal(&key, event, (name, signal_id, payload), now);
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

    /// A signal for the active saga `key`: refused, a repeat, or applied.
    fn signal(
        &mut self,
        key: &str,
        event: &Event,
        (name, signal_id, payload): (&str, &str, &serde_json::Value),
        now: u64,
    ) -> Result<Operated, OperateError> {
        let Some(saga) = self.active.get(key) else {
            return Err(OperateError::Store(StoreError::Corrupt(format!(
                "saga {key} vanished"
            ))));
        };
        let tag = saga.state.tag();
        let correlation_id = saga.correlation_id.clone();
        let checked = engine::check_signal(saga, name, signal_id, payload);
        if tag.is_terminal() {
            // Loaded only to answer; the runner keeps no finished saga.
            self.active.remove(key);
        }
        let fate = checked.inspect_err(|e| {
            info!(saga_id = key, correlation_id, signal = name, signal_id, reason = %e, "signal refused");
        })?;
        if fate == engine::SignalFate::Duplicate {
            return Ok(Operated::Signalled(fate, tag));
        }
        let tag = self.apply(key, event, now)?.unwrap_or(tag);
        info!(
            saga_id = key,
            correlation_id,
            signal = name,
            signal_id,
            fate = fate.as_str(),
            "signal received"
        );
        Ok(Operated::Signalled(fate, tag))
    }

    /// Applies one event to an active saga and writes the transition
    /// (unflushed); returns the new state when the saga changed.
    fn apply(&mut self, saga_id: &str, event: &Event, now: u64) -> Result<Option<StateTag>, StoreError> {
        self.apply_after(saga_id, event, now, None)
    }

    /// [`Runner::apply`] to a saga whose `creation` is not written yet: both
    /// are written as one transition (its history entries are the creation's
    /// and then the event's).
    fn apply_after(
        &mut self,
        saga_id: &str,
        event: &Event,
        now: u64,
        creation: Option<Transition>,
    ) -> Result<Option<StateTag>, StoreError> {
        self.reload(saga_id)?;
        let Some(saga) = self.active.get(saga_id) else {
            debug!(saga_id, ?event, "event for a saga that is not active; ignored");
            return Ok(None);
        };
        let previous = saga.state.tag();
        let t = match engine::transition(saga, event, now) {
            Ok(Some(t)) => Some(t),
            Ok(None) => {
                debug!(saga_id, correlation_id = %saga.correlation_id, ?event, "late or duplicate event; no-op");
                None
            }
            Err(e) => {
                error!(saga_id, correlation_id = %saga.correlation_id, error = %e, "impossible transition");
                None
            }
        };
        let Some(mut t) = t else {
            if let Some(created) = creation {
                self.store.stage(&created, None)?;
                self.timers.rearm(None, Some(&created.saga));
                self.batch.wrote();
            }
            return Ok(None);
        };
        let written_from = match creation {
            Some(created) => {
                let mut history = created.history;
                history.append(&mut t.history);
                t.history = history;
                None
            }
            None => Some(saga),
        };
        self.store.stage(&t, written_from)?;
        self.batch.wrote();
        // A new saga's timers were never armed; a finished one's all go.
        self.timers
            .rearm(written_from, Some(&t.saga).filter(|s| !s.state.is_terminal()));
        if let Event::Abort { .. } | Event::Timer(engine::Timer::Deadline) = event {
            // The commands in flight are moot: stop them if they have not left
            // yet, in the dispatcher or still waiting for a flush here.
            for (step, kind) in &t.settled {
                self.sink.withdraw(saga_id, *step, *kind);
                self.batch.withdraw(saga_id, *step, *kind);
                if let Some(f) = self.flushing.as_mut() {
                    f.batch.withdraw(saga_id, *step, *kind);
                }
            }
        }
        let tag = t.saga.state.tag();
        if self.spans.is_some() {
            for span in self.traces.transition(written_from, &t.saga, previous, now) {
                self.batch.span(saga_id, span);
            }
        }
        if engine::enters_failed(&t.saga, Some(previous)) {
            self.batch.wrote_dead_letter();
            warn!(saga_id, correlation_id = %t.saga.correlation_id,
                  reason = t.saga.reason.as_deref().unwrap_or(""), "saga FAILED: dead letter written");
        }
        self.log(&t);
        let Transition {
            saga,
            commands,
            history,
            ..
        } = t;
        let change = self.watchers.watched(saga_id).then(|| {
            Arc::new(Change {
                saga: saga.clone(),
                history,
            })
        });
        self.batch
            .moved((saga.id.clone(), saga.state.is_terminal(), change));
        for c in &commands {
            self.batch.send(OutboxEntry::new(&saga, c));
        }
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

    /// Brings an evicted saga back into memory from the store (its latest
    /// record: staged, being committed or flushed).
    fn reload(&mut self, saga_id: &str) -> Result<(), StoreError> {
        if self.evicted.is_empty() {
            return Ok(());
        }
        let Some(id) = Uuid::parse_str(saga_id).ok().filter(|id| self.evicted.remove(id)) else {
            return Ok(());
        };
        if !self.caps.evicts_resident {
            return Ok(());
        }
        match self.store.read_back(&id)? {
            Some(saga) if !saga.state.is_terminal() => {
                self.active.insert(saga_id.to_string(), saga);
            }
            Some(_) => {}
            None => return Err(StoreError::Corrupt(format!("in-flight saga {id} is missing"))),
        }
        Ok(())
    }

    /// Keeps at most `resident` in-flight sagas in memory (a store that evicts): the
    /// excess, and a quarter more so this does not run on every batch, is
    /// evicted, longest-waiting first (the oldest last transition: a saga
    /// that just moved will hear back soonest). Called when a flush is done;
    /// a saga whose latest transition is still staged or being committed is
    /// read back from there ([`crate::store::SagaStore::read_back`]).
    fn evict(&mut self) {
        if self.active.len() <= self.resident || !self.caps.evicts_resident {
            return;
        }
        let excess = self.active.len() - (self.resident - self.resident / 4);
        let mut by_age: Vec<(u64, &str)> = self
            .active
            .iter()
            .map(|(k, s)| (s.updated_at_ms, k.as_str()))
            .collect();
        by_age.select_nth_unstable(excess - 1);
        let victims: Vec<(String, Uuid)> = by_age[..excess]
            .iter()
            .filter_map(|(_, k)| Uuid::parse_str(k).ok().map(|id| (k.to_string(), id)))
            .collect();
        for (key, id) in victims {
            self.active.remove(&key);
            self.evicted.insert(id);
        }
        self.active.shrink_to(self.resident.saturating_mul(2));
        debug!(
            resident = self.active.len(),
            evicted = self.evicted.len(),
            "in-flight sagas evicted from memory"
        );
    }

    fn log(&self, t: &Transition) {
        let s = &t.saga;
        for h in &t.history {
            info!(saga_id = %s.id, correlation_id = %s.correlation_id, step = h.step.as_deref().unwrap_or(""),
                  attempt = h.attempt.unwrap_or(0), event = %h.kind, state = h.state.as_str(),
                  detail = h.detail.as_deref().unwrap_or(""), "saga transition");
        }
    }

    /// Starts the group commit of what was decided since the last flush
    /// began: its flush runs in a task while the runner decides the next
    /// batch, and its replies, commands and wake-ups are released only when
    /// that flush is done ([`Runner::flush_done`]). With a flush already
    /// under way this waits: that flush's end starts the next, which then
    /// covers everything decided meanwhile (one flush in flight at a time,
    /// so batches grow with the load and are released in order). A batch
    /// that wrote nothing is released at once.
    fn begin_commit(&mut self) -> Result<(), StoreError> {
        if self.flushing.is_some() {
            return Ok(());
        }
        if self.batch.is_empty() {
            // Inputs that changed nothing (late replies): nothing to wait for.
            self.batch = Pending::default();
            return Ok(());
        }
        let batch = match std::mem::take(&mut self.batch).release_unwritten() {
            Unwritten::Released(released) => return self.release(released),
            Unwritten::NeedsCommit(batch) => batch,
        };
        let started = std::time::Instant::now();
        if batch.inputs() <= COMMIT_NOW_INPUTS {
            if let Some(result) = self.store.commit_now() {
                return self.committed(batch, started, result);
            }
        }
        self.flushing = Some(Flushing {
            batch,
            task: self.store.begin_commit(),
            started,
        });
        Ok(())
    }

    /// The flush under way ended: release its batch, or stop on a failure
    /// (sending nothing: the outbox re-sends after a restart).
    fn flush_done(&mut self, result: Result<Committed, StoreError>) -> Result<(), StoreError> {
        let Some(Flushing { batch, started, .. }) = self.flushing.take() else {
            return Ok(());
        };
        self.committed(batch, started, result)
    }

    /// `batch`'s commit (begun at `started`) ended with `result`.
    fn committed(
        &mut self,
        batch: Pending,
        started: std::time::Instant,
        result: Result<Committed, StoreError>,
    ) -> Result<(), StoreError> {
        let committed = match result {
            Ok(committed) => committed,
            Err(e) => {
                error!(error = %e, "flush failed; stopping without sending");
                return Err(e);
            }
        };
        metrics::counter!(telemetry::FLUSHES).increment(1);
        metrics::histogram!(telemetry::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        let released = batch.committed(committed);
        if !released.lost().is_empty() {
            self.forget_lost(released.lost());
        }
        self.release(released)
    }

    /// Waits for the flush under way, if any, and releases its batch.
    async fn settle(&mut self) -> Result<(), StoreError> {
        if let Some(f) = self.flushing.as_mut() {
            let result = f.wait().await;
            self.flush_done(result)?;
        }
        Ok(())
    }

    /// Flushes everything decided so far and releases it, before returning.
    async fn commit(&mut self) -> Result<(), StoreError> {
        self.settle().await?;
        self.begin_commit()?;
        self.settle().await
    }

    /// Replies, sends and wakes what a committed batch decided.
    fn release(&mut self, released: Released) -> Result<(), StoreError> {
        self.evict();
        metrics::gauge!(telemetry::SAGAS_IN_FLIGHT).set((self.active.len() + self.evicted.len()) as f64);
        metrics::gauge!(telemetry::TIMERS_PENDING).set(self.timers.len() as f64);
        let delivery = released.into_delivery();
        // Woken in reverse order of urgency: tokio runs the task woken last
        // first (its LIFO slot), the others after it in the order they were
        // woken. The commands go first, the events publisher (which yields
        // once more) last, so its JetStream traffic queues behind the
        // commands on the shared connection, not in front of them.
        if delivery.wrote {
            // Every transition wrote its events; they are durable now.
            self.events.wake();
        }
        for (id, terminal, change) in delivery.changed {
            self.watchers.notify(&id, terminal, change);
        }
        for (reply, result) in delivery.acks {
            let _ = reply.send(result);
        }
        for (reply, _, result) in delivery.operated {
            let _ = reply.send(result);
        }
        for entry in delivery.to_send {
            self.sink.dispatch(entry);
        }
        if delivery.dead_letters {
            self.publish_dead_letters()?;
        }
        if let Some(spans) = self.spans {
            for span in delivery.spans {
                spans.emit(span);
            }
        }
        Ok(())
    }

    /// Sagas whose write did not land (jetstream: another coordinator wrote
    /// them) are forgotten here — their effects were dropped from the
    /// batch — and handed to the partition owner to reload from what is durable.
    fn forget_lost(&mut self, lost: &[String]) {
        for id in lost {
            let gone = self.active.remove(id);
            self.timers.rearm(gone.as_ref(), None);
            self.traces.forget(id);
        }
        if let Some(tx) = &self.lost {
            for id in lost {
                let _ = tx.send(id.clone());
            }
        }
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
            let (sink, store, inflight) = (self.sink.clone(), self.store.clone(), self.dlq_inflight.clone());
            tokio::spawn(async move {
                let published = sink.publish_dead_letter(letter.clone());
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

#[cfg(test)]
mod tests;
