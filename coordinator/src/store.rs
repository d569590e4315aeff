//! The coordinator's durable state, in sled. Everything sled-specific lives here.
//!
//! Trees:
//! - `sagas`: saga id (16 UUID bytes; v7, so key order is creation order) →
//!   `{"v":1,"saga":{…}}` (the record, with its definition snapshot);
//! - `history`: saga id ++ seq (u64 BE) → one [`HistoryEntry`] (`{"v":1,…}`);
//! - `by_state`: state tag (1 byte) ++ saga id → `[]`, the state index;
//! - `outbox`: saga id ++ step (u32 BE) ++ kind (1 byte) → the command to send
//!   (`{"v":1,…}`), removed when its outcome is recorded;
//! - `idempotency`: client `CreateOrder` key → saga id;
//! - `dead_letters`: saga id ++ seq → [`DeadLetter`], one per entry into FAILED (kept);
//! - `dlq_outbox`: the same keys, for dead letters not yet published on `saga.dlq`.
//!
//! [`Store::write`] applies one transition in ONE sled transaction (record,
//! history, index, outbox, idempotency key together or not at all); it does
//! not flush. The caller groups many writes and then calls [`Store::flush`]
//! once (group commit) and sends no command before that flush returns.
//!
//! Durability: sled 0.34's `flush` writes its log and syncs it with
//! `sync_file_range(2)` (data pages, not file metadata, and not a full
//! `fsync`). On ext4/xfs with a preallocated log that survives a process
//! crash (kill -9) completely, and a power loss in practice; it is not the
//! guarantee of `fsync` on every file system. This module must not send
//! anything or decide anything: it stores what the engine decided.

use std::path::Path;

use saga_proto::wire::CommandKind;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::{transaction::ConflictableTransactionError, Transactional};
use uuid::Uuid;

use crate::{
    definition::RetryPolicy,
    engine::{Command, HistoryEntry, Saga, StateTag, Transition},
};

/// Format version of every stored value.
const FORMAT: u32 = 1;

/// A failure of the coordinator's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or internal error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value cannot be decoded: the data is corrupt or from an unknown version.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A command waiting in the outbox: exactly what is sent on NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Saga the command belongs to.
    pub saga_id: String,
    /// Step index.
    pub step: usize,
    /// Forward or compensate.
    pub kind: CommandKind,
    /// NATS subject.
    pub subject: String,
    /// Per-attempt request timeout.
    pub timeout_ms: u64,
    /// Backoff policy of the step.
    pub retry: RetryPolicy,
    /// Correlation id for headers and logs.
    pub correlation_id: String,
    /// The envelope.
    pub message: saga_proto::wire::Command,
}

impl OutboxEntry {
    /// The outbox entry of `command` for `saga`.
    pub fn new(saga: &Saga, command: &Command) -> Self {
        OutboxEntry {
            saga_id: saga.id.clone(),
            step: command.step,
            kind: command.kind,
            subject: command.subject.clone(),
            timeout_ms: command.timeout_ms,
            retry: command.retry,
            correlation_id: saga.correlation_id.clone(),
            message: command.message.clone(),
        }
    }
}

/// The record of a saga that entered FAILED: an operator must act
/// (`RetrySaga`). Published on `saga.dlq` as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The failed saga.
    pub saga_id: String,
    /// `name@version`.
    pub definition: String,
    /// Correlation id of the saga.
    pub correlation_id: String,
    /// Step whose compensation failed.
    pub step: String,
    /// Why.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub failed_at_ms: u64,
    /// The order.
    pub order: saga_proto::wire::OrderPayload,
}

impl DeadLetter {
    fn of(saga: &Saga) -> Option<Self> {
        let crate::engine::SagaState::Failed { step } = saga.state else {
            return None;
        };
        Some(DeadLetter {
            saga_id: saga.id.clone(),
            definition: saga.definition.id(),
            correlation_id: saga.correlation_id.clone(),
            step: saga
                .definition
                .steps
                .get(step)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            reason: saga.reason.clone().unwrap_or_default(),
            failed_at_ms: saga.updated_at_ms,
            order: saga.order.clone(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    v: u32,
    #[serde(flatten)]
    value: T,
}

#[derive(Debug, Serialize, Deserialize)]
struct SagaRecord {
    saga: Saga,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Versioned { v: FORMAT, value })
        .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    let v: Versioned<T> =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?;
    if v.v != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "{what}: unsupported format version {}",
            v.v
        )));
    }
    Ok(v.value)
}

