//! Storage: the [`SagaStore`] trait the runner, the API, the events
//! publisher and the probes use, and its implementations — [`Store`] (sled,
//! the embedded default), [`jetstream::JsStore`] (replicated KV, several
//! coordinators) and [`memory::MemoryStore`] (tests). The stores keep what
//! the engine decided; they must not decide or send anything.

pub mod codec;
pub mod jetstream;
pub(crate) mod keys;
pub mod records;
mod sled;

pub use self::sled::{Store, DEFAULT_CACHE_BYTES};
pub use records::{DeadLetter, EventRecord, OutboxEntry};

use uuid::Uuid;

use crate::engine::Saga;

/// A failure of the coordinator's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or internal error.
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    /// A stored value cannot be decoded: the data is corrupt or from an unknown version.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// JetStream (the `jetstream` store) failed or timed out.
    #[error("jetstream: {0}")]
    JetStream(String),
}

/// A saga loaded for running: the record and the commands it has in flight.
pub type Loaded = (Saga, Vec<OutboxEntry>);

/// One page of a store's `list`.
#[derive(Debug)]
pub struct Page {
    /// Sagas, oldest first.
    pub sagas: Vec<Saga>,
    /// Last id of the page when more may follow.
    pub next: Option<Uuid>,
}
