//! A participant's sled store: its business `state` tree and the stored
//! replies that make commands idempotent (the reusable dedupe helper), in
//! time windows `replies.<start ms>.<end ms>` that pruning drops whole.
//!
//! It implements [`ParticipantStore`]: `apply_forward` and `apply_compensation` run an effect and
//! store its reply under the command's idempotency key in ONE sled
//! transaction, then flush, then return: a participant never replies before
//! both the effect and the stored reply are durable, and a repeated command
//! finds the stored reply and has no effect. Only `ok` and `rejected` replies
//! are stored; an `error` reply (transient) records nothing, so a retry may
//! succeed.
//!
//! Reply rows ([`Store::with_reply_rows`]): a handler whose command writes a
//! row of its own keyed by the forward key (`reservation/<key>`,
//! `charge/<key>`) has the stored reply kept in that row instead of in a
//! window, in the same write: the row carries the forward's reply and its
//! compensation's (`{"v":2,"data":…,"r":…,"u":…}`). A reply whose effect
//! wrote no such row (a refusal, a tombstone) goes to a window. Lookups read
//! the windows first, then the row.
//!
//! Tombstones: a compensation whose forward key has no stored reply writes a
//! `rejected: compensated_before_forward` reply under the forward key, so a
//! forward that arrives late is answered with it and does nothing.
//!
//! Durability: sled 0.34's flush writes its log with `sync_file_range`, not
//! `fsync`: a flushed write survives a process crash (kill -9) but not
//! necessarily a power cut or kernel crash. That is the guarantee the
//! participants give.
//!
//! This module knows nothing of stock or money, and nothing of NATS.

use std::{
    cell::{Cell, RefCell},
    collections::HashSet,
    sync::atomic::{AtomicU64, Ordering},
};

use futures::future::BoxFuture;
use saga_wire::{self as wire, Reply};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::{
    transaction::{ConflictableTransactionError, TransactionError, TransactionalTree},
    Transactional,
};

use super::{
    decode, encode, noted, now_ms, Change, Effect, ParticipantStore, Scanned, StateTx, StoreError, TxError,
    Undo, FORMAT_VERSION, REPLY_ROW_VERSION, TOMBSTONE_REASON,
};

/// Result type of closures run inside a sled transaction.
type SledTxResult<T> = Result<T, ConflictableTransactionError<String>>;

fn tx_get<T: DeserializeOwned>(tree: &TransactionalTree, key: &str) -> SledTxResult<Option<T>> {
    match tree.get(key.as_bytes())? {
        Some(bytes) => decode(key.as_bytes(), &bytes)
            .map(Some)
            .map_err(|e| ConflictableTransactionError::Abort(e.to_string())),
        None => Ok(None),
    }
}

fn tx_put<T: serde::Serialize>(tree: &TransactionalTree, key: &str, value: &T) -> SledTxResult<()> {
    let bytes = encode(value).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
    // Blind: the value replaced is not wanted (sled patch 6 skips its read).
    tree.set(key.as_bytes(), bytes);
    Ok(())
}

/// The writes of one run of a transaction (reset by the caller when sled
/// runs it again): replies put in a window (each key once: callers look
/// first) and the distinct state keys written — a row put twice in one
/// transaction is one sled write at commit, and counts one.
#[derive(Default)]
struct Writes {
    replies: Cell<u64>,
    state: RefCell<HashSet<Vec<u8>>>,
}

impl Writes {
    fn reset(&self) {
        self.replies.set(0);
        self.state.borrow_mut().clear();
    }

    fn state_key(&self, key: &[u8]) {
        self.state.borrow_mut().insert(key.to_vec());
    }

    fn total(&self) -> u64 {
        let state = u64::try_from(self.state.borrow().len()).unwrap_or(u64::MAX);
        self.replies.get().saturating_add(state)
    }
}

/// What an effect last did to the command's reply row: `Some(bytes)` put,
/// `None` removed.
type RowWrite = Option<Vec<u8>>;

/// The state tree as an effect sees it ([`StateTx`]) inside a sled
/// transaction, counting its writes and noting what it does to `row` (the
/// command's reply row, when the store keeps replies in rows).
struct SledTx<'a> {
    tree: &'a TransactionalTree,
    writes: &'a Writes,
    row: Option<&'a str>,
    row_write: Option<RowWrite>,
}

impl StateTx for SledTx<'_> {
    fn get(&mut self, key: &str) -> super::TxResult<Option<Vec<u8>>> {
        Ok(self.tree.get(key.as_bytes())?.map(|v| v.to_vec()))
    }
    fn put(&mut self, key: &str, bytes: Vec<u8>) -> super::TxResult<()> {
        if self.row == Some(key) {
            self.row_write = Some(Some(bytes.clone()));
        }
        self.tree.set(key.as_bytes(), bytes);
        self.writes.state_key(key.as_bytes());
        Ok(())
    }
    fn remove(&mut self, key: &str) -> super::TxResult<()> {
        if self.row == Some(key) {
            self.row_write = Some(None);
        }
        self.tree.unset(key.as_bytes());
        self.writes.state_key(key.as_bytes());
        Ok(())
    }
}

/// Runs an effect on the state tree, its errors as sled's; with what it
/// last did to `row`, if anything.
fn run_tx<T>(
    state: &TransactionalTree,
    writes: &Writes,
    row: Option<&str>,
    f: impl FnOnce(&mut dyn StateTx) -> super::TxResult<T>,
) -> SledTxResult<(T, Option<RowWrite>)> {
    let mut tx = SledTx {
        tree: state,
        writes,
        row,
        row_write: None,
    };
    let out = f(&mut tx).map_err(|e| match e {
        TxError::Abort(reason) => ConflictableTransactionError::Abort(reason),
        TxError::Sled(e) => e.into(),
        TxError::Fetch(key) => {
            ConflictableTransactionError::Abort(format!("{key}: not fetched (jetstream only)"))
        }
    })?;
    Ok((out, tx.row_write))
}

/// The replies a reply row carries: `r` the forward's, `u` its
/// compensation's (a row of version 1 carries none).
#[derive(Debug, Default, Deserialize)]
struct Carried {
    #[serde(default)]
    r: Option<Reply>,
    #[serde(default)]
    u: Option<Reply>,
}

/// A reply row as stored ([`REPLY_ROW_VERSION`]).
#[derive(Serialize)]
struct ReplyRow<'a> {
    v: u32,
    data: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    r: Option<&'a Reply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    u: Option<&'a Reply>,
}

/// A state value as an effect writes it ([`encode`]).
#[derive(Deserialize)]
struct RowData {
    v: u32,
    data: serde_json::Value,
}

/// The replies the stored row `row` carries.
fn carried(row: &str, bytes: &[u8]) -> Result<Carried, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{row}: {e}")))
}

