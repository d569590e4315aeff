//! The coordinator's durable state, in sled. Everything sled-specific lives here.
//!
//! Trees:
//! - `sagas`: saga id (16 UUID bytes; v7, so key order is creation order) →
//!   `{"v":1,"saga":{…}}` (the record; its definition by `definition_ref`,
//!   or inline in records written by earlier versions);
//! - `definitions`: `name@version#n` → the definition snapshot records refer
//!   to (stored once per distinct content, kept);
//! - `history`: saga id ++ seq (u64 BE) → one [`HistoryEntry`] (`{"v":1,…}`);
//! - `by_state`: state tag (1 byte) ++ saga id → `[]`, the state index;
//! - `outbox`: saga id ++ step (u32 BE) ++ kind (1 byte) → the command to send
//!   (`{"v":1,…}`), removed when its outcome is recorded;
//! - `idempotency`: client `CreateOrder` key → saga id;
//! - `dead_letters`: saga id ++ seq → [`DeadLetter`], one per entry into FAILED (kept);
//! - `dlq_outbox`: the same keys, for dead letters not yet published on `saga.dlq`;
//! - `events.<generation>` (16 hex digits): the events log, in commit order.
//!   Key: a sequence number (u64 BE, increasing over the store's life).
//!   Value: a 41-byte pointer to the history entries one transition wrote
//!   (version byte 1 ++ saga id ++ first seq ++ last seq ++ time in ms, u64
//!   BE each), written in the same transaction as those entries. The
//!   publisher (see `events`) builds each event from the history entry and
//!   the saga record (every field it copies from the record is fixed at
//!   creation) and records how far it got in `meta` (`events-cursor`:
//!   generation ++ sequence, not flushed: after a crash the last batches are
//!   re-published and JetStream drops the copies by `Nats-Msg-Id`). Nothing
//!   is removed key by key: once the log holds `EVENTS_ROTATE` published
//!   pointers a new generation is started, and a generation entirely
//!   published is dropped whole (sled frees its pages). A log written by an
//!   earlier version (`events_outbox`: one event copy per history entry,
//!   removed one by one) is converted on open.
//!
//! [`Store::write`] stages one transition (record, history, index, outbox,
//! idempotency key). The caller groups many writes and then calls
//! [`Store::flush_writes`] once (group commit): every staged transition is
//! applied in ONE sled transaction (together or not at all), then flushed;
//! the caller sends no command before that returns.
//!
//! Durability: sled 0.34's `flush` writes its log and syncs it with
//! `sync_file_range(2)` (data pages, not file metadata, and not a full
//! `fsync`). On ext4/xfs with a preallocated log that survives a process
//! crash (kill -9) completely, and a power loss in practice; it is not the
//! guarantee of `fsync` on every file system. This module must not send
//! anything or decide anything: it stores what the engine decided.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use saga_proto::wire::CommandKind;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::{transaction::ConflictableTransactionError, Transactional};
use uuid::Uuid;

use crate::{
    definition::RetryPolicy,
    definition::SagaDefinition,
    engine::{Command, HistoryEntry, Saga, SagaState, StateTag, StepProgress, Transition},
};

/// Format version of every stored value.
const FORMAT: u32 = 1;

/// Default bound of sled's page cache.
pub const DEFAULT_CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// A failure of the coordinator's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or internal error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value cannot be decoded: the data is corrupt or from an unknown version.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// JetStream (the `jetstream` store) failed or timed out.
    #[error("jetstream: {0}")]
    JetStream(String),
}

/// A command waiting in the outbox: exactly what is sent on NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Saga the command belongs to.
    pub saga_id: String,
    /// Step index.
    pub step: usize,
    /// Forward or compensate.
    pub kind: CommandKind,
    /// NATS subject.
    pub subject: String,
    /// Per-attempt request timeout.
    pub timeout_ms: u64,
    /// Backoff policy of the step.
    pub retry: RetryPolicy,
    /// Correlation id for headers and logs.
    pub correlation_id: String,
    /// The envelope.
    pub message: saga_proto::wire::Command,
}

impl OutboxEntry {
    /// The outbox entry of `command` for `saga`.
    pub fn new(saga: &Saga, command: &Command) -> Self {
        OutboxEntry {
            saga_id: saga.id.clone(),
            step: command.step,
            kind: command.kind,
            subject: command.subject.clone(),
            timeout_ms: command.timeout_ms,
            retry: command.retry,
            correlation_id: saga.correlation_id.clone(),
            message: command.message.clone(),
        }
    }
}

/// The record of a saga that entered FAILED: an operator must act
/// (`RetrySaga`). Published on `saga.dlq` as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The failed saga.
    pub saga_id: String,
    /// `name@version`.
    pub definition: String,
    /// Correlation id of the saga.
    pub correlation_id: String,
    /// Step whose compensation failed.
    pub step: String,
    /// Why.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub failed_at_ms: u64,
    /// The order.
    pub order: saga_proto::wire::OrderPayload,
}

impl DeadLetter {
    /// The dead letter of `saga` when it is FAILED.
    pub fn of(saga: &Saga) -> Option<Self> {
        let crate::engine::SagaState::Failed { step } = saga.state else {
            return None;
        };
        Some(DeadLetter {
            saga_id: saga.id.clone(),
            definition: saga.definition.id(),
            correlation_id: saga.correlation_id.clone(),
            step: saga
                .definition
                .steps
                .get(step)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            reason: saga.reason.clone().unwrap_or_default(),
            failed_at_ms: saga.updated_at_ms,
            order: saga.order.clone(),
        })
    }
}

/// A saga event waiting to be published to JetStream: the event and the
/// subjects it goes to (fixed when the transition is written, so a definition
/// reload never changes where an already-committed event goes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// `saga.events.<definition>.<event>`.
    pub subject: String,
    /// The definition's domain alias for this event, if any (`orders.completed`).
    pub alias: Option<String>,
    /// The event.
    pub event: saga_proto::wire::SagaEvent,
}

impl EventRecord {
    /// The event of history entry `h` of `saga`.
    pub fn new(saga: &Saga, h: &HistoryEntry) -> Self {
        Self::build(
            &saga.id,
            &saga.definition,
            &saga.order,
            &saga.correlation_id,
            saga.created_at_ms,
            h,
        )
    }

    /// The event of history entry `h` of the saga `source` describes.
    fn of(source: &EventSource, h: &HistoryEntry) -> Self {
        Self::build(
            &source.id,
            &source.definition,
            &source.order,
            &source.correlation_id,
            source.created_at_ms,
            h,
        )
    }

    fn build(
        saga_id: &str,
        d: &SagaDefinition,
        order: &saga_proto::wire::OrderPayload,
        correlation_id: &str,
        created_at_ms: u64,
        h: &HistoryEntry,
    ) -> Self {
        EventRecord {
            subject: saga_proto::wire::event_subject(&d.name, &h.kind),
            alias: d.events.get(&h.kind).cloned(),
            event: saga_proto::wire::SagaEvent {
                v: saga_proto::wire::EVENT_FORMAT_VERSION,
                saga_id: saga_id.to_string(),
                definition: d.id(),
                sequence: h.seq,
                event: h.kind.clone(),
                step: h.step.clone(),
                attempt: h.attempt,
                detail: h.detail.clone(),
                state: h.state.as_str().to_string(),
                at_ms: h.at_ms,
                saga_created_at_ms: created_at_ms,
                correlation_id: correlation_id.to_string(),
                order: order.clone(),
            },
        }
    }
}

/// What a saga's events take from its record: the fields fixed when it was
/// created (so any later record of the saga gives the same).
struct EventSource {
    id: String,
    definition: Arc<SagaDefinition>,
    order: saga_proto::wire::OrderPayload,
    correlation_id: String,
    created_at_ms: u64,
}

/// A saga record read for its events only: the rest is skipped, not built.
#[derive(Deserialize)]
struct EventSourceRecordIn {
    saga: EventSourceIn,
}

#[derive(Deserialize)]
struct EventSourceIn {
    id: String,
    #[serde(default)]
    definition: Option<Arc<SagaDefinition>>,
    #[serde(default)]
    definition_ref: Option<String>,
    order: saga_proto::wire::OrderPayload,
    correlation_id: String,
    created_at_ms: u64,
}

/// Most transitions whose events wait in memory for the publisher.
const EVENTS_READY: usize = 4096;

