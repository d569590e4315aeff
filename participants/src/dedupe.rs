//! A participant's sled store: its business state tree and the `replies`
//! tree that makes commands idempotent.
//!
//! [`Store::apply`] runs an effect and stores its reply under the command's
//! idempotency key in ONE sled transaction, then flushes, then returns: so a
//! participant never replies before both the effect and the stored reply are
//! durable, and a repeated command finds the stored reply and has no effect.
//! Only `ok` and `rejected` replies are stored; an `error` reply (transient)
//! records nothing, so a retry may succeed.
//!
//! Tombstones: a compensation whose forward key has no stored reply writes a
//! `rejected: compensated_before_forward` reply under the forward key, so a
//! forward that arrives late is answered with it and does nothing.
//! This module knows nothing of stock or money.

use saga_proto::wire::{self, Reply};
use serde::{Deserialize, Serialize};
use sled::{
    transaction::{ConflictableTransactionError, TransactionError, TransactionalTree},
    Transactional,
};

/// Reason stored under a forward key whose compensation came first.
pub const TOMBSTONE_REASON: &str = "compensated_before_forward";

/// A failure of the participant's store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled I/O or internal error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value cannot be read.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Result type of effects run inside a transaction.
pub type TxResult<T> = Result<T, ConflictableTransactionError<String>>;

#[derive(Serialize, Deserialize)]
struct StoredReply {
    v: u32,
    reply: Reply,
}

/// Reads a JSON value from a transactional tree.
///
/// # Errors
/// Aborts the transaction when the value is not valid JSON for `T` (corrupt data).
pub fn tx_get<T: for<'de> Deserialize<'de>>(tree: &TransactionalTree, key: &str) -> TxResult<Option<T>> {
    match tree.get(key.as_bytes())? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ConflictableTransactionError::Abort(format!("stored data is corrupt at {key}: {e}"))
        }),
        None => Ok(None),
    }
}

/// Writes a JSON value in a transactional tree.
///
/// # Errors
/// Aborts when the value cannot be encoded.
pub fn tx_put<T: Serialize>(tree: &TransactionalTree, key: &str, value: &T) -> TxResult<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
    tree.insert(key.as_bytes(), bytes)?;
    Ok(())
}

fn tx_reply(replies: &TransactionalTree, key: &str) -> TxResult<Option<Reply>> {
    Ok(tx_get::<StoredReply>(replies, key)?.map(|s| s.reply))
}

fn tx_store_reply(replies: &TransactionalTree, key: &str, reply: &Reply) -> TxResult<()> {
    tx_put(
        replies,
        key,
        &StoredReply {
            v: 1,
            reply: reply.clone(),
        },
    )
}

/// What a compensation finds under its forward key.
#[derive(Debug, Clone, PartialEq)]
pub enum ForwardState {
    /// The forward effect exists (its `ok` reply): undo it.
    Applied(serde_json::Value),
    /// The forward was rejected or tombstoned: nothing to undo.
    NoEffect,
}

/// The participant's sled database: a `replies` tree and a `state` tree.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    replies: sled::Tree,
    state: sled::Tree,
}

impl Store {
    /// Opens the trees in `db`.
    ///
    /// # Errors
    /// sled errors.
    pub fn new(db: sled::Db) -> Result<Self, StoreError> {
        Ok(Store {
            replies: db.open_tree("replies")?,
            state: db.open_tree("state")?,
            db,
        })
    }

    /// The business state tree (read side; writes go through [`Store::apply`]).
    pub fn state(&self) -> &sled::Tree {
        &self.state
    }

    /// The stored reply for `key`, if any (a fast path before slow work; the
    /// authoritative check is repeated inside [`Store::apply`]).
    ///
    /// # Errors
    /// sled errors, corrupt value.
    pub fn stored_reply(&self, key: &str) -> Result<Option<Reply>, StoreError> {
        match self.replies.get(key.as_bytes())? {
            Some(bytes) => serde_json::from_slice::<StoredReply>(&bytes)
                .map(|s| Some(s.reply))
                .map_err(|e| StoreError::Corrupt(format!("reply {key}: {e}"))),
            None => Ok(None),
        }
    }

    /// Runs a forward `effect` once per `key`: returns `(reply, true)` with
    /// the stored reply if `key` was seen (a repeat, or a tombstone), else
    /// runs `effect` on the state tree and stores its reply with it in one
    /// transaction (unless it is an `error`), then flushes.
    ///
    /// # Errors
    /// sled errors, corrupt data (the effect aborted).
    pub async fn apply_forward<F>(&self, key: &str, effect: F) -> Result<(Reply, bool), StoreError>
    where
        F: Fn(&TransactionalTree) -> TxResult<Reply>,
    {
        self.apply(key, |state, replies| {
            if let Some(stored) = tx_reply(replies, key)? {
                return Ok((stored, true));
            }
            let reply = effect(state)?;
            if !matches!(reply, Reply::Error { .. }) {
                tx_store_reply(replies, key, &reply)?;
            }
            Ok((reply, false))
        })
        .await
    }

    /// Runs a compensation once per `key` (a `…/compensate` key). `undo`
    /// gets the forward's `ok` data when the forward effect exists; when the
    /// forward was never seen a tombstone is written under its key and `undo`
    /// is not called; when it was rejected there is nothing to undo.
    ///
    /// # Errors
    /// sled errors, corrupt data, a key that is not a compensation key.
    pub async fn apply_compensation<F>(&self, key: &str, undo: F) -> Result<(Reply, bool), StoreError>
    where
        F: Fn(&TransactionalTree, &str, &serde_json::Value) -> TxResult<Reply>,
    {
        let forward = wire::forward_key(key)
            .ok_or_else(|| StoreError::Corrupt(format!("`{key}` is not a compensation key")))?;
        self.apply(key, |state, replies| {
            if let Some(stored) = tx_reply(replies, key)? {
                return Ok((stored, true));
            }
            let reply = match tx_reply(replies, &forward)? {
                Some(Reply::Ok { data }) => undo(state, &forward, &data)?,
                Some(Reply::Rejected { reason }) => {
                    Reply::ok(serde_json::json!({"undone": false, "forward": format!("rejected: {reason}")}))
                }
                Some(Reply::Error { .. }) | None => {
                    tx_store_reply(replies, &forward, &Reply::rejected(TOMBSTONE_REASON))?;
                    Reply::ok(
                        serde_json::json!({"undone": false, "forward": "never seen; tombstone recorded"}),
                    )
                }
            };
            if !matches!(reply, Reply::Error { .. }) {
                tx_store_reply(replies, key, &reply)?;
            }
            Ok((reply, false))
        })
        .await
    }

    async fn apply<F>(&self, key: &str, f: F) -> Result<(Reply, bool), StoreError>
    where
        F: Fn(&TransactionalTree, &TransactionalTree) -> TxResult<(Reply, bool)>,
    {
        let result = (&self.state, &self.replies).transaction(|(state, replies)| f(state, replies));
        let (reply, hit) = match result {
            Ok(r) => r,
            Err(TransactionError::Abort(reason)) => {
                return Err(StoreError::Corrupt(format!("{key}: {reason}")))
            }
            Err(TransactionError::Storage(e)) => return Err(StoreError::Sled(e)),
        };
        if !hit {
            // Write-ahead: the effect and its stored reply are durable before anyone hears of them.
            self.db.flush_async().await?;
        }
        Ok((reply, hit))
    }

    /// Flushes everything (shutdown).
    ///
    /// # Errors
    /// sled errors.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}
