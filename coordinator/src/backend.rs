//! The store the coordinator runs on: `sled` (the embedded default, one
//! coordinator) or `jetstream` (replicated KV, several coordinators; see
//! [`crate::jetstream`] and [`crate::cluster`]). The runner, the API, the
//! events publisher and the probes only talk to this type.

use uuid::Uuid;

use crate::{
    engine::{HistoryEntry, Saga, StateTag, Transition},
    jetstream::{JsStore, Loaded},
    store::{DeadLetter, EventRecord, Page, Store, StoreError},
};

/// Which store, chosen by `--store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// sled on local disk (default).
    Sled,
    /// JetStream KV buckets, shared by several coordinators.
    Jetstream,
}

/// The store in use. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Backend {
    /// sled.
    Sled(Store),
    /// JetStream KV.
    JetStream(JsStore),
}

impl Backend {
    /// Stages one transition; the next [`Backend::flush_writes`] writes it.
    ///
    /// # Errors
    /// The store's.
    pub fn write(&self, t: &Transition, previous: Option<StateTag>) -> Result<(), StoreError> {
        match self {
            Backend::Sled(s) => s.write(t, previous),
            Backend::JetStream(s) => s.write(t, previous),
        }
    }

    /// Makes every write so far durable; returns the sagas whose write was
    /// lost to another coordinator (always none with sled).
    ///
    /// # Errors
    /// The store failed: nothing may be sent.
    pub async fn flush_writes(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Backend::Sled(s) => s.flush_writes().await.map(|()| Vec::new()),
            Backend::JetStream(s) => s.flush_writes().await,
        }
    }

    /// [`Backend::flush_writes`] in a task of its own (with sled, straight on
    /// the blocking pool: one thread hand-off less per flush).
    pub fn spawn_flush(&self) -> tokio::task::JoinHandle<Result<Vec<String>, StoreError>> {
        match self {
            Backend::Sled(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.flush_writes_blocking().map(|()| Vec::new()))
            }
            Backend::JetStream(s) => {
                let s = s.clone();
                tokio::spawn(async move { s.flush_writes().await })
            }
        }
    }

    /// Final flush at shutdown.
    ///
    /// # Errors
    /// The store's.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Backend::Sled(s) => s.flush().await,
            Backend::JetStream(_) => Ok(()),
        }
    }

    /// Makes durable what a reader has seen (jetstream readers only see durable data).
    ///
    /// # Errors
    /// The store's.
    pub async fn ensure_durable(&self) -> Result<(), StoreError> {
        match self {
            Backend::Sled(s) => s.ensure_durable().await,
            Backend::JetStream(_) => Ok(()),
        }
    }

    /// The saga `id`.
    ///
    /// # Errors
    /// The store's.
    pub async fn get(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        match self {
            Backend::Sled(s) => s.get(id),
            Backend::JetStream(s) => s.get(id).await,
        }
    }

    /// The saga `id`, read to be written next (an operator event on a saga
    /// that is not in memory).
    ///
    /// # Errors
    /// The store's.
    pub async fn load_for_update(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        match self {
            Backend::Sled(s) => s.get_latest(id),
            Backend::JetStream(s) => s.load_for_update(id).await,
        }
    }

    /// The saga `id` as the runner last wrote it, for the runner itself: with
    /// sled, a transition staged since the last flush counts.
    ///
    /// # Errors
    /// The store's.
    pub async fn get_latest(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        match self {
            Backend::Sled(s) => s.get_latest(id),
            Backend::JetStream(s) => s.get(id).await,
        }
    }

    /// The saga and its history (one read of the record with jetstream).
    ///
    /// # Errors
    /// The store's.
    pub async fn get_with_history(&self, id: &Uuid) -> Result<Option<(Saga, Vec<HistoryEntry>)>, StoreError> {
        match self {
            Backend::Sled(s) => match s.get(id)? {
                Some(saga) => Ok(Some((saga, s.history(id)?))),
                None => Ok(None),
            },
            Backend::JetStream(s) => s.get_with_history(id).await,
        }
    }

    /// The saga of a client idempotency key.
    ///
    /// # Errors
    /// The store's.
    pub async fn saga_for_key(&self, key: &str) -> Result<Option<Uuid>, StoreError> {
        match self {
            Backend::Sled(s) => s.saga_for_key(key),
            Backend::JetStream(s) => s.saga_for_key(key).await,
        }
    }

    /// A page of sagas, oldest first.
    ///
    /// # Errors
    /// The store's.
    pub async fn list(
        &self,
        state: Option<StateTag>,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        match self {
            Backend::Sled(s) => s.list(state, after, limit),
            Backend::JetStream(s) => s.list(state, after, limit).await,
        }
    }

    /// What to resume at start: sled's non-terminal sagas with their
    /// in-flight commands. Empty for jetstream, whose sagas are loaded
    /// partition by partition as leases are taken ([`crate::cluster`]).
    ///
    /// # Errors
    /// The store's.
    pub fn resume_at_start(&self) -> Result<Vec<Loaded>, StoreError> {
        let Backend::Sled(s) = self else {
            return Ok(Vec::new());
        };
        let mut outbox: std::collections::HashMap<String, Vec<_>> = std::collections::HashMap::new();
        for entry in s.outbox()? {
            outbox.entry(entry.saga_id.clone()).or_default().push(entry);
        }
        let mut out = Vec::new();
        for saga in s.active()? {
            let mine = outbox.remove(&saga.id).unwrap_or_default();
            out.push((saga, mine));
        }
        for orphan in outbox.keys() {
            tracing::warn!(saga_id = %orphan, "outbox entry of a saga that is not active; ignored");
        }
        Ok(out)
    }

    /// Forgets sagas the runner dropped (jetstream: a partition released).
    pub fn forget(&self, ids: &[String]) {
        if let Backend::JetStream(s) = self {
            s.forget(ids);
        }
    }

    /// Dead letters not yet published.
    ///
    /// # Errors
    /// The store's.
    pub fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
        match self {
            Backend::Sled(s) => s.dlq_pending(),
            Backend::JetStream(s) => Ok(s.dlq_pending()),
        }
    }

    /// Marks a dead letter published.
    ///
    /// # Errors
    /// The store's.
    pub fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError> {
        match self {
            Backend::Sled(s) => s.dlq_published(key),
            Backend::JetStream(s) => {
                s.dlq_published(key);
                Ok(())
            }
        }
    }

    /// Every dead letter of a saga.
    ///
    /// # Errors
    /// The store's.
    pub async fn dead_letters(&self, id: &Uuid) -> Result<Vec<DeadLetter>, StoreError> {
        match self {
            Backend::Sled(s) => s.dead_letters(id),
            Backend::JetStream(s) => s.dead_letters(id).await,
        }
    }

    /// Events not yet acknowledged by the events stream.
    ///
    /// # Errors
    /// The store's.
    pub fn events_pending(&self, limit: usize) -> Result<Vec<(Vec<u8>, EventRecord)>, StoreError> {
        match self {
            Backend::Sled(s) => s.events_pending(limit),
            Backend::JetStream(s) => Ok(s.events_pending(limit)),
        }
    }

    /// Number of events waiting.
    pub fn events_backlog(&self) -> usize {
        match self {
            Backend::Sled(s) => s.events_backlog(),
            Backend::JetStream(s) => s.events_backlog(),
        }
    }

    /// Drops acknowledged events.
    ///
    /// # Errors
    /// The store's.
    pub fn events_published(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        match self {
            Backend::Sled(s) => s.events_published(keys),
            Backend::JetStream(s) => {
                s.events_published(keys);
                Ok(())
            }
        }
    }

    /// Whether the store accepts writes (readiness).
    ///
    /// # Errors
    /// The store's.
    pub async fn probe(&self) -> Result<(), StoreError> {
        match self {
            Backend::Sled(s) => s.probe_writable(),
            Backend::JetStream(s) => s.probe().await,
        }
    }

    /// The sled store, when that is the one in use.
    pub fn sled(&self) -> Option<&Store> {
        match self {
            Backend::Sled(s) => Some(s),
            Backend::JetStream(_) => None,
        }
    }

    /// The jetstream store, when that is the one in use.
    pub fn jetstream(&self) -> Option<&JsStore> {
        match self {
            Backend::JetStream(s) => Some(s),
            Backend::Sled(_) => None,
        }
    }
}
