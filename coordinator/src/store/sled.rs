//! The coordinator's durable state, in sled. Everything sled-specific lives here.
//!
//! Trees:
//! - `sagas`: saga id (16 UUID bytes; v7, so key order is creation order) →
//!   `{"v":1,"saga":{…}}`, the saga's last snapshot (its definition by
//!   `definition_ref`, or inline in records written by earlier versions):
//!   written when the saga is created, when it ends, and when its history
//!   passes a multiple of `journal::SNAPSHOT_EVERY` entries — not at every
//!   transition;
//! - `journal`: saga id ++ the sequence of the transition's last history
//!   entry (u64 BE) → what one transition changed (`journal`: state, the
//!   steps it touched, its history entries, the commands it sent and
//!   settled). A saga is its snapshot with the later entries folded in; its
//!   history and its commands in flight (the outbox) are folded from all
//!   its entries, so neither is written anywhere else;
//! - `definitions`: `name@version#n` → the definition snapshot records refer
//!   to (stored once per distinct content, kept);
//! - `history`: saga id ++ seq (u64 BE) → one [`HistoryEntry`], as earlier
//!   versions wrote it (read, never written: the journal holds new history);
//! - `by_state`: state tag (1 byte) ++ saga id → `[]`, the state index; a
//!   terminal saga's entry holds its list summary instead ([`Summary`]), so
//!   that a `ListSagas` page of ended sagas reads no record (entries earlier
//!   versions wrote are empty, and read the record);
//! - `by_attr`: attribute (1 byte: customer, order id, definition name) ++
//!   the value's length (u16 BE) ++ the value ++ saga id → `[]`, written
//!   with the saga's creation: what `ListSagas`' filters scan (`listing`);
//! - `outbox`: the commands in flight as earlier versions kept them; moved
//!   into the journal on open (`legacy`);
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
//!   generation ++ sequence, stored at most every 100 ms and not flushed:
//!   after a crash the last interval's events are re-published and
//!   JetStream drops the copies by `Nats-Msg-Id`). Nothing
//!   is removed key by key: once the log holds `EVENTS_ROTATE` published
//!   pointers a new generation is started, and a generation entirely
//!   published is dropped whole (sled frees its pages). A log written by an
//!   earlier version (`events_outbox`: one event copy per history entry,
//!   removed one by one) is converted on open.
//!
//! [`Store::write`] stages one transition (journal entry, snapshot when
//! due, index, idempotency key). The caller groups many writes and then calls
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

mod counts;
mod events_log;
#[cfg(test)]
mod inline_log_tests;
mod journal;
mod legacy;
mod listing;
mod prune;
mod record;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use sled::{transaction::ConflictableTransactionError, Transactional};
use uuid::Uuid;

use self::events_log::{
    event_pointers, EventPointer, EventSources, EventsReady, EVENTS_READY, EVENTS_ROTATE,
};
use self::record::DefinitionRefs;
use crate::{
    engine::{HistoryEntry, Saga, StateTag, Transition},
    store::{
        codec::{decode, encode},
        keys::{be_u64, history_key, saga_key, state_key},
        query::Summary,
        DeadLetter, EventRecord, ListQuery, Loaded, Page, StoreError, WithHistory,
    },
};

/// Default bound of sled's page cache in tests.
#[cfg(test)]
pub(crate) const DEFAULT_CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// How often a read of one saga starts again when its snapshot moved under
/// it; a saga writes a snapshot at most every [`journal::SNAPSHOT_EVERY`]
/// transitions, so a second read all but always holds.
const READ_RETRIES: usize = 8;

/// Opens the sled database in `dir`. sled releases its file lock from a
/// background thread a moment after the last handle is dropped (an in-process
/// restart, or a previous process still exiting): a lock conflict is retried
/// for up to 3 s.
fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
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
            other => return Ok(other?),
        }
    }
}

