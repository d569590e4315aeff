//! An in-memory [`SagaStore`], mainly for tests (as raft-rs' `MemStorage`):
//! the runner runs on it unchanged. It keeps the trait's failure contract
//! and can break it on purpose — hold commits, fail the next one, or lose
//! the next one's writes to "another coordinator" — so tests can check what
//! the runner does then. Nothing here survives the process; it must not be
//! used to run sagas for real.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use futures::future::BoxFuture;
use uuid::Uuid;

use super::{
    keys::{history_key, saga_key},
    query::Summary,
    Capabilities, CommitTask, Committed, DeadLetter, EventRecord, ListQuery, Loaded, OutboxEntry, Page,
    SagaStore, StoreError, WithHistory,
};
use crate::engine::{HistoryEntry, Saga, StateTag, Transition};

/// A saga as committed.
#[derive(Debug, Clone)]
struct Durable {
    saga: Saga,
    history: Vec<HistoryEntry>,
    outbox: Vec<OutboxEntry>,
    dead_letters: Vec<DeadLetter>,
}

type StagedWrite = (Transition, Option<StateTag>);

#[derive(Debug, Default)]
struct Inner {
    durable: BTreeMap<Uuid, Durable>,
    keys: HashMap<String, Uuid>,
    staged: Vec<StagedWrite>,
    /// The writes of the commit under way (readable by `get_latest`).
    applying: Arc<Vec<StagedWrite>>,
    events: BTreeMap<Vec<u8>, EventRecord>,
    dlq: BTreeMap<Vec<u8>, DeadLetter>,
    fail_next: bool,
    lose_next: bool,
    in_flight: usize,
    read_backs: usize,
}

/// The in-memory store. Cheap to clone (clones share the data).
#[derive(Debug, Clone)]
pub(crate) struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    caps: Capabilities,
    /// Commits wait while this is `false` ([`MemoryStore::hold_commits`]).
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

impl MemoryStore {
    /// A store with the given capabilities.
    pub(crate) fn new(caps: Capabilities) -> Self {
        MemoryStore {
            inner: Arc::default(),
            caps,
            open: Arc::new(tokio::sync::watch::channel(true).0),
        }
    }

    /// Behaves as the sled store does: one coordinator, evicts resident sagas,
    /// commits pipelined with the next batch.
    pub(crate) fn like_sled() -> Self {
        Self::new(Capabilities {
            evicts_resident: true,
            commit_each_batch: false,
            shared: false,
            retention: false,
        })
    }