/// See `Store::events_ready`.
#[derive(Default)]
struct EventsReady {
    /// Sequence of the first pointer not yet published.
    next: u64,
    queue: std::collections::VecDeque<(u64, u64, Vec<EventRecord>)>,
}

/// Most sagas whose [`EventSource`] the events publisher keeps: a saga's
/// transitions are close together in the log, so most are read once.
const EVENT_SOURCES: usize = 8192;

/// The events publisher's recently read [`EventSource`]s, oldest first out.
#[derive(Default)]
struct EventSources {
    by_id: HashMap<[u8; 16], Arc<EventSource>>,
    order: std::collections::VecDeque<[u8; 16]>,
}

#[derive(Serialize)]
struct Versioned<T> {
    v: u32,
    #[serde(flatten)]
    value: T,
}

/// A saga record as written: the saga with its definition by reference
/// (`name@version#n`, a row of the `definitions` tree), so the snapshot is
/// stored once per distinct definition instead of in every record at every
/// transition (it was over half of each record's bytes).
#[derive(Serialize)]
struct SagaRecordOut<'a> {
    saga: SagaOut<'a>,
}

#[derive(Serialize)]
struct SagaOut<'a> {
    id: &'a str,
    definition_ref: &'a str,
    order: &'a saga_proto::wire::OrderPayload,
    correlation_id: &'a str,
    idempotency_key: &'a Option<String>,
    state: &'a SagaState,
    steps: &'a [StepProgress],
    reason: &'a Option<String>,
    created_at_ms: u64,
    updated_at_ms: u64,
    seq: u64,
}

/// A saga record as read: the definition by reference, or inline (records
/// written before `definition_ref` existed).
#[derive(Debug, Deserialize)]
struct SagaRecordIn {
    saga: SagaIn,
}

#[derive(Debug, Deserialize)]
struct SagaIn {
    id: String,
    #[serde(default)]
    definition: Option<Arc<SagaDefinition>>,
    #[serde(default)]
    definition_ref: Option<String>,
    order: saga_proto::wire::OrderPayload,
    correlation_id: String,
    idempotency_key: Option<String>,
    state: SagaState,
    steps: Vec<StepProgress>,
    reason: Option<String>,
    created_at_ms: u64,
    updated_at_ms: u64,
    seq: u64,
}

/// The definitions saga records refer to, in memory: by the `Arc` the
/// runner's sagas share (so naming it costs no encoding) and by reference.
#[derive(Default)]
struct DefinitionRefs {
    by_arc: Vec<(std::sync::Weak<SagaDefinition>, String)>,
    by_ref: HashMap<String, Arc<SagaDefinition>>,
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Versioned { v: FORMAT, value })
        .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

/// The format version of a stored value, read on its own.
#[derive(Deserialize)]
struct Version {
    v: u32,
}

/// Decodes a value [`encode`] wrote: the version first, then the value from
/// the same bytes (its `v` is an unknown field the value ignores). Two
/// passes, but neither buffers: `#[serde(flatten)]` on the way in would make
/// serde copy every value into an intermediate tree first.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("{what}: {e}"));
    let Version { v } = serde_json::from_slice(bytes).map_err(corrupt)?;
    if v != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "{what}: unsupported format version {v}"
        )));
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}

/// Runs sled's blocking work (a transaction, a flush) on the blocking pool.
/// Not sled's `flush_async`: that goes through sled's own I/O thread pool,
/// one more thread hand-off per flush.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Corrupt(format!("blocking store task failed: {e}")))?
}

pub(crate) fn saga_key(id: &str) -> Result<[u8; 16], StoreError> {
    Uuid::parse_str(id)
        .map(|u| *u.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("saga id {id:?} is not a UUID: {e}")))
}

fn state_key(tag: StateTag, id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag as u8);
    k.extend_from_slice(id);
    k
}

pub(crate) fn history_key(id: &[u8; 16], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn outbox_key(id: &[u8; 16], step: usize, kind: CommandKind) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.extend_from_slice(id);
    k.extend_from_slice(&u32::try_from(step).unwrap_or(u32::MAX).to_be_bytes());
    k.push(match kind {
        CommandKind::Forward => 0,
        CommandKind::Compensate => 1,
    });
    k
}

/// Published events-log pointers after which a new generation is started.
const EVENTS_ROTATE: u64 = 50_000;
/// `meta` key of the events publisher's cursor.
const EVENTS_CURSOR: &[u8] = b"events-cursor";
/// Name prefix of the events log's generations.
const EVENTS_TREE: &str = "events.";
/// The events log of earlier versions (one event copy per history entry).
const LEGACY_EVENTS_TREE: &str = "events_outbox";

fn events_tree_name(generation: u64) -> String {
    format!("{EVENTS_TREE}{generation:016x}")
}

/// An events-log pointer: the history entries `first..=last` of saga `id`,
/// written at `at_ms`.
fn event_pointer(id: &[u8; 16], first: u64, last: u64, at_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(41);
    v.push(1);
    v.extend_from_slice(id);
    v.extend_from_slice(&first.to_be_bytes());
    v.extend_from_slice(&last.to_be_bytes());
    v.extend_from_slice(&at_ms.to_be_bytes());
    v
}

/// A decoded [`event_pointer`].
struct EventPointer {
    id: [u8; 16],
    first: u64,
    last: u64,
    at_ms: u64,
}

fn be_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what}: {} bytes, not 8", bytes.len())))
}

fn parse_event_pointer(v: &[u8]) -> Result<EventPointer, StoreError> {
    match v {
        [1, rest @ ..] if rest.len() == 40 => {
            let mut id = [0; 16];
            id.copy_from_slice(&rest[..16]);
            Ok(EventPointer {
                id,
                first: be_u64(&rest[16..24], "events log")?,
                last: be_u64(&rest[24..32], "events log")?,
                at_ms: be_u64(&rest[32..40], "events log")?,
            })
        }
        [1, ..] => Err(StoreError::Corrupt(format!(
            "events log: pointer of {} bytes",
            v.len()
        ))),
        [version, ..] => Err(StoreError::Corrupt(format!(
            "events log: unsupported format version {version}"
        ))),
        [] => Err(StoreError::Corrupt("events log: empty pointer".into())),
    }
}

/// A key handed to the events publisher: generation ++ sequence.
fn events_log_key(generation: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&generation.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Maps a failed sled transaction: a storage error, or an abort (`what`
/// names the transaction; nothing here aborts on purpose).
fn transaction_error(what: &'static str) -> impl Fn(sled::transaction::TransactionError<()>) -> StoreError {
    move |e| match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
        sled::transaction::TransactionError::Abort(()) => StoreError::Corrupt(what.into()),
    }
}

fn read_lock<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn write_lock<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The coordinator's sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    sagas: sled::Tree,
    history: sled::Tree,
    by_state: sled::Tree,
    outbox: sled::Tree,
    idempotency: sled::Tree,
    dead_letters: sled::Tree,
    dlq_outbox: sled::Tree,
    /// The events log's generations, oldest first; transactions write to
    /// the last (holding the read lock while they commit, so a generation
    /// is never dropped or replaced under a transaction).
    events: Arc<std::sync::RwLock<Vec<(u64, sled::Tree)>>>,
    /// How far the events publisher got: `(generation, sequence)`.
    events_cursor: Arc<Mutex<Option<(u64, u64)>>>,
    /// Events of committed transitions handed to the publisher in memory,
    /// `(generation, sequence, events)` in sequence order, so it need not
    /// read them back from the log (which it does when this falls behind:
    /// after a start, or when more than [`EVENTS_READY`] wait).
    events_ready: Arc<Mutex<EventsReady>>,
    /// Whether transitions write to the events log (`--no-events`: not).
    events_on: bool,
    event_sources: Arc<Mutex<EventSources>>,
    /// Published pointers after which a new generation starts.
    events_rotate: u64,
    meta: sled::Tree,
    /// Set before staged writes are applied, cleared by
    /// [`Store::flush_writes`] once the writer's flush returned.
    unflushed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Transitions written since the last flush, not yet in sled.
    staged: Arc<Mutex<Staged>>,
    /// `definitions`: `name@version#n` → a definition snapshot sagas refer to.
    definitions: sled::Tree,
    refs: Arc<Mutex<DefinitionRefs>>,
}

/// The trees a staged write goes to (besides `sagas`).
#[derive(Debug, Clone, Copy)]
enum Tree {
    History,
    Events,
    ByState,
    Outbox,
    Idempotency,
    DeadLetters,
    DlqOutbox,
}