/// `bytes` (a row as an effect wrote it) as a reply row carrying `r` and
/// `u`; `None` when they are not an encoded value (they stay as written and
/// the replies go to a window).
fn with_replies(bytes: &[u8], r: Option<&Reply>, u: Option<&Reply>) -> Option<Vec<u8>> {
    let row: RowData = serde_json::from_slice(bytes).ok()?;
    if row.v != FORMAT_VERSION && row.v != REPLY_ROW_VERSION {
        return None;
    }
    serde_json::to_vec(&ReplyRow {
        v: REPLY_ROW_VERSION,
        data: row.data,
        r,
        u,
    })
    .ok()
}

/// The reply row under `prefix` of the idempotency key `key`: the row of
/// its forward key, and whether `key` is the compensation's.
fn reply_row(prefix: &str, key: &str) -> (String, bool) {
    match wire::forward_key(key) {
        Some(forward) => (format!("{prefix}{forward}"), true),
        None => (format!("{prefix}{key}"), false),
    }
}

/// The compensation key of a forward key (`…/forward` → `…/compensate`).
fn compensation_key(forward: &str) -> Option<String> {
    forward
        .strip_suffix("/forward")
        .map(|base| format!("{base}/compensate"))
}

/// A command's reply row as its transaction found it.
struct RowBefore {
    key: String,
    compensation: bool,
    carried: Carried,
}

/// Prefix of the time-windowed reply trees: `replies.<start ms>.<end ms>`
/// (20 digits each, so names sort by start). A reply is stored in the
/// window that holds the time it was stored; pruning drops a whole window
/// once its end is past the retention, so a stored reply costs one write and
/// its pruning none per key (the per-reply `replies-by-time` index of earlier
/// releases cost a second write per reply and a removal per key).
const WINDOW_PREFIX: &str = "replies.";
/// Windows per retention: a lookup of a new key reads at most this many
/// windows (plus the one being filled); a reply is kept between the
/// retention and 1 + 1/8 of it.
const WINDOWS_PER_RETENTION: u64 = 8;
/// The shortest window (a retention under 8 s still gets 1 s windows).
const MIN_WINDOW_MS: u64 = 1000;
/// The retention `Store::new` assumes (the participants' default).
const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Where a lookup finds stored replies inside a transaction: the windows
/// newest first, then the legacy tree, then the command's reply row.
struct RepliesTx<'a> {
    /// The windows, newest (the one written) first, then the legacy
    /// `replies` tree of an older release, if it still holds replies.
    trees: &'a [TransactionalTree],
    /// The state tree (reply rows).
    state: &'a TransactionalTree,
    /// The prefix of the reply rows, when the store keeps replies in rows.
    rows: Option<&'a str>,
    /// Writes of this run of the transaction (replies and state).
    writes: &'a Writes,
}

impl RepliesTx<'_> {
    fn get(&self, key: &str) -> SledTxResult<Option<Reply>> {
        for tree in self.trees {
            if let Some(reply) = tx_get(tree, key)? {
                return Ok(Some(reply));
            }
        }
        Ok(self.row(key)?.and_then(|row| {
            let Carried { r, u } = row.carried;
            if row.compensation {
                u
            } else {
                r
            }
        }))
    }

    /// The reply row of `key` and the replies it carries now (`None`: the
    /// store keeps no replies in rows).
    fn row(&self, key: &str) -> SledTxResult<Option<RowBefore>> {
        let Some(prefix) = self.rows else {
            return Ok(None);
        };
        let (row, compensation) = reply_row(prefix, key);
        let carried = match self.state.get(row.as_bytes())? {
            Some(bytes) => {
                carried(&row, &bytes).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?
            }
            None => Carried::default(),
        };
        Ok(Some(RowBefore {
            key: row,
            compensation,
            carried,
        }))
    }

    /// Stores `reply`, the reply of `key` whose effect ran: in its reply
    /// row when the effect wrote that row (one write serves both), else in
    /// the newest window. `before` is the row as the transaction found it:
    /// the other reply it carried stays in it, or, when the effect's write
    /// cannot carry it (the row removed), moves to the window.
    fn store(
        &self,
        key: &str,
        reply: &Reply,
        before: Option<&RowBefore>,
        row_write: Option<RowWrite>,
    ) -> SledTxResult<()> {
        let (Some(before), Some(written)) = (before, row_write) else {
            return self.put(key, reply);
        };
        let (r, u) = if before.compensation {
            (before.carried.r.as_ref(), Some(reply))
        } else {
            (Some(reply), before.carried.u.as_ref())
        };
        if let Some(bytes) = written.and_then(|w| with_replies(&w, r, u)) {
            self.state.set(before.key.as_bytes(), bytes);
            self.writes.state_key(before.key.as_bytes());
            return Ok(());
        }
        self.put(key, reply)?;
        if before.compensation {
            if let (Some(r), Some(forward)) = (&before.carried.r, wire::forward_key(key)) {
                self.put(&forward, r)?;
            }
        } else if let (Some(u), Some(compensation)) = (&before.carried.u, compensation_key(key)) {
            self.put(&compensation, u)?;
        }
        Ok(())
    }

    /// Stores `reply` under `key` in the newest window (a key is stored
    /// once: callers look first).
    fn put(&self, key: &str, reply: &Reply) -> SledTxResult<()> {
        let Some(newest) = self.trees.first() else {
            return Err(ConflictableTransactionError::Abort(
                "no reply window to store in".into(),
            ));
        };
        tx_put(newest, key, reply)?;
        self.writes.replies.set(self.writes.replies.get() + 1);
        Ok(())
    }
}

/// The `replies-by-time` key of the reply `key` stored at `at_ms` (the
/// legacy layout: 8 bytes of big-endian ms since the Unix epoch, then the
/// reply's key; empty value).
fn time_key(at_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// One reply window: the replies stored in `[start, end)` ms.
struct Window {
    start: u64,
    end: u64,
    tree: sled::Tree,
}

fn window_name(start: u64, end: u64) -> String {
    format!("{WINDOW_PREFIX}{start:020}.{end:020}")
}

/// `(start, end)` of a window tree's name, `None` for any other tree.
fn parse_window_name(name: &[u8]) -> Option<(u64, u64)> {
    let rest = std::str::from_utf8(name).ok()?.strip_prefix(WINDOW_PREFIX)?;
    let (start, end) = rest.split_once('.')?;
    Some((start.parse().ok()?, end.parse().ok()?))
}

/// The layout of releases before the windows: one `replies` tree and its
/// `replies-by-time` index. Read (after the windows) and pruned by its
/// index until it is empty, then dropped; never written again.
struct Legacy {
    replies: sled::Tree,
    by_time: sled::Tree,
}

/// The reply trees: windows by start, oldest first, and the legacy trees.
struct Replies {
    windows: Vec<Window>,
    legacy: Option<Legacy>,
    /// `state`, then the windows newest first, then legacy `replies`: the
    /// trees of a command's transaction (rebuilt when the set changes).
    txn_trees: Vec<sled::Tree>,
}

impl Replies {
    fn rebuild(&mut self, state: &sled::Tree) {
        let mut trees = Vec::with_capacity(self.windows.len() + 2);
        trees.push(state.clone());
        trees.extend(self.windows.iter().rev().map(|w| w.tree.clone()));
        trees.extend(self.legacy.as_ref().map(|l| l.replies.clone()));
        self.txn_trees = trees;
    }
}

/// The participant's sled database: a `state` tree, the reply windows
/// `replies.<start>.<end>` (plus, from an older release, `replies` and
/// `replies-by-time` until pruned), and a tiny `ready-probe` tree, written
/// only by readiness checks.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    replies: std::sync::Arc<std::sync::RwLock<Replies>>,
    /// Length of a new window (ms).
    window_ms: u64,
    /// When a reply is stored (ms since the Unix epoch): [`now_ms`], or a
    /// test's clock.
    clock: std::sync::Arc<dyn Fn() -> u64 + Send + Sync>,
    state: sled::Tree,
    probe: sled::Tree,
    flusher: std::sync::Arc<GroupFlush>,
    /// Inserts and removes committed since open (commands, seeding, pruning;
    /// a dropped window counts one).
    writes: std::sync::Arc<AtomicU64>,
    /// The prefix of the reply rows ([`Store::with_reply_rows`]), if any.
    rows: Option<std::sync::Arc<str>>,
}