/// Runs sled's blocking work (a transaction, a flush) on the blocking pool,
/// writing sled's log on that thread (`sled::with_inline_log_writes`, a patch
/// of the vendored sled): no hand-off to sled's I/O pool and back per buffer,
/// and one sync for all the buffers it seals.
/// Not sled's `flush_async`: that goes through the I/O pool too.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(move || sled::with_inline_log_writes(work))
        .await
        .map_err(|e| StoreError::Corrupt(format!("blocking store task failed: {e}")))?
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
pub(crate) struct Store {
    db: sled::Db,
    sagas: sled::Tree,
    journal: sled::Tree,
    /// History as earlier versions wrote it (read and pruned only).
    history: sled::Tree,
    by_state: sled::Tree,
    /// Customer, order id and definition name → saga ids (`listing`).
    by_attr: sled::Tree,
    idempotency: sled::Tree,
    dead_letters: sled::Tree,
    dlq_outbox: sled::Tree,
    /// The events log's generations, oldest first; transactions write to
    /// the last (holding the read lock while they commit, so a generation
    /// is never dropped or replaced under a transaction).
    events: Arc<std::sync::RwLock<Vec<(u64, sled::Tree)>>>,
    /// How far the events publisher got: `(generation, sequence)`.
    events_cursor: Arc<Mutex<Option<(u64, u64)>>>,
    /// When the cursor was last stored in `meta`, and what was stored (it is
    /// stored at most every `EVENTS_CURSOR_SAVE_EVERY`, see `events_log`).
    cursor_saved: Arc<Mutex<Option<SavedCursor>>>,
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
    /// How often at most the events cursor is stored (`EVENTS_CURSOR_SAVE_EVERY`).
    cursor_save_every: std::time::Duration,
    meta: sled::Tree,
    /// Set before staged writes are applied, cleared by
    /// [`Store::flush_writes`] once the writer's flush returned.
    unflushed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Transitions written since the last flush, not yet in sled.
    staged: Arc<Mutex<Staged>>,
    /// `definitions`: `name@version#n` → a definition snapshot sagas refer to.
    definitions: sled::Tree,
    refs: Arc<Mutex<DefinitionRefs>>,
    /// Sagas per state, moved with every change to `by_state` (`counts`).
    counts: Arc<counts::StateCounts>,
}

/// When the events cursor was stored, and the `(generation, sequence)` stored.
type SavedCursor = (std::time::Instant, (u64, u64));

