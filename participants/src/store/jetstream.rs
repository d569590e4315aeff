//! The `jetstream` store: a participant's idempotency records and business
//! state in replicated JetStream KV buckets, so several replicas of one
//! participant share them (one queue group, any replica answers any command).
//!
//! Buckets (replicas `--kv-replicas`, history 1, file storage), `<p>` the
//! participant's name:
//! - `PART_<p>_STATE`: the key `root` holds ONE document with the small,
//!   shared rows (the keys under the handler's root prefixes: the stock
//!   table, the payment totals, the shipment counters), a sequence number and
//!   `recent`, the commands committed in the last moments with their reply
//!   and the per-command entities they wrote; every other state key (a
//!   reservation, a ledger entry, a shipment: one per saga step) is a document
//!   of its own, `e.<key>`, `{"seq", "value"}`;
//! - `PART_<p>_REPLIES`: idempotency key → stored reply, with the bucket's
//!   `max_age` set to `--reply-retention` (JetStream removes a reply that
//!   long after it was stored: pruning by stored time, no pruner).
//!
//! **The write.** A command is decided by ONE revision-checked write of the
//! `root` document (`update(root, value, revision)`): the new rows, and
//! `recent[<idempotency key>] = {reply, entities, seq}` — the dedupe record,
//! the effect and the stored reply in one value. Before deciding, a replica
//! reads `root` (revision r) and then, for a key not in `recent`, the
//! `REPLIES` bucket and the entity documents the effect reads, through the
//! stream leader. After the write, the reply and the entities are copied
//! out ("materialised") to `REPLIES` and the entity documents (each only if
//! its stored `seq` is older, so a late copy never overwrites a newer one),
//! then the reply goes out. An entry leaves `recent` (in a later write of any
//! replica, a few seconds on) only after that replica has made sure it is
//! materialised.
//!
//! **Why exactly one effect.** Every decision is a compare-and-set of the
//! same register, `root`: two replicas deciding the same key from revision r
//! cannot both write r+1, the loser re-reads and finds the key in `recent`
//! (or, later, in `REPLIES`) and answers the stored reply. What a decision
//! reads besides `root` is read *after* `root`: anything that left `recent`
//! at or before revision r was materialised before it left, so it is seen;
//! anything that changes after r changes `root`, so the write at r fails.
//! Tombstones are the same write: a compensation that finds no reply for its
//! forward key puts the tombstone under that key in `recent`, so the forward
//! (on any replica) finds it and does nothing.
//!
//! **Contention.** A replica serialises its own writes (one in flight; the
//! others wait, so its own commands never conflict with each other); a write
//! refused for a wrong revision is retried, re-read, with jittered backoff,
//! at most [`MAX_ATTEMPTS`] times within [`MAX_CONTENTION`], then the command
//! is answered `error` (the coordinator retries it with the same key). A
//! write whose outcome is unknown (timeout) is an `error` too: its retry
//! finds the reply if it landed. Throughput is therefore bounded by one KV
//! round trip per command per participant (all replicas share one register):
//! replicas buy availability, not write throughput.
//!
//! It knows nothing of stock or money, and nothing of commands' subjects.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::{future::BoxFuture, StreamExt};
use rand::Rng;
use saga_wire::{self as wire, Reply};
use serde::{Deserialize, Serialize};

use super::{
    decode, encode, noted, now_ms, Change, Effect, ParticipantStore, Scanned, StateTx, StoreError, TxError,
    Undo, TOMBSTONE_REASON,
};

/// Most attempts of one contended write.
pub const MAX_ATTEMPTS: u32 = 20;
/// Longest time one command retries a contended write.
pub const MAX_CONTENTION: Duration = Duration::from_secs(2);
/// How long a committed command stays in `recent` before a write may drop it
/// (once materialised).
const KEEP_RECENT: Duration = Duration::from_secs(2);
/// Most `recent` entries one write drops (the rest go with later writes).
const DROP_PER_WRITE: usize = 64;
/// The key of the root document.
const ROOT: &str = "root";

/// The state bucket of `participant`.
pub fn state_bucket(participant: &str) -> String {
    format!("PART_{participant}_STATE")
}

/// The replies bucket of `participant`.
pub fn replies_bucket(participant: &str) -> String {
    format!("PART_{participant}_REPLIES")
}