/// Group commit: one sled flush at a time, covering every write committed
/// before it started, so concurrent commands share a flush instead of
/// piling up flushes of their own (concurrent `flush_async` calls from many
/// tasks were seen to stall a participant after a restart under load).
struct GroupFlush {
    db: sled::Db,
    /// Writes committed so far (each bumps it after its transaction).
    committed: std::sync::atomic::AtomicU64,
    /// The `committed` value the last finished flush covered.
    flushed: tokio::sync::Mutex<u64>,
}

impl GroupFlush {
    /// Returns once every write committed before the call is durable.
    async fn flush(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let mine = self.committed.fetch_add(1, Ordering::SeqCst) + 1;
        let mut flushed = self.flushed.lock().await;
        if *flushed >= mine {
            return Ok(());
        }
        let target = self.committed.load(Ordering::SeqCst);
        let db = self.db.clone();
        // The log written on this blocking thread (the vendored sled's patches):
        // one round trip to the blocking pool, none more to sled's I/O pool, and
        // one sync for the buffers of every transaction since the last flush.
        tokio::task::spawn_blocking(move || sled::with_inline_log_writes(|| db.flush()))
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task failed: {e}")))??;
        *flushed = target;
        Ok(())
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Corrupt("reply windows lock poisoned (a thread panicked)".into())
}

impl Store {
    /// Opens the trees in `db` for the default retention (30 days).
    ///
    /// # Errors
    /// sled errors.
    pub fn new(db: sled::Db) -> Result<Self, StoreError> {
        Self::with_retention(db, DEFAULT_RETENTION)
    }

    /// Opens the trees in `db`; new reply windows are an eighth of
    /// `retention` long (at least 1 s; one window for ever when it is 0).
    ///
    /// A database of an older release keeps its `replies` tree, read after
    /// the windows and pruned by its `replies-by-time` index. One written
    /// before that index existed (replies, no index) gets its index here,
    /// in one atomic batch: each reply is indexed at its saga's start when
    /// the saga id is a UUID v7 started before now (what pruning went by
    /// until then), else at now, so it goes one retention after this upgrade
    /// (a future-dated or non-v7 id can no longer hold pruning up).
    ///
    /// # Errors
    /// sled errors.
    pub fn with_retention(db: sled::Db, retention: std::time::Duration) -> Result<Self, StoreError> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let window_ms = if retention_ms == 0 {
            u64::MAX
        } else {
            (retention_ms / WINDOWS_PER_RETENTION).max(MIN_WINDOW_MS)
        };
        let names = db.tree_names();
        let mut windows = Vec::new();
        for name in &names {
            if let Some((start, end)) = parse_window_name(name) {
                windows.push(Window {
                    start,
                    end,
                    tree: db.open_tree(name)?,
                });
            }
        }
        windows.sort_by_key(|w| w.start);
        let legacy = if names.iter().any(|n| &n[..] == b"replies") {
            let replies = db.open_tree("replies")?;
            let by_time = db.open_tree("replies-by-time")?;
            if by_time.is_empty() && !replies.is_empty() {
                let now = now_ms();
                let mut batch = sled::Batch::default();
                let mut n = 0u64;
                for key in replies.iter().keys() {
                    let key = key?;
                    let at = saga_start_ms(&key).filter(|t| *t <= now).unwrap_or(now);
                    batch.insert(time_key(at, &key), &[][..]);
                    n += 1;
                }
                by_time.apply_batch(batch)?;
                db.flush()?;
                tracing::info!(
                    replies = n,
                    "stored replies indexed by the time they were stored (upgrade)"
                );
            }
            Some(Legacy { replies, by_time })
        } else {
            None
        };
        let state = db.open_tree("state")?;
        let mut replies = Replies {
            windows,
            legacy,
            txn_trees: Vec::new(),
        };
        replies.rebuild(&state);
        Ok(Store {
            replies: std::sync::Arc::new(std::sync::RwLock::new(replies)),
            window_ms,
            clock: std::sync::Arc::new(now_ms),
            state,
            probe: db.open_tree("ready-probe")?,
            flusher: std::sync::Arc::new(GroupFlush {
                db: db.clone(),
                committed: std::sync::atomic::AtomicU64::new(0),
                flushed: tokio::sync::Mutex::new(0),
            }),
            writes: std::sync::Arc::default(),
            rows: None,
            db,
        })
    }

    /// Keeps a command's stored reply in its business row instead of a
    /// window, when its effect writes that row: the state row
    /// `<prefix><forward key>` (a reservation, a ledger entry, keyed by the
    /// command's forward key) then carries the forward's reply and its
    /// compensation's ([`REPLY_ROW_VERSION`]), so the effect and its reply
    /// are one write, in the same transaction. A command whose effect does
    /// not write its row (a refusal, a tombstone) stores its reply in a
    /// window as before; a row's replies live as long as the row. Lookups
    /// read the windows first, so the replies a database of an earlier
    /// layout holds in windows still answer. An empty `prefix` keeps every
    /// reply in windows.
    ///
    /// The prefix must stay the same for a database: a store opened
    /// without it would not see the replies rows carry.
    #[must_use]
    pub fn with_reply_rows(mut self, prefix: &str) -> Self {
        self.rows = (!prefix.is_empty()).then(|| prefix.into());
        self
    }

    /// The business state tree (read side, and tests that write behind a
    /// handler's back; commands write through a transaction).
    pub fn state(&self) -> &sled::Tree {
        &self.state
    }