fn saga_key(id: &str) -> Result<[u8; 16], StoreError> {
    Uuid::parse_str(id)
        .map(|u| *u.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("saga id {id:?} is not a UUID: {e}")))
}

fn state_key(tag: StateTag, id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag as u8);
    k.extend_from_slice(id);
    k
}

fn history_key(id: &[u8; 16], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn outbox_key(id: &[u8; 16], step: usize, kind: CommandKind) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.extend_from_slice(id);
    k.extend_from_slice(&u32::try_from(step).unwrap_or(u32::MAX).to_be_bytes());
    k.push(match kind {
        CommandKind::Forward => 0,
        CommandKind::Compensate => 1,
    });
    k
}

/// The coordinator's sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    sagas: sled::Tree,
    history: sled::Tree,
    by_state: sled::Tree,
    outbox: sled::Tree,
    idempotency: sled::Tree,
    dead_letters: sled::Tree,
    dlq_outbox: sled::Tree,
    meta: sled::Tree,
}

/// One page of [`Store::list`].
#[derive(Debug)]
pub struct Page {
    /// Sagas, oldest first.
    pub sagas: Vec<Saga>,
    /// Last id of the page when more may follow.
    pub next: Option<Uuid>,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// # Errors
    /// sled cannot open the directory (missing permissions, another process holds it).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Store {
            sagas: db.open_tree("sagas")?,
            history: db.open_tree("history")?,
            by_state: db.open_tree("by_state")?,
            outbox: db.open_tree("outbox")?,
            idempotency: db.open_tree("idempotency")?,
            dead_letters: db.open_tree("dead_letters")?,
            dlq_outbox: db.open_tree("dlq_outbox")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Writes one transition atomically: the saga record, its new history
    /// entries, the state index (moving from `previous` when it changed), the
    /// settled command's outbox entry removed and the new commands added, and
    /// the client idempotency key of a new saga. Not flushed: see [`Store::flush`].
    ///
    /// # Errors
    /// sled errors; an unencodable value.
    pub fn write(&self, t: &Transition, previous: Option<StateTag>) -> Result<(), StoreError> {
        let saga = &t.saga;
        let id = saga_key(&saga.id)?;
        let record = encode(&SagaRecord { saga: saga.clone() })?;
        let history = t
            .history
            .iter()
            .map(|h| Ok((history_key(&id, h.seq), encode(h)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let commands = t
            .commands
            .iter()
            .map(|c| {
                Ok((
                    outbox_key(&id, c.step, c.kind),
                    encode(&OutboxEntry::new(saga, c))?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let settled = t.settled.map(|(step, kind)| outbox_key(&id, step, kind));
        let new_tag = saga.state.tag();
        let idem = if previous.is_none() {
            saga.idempotency_key.as_deref()
        } else {
            None
        };
        let dead_letter = match DeadLetter::of(saga) {
            Some(d) if previous != Some(StateTag::Failed) => Some((history_key(&id, saga.seq), encode(&d)?)),
            _ => None,
        };
        (
            &self.sagas,
            &self.history,
            &self.by_state,
            &self.outbox,
            &self.idempotency,
            &self.dead_letters,
            &self.dlq_outbox,
        )
            .transaction(
                |(sagas, hist, by_state, outbox, idempotency, dead_letters, dlq_outbox)| {
                    sagas.insert(&id[..], record.as_slice())?;
                    for (k, v) in &history {
                        hist.insert(k.as_slice(), v.as_slice())?;
                    }
                    if previous != Some(new_tag) {
                        if let Some(prev) = previous {
                            by_state.remove(state_key(prev, &id))?;
                        }
                        by_state.insert(state_key(new_tag, &id), &[][..])?;
                    }
                    if let Some(k) = &settled {
                        outbox.remove(k.as_slice())?;
                    }
                    for (k, v) in &commands {
                        outbox.insert(k.as_slice(), v.as_slice())?;
                    }
                    if let Some(key) = idem {
                        idempotency.insert(key.as_bytes(), &id[..])?;
                    }
                    if let Some((k, v)) = &dead_letter {
                        dead_letters.insert(k.as_slice(), v.as_slice())?;
                        dlq_outbox.insert(k.as_slice(), v.as_slice())?;
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                },
            )
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => {
                    StoreError::Corrupt("transaction aborted".into())
                }
            })
    }

    /// Makes every write so far durable (one sync for all of them).
    ///
    /// # Errors
    /// sled could not write or sync its log.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// The saga `id`, if stored.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub fn get(&self, id: &Uuid) -> Result<Option<Saga>, StoreError> {
        match self.sagas.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode::<SagaRecord>(&bytes, "saga record")?.saga)),
            None => Ok(None),
        }
    }

    /// The saga's history, in order.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn history(&self, id: &Uuid) -> Result<Vec<HistoryEntry>, StoreError> {
        self.history
            .scan_prefix(id.as_bytes())
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
    pub fn saga_for_key(&self, key: &str) -> Result<Option<Uuid>, StoreError> {
        match self.idempotency.get(key.as_bytes())? {
            Some(bytes) => Uuid::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("idempotency index: {e}"))),
            None => Ok(None),
        }
    }

