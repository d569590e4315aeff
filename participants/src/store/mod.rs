//! A participant's store: the [`ParticipantStore`] trait its handler and the
//! runtime use, and its implementations — [`sled::Store`] (embedded, used by
//! one process, the default and the fastest) and [`jetstream::JsStore`]
//! (replicated JetStream KV buckets, several replicas in one queue group).
//!
//! The contract every implementation keeps (a handler never asks which one it
//! holds):
//! - [`ParticipantStore::apply_forward`] / [`ParticipantStore::apply_compensation`]
//!   apply a command's effect at most once per idempotency key: the effect's
//!   state writes and the stored reply commit together or not at all, and are
//!   durable before the call returns (sled: one transaction, flushed;
//!   jetstream: one revision-checked KV write, acknowledged). A repeated key
//!   returns the stored reply with `hit = true`, whichever instance stored it.
//!   Only `ok` and `rejected` replies are stored; an `error` reply commits
//!   nothing (with jetstream, not even the effect's writes), so a retry may
//!   succeed.
//! - A compensation whose forward key has no stored reply stores the
//!   tombstone `rejected: compensated_before_forward` under the forward key,
//!   so a late forward is answered with it and does nothing.
//! - The closures given to them are pure functions of what they read through
//!   [`StateTx`]: a store may run them several times (sled conflicts,
//!   jetstream revision conflicts and keys fetched on demand) and keeps only
//!   the last run.
//! - A failure (`Err`) means nothing was applied *or* the outcome is unknown
//!   to this call; either way the handler answers `error` and the coordinator
//!   retries with the same key, which finds the stored reply if it landed.
//! - Stored replies are kept at least `--reply-retention` after they were
//!   stored ([`ParticipantStore::prune_replies`]).
//!
//! Values are stored in the versioned envelope of [`encode`] (`{"v":1,…}`);
//! the sled store's reply rows add the replies they carry (`{"v":2,…}`,
//! [`REPLY_ROW_VERSION`]).
//! This module knows nothing of stock or money, and nothing of NATS.

pub mod jetstream;
pub mod sled;

use futures::future::BoxFuture;
use saga_wire::Reply;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use self::sled::Store;

/// Reason stored under a forward key whose compensation came first.
pub const TOMBSTONE_REASON: &str = "compensated_before_forward";

/// A failure of the participant's store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled I/O or internal error.
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    /// A stored value cannot be read.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// JetStream failed or timed out (the outcome of a write may be unknown).
    #[error("jetstream: {0}")]
    JetStream(String),
    /// A key stayed contended (other writers kept winning) past the bounded
    /// retries: nothing was applied by this call.
    #[error("contended: {0}")]
    Contended(String),
}

/// Why an effect run inside a store's transaction stopped.
#[derive(Debug)]
pub enum TxError {
    /// The effect refuses to go on (corrupt or impossible data): nothing is
    /// written. The only variant handlers make themselves.
    Abort(String),
    /// sled's transaction must be retried or failed (passed through by `?`).
    Sled(::sled::transaction::UnabortableTransactionError),
    /// The jetstream store must fetch this state key first, then run the
    /// effect again (passed through by `?`).
    Fetch(String),
}

impl From<::sled::transaction::UnabortableTransactionError> for TxError {
    fn from(e: ::sled::transaction::UnabortableTransactionError) -> Self {
        TxError::Sled(e)
    }
}

/// Result type of effects run inside a transaction.
pub type TxResult<T> = Result<T, TxError>;

/// The business state as an effect sees it inside a store's transaction:
/// encoded values ([`encode`]) under string keys.
pub trait StateTx {
    /// The value under `key`, if any.
    ///
    /// # Errors
    /// Pass them on with `?` (the store retries or fails the transaction).
    fn get(&mut self, key: &str) -> TxResult<Option<Vec<u8>>>;
    /// Writes `bytes` under `key`.
    ///
    /// # Errors
    /// Pass them on with `?`.
    fn put(&mut self, key: &str, bytes: Vec<u8>) -> TxResult<()>;
    /// Removes `key`.
    ///
    /// # Errors
    /// Pass them on with `?`.
    fn remove(&mut self, key: &str) -> TxResult<()>;
}

