//! What creations and operator events answer, and why they fail: the
//! vocabulary the runner, the API and the cluster code share, so that none
//! of them needs to import another for it. Plain data; no I/O here.

use uuid::Uuid;

use crate::{
    engine::{SignalFate, SignalRefused, StateTag},
    store::StoreError,
};

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Created {
    /// A new saga, durable and started.
    New {
        /// Its id.
        saga_id: String,
        /// Order id (given or generated).
        order_id: String,
    },
    /// The idempotency key already named this saga.
    Existing {
        /// Its id.
        saga_id: String,
        /// Its order id.
        order_id: String,
        /// Its current state.
        state: StateTag,
    },
}

/// Why a saga could not be created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    /// The key was used before for a different order.
    #[error("idempotency_key was already used for a different order (saga {0})")]
    KeyReused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runner stopped (shutdown or a fatal store error).
    #[error("the coordinator is shutting down")]
    Stopped,
    /// NATS has not been reached since start: nothing is taken yet.
    #[error("the coordinator is not connected to NATS yet; retry shortly")]
    NotStarted,
    /// jetstream store: this coordinator holds no partition yet.
    #[error("this coordinator owns no partition yet; retry shortly or on another coordinator")]
    NoPartition,
    /// jetstream store: the write lost to another coordinator (the same
    /// idempotency key created there at the same moment) or its outcome is
    /// unknown; a retry with the same key answers.
    #[error("the saga's write did not go through; retry with the same idempotency key")]
    Lost,
    /// jetstream store: the key names saga `.0`, whose record's write did not
    /// go through, in a partition another coordinator holds: only that one
    /// may create it (the API forwards the request there).
    #[error("the saga's write did not go through and another coordinator must create it; retry with the same idempotency key")]
    HeldElsewhere(String),
}

/// What an operator event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operated {
    /// The saga moved; its state now.
    Changed(StateTag),
    /// The event does not apply in the saga's state (e.g. abort of a completed saga).
    Unchanged(StateTag),
    /// A signal was taken, kept, or was a repeat; the saga's state now.
    Signalled(SignalFate, StateTag),
}

/// Why an operator event could not be applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OperateError {
    /// No such saga.
    #[error("saga {0} not found")]
    NotFound(Uuid),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runner stopped.
    #[error("the coordinator is shutting down")]
    Stopped,
    /// NATS has not been reached since start: nothing is taken yet.
    #[error("the coordinator is not connected to NATS yet; retry shortly")]
    NotStarted,
    /// jetstream store: the saga's partition is owned by no reachable coordinator now.
    #[error("{0}")]
    Elsewhere(String),
    /// A signal the saga does not take (nothing changed).
    #[error(transparent)]
    Refused(#[from] SignalRefused),
}
