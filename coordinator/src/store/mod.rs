//! Storage: the [`SagaStore`] trait the runner, the API, the events
//! publisher and the probes use, and its implementations — [`Store`] (sled,
//! the embedded default), [`jetstream::JsStore`] (replicated KV, several
//! coordinators) and [`memory::MemoryStore`] (tests). The stores keep what
//! the engine decided; they must not decide or send anything.
//!
//! Formats: both persistent stores write every value in the versioned
//! envelope of [`codec`] (`{"v":1,…}`) and share the key layouts of `keys`
//! and the [`records`]. Their saga records differ and stay as they are (an
//! upgrade reads every stored saga unchanged): sled keeps the saga in its
//! own trees with the definition by reference, jetstream one whole record
//! per saga (saga, history, outbox, dead letters) with the definition inline.

pub(crate) mod codec;
#[cfg(test)]
mod contract_tests;
#[cfg(test)]
pub(crate) mod fixtures;
pub(crate) mod jetstream;
pub(crate) mod keys;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod query;
pub(crate) mod records;
mod sled;

use std::sync::Arc;

use futures::future::BoxFuture;
pub(crate) use query::ListQuery;
pub(crate) use records::{DeadLetter, EventRecord, OutboxEntry};
use uuid::Uuid;

pub(crate) use self::sled::Store;
use crate::engine::{HistoryEntry, Saga, StateTag, Transition};

/// A failure of the coordinator's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or internal error.
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    /// A stored value cannot be decoded: the data is corrupt or from an unknown version.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store refused or could not take a write (the in-memory store's
    /// injected failures).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// JetStream (the `jetstream` store) failed or timed out.
    #[error("jetstream: {0}")]
    JetStream(String),
}

/// A saga and its history, as `GetSaga` shows it.
pub(crate) type WithHistory = (Saga, Vec<HistoryEntry>);

/// Sagas per state, as a store's index counts them.
pub(crate) type StateCounts = Vec<(StateTag, usize)>;

/// A saga loaded for running: the record and the commands it has in flight.
pub(crate) type Loaded = (Saga, Vec<OutboxEntry>);

/// One page of a store's `list`.
#[derive(Debug)]
pub(crate) struct Page {
    /// The sagas' summaries, in the query's direction.
    pub sagas: Vec<query::Summary>,
    /// When more may follow: the last id examined, where the next page
    /// starts (a page that ran out of its scan budget can be short, or
    /// empty, and still have one).
    pub next: Option<Uuid>,
}

/// What a commit made durable, returned only by a store's commit (its
/// constructors are private to this module's stores): the runner releases a
/// batch's commands, replies and wake-ups from this value and nothing else.
#[must_use = "a commit's outcome says which sagas were lost; their effects must not be released"]
#[derive(Debug, Default)]
pub(crate) struct Committed {
    lost: Vec<String>,
}

impl Committed {
    /// Everything staged is durable.
    pub(in crate::store) fn all() -> Self {
        Committed::default()
    }

    /// Everything staged is durable except the writes of `lost`.
    pub(in crate::store) fn except(lost: Vec<String>) -> Self {
        Committed { lost }
    }

    /// The sagas whose write did not land (another coordinator wrote them,
    /// or the outcome is unknown): the store has forgotten them, and none of
    /// their effects may be released; they are to be reloaded.
    pub(crate) fn lost(&self) -> &[String] {
        &self.lost
    }
}

/// A commit under way, in a task of its own.
pub(crate) type CommitTask = tokio::task::JoinHandle<Result<Committed, StoreError>>;

/// How a store differs from the others, for the callers that must adapt
/// (asked once, never "which store is this").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// A saga dropped from the runner's memory can be read back with
    /// [`SagaStore::get_latest`], staged writes included: the runner may
    /// bound its resident sagas (`--resident-sagas`).
    pub evicts_resident: bool,
    /// A batch's writes depend on what the previous commit left (revision
    /// checks): the runner waits for each commit before the next batch.
    pub commit_each_batch: bool,
    /// Other coordinators write the same sagas: a watcher cannot rely on
    /// this coordinator's wake-ups alone.
    pub shared: bool,
    /// [`SagaStore::prune`] removes finished sagas past the retention.
    pub retention: bool,
}

