//! Sagas per state, kept in memory beside the `by_state` index: the console
//! asks every 2 s, and scanning the index would cost O(stored sagas) on an
//! async worker each time. Counted once when the store opens, then moved by
//! each transaction that inserts or removes an index key, by what sled
//! reports was there before (so rewriting a key counts nothing).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{engine::StateTag, store::StoreError};

/// Index by the state tag's byte (1–6; 0 unused).
const SLOTS: usize = 7;

/// The live counts.
#[derive(Debug, Default)]
pub(super) struct StateCounts([AtomicU64; SLOTS]);

/// What one transaction did to the index. Built inside the transaction's
/// closure and returned by it, so a retried transaction starts from zero.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Deltas([i64; SLOTS]);

impl Deltas {
    /// An insert of state-index key `key`, which held `previous` before.
    pub(super) fn inserted(&mut self, key: &[u8], previous: Option<&sled::IVec>) {
        if previous.is_none() {
            self.add(key, 1);
        }
    }

    /// A removal of `key`, which held `previous` before.
    pub(super) fn removed(&mut self, key: &[u8], previous: Option<&sled::IVec>) {
        if previous.is_some() {
            self.add(key, -1);
        }
    }

    fn add(&mut self, key: &[u8], by: i64) {
        if let Some(slot) = key.first().and_then(|b| self.0.get_mut(usize::from(*b))) {
            *slot += by;
        }
    }
}

impl StateCounts {
    /// Counts `by_state` once (at open).
    ///
    /// # Errors
    /// sled errors.
    pub(super) fn scanned(by_state: &sled::Tree) -> Result<Self, StoreError> {
        let counts = StateCounts::default();
        for key in by_state.iter().keys() {
            let key = key?;
            if let Some(slot) = key.first().and_then(|b| counts.0.get(usize::from(*b))) {
                slot.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(counts)
    }

    /// Adds a committed transaction's deltas.
    pub(super) fn apply(&self, d: &Deltas) {
        for (slot, by) in self.0.iter().zip(d.0) {
            match by {
                0 => {}
                by if by > 0 => {
                    slot.fetch_add(by.unsigned_abs(), Ordering::Relaxed);
                }
                by => {
                    // Never below zero, even if the index and the count disagreed.
                    let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(by.unsigned_abs()))
                    });
                }
            }
        }
    }

    /// Every state with its count, in life-cycle order.
    pub(super) fn get(&self) -> Vec<(StateTag, usize)> {
        StateTag::ALL
            .iter()
            .map(|t| {
                let n = self.0.get(*t as usize).map_or(0, |s| s.load(Ordering::Relaxed));
                (*t, usize::try_from(n).unwrap_or(usize::MAX))
            })
            .collect()
    }
}
