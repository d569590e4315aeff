//! Key layouts of the sled trees (and the history keys the jetstream store
//! uses for its in-memory queues): fixed-width big-endian so key order is
//! the order that matters. Pure functions; no I/O here.

use uuid::Uuid;

use super::StoreError;
use crate::engine::StateTag;

pub(crate) fn saga_key(id: &str) -> Result<[u8; 16], StoreError> {
    Uuid::parse_str(id)
        .map(|u| *u.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("saga id {id:?} is not a UUID: {e}")))
}

pub(crate) fn state_key(tag: StateTag, id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag as u8);
    k.extend_from_slice(id);
    k
}

pub(crate) fn history_key(id: &[u8; 16], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The key of the `outbox` tree earlier versions wrote (tests build such stores).
#[cfg(test)]
pub(crate) fn outbox_key(id: &[u8; 16], step: usize, kind: saga_wire::CommandKind) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.extend_from_slice(id);
    k.extend_from_slice(&u32::try_from(step).unwrap_or(u32::MAX).to_be_bytes());
    k.push(match kind {
        saga_wire::CommandKind::Forward => 0,
        saga_wire::CommandKind::Compensate => 1,
    });
    k
}

pub(crate) fn be_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what}: {} bytes, not 8", bytes.len())))
}