/// The trees a staged write goes to.
#[derive(Debug, Clone, Copy)]
enum Tree {
    Sagas,
    Journal,
    Events,
    ByState,
    ByAttr,
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
    /// Each staged saga as its latest transition left it.
    latest: HashMap<[u8; 16], Saga>,
    /// Sequence of the next events-log entry.
    next_event: u64,
    /// The staged transitions' events-log pointers, written as ONE entry by
    /// the commit (a write per group commit, not per transition).
    pointers: Vec<EventPointer>,
    /// Their events, for `Store::events_ready`.
    events: Vec<EventRecord>,
    /// The records of the transaction being applied now: the runner stages
    /// its next batch while the previous one is committed, and
    /// [`Store::get_latest`] must see them until sled does.
    applying: Option<Arc<HashMap<[u8; 16], Saga>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(sled)")
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// # Errors
    /// sled cannot open the directory (missing permissions, another process holds it).
    #[cfg(test)]
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`] with sled's page cache bounded to `cache_bytes`
    /// (sled's own default is 1 GiB, which a long-running coordinator grows into).
    ///
    /// # Errors
    /// As [`Store::open`].
    pub(crate) fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = open_db(dir, cache_bytes)?;
        let by_state = db.open_tree("by_state")?;
        Store {
            counts: Arc::new(counts::StateCounts::scanned(&by_state)?),
            by_state,
            sagas: db.open_tree("sagas")?,
            journal: db.open_tree("journal")?,
            history: db.open_tree("history")?,
            by_attr: db.open_tree("by_attr")?,
            idempotency: db.open_tree("idempotency")?,
            dead_letters: db.open_tree("dead_letters")?,
            dlq_outbox: db.open_tree("dlq_outbox")?,
            events: Default::default(),
            events_cursor: Default::default(),
            cursor_saved: Default::default(),
            events_ready: Default::default(),
            events_on: true,
            event_sources: Default::default(),
            events_rotate: EVENTS_ROTATE,
            cursor_save_every: events_log::EVENTS_CURSOR_SAVE_EVERY,
            meta: db.open_tree("meta")?,
            unflushed: Default::default(),
            staged: Default::default(),
            definitions: db.open_tree("definitions")?,
            refs: Default::default(),
            db,
        }
        .with_events_log()?
        .with_legacy_outbox_converted()?
        .with_attr_index()
    }

    /// This store without saga events (`--no-events`): transitions write no
    /// events-log pointers (what an earlier run logged stays for a later run
    /// with events).
    #[must_use]
    pub(crate) fn without_events(mut self) -> Self {
        self.events_on = false;
        self
    }

    /// Stages one transition written from `previous` (`None` for a new
    /// saga): its journal entry (what it changed, its history, the commands
    /// it sent and settled), a snapshot of the saga when one is due, the
    /// state index (moving from `previous`'s state when it changed), the
    /// client idempotency key of a new saga, a dead letter on entering FAILED
    /// and the events-log pointer. Nothing reaches sled yet: the next
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
    /// An unencodable value; a transition without a history entry (the
    /// engine logs one for every change: its journal key is the entry's).
    pub(crate) fn write(&self, t: &Transition, previous: Option<&Saga>) -> Result<(), StoreError> {
        let saga = &t.saga;
        let id = saga_key(&saga.id)?;
        if t.history.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "saga {}: a transition without a history entry cannot be journaled",
                saga.id
            )));
        }
        let mut ops = Vec::with_capacity(6);
        let entry = previous
            .filter(|_| !journal::snapshot_due(previous, t))
            .and_then(|p| journal::entry(p, t));
        let journal_key = history_key(&id, saga.seq);
        match entry {
            Some(e) => ops.push((Tree::Journal, journal_key, Some(encode(&e)?))),
            None => {
                ops.push((Tree::Sagas, id.to_vec(), Some(self.encode_record(saga)?)));
                ops.push((
                    Tree::Journal,
                    journal_key,
                    Some(encode(&journal::beside_snapshot(t))?),
                ));
            }
        }
        let previous_tag = previous.map(|p| p.state.tag());
        let new_tag = saga.state.tag();
        let moved = previous_tag != Some(new_tag);
        if moved {
            if let Some(prev) = previous_tag {
                ops.push((Tree::ByState, state_key(prev, &id), None));
            }
        }
        // Every write that leaves the saga terminal writes its entry: the
        // summary there is always that of the saga's latest write.
        if new_tag.is_terminal() {
            let summary = encode(&Summary::of(saga).stored())?;
            ops.push((Tree::ByState, state_key(new_tag, &id), Some(summary)));
        } else if moved {
            ops.push((Tree::ByState, state_key(new_tag, &id), Some(Vec::new())));
        }
        if previous.is_none() {
            if let Some(key) = saga.idempotency_key.as_deref() {
                ops.push((Tree::Idempotency, key.as_bytes().to_vec(), Some(id.to_vec())));
            }
            for k in listing::attr_keys(saga)? {
                ops.push((Tree::ByAttr, k, Some(Vec::new())));
            }
        }
        if let Some(d) = DeadLetter::on_entering(saga, previous_tag) {
            let (k, v) = (history_key(&id, saga.seq), encode(&d)?);
            ops.push((Tree::DeadLetters, k.clone(), Some(v.clone())));
            ops.push((Tree::DlqOutbox, k, Some(v)));
        }
        let events: Vec<EventRecord> = match self.events_on {
            true => t.history.iter().map(|h| EventRecord::new(saga, h)).collect(),
            false => Vec::new(),
        };
        let mut staged = self.staged();
        if let (Some(first), Some(last)) = (t.history.first().filter(|_| self.events_on), t.history.last()) {
            staged.pointers.push(EventPointer {
                id,
                first: first.seq,
                last: last.seq,
                at_ms: last.at_ms,
            });
            staged.events.extend(events);
        }
        staged.latest.insert(id, saga.clone());
        staged.ops.extend(ops);
        Ok(())
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        lock(&self.staged)
    }

    /// Applies every staged transition in one sled transaction (unflushed).
    fn apply_staged(&self) -> Result<(), StoreError> {
        let (ops, events) = {
            let mut staged = self.staged();
            let mut ops = std::mem::take(&mut staged.ops);
            let latest = Arc::new(std::mem::take(&mut staged.latest));
            staged.applying = Some(latest);
            let mut events = None;
            if !staged.pointers.is_empty() {
                // The sequence is taken with the ops: entries stay in commit order.
                let seq = staged.next_event;
                staged.next_event += 1;
                let pointers = std::mem::take(&mut staged.pointers);
                ops.push((
                    Tree::Events,
                    seq.to_be_bytes().to_vec(),
                    Some(event_pointers(&pointers)),
                ));
                events = Some((seq, std::mem::take(&mut staged.events)));
            }
            (ops, events)
        };
        let result = self.commit_staged(&ops);
        let mut staged = self.staged();
        // Committed, or failed: sled answers for these sagas now.
        staged.applying = None;
        if result.is_err() {
            // What was staged meanwhile follows from the failed writes: it must
            // not be committed without them (the runner stops; a restart
            // resumes from what is durable).
            staged.ops.clear();
            staged.latest.clear();
            staged.pointers.clear();
            staged.events.clear();
        }
        drop(staged);
        let generation = result?;
        if let Some((seq, events)) = events {
            let mut ready = lock(&self.events_ready);
            // Past the bound the publisher reads the log instead.
            if ready.held + events.len() <= EVENTS_READY {
                ready.held += events.len();
                ready.queue.push_back((generation, seq, events));
            }
        }
        Ok(())
    }

    /// Commits `ops` in one transaction; returns the events log generation
    /// it wrote to.
    fn commit_staged(&self, ops: &[Op]) -> Result<u64, StoreError> {
        // The generation written to stays while the transaction commits.
        let events = read_lock(&self.events);
        let Some((generation, events_log)) = events.last() else {
            return Err(StoreError::Corrupt("the events log has no generation".into()));
        };
        if ops.is_empty() {
            return Ok(*generation);
        }
        // Before the commit: whoever sees this data and then finds the flag
        // clear knows a flush covered it.
        self.unflushed.store(true, std::sync::atomic::Ordering::SeqCst);
        let deltas = (
            &self.sagas,
            &self.journal,
            &self.by_state,
            &self.by_attr,
            &self.idempotency,
            &self.dead_letters,
            &self.dlq_outbox,
            events_log,
        )
            .transaction(
                |(sagas, journal, by_state, by_attr, idempotency, dead_letters, dlq_outbox, events_log)| {
                    let mut deltas = counts::Deltas::default();
                    for (tree, k, v) in ops {
                        if let Tree::ByState = tree {
                            match v {
                                Some(v) => {
                                    deltas.inserted(k, by_state.insert(k.as_slice(), v.as_slice())?.as_ref())
                                }
                                None => deltas.removed(k, by_state.remove(k.as_slice())?.as_ref()),
                            }
                            continue;
                        }
                        let tree = match tree {
                            Tree::Sagas => sagas,
                            Tree::Journal => journal,
                            Tree::Events => events_log,
                            Tree::ByState => by_state,
                            Tree::ByAttr => by_attr,
                            Tree::Idempotency => idempotency,
                            Tree::DeadLetters => dead_letters,
                            Tree::DlqOutbox => dlq_outbox,
                        };
                        // Blind writes: the value replaced is not wanted, and
                        // reading it was a tree lookup per write (sled patch 6).
                        match v {
                            Some(v) => tree.set(k.as_slice(), v.as_slice()),
                            None => tree.unset(k.as_slice()),
                        }
                    }
                    Ok::<_, ConflictableTransactionError<()>>(deltas)
                },
            )
            .map_err(transaction_error("transaction aborted"))?;
        self.counts.apply(&deltas);
        metrics::counter!(crate::telemetry::STORE_WRITES).increment(ops.len() as u64);
        Ok(*generation)
    }

    /// Applies what is staged, then makes every write so far durable (one
    /// sync for all of them).
    ///
    /// # Errors
    /// sled could not write or sync its log.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let this = self.clone();
        blocking(move || {
            this.apply_staged()?;
            this.save_events_cursor()?;
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
    #[cfg(test)]
    pub(crate) async fn flush_writes(&self) -> Result<(), StoreError> {
        let this = self.clone();
        blocking(move || this.flush_writes_blocking()).await
    }

    /// [`Store::flush_writes`] on the calling thread (a blocking one).
    ///
    /// # Errors
    /// As [`Store::flush`].
    pub(crate) fn flush_writes_blocking(&self) -> Result<(), StoreError> {
        sled::with_inline_log_writes(|| {
            self.apply_staged()?;
            self.db.flush()?;
            self.unflushed.store(false, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
    }

    /// Makes durable everything a reader has seen so far: a flush, unless the
    /// writer's last flush already covered every write (the usual case at low
    /// load, where it saves a second flush per transition). It does not
    /// apply staged writes: those are the runner's to commit.
    ///
    /// # Errors
    /// As [`Store::flush`].
    pub(crate) async fn ensure_durable(&self) -> Result<(), StoreError> {
        if self.unflushed.load(std::sync::atomic::Ordering::SeqCst) {
            let db = self.db.clone();
            blocking(move || db.flush().map(drop).map_err(StoreError::from)).await?;
        }
        Ok(())
    }

    /// The saga `id` as the runner last wrote it: staged, being committed, or
    /// else stored.
    ///
    /// # Errors
    /// As [`Store::get`].
    pub(crate) fn get_latest(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        let latest = {
            let staged = self.staged();
            let key = id.as_bytes();
            staged
                .latest
                .get(key)
                .or_else(|| staged.applying.as_ref().and_then(|a| a.get(key)))
                .cloned()
        };
        match latest {
            Some(saga) => Ok(Some(saga)),
            None => self.get(id),
        }
    }

    /// The saga `id`, if stored: its snapshot with the journal entries after
    /// it folded in.
    ///
    /// # Errors
    /// sled errors; a corrupt record or entry.
    pub(crate) fn get(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        // The record and the journal are two reads: a transaction can write a
        // newer snapshot between them. Each retry starts from a newer one.
        for _ in 0..READ_RETRIES {
            let Some(bytes) = self.sagas.get(id.as_bytes())? else {
                return Ok(None);
            };
            // An ended saga's snapshot is its latest state: no journal read
            // (a ListSagas page reads a hundred of them).
            let (saga, latest) = self.decode_snapshot(&bytes)?;
            if latest {
                return Ok(Some(saga));
            }
            if let Some(saga) = self.fold_after(id.as_bytes(), saga)? {
                return Ok(Some(saga));
            }
        }
        Err(StoreError::Corrupt(format!(
            "saga {id}: its snapshot moved at each of {READ_RETRIES} reads"
        )))
    }

    /// `saga` (a snapshot) with the journal entries after it folded in, or
    /// `None` when a newer snapshot was written meanwhile.
    fn fold_after(&self, key: &[u8; 16], mut saga: Saga) -> Result<Option<Saga>, StoreError> {
        let after = history_key(key, saga.seq.saturating_add(1))..=history_key(key, u64::MAX);
        for kv in self.journal.range(after) {
            let (_, v) = kv?;
            if journal::fold(&mut saga, decode::<journal::EntryIn>(&v, "journal entry")?)?
                == journal::Folded::SnapshotMoved
            {
                return Ok(None);
            }
        }
        Ok(Some(saga))
    }

    /// The commands saga `id` has in flight, folded from its journal (sent,
    /// or to be sent, and not yet settled).
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    #[cfg(test)]
    pub(crate) fn in_flight(&self, id: &Uuid) -> Result<Vec<crate::store::OutboxEntry>, StoreError> {
        let Some(saga) = self.get(id)? else {
            return Ok(Vec::new());
        };
        let mut in_flight = Vec::new();
        for kv in self.journal.scan_prefix(id.as_bytes()) {
            let (_, v) = kv?;
            journal::fold_commands(&mut in_flight, decode(&v, "journal entry")?, &saga)?;
        }
        Ok(in_flight)
    }

    /// The saga's history, in order: what earlier versions wrote to the
    /// `history` tree, then the journal's.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    #[cfg(test)]
    pub(crate) fn history(&self, id: &Uuid) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut out = self.legacy_history(id.as_bytes())?;
        for kv in self.journal.scan_prefix(id.as_bytes()) {
            let (_, v) = kv?;
            out.extend(decode::<journal::HistoryIn>(&v, "journal entry")?.history);
        }
        Ok(out)
    }

    /// The saga `id` and its history, if stored, from one scan of its
    /// journal: each entry is decoded once for both (the views of GetSaga
    /// and WatchSaga read them together, once per watched saga).
    ///
    /// # Errors
    /// As [`Store::get`].
    pub(crate) fn get_with_history(&self, id: &Uuid) -> Result<Option<WithHistory>, StoreError> {
        let key = id.as_bytes();
        'read: for _ in 0..READ_RETRIES {
            let Some(bytes) = self.sagas.get(key)? else {
                return Ok(None);
            };
            let mut saga = self.decode_record(&bytes)?;
            let mut history = self.legacy_history(key)?;
            for kv in self.journal.scan_prefix(key) {
                let (_, v) = kv?;
                let mut entry: journal::EntryIn<Vec<HistoryEntry>> = decode(&v, "journal entry")?;
                let h = std::mem::take(&mut entry.history);
                // Entries up to the snapshot's sequence are in it already.
                if entry.seq() > saga.seq
                    && journal::fold(&mut saga, entry)? == journal::Folded::SnapshotMoved
                {
                    continue 'read;
                }
                history.extend(h);
            }
            return Ok(Some((saga, history)));
        }
        Err(StoreError::Corrupt(format!(
            "saga {id}: its snapshot moved at each of {READ_RETRIES} reads"
        )))
    }

    /// The history an earlier version wrote to the `history` tree for saga
    /// `key` (empty for sagas written since the journal).
    fn legacy_history(&self, key: &[u8; 16]) -> Result<Vec<HistoryEntry>, StoreError> {
        self.history
            .scan_prefix(key)
            .map(|kv| {
                let (_, v) = kv?;
                decode(&v, "history entry")
            })
            .collect()
    }

    /// History entries `first..=last` of saga `id` (an events-log pointer):
    /// from the journal entry of the transition that wrote them, or from the
    /// `history` tree when an earlier version wrote them.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub(super) fn history_between(
        &self,
        id: &[u8; 16],
        first: u64,
        last: u64,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        if let Some(v) = self.journal.get(history_key(id, last))? {
            let mut h = decode::<journal::HistoryIn>(&v, "journal entry")?.history;
            h.retain(|h| (first..=last).contains(&h.seq));
            // Empty: the entry an upgrade made of the old outbox; the history is older.
            if !h.is_empty() {
                return Ok(h);
            }
        }
        self.history
            .range(history_key(id, first)..=history_key(id, last))
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
    pub(crate) fn saga_for_key(&self, key: &str) -> Result<Option<Uuid>, StoreError> {
        match self.idempotency.get(key.as_bytes())? {
            Some(bytes) => Uuid::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("idempotency index: {e}"))),
            None => Ok(None),
        }
    }

    /// Every saga not in a terminal state, oldest first.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    #[cfg(test)]
    pub(crate) fn active(&self) -> Result<Vec<Saga>, StoreError> {
        Ok(self.active_with_commands()?.into_iter().map(|(s, _)| s).collect())
    }

    /// Every command in the outbox (sent or not yet acknowledged).
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    #[cfg(test)]
    pub(crate) fn outbox(&self) -> Result<Vec<crate::store::OutboxEntry>, StoreError> {
        let mut out = Vec::new();
        for (_, in_flight) in self.active_with_commands()? {
            out.extend(in_flight);
        }
        Ok(out)
    }

    /// Every saga not in a terminal state with its commands in flight.
    ///
    /// # Errors
    /// sled errors; a corrupt record or entry.
    fn active_with_commands(&self) -> Result<Vec<Loaded>, StoreError> {
        let mut out = Vec::new();
        for tag in [StateTag::Pending, StateTag::Running, StateTag::Compensating] {
            for kv in self.by_state.scan_prefix([tag as u8]) {
                let (k, _) = kv?;
                let id: [u8; 16] = k
                    .get(1..)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| StoreError::Corrupt("state index key".into()))?;
                // A saga can move out of the index between the scan and the read.
                if let Some(loaded) = self.load(&id)? {
                    out.push(loaded);
                }
            }
        }
        Ok(out)
    }

    /// The saga `id` with its commands in flight, in one pass over its
    /// journal: the entries after the snapshot folded into the saga, all of
    /// them into the commands.
    ///
    /// # Errors
    /// sled errors; a corrupt record or entry.
    fn load(&self, id: &[u8; 16]) -> Result<Option<Loaded>, StoreError> {
        // As in `get`: a snapshot written between the two reads means again.
        'read: for _ in 0..READ_RETRIES {
            let Some(bytes) = self.sagas.get(id)? else {
                return Ok(None);
            };
            let mut saga = self.decode_record(&bytes)?;
            let snapshot_seq = saga.seq;
            let mut in_flight = Vec::new();
            for kv in self.journal.scan_prefix(id) {
                let (k, v) = kv?;
                let seq = k.get(16..).map_or(Ok(0), |b| be_u64(b, "journal key"))?;
                if seq > snapshot_seq {
                    let (entry, commands) = journal::split(decode(&v, "journal entry")?);
                    if journal::fold(&mut saga, entry)? == journal::Folded::SnapshotMoved {
                        continue 'read;
                    }
                    journal::fold_commands(&mut in_flight, commands, &saga)?;
                } else {
                    journal::fold_commands(&mut in_flight, decode(&v, "journal entry")?, &saga)?;
                }
            }
            return Ok(Some((saga, in_flight)));
        }
        Err(StoreError::Corrupt(format!(
            "saga {}: its snapshot moved at each of {READ_RETRIES} reads",
            Uuid::from_bytes(*id)
        )))
    }

    /// Dead letters not yet published, with their keys.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub(crate) fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
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
    pub(crate) fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError> {
        self.dlq_outbox.remove(key)?;
        Ok(())
    }

    /// Whether the database accepts a write (readiness probe; not flushed).
    ///
    /// # Errors
    /// sled refused the write.
    pub(crate) fn probe_writable(&self) -> Result<(), StoreError> {
        self.meta.insert(b"ready-probe", &b"1"[..])?;
        Ok(())
    }

    /// Number of sagas per state: kept in memory, O(states) (`counts`).
    ///
    /// # Errors
    /// sled errors.
    pub(crate) fn count_by_state(&self) -> Result<Vec<(StateTag, usize)>, StoreError> {
        Ok(self.counts.get())
    }
}

impl crate::store::SagaStore for Store {
    fn name(&self) -> &'static str {
        "sled"
    }

    fn capabilities(&self) -> crate::store::Capabilities {
        crate::store::Capabilities {
            evicts_resident: true,
            commit_each_batch: false,
            shared: false,
            retention: true,
        }
    }

    fn stage(&self, t: &Transition, previous: Option<&Saga>) -> Result<(), StoreError> {
        self.write(t, previous)
    }

    fn begin_commit(&self) -> crate::store::CommitTask {
        // Straight on the blocking pool: one thread hand-off less per flush.
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            s.flush_writes_blocking().map(|()| crate::store::Committed::all())
        })
    }

    fn commit_now(&self) -> Option<Result<crate::store::Committed, StoreError>> {
        // `block_in_place` hands this worker's other tasks to another thread
        // and runs the commit here; it exists only on a multi-thread runtime.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        multi_thread.then(|| {
            tokio::task::block_in_place(|| {
                self.flush_writes_blocking()
                    .map(|()| crate::store::Committed::all())
            })
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Store::flush(self))
    }

    fn ensure_durable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Store::ensure_durable(self))
    }

    fn get<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>> {
        Box::pin(std::future::ready(Store::get(self, id)))
    }

    fn load_for_update<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>> {
        // The runner keeps every saga in flight (or reads an evicted one back
        // first), so one it asks for is finished, perhaps in the commit under
        // way: its latest record. One still in flight is read with its commands.
        let found = match Store::get_latest(self, id) {
            Ok(Some(saga)) if !saga.state.is_terminal() => Store::load(self, id.as_bytes()),
            other => other.map(|found| found.map(|saga| (saga, Vec::new()))),
        };
        Box::pin(std::future::ready(found))
    }

    fn get_latest<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>> {
        Box::pin(std::future::ready(Store::get_latest(self, id)))
    }

    fn read_back(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        Store::get_latest(self, id)
    }

    fn get_with_history<'a>(
        &'a self,
        id: &'a Uuid,
    ) -> BoxFuture<'a, Result<Option<WithHistory>, StoreError>> {
        Box::pin(std::future::ready(Store::get_with_history(self, id)))
    }

    fn saga_for_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Uuid>, StoreError>> {
        Box::pin(std::future::ready(Store::saga_for_key(self, key)))
    }

    fn list<'a>(&'a self, q: &'a ListQuery) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(std::future::ready(Store::list(self, q)))
    }

    fn resume_at_start(&self) -> Result<Vec<Loaded>, StoreError> {
        self.active_with_commands()
    }

    fn forget(&self, _ids: &[String]) {}

    fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
        Store::dlq_pending(self)
    }

    fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError> {
        Store::dlq_published(self, key)
    }

    fn events_pending(&self, limit: usize) -> Result<Vec<(Vec<u8>, EventRecord)>, StoreError> {
        Store::events_pending(self, limit)
    }

    fn events_backlog(&self) -> usize {
        Store::events_backlog(self)
    }

    fn events_published(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        Store::events_published(self, keys)
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(self.probe_writable()))
    }

    fn count_by_state(&self) -> BoxFuture<'_, Result<Option<crate::store::StateCounts>, StoreError>> {
        Box::pin(std::future::ready(Store::count_by_state(self).map(Some)))
    }

    fn prune(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        Store::prune(self, cutoff_ms, limit)
    }
}