/// A staged insert (`Some`) or removal (`None`) of a key of a tree.
type Op = (Tree, Vec<u8>, Option<Vec<u8>>);

/// What [`Store::write`] staged for the next flush.
#[derive(Default)]
struct Staged {
    /// Inserts (`Some`) and removals (`None`), in order.
    ops: Vec<Op>,
    /// Each staged saga's latest record.
    records: HashMap<[u8; 16], Vec<u8>>,
    /// Sequence of the next events-log pointer.
    next_event: u64,
    /// The events of the staged pointers, by sequence, for `Store::events_ready`.
    events: Vec<(u64, Vec<EventRecord>)>,
    /// The records of the transaction being applied now: the runner stages
    /// its next batch while the previous one is committed, and
    /// [`Store::get_latest`] must see them until sled does.
    applying: Option<Arc<HashMap<[u8; 16], Vec<u8>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(sled)")
    }
}

/// A saga loaded for running: the record and the commands it has in flight.
pub type Loaded = (Saga, Vec<OutboxEntry>);

/// One page of [`Store::list`].
#[derive(Debug)]
pub struct Page {
    /// Sagas, oldest first.
    pub sagas: Vec<Saga>,
    /// Last id of the page when more may follow.
    pub next: Option<Uuid>,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// # Errors
    /// sled cannot open the directory (missing permissions, another process holds it).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`] with sled's page cache bounded to `cache_bytes`
    /// (sled's own default is 1 GiB, which a long-running coordinator grows into).
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // sled releases its file lock from a background thread a moment after the
        // last handle is dropped (an in-process restart, or a previous process still
        // exiting): retry a lock conflict for up to 3 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .cache_capacity(cache_bytes)
                .open()
            {
                Err(sled::Error::Io(e))
                    if std::time::Instant::now() < deadline && e.to_string().contains("lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        Store {
            sagas: db.open_tree("sagas")?,
            history: db.open_tree("history")?,
            by_state: db.open_tree("by_state")?,
            outbox: db.open_tree("outbox")?,
            idempotency: db.open_tree("idempotency")?,
            dead_letters: db.open_tree("dead_letters")?,
            dlq_outbox: db.open_tree("dlq_outbox")?,
            events: Default::default(),
            events_cursor: Default::default(),
            events_ready: Default::default(),
            events_on: true,
            event_sources: Default::default(),
            events_rotate: EVENTS_ROTATE,
            meta: db.open_tree("meta")?,
            unflushed: Default::default(),
            staged: Default::default(),
            definitions: db.open_tree("definitions")?,
            refs: Default::default(),
            db,
        }
        .with_events_log()
    }

    /// This store without saga events (`--no-events`): transitions write no
    /// events-log pointers (what an earlier run logged stays for a later run
    /// with events).
    #[must_use]
    pub fn without_events(mut self) -> Self {
        self.events_on = false;
        self
    }

