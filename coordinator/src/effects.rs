//! What a batch of the runner's decisions releases — commands to send,
//! replies to callers, watcher wake-ups — and the rule that keeps them
//! behind the store's commit: a `Pending` batch only collects them, its
//! fields are private, and the only ways to `Released` (the one value
//! they can be taken from) are a successful commit
//! (`Pending::committed`, which needs the store's
//! [`crate::store::Committed`]) or a batch that wrote nothing. So sending
//! before the flush cannot be written by mistake in the runner. No I/O here.

use std::{collections::HashMap, sync::Arc};

use saga_wire::CommandKind;
use tokio::sync::oneshot;

use crate::{
    engine::{HistoryEntry, Saga},
    ops::{CreateError, Created, OperateError, Operated},
    store::{Committed, OutboxEntry},
};

/// A value made durable by a store commit: a command the sink may send.
/// Only this module makes one, from a released (committed) batch.
#[derive(Debug)]
pub(crate) struct Durable<T>(T);

impl<T> Durable<T> {
    /// The durable value.
    pub(crate) fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Durable<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Where a `CreateOrder` waits for its answer.
pub(crate) type CreateReply = oneshot::Sender<Result<Created, CreateError>>;
/// Where an operator event waits for its answer.
pub(crate) type OperateReply = oneshot::Sender<Result<Operated, OperateError>>;

/// A durable transition of a watched saga: the saga after it and the
/// history entries it added.
#[derive(Debug)]
pub(crate) struct Change {
    /// The saga after the transition.
    pub saga: Saga,
    /// The entries the transition added, in order.
    pub history: Vec<HistoryEntry>,
}

/// A saga that moved, for its watchers: `(id, terminal, change)`.
pub(crate) type Moved = (String, bool, Option<Arc<Change>>);

/// What a batch decided, held until the commit covering it is done.
#[derive(Default)]
pub(crate) struct Pending {
    to_send: Vec<OutboxEntry>,
    acks: Vec<(CreateReply, Result<Created, CreateError>)>,
    operated: Vec<(OperateReply, String, Result<Operated, OperateError>)>,
    /// Idempotency keys of the sagas it created (not yet readable in the store).
    keys: HashMap<String, String>,
    changed: Vec<Moved>,
    /// Whether it staged a write.
    dirty: bool,
    /// Inputs (outcomes and requests) it took.
    inputs: usize,
    /// Whether it wrote a dead letter (publish the unconfirmed ones).
    dead_letters: bool,
    /// Spans its transitions wrote, by saga (`crate::saga_spans`).
    spans: Vec<(String, saga_trace::SpanRecord)>,
}

impl Pending {
    /// The first batch of a run: it publishes what a previous run left unconfirmed.
    pub(crate) fn resuming() -> Self {
        Pending {
            dead_letters: true,
            ..Pending::default()
        }
    }

    /// Counts `n` more inputs taken into this batch.
    pub(crate) fn took(&mut self, n: usize) {
        self.inputs += n;
    }

    /// Inputs taken so far.
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    /// A write was staged for this batch.
    pub(crate) fn wrote(&mut self) {
        self.dirty = true;
    }

    /// A dead letter was staged for this batch.
    pub(crate) fn wrote_dead_letter(&mut self) {
        self.dead_letters = true;
    }

    /// A command to send once durable.
    pub(crate) fn send(&mut self, entry: OutboxEntry) {
        self.to_send.push(entry);
    }

    /// Drops the command `saga_id`/`step`/`kind` if it is still held here
    /// (an abort made it moot).
    pub(crate) fn withdraw(&mut self, saga_id: &str, step: usize, kind: CommandKind) {
        self.to_send
            .retain(|e| !(e.saga_id == saga_id && e.step == step && e.kind == kind));
    }

    /// A `CreateOrder` answer, given once durable.
    pub(crate) fn ack(&mut self, reply: CreateReply, result: Result<Created, CreateError>) {
        self.acks.push((reply, result));
    }

    /// An operator event's answer, given once durable.
    pub(crate) fn operated(
        &mut self,
        reply: OperateReply,
        saga_id: String,
        result: Result<Operated, OperateError>,
    ) {
        self.operated.push((reply, saga_id, result));
    }

    /// A span of saga `saga_id`'s trace, exported once durable.
    pub(crate) fn span(&mut self, saga_id: &str, span: saga_trace::SpanRecord) {
        self.spans.push((saga_id.to_string(), span));
    }

