//! The `jetstream` store: saga records in replicated JetStream KV buckets, so
//! several coordinators share the sagas and take over each other's.
//!
//! Buckets (replicas from `--kv-replicas`):
//! - `SAGA_RECORDS`: saga id → `{"v":1,"saga","history","outbox","dead_letters"}`,
//!   the whole saga in one value, so one KV write is one atomic transition;
//! - `SAGA_ACTIVE`: `p<partition>.<saga id>` → empty, the index of sagas a
//!   coordinator must load when it takes a partition over (non-terminal ones,
//!   and terminal ones whose events are not yet out);
//! - `SAGA_KEYS`: hex of a client idempotency key → saga id;
//! - `SAGA_LEASES` (see the `cluster` module): partition leases and members.
//!
//! **Fencing.** Every write of a saga names the revision it read
//! (`update(key, value, revision)`; `create` for a new one). Two coordinators
//! can therefore never both advance a saga from the same state: the second
//! write fails with "wrong last revision", the loser forgets its copy, and the
//! owner of the partition reloads the saga and re-sends its in-flight
//! commands (same idempotency keys). A write whose outcome is unknown (a
//! timeout while a NATS node dies) is treated the same way.
//!
//! **Group commit.** [`JsStore::write`] only stages a transition;
//! [`JsStore::flush_writes`] sends every staged record at once and waits for
//! JetStream's acknowledgements (the write is on a quorum of the replicas);
//! the runner sends no command before that, exactly as with sled.
//!
//! **Events** of a written transition are kept in memory until the events
//! publisher has them acknowledged; a coordinator that dies before loses them
//! from memory, and whoever loads the saga next re-publishes its whole history
//! (JetStream drops the repeats inside its duplicate window on `Nats-Msg-Id`).
//! A terminal saga stays in `SAGA_ACTIVE` until its events and dead letter
//! are out, so a crash in between is covered too.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_nats::jetstream::{self, kv};
use futures::{future::BoxFuture, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::{
    engine::{HistoryEntry, Saga, StateTag, Transition},
    store::{
        codec::{decode, encode},
        keys::{history_key, saga_key},
        query::Summary,
        Capabilities, CommitTask, Committed, DeadLetter, EventRecord, ListQuery, Loaded, OutboxEntry, Page,
        PartitionedStore, SagaStore, StoreError, WithHistory,
    },
};

/// Bucket of the saga records.
pub const RECORDS_BUCKET: &str = "SAGA_RECORDS";
/// Bucket of the active-saga index.
pub const ACTIVE_BUCKET: &str = "SAGA_ACTIVE";
/// Bucket of the client idempotency keys.
pub const KEYS_BUCKET: &str = "SAGA_KEYS";
/// Most KV writes in flight at once during a flush.
const FLUSH_PARALLELISM: usize = 256;

pub use crate::partition::partition_of;

fn active_key(partition: u32, saga_id: &str) -> String {
    format!("p{partition:04}.{saga_id}")
}

/// A client idempotency key as a KV key (any text; KV keys are restricted).
fn client_key(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The latest value of `key` and its revision, read through the stream's
/// leader. (A KV `get` may be answered by any replica — the buckets allow
/// direct gets — and one that has not applied the latest write yet would
/// show a saga that was just created as missing, or an old revision.)
///
/// # Errors
/// JetStream failed or timed out.
pub(crate) async fn leader_get(kv: &kv::Store, key: &str) -> Result<Option<(bytes::Bytes, u64)>, StoreError> {
    let m = saga_nats::leader_get(kv, key)
        .await
        .map_err(|e| js_err("get", e))?;
    Ok(m.map(|m| (m.payload, m.sequence)))
}

fn js_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::JetStream(format!("{what}: {e}"))
}

/// One saga as stored in `SAGA_RECORDS`.
#[derive(Debug, Serialize, Deserialize)]
struct JsRecord {
    saga: Saga,
    history: Vec<HistoryEntry>,
    outbox: Vec<OutboxEntry>,
    #[serde(default)]
    dead_letters: Vec<DeadLetter>,
}

/// [`JsRecord`] as written: borrowed, so a flush serialises without copying
/// the history and outbox of every saga it writes.
#[derive(Serialize)]
struct JsRecordRef<'a> {
    saga: &'a Saga,
    history: &'a [HistoryEntry],
    outbox: &'a [OutboxEntry],
    dead_letters: &'a [DeadLetter],
}

