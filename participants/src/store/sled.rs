//! A participant's sled store: its business `state` tree and the `replies`
//! tree that makes commands idempotent (the reusable dedupe helper).
//!
//! It implements [`ParticipantStore`]: `apply_forward` and `apply_compensation` run an effect and
//! store its reply under the command's idempotency key in ONE sled
//! transaction, then flush, then return: a participant never replies before
//! both the effect and the stored reply are durable, and a repeated command
//! finds the stored reply and has no effect. Only `ok` and `rejected` replies
//! are stored; an `error` reply (transient) records nothing, so a retry may
//! succeed.
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
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
};

use futures::future::BoxFuture;
use saga_wire::{self as wire, Reply};
use serde::de::DeserializeOwned;
use sled::{
    transaction::{ConflictableTransactionError, TransactionError, TransactionalTree},
    Transactional,
};

use super::{
    decode, encode, now_ms, Change, Effect, ParticipantStore, Scanned, StateTx, StoreError, TxError, Undo,
    TOMBSTONE_REASON,
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
    tree.insert(key.as_bytes(), bytes)?;
    Ok(())
}

/// The state tree as an effect sees it ([`StateTx`]) inside a sled
/// transaction, counting its writes (`writes`: this run's, reset by the caller).
struct SledTx<'a> {
    tree: &'a TransactionalTree,
    writes: &'a Cell<u64>,
}

impl StateTx for SledTx<'_> {
    fn get(&mut self, key: &str) -> super::TxResult<Option<Vec<u8>>> {
        Ok(self.tree.get(key.as_bytes())?.map(|v| v.to_vec()))
    }
    fn put(&mut self, key: &str, bytes: Vec<u8>) -> super::TxResult<()> {
        self.tree.insert(key.as_bytes(), bytes)?;
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }
    fn remove(&mut self, key: &str) -> super::TxResult<()> {
        self.tree.remove(key.as_bytes())?;
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }
}

/// Runs an effect on the state tree, its errors as sled's.
fn run_tx<T>(
    state: &TransactionalTree,
    writes: &Cell<u64>,
    f: impl FnOnce(&mut dyn StateTx) -> super::TxResult<T>,
) -> SledTxResult<T> {
    f(&mut SledTx { tree: state, writes }).map_err(|e| match e {
        TxError::Abort(reason) => ConflictableTransactionError::Abort(reason),
        TxError::Sled(e) => e.into(),
        TxError::Fetch(key) => {
            ConflictableTransactionError::Abort(format!("{key}: not fetched (jetstream only)"))
        }
    })
}

/// The `replies` tree inside a transaction, with its index by the time a
/// reply was stored (`replies-by-time`: 8 bytes of big-endian ms since the
/// Unix epoch, then the reply's key; empty value), which pruning follows.
struct RepliesTx<'a> {
    replies: &'a TransactionalTree,
    by_time: &'a TransactionalTree,
    /// When this transaction stores its replies (read before it started:
    /// the closure stays pure when sled retries it).
    at_ms: u64,
    /// Writes of this run of the transaction (replies and state).
    writes: &'a Cell<u64>,
}

impl RepliesTx<'_> {
    fn get(&self, key: &str) -> SledTxResult<Option<Reply>> {
        tx_get(self.replies, key)
    }

    /// Stores `reply` under `key` (a key is stored once: callers look first)
    /// and indexes it under the transaction's time.
    fn put(&self, key: &str, reply: &Reply) -> SledTxResult<()> {
        tx_put(self.replies, key, reply)?;
        self.by_time
            .insert(time_key(self.at_ms, key.as_bytes()), &[][..])?;
        self.writes.set(self.writes.get() + 2);
        Ok(())
    }
}

/// The `replies-by-time` key of the reply `key` stored at `at_ms`.
fn time_key(at_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The participant's sled database: a `replies` tree, its
/// `replies-by-time` index and a `state` tree (plus a tiny `ready-probe`
/// tree, written only by readiness checks).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    replies: sled::Tree,
    by_time: sled::Tree,
    state: sled::Tree,
    probe: sled::Tree,
    flusher: std::sync::Arc<GroupFlush>,
    /// Inserts and removes committed since open (commands, seeding, pruning).
    writes: std::sync::Arc<AtomicU64>,
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
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task failed: {e}")))??;
        *flushed = target;
        Ok(())
    }
}