/// A KV key for any text: as it is when KV allows it (one token of
/// `[-/_=a-zA-Z0-9]`), else hex, under distinct prefixes.
fn kv_key(kind: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'='));
    if plain {
        format!("{kind}.{key}")
    } else {
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{kind}x.{hex}")
    }
}

/// The text behind a [`kv_key`] of `kind`.
fn from_kv_key(kind: &str, kv: &str) -> Option<String> {
    if let Some(plain) = kv.strip_prefix(&format!("{kind}.")) {
        return Some(plain.to_string());
    }
    let hex = kv.strip_prefix(&format!("{kind}x."))?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A command committed in `root` and maybe not yet materialised.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recent {
    /// When it was committed (ms, the committer's clock).
    at: u64,
    /// The root's sequence number of the commit (orders entity versions).
    seq: u64,
    /// The stored reply.
    reply: Reply,
    /// Entity documents written: key → encoded value (`None`: removed).
    #[serde(default)]
    entities: BTreeMap<String, Option<String>>,
}

/// The root document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Root {
    seq: u64,
    /// Root rows: state key → encoded value.
    state: BTreeMap<String, String>,
    /// Commands committed lately, by idempotency key.
    recent: BTreeMap<String, Recent>,
}

impl Root {
    /// The latest pending value of each entity in `recent`.
    fn pending(&self) -> HashMap<String, (u64, Option<String>)> {
        let mut out: HashMap<String, (u64, Option<String>)> = HashMap::new();
        for r in self.recent.values() {
            for (k, v) in &r.entities {
                if out.get(k).is_none_or(|(seq, _)| *seq < r.seq) {
                    out.insert(k.clone(), (r.seq, v.clone()));
                }
            }
        }
        out
    }
}

/// An entity document.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entity {
    seq: u64,
    value: Option<String>,
}

/// The state as an effect sees it: root rows, pending and fetched entities,
/// its own writes; an entity not read yet is asked for ([`TxError::Fetch`]).
struct JsTx<'a> {
    root_prefixes: &'a [String],
    root: &'a Root,
    pending: &'a HashMap<String, (u64, Option<String>)>,
    fetched: &'a HashMap<String, Option<String>>,
    writes: BTreeMap<String, Option<String>>,
}

fn is_root(prefixes: &[String], key: &str) -> bool {
    prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

impl StateTx for JsTx<'_> {
    fn get(&mut self, key: &str) -> super::TxResult<Option<Vec<u8>>> {
        let text = if let Some(w) = self.writes.get(key) {
            w.clone()
        } else if is_root(self.root_prefixes, key) {
            self.root.state.get(key).cloned()
        } else if let Some((_, v)) = self.pending.get(key) {
            v.clone()
        } else if let Some(v) = self.fetched.get(key) {
            v.clone()
        } else {
            return Err(TxError::Fetch(key.to_string()));
        };
        Ok(text.map(String::into_bytes))
    }

    fn put(&mut self, key: &str, bytes: Vec<u8>) -> super::TxResult<()> {
        let text = String::from_utf8(bytes).map_err(|e| TxError::Abort(format!("{key}: {e}")))?;
        self.writes.insert(key.to_string(), Some(text));
        Ok(())
    }

    fn remove(&mut self, key: &str) -> super::TxResult<()> {
        self.writes.insert(key.to_string(), None);
        Ok(())
    }
}

fn js_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::JetStream(format!("{what}: {e}"))
}

/// The latest value of `key` and its revision, read through the stream's
/// leader (a direct get may be answered by a replica that has not applied
/// the latest write; the argument in the module docs needs the latest).
async fn leader_get(store: &kv::Store, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
    let m = saga_nats::leader_get(store, key)
        .await
        .map_err(|e| js_err("get", e))?;
    Ok(m.map(|m| (m.payload, m.sequence)))
}

