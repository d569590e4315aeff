//! Retention of the sled store: removes finished sagas past the retention
//! (never FAILED ones, never ones whose events are not yet published). It
//! must not touch running sagas.

use sled::{transaction::ConflictableTransactionError, Transactional};
use uuid::Uuid;

use super::{transaction_error, Store};
use crate::{
    engine::StateTag,
    store::{keys::state_key, StoreError},
};

impl Store {
    /// Removes up to `limit` terminal sagas (COMPLETED, COMPENSATED) whose
    /// last transition is older than `cutoff_ms`: record, journal, history, state
    /// and attribute index entries, dead letters and client idempotency key, one transaction per
    /// saga. FAILED sagas (an operator must act) and sagas whose events are
    /// not yet published are kept. Returns how many were removed.
    ///
    /// The state index is in creation order (UUID v7), so the scan stops at
    /// the first saga created after the cutoff.
    ///
    /// # Errors
    /// sled errors; a corrupt record.
    pub(crate) fn prune(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut removed = 0;
        // With events off nothing publishes what an earlier run logged: it
        // holds nothing back (those events are skipped if events come back on).
        let held_from = match self.events_on {
            true => self.oldest_pending_event_ms()?,
            false => None,
        };
        for tag in [StateTag::Completed, StateTag::Compensated] {
            let mut doomed = Vec::new();
            for kv in self.by_state.scan_prefix([tag as u8]) {
                let (k, _) = kv?;
                let id = Uuid::from_slice(&k[1..])
                    .map_err(|e| StoreError::Corrupt(format!("state index: {e}")))?;
                let created_ms = id
                    .get_timestamp()
                    .map(|t| {
                        let (secs, nanos) = t.to_unix();
                        secs * 1000 + u64::from(nanos) / 1_000_000
                    })
                    .unwrap_or(0);
                if created_ms > cutoff_ms || removed + doomed.len() >= limit {
                    break;
                }
                let Some(saga) = self.get(&id)? else { continue };
                // The log is in commit order: a saga last moved before the oldest
                // unpublished transition has all its events published.
                if saga.updated_at_ms > cutoff_ms || held_from.is_some_and(|t| saga.updated_at_ms >= t) {
                    continue;
                }
                let attrs = super::listing::attr_keys(&saga)?;
                doomed.push((id, saga.idempotency_key, attrs));
            }
            for (id, key, attrs) in doomed {
                let history: Vec<sled::IVec> = self
                    .history
                    .scan_prefix(id.as_bytes())
                    .keys()
                    .collect::<Result<_, _>>()?;
                let entries: Vec<sled::IVec> = self
                    .journal
                    .scan_prefix(id.as_bytes())
                    .keys()
                    .collect::<Result<_, _>>()?;
                let letters: Vec<sled::IVec> = self
                    .dead_letters
                    .scan_prefix(id.as_bytes())
                    .keys()
                    .collect::<Result<_, _>>()?;
                let bytes = *id.as_bytes();
                let deltas = (
                    &self.sagas,
                    &self.journal,
                    &self.history,
                    &self.by_state,
                    &self.by_attr,
                    &self.idempotency,
                    &self.dead_letters,
                )
                    .transaction(
                        |(sagas, journal, hist, by_state, by_attr, idempotency, dead_letters)| {
                            sagas.remove(&bytes[..])?;
                            let mut deltas = super::counts::Deltas::default();
                            let index_key = state_key(tag, &bytes);
                            deltas.removed(&index_key, by_state.remove(index_key.as_slice())?.as_ref());
                            for k in &attrs {
                                by_attr.remove(k.as_slice())?;
                            }
                            for k in &entries {
                                journal.remove(k)?;
                            }
                            for k in &history {
                                hist.remove(k)?;
                            }
                            for k in &letters {
                                dead_letters.remove(k)?;
                            }
                            if let Some(key) = &key {
                                // Only if the key still names this saga.
                                if idempotency.get(key.as_bytes())?.as_deref() == Some(&bytes[..]) {
                                    idempotency.remove(key.as_bytes())?;
                                }
                            }
                            Ok::<_, ConflictableTransactionError<()>>(deltas)
                        },
                    )
                    .map_err(transaction_error("prune transaction aborted"))?;
                self.counts.apply(&deltas);
                removed += 1;
            }
        }
        Ok(removed)
    }
}