impl Store {
    /// Opens the trees in `db`. A database written before the
    /// `replies-by-time` index existed (replies, no index) gets its index
    /// here, in one atomic batch: each reply is indexed at its saga's start
    /// when the saga id is a UUID v7 started before now (what pruning went
    /// by until then), else at now, so it goes one retention after this
    /// upgrade (a future-dated or non-v7 id can no longer hold pruning up).
    ///
    /// # Errors
    /// sled errors.
    pub fn new(db: sled::Db) -> Result<Self, StoreError> {
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
        Ok(Store {
            replies,
            by_time,
            state: db.open_tree("state")?,
            probe: db.open_tree("ready-probe")?,
            flusher: std::sync::Arc::new(GroupFlush {
                db: db.clone(),
                committed: std::sync::atomic::AtomicU64::new(0),
                flushed: tokio::sync::Mutex::new(0),
            }),
            writes: std::sync::Arc::default(),
            db,
        })
    }

    /// The business state tree (read side, and tests that write behind a
    /// handler's back; commands write through a transaction).
    pub fn state(&self) -> &sled::Tree {
        &self.state
    }

    /// Runs a forward `effect` once per `key` (see [`ParticipantStore::apply_forward`]).
    async fn forward(&self, key: &str, effect: Effect<'_>) -> Result<(Reply, bool), StoreError> {
        self.apply(key, |state, replies| {
            if let Some(stored) = replies.get(key)? {
                return Ok((stored, true));
            }
            let reply = run_tx(state, replies.writes, |tx| effect(tx))?;
            if !matches!(reply, Reply::Error { .. }) {
                replies.put(key, &reply)?;
            }
            Ok((reply, false))
        })
        .await
    }

