//! Conversion of what earlier versions of the sled store left behind, once,
//! on open: the `events_outbox` tree (one event copy per history entry)
//! becomes pointers in the events log, and the `outbox` tree (the commands
//! in flight) becomes journal entries. It must not be needed by anything else.

use sled::{transaction::ConflictableTransactionError, Transactional};

use super::{events_log::event_pointer, journal, read_lock, transaction_error, Store};
use crate::store::{
    codec::{decode, encode},
    keys::{history_key, saga_key},
    EventRecord, OutboxEntry, StoreError,
};

/// The events log of earlier versions (one event copy per history entry).
pub(super) const LEGACY_EVENTS_TREE: &str = "events_outbox";

impl Store {
    /// Moves the events an earlier version left unpublished in
    /// `events_outbox` (one copy per history entry, in saga-and-sequence
    /// order) into the log as pointers, in one transaction, then drops it.
    pub(super) fn convert_legacy_events(&self) -> Result<(), StoreError> {
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n == LEGACY_EVENTS_TREE.as_bytes())
        {
            return Ok(());
        }
        let legacy = self.db.open_tree(LEGACY_EVENTS_TREE)?;
        let mut moved = Vec::new();
        for kv in legacy.iter() {
            let (k, v) = kv?;
            let record: EventRecord = decode(&v, "event")?;
            let id: [u8; 16] = k
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("events_outbox key".into()))?;
            moved.push((
                record.event.at_ms,
                k,
                event_pointer(
                    &id,
                    record.event.sequence,
                    record.event.sequence,
                    record.event.at_ms,
                ),
            ));
        }
        // In time order (each saga's entries stay in sequence): pruning relies on
        // the log's times not going back.
        moved.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        if !moved.is_empty() {
            let mut staged = self.staged();
            let first = staged.next_event;
            staged.next_event += moved.len() as u64;
            drop(staged);
            let events = read_lock(&self.events);
            let Some((_, log)) = events.last() else {
                return Err(StoreError::Corrupt("the events log has no generation".into()));
            };
            (&legacy, log)
                .transaction(|(legacy, log)| {
                    for (seq, (_, k, pointer)) in (first..).zip(&moved) {
                        log.insert(&seq.to_be_bytes(), pointer.as_slice())?;
                        legacy.remove(k)?;
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .map_err(transaction_error("events conversion aborted"))?;
            self.db.flush()?;
        }
        drop(legacy);
        self.db.drop_tree(LEGACY_EVENTS_TREE)?;
        Ok(())
    }
}

/// The tree earlier versions kept the commands in flight in.
pub(super) const LEGACY_OUTBOX_TREE: &str = "outbox";

impl Store {
    /// Moves the commands an earlier version kept in flight in `outbox` into
    /// the journal, once, on open: per saga one entry at its current
    /// sequence carrying them (folded for the commands in flight, never for
    /// the saga: its snapshot is at that sequence), in one transaction, then
    /// flushed. Entries of sagas that are gone or finished are dropped.
    pub(super) fn with_legacy_outbox_converted(self) -> Result<Self, StoreError> {
        let legacy = self.db.open_tree(LEGACY_OUTBOX_TREE)?;
        if legacy.is_empty() {
            return Ok(self);
        }
        let mut keys = Vec::new();
        let mut by_saga: std::collections::BTreeMap<String, Vec<OutboxEntry>> = Default::default();
        for kv in legacy.iter() {
            let (k, v) = kv?;
            let entry: OutboxEntry = decode(&v, "outbox entry")?;
            keys.push(k);
            by_saga.entry(entry.saga_id.clone()).or_default().push(entry);
        }
        let mut moved = Vec::new();
        for (saga_id, commands) in by_saga {
            let id = saga_key(&saga_id)?;
            match self.get(&uuid::Uuid::from_bytes(id))? {
                Some(saga) if !saga.state.is_terminal() => {
                    let key = history_key(&id, saga.seq);
                    moved.push((key, encode(&journal::legacy_outbox_entry(&saga, commands))?));
                }
                _ => tracing::warn!(saga_id, "outbox entry of a saga that is not active; dropped"),
            }
        }
        (&legacy, &self.journal)
            .transaction(|(legacy, journal)| {
                for (k, v) in &moved {
                    journal.insert(k.as_slice(), v.as_slice())?;
                }
                for k in &keys {
                    legacy.remove(k)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error("outbox conversion aborted"))?;
        self.db.flush()?;
        tracing::info!(
            sagas = moved.len(),
            commands = keys.len(),
            "commands in flight moved into the journal (upgrade)"
        );
        Ok(self)
    }
}