/// The store the coordinator runs on. The runner is its only writer: it
/// stages the transitions of a batch with [`SagaStore::stage`], then makes
/// them durable with ONE [`SagaStore::begin_commit`] (group commit), and
/// sends nothing the batch implies before that commit returned `Ok`.
///
/// # Failure contract
/// - `stage` only fails on an unencodable value (a bug); nothing staged is
///   readable by other readers before its commit began.
/// - When a commit returns `Ok(committed)`, every transition staged before
///   it began is durable (survives a process crash) except those of
///   [`Committed::lost`], which the store has forgotten and which must be
///   reloaded from what is durable. Their effects must not be released.
/// - When a commit returns `Err`, nothing of that commit may be assumed
///   durable, and everything staged after it began is discarded too (it
///   follows from the failed writes): the runner stops, and a restart
///   resumes from what is durable.
/// - A read error (`StoreError::Sled`, `StoreError::JetStream`) means the
///   store could not answer now; `StoreError::Corrupt` means stored data
///   cannot be decoded, which no retry will cure.
pub(crate) trait SagaStore: Send + Sync + std::fmt::Debug + 'static {
    /// The store's name in logs and probes (`sled`, `jetstream store`).
    fn name(&self) -> &'static str;

    /// How this store differs from the others.
    fn capabilities(&self) -> Capabilities;

    /// Stages one transition (`previous`: the saga it was written from;
    /// `None` for a new saga); the next commit writes it.
    ///
    /// # Errors
    /// An unencodable value.
    fn stage(&self, t: &Transition, previous: Option<&Saga>) -> Result<(), StoreError>;

    /// Starts the commit of everything staged so far, in a task.
    fn begin_commit(&self) -> CommitTask;

    /// Commits everything staged so far before it returns, on the calling
    /// thread, when this store and the runtime can (`None`: they cannot, and
    /// [`SagaStore::begin_commit`] is the way). For a batch of one or two
    /// inputs at low load the hand-off to a task and back costs more than
    /// the overlap with the next batch that the task buys.
    fn commit_now(&self) -> Option<Result<Committed, StoreError>> {
        None
    }

    /// Final flush at shutdown, after the runner stopped.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Makes durable whatever a reader has seen (the events publisher
    /// publishes only durable events).
    fn ensure_durable(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The saga `id` as durable (or being committed).
    fn get<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>>;

    /// The saga `id` with its commands in flight, read to be written next
    /// (an operator event on a saga that is not in the runner's memory). A
    /// finished saga has no commands in flight: they are empty.
    fn load_for_update<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>>;

    /// The saga `id` as the runner last staged it (staged, being committed or durable).
    fn get_latest<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>>;

    /// The saga `id` as last staged, at once and without I/O waits: for the
    /// runner reading back a saga it evicted from memory (only asked of a
    /// store with [`Capabilities::evicts_resident`]).
    ///
    /// # Errors
    /// The store's.
    fn read_back(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        let _ = id;
        Ok(None)
    }

    /// The saga and its history.
    fn get_with_history<'a>(&'a self, id: &'a Uuid)
        -> BoxFuture<'a, Result<Option<WithHistory>, StoreError>>;

    /// The saga of a client idempotency key.
    fn saga_for_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Uuid>, StoreError>>;

    /// Up to `q.limit` sagas past `q.after` that pass `q`'s filters, in its
    /// direction; at most [`query::SCAN_BUDGET`] candidates examined where the
    /// store has indexes to narrow by.
    fn list<'a>(&'a self, q: &'a ListQuery) -> BoxFuture<'a, Result<Page, StoreError>>;

    /// What to resume at start: the non-terminal sagas with their in-flight
    /// commands (empty for a store whose sagas are loaded by partition).
    ///
    /// # Errors
    /// The store's.
    fn resume_at_start(&self) -> Result<Vec<Loaded>, StoreError>;

    /// Forgets sagas the runner stopped running (a partition released).
    fn forget(&self, ids: &[String]);

    /// Durable dead letters not yet published, with their keys.
    ///
    /// # Errors
    /// The store's.
    fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError>;

    /// Marks a dead letter published.
    ///
    /// # Errors
    /// The store's.
    fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError>;

    /// Up to `limit` durable events not yet acknowledged by the events stream.
    ///
    /// # Errors
    /// The store's.
    fn events_pending(&self, limit: usize) -> Result<Vec<(Vec<u8>, EventRecord)>, StoreError>;

    /// Number of events waiting.
    fn events_backlog(&self) -> usize;

    /// Drops acknowledged events.
    ///
    /// # Errors
    /// The store's.
    fn events_published(&self, keys: &[Vec<u8>]) -> Result<(), StoreError>;

    /// Whether the store accepts writes (readiness).
    fn probe(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// How many sagas are in each state, from an index (the console's
    /// counts); `None` for a store that has none to count from.
    fn count_by_state(&self) -> BoxFuture<'_, Result<Option<StateCounts>, StoreError>>;

    /// Removes up to `limit` finished sagas last moved before `cutoff_ms`
    /// (blocking; see [`Capabilities::retention`]); returns how many.
    ///
    /// # Errors
    /// The store's.
    fn prune(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let _ = (cutoff_ms, limit);
        Ok(0)
    }
}

/// A store shared by the runner, the API, the events publisher and the probes.
pub(crate) type SharedStore = Arc<dyn SagaStore>;

/// What the cluster code needs of a store whose sagas are split in
/// partitions (the jetstream store): load a partition taken over, reload
/// one saga, retire finished sagas from the index.
pub(crate) trait PartitionedStore: Send + Sync + 'static {
    /// The running sagas of `partition`, with their in-flight commands.
    fn load_partition(&self, partition: u32) -> BoxFuture<'_, Result<Vec<Loaded>, StoreError>>;

    /// One saga for running; `None` when terminal, gone or already running here.
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>>;

    /// Removes from the index the finished sagas whose events are all out.
    fn retire_published(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}