    /// Runs a compensation once per `key` (see [`ParticipantStore::apply_compensation`]).
    async fn compensation(&self, key: &str, undo: Undo<'_>) -> Result<(Reply, bool), StoreError> {
        let forward = wire::forward_key(key)
            .ok_or_else(|| StoreError::Corrupt(format!("`{key}` is not a compensation key")))?;
        self.apply(key, |state, replies| {
            if let Some(stored) = replies.get(key)? {
                return Ok((stored, true));
            }
            let reply = match replies.get(&forward)? {
                Some(Reply::Ok { data }) => run_tx(state, replies.writes, |tx| undo(tx, &forward, &data))?,
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
        let at_ms = now_ms();
        let writes = Cell::new(0);
        let result = (&self.state, &self.replies, &self.by_time).transaction(|(state, replies, by_time)| {
            writes.set(0);
            f(
                state,
                &RepliesTx {
                    replies,
                    by_time,
                    at_ms,
                    writes: &writes,
                },
            )
        });
        let (reply, hit) = match result {
            Ok(r) => r,
            Err(TransactionError::Abort(reason)) => {
                return Err(StoreError::Corrupt(format!("{key}: {reason}")))
            }
            Err(TransactionError::Storage(e)) => return Err(StoreError::Sled(e)),
        };
        self.writes.fetch_add(writes.get(), Ordering::Relaxed);
        // Write-ahead: the effect and its stored reply are durable before anyone
        // hears of them. Also on a hit: the stored reply may come from a
        // concurrent duplicate whose own flush has not finished yet.
        self.flusher.flush().await?;
        Ok((reply, hit))
    }

    /// The stored reply for `key`, made durable before it is returned, since
    /// a concurrent duplicate may have committed it without flushing yet.
    async fn stored(&self, key: &str) -> Result<Option<Reply>, StoreError> {
        let Some(bytes) = self.replies.get(key.as_bytes())? else {
            return Ok(None);
        };
        let reply = decode(key.as_bytes(), &bytes)?;
        self.flusher.flush().await?;
        Ok(Some(reply))
    }

    /// Runs `change` on the state tree in one transaction, then flushes.
    fn change(&self, change: Change<'_>) -> Result<(), StoreError> {
        let writes = Cell::new(0);
        self.state
            .transaction(|state| {
                writes.set(0);
                run_tx(state, &writes, |tx| change(tx))
            })
            .map_err(|e| match e {
                TransactionError::Abort(reason) => StoreError::Corrupt(reason),
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        self.writes.fetch_add(writes.get(), Ordering::Relaxed);
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
    /// `cutoff_ms` (ms since the Unix epoch, by this participant's clock),
    /// oldest first, at most `limit` of them; returns how many went. It
    /// follows the `replies-by-time` index, so no saga id, whatever it
    /// claims, decides when a reply goes. The replies go first, then their
    /// index entries: a crash between the two leaves index entries whose
    /// reply is gone (removed next time), never a reply without one.
    ///
    /// Safe once no command of those sagas can come again: the coordinator
    /// re-sends a command only while its saga runs, and refuses to retry a
    /// saga older than its `--command-horizon` (at most this retention); a
    /// reply is stored after its saga started, so it is kept at least that long.
    ///
    /// # Errors
    /// sled errors.
    pub fn prune(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let (mut replies, mut index) = (sled::Batch::default(), sled::Batch::default());
        let mut n = 0;
        for entry in self.by_time.iter().keys() {
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
            self.replies.apply_batch(replies)?;
            self.by_time.apply_batch(index)?;
            self.writes.fetch_add(2 * n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl ParticipantStore for Store {
    fn apply_forward<'a>(
        &'a self,
        key: &'a str,
        effect: Effect<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>> {
        Box::pin(self.forward(key, effect))
    }

    fn apply_compensation<'a>(
        &'a self,
        key: &'a str,
        undo: Undo<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>> {
        Box::pin(self.compensation(key, undo))
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
        let newer = br#"{"v":2,"data":{"outcome":"ok"}}"#;
        assert!(matches!(decode::<Reply>(b"k", newer), Err(StoreError::Corrupt(m)) if m.contains("version")));
        assert!(matches!(
            decode::<Reply>(b"k", b"{}"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn the_readiness_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        store.probe().expect("writable");
        store.probe().expect("writable again");
        assert!(store.probe.is_empty());
        assert!(store.replies.is_empty() && store.state.is_empty());
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
    async fn replies_are_pruned_by_the_time_they_were_stored_not_by_their_saga_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        let now = now_ms();
        // Ids claiming 1970, a day ahead (upper-case), and no time at all (v4).
        let ids = [
            v7_at(1_000_000),
            v7_at(now + 24 * HOUR).to_uppercase(),
            "6f0c3e8e-3b1a-4c5d-9e2f-0a1b2c3d4e5f".to_string(),
        ];
        for id in &ids {
            store
                .apply_forward(&format!("{id}/s/forward"), &|_| {
                    Ok(Reply::ok(serde_json::Value::Null))
                })
                .await
                .expect("applies");
            store
                .apply_compensation(&format!("{id}/t/compensate"), &|_, _, _| {
                    Ok(Reply::ok(serde_json::Value::Null))
                })
                .await
                .expect("tombstone");
        }
        assert_eq!(
            store.replies.len(),
            9,
            "3 forwards, 3 compensations, 3 tombstones"
        );
        assert_eq!(store.by_time.len(), 9, "each indexed");
        assert_eq!(
            store.prune(now - HOUR, 100).expect("prunes"),
            0,
            "all stored just now"
        );
        // Limited: one at a time, oldest first; then the rest; then nothing.
        assert_eq!(store.prune(now + HOUR, 1).expect("prunes"), 1);
        assert_eq!(store.prune(now + HOUR, 100).expect("prunes"), 8);
        assert_eq!(store.prune(now + HOUR, 100).expect("prunes"), 0);
        assert!(store.replies.is_empty() && store.by_time.is_empty());
    }

    #[tokio::test]
    async fn an_old_database_is_indexed_on_open_and_a_future_dated_id_does_not_stop_pruning() {
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
                let bytes = encode(&Reply::ok(serde_json::Value::Null)).expect("encodes");
                replies.insert(format!("{id}/s/forward"), bytes).expect("insert");
            }
            db.flush().expect("flush");
        }
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        assert_eq!(store.by_time.len(), 5, "every old reply indexed");
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
        assert_eq!(store.by_time.len(), 2);
        assert_eq!(store.prune(now + HOUR, 100).expect("prunes"), 2);
        assert!(store.replies.is_empty());
    }

    #[tokio::test]
    async fn writes_are_counted_once_per_committed_command_and_not_for_a_repeat() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        let effect = |tx: &mut dyn StateTx| {
            tx.put("thing", b"1".to_vec())?;
            Ok(Reply::ok(serde_json::Value::Null))
        };
        store
            .apply_forward("s/a/forward", &effect)
            .await
            .expect("applies");
        // The effect's row, the reply and its time index.
        assert_eq!(store.writes(), 3);
        store
            .apply_forward("s/a/forward", &effect)
            .await
            .expect("a repeat");
        assert_eq!(store.writes(), 3, "a repeat writes nothing");
        store
            .apply_forward("s/b/forward", &|_| Ok(Reply::error("later")))
            .await
            .expect("an error reply");
        assert_eq!(store.writes(), 3, "an error reply commits nothing");
    }

    #[tokio::test]
    async fn a_compensation_key_is_required() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(crate::open_db(dir.path()).expect("sled")).expect("store");
        let r = store.apply_compensation("s/step/forward", &|_, _, _| {
            Ok(Reply::ok(serde_json::Value::Null))
        });
        assert!(r.await.is_err());
        assert_eq!(store.stored_reply("s/step/forward").await.expect("reads"), None);
    }
}