/// Raw state entries of a scan: `(rest of key, encoded value)`.
pub type Scanned = Vec<(String, Vec<u8>)>;

/// A forward effect: the reply it answers (the store stores it with the writes).
pub type Effect<'a> = &'a (dyn Fn(&mut dyn StateTx) -> TxResult<Reply> + Send + Sync);
/// A compensation's undo: gets the forward key and the forward's `ok` data.
pub type Undo<'a> = &'a (dyn Fn(&mut dyn StateTx, &str, &serde_json::Value) -> TxResult<Reply> + Send + Sync);
/// A set-up change (seeding) that answers no command.
pub type Change<'a> = &'a (dyn Fn(&mut dyn StateTx) -> TxResult<()> + Send + Sync);

/// The store a participant runs on (see the module docs for the contract).
pub trait ParticipantStore: Send + Sync + 'static {
    /// Runs a forward `effect` once per `key`: `(reply, true)` with the
    /// stored reply if `key` was seen (a repeat, or a tombstone), else runs
    /// `effect` and stores its reply with its writes (unless it is an `error`).
    fn apply_forward<'a>(
        &'a self,
        key: &'a str,
        effect: Effect<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>>;

    /// Runs a compensation once per `key` (a `…/compensate` key): `undo`
    /// gets the forward's `ok` data when the forward effect exists; when the
    /// forward was never seen a tombstone is stored under its key and `undo`
    /// is not called; when it was rejected there is nothing to undo.
    /// A key that is not a compensation key is an error.
    fn apply_compensation<'a>(
        &'a self,
        key: &'a str,
        undo: Undo<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>>;

    /// The stored reply for `key`, if any: a fast path before slow work (the
    /// authoritative check is repeated inside `apply_*`); a reply returned
    /// is durable.
    fn stored_reply<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Reply>, StoreError>>;

    /// Runs `change` on the state in one transaction (seeding).
    fn update_state<'a>(&'a self, change: Change<'a>) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The state value under `key` (read side: stats, checks before a write).
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;

    /// At most `limit` state values whose keys start with `prefix`, after the
    /// one whose rest of key is `after`, in key order, with the rest of the key.
    fn scan<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Scanned, StoreError>>;

    /// Whether the store takes writes (readiness); business state untouched.
    fn probe_writable(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Makes everything written durable (shutdown).
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Removes up to `limit` stored replies stored before `cutoff_ms` (this
    /// participant's clock); returns how many went (0 for a store whose
    /// replies expire on their own).
    fn prune_replies(&self, cutoff_ms: u64, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// `sled` or `jetstream` (logs, readiness text).
    fn kind(&self) -> &'static str;

    /// Writes committed since the store was opened — sled: inserts and
    /// removes; jetstream: KV writes — for `participant_store_writes_total`
    /// (what a command costs the store, the figure saga-bench divides by sagas).
    fn writes(&self) -> u64;
}

/// A store shared by a handler, the runtime, the pruner and the HTTP probe.
pub type SharedStore = std::sync::Arc<dyn ParticipantStore>;

/// The decoded state value under `key`.
///
/// # Errors
/// The store failed; a corrupt value.
pub async fn get_as<T: DeserializeOwned>(
    store: &dyn ParticipantStore,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match store.get(key).await? {
        Some(bytes) => decode(key.as_bytes(), &bytes).map(Some),
        None => Ok(None),
    }
}

/// Every decoded state value under `prefix`, in key order, with the rest of the key.
///
/// # Errors
/// The store failed; a corrupt value.
pub async fn scan_all<T: DeserializeOwned>(
    store: &dyn ParticipantStore,
    prefix: &str,
) -> Result<Vec<(String, T)>, StoreError> {
    const PAGE: usize = 1000;
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.scan(prefix, after.as_deref(), PAGE).await?;
        let full = page.len() >= PAGE;
        for (k, v) in page {
            let value = decode(format!("{prefix}{k}").as_bytes(), &v)?;
            after = Some(k.clone());
            out.push((k, value));
        }
        if !full {
            return Ok(out);
        }
    }
}

/// Reads a decoded value inside a transaction.
///
/// # Errors
/// Aborts when the value cannot be decoded (corrupt data); the store's own errors.
pub fn tx_get<T: DeserializeOwned>(tx: &mut dyn StateTx, key: &str) -> TxResult<Option<T>> {
    match tx.get(key)? {
        Some(bytes) => decode(key.as_bytes(), &bytes)
            .map(Some)
            .map_err(|e| TxError::Abort(e.to_string())),
        None => Ok(None),
    }
}

/// Writes a value, in the versioned stored form, inside a transaction.
///
/// # Errors
/// Aborts when the value cannot be encoded; the store's own errors.
pub fn tx_put<T: Serialize>(tx: &mut dyn StateTx, key: &str, value: &T) -> TxResult<()> {
    let bytes = encode(value).map_err(|e| TxError::Abort(e.to_string()))?;
    tx.put(key, bytes)
}

/// Format version of every stored value (style item 4): values are stored as
/// `{"v": 1, "data": …}`, never as the bare serde form of a struct.
pub const FORMAT_VERSION: u32 = 1;

/// Format version of a state row that also carries stored replies (the sled
/// store's reply rows: `{"v": 2, "data": …, "r": <forward reply>, "u":
/// <compensation reply>}`). [`decode`] reads its `data` as a version 1
/// value. A release that predates it refuses such a row where it reads one
/// (a release, a refund), but does not look for replies in rows: a repeated
/// forward would be applied again there, so going back to it is not
/// supported (as it was not across the reply windows).
pub const REPLY_ROW_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    v: u32,
    data: T,
}