    /// Makes sure the newest window holds `at_ms` (or starts after it, when
    /// the clock went back): opens the next one when `at_ms` is past its end.
    fn ensure_window(&self, at_ms: u64) -> Result<(), StoreError> {
        let fits = |r: &Replies| r.windows.last().is_some_and(|w| at_ms < w.end);
        if fits(&*self.replies.read().map_err(poisoned)?) {
            return Ok(());
        }
        let mut replies = self.replies.write().map_err(poisoned)?;
        if fits(&replies) {
            return Ok(());
        }
        let aligned = at_ms - at_ms % self.window_ms;
        let start = replies.windows.last().map_or(aligned, |w| aligned.max(w.end));
        let end = start.saturating_add(self.window_ms).max(at_ms.saturating_add(1));
        let tree = self.db.open_tree(window_name(start, end))?;
        replies.windows.push(Window { start, end, tree });
        replies.rebuild(&self.state);
        Ok(())
    }

    /// The reply row of `key`, when the store keeps replies in rows.
    fn row_of(&self, key: &str) -> Option<String> {
        self.rows.as_deref().map(|prefix| reply_row(prefix, key).0)
    }

    /// Runs a forward `effect` once per `key` (see [`ParticipantStore::apply_forward`]).
    async fn forward(&self, key: &str, effect: Effect<'_>) -> Result<(Reply, bool), StoreError> {
        let row = self.row_of(key);
        self.apply(key, |state, replies| {
            if let Some(stored) = replies.get(key)? {
                return Ok((stored, true));
            }
            let before = replies.row(key)?;
            let (reply, row_write) = run_tx(state, replies.writes, row.as_deref(), |tx| effect(tx))?;
            if !matches!(reply, Reply::Error { .. }) {
                replies.store(key, &reply, before.as_ref(), row_write)?;
            }
            Ok((reply, false))
        })
        .await
    }

    /// Runs a compensation once per `key` (see [`ParticipantStore::apply_compensation`]).
    async fn compensation(&self, key: &str, undo: Undo<'_>) -> Result<(Reply, bool), StoreError> {
        let forward = wire::forward_key(key)
            .ok_or_else(|| StoreError::Corrupt(format!("`{key}` is not a compensation key")))?;
        let row = self.row_of(key);
        self.apply(key, |state, replies| {
            if let Some(stored) = replies.get(key)? {
                return Ok((stored, true));
            }
            let reply = match replies.get(&forward)? {
                Some(Reply::Ok { data }) => {
                    let before = replies.row(key)?;
                    let (reply, row_write) = run_tx(state, replies.writes, row.as_deref(), |tx| {
                        undo(tx, &forward, &data)
                    })?;
                    if !matches!(reply, Reply::Error { .. }) {
                        replies.store(key, &reply, before.as_ref(), row_write)?;
                    }
                    return Ok((reply, false));
                }
                Some(Reply::Rejected { reason }) => {
                    Reply::ok(serde_json::json!({"undone": false, "forward": format!("rejected: {reason}")}))
                }
                Some(Reply::Error { .. }) | None => {
                    replies.put(&forward, &Reply::rejected(TOMBSTONE_REASON))?;
                    Reply::ok(
                        serde_json::json!({"undone": false, "forward": "never seen; tombstone recorded"}),
                    )
                }
            };
            if !matches!(reply, Reply::Error { .. }) {
                replies.put(key, &reply)?;
            }
            Ok((reply, false))
        })
        .await
    }