    /// A saga moved: wake its watchers once durable.
    pub(crate) fn moved(&mut self, moved: Moved) {
        self.changed.push(moved);
    }

    /// Saga `saga_id` was created with client key `key` in this batch.
    pub(crate) fn reserve_key(&mut self, key: String, saga_id: String) {
        self.keys.insert(key, saga_id);
    }

    /// The saga this batch created with client key `key`, if any.
    pub(crate) fn reserved(&self, key: &str) -> Option<&String> {
        self.keys.get(key)
    }

    /// Whether there is nothing to write or release.
    pub(crate) fn is_empty(&self) -> bool {
        !self.dirty
            && !self.dead_letters
            && self.to_send.is_empty()
            && self.acks.is_empty()
            && self.operated.is_empty()
    }

    /// A batch that staged no write follows only from durable state (late
    /// replies, re-sends of durable outbox entries, known keys): released
    /// at once. A batch that wrote is given back: it needs its commit.
    pub(crate) fn release_unwritten(self) -> Unwritten {
        if self.dirty {
            return Unwritten::NeedsCommit(self);
        }
        Unwritten::Released(self.into_released(Vec::new()))
    }

    /// The commit covering this batch succeeded: its effects may go, but
    /// none of a saga whose write was lost (its callers are told, its
    /// commands dropped; it is to be reloaded from what is durable).
    pub(crate) fn committed(mut self, committed: Committed) -> Released {
        let lost = committed.lost().to_vec();
        if !lost.is_empty() {
            let is_lost = |id: &str| lost.iter().any(|l| l == id);
            self.to_send.retain(|e| !is_lost(&e.saga_id));
            self.changed.retain(|(id, _, _)| !is_lost(id));
            self.spans.retain(|(id, _)| !is_lost(id));
            for (_, result) in self.acks.iter_mut() {
                if matches!(result, Ok(Created::New { saga_id, .. }) if is_lost(saga_id)) {
                    *result = Err(CreateError::Lost);
                }
            }
            for (_, id, result) in self.operated.iter_mut() {
                if result.is_ok() && is_lost(id) {
                    *result = Err(OperateError::Elsewhere(
                        "the saga was written by another coordinator meanwhile; retry".into(),
                    ));
                }
            }
        }
        self.into_released(lost)
    }

    fn into_released(self, lost: Vec<String>) -> Released {
        Released {
            delivery: Delivery {
                to_send: self.to_send.into_iter().map(Durable).collect(),
                acks: self.acks,
                operated: self.operated,
                changed: self.changed,
                wrote: self.dirty,
                dead_letters: self.dead_letters,
                spans: self.spans.into_iter().map(|(_, s)| s).collect(),
            },
            lost,
        }
    }
}

/// What [`Pending::release_unwritten`] found.
pub(crate) enum Unwritten {
    /// The batch staged nothing: released.
    Released(Released),
    /// The batch staged writes: it waits for its commit.
    NeedsCommit(Pending),
}

/// A batch whose commit is done: the only value its effects come from.
#[must_use = "a committed batch's replies and commands must be delivered"]
pub(crate) struct Released {
    delivery: Delivery,
    lost: Vec<String>,
}

impl Released {
    /// Sagas whose write was lost (their effects are already dropped).
    pub(crate) fn lost(&self) -> &[String] {
        &self.lost
    }

    /// The effects, to deliver now.
    pub(crate) fn into_delivery(self) -> Delivery {
        self.delivery
    }
}

/// The effects of a committed batch.
pub(crate) struct Delivery {
    /// Commands for the sink.
    pub(crate) to_send: Vec<Durable<OutboxEntry>>,
    /// `CreateOrder` answers.
    pub(crate) acks: Vec<(CreateReply, Result<Created, CreateError>)>,
    /// Operator answers.
    pub(crate) operated: Vec<(OperateReply, String, Result<Operated, OperateError>)>,
    /// Watcher wake-ups.
    pub(crate) changed: Vec<Moved>,
    /// Whether the batch wrote (its events are durable: wake the publisher).
    pub(crate) wrote: bool,
    /// Whether it wrote a dead letter.
    pub(crate) dead_letters: bool,
    /// Spans to export.
    pub(crate) spans: Vec<saga_trace::SpanRecord>,
}