/// Encodes a value in the versioned stored form.
///
/// # Errors
/// The value cannot be encoded as JSON.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Versioned {
        v: FORMAT_VERSION,
        data: value,
    })
    .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

/// Decodes a value stored under `key` by [`encode`] (or the `data` of a
/// reply row, [`REPLY_ROW_VERSION`]).
///
/// # Errors
/// The bytes are not that JSON, or carry an unknown format version: the
/// stored data is corrupt (or from a newer release).
pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let key = String::from_utf8_lossy(key);
    let stored: Versioned<T> =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
    if stored.v != FORMAT_VERSION && stored.v != REPLY_ROW_VERSION {
        return Err(StoreError::Corrupt(format!(
            "{key}: unknown format version {}",
            stored.v
        )));
    }
    Ok(stored.data)
}

/// Now, in ms since the Unix epoch (0 if the clock is before it).
/// Runs a command's `apply_*` and notes on the command's span what the
/// store did: `effect = applied` (when it ran the effect) and `store_ms`
/// (its transaction and flush), for its trace.
pub(crate) async fn noted(
    apply: impl std::future::Future<Output = Result<(Reply, bool), StoreError>>,
) -> Result<(Reply, bool), StoreError> {
    let started = std::time::Instant::now();
    let result = apply.await;
    let span = tracing::Span::current();
    span.record("store_ms", started.elapsed().as_secs_f64() * 1e3);
    // A replay is noted by `telemetry::dedupe_hit`, which every path of one calls.
    if let Ok((_, false)) = &result {
        span.record("effect", "applied");
    }
    result
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Which store a participant runs on (`--store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreKind {
    /// Embedded sled in `--data-dir`, used by this process only: the fastest.
    #[default]
    Sled,
    /// Replicated JetStream KV buckets on the NATS in use: several replicas.
    Jetstream,
}