/// What this coordinator knows of a saga it may write.
struct Cached {
    /// Revision last read or written; `None` for a saga not yet created.
    revision: Option<u64>,
    history: Vec<HistoryEntry>,
    outbox: Vec<OutboxEntry>,
    dead_letters: Vec<DeadLetter>,
}

/// A saga with transitions staged since the last flush.
struct Staged {
    saga: Saga,
    events: Vec<EventRecord>,
    dead_letters: Vec<DeadLetter>,
    client_key: Option<String>,
}

#[derive(Default)]
struct Inner {
    cache: HashMap<String, Cached>,
    staged: HashMap<String, Staged>,
    /// Durable events not yet acknowledged by the events stream, by history key.
    events: BTreeMap<Vec<u8>, EventRecord>,
    /// Durable dead letters not yet published.
    dlq: BTreeMap<Vec<u8>, DeadLetter>,
    /// Terminal sagas whose index entry goes once their events and dead letters are out.
    retire: HashSet<String>,
}

/// Settings of the `jetstream` store.
#[derive(Debug, Clone)]
pub(crate) struct JsSettings {
    /// Replicas of every bucket (3 on a 3-node cluster).
    pub replicas: usize,
    /// Number of partitions sagas are spread over.
    pub partitions: u32,
    /// Whether saga events are published (otherwise none are queued).
    pub events: bool,
}

/// The `jetstream` store. Cheap to clone.
#[derive(Clone)]
pub(crate) struct JsStore {
    buckets: Arc<Buckets>,
    settings: JsSettings,
    inner: Arc<Mutex<Inner>>,
}

struct Buckets {
    records: kv::Store,
    active: kv::Store,
    keys: kv::Store,
}