    async fn apply<F>(&self, key: &str, f: F) -> Result<(Reply, bool), StoreError>
    where
        F: Fn(&TransactionalTree, &RepliesTx<'_>) -> SledTxResult<(Reply, bool)>,
    {
        // Read before the transaction: the closure stays pure when sled retries it.
        let at_ms = (self.clock)();
        self.ensure_window(at_ms)?;
        let writes = Writes::default();
        let result = {
            // Held for the transaction only (no await inside): the pruner
            // drops a window under the write lock, never under a transaction.
            let replies = self.replies.read().map_err(poisoned)?;
            // The buffers this transaction seals are written and synced by the
            // group flush below, with one sync for all (the vendored sled's
            // patch 5), not one by one on sled's I/O pool.
            sled::with_deferred_log_writes(|| {
                replies.txn_trees.as_slice().transaction(|trees| {
                    writes.reset();
                    let Some((state, windows)) = trees.split_first() else {
                        return Err(ConflictableTransactionError::Abort("no state tree".into()));
                    };
                    f(
                        state,
                        &RepliesTx {
                            trees: windows,
                            state,
                            rows: self.rows.as_deref(),
                            writes: &writes,
                        },
                    )
                })
            })
        };
        let (reply, hit) = match result {
            Ok(r) => r,
            Err(TransactionError::Abort(reason)) => {
                return Err(StoreError::Corrupt(format!("{key}: {reason}")))
            }
            Err(TransactionError::Storage(e)) => return Err(StoreError::Sled(e)),
        };
        self.writes.fetch_add(writes.total(), Ordering::Relaxed);
        // Write-ahead: the effect and its stored reply are durable before anyone
        // hears of them. Also on a hit: the stored reply may come from a
        // concurrent duplicate whose own flush has not finished yet.
        self.flusher.flush().await?;
        Ok((reply, hit))
    }

    /// The stored reply for `key` (windows newest first, then the legacy
    /// tree), undecoded.
    fn stored_bytes(&self, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        let replies = self.replies.read().map_err(poisoned)?;
        for tree in replies.txn_trees.iter().skip(1) {
            if let Some(bytes) = tree.get(key.as_bytes())? {
                return Ok(Some(bytes));
            }
        }
        Ok(None)
    }

    /// The reply the reply row of `key` carries for it, if any.
    fn row_reply(&self, key: &str) -> Result<Option<Reply>, StoreError> {
        let Some(prefix) = self.rows.as_deref() else {
            return Ok(None);
        };
        let (row, compensation) = reply_row(prefix, key);
        let Some(bytes) = self.state.get(row.as_bytes())? else {
            return Ok(None);
        };
        let Carried { r, u } = carried(&row, &bytes)?;
        Ok(if compensation { u } else { r })
    }

    /// The stored reply for `key` (windows, legacy tree, reply row), made
    /// durable before it is returned, since a concurrent duplicate may have
    /// committed it without flushing yet.
    async fn stored(&self, key: &str) -> Result<Option<Reply>, StoreError> {
        let reply = match self.stored_bytes(key)? {
            Some(bytes) => decode(key.as_bytes(), &bytes)?,
            None => match self.row_reply(key)? {
                Some(reply) => reply,
                None => return Ok(None),
            },
        };
        self.flusher.flush().await?;
        Ok(Some(reply))
    }

    /// Runs `change` on the state tree in one transaction, then flushes.
    fn change(&self, change: Change<'_>) -> Result<(), StoreError> {
        let writes = Writes::default();
        self.state
            .transaction(|state| {
                writes.reset();
                run_tx(state, &writes, None, |tx| change(tx)).map(|((), _)| ())
            })
            .map_err(|e| match e {
                TransactionError::Abort(reason) => StoreError::Corrupt(reason),
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        self.writes.fetch_add(writes.total(), Ordering::Relaxed);
        self.db.flush()?;
        Ok(())
    }

    /// Writes a probe key to its own tree and removes it again.
    fn probe(&self) -> Result<(), StoreError> {
        self.probe.insert(b"probe", &b"1"[..])?;
        self.probe.remove(b"probe")?;
        Ok(())
    }

    /// Up to `limit` raw values of the state tree under `prefix` after `after`.
    fn scan_raw(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let skip = prefix.len();
        let start = match after {
            Some(a) => Bound::Excluded(format!("{prefix}{a}").into_bytes()),
            None => Bound::Included(prefix.as_bytes().to_vec()),
        };
        let mut out = Vec::new();
        for kv in self.state.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = kv?;
            if !k.starts_with(prefix.as_bytes()) || out.len() >= limit {
                break;
            }
            out.push((String::from_utf8_lossy(&k[skip..]).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Removes the stored replies (and tombstones) stored before
    /// `cutoff_ms` (ms since the Unix epoch, by this participant's clock);
    /// returns how many went. First those of an older release's `replies`
    /// tree, oldest first by its `replies-by-time` index, at most `limit`
    /// (the replies go first, then their index entries: a crash between the
    /// two leaves index entries whose reply is gone, never a reply without
    /// one), and the two trees once empty. Then every window whose end is
    /// at or before `cutoff_ms` (so all it holds was stored before it),
    /// dropped whole whatever `limit` — except the newest, which commands
    /// write to. No saga id, whatever it claims, decides when a reply goes.
    ///
    /// Safe once no command of those sagas can come again: the coordinator
    /// re-sends a command only while its saga runs, and refuses to retry a
    /// saga older than its `--command-horizon` (at most this retention); a
    /// reply is stored after its saga started, so it is kept at least that long.
    ///
    /// # Errors
    /// sled errors.
    pub fn prune(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let legacy = {
            let replies = self.replies.read().map_err(poisoned)?;
            replies
                .legacy
                .as_ref()
                .map(|l| (l.replies.clone(), l.by_time.clone()))
        };
        if let Some((replies, by_time)) = legacy {
            let n = prune_legacy(&replies, &by_time, cutoff_ms, limit)?;
            self.writes.fetch_add(2 * n as u64, Ordering::Relaxed);
            if n > 0 {
                return Ok(n);
            }
            if replies.is_empty() && by_time.is_empty() {
                let mut all = self.replies.write().map_err(poisoned)?;
                all.legacy = None;
                all.rebuild(&self.state);
                self.db.drop_tree("replies")?;
                self.db.drop_tree("replies-by-time")?;
                self.writes.fetch_add(2, Ordering::Relaxed);
                tracing::info!("the stored replies of an older release are all pruned; its trees dropped");
            }
        }
        let mut all = self.replies.write().map_err(poisoned)?;
        let keep_from = all.windows.len().saturating_sub(1);
        let expired: Vec<usize> = (0..keep_from)
            .filter(|i| all.windows[*i].end <= cutoff_ms)
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        for i in expired.iter().rev() {
            let w = all.windows.remove(*i);
            n += w.tree.len();
            self.db.drop_tree(window_name(w.start, w.end))?;
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        all.rebuild(&self.state);
        Ok(n)
    }
}

/// Prunes up to `limit` entries of an older release's `replies` tree by its
/// `replies-by-time` index: those stored before `cutoff_ms`.
fn prune_legacy(
    replies_tree: &sled::Tree,
    by_time: &sled::Tree,
    cutoff_ms: u64,
    limit: usize,
) -> Result<usize, StoreError> {
    let (mut replies, mut index) = (sled::Batch::default(), sled::Batch::default());
    let mut n = 0;
    for entry in by_time.iter().keys() {
        let entry = entry?;
        if n >= limit {
            break;
        }
        match entry.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(at) if u64::from_be_bytes(at) >= cutoff_ms => break,
            Some(_) => replies.remove(&entry[8..]),
            None => {} // not an index entry: dropped
        }
        index.remove(entry);
        n += 1;
    }
    if n > 0 {
        replies_tree.apply_batch(replies)?;
        by_time.apply_batch(index)?;
    }
    Ok(n)
}

impl ParticipantStore for Store {
    fn apply_forward<'a>(
        &'a self,
        key: &'a str,
        effect: Effect<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>> {
        Box::pin(noted(self.forward(key, effect)))
    }

    fn apply_compensation<'a>(
        &'a self,
        key: &'a str,
        undo: Undo<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>> {
        Box::pin(noted(self.compensation(key, undo)))
    }

    fn stored_reply<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Reply>, StoreError>> {
        Box::pin(self.stored(key))
    }

    fn update_state<'a>(&'a self, change: Change<'a>) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.change(change) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move { Ok(self.state.get(key.as_bytes())?.map(|v| v.to_vec())) })
    }

    fn scan<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Scanned, StoreError>> {
        Box::pin(async move { self.scan_raw(prefix, after, limit) })
    }

    fn probe_writable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.probe() })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.flusher.flush())
    }

    fn prune_replies(&self, cutoff_ms: u64, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        let store = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.prune(cutoff_ms, limit))
                .await
                .map_err(|e| StoreError::Corrupt(format!("pruning task failed: {e}")))?
        })
    }

    fn kind(&self) -> &'static str {
        "sled"
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// The start time (ms since the Unix epoch) of the saga whose UUID v7 id
/// begins the idempotency key `key` (`<saga_id>/<step>/<kind>`), in any
/// spelling the uuid crate parses: only the upgrade of an old database uses it.
fn saga_start_ms(key: &[u8]) -> Option<u64> {
    let id = key.split(|b| *b == b'/').next()?;
    let id = uuid::Uuid::try_parse_ascii(id).ok()?;
    if id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    Some(secs * 1000 + u64::from(nanos) / 1_000_000)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn stored_values_carry_a_format_version() {
        let bytes = encode(&Reply::rejected("x")).expect("encodes");
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(text.starts_with(r#"{"v":1,"#), "{text}");
        assert_eq!(
            decode::<Reply>(b"k", &bytes).expect("decodes"),
            Reply::rejected("x")
        );
        let newer = br#"{"v":3,"data":{"outcome":"ok"}}"#;
        assert!(matches!(decode::<Reply>(b"k", newer), Err(StoreError::Corrupt(m)) if m.contains("version")));
        assert!(matches!(
            decode::<Reply>(b"k", b"{}"),
            Err(StoreError::Corrupt(_))
        ));
    }

    /// The store over `dir` with `retention`, its clock set by the returned cell.
    fn clocked(dir: &std::path::Path, retention_ms: u64, now: u64) -> (Store, Arc<AtomicU64>) {
        let clock = Arc::new(AtomicU64::new(now));
        let mut store = Store::with_retention(
            crate::open_db(dir).expect("sled"),
            std::time::Duration::from_millis(retention_ms),
        )
        .expect("store");
        let c = clock.clone();
        store.clock = Arc::new(move || c.load(Ordering::SeqCst));
        (store, clock)
    }

    fn windows(store: &Store) -> Vec<(u64, u64, usize)> {
        let replies = store.replies.read().expect("lock");
        replies
            .windows
            .iter()
            .map(|w| (w.start, w.end, w.tree.len()))
            .collect()
    }

    fn ok() -> Reply {
        Reply::ok(serde_json::Value::Null)
    }

    #[test]
    fn the_readiness_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        store.probe().expect("writable");
        store.probe().expect("writable again");
        assert!(store.probe.is_empty());
        assert!(windows(&store).is_empty() && store.state.is_empty());
    }

    fn v7_at(ms: u64) -> String {
        uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            ms / 1000,
            u32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
        ))
        .to_string()
    }

    const HOUR: u64 = 3_600_000;

    #[tokio::test]
    async fn replies_go_into_windows_by_the_time_they_were_stored_and_whole_windows_are_pruned() {
        let dir = tempfile::tempdir().expect("tmp");
        // Retention 8 h: windows of 1 h.
        let t0 = 1_000 * HOUR;
        let (store, clock) = clocked(dir.path(), 8 * HOUR, t0 + 10);
        // Ids claiming 1970, a day ahead (upper-case), and no time at all (v4):
        // none of them decides where a reply goes.
        let ids = [
            v7_at(1_000_000),
            v7_at(t0 + 24 * HOUR).to_uppercase(),
            "6f0c3e8e-3b1a-4c5d-9e2f-0a1b2c3d4e5f".to_string(),
        ];
        for id in &ids {
            store
                .apply_forward(&format!("{id}/s/forward"), &|_| Ok(ok()))
                .await
                .expect("applies");
            store
                .apply_compensation(&format!("{id}/t/compensate"), &|_, _, _| Ok(ok()))
                .await
                .expect("tombstone");
        }
        assert_eq!(
            windows(&store),
            [(t0, t0 + HOUR, 9)],
            "3 forwards, 3 compensations, 3 tombstones, in one window"
        );
        assert_eq!(store.writes(), 9, "one write per stored reply");
        clock.store(t0 + HOUR + 5, Ordering::SeqCst);
        store
            .apply_forward("later/s/forward", &|_| Ok(ok()))
            .await
            .expect("applies");
        assert_eq!(
            windows(&store),
            [(t0, t0 + HOUR, 9), (t0 + HOUR, t0 + 2 * HOUR, 1)]
        );
        // Looked up in every window, newest first.
        for id in &ids {
            let (reply, hit) = store
                .apply_forward(&format!("{id}/t/forward"), &|_| Ok(Reply::error("applied again")))
                .await
                .expect("a late forward");
            assert_eq!((reply, hit), (Reply::rejected(TOMBSTONE_REASON), true));
        }
        assert_eq!(
            store.prune(t0 + HOUR - 1, 1).expect("prunes"),
            0,
            "not all past the retention"
        );
        assert_eq!(
            store.prune(t0 + HOUR, 1).expect("prunes"),
            9,
            "a whole window, whatever the limit"
        );
        assert_eq!(windows(&store), [(t0 + HOUR, t0 + 2 * HOUR, 1)]);
        assert_eq!(store.writes(), 11, "a dropped window counts one");
        assert_eq!(
            store
                .stored_reply(&format!("{}/s/forward", ids[0]))
                .await
                .expect("reads"),
            None
        );
        // The newest window, which commands write to, stays even when past.
        assert_eq!(store.prune(t0 + 10 * HOUR, 100).expect("prunes"), 0);
        assert!(store
            .stored_reply("later/s/forward")
            .await
            .expect("reads")
            .is_some());
        drop(store);
        // The windows are found again on open.
        let (store, _) = clocked(dir.path(), 8 * HOUR, t0 + HOUR + 6);
        assert_eq!(windows(&store), [(t0 + HOUR, t0 + 2 * HOUR, 1)]);
        let (reply, hit) = store
            .apply_forward("later/s/forward", &|_| Ok(Reply::error("applied again")))
            .await
            .expect("a repeat");
        assert_eq!((reply, hit), (ok(), true));
    }

    #[tokio::test]
    async fn a_clock_gone_back_and_a_changed_retention_keep_one_window_to_write() {
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = 1_000 * HOUR;
        {
            let (store, clock) = clocked(dir.path(), 8 * HOUR, t0);
            store
                .apply_forward("a/s/forward", &|_| Ok(ok()))
                .await
                .expect("applies");
            clock.store(t0 - 5 * HOUR, Ordering::SeqCst);
            store
                .apply_forward("b/s/forward", &|_| Ok(ok()))
                .await
                .expect("applies");
            assert_eq!(
                windows(&store),
                [(t0, t0 + HOUR, 2)],
                "the newest window, kept longer"
            );
        }
        // Reopened with windows of 2 h: the next starts where the last ended.
        let (store, _) = clocked(dir.path(), 16 * HOUR, t0 + HOUR);
        store
            .apply_forward("c/s/forward", &|_| Ok(ok()))
            .await
            .expect("applies");
        assert_eq!(
            windows(&store),
            [(t0, t0 + HOUR, 2), (t0 + HOUR, t0 + 3 * HOUR, 1)]
        );
        let forever = Store::with_retention(
            crate::open_db(tempfile::tempdir().expect("tmp").path()).expect("sled"),
            std::time::Duration::ZERO,
        )
        .expect("store");
        assert_eq!(
            forever.window_ms,
            u64::MAX,
            "a retention of 0 keeps one window for ever"
        );
    }

    /// The layout of the previous release: `replies` and its
    /// `replies-by-time` index (8 bytes of big-endian ms, then the key).
    fn old_layout(dir: &std::path::Path, replies: &[(&str, u64, Reply)]) {
        let db = crate::open_db(dir).expect("sled");
        let tree = db.open_tree("replies").expect("tree");
        let index = db.open_tree("replies-by-time").expect("tree");
        for (key, at, reply) in replies {
            tree.insert(key.as_bytes(), encode(reply).expect("encodes"))
                .expect("insert");
            index
                .insert(time_key(*at, key.as_bytes()), &[][..])
                .expect("insert");
        }
        db.flush().expect("flush");
    }

    #[tokio::test]
    async fn a_database_of_the_previous_release_is_read_and_pruned_then_its_trees_dropped() {
        let dir = tempfile::tempdir().expect("tmp");
        let now = now_ms();
        let data = serde_json::json!({"reservation_id": "x"});
        old_layout(
            dir.path(),
            &[
                ("old/s/forward", now - 3 * HOUR, Reply::ok(data.clone())),
                ("old/t/forward", now - 3 * HOUR, Reply::rejected(TOMBSTONE_REASON)),
                ("old/t/compensate", now - 3 * HOUR, ok()),
                ("fresh/s/forward", now - 1000, Reply::ok(data.clone())),
                ("fresh/t/forward", now - 1000, Reply::rejected(TOMBSTONE_REASON)),
            ],
        );
        let store = Store::with_retention(
            crate::open_db(dir.path()).expect("sled"),
            std::time::Duration::from_millis(2 * HOUR),
        )
        .expect("store");
        // Every old reply answers as before: a repeat, a tombstone, the
        // compensation of an old forward (it gets the forward's data).
        let (reply, hit) = store
            .apply_forward("fresh/s/forward", &|_| Ok(Reply::error("applied again")))
            .await
            .expect("a repeat");
        assert_eq!((reply, hit), (Reply::ok(data.clone()), true));
        let (reply, hit) = store
            .apply_forward("fresh/t/forward", &|_| Ok(Reply::error("applied again")))
            .await
            .expect("a late forward");
        assert_eq!((reply, hit), (Reply::rejected(TOMBSTONE_REASON), true));
        let undone = store
            .apply_compensation("fresh/s/compensate", &|_, forward, got| {
                Ok(Reply::ok(serde_json::json!({"forward": forward, "got": got})))
            })
            .await
            .expect("compensates");
        assert_eq!(
            undone,
            (
                Reply::ok(serde_json::json!({"forward": "fresh/s/forward", "got": data})),
                false
            )
        );
        assert_eq!(store.writes(), 1, "the new reply only, in a window");
        assert_eq!(windows(&store).len(), 1);
        // Pruning follows the old index for the old replies.
        assert_eq!(
            store.prune(now - HOUR, 100).expect("prunes"),
            3,
            "the expired old ones"
        );
        for key in ["old/s/forward", "old/t/forward", "old/t/compensate"] {
            assert_eq!(store.stored_reply(key).await.expect("reads"), None, "{key}");
        }
        for key in ["fresh/s/forward", "fresh/t/forward", "fresh/s/compensate"] {
            assert!(
                store.stored_reply(key).await.expect("reads").is_some(),
                "{key} kept"
            );
        }
        assert_eq!(store.prune(now - HOUR, 100).expect("prunes"), 0);
        assert!(
            store.db.tree_names().iter().any(|n| &n[..] == b"replies"),
            "not empty yet"
        );
        drop(store);
        // Opened again (the old trees still there), then all of it past.
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        assert!(store
            .stored_reply("fresh/t/forward")
            .await
            .expect("reads")
            .is_some());
        assert_eq!(store.prune(now + HOUR, 100).expect("prunes"), 2);
        assert_eq!(
            store.prune(now + HOUR, 100).expect("prunes"),
            0,
            "the new window is the newest"
        );
        let names = store.db.tree_names();
        assert!(
            !names
                .iter()
                .any(|n| &n[..] == b"replies" || &n[..] == b"replies-by-time"),
            "the old trees are dropped once empty"
        );
        assert!(store
            .stored_reply("fresh/s/compensate")
            .await
            .expect("reads")
            .is_some());
    }

    #[tokio::test]
    async fn an_older_database_is_indexed_on_open_and_a_future_dated_id_does_not_stop_pruning() {
        let dir = tempfile::tempdir().expect("tmp");
        let now = now_ms();
        let expired: Vec<String> = (0..3).map(|i| v7_at(now - 2 * HOUR - i * 1000)).collect();
        // Sorts before every real key (`A` < `a`) and claims a start a day ahead.
        let forged = v7_at(now + 24 * HOUR).to_uppercase();
        assert!(expired.iter().all(|e| forged < *e), "{forged} sorts first");
        let v4 = "6f0c3e8e-3b1a-4c5d-9e2f-0a1b2c3d4e5f".to_string();
        {
            // The layout before the index: a `replies` tree only.
            let db = crate::open_db(dir.path()).expect("sled");
            let replies = db.open_tree("replies").expect("tree");
            for id in expired.iter().chain([&forged, &v4]) {
                let bytes = encode(&ok()).expect("encodes");
                replies.insert(format!("{id}/s/forward"), bytes).expect("insert");
            }
            db.flush().expect("flush");
        }
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        let index_len = |store: &Store| {
            let replies = store.replies.read().expect("lock");
            replies.legacy.as_ref().map_or(0, |l| l.by_time.len())
        };
        assert_eq!(index_len(&store), 5, "every old reply indexed");
        assert_eq!(
            store.prune(now - HOUR, 100).expect("prunes"),
            3,
            "the expired ones"
        );
        for id in &expired {
            assert_eq!(
                store
                    .stored_reply(&format!("{id}/s/forward"))
                    .await
                    .expect("reads"),
                None
            );
        }
        for id in [&forged, &v4] {
            let kept = store
                .stored_reply(&format!("{id}/s/forward"))
                .await
                .expect("reads");
            assert!(kept.is_some(), "{id}: indexed at the upgrade, kept one retention");
        }
        drop(store);
        // Opening again does not index twice.
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        assert_eq!(index_len(&store), 2);
        assert_eq!(store.prune(now + HOUR, 100).expect("prunes"), 2);
        assert_eq!(store.prune(now + HOUR, 100).expect("prunes"), 0);
        assert!(
            store.replies.read().expect("lock").legacy.is_none(),
            "dropped once empty"
        );
    }

    #[tokio::test]
    async fn writes_are_counted_once_per_committed_command_and_not_for_a_repeat() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        let effect = |tx: &mut dyn StateTx| {
            tx.put("thing", b"1".to_vec())?;
            Ok(ok())
        };
        store
            .apply_forward("s/a/forward", &effect)
            .await
            .expect("applies");
        // The effect's row and the reply.
        assert_eq!(store.writes(), 2);
        store
            .apply_forward("s/a/forward", &effect)
            .await
            .expect("a repeat");
        assert_eq!(store.writes(), 2, "a repeat writes nothing");
        store
            .apply_forward("s/b/forward", &|_| Ok(Reply::error("later")))
            .await
            .expect("an error reply");
        assert_eq!(store.writes(), 2, "an error reply commits nothing");
    }

    /// A store keeping replies in `row/<forward key>` rows, its clock set
    /// by the returned cell.
    fn with_rows(dir: &std::path::Path, retention_ms: u64, now: u64) -> (Store, Arc<AtomicU64>) {
        let (store, clock) = clocked(dir, retention_ms, now);
        (store.with_reply_rows("row/"), clock)
    }

    /// A forward that takes one unit from the shared `hot` counter and
    /// writes its own row (the counter put twice: one sled write).
    fn take_one(
        key: &'static str,
    ) -> impl Fn(&mut dyn StateTx) -> super::super::TxResult<Reply> + Send + Sync {
        move |tx: &mut dyn StateTx| {
            let hot: u64 = super::super::tx_get(tx, "hot")?.unwrap_or(0);
            super::super::tx_put(tx, "hot", &(hot + 1))?;
            super::super::tx_put(tx, "hot", &(hot + 2))?;
            super::super::tx_put(tx, &format!("row/{key}"), &serde_json::json!({"held": 1}))?;
            Ok(Reply::ok(serde_json::json!({"taken": key})))
        }
    }

    /// The compensation of [`take_one`]: rewrites the row (or removes it).
    fn give_back(
        remove: bool,
    ) -> impl Fn(&mut dyn StateTx, &str, &serde_json::Value) -> super::super::TxResult<Reply> + Send + Sync
    {
        move |tx: &mut dyn StateTx, forward: &str, _: &serde_json::Value| {
            let hot: u64 = super::super::tx_get(tx, "hot")?.unwrap_or(0);
            super::super::tx_put(tx, "hot", &(hot - 2))?;
            let row = format!("row/{forward}");
            if remove {
                tx.remove(&row)?;
            } else {
                super::super::tx_put(tx, &row, &serde_json::json!({"held": 0}))?;
            }
            Ok(Reply::ok(serde_json::json!({"given_back": forward})))
        }
    }

    #[tokio::test]
    async fn a_reply_row_carries_the_replies_of_the_forward_and_its_compensation_in_the_effects_writes() {
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = 1_000 * HOUR;
        let (store, clock) = with_rows(dir.path(), 8 * HOUR, t0);
        let (reply, hit) = store
            .apply_forward("a/s/forward", &take_one("a/s/forward"))
            .await
            .expect("applies");
        assert_eq!(
            (reply.clone(), hit),
            (Reply::ok(serde_json::json!({"taken": "a/s/forward"})), false)
        );
        assert_eq!(
            store.writes(),
            2,
            "the counter (put twice, written once) and the row: no reply of its own"
        );
        assert_eq!(windows(&store), [(t0, t0 + HOUR, 0)], "no reply in a window");
        let row: serde_json::Value =
            serde_json::from_slice(&store.state.get("row/a/s/forward").expect("reads").expect("row"))
                .expect("json");
        assert_eq!(row, serde_json::json!({"v": 2, "data": {"held": 1}, "r": reply}));
        // The row's data reads as any value; repeats are answered from the row.
        assert_eq!(
            decode::<serde_json::Value>(b"row", &serde_json::to_vec(&row).expect("json")).expect("decodes"),
            serde_json::json!({"held": 1})
        );
        let again = store
            .apply_forward("a/s/forward", &|_| Ok(Reply::error("applied again")))
            .await
            .expect("a repeat");
        assert_eq!(again, (reply.clone(), true));
        assert_eq!(
            store.stored_reply("a/s/forward").await.expect("reads"),
            Some(reply.clone())
        );
        assert_eq!(store.writes(), 2, "a repeat writes nothing");
        // A refusal writes no row: its reply goes to a window, as a tombstone does.
        store
            .apply_forward("b/s/forward", &|_| Ok(Reply::rejected("no")))
            .await
            .expect("applies");
        store
            .apply_compensation("c/s/compensate", &give_back(false))
            .await
            .expect("tombstone");
        assert_eq!(store.writes(), 5);
        assert_eq!(windows(&store), [(t0, t0 + HOUR, 3)]);
        // The compensation rewrites the row: it carries both replies.
        let (undone, hit) = store
            .apply_compensation("a/s/compensate", &give_back(false))
            .await
            .expect("compensates");
        assert!(!hit);
        assert_eq!(store.writes(), 7, "the counter and the row");
        assert_eq!(windows(&store), [(t0, t0 + HOUR, 3)], "no window written");
        // Past every window, through a restart: the row still answers both keys.
        clock.store(t0 + 20 * HOUR, Ordering::SeqCst);
        store
            .apply_forward("d/s/forward", &|_| Ok(Reply::rejected("no")))
            .await
            .expect("applies");
        assert_eq!(store.prune(t0 + 20 * HOUR, 100).expect("prunes"), 3);
        drop(store);
        let (store, _) = with_rows(dir.path(), 8 * HOUR, t0 + 20 * HOUR);
        let fail = |_: &mut dyn StateTx, _: &str, _: &serde_json::Value| Ok(Reply::error("undone again"));
        assert_eq!(
            store
                .apply_compensation("a/s/compensate", &fail)
                .await
                .expect("a repeat"),
            (undone, true)
        );
        assert_eq!(
            store
                .apply_forward("a/s/forward", &|_| Ok(Reply::error("applied again")))
                .await
                .expect("a repeat"),
            (reply, true)
        );
        let hot: u64 =
            decode(b"hot", &store.state.get("hot").expect("reads").expect("hot")).expect("decodes");
        assert_eq!(hot, 0, "applied once, undone once");
    }

    #[tokio::test]
    async fn a_compensation_that_removes_its_reply_row_moves_the_forward_reply_to_a_window() {
        let dir = tempfile::tempdir().expect("tmp");
        let (store, _) = with_rows(dir.path(), 8 * HOUR, 1_000 * HOUR);
        let (reply, _) = store
            .apply_forward("a/s/forward", &take_one("a/s/forward"))
            .await
            .expect("applies");
        store
            .apply_compensation("a/s/compensate", &give_back(true))
            .await
            .expect("compensates");
        assert_eq!(
            store.writes(),
            2 + 4,
            "the counter, the removal, both replies in the window"
        );
        assert_eq!(windows(&store)[0].2, 2);
        assert_eq!(
            store
                .apply_forward("a/s/forward", &|_| Ok(Reply::error("applied again")))
                .await
                .expect("a repeat"),
            (reply, true)
        );
    }

    #[tokio::test]
    async fn replies_stored_in_windows_before_reply_rows_still_answer_and_rows_take_the_next_ones() {
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = 1_000 * HOUR;
        let reply = {
            // The layout before reply rows: the row written plain, the reply in a window.
            let (store, _) = clocked(dir.path(), 8 * HOUR, t0);
            let (reply, _) = store
                .apply_forward("a/s/forward", &take_one("a/s/forward"))
                .await
                .expect("applies");
            assert_eq!(store.writes(), 3, "counter, row, reply");
            reply
        };
        let (store, _) = with_rows(dir.path(), 8 * HOUR, t0 + 1);
        assert_eq!(
            store
                .apply_forward("a/s/forward", &|_| Ok(Reply::error("applied again")))
                .await
                .expect("a repeat"),
            (reply.clone(), true)
        );
        let (undone, _) = store
            .apply_compensation("a/s/compensate", &give_back(false))
            .await
            .expect("compensates");
        assert_eq!(
            store.writes(),
            2,
            "the counter and the row, which carries the compensation's reply"
        );
        let row: serde_json::Value =
            serde_json::from_slice(&store.state.get("row/a/s/forward").expect("reads").expect("row"))
                .expect("json");
        assert_eq!(row, serde_json::json!({"v": 2, "data": {"held": 0}, "u": undone}));
        let fail = |_: &mut dyn StateTx, _: &str, _: &serde_json::Value| Ok(Reply::error("undone again"));
        assert_eq!(
            store
                .apply_compensation("a/s/compensate", &fail)
                .await
                .expect("a repeat"),
            (undone, true)
        );
        assert_eq!(
            store.stored_reply("a/s/forward").await.expect("reads"),
            Some(reply),
            "still from its window"
        );
    }

    #[tokio::test]
    async fn a_compensation_key_is_required() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        let r = store.apply_compensation("s/step/forward", &|_, _, _| Ok(ok()));
        assert!(r.await.is_err());
        assert_eq!(store.stored_reply("s/step/forward").await.expect("reads"), None);
    }
}