    /// Behaves as the jetstream store does: shared, every batch committed
    /// before the next, nothing evicted.
    pub(crate) fn like_jetstream() -> Self {
        Self::new(Capabilities {
            evicts_resident: false,
            commit_each_batch: true,
            shared: true,
            retention: false,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Commits begun from now on wait until [`MemoryStore::release_commits`].
    pub(crate) fn hold_commits(&self) {
        self.open.send_replace(false);
    }

    /// Lets held commits (and later ones) complete.
    pub(crate) fn release_commits(&self) {
        self.open.send_replace(true);
    }

    /// The next commit fails (and discards what was staged after it began).
    pub(crate) fn fail_next_commit(&self) {
        self.lock().fail_next = true;
    }

    /// The next commit loses every write it carries, as a jetstream write
    /// refused because another coordinator wrote the saga first.
    pub(crate) fn lose_next_commit(&self) {
        self.lock().lose_next = true;
    }

    /// Commits begun and not yet done (held ones included).
    pub(crate) fn commits_in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Transitions staged and not yet in a commit.
    pub(crate) fn staged_len(&self) -> usize {
        self.lock().staged.len()
    }

    /// Sagas read back with [`SagaStore::read_back`] so far.
    pub(crate) fn read_backs(&self) -> usize {
        self.lock().read_backs
    }

    /// The committed record of saga `id`.
    pub(crate) fn durable(&self, id: &str) -> Option<Saga> {
        let id = Uuid::parse_str(id).ok()?;
        self.lock().durable.get(&id).map(|d| d.saga.clone())
    }

    /// The committed outbox of saga `id`.
    pub(crate) fn durable_outbox(&self, id: &str) -> Vec<OutboxEntry> {
        let Ok(id) = Uuid::parse_str(id) else {
            return Vec::new();
        };
        self.lock()
            .durable
            .get(&id)
            .map(|d| d.outbox.clone())
            .unwrap_or_default()
    }

    /// The saga as last staged: staged writes are newer than the commit
    /// under way's, which are newer than the committed record.
    fn latest(inner: &Inner, id: &Uuid) -> Option<Saga> {
        let key = id.to_string();
        inner
            .applying
            .iter()
            .chain(inner.staged.iter())
            .rev()
            .find(|(t, _)| t.saga.id == key)
            .map(|(t, _)| t.saga.clone())
            .or_else(|| inner.durable.get(id).map(|d| d.saga.clone()))
    }

    fn apply(inner: &mut Inner, t: &Transition, previous: Option<StateTag>) -> Result<(), StoreError> {
        let saga = &t.saga;
        let id = Uuid::parse_str(&saga.id)
            .map_err(|e| StoreError::Corrupt(format!("saga id {:?}: {e}", saga.id)))?;
        let key = saga_key(&saga.id)?;
        let d = inner.durable.entry(id).or_insert_with(|| Durable {
            saga: saga.clone(),
            history: Vec::new(),
            outbox: Vec::new(),
            dead_letters: Vec::new(),
        });
        d.saga = saga.clone();
        d.history.extend(t.history.iter().cloned());
        d.outbox.retain(|e| !t.settled.contains(&(e.step, e.kind)));
        for c in &t.commands {
            d.outbox.retain(|e| !(e.step == c.step && e.kind == c.kind));
            d.outbox.push(OutboxEntry::new(saga, c));
        }
        let dead = DeadLetter::on_entering(saga, previous);
        if let Some(letter) = &dead {
            d.dead_letters.push(letter.clone());
        }
        if previous.is_none() {
            if let Some(k) = &saga.idempotency_key {
                inner.keys.insert(k.clone(), id);
            }
        }
        for h in &t.history {
            inner
                .events
                .insert(history_key(&key, h.seq), EventRecord::new(saga, h));
        }
        if let Some(letter) = dead {
            inner.dlq.insert(history_key(&key, saga.seq), letter);
        }
        Ok(())
    }
}

impl SagaStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory store"
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn stage(&self, t: &Transition, previous: Option<&Saga>) -> Result<(), StoreError> {
        self.lock()
            .staged
            .push((t.clone(), previous.map(|p| p.state.tag())));
        Ok(())
    }

    fn begin_commit(&self) -> CommitTask {
        let writes = {
            let mut inner = self.lock();
            let writes = Arc::new(std::mem::take(&mut inner.staged));
            inner.applying = writes.clone();
            inner.in_flight += 1;
            writes
        };
        let (this, mut open) = (self.clone(), self.open.subscribe());
        tokio::spawn(async move {
            let _ = open.wait_for(|open| *open).await;
            let mut inner = this.lock();
            inner.applying = Arc::default();
            inner.in_flight -= 1;
            if std::mem::take(&mut inner.fail_next) {
                // What was staged meanwhile follows from the failed writes.
                inner.staged.clear();
                return Err(StoreError::Unavailable(
                    "memory store: commit failed (injected)".into(),
                ));
            }
            if std::mem::take(&mut inner.lose_next) {
                let mut lost: Vec<String> = writes.iter().map(|(t, _)| t.saga.id.clone()).collect();
                lost.dedup();
                return Ok(Committed::except(lost));
            }
            for (t, previous) in writes.iter() {
                Self::apply(&mut inner, t, *previous)?;
            }
            Ok(Committed::all())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn ensure_durable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn get<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>> {
        let found = self.lock().durable.get(id).map(|d| d.saga.clone());
        Box::pin(std::future::ready(Ok(found)))
    }

    fn load_for_update<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>> {
        let inner = self.lock();
        let found = Self::latest(&inner, id).map(|saga| {
            let outbox = match saga.state.is_terminal() {
                true => Vec::new(),
                false => inner
                    .durable
                    .get(id)
                    .map(|d| d.outbox.clone())
                    .unwrap_or_default(),
            };
            (saga, outbox)
        });
        Box::pin(std::future::ready(Ok(found)))
    }

    fn get_latest<'a>(&'a self, id: &'a Uuid) -> BoxFuture<'a, Result<Option<Saga>, StoreError>> {
        let found = Self::latest(&self.lock(), id);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn read_back(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        let mut inner = self.lock();
        inner.read_backs += 1;
        Ok(Self::latest(&inner, id))
    }

    fn get_with_history<'a>(
        &'a self,
        id: &'a Uuid,
    ) -> BoxFuture<'a, Result<Option<WithHistory>, StoreError>> {
        let found = self
            .lock()
            .durable
            .get(id)
            .map(|d| (d.saga.clone(), d.history.clone()));
        Box::pin(std::future::ready(Ok(found)))
    }

    fn saga_for_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Uuid>, StoreError>> {
        let found = self.lock().keys.get(key).copied();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn list<'a>(&'a self, q: &'a ListQuery) -> BoxFuture<'a, Result<Page, StoreError>> {
        let inner = self.lock();
        let sagas: Box<dyn Iterator<Item = (&Uuid, &Durable)>> = match q.newest_first {
            true => Box::new(inner.durable.iter().rev()),
            false => Box::new(inner.durable.iter()),
        };
        let mut matching = sagas
            .filter(|(id, _)| q.past_cursor(id))
            .map(|(id, d)| (id, Summary::of(&d.saga)))
            .filter(|(_, s)| q.matches(s));
        let mut sagas = Vec::new();
        let mut last = None;
        for (id, s) in matching.by_ref().take(q.limit) {
            sagas.push(s);
            last = Some(*id);
        }
        let next = matching.next().and(last);
        Box::pin(std::future::ready(Ok(Page { sagas, next })))
    }

    fn resume_at_start(&self) -> Result<Vec<Loaded>, StoreError> {
        Ok(self
            .lock()
            .durable
            .values()
            .filter(|d| !d.saga.state.is_terminal())
            .map(|d| (d.saga.clone(), d.outbox.clone()))
            .collect())
    }

    fn forget(&self, _ids: &[String]) {}

    fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
        Ok(self
            .lock()
            .dlq
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError> {
        self.lock().dlq.remove(key);
        Ok(())
    }

    fn events_pending(&self, limit: usize) -> Result<Vec<(Vec<u8>, EventRecord)>, StoreError> {
        Ok(self
            .lock()
            .events
            .iter()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn events_backlog(&self) -> usize {
        self.lock().events.len()
    }

    fn events_published(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for k in keys {
            inner.events.remove(k);
        }
        Ok(())
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn count_by_state(&self) -> BoxFuture<'_, Result<Option<crate::store::StateCounts>, StoreError>> {
        let mut counts: Vec<(StateTag, usize)> = Vec::new();
        for d in self.lock().durable.values() {
            let tag = d.saga.state.tag();
            match counts.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, n)) => *n += 1,
                None => counts.push((tag, 1)),
            }
        }
        Box::pin(std::future::ready(Ok(Some(counts))))
    }
}
