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

/// What an attribute index entry of the sled store's `by_attr` tree names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attr {
    Customer = 1,
    Order = 2,
    Definition = 3,
}

/// `by_attr` key prefix for `value` of `attr`: the attribute's byte ++ the
/// value's length (u16 BE) ++ its bytes, so no value's prefix is another's.
pub(crate) fn attr_prefix(attr: Attr, value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(3 + bytes.len() + 16);
    k.push(attr as u8);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&bytes[..usize::from(len)]);
    k
}

/// `by_attr` key of saga `id` under `value` of `attr` (the prefix ++ the id).
pub(crate) fn attr_key(attr: Attr, value: &str, id: &[u8; 16]) -> Vec<u8> {
    let mut k = attr_prefix(attr, value);
    k.extend_from_slice(id);
    k
}