    /// Up to `limit` sagas after `after` (exclusive), oldest first, only those
    /// in `state` when given.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub fn list(
        &self,
        state: Option<StateTag>,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut ids: Vec<Uuid> = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        match state {
            Some(tag) => {
                let start = match after {
                    Some(a) => {
                        let mut k = state_key(tag, a.as_bytes());
                        k.push(0); // first key strictly after `a`
                        k
                    }
                    None => vec![tag as u8],
                };
                for kv in self.by_state.range(start..) {
                    let (k, _) = kv?;
                    if k.first() != Some(&(tag as u8)) {
                        break;
                    }
                    if ids.len() == limit {
                        more = true;
                        break;
                    }
                    let id = Uuid::from_slice(&k[1..])
                        .map_err(|e| StoreError::Corrupt(format!("state index: {e}")))?;
                    ids.push(id);
                }
            }
            None => {
                let iter = match after {
                    Some(a) => {
                        let mut k = a.as_bytes().to_vec();
                        k.push(0);
                        self.sagas.range(k..)
                    }
                    None => self.sagas.iter(),
                };
                for kv in iter {
                    let (k, _) = kv?;
                    if ids.len() == limit {
                        more = true;
                        break;
                    }
                    ids.push(
                        Uuid::from_slice(&k).map_err(|e| StoreError::Corrupt(format!("saga key: {e}")))?,
                    );
                }
            }
        }
        let next = if more { ids.last().copied() } else { None };
        let mut sagas = Vec::with_capacity(ids.len());
        for id in &ids {
            // A saga can move out of the index between the scan and the read; skip it then.
            if let Some(s) = self.get(id)? {
                sagas.push(s);
            }
        }
        Ok(Page { sagas, next })
    }

    /// Every saga not in a terminal state, oldest first.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub fn active(&self) -> Result<Vec<Saga>, StoreError> {
        let mut out = Vec::new();
        for tag in [StateTag::Pending, StateTag::Running, StateTag::Compensating] {
            let mut after = None;
            loop {
                let page = self.list(Some(tag), after, 1024)?;
                out.extend(page.sagas);
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    /// Every command in the outbox (sent or not yet acknowledged).
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.outbox
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                decode(&v, "outbox entry")
            })
            .collect()
    }

    /// Dead letters not yet published, with their keys.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn dlq_pending(&self) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
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
    pub fn dlq_published(&self, key: &[u8]) -> Result<(), StoreError> {
        self.dlq_outbox.remove(key)?;
        Ok(())
    }

    /// Every dead letter of `id`, oldest first.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub fn dead_letters(&self, id: &Uuid) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters
            .scan_prefix(id.as_bytes())
            .map(|kv| {
                let (_, v) = kv?;
                decode(&v, "dead letter")
            })
            .collect()
    }

    /// Whether the database accepts a write (readiness probe; not flushed).
    ///
    /// # Errors
    /// sled refused the write.
    pub fn probe_writable(&self) -> Result<(), StoreError> {
        self.meta.insert(b"ready-probe", &b"1"[..])?;
        Ok(())
    }

    /// Number of sagas per state (for logs at start-up and for tests).
    ///
    /// # Errors
    /// sled errors.
    pub fn count_by_state(&self) -> Result<Vec<(StateTag, usize)>, StoreError> {
        let mut out = Vec::new();
        for tag in StateTag::ALL {
            let mut n = 0;
            for kv in self.by_state.scan_prefix([tag as u8]) {
                kv?;
                n += 1;
            }
            out.push((tag, n));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use saga_proto::wire::{Item, OrderPayload};

    use super::*;
    use crate::{
        definition::{SagaDefinition, StepDefinition},
        engine::{self, Event, Outcome},
    };

    fn def() -> SagaDefinition {
        let step = |n: &str, p: &str, a: &str, c: &str| StepDefinition {
            name: n.into(),
            participant: p.into(),
            action: a.into(),
            compensation: Some(c.into()),
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        };
        SagaDefinition {
            name: "order".into(),
            version: 1,
            steps: vec![
                step("reserve-inventory", "inventory", "reserve", "release"),
                step("charge-payment", "payment", "charge", "refund"),
            ],
            input_schema: None,
            source: PathBuf::new(),
        }
    }

    fn new_saga(key: Option<&str>) -> Transition {
        let order = OrderPayload {
            order_id: "o".into(),
            customer_id: "c".into(),
            items: vec![Item {
                sku: "A".into(),
                quantity: 1,
            }],
            amount_cents: 5,
            currency: "EUR".into(),
        };
        engine::create(
            Uuid::now_v7().to_string(),
            def(),
            order,
            "corr".into(),
            key.map(Into::into),
            1,
        )
    }

    #[tokio::test]
    async fn transitions_round_trip_with_index_history_and_outbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let created = new_saga(Some("client-key"));
        store.write(&created, None).expect("write created");
        let started = engine::transition(&created.saga, &Event::Start, 2)
            .expect("ok")
            .expect("changes");
        store
            .write(&started, Some(StateTag::Pending))
            .expect("write started");
        store.flush().await.expect("flush");
        let id = Uuid::parse_str(&created.saga.id).expect("uuid");

        assert_eq!(store.get(&id).expect("get"), Some(started.saga.clone()));
        assert_eq!(store.saga_for_key("client-key").expect("key"), Some(id));
        assert_eq!(store.history(&id).expect("history").len(), 2);
        let outbox = store.outbox().expect("outbox");
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].subject, "saga.cmd.inventory.reserve");
        assert_eq!(store.active().expect("active").len(), 1);

        let reply = Event::Reply {
            step: 0,
            kind: CommandKind::Forward,
            attempt: 1,
            outcome: Outcome::Rejected("insufficient_stock".into()),
        };
        let done = engine::transition(&started.saga, &reply, 3)
            .expect("ok")
            .expect("changes");
        store.write(&done, Some(StateTag::Running)).expect("write done");
        assert!(
            store.outbox().expect("outbox").is_empty(),
            "settled command left the outbox"
        );
        assert!(store.active().expect("active").is_empty());
        let counts = store.count_by_state().expect("counts");
        assert!(counts.contains(&(StateTag::Compensated, 1)) && counts.contains(&(StateTag::Running, 0)));
        let history = store.history(&id).expect("history");
        assert_eq!(history.iter().map(|h| h.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn list_pages_in_creation_order_and_filters_by_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut ids = Vec::new();
        for i in 0..5 {
            let t = new_saga(None);
            store.write(&t, None).expect("write");
            if i % 2 == 0 {
                let s = engine::transition(&t.saga, &Event::Start, 2)
                    .expect("ok")
                    .expect("changes");
                store.write(&s, Some(StateTag::Pending)).expect("write");
            }
            ids.push(t.saga.id.clone());
        }
        let p1 = store.list(None, None, 2).expect("list");
        assert_eq!(
            p1.sagas.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            ids[..2]
        );
        let p2 = store.list(None, p1.next, 2).expect("list");
        let p3 = store.list(None, p2.next, 2).expect("list");
        assert_eq!(p3.sagas.len(), 1);
        assert!(p3.next.is_none());
        let running = store.list(Some(StateTag::Running), None, 2).expect("list");
        assert_eq!(running.sagas.len(), 2);
        let rest = store
            .list(Some(StateTag::Running), running.next, 2)
            .expect("list");
        assert_eq!(rest.sagas.len(), 1);
        assert!(rest.next.is_none());
        assert_eq!(
            store
                .list(Some(StateTag::Pending), None, 10)
                .expect("list")
                .sagas
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = new_saga(None);
        {
            let store = Store::open(dir.path()).expect("open");
            store.write(&t, None).expect("write");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let id = Uuid::parse_str(&t.saga.id).expect("uuid");
        assert_eq!(
            store.get(&id).expect("get").map(|s| s.state),
            Some(engine::SagaState::Pending)
        );
    }

    #[test]
    fn unknown_format_versions_are_reported_as_corrupt() {
        let e = decode::<SagaRecord>(br#"{"v":9,"saga":{}}"#, "saga record").expect_err("refused");
        assert!(e.to_string().contains("stored data is corrupt"), "{e}");
    }
}