    /// Opens the events log: its generations (those before the publisher's
    /// cursor are published and dropped), the cursor, the next sequence; a
    /// log of an earlier version is converted first.
    fn with_events_log(self) -> Result<Self, StoreError> {
        let cursor = match self.meta.get(EVENTS_CURSOR)? {
            Some(v) if v.len() == 16 => Some((
                be_u64(&v[..8], "events cursor")?,
                be_u64(&v[8..], "events cursor")?,
            )),
            Some(v) => return Err(StoreError::Corrupt(format!("events cursor of {} bytes", v.len()))),
            None => None,
        };
        let mut generations: Vec<u64> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|name| {
                std::str::from_utf8(name)
                    .ok()?
                    .strip_prefix(EVENTS_TREE)
                    .map(str::to_owned)
            })
            .filter_map(|hex| u64::from_str_radix(&hex, 16).ok())
            .collect();
        generations.sort_unstable();
        if let Some((published, _)) = cursor {
            for g in generations.iter().filter(|g| **g < published) {
                self.db.drop_tree(events_tree_name(*g))?;
            }
            generations.retain(|g| *g >= published);
        }
        if generations.is_empty() {
            generations.push(cursor.map_or(0, |(g, _)| g));
        }
        let mut trees = Vec::with_capacity(generations.len());
        let (mut first_pending, mut last) = (None, None);
        for g in generations {
            let tree = self.db.open_tree(events_tree_name(g))?;
            if let Some((k, _)) = tree.first()? {
                first_pending = first_pending.or(Some(be_u64(&k, "events log key")?));
            }
            if let Some((k, _)) = tree.last()? {
                last = last.max(Some(be_u64(&k, "events log key")?));
            }
            trees.push((g, tree));
        }
        let next = last.max(cursor.map(|(_, seq)| seq)).map_or(0, |seq| seq + 1);
        *write_lock(&self.events) = trees;
        *lock(&self.events_cursor) = cursor;
        self.staged().next_event = next;
        lock(&self.events_ready).next = match cursor {
            Some((_, seq)) => seq + 1,
            None => first_pending.unwrap_or(next),
        };
        self.convert_legacy_events()?;
        Ok(self)
    }

    /// Moves the events an earlier version left unpublished in
    /// `events_outbox` (one copy per history entry, in saga-and-sequence
    /// order) into the log as pointers, in one transaction, then drops it.
    fn convert_legacy_events(&self) -> Result<(), StoreError> {
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n == LEGACY_EVENTS_TREE.as_bytes())
        {
            return Ok(());
        }
        let legacy = self.db.open_tree(LEGACY_EVENTS_TREE)?;
        let mut moved = Vec::new();
        for kv in legacy.iter() {
            let (k, v) = kv?;
            let record: EventRecord = decode(&v, "event")?;
            let id: [u8; 16] = k
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("events_outbox key".into()))?;
            moved.push((
                record.event.at_ms,
                k,
                event_pointer(
                    &id,
                    record.event.sequence,
                    record.event.sequence,
                    record.event.at_ms,
                ),
            ));
        }
        // In time order (each saga's entries stay in sequence): pruning relies on
        // the log's times not going back.
        moved.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        if !moved.is_empty() {
            let mut staged = self.staged();
            let first = staged.next_event;
            staged.next_event += moved.len() as u64;
            drop(staged);
            let events = read_lock(&self.events);
            let Some((_, log)) = events.last() else {
                return Err(StoreError::Corrupt("the events log has no generation".into()));
            };
            (&legacy, log)
                .transaction(|(legacy, log)| {
                    for (seq, (_, k, pointer)) in (first..).zip(&moved) {
                        log.insert(&seq.to_be_bytes(), pointer.as_slice())?;
                        legacy.remove(k)?;
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .map_err(transaction_error("events conversion aborted"))?;
            self.db.flush()?;
        }
        drop(legacy);
        self.db.drop_tree(LEGACY_EVENTS_TREE)?;
        Ok(())
    }

    /// Stages one transition: the saga record, its new history entries and
    /// their events, the state index (moving from `previous` when it
    /// changed), the settled command's outbox entry removed and the new
    /// commands added, the client idempotency key of a new saga and a dead
    /// letter on entering FAILED. Nothing reaches sled yet: the next
    /// [`Store::flush_writes`] applies every staged transition in ONE sled
    /// transaction (all of them or none), then flushes. One transaction per
    /// group commit instead of one per transition halves the store's CPU
    /// and the bytes sled writes.
    ///
    /// Readers ([`Store::get`] and the rest) see a transition once its
    /// flush began; the runner reads its own staged sagas with
    /// [`Store::get_latest`].
    ///
    /// # Errors
    /// An unencodable value.
    pub fn write(&self, t: &Transition, previous: Option<StateTag>) -> Result<(), StoreError> {
        let saga = &t.saga;
        let id = saga_key(&saga.id)?;
        let record = self.encode_record(saga)?;
        let mut ops = Vec::with_capacity(5 + t.history.len() + t.settled.len() + t.commands.len());
        for h in &t.history {
            ops.push((Tree::History, history_key(&id, h.seq), Some(encode(h)?)));
        }
        let new_tag = saga.state.tag();
        if previous != Some(new_tag) {
            if let Some(prev) = previous {
                ops.push((Tree::ByState, state_key(prev, &id), None));
            }
            ops.push((Tree::ByState, state_key(new_tag, &id), Some(Vec::new())));
        }
        for (step, kind) in &t.settled {
            ops.push((Tree::Outbox, outbox_key(&id, *step, *kind), None));
        }
        for c in &t.commands {
            ops.push((
                Tree::Outbox,
                outbox_key(&id, c.step, c.kind),
                Some(encode(&OutboxEntry::new(saga, c))?),
            ));
        }
        if previous.is_none() {
            if let Some(key) = saga.idempotency_key.as_deref() {
                ops.push((Tree::Idempotency, key.as_bytes().to_vec(), Some(id.to_vec())));
            }
        }
        if let Some(d) = DeadLetter::of(saga) {
            if previous != Some(StateTag::Failed) {
                let (k, v) = (history_key(&id, saga.seq), encode(&d)?);
                ops.push((Tree::DeadLetters, k.clone(), Some(v.clone())));
                ops.push((Tree::DlqOutbox, k, Some(v)));
            }
        }
        let events: Vec<EventRecord> = match self.events_on {
            true => t.history.iter().map(|h| EventRecord::new(saga, h)).collect(),
            false => Vec::new(),
        };
        let mut staged = self.staged();
        if let (Some(first), Some(last)) = (t.history.first().filter(|_| self.events_on), t.history.last()) {
            let seq = staged.next_event;
            staged.next_event += 1;
            ops.push((
                Tree::Events,
                seq.to_be_bytes().to_vec(),
                Some(event_pointer(&id, first.seq, last.seq, last.at_ms)),
            ));
            staged.events.push((seq, events));
        }
        staged.records.insert(id, record);
        staged.ops.extend(ops);
        Ok(())
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        lock(&self.staged)
    }

    /// Applies every staged transition in one sled transaction (unflushed).
    fn apply_staged(&self) -> Result<(), StoreError> {
        let (ops, records, events) = {
            let mut staged = self.staged();
            let ops = std::mem::take(&mut staged.ops);
            let records = Arc::new(std::mem::take(&mut staged.records));
            staged.applying = Some(records.clone());
            (ops, records, std::mem::take(&mut staged.events))
        };
        let result = self.commit_staged(&ops, &records);
        let mut staged = self.staged();
        // Committed, or failed: sled answers for these records now.
        staged.applying = None;
        if result.is_err() {
            // What was staged meanwhile follows from the failed writes: it must
            // not be committed without them (the runner stops; a restart
            // resumes from what is durable).
            staged.ops.clear();
            staged.records.clear();
            staged.events.clear();
        }
        drop(staged);
        let generation = result?;
        if !events.is_empty() {
            let mut ready = lock(&self.events_ready);
            let room = EVENTS_READY.saturating_sub(ready.queue.len());
            // Past the bound the publisher reads the log instead.
            ready
                .queue
                .extend(events.into_iter().take(room).map(|(seq, e)| (generation, seq, e)));
        }
        Ok(())
    }

    /// Commits `ops` and `records` in one transaction; returns the events
    /// log generation it wrote to.
    fn commit_staged(&self, ops: &[Op], records: &HashMap<[u8; 16], Vec<u8>>) -> Result<u64, StoreError> {
        // The generation written to stays while the transaction commits.
        let events = read_lock(&self.events);
        let Some((generation, events_log)) = events.last() else {
            return Err(StoreError::Corrupt("the events log has no generation".into()));
        };
        if ops.is_empty() && records.is_empty() {
            return Ok(*generation);
        }
        // Before the commit: whoever sees this data and then finds the flag
        // clear knows a flush covered it.
        self.unflushed.store(true, std::sync::atomic::Ordering::SeqCst);
        (
            &self.sagas,
            &self.history,
            &self.by_state,
            &self.outbox,
            &self.idempotency,
            &self.dead_letters,
            &self.dlq_outbox,
            events_log,
        )
            .transaction(
                |(sagas, hist, by_state, outbox, idempotency, dead_letters, dlq_outbox, events_log)| {
                    for (id, record) in records {
                        sagas.insert(&id[..], record.as_slice())?;
                    }
                    for (tree, k, v) in ops {
                        let tree = match tree {
                            Tree::History => hist,
                            Tree::Events => events_log,
                            Tree::ByState => by_state,
                            Tree::Outbox => outbox,
                            Tree::Idempotency => idempotency,
                            Tree::DeadLetters => dead_letters,
                            Tree::DlqOutbox => dlq_outbox,
                        };
                        match v {
                            Some(v) => tree.insert(k.as_slice(), v.as_slice())?,
                            None => tree.remove(k.as_slice())?,
                        };
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                },
            )
            .map_err(transaction_error("transaction aborted"))
            .map(|()| *generation)
    }

    /// Applies what is staged, then makes every write so far durable (one
    /// sync for all of them).
    ///
    /// # Errors
    /// sled could not write or sync its log.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let this = self.clone();
        blocking(move || {
            this.apply_staged()?;
            this.db.flush()?;
            Ok(())
        })
        .await
    }

    /// [`Store::flush`] by the one task that calls [`Store::write`] (the
    /// runner), between its writes: afterwards every write so far is durable.
    ///
    /// # Errors
    /// As [`Store::flush`].
    pub async fn flush_writes(&self) -> Result<(), StoreError> {
        let this = self.clone();
        blocking(move || this.flush_writes_blocking()).await
    }

    /// [`Store::flush_writes`] on the calling thread (a blocking one).
    ///
    /// # Errors
    /// As [`Store::flush`].
    pub fn flush_writes_blocking(&self) -> Result<(), StoreError> {
        self.apply_staged()?;
        self.db.flush()?;
        self.unflushed.store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Makes durable everything a reader has seen so far: a flush, unless the
    /// writer's last flush already covered every write (the usual case at low
    /// load, where it saves a second flush per transition). It does not
    /// apply staged writes: those are the runner's to commit.
    ///
    /// # Errors
    /// As [`Store::flush`].
    pub async fn ensure_durable(&self) -> Result<(), StoreError> {
        if self.unflushed.load(std::sync::atomic::Ordering::SeqCst) {
            let db = self.db.clone();
            blocking(move || db.flush().map(drop).map_err(StoreError::from)).await?;
        }
        Ok(())
    }

    fn refs(&self) -> std::sync::MutexGuard<'_, DefinitionRefs> {
        lock(&self.refs)
    }

    /// The reference of `def` in the `definitions` tree, stored there the
    /// first time (a write sled's next flush covers, before the records
    /// that name it). The same `name@version` with other content (a file
    /// edited in place and reloaded) gets a reference of its own.
    fn definition_ref(&self, def: &Arc<SagaDefinition>) -> Result<String, StoreError> {
        let mut refs = self.refs();
        if let Some((_, r)) = refs
            .by_arc
            .iter()
            .find(|(weak, _)| weak.upgrade().is_some_and(|d| Arc::ptr_eq(&d, def)))
        {
            return Ok(r.clone());
        }
        let bytes = encode(&**def)?;
        let prefix = format!("{}#", def.id());
        let mut found = None;
        let mut taken = 0;
        for kv in self.definitions.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            taken += 1;
            if v.as_ref() == bytes.as_slice() {
                found = Some(String::from_utf8_lossy(&k).into_owned());
                break;
            }
        }
        let r = match found {
            Some(r) => r,
            None => {
                let r = format!("{prefix}{taken}");
                self.definitions.insert(r.as_bytes(), bytes)?;
                r
            }
        };
        // Definitions dropped since (reloaded away) leave the list on a miss only.
        refs.by_arc.retain(|(weak, _)| weak.strong_count() > 0);
        refs.by_arc.push((Arc::downgrade(def), r.clone()));
        refs.by_ref.insert(r.clone(), def.clone());
        Ok(r)
    }

    /// The definition a record refers to.
    fn resolve_definition(&self, r: &str) -> Result<Arc<SagaDefinition>, StoreError> {
        if let Some(def) = self.refs().by_ref.get(r) {
            return Ok(def.clone());
        }
        let bytes = self
            .definitions
            .get(r.as_bytes())?
            .ok_or_else(|| StoreError::Corrupt(format!("saga record names unknown definition {r}")))?;
        let def: Arc<SagaDefinition> = Arc::new(decode(&bytes, "definition snapshot")?);
        Ok(self.refs().by_ref.entry(r.to_string()).or_insert(def).clone())
    }

    fn encode_record(&self, saga: &Saga) -> Result<Vec<u8>, StoreError> {
        // Every field by name: a field added to `Saga` must be added here.
        let Saga {
            id,
            definition,
            order,
            correlation_id,
            idempotency_key,
            state,
            steps,
            reason,
            created_at_ms,
            updated_at_ms,
            seq,
        } = saga;
        let definition_ref = self.definition_ref(definition)?;
        encode(&SagaRecordOut {
            saga: SagaOut {
                id,
                definition_ref: &definition_ref,
                order,
                correlation_id,
                idempotency_key,
                state,
                steps,
                reason,
                created_at_ms: *created_at_ms,
                updated_at_ms: *updated_at_ms,
                seq: *seq,
            },
        })
    }

    /// A record's definition: inline (records of earlier versions) or by reference.
    fn record_definition(
        &self,
        id: &str,
        inline: Option<Arc<SagaDefinition>>,
        by_ref: Option<String>,
    ) -> Result<Arc<SagaDefinition>, StoreError> {
        match (inline, by_ref) {
            (Some(inline), _) => Ok(inline),
            (None, Some(r)) => self.resolve_definition(&r),
            (None, None) => Err(StoreError::Corrupt(format!("saga record {id} has no definition"))),
        }
    }

    fn decode_record(&self, bytes: &[u8]) -> Result<Saga, StoreError> {
        let SagaIn {
            id,
            definition,
            definition_ref,
            order,
            correlation_id,
            idempotency_key,
            state,
            steps,
            reason,
            created_at_ms,
            updated_at_ms,
            seq,
        } = decode::<SagaRecordIn>(bytes, "saga record")?.saga;
        let definition = self.record_definition(&id, definition, definition_ref)?;
        Ok(Saga {
            id,
            definition,
            order,
            correlation_id,
            idempotency_key,
            state,
            steps,
            reason,
            created_at_ms,
            updated_at_ms,
            seq,
        })
    }

    /// The saga `id` as the runner last wrote it: staged, being committed, or
    /// else stored.
    ///
    /// # Errors
    /// As [`Store::get`].
    pub fn get_latest(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        let latest = {
            let staged = self.staged();
            let key = id.as_bytes();
            staged
                .records
                .get(key)
                .or_else(|| staged.applying.as_ref().and_then(|a| a.get(key)))
                .cloned()
        };
        match latest {
            Some(bytes) => Ok(Some(self.decode_record(&bytes)?)),
            None => self.get(id),
        }
    }

    /// The saga `id`, if stored.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub fn get(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        match self.sagas.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(self.decode_record(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The saga's history, in order.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn history(&self, id: &Uuid) -> Result<Vec<HistoryEntry>, StoreError> {
        self.history
            .scan_prefix(id.as_bytes())
            .map(|kv| {
                let (_, v) = kv?;
                decode(&v, "history entry")
            })
            .collect()
    }

    /// The saga created with the client idempotency key `key`, if any.
    ///
    /// # Errors
    /// sled errors; a corrupt id.
    pub fn saga_for_key(&self, key: &str) -> Result<Option<Uuid>, StoreError> {
        match self.idempotency.get(key.as_bytes())? {
            Some(bytes) => Uuid::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("idempotency index: {e}"))),
            None => Ok(None),
        }
    }

    /// Up to `limit` sagas after `after` (exclusive), oldest first, only those
    /// in `state` when given.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub fn list(
        &self,
        state: Option<StateTag>,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut ids: Vec<Uuid> = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        match state {
            Some(tag) => {
                let start = match after {
                    Some(a) => {
                        let mut k = state_key(tag, a.as_bytes());
                        k.push(0); // first key strictly after `a`
                        k
                    }
                    None => vec![tag as u8],
                };
                for kv in self.by_state.range(start..) {
                    let (k, _) = kv?;
                    if k.first() != Some(&(tag as u8)) {
                        break;
                    }
                    if ids.len() == limit {
                        more = true;
                        break;
                    }
                    let id = Uuid::from_slice(&k[1..])
                        .map_err(|e| StoreError::Corrupt(format!("state index: {e}")))?;
                    ids.push(id);
                }
            }
            None => {
                let iter = match after {
                    Some(a) => {
                        let mut k = a.as_bytes().to_vec();
                        k.push(0);
                        self.sagas.range(k..)
                    }
                    None => self.sagas.iter(),
                };
                for kv in iter {
                    let (k, _) = kv?;
                    if ids.len() == limit {
                        more = true;
                        break;
                    }
                    ids.push(
                        Uuid::from_slice(&k).map_err(|e| StoreError::Corrupt(format!("saga key: {e}")))?,
                    );
                }
            }
        }
        let next = if more { ids.last().copied() } else { None };
        let mut sagas = Vec::with_capacity(ids.len());
        for id in &ids {
            // A saga can move out of the index between the scan and the read; skip it then.
            if let Some(s) = self.get(id)? {
                sagas.push(s);
            }
        }
        Ok(Page { sagas, next })
    }

    /// Every saga not in a terminal state, oldest first.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub fn active(&self) -> Result<Vec<Saga>, StoreError> {
        let mut out = Vec::new();
        for tag in [StateTag::Pending, StateTag::Running, StateTag::Compensating] {
            let mut after = None;
            loop {
                let page = self.list(Some(tag), after, 1024)?;
                out.extend(page.sagas);
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    /// Every command in the outbox (sent or not yet acknowledged).
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.outbox
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                decode(&v, "outbox entry")
            })
            .collect()
    }

    /// Dead letters not yet published, with their keys.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
        self.dlq_outbox
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), decode(&v, "dead letter")?))
            })
            .collect()
    }

    /// Marks a dead letter published (not flushed: a re-publish after a crash is harmless).
    ///
    /// # Errors
    /// sled errors.
    pub fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError> {
        self.dlq_outbox.remove(key)?;
        Ok(())
    }

    /// Every dead letter of `id`, oldest first.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn dead_letters(&self, id: &Uuid) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters
            .scan_prefix(id.as_bytes())
            .map(|kv| {
                let (_, v) = kv?;
                decode(&v, "dead letter")
            })
            .collect()
    }

    /// Removes up to `limit` terminal sagas (COMPLETED, COMPENSATED) whose
    /// last transition is older than `cutoff_ms`: record, history, state
    /// index, dead letters and client idempotency key, one transaction per
    /// saga. FAILED sagas (an operator must act) and sagas whose events are
    /// not yet published are kept. Returns how many were removed.
    ///
    /// The state index is in creation order (UUID v7), so the scan stops at
    /// the first saga created after the cutoff.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub fn prune(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut removed = 0;
        // With events off nothing publishes what an earlier run logged: it
        // holds nothing back (those events are skipped if events come back on).
        let held_from = match self.events_on {
            true => self.oldest_pending_event_ms()?,
            false => None,
        };
        for tag in [StateTag::Completed, StateTag::Compensated] {
            let mut doomed = Vec::new();
            for kv in self.by_state.scan_prefix([tag as u8]) {
                let (k, _) = kv?;
                let id = Uuid::from_slice(&k[1..])
                    .map_err(|e| StoreError::Corrupt(format!("state index: {e}")))?;
                let created_ms = id
                    .get_timestamp()
                    .map(|t| {
                        let (secs, nanos) = t.to_unix();
                        secs * 1000 + u64::from(nanos) / 1_000_000
                    })
                    .unwrap_or(0);
                if created_ms > cutoff_ms || removed + doomed.len() >= limit {
                    break;
                }
                let Some(saga) = self.get(&id)? else { continue };
                // The log is in commit order: a saga last moved before the oldest
                // unpublished transition has all its events published.
                if saga.updated_at_ms > cutoff_ms || held_from.is_some_and(|t| saga.updated_at_ms >= t) {
                    continue;
                }
                doomed.push((id, saga.idempotency_key));
            }
            for (id, key) in doomed {
                let history: Vec<sled::IVec> = self
                    .history
                    .scan_prefix(id.as_bytes())
                    .keys()
                    .collect::<Result<_, _>>()?;
                let letters: Vec<sled::IVec> = self
                    .dead_letters
                    .scan_prefix(id.as_bytes())
                    .keys()
                    .collect::<Result<_, _>>()?;
                let bytes = *id.as_bytes();
                (
                    &self.sagas,
                    &self.history,
                    &self.by_state,
                    &self.idempotency,
                    &self.dead_letters,
                )
                    .transaction(|(sagas, hist, by_state, idempotency, dead_letters)| {
                        sagas.remove(&bytes[..])?;
                        by_state.remove(state_key(tag, &bytes))?;
                        for k in &history {
                            hist.remove(k)?;
                        }
                        for k in &letters {
                            dead_letters.remove(k)?;
                        }
                        if let Some(key) = &key {
                            // Only if the key still names this saga.
                            if idempotency.get(key.as_bytes())?.as_deref() == Some(&bytes[..]) {
                                idempotency.remove(key.as_bytes())?;
                            }
                        }
                        Ok::<(), ConflictableTransactionError<()>>(())
                    })
                    .map_err(transaction_error("prune transaction aborted"))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The events log's pointers after the publisher's cursor, oldest
    /// generation first, each with its log key (generation ++ sequence).
    fn events_after_cursor(&self) -> impl Iterator<Item = Result<(Vec<u8>, EventPointer), StoreError>> {
        let cursor = *lock(&self.events_cursor);
        let generations = read_lock(&self.events).clone();
        generations.into_iter().flat_map(move |(g, tree)| {
            let from = match cursor {
                Some((published, seq)) if published == g => seq.saturating_add(1),
                Some((published, _)) if published > g => u64::MAX,
                _ => 0,
            };
            tree.range(from.to_be_bytes()..).map(move |kv| {
                let (k, v) = kv?;
                Ok((
                    events_log_key(g, be_u64(&k, "events log key")?),
                    parse_event_pointer(&v)?,
                ))
            })
        })
    }

    /// The events of up to `limit` transitions not yet acknowledged by
    /// JetStream, in commit order, each with its log key (the same for the
    /// events of one transition). Each event is built from its history entry
    /// and the saga record. A transition whose saga is gone (pruned by an
    /// operator's retention shorter than the publisher's delay) is skipped
    /// with a warning.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn events_pending(&self, limit: usize) -> Result<Vec<(Vec<u8>, EventRecord)>, StoreError> {
        let mut out = Vec::new();
        {
            // Handed over in memory: the unpublished run that starts at the
            // next pointer, if it does.
            let ready = lock(&self.events_ready);
            let run = ready.queue.iter().skip_while(|(_, seq, _)| *seq < ready.next);
            for (expected, (generation, seq, events)) in (ready.next..).zip(run) {
                if *seq != expected || out.len() >= limit {
                    break;
                }
                let key = events_log_key(*generation, *seq);
                out.extend(events.iter().map(|e| (key.clone(), e.clone())));
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
        for entry in self.events_after_cursor().take(limit) {
            let (key, p) = entry?;
            let id = Uuid::from_bytes(p.id);
            let Some(source) = self.event_source(&p.id)? else {
                tracing::warn!(saga_id = %id, first = p.first, last = p.last,
                               "saga events skipped: the saga is no longer stored");
                if out.is_empty() {
                    self.events_published(&[key])?;
                    continue;
                }
                break;
            };
            for kv in self
                .history
                .range(history_key(&p.id, p.first)..=history_key(&p.id, p.last))
            {
                let (_, v) = kv?;
                let h: HistoryEntry = decode(&v, "history entry")?;
                out.push((key.clone(), EventRecord::of(&source, &h)));
            }
        }
        Ok(out)
    }

    /// The creation-time fields of saga `id` for its events (cached).
    fn event_source(&self, id: &[u8; 16]) -> Result<Option<Arc<EventSource>>, StoreError> {
        if let Some(source) = lock(&self.event_sources).by_id.get(id) {
            return Ok(Some(source.clone()));
        }
        let Some(bytes) = self.sagas.get(id)? else {
            return Ok(None);
        };
        let r = decode::<EventSourceRecordIn>(&bytes, "saga record")?.saga;
        let definition = self.record_definition(&r.id, r.definition, r.definition_ref)?;
        let source = Arc::new(EventSource {
            id: r.id,
            definition,
            order: r.order,
            correlation_id: r.correlation_id,
            created_at_ms: r.created_at_ms,
        });
        let mut cache = lock(&self.event_sources);
        if cache.order.len() >= EVENT_SOURCES {
            if let Some(old) = cache.order.pop_front() {
                cache.by_id.remove(&old);
            }
        }
        cache.order.push_back(*id);
        cache.by_id.insert(*id, source.clone());
        Ok(Some(source))
    }

    /// Number of events waiting to be published.
    pub fn events_backlog(&self) -> usize {
        self.events_after_cursor()
            .filter_map(Result::ok)
            .map(|(_, p)| usize::try_from(p.last.saturating_sub(p.first) + 1).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add)
    }

    /// Time of the oldest transition whose events wait to be published.
    fn oldest_pending_event_ms(&self) -> Result<Option<u64>, StoreError> {
        self.events_after_cursor()
            .next()
            .transpose()
            .map(|p| p.map(|(_, p)| p.at_ms))
    }

    /// Records that JetStream acknowledged the events up to the largest of
    /// `keys` (not flushed: re-publishing after a crash is deduplicated by
    /// JetStream on `Nats-Msg-Id`). Drops the generations wholly published;
    /// starts a new generation once the current one holds
    /// `events_rotate` ([`EVENTS_ROTATE`]) published pointers.
    ///
    /// # Errors
    /// sled errors; a malformed key.
    pub fn events_published(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let Some(max) = keys.iter().max() else {
            return Ok(());
        };
        if max.len() != 16 {
            return Err(StoreError::Corrupt(format!(
                "events log key of {} bytes",
                max.len()
            )));
        }
        let at = (
            be_u64(&max[..8], "events log key")?,
            be_u64(&max[8..], "events log key")?,
        );
        if lock(&self.events_cursor).is_some_and(|c| c >= at) {
            return Ok(());
        }
        // One publisher: nothing moves the cursor between the check and here.
        self.meta.insert(EVENTS_CURSOR, max.as_slice())?;
        *lock(&self.events_cursor) = Some(at);
        let (generation, seq) = at;
        {
            let mut ready = lock(&self.events_ready);
            ready.next = seq + 1;
            while ready.queue.front().is_some_and(|(_, s, _)| *s <= seq) {
                ready.queue.pop_front();
            }
        }
        let (dropped, rotate) = {
            let generations = read_lock(&self.events);
            let dropped = generations.iter().any(|(g, _)| *g < generation);
            let rotate = match generations.last() {
                Some((g, tree)) if *g == generation => match tree.first()? {
                    Some((k, _)) => seq >= be_u64(&k, "events log key")?.saturating_add(self.events_rotate),
                    None => false,
                },
                _ => false,
            };
            (dropped, rotate)
        };
        if !dropped && !rotate {
            return Ok(());
        }
        let mut gone = Vec::new();
        {
            let mut generations = write_lock(&self.events);
            generations.retain(|(g, _)| {
                let keep = *g >= generation;
                if !keep {
                    gone.push(*g);
                }
                keep
            });
            if rotate {
                let next = generation + 1;
                generations.push((next, self.db.open_tree(events_tree_name(next))?));
            }
        }
        // No transaction writes to a generation that is not the last.
        for g in gone {
            self.db.drop_tree(events_tree_name(g))?;
        }
        Ok(())
    }

    /// Whether the database accepts a write (readiness probe; not flushed).
    ///
    /// # Errors
    /// sled refused the write.
    pub fn probe_writable(&self) -> Result<(), StoreError> {
        self.meta.insert(b"ready-probe", &b"1"[..])?;
        Ok(())
    }

    /// Number of sagas per state (for logs at start-up and for tests).
    ///
    /// # Errors
    /// sled errors.
    pub fn count_by_state(&self) -> Result<Vec<(StateTag, usize)>, StoreError> {
        let mut out = Vec::new();
        for tag in StateTag::ALL {
            let mut n = 0;
            for kv in self.by_state.scan_prefix([tag as u8]) {
                kv?;
                n += 1;
            }
            out.push((tag, n));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use saga_proto::wire::{Item, OrderPayload};

    use super::*;
    use crate::{
        definition::{SagaDefinition, StepDefinition},
        engine::{self, Event, Outcome},
    };

    fn def() -> SagaDefinition {
        let step = |n: &str, p: &str, a: &str, c: &str| StepDefinition {
            name: n.into(),
            participant: p.into(),
            action: a.into(),
            compensation: Some(c.into()),
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            group: None,
            on_failure: Default::default(),
            input: Default::default(),
            compensation_input: Default::default(),
        };
        SagaDefinition {
            name: "order".into(),
            version: 1,
            steps: vec![
                step("reserve-inventory", "inventory", "reserve", "release"),
                step("charge-payment", "payment", "charge", "refund"),
            ],
            input_schema: None,
            events: Default::default(),
            source: PathBuf::new(),
        }
    }

    fn new_saga(key: Option<&str>) -> Transition {
        let order = OrderPayload {
            order_id: "o".into(),
            customer_id: "c".into(),
            items: vec![Item {
                sku: "A".into(),
                quantity: 1,
            }],
            amount_cents: 5,
            currency: "EUR".into(),
        };
        engine::create(
            Uuid::now_v7().to_string(),
            def().into(),
            order,
            "corr".into(),
            key.map(Into::into),
            1,
        )
    }

    #[tokio::test]
    async fn transitions_round_trip_with_index_history_and_outbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let created = new_saga(Some("client-key"));
        store.write(&created, None).expect("write created");
        let started = engine::transition(&created.saga, &Event::Start, 2)
            .expect("ok")
            .expect("changes");
        store
            .write(&started, Some(StateTag::Pending))
            .expect("write started");
        store.flush().await.expect("flush");
        let id = Uuid::parse_str(&created.saga.id).expect("uuid");

        assert_eq!(store.get(&id).expect("get"), Some(started.saga.clone()));
        assert_eq!(store.saga_for_key("client-key").expect("key"), Some(id));
        assert_eq!(store.history(&id).expect("history").len(), 2);
        let outbox = store.outbox().expect("outbox");
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].subject, "saga.cmd.inventory.reserve");
        assert_eq!(store.active().expect("active").len(), 1);

        let reply = Event::Reply {
            step: 0,
            kind: CommandKind::Forward,
            attempt: 1,
            outcome: Outcome::Rejected("insufficient_stock".into()),
        };
        let done = engine::transition(&started.saga, &reply, 3)
            .expect("ok")
            .expect("changes");
        store.write(&done, Some(StateTag::Running)).expect("write done");
        store.flush().await.expect("flush");
        assert!(
            store.outbox().expect("outbox").is_empty(),
            "settled command left the outbox"
        );
        assert!(store.active().expect("active").is_empty());
        let counts = store.count_by_state().expect("counts");
        assert!(counts.contains(&(StateTag::Compensated, 1)) && counts.contains(&(StateTag::Running, 0)));
        let history = store.history(&id).expect("history");
        assert_eq!(history.iter().map(|h| h.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn staged_writes_reach_readers_only_through_a_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let created = new_saga(Some("staged-key"));
        let id = Uuid::parse_str(&created.saga.id).expect("uuid");
        store.write(&created, None).expect("write");
        let started = engine::transition(&created.saga, &Event::Start, 2)
            .expect("ok")
            .expect("changes");
        store.write(&started, Some(StateTag::Pending)).expect("write");
        // Readers see nothing yet; the runner sees its latest write.
        assert_eq!(store.get(&id).expect("get"), None);
        assert!(store.outbox().expect("outbox").is_empty());
        assert_eq!(store.saga_for_key("staged-key").expect("key"), None);
        assert_eq!(store.get_latest(&id).expect("latest"), Some(started.saga.clone()));

        store.flush_writes().await.expect("flush");
        assert_eq!(store.get(&id).expect("get"), Some(started.saga.clone()));
        assert_eq!(store.get_latest(&id).expect("latest"), Some(started.saga));
        assert_eq!(store.saga_for_key("staged-key").expect("key"), Some(id));
        assert_eq!(store.outbox().expect("outbox").len(), 1);
        // Two transitions of one saga in one batch: the index holds the last state only.
        assert_eq!(
            store
                .list(Some(StateTag::Pending), None, 10)
                .expect("list")
                .sagas
                .len(),
            0
        );
        assert_eq!(store.history(&id).expect("history").len(), 2);
    }

    #[tokio::test]
    async fn definitions_are_stored_once_and_records_of_earlier_versions_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, id_b) = {
            let store = Store::open(dir.path()).expect("open");
            let a = new_saga(None);
            // The same name@version with other content: a reference of its own.
            let mut edited = def();
            edited.steps[0].timeout = Duration::from_secs(9);
            let mut b = new_saga(None);
            b.saga.definition = edited.into();
            store.write(&a, None).expect("write");
            store.write(&b, None).expect("write");
            store.write(&new_saga(None), None).expect("write");
            store.flush_writes().await.expect("flush");
            assert_eq!(store.definitions.len(), 2, "one row per distinct definition");
            let id_b = Uuid::parse_str(&b.saga.id).expect("uuid");
            (a, b, id_b)
        };
        // Reopened: the definitions come from the tree.
        let store = Store::open(dir.path()).expect("reopen");
        let id_a = Uuid::parse_str(&a.saga.id).expect("uuid");
        assert_eq!(store.get(&id_a).expect("get"), Some(a.saga.clone()));
        assert_eq!(store.get(&id_b).expect("get"), Some(b.saga.clone()));
        assert_eq!(
            store
                .get(&id_b)
                .expect("get")
                .map(|s| s.definition.steps[0].timeout),
            Some(Duration::from_secs(9))
        );
        // A record with the definition inline (as written before `definition_ref`).
        let old = new_saga(None);
        let inline = encode(&serde_json::json!({ "saga": old.saga })).expect("encode");
        let old_id = Uuid::parse_str(&old.saga.id).expect("uuid");
        store.sagas.insert(old_id.as_bytes(), inline).expect("insert");
        assert_eq!(store.get(&old_id).expect("get"), Some(old.saga));
        // A reference to nothing is corruption, not a panic.
        let good =
            String::from_utf8(store.encode_record(&new_saga(None).saga).expect("encode")).expect("utf8");
        assert!(good.contains(r#""definition_ref":"order@1#0""#), "{good}");
        let dangling = good.replace("order@1#0", "nope@1#0").into_bytes();
        let e = store.decode_record(&dangling).expect_err("refused");
        assert!(e.to_string().contains("unknown definition nope@1#0"), "{e}");
    }

    #[tokio::test]
    async fn list_pages_in_creation_order_and_filters_by_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut ids = Vec::new();
        for i in 0..5 {
            let t = new_saga(None);
            store.write(&t, None).expect("write");
            if i % 2 == 0 {
                let s = engine::transition(&t.saga, &Event::Start, 2)
                    .expect("ok")
                    .expect("changes");
                store.write(&s, Some(StateTag::Pending)).expect("write");
            }
            ids.push(t.saga.id.clone());
        }
        store.flush().await.expect("flush");
        let p1 = store.list(None, None, 2).expect("list");
        assert_eq!(
            p1.sagas.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            ids[..2]
        );
        let p2 = store.list(None, p1.next, 2).expect("list");
        let p3 = store.list(None, p2.next, 2).expect("list");
        assert_eq!(p3.sagas.len(), 1);
        assert!(p3.next.is_none());
        let running = store.list(Some(StateTag::Running), None, 2).expect("list");
        assert_eq!(running.sagas.len(), 2);
        let rest = store
            .list(Some(StateTag::Running), running.next, 2)
            .expect("list");
        assert_eq!(rest.sagas.len(), 1);
        assert!(rest.next.is_none());
        assert_eq!(
            store
                .list(Some(StateTag::Pending), None, 10)
                .expect("list")
                .sagas
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = new_saga(None);
        {
            let store = Store::open(dir.path()).expect("open");
            store.write(&t, None).expect("write");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let id = Uuid::parse_str(&t.saga.id).expect("uuid");
        assert_eq!(
            store.get(&id).expect("get").map(|s| s.state),
            Some(engine::SagaState::Pending)
        );
    }

    /// Sequence numbers of the events `pending` holds, per saga, in order.
    fn sequences(pending: &[(Vec<u8>, EventRecord)], saga: &Transition) -> Vec<u64> {
        pending
            .iter()
            .filter(|(_, r)| r.event.saga_id == saga.saga.id)
            .map(|(_, r)| r.event.sequence)
            .collect()
    }

    fn keys(pending: &[(Vec<u8>, EventRecord)]) -> Vec<Vec<u8>> {
        pending.iter().map(|(k, _)| k.clone()).collect()
    }

    fn generations(dir: &Path) -> Vec<String> {
        let db = sled::open(dir).expect("open");
        let mut names: Vec<String> = db
            .tree_names()
            .iter()
            .filter_map(|n| String::from_utf8(n.to_vec()).ok())
            .filter(|n| n.starts_with("events"))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn events_are_pending_in_commit_order_until_published_also_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (new_saga(None), new_saga(None));
        {
            let store = Store::open(dir.path()).expect("open");
            store.write(&a, None).expect("write");
            store.write(&b, None).expect("write");
            let a1 = engine::transition(&a.saga, &Event::Start, 2)
                .expect("ok")
                .expect("changes");
            store.write(&a1, Some(StateTag::Pending)).expect("write");
            store.flush_writes().await.expect("flush");
            // Staged events are not pending; committed ones are, in commit order.
            let b1 = engine::transition(&b.saga, &Event::Start, 3)
                .expect("ok")
                .expect("changes");
            store.write(&b1, Some(StateTag::Pending)).expect("write");
            let pending = store.events_pending(100).expect("pending");
            assert_eq!(sequences(&pending, &a), vec![1, 2]);
            assert_eq!(sequences(&pending, &b), vec![1]);
            let first = &pending[0].1.event;
            assert_eq!(
                (first.saga_id.as_str(), first.event.as_str()),
                (a.saga.id.as_str(), "created")
            );
            assert_eq!(first.order, a.saga.order);
            assert_eq!(pending[0].1.subject, "saga.events.order.created");
            store.flush_writes().await.expect("flush");
            assert_eq!(store.events_backlog(), 4);
            // The first two transitions are out.
            let pending = store.events_pending(2).expect("pending");
            assert_eq!(pending.len(), 2);
            store.events_published(&keys(&pending)).expect("published");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let pending = store.events_pending(100).expect("pending");
        assert_eq!(sequences(&pending, &a), vec![2]);
        assert_eq!(sequences(&pending, &b), vec![2]);
        store.events_published(&keys(&pending)).expect("published");
        assert!(store.events_pending(100).expect("pending").is_empty());
        assert_eq!(store.events_backlog(), 0);
        // New events continue after the published ones.
        let a2 = engine::transition(
            &store
                .get(&Uuid::parse_str(&a.saga.id).expect("uuid"))
                .expect("get")
                .expect("saga"),
            &Event::Abort {
                reason: "test".into(),
            },
            4,
        )
        .expect("ok")
        .expect("changes");
        store.write(&a2, Some(StateTag::Running)).expect("write");
        store.flush_writes().await.expect("flush");
        let pending = store.events_pending(100).expect("pending");
        assert_eq!(sequences(&pending, &a), (3..=a2.saga.seq).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn events_not_handed_over_in_memory_are_read_from_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let sagas: Vec<Transition> = (0..4).map(|_| new_saga(None)).collect();
        for t in &sagas {
            store.write(t, None).expect("write");
        }
        store.flush_writes().await.expect("flush");
        // The third one did not fit in memory (as past the bound).
        lock(&store.events_ready).queue.retain(|(_, seq, _)| *seq != 2);
        let mut order = Vec::new();
        for expected in [2, 2] {
            let pending = store.events_pending(100).expect("pending");
            assert_eq!(pending.len(), expected, "{order:?}");
            order.extend(pending.iter().map(|(_, r)| r.event.saga_id.clone()));
            store.events_published(&keys(&pending)).expect("published");
        }
        assert!(store.events_pending(100).expect("pending").is_empty());
        let ids: Vec<String> = sagas.iter().map(|t| t.saga.id.clone()).collect();
        assert_eq!(order, ids, "each once, in commit order");
    }

    #[tokio::test]
    async fn published_generations_are_dropped_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store = Store::open(dir.path()).expect("open");
            store.events_rotate = 3;
            let mut all = Vec::new();
            for round in 0..4 {
                for _ in 0..2 {
                    let t = new_saga(None);
                    store.write(&t, None).expect("write");
                    all.push(t);
                }
                store.flush_writes().await.expect("flush");
                let pending = store.events_pending(100).expect("pending");
                assert_eq!(pending.len(), 2, "round {round}: only the new transitions");
                store.events_published(&keys(&pending)).expect("published");
            }
            // Rotated after pointers 3 and 7; generation 0 was dropped once the
            // cursor entered generation 1, which stays until it enters 2.
            let names = |s: &Store| read_lock(&s.events).iter().map(|(g, _)| *g).collect::<Vec<_>>();
            assert_eq!(names(&store), vec![1, 2]);
            let t = new_saga(None);
            store.write(&t, None).expect("write");
            store.flush_writes().await.expect("flush");
            let pending = store.events_pending(100).expect("pending");
            assert_eq!(sequences(&pending, &t), vec![1]);
            store.events_published(&keys(&pending)).expect("published");
            assert_eq!(names(&store), vec![2]);
            store.flush().await.expect("flush");
        }
        assert_eq!(generations(dir.path()), vec![events_tree_name(2)]);
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.events_pending(100).expect("pending").is_empty());
    }

    #[tokio::test]
    async fn an_earlier_versions_events_outbox_is_converted_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (new_saga(None), new_saga(None));
        {
            let store = Store::open(dir.path()).expect("open").without_events();
            store.write(&a, None).expect("write");
            store.write(&b, None).expect("write");
            store.flush_writes().await.expect("flush");
            assert!(
                store.events_pending(100).expect("pending").is_empty(),
                "--no-events logs nothing"
            );
            let legacy = store.db.open_tree(LEGACY_EVENTS_TREE).expect("tree");
            for t in [&b, &a] {
                let id = saga_key(&t.saga.id).expect("key");
                let h = &t.history[0];
                legacy
                    .insert(
                        history_key(&id, h.seq),
                        encode(&EventRecord::new(&t.saga, h)).expect("encode"),
                    )
                    .expect("insert");
            }
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let pending = store.events_pending(100).expect("pending");
        // Time order, then key order (saga id: creation order).
        let ids: Vec<&str> = pending.iter().map(|(_, r)| r.event.saga_id.as_str()).collect();
        assert_eq!(ids, vec![a.saga.id.as_str(), b.saga.id.as_str()]);
        drop(store);
        assert_eq!(generations(dir.path()), vec![events_tree_name(0)]);
    }

    #[tokio::test]
    async fn prune_removes_old_terminal_sagas_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let rejected = |t: &Transition, now| {
            let started = engine::transition(&t.saga, &Event::Start, now)
                .expect("ok")
                .expect("changes");
            let reply = Event::Reply {
                step: 0,
                kind: CommandKind::Forward,
                attempt: 1,
                outcome: Outcome::Rejected("insufficient_stock".into()),
            };
            let done = engine::transition(&started.saga, &reply, now)
                .expect("ok")
                .expect("changes");
            (started, done)
        };
        // Old and finished; finished but recently updated; still running.
        let old = new_saga(Some("old-key"));
        let recent = new_saga(None);
        let running = new_saga(None);
        store.write(&old, None).expect("write");
        store.write(&recent, None).expect("write");
        store.write(&running, None).expect("write");
        let (s1, d1) = rejected(&old, 10);
        store.write(&s1, Some(StateTag::Pending)).expect("write");
        store.write(&d1, Some(StateTag::Running)).expect("write");
        let (s2, d2) = rejected(&recent, u64::MAX / 2);
        store.write(&s2, Some(StateTag::Pending)).expect("write");
        store.write(&d2, Some(StateTag::Running)).expect("write");
        let s3 = engine::transition(&running.saga, &Event::Start, 10)
            .expect("ok")
            .expect("changes");
        store.write(&s3, Some(StateTag::Pending)).expect("write");
        store.flush().await.expect("flush");
        let id = |t: &Transition| Uuid::parse_str(&t.saga.id).expect("uuid");
        let cutoff = crate::clock::now_ms() + 60_000;

        // Unpublished events hold a saga back.
        assert_eq!(store.prune(cutoff, 100).expect("prune"), 0);
        let keys: Vec<Vec<u8>> = store
            .events_pending(1000)
            .expect("events")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        store.events_published(&keys).expect("published");

        assert_eq!(store.prune(cutoff, 100).expect("prune"), 1);
        assert_eq!(store.get(&id(&old)).expect("get"), None);
        assert!(store.history(&id(&old)).expect("history").is_empty());
        assert_eq!(store.saga_for_key("old-key").expect("key"), None);
        assert!(store.get(&id(&recent)).expect("get").is_some());
        assert!(store.get(&id(&running)).expect("get").is_some());
        let counts = store.count_by_state().expect("counts");
        assert!(counts.contains(&(StateTag::Compensated, 1)) && counts.contains(&(StateTag::Running, 1)));
        assert_eq!(
            store.prune(cutoff, 100).expect("prune"),
            0,
            "nothing left to prune"
        );
    }

    #[test]
    fn unknown_format_versions_are_reported_as_corrupt() {
        let e = decode::<SagaRecordIn>(br#"{"v":9,"saga":{}}"#, "saga record").expect_err("refused");
        assert!(e.to_string().contains("stored data is corrupt"), "{e}");
    }
}