/// How a command is decided.
enum Mode<'a> {
    Forward(Effect<'a>),
    Compensate { forward: String, undo: Undo<'a> },
}

/// What one attempt decided.
enum Decided {
    /// The key was seen: its stored reply.
    Hit(Reply),
    /// Nothing to store (an `error` reply).
    Transient(Reply),
    /// Write these, store these replies (the command's first).
    Commit {
        writes: BTreeMap<String, Option<String>>,
        replies: Vec<(String, Reply)>,
    },
}

/// The `jetstream` store of one participant. Cheap to share (behind an `Arc`).
pub struct JsStore {
    state: kv::Store,
    replies: kv::Store,
    root_prefixes: Vec<String>,
    /// One write of `root` at a time from this replica, with the root it
    /// last wrote or read (`None`: read it again).
    writer: tokio::sync::Mutex<Option<(Root, u64)>>,
    /// KV writes acknowledged since open.
    writes: std::sync::atomic::AtomicU64,
}

impl JsStore {
    /// Opens (creating when absent) the buckets of `participant`; state keys
    /// under `root_prefixes` live in the root document.
    ///
    /// # Errors
    /// JetStream refused or did not answer.
    pub async fn open(
        client: &async_nats::Client,
        participant: &str,
        replicas: usize,
        retention: Duration,
        root_prefixes: &[String],
    ) -> Result<Self, StoreError> {
        let js = jetstream::new(client.clone());
        let bucket = |name: String, max_age: Duration| kv::Config {
            bucket: name,
            history: 1,
            max_age,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let open = |config: kv::Config| {
            let js = js.clone();
            async move {
                let name = config.bucket.clone();
                match js.get_key_value(&name).await {
                    Ok(store) => Ok(store),
                    Err(_) => match js.create_key_value(config).await {
                        Ok(store) => Ok(store),
                        // Another replica created it meanwhile.
                        Err(_) => js
                            .get_key_value(&name)
                            .await
                            .map_err(|e| js_err(&format!("open bucket {name}"), e)),
                    },
                }
            }
        };
        let state = open(bucket(state_bucket(participant), Duration::ZERO)).await?;
        let replies = open(bucket(replies_bucket(participant), retention)).await?;
        let empty = encode(&Root::default())?;
        match state.create(ROOT, empty.into()).await {
            Ok(_) => {}
            Err(e) if saga_nats::is_already_exists(&e) => {}
            Err(e) => return Err(js_err("create root", e)),
        }
        Ok(JsStore {
            state,
            replies,
            root_prefixes: root_prefixes.to_vec(),
            writer: tokio::sync::Mutex::new(None),
            writes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Counts one acknowledged KV write.
    fn wrote(&self) {
        self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn read_root(&self) -> Result<(Root, u64), StoreError> {
        match leader_get(&self.state, ROOT).await? {
            Some((bytes, rev)) => Ok((decode(ROOT.as_bytes(), &bytes)?, rev)),
            None => Err(StoreError::Corrupt(format!("{} has no root", self.state.name))),
        }
    }

    /// The reply stored in `REPLIES` for `key`.
    async fn stored_out(&self, key: &str) -> Result<Option<Reply>, StoreError> {
        match leader_get(&self.replies, &kv_key("k", key)).await? {
            Some((bytes, _)) => decode(key.as_bytes(), &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// The entity document `key`: its seq and value, and its revision.
    async fn entity(&self, key: &str) -> Result<Option<(Entity, u64)>, StoreError> {
        match leader_get(&self.state, &kv_key("e", key)).await? {
            Some((bytes, rev)) => Ok(Some((decode(key.as_bytes(), &bytes)?, rev))),
            None => Ok(None),
        }
    }

    /// The reply of `key` as of `root` (read before this call).
    async fn lookup(&self, root: &Root, key: &str) -> Result<Option<Reply>, StoreError> {
        if let Some(r) = root.recent.get(key) {
            return Ok(Some(r.reply.clone()));
        }
        self.stored_out(key).await
    }

    /// Copies a committed command out of `recent`: its reply to `REPLIES`,
    /// its entities to their documents (unless a newer version is there).
    async fn materialise(&self, key: &str, recent: &Recent) -> Result<(), StoreError> {
        let bytes = encode(&recent.reply)?;
        match self.replies.create(kv_key("k", key), bytes.into()).await {
            Ok(_) => self.wrote(),
            Err(e) if saga_nats::is_already_exists(&e) => {}
            Err(e) => return Err(js_err("store reply", e)),
        }
        for (ekey, value) in &recent.entities {
            let doc = encode(&Entity {
                seq: recent.seq,
                value: value.clone(),
            })?;
            let kvk = kv_key("e", ekey);
            let mut attempts = 0;
            loop {
                attempts += 1;
                let written = match self.entity(ekey).await? {
                    Some((e, _)) if e.seq >= recent.seq => break,
                    Some((_, rev)) => self
                        .state
                        .update(&kvk, doc.clone().into(), rev)
                        .await
                        .map(|_| ())
                        .map_err(|e| js_err("write entity", e)),
                    None => self
                        .state
                        .create(&kvk, doc.clone().into())
                        .await
                        .map(|_| ())
                        .map_err(|e| js_err("write entity", e)),
                };
                match written {
                    Ok(()) => {
                        self.wrote();
                        break;
                    }
                    Err(e) if attempts >= MAX_ATTEMPTS => return Err(e),
                    Err(_) => continue,
                }
            }
        }
        Ok(())
    }

    /// Decides `key` (see the module docs) and returns `(reply, hit)`.
    async fn apply(&self, key: &str, mode: Mode<'_>) -> Result<(Reply, bool), StoreError> {
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut writer = self.writer.lock().await;
        loop {
            attempt += 1;
            let (root, rev, cached) = match writer.take() {
                Some((root, rev)) => (root, rev, true),
                None => {
                    let (root, rev) = self.read_root().await?;
                    (root, rev, false)
                }
            };
            let decided = self.decide(&root, key, &mode).await;
            // The root this replica cached may be older than what another
            // replica committed since, while the entities and stored replies
            // the decision read are fresh: an effect can then see a
            // reservation without the stock it holds and refuse it. A commit
            // decided on a stale root is caught by the compare-and-set below;
            // an error or an `error` reply is not, so it is decided again on
            // a fresh root before it is answered.
            if cached && matches!(decided, Err(_) | Ok(Decided::Transient(_))) {
                continue;
            }
            let decided = match decided {
                Ok(d) => d,
                Err(e) => {
                    *writer = Some((root, rev));
                    return Err(e);
                }
            };
            let (writes, replies) = match decided {
                Decided::Hit(reply) => {
                    *writer = Some((root, rev));
                    return Ok((reply, true));
                }
                Decided::Transient(reply) => {
                    *writer = Some((root, rev));
                    return Ok((reply, false));
                }
                Decided::Commit { writes, replies } => (writes, replies),
            };
            // Drop the entries old enough, once materialised.
            let now = now_ms();
            let keep = u64::try_from(KEEP_RECENT.as_millis()).unwrap_or(u64::MAX);
            let old: Vec<(String, Recent)> = root
                .recent
                .iter()
                .filter(|(_, r)| r.at.saturating_add(keep) < now)
                .take(DROP_PER_WRITE)
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect();
            let copied = futures::future::join_all(old.iter().map(|(k, r)| self.materialise(k, r))).await;
            let mut next = root.clone();
            for ((k, _), ok) in old.iter().zip(copied) {
                if ok.is_ok() {
                    next.recent.remove(k);
                }
            }
            next.seq += 1;
            let mut entities = BTreeMap::new();
            for (k, v) in writes {
                if is_root(&self.root_prefixes, &k) {
                    match v {
                        Some(v) => next.state.insert(k, v),
                        None => next.state.remove(&k),
                    };
                } else {
                    entities.insert(k, v);
                }
            }
            let mut mine = Vec::new();
            for (i, (k, reply)) in replies.into_iter().enumerate() {
                let recent = Recent {
                    at: now,
                    seq: next.seq,
                    reply,
                    // The command's own entry carries the entities.
                    entities: if i == 0 {
                        std::mem::take(&mut entities)
                    } else {
                        BTreeMap::new()
                    },
                };
                next.recent.insert(k.clone(), recent.clone());
                mine.push((k, recent));
            }
            let bytes = encode(&next)?;
            match self.state.update(ROOT, bytes.into(), rev).await {
                Ok(new_rev) => {
                    self.wrote();
                    *writer = Some((next, new_rev));
                    drop(writer);
                    // Best effort: what fails here is done by a later write.
                    for (k, r) in &mine {
                        if let Err(e) = self.materialise(k, r).await {
                            tracing::warn!(error = %e, key = %k, "materialising a committed reply failed; a later write does it");
                        }
                    }
                    let reply = mine.into_iter().next().map(|(_, r)| r.reply);
                    return reply
                        .map(|r| (r, false))
                        .ok_or_else(|| StoreError::Corrupt("a commit without its reply".into()));
                }
                Err(e) if saga_nats::is_wrong_revision(&e) => {
                    if attempt >= MAX_ATTEMPTS || started.elapsed() >= MAX_CONTENTION {
                        return Err(StoreError::Contended(format!(
                            "{key}: {attempt} attempts in {:?}",
                            started.elapsed()
                        )));
                    }
                    let cap = 2u64.saturating_pow(attempt).min(50);
                    let pause = rand::rng().random_range(0..=cap);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(e) => return Err(js_err("write root", e)),
            }
        }
    }

    /// One decision against `root` (read just before): the stored reply, or
    /// the writes and replies to commit.
    async fn decide(&self, root: &Root, key: &str, mode: &Mode<'_>) -> Result<Decided, StoreError> {
        if let Some(stored) = self.lookup(root, key).await? {
            return Ok(Decided::Hit(stored));
        }
        let pending = root.pending();
        let mut fetched: HashMap<String, Option<String>> = HashMap::new();
        loop {
            let mut tx = JsTx {
                root_prefixes: &self.root_prefixes,
                root,
                pending: &pending,
                fetched: &fetched,
                writes: BTreeMap::new(),
            };
            let ran = match mode {
                Mode::Forward(effect) => effect(&mut tx).map(|r| (r, None)),
                Mode::Compensate { forward, undo } => match self.lookup(root, forward).await? {
                    Some(Reply::Ok { data }) => undo(&mut tx, forward, &data).map(|r| (r, None)),
                    Some(Reply::Rejected { reason }) => Ok((
                        Reply::ok(
                            serde_json::json!({"undone": false, "forward": format!("rejected: {reason}")}),
                        ),
                        None,
                    )),
                    Some(Reply::Error { .. }) | None => Ok((
                        Reply::ok(
                            serde_json::json!({"undone": false, "forward": "never seen; tombstone recorded"}),
                        ),
                        Some((forward.clone(), Reply::rejected(TOMBSTONE_REASON))),
                    )),
                },
            };
            match ran {
                Ok((reply @ Reply::Error { .. }, _)) => return Ok(Decided::Transient(reply)),
                Ok((reply, tombstone)) => {
                    let mut replies = vec![(key.to_string(), reply)];
                    replies.extend(tombstone);
                    return Ok(Decided::Commit {
                        writes: tx.writes,
                        replies,
                    });
                }
                Err(TxError::Fetch(k)) => {
                    if fetched.contains_key(&k) {
                        return Err(StoreError::Corrupt(format!("{k}: fetched twice")));
                    }
                    let value = self.entity(&k).await?.and_then(|(e, _)| e.value);
                    fetched.insert(k, value);
                }
                Err(TxError::Abort(reason)) => return Err(StoreError::Corrupt(format!("{key}: {reason}"))),
                Err(TxError::Sled(e)) => return Err(StoreError::Corrupt(format!("{key}: {e}"))),
            }
        }
    }

    async fn change(&self, change: Change<'_>) -> Result<(), StoreError> {
        let mut writer = self.writer.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let (root, rev) = match writer.take() {
                Some(cached) => cached,
                None => self.read_root().await?,
            };
            let (pending, fetched) = (HashMap::new(), HashMap::new());
            let mut tx = JsTx {
                root_prefixes: &self.root_prefixes,
                root: &root,
                pending: &pending,
                fetched: &fetched,
                writes: BTreeMap::new(),
            };
            match change(&mut tx) {
                Ok(()) => {}
                Err(TxError::Fetch(k)) => {
                    return Err(StoreError::Corrupt(format!(
                        "{k}: a set-up change writes root rows only"
                    )))
                }
                Err(e) => return Err(StoreError::Corrupt(format!("{e:?}"))),
            }
            let mut next = root.clone();
            for (k, v) in tx.writes {
                if !is_root(&self.root_prefixes, &k) {
                    return Err(StoreError::Corrupt(format!(
                        "{k}: a set-up change writes root rows only"
                    )));
                }
                match v {
                    Some(v) => next.state.insert(k, v),
                    None => next.state.remove(&k),
                };
            }
            match self.state.update(ROOT, encode(&next)?.into(), rev).await {
                Ok(new_rev) => {
                    self.wrote();
                    *writer = Some((next, new_rev));
                    return Ok(());
                }
                Err(e) if saga_nats::is_wrong_revision(&e) => continue,
                Err(e) => return Err(js_err("write root", e)),
            }
        }
        Err(StoreError::Contended("set-up change".into()))
    }

    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (root, _) = self.read_root().await?;
        if is_root(&self.root_prefixes, key) {
            return Ok(root.state.get(key).map(|v| v.clone().into_bytes()));
        }
        if let Some((_, v)) = root.pending().remove(key) {
            return Ok(v.map(String::into_bytes));
        }
        Ok(self
            .entity(key)
            .await?
            .and_then(|(e, _)| e.value)
            .map(String::into_bytes))
    }

    async fn scan_keys(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Scanned, StoreError> {
        let (root, _) = self.read_root().await?;
        let after_key = after.map(|a| format!("{prefix}{a}"));
        let beyond = |k: &str| k.starts_with(prefix) && after_key.as_deref().is_none_or(|a| k > a);
        let skip = prefix.len();
        if is_root(&self.root_prefixes, prefix) {
            return Ok(root
                .state
                .iter()
                .filter(|(k, _)| beyond(k))
                .take(limit)
                .map(|(k, v)| (k[skip..].to_string(), v.clone().into_bytes()))
                .collect());
        }
        // Entities: a keys listing of the bucket (bounded by the bucket, as
        // the sled scan is by the tree), and those still only in `recent`.
        let pending = root.pending();
        let mut keys: BTreeSet<String> = pending.keys().filter(|k| beyond(k)).cloned().collect();
        let mut listing = self.state.keys().await.map_err(|e| js_err("keys", e))?;
        while let Some(k) = listing.next().await {
            let k = k.map_err(|e| js_err("keys", e))?;
            if let Some(key) = from_kv_key("e", &k) {
                if beyond(&key) {
                    keys.insert(key);
                }
            }
        }
        let mut out = Vec::new();
        for key in keys {
            if out.len() >= limit {
                break;
            }
            let value = match pending.get(&key) {
                Some((_, v)) => v.clone(),
                None => self.entity(&key).await?.and_then(|(e, _)| e.value),
            };
            if let Some(v) = value {
                out.push((key[skip..].to_string(), v.into_bytes()));
            }
        }
        Ok(out)
    }

    async fn stored(&self, key: &str) -> Result<Option<Reply>, StoreError> {
        if let Some(r) = self.stored_out(key).await? {
            return Ok(Some(r));
        }
        let (root, _) = self.read_root().await?;
        Ok(root.recent.get(key).map(|r| r.reply.clone()))
    }
}

impl ParticipantStore for JsStore {
    fn apply_forward<'a>(
        &'a self,
        key: &'a str,
        effect: Effect<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>> {
        Box::pin(noted(self.apply(key, Mode::Forward(effect))))
    }

    fn apply_compensation<'a>(
        &'a self,
        key: &'a str,
        undo: Undo<'a>,
    ) -> BoxFuture<'a, Result<(Reply, bool), StoreError>> {
        Box::pin(noted(async move {
            let forward = wire::forward_key(key)
                .ok_or_else(|| StoreError::Corrupt(format!("`{key}` is not a compensation key")))?;
            self.apply(key, Mode::Compensate { forward, undo }).await
        }))
    }

    fn stored_reply<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Reply>, StoreError>> {
        Box::pin(self.stored(key))
    }

    fn update_state<'a>(&'a self, change: Change<'a>) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.change(change))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(self.read(key))
    }

    fn scan<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Scanned, StoreError>> {
        Box::pin(self.scan_keys(prefix, after, limit))
    }

    fn probe_writable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.state
                .status()
                .await
                .map(|_| ())
                .map_err(|e| js_err("bucket status", e))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Every write was acknowledged by JetStream before it returned.
        Box::pin(async { Ok(()) })
    }

    fn prune_replies(&self, _cutoff_ms: u64, _limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        // The replies bucket's `max_age` removes them.
        Box::pin(async { Ok(0) })
    }

    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_text_makes_a_kv_key_and_back() {
        for key in [
            "0190b8a4-0000-7000-8000-0000000000aa/reserve-inventory/forward",
            "reservation/s1/reserve-inventory/forward",
            "A.1 ü*>",
        ] {
            let kv = kv_key("e", key);
            assert!(kv.starts_with('e'), "{kv}");
            assert!(
                !kv.contains(' ') && !kv.contains('*') && kv.matches('.').count() == 1,
                "{kv}"
            );
            assert_eq!(from_kv_key("e", &kv).as_deref(), Some(key));
        }
        assert_eq!(from_kv_key("e", "k.x"), None);
    }
}
