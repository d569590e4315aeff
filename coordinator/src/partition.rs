//! Partition ownership: which partition a saga belongs to and which
//! partitions this coordinator holds. A leaf module shared by the runner
//! (new ids are drawn in held partitions), the cluster code (which takes
//! and gives up partitions) and the jetstream store (its index is by
//! partition); it must not import any other module of the crate.

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
};

use uuid::Uuid;

/// The partition of a saga: from the random tail of its UUID (v7 ids begin
/// with the time, which would put a burst of sagas in one partition).
pub fn partition_of(saga_id: &str, partitions: u32) -> u32 {
    let partitions = partitions.max(1);
    let n = match Uuid::parse_str(saga_id) {
        Ok(u) => {
            let b = u.as_bytes();
            u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
        }
        // Not a UUID (never produced here): still a stable answer.
        Err(_) => saga_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }),
    };
    u32::try_from(n % u64::from(partitions)).unwrap_or(0)
}

/// The partitions this coordinator holds. Cheap to clone; the cluster code
/// changes it, everyone else only reads it.
#[derive(Clone, Debug)]
pub(crate) struct Ownership {
    held: Arc<RwLock<BTreeSet<u32>>>,
    partitions: u32,
}

impl Ownership {
    /// Holding nothing, out of `partitions`.
    pub(crate) fn new(partitions: u32) -> Self {
        Ownership {
            held: Arc::default(),
            partitions: partitions.max(1),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeSet<u32>> {
        match self.held.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<u32>> {
        match self.held.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Partition `p` is held from now on.
    pub(crate) fn hold(&self, p: u32) {
        self.write().insert(p);
    }

    /// Partition `p` is no longer held.
    pub(crate) fn give_up(&self, p: u32) {
        self.write().remove(&p);
    }

    /// Whether the saga's partition is held here.
    pub(crate) fn owns(&self, saga_id: &str) -> bool {
        self.read().contains(&partition_of(saga_id, self.partitions))
    }

    /// Whether partition `p` is held here.
    pub(crate) fn holds(&self, p: u32) -> bool {
        self.read().contains(&p)
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Number of partitions in the cluster.
    pub(crate) fn partitions(&self) -> u32 {
        self.partitions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_uuid_v7_ids_made_in_a_burst() {
        let mut counts = [0u32; 8];
        for _ in 0..8000 {
            let id = Uuid::now_v7().to_string();
            counts[partition_of(&id, 8) as usize] += 1;
        }
        // Each partition gets its share within 20%.
        for c in counts {
            assert!((800..=1200).contains(&c), "{counts:?}");
        }
        assert_eq!(partition_of("x", 8), partition_of("x", 8));
        assert_eq!(partition_of("anything", 0), 0);
    }
}