impl JsStore {
    /// Opens (creating when absent) the buckets.
    ///
    /// # Errors
    /// JetStream refused or did not answer.
    pub(crate) async fn open(js: &jetstream::Context, settings: JsSettings) -> Result<Self, StoreError> {
        let bucket = |name: &str, history: i64| kv::Config {
            bucket: name.to_string(),
            history,
            num_replicas: settings.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let open = |config: kv::Config| async move {
            let name = config.bucket.clone();
            match js.get_key_value(&name).await {
                Ok(store) => Ok(store),
                Err(_) => js
                    .create_key_value(config)
                    .await
                    .map_err(|e| js_err(&format!("create bucket {name}"), e)),
            }
        };
        Ok(JsStore {
            buckets: Arc::new(Buckets {
                records: open(bucket(RECORDS_BUCKET, 1)).await?,
                active: open(bucket(ACTIVE_BUCKET, 1)).await?,
                keys: open(bucket(KEYS_BUCKET, 1)).await?,
            }),
            settings,
            inner: Arc::new(Mutex::new(Inner::default())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Stages one transition (see the module docs); nothing leaves before
    /// [`JsStore::flush_writes`].
    ///
    /// # Errors
    /// None today (the signature matches the sled store's).
    pub(crate) fn write(&self, t: &Transition, previous: Option<StateTag>) -> Result<(), StoreError> {
        let saga = &t.saga;
        let mut inner = self.lock();
        if previous.is_some() && !inner.cache.contains_key(&saga.id) {
            // Never expected (the runner only writes sagas it loaded here); if it
            // happens, the create-only write below fails and the saga is reloaded.
            warn!(saga_id = %saga.id, "saga written without being loaded here; it will be reloaded");
        }
        let cached = inner.cache.entry(saga.id.clone()).or_insert_with(|| Cached {
            revision: None,
            history: Vec::new(),
            outbox: Vec::new(),
            dead_letters: Vec::new(),
        });
        cached.history.extend(t.history.iter().cloned());
        cached.outbox.retain(|e| !t.settled.contains(&(e.step, e.kind)));
        for c in &t.commands {
            cached.outbox.retain(|e| !(e.step == c.step && e.kind == c.kind));
            cached.outbox.push(OutboxEntry::new(saga, c));
        }
        let dead = DeadLetter::on_entering(saga, previous);
        if let Some(d) = &dead {
            cached.dead_letters.push(d.clone());
        }
        let events = self.settings.events;
        let staged = inner.staged.entry(saga.id.clone()).or_insert_with(|| Staged {
            saga: saga.clone(),
            events: Vec::new(),
            dead_letters: Vec::new(),
            client_key: None,
        });
        staged.saga = saga.clone();
        if events {
            staged
                .events
                .extend(t.history.iter().map(|h| EventRecord::new(saga, h)));
        }
        staged.dead_letters.extend(dead);
        if previous.is_none() {
            staged.client_key = saga.idempotency_key.clone();
        }
        Ok(())
    }

    /// Writes every staged saga (at once) and waits for JetStream. Returns the
    /// sagas whose write was refused (another coordinator wrote them: wrong
    /// revision) or whose outcome is unknown (timeout): this coordinator has
    /// forgotten them; the caller must not send their commands and should
    /// have them reloaded.
    ///
    /// # Errors
    /// An unencodable record (a bug).
    pub(crate) async fn flush_writes(&self) -> Result<Vec<String>, StoreError> {
        let jobs = {
            let mut inner = self.lock();
            let staged: Vec<(String, Staged)> = inner.staged.drain().collect();
            let mut jobs = Vec::with_capacity(staged.len());
            for (id, s) in staged {
                let Some(c) = inner.cache.get(&id) else { continue };
                let record = JsRecordRef {
                    saga: &s.saga,
                    history: &c.history,
                    outbox: &c.outbox,
                    dead_letters: &c.dead_letters,
                };
                jobs.push((id, c.revision, encode(&record)?, s));
            }
            jobs
        };
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let results: Vec<(String, Result<u64, StoreError>, Staged)> = futures::stream::iter(jobs)
            .map(|(id, revision, bytes, staged)| async move {
                let r = self.persist(&id, revision, bytes, &staged).await;
                (id, r, staged)
            })
            .buffer_unordered(FLUSH_PARALLELISM)
            .collect()
            .await;
        let mut lost = Vec::new();
        let mut inner = self.lock();
        for (id, result, staged) in results {
            match result {
                Ok(revision) => {
                    let key = saga_key(&id)?;
                    for e in staged.events {
                        inner.events.insert(history_key(&key, e.event.sequence), e);
                    }
                    for d in staged.dead_letters {
                        inner.dlq.insert(history_key(&key, staged.saga.seq), d);
                    }
                    if staged.saga.state.is_terminal() {
                        inner.cache.remove(&id);
                        inner.retire.insert(id);
                    } else if let Some(c) = inner.cache.get_mut(&id) {
                        c.revision = Some(revision);
                    }
                }
                Err(e) => {
                    warn!(saga_id = %id, error = %e, "saga write refused or unknown; forgetting it until reloaded");
                    inner.cache.remove(&id);
                    lost.push(id);
                }
            }
        }
        Ok(lost)
    }

    async fn persist(
        &self,
        id: &str,
        revision: Option<u64>,
        bytes: Vec<u8>,
        staged: &Staged,
    ) -> Result<u64, StoreError> {
        match revision {
            Some(rev) => self
                .buckets
                .records
                .update(id, bytes.into(), rev)
                .await
                .map_err(|e| js_err("update", e)),
            None => {
                if let Some(k) = &staged.client_key {
                    match self
                        .buckets
                        .keys
                        .create(client_key(k), id.as_bytes().to_vec().into())
                        .await
                    {
                        Ok(_) => {}
                        // Reserved by an earlier attempt for this very saga (see the runner).
                        Err(e) if saga_nats::is_already_exists(&e) => {
                            let held = leader_get(&self.buckets.keys, &client_key(k)).await?;
                            if held.as_ref().map(|(v, _)| v.as_ref()) != Some(id.as_bytes()) {
                                return Err(js_err("idempotency key", "taken by another saga"));
                            }
                        }
                        Err(e) => return Err(js_err("idempotency key", e)),
                    }
                }
                // Index first: a record is never unreachable from the index.
                let p = partition_of(id, self.settings.partitions);
                self.buckets
                    .active
                    .put(active_key(p, id), bytes::Bytes::new())
                    .await
                    .map_err(|e| js_err("index", e))?;
                self.buckets
                    .records
                    .create(id, bytes.into())
                    .await
                    .map_err(|e| js_err("create", e))
            }
        }
    }

    async fn record(&self, id: &str) -> Result<Option<(JsRecord, u64)>, StoreError> {
        match leader_get(&self.buckets.records, id).await? {
            Some((value, revision)) => Ok(Some((decode::<JsRecord>(&value, "saga record")?, revision))),
            None => Ok(None),
        }
    }

    /// The saga `id`, if stored (as acknowledged by JetStream).
    ///
    /// # Errors
    /// JetStream failed; a corrupt record.
    pub(crate) async fn get(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        Ok(self.record(&id.to_string()).await?.map(|(r, _)| r.saga))
    }

    /// The saga and its history, from one read of its record.
    ///
    /// # Errors
    /// As [`JsStore::get`].
    pub(crate) async fn get_with_history(
        &self,
        id: &Uuid,
    ) -> Result<Option<(Saga, Vec<HistoryEntry>)>, StoreError> {
        Ok(self
            .record(&id.to_string())
            .await?
            .map(|(r, _)| (r.saga, r.history)))
    }

    /// Reads the saga with its commands in flight and keeps what a write
    /// needs (its revision).
    ///
    /// # Errors
    /// As [`JsStore::get`].
    pub(crate) async fn load_for_update(&self, id: &Uuid) -> Result<Option<Loaded>, StoreError> {
        let key = id.to_string();
        {
            // Written in the batch under way (the runner let it go as it ended):
            // that write is the latest, and the record read from KV would
            // replace what the flush writes it with.
            let inner = self.lock();
            if let Some(staged) = inner.staged.get(&key) {
                let outbox = inner
                    .cache
                    .get(&key)
                    .map(|c| c.outbox.clone())
                    .unwrap_or_default();
                return Ok(Some((staged.saga.clone(), outbox)));
            }
        }
        let Some((record, revision)) = self.record(&key).await? else {
            return Ok(None);
        };
        self.lock().cache.insert(
            record.saga.id.clone(),
            Cached {
                revision: Some(revision),
                history: record.history,
                outbox: record.outbox.clone(),
                dead_letters: record.dead_letters,
            },
        );
        Ok(Some((record.saga, record.outbox)))
    }

    /// The saga created with client idempotency key `key`, if any.
    ///
    /// # Errors
    /// JetStream failed; a corrupt id.
    pub(crate) async fn saga_for_key(&self, key: &str) -> Result<Option<Uuid>, StoreError> {
        match leader_get(&self.buckets.keys, &client_key(key)).await? {
            Some((bytes, _)) => Uuid::try_parse_ascii(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("idempotency key: {e}"))),
            None => Ok(None),
        }
    }

    /// A page of the sagas `q` accepts, in its direction. Lists every record
    /// key and reads records until the page is full: O(stored sagas) keys
    /// per page and, for a rare filter, that many record reads (the sled
    /// store has indexes; KV has none).
    ///
    /// # Errors
    /// As [`JsStore::get`].
    pub(crate) async fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        // No secondary index in KV: the keys, then every record past the
        // cursor until the page is full (docs/operations.md has the cost).
        let mut ids: Vec<Uuid> = self
            .buckets
            .records
            .keys()
            .await
            .map_err(|e| js_err("keys", e))?
            .try_filter_map(|k| async move { Ok(Uuid::parse_str(&k).ok()) })
            .try_collect()
            .await
            .map_err(|e| js_err("keys", e))?;
        let (lo, hi) = q.id_bounds();
        ids.retain(|id| (lo..=hi).contains(id.as_bytes()) && q.past_cursor(id));
        ids.sort();
        if q.newest_first {
            ids.reverse();
        }
        let (mut sagas, mut next, mut last) = (Vec::new(), None, None);
        for id in ids {
            let Some(saga) = self.get(&id).await? else {
                continue;
            };
            let summary = Summary::of(&saga);
            if !q.matches(&summary) {
                continue;
            }
            if sagas.len() == q.limit {
                next = last;
                break;
            }
            sagas.push(summary);
            last = Some(id);
        }
        Ok(Page { sagas, next })
    }

    /// Loads the sagas of `partition` this coordinator just took over: the
    /// running ones are returned with their in-flight commands; every one has
    /// its history queued for re-publication (deduplicated by JetStream), and
    /// terminal ones are retired once that is done.
    ///
    /// # Errors
    /// JetStream failed; a corrupt record.
    pub(crate) async fn load_partition(&self, partition: u32) -> Result<Vec<Loaded>, StoreError> {
        let prefix = format!("p{partition:04}.");
        let keys: Vec<String> = self
            .buckets
            .active
            .keys()
            .await
            .map_err(|e| js_err("index keys", e))?
            .try_filter(|k| futures::future::ready(k.starts_with(&prefix)))
            .try_collect()
            .await
            .map_err(|e| js_err("index keys", e))?;
        // Many reads at once: a takeover's time is the failover time.
        let loaded: Vec<Result<Option<Loaded>, StoreError>> = futures::stream::iter(keys)
            .map(|key| {
                let n = prefix.len();
                async move { self.load(&key[n..]).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        loaded.into_iter().filter_map(Result::transpose).collect()
    }

    /// Loads one saga for running (see [`JsStore::load_partition`]); `None`
    /// when it is terminal, gone, or already running here.
    ///
    /// # Errors
    /// As [`JsStore::load_partition`].
    pub(crate) async fn load(&self, id: &str) -> Result<Option<Loaded>, StoreError> {
        // Already running here: the runner's copy (and any write staged for it) wins.
        if self.lock().cache.contains_key(id) {
            return Ok(None);
        }
        let Some((record, revision)) = self.record(id).await? else {
            // An index entry whose record was never created (a crash in between).
            let p = partition_of(id, self.settings.partitions);
            self.buckets
                .active
                .delete(active_key(p, id))
                .await
                .map_err(|e| js_err("index delete", e))?;
            return Ok(None);
        };
        let key = saga_key(id)?;
        let mut inner = self.lock();
        if self.settings.events {
            for h in &record.history {
                inner
                    .events
                    .insert(history_key(&key, h.seq), EventRecord::new(&record.saga, h));
            }
        }
        if let Some(d) = record.dead_letters.last() {
            if record.saga.state.tag() == StateTag::Failed {
                inner.dlq.insert(history_key(&key, record.saga.seq), d.clone());
            }
        }
        if record.saga.state.is_terminal() {
            inner.retire.insert(id.to_string());
            return Ok(None);
        }
        inner.cache.insert(
            id.to_string(),
            Cached {
                revision: Some(revision),
                history: record.history,
                outbox: record.outbox.clone(),
                dead_letters: record.dead_letters,
            },
        );
        Ok(Some((record.saga, record.outbox)))
    }

    /// Forgets sagas this coordinator no longer runs (a partition released).
    pub(crate) fn forget(&self, ids: &[String]) {
        let mut inner = self.lock();
        for id in ids {
            inner.cache.remove(id);
            inner.staged.remove(id);
        }
    }

    /// Removes from the index the terminal sagas whose events and dead
    /// letters are all out.
    ///
    /// # Errors
    /// JetStream failed (retried on the next call).
    pub(crate) async fn retire_published(&self) -> Result<(), StoreError> {
        let done: Vec<String> = {
            let inner = self.lock();
            inner
                .retire
                .iter()
                .filter(|id| {
                    let Ok(key) = saga_key(id) else { return true };
                    let after = key.to_vec();
                    let events = inner
                        .events
                        .range(after.clone()..)
                        .next()
                        .is_some_and(|(k, _)| k.starts_with(&key));
                    let dlq = inner
                        .dlq
                        .range(after..)
                        .next()
                        .is_some_and(|(k, _)| k.starts_with(&key));
                    !events && !dlq
                })
                .cloned()
                .collect()
        };
        for id in done {
            let p = partition_of(&id, self.settings.partitions);
            self.buckets
                .active
                .delete(active_key(p, &id))
                .await
                .map_err(|e| js_err("index delete", e))?;
            self.lock().retire.remove(&id);
        }
        Ok(())
    }

    /// Up to `limit` durable events not yet published.
    pub(crate) fn events_pending(&self, limit: usize) -> Vec<(Vec<u8>, EventRecord)> {
        self.lock()
            .events
            .iter()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Number of events waiting.
    pub(crate) fn events_backlog(&self) -> usize {
        self.lock().events.len()
    }

    /// Drops acknowledged events.
    pub(crate) fn events_published(&self, keys: &[Vec<u8>]) {
        let mut inner = self.lock();
        for k in keys {
            inner.events.remove(k);
        }
    }

    /// Dead letters not yet published.
    pub(crate) fn dlq_pending(&self) -> Vec<(Vec<u8>, DeadLetter)> {
        self.lock()
            .dlq
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Drops a published dead letter.
    pub(crate) fn dlq_published(&self, key: &[u8]) {
        self.lock().dlq.remove(key);
    }

    /// Whether JetStream answers (readiness).
    ///
    /// # Errors
    /// The records bucket cannot be reached within 2 s.
    pub(crate) async fn probe(&self) -> Result<(), StoreError> {
        let records = self.buckets.records.clone();
        match tokio::time::timeout(Duration::from_secs(2), records.status()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(js_err("status", e)),
            Err(_) => Err(StoreError::JetStream("status timed out".into())),
        }
    }
}

impl std::fmt::Debug for JsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsStore")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Logs the buckets' layout once at start.
pub(crate) fn log_opened(store: &JsStore) {
    info!(
        partitions = store.settings.partitions,
        replicas = store.settings.replicas,
        "jetstream store opened ({RECORDS_BUCKET}, {ACTIVE_BUCKET}, {KEYS_BUCKET})"
    );
}

impl SagaStore for JsStore {
    fn name(&self) -> &'static str {
        "jetstream store"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            evicts_resident: false,
            // A batch's writes check the revisions the previous one left.
            commit_each_batch: true,
            shared: true,
            retention: false,
        }
    }

    fn stage(&self, t: &Transition, previous: Option<&Saga>) -> Result<(), StoreError> {
        self.write(t, previous.map(|p| p.state.tag()))
    }

    fn begin_commit(&self) -> CommitTask {
        let s = self.clone();
        tokio::spawn(async move { s.flush_writes().await.map(Committed::except) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Every commit waited for JetStream's acknowledgements.
        Box::pin(std::future::ready(Ok(())))
    }

    fn ensure_durable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Readers only see what JetStream acknowledged.
        Box::pin(std::future::ready(Ok(())))
    }

    fn get<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>> {
        Box::pin(JsStore::get(self, id))
    }

    fn load_for_update<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>> {
        Box::pin(JsStore::load_for_update(self, id))
    }

    fn get_latest<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>> {
        Box::pin(JsStore::get(self, id))
    }

    fn get_with_history<'a>(
        &'a self,
        id: &'a Uuid,
    ) -> BoxFuture<'a, Result<Option<WithHistory>, StoreError>> {
        Box::pin(JsStore::get_with_history(self, id))
    }

    fn saga_for_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Uuid>, StoreError>> {
        Box::pin(JsStore::saga_for_key(self, key))
    }

    fn list<'a>(&'a self, q: &'a ListQuery) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(JsStore::list(self, q))
    }

    fn resume_at_start(&self) -> Result<Vec<Loaded>, StoreError> {
        // Loaded partition by partition as leases are taken (the cluster module).
        Ok(Vec::new())
    }

    fn forget(&self, ids: &[String]) {
        JsStore::forget(self, ids);
    }

    fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
        Ok(JsStore::dlq_pending(self))
    }

    fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError> {
        JsStore::dlq_published(self, key);
        Ok(())
    }

    fn events_pending(&self, limit: usize) -> Result<Vec<(Vec<u8>, EventRecord)>, StoreError> {
        Ok(JsStore::events_pending(self, limit))
    }

    fn events_backlog(&self) -> usize {
        JsStore::events_backlog(self)
    }

    fn events_published(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        JsStore::events_published(self, keys);
        Ok(())
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(JsStore::probe(self))
    }

    /// No state index in KV: counting would read every record.
    fn count_by_state(&self) -> BoxFuture<'_, Result<Option<crate::store::StateCounts>, StoreError>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

impl PartitionedStore for JsStore {
    fn load_partition(&self, partition: u32) -> BoxFuture<'_, Result<Vec<Loaded>, StoreError>> {
        Box::pin(JsStore::load_partition(self, partition))
    }

    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>> {
        Box::pin(JsStore::load(self, id))
    }

    fn retire_published(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(JsStore::retire_published(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_become_valid_kv_keys() {
        assert_eq!(client_key("a b/."), "6120622f2e");
    }
}
