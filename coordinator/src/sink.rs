//! Where the runner's durable effects go: the [`CommandSink`] trait (the
//! NATS dispatcher implements it; tests use a fake) and the [`Reported`]
//! outcomes that come back. A trait, so the runner neither depends on
//! `dispatch` nor needs NATS in its tests. No I/O here.

use futures::future::BoxFuture;
use saga_wire::CommandKind;

use crate::{
    effects::Durable,
    engine::Event,
    store::{DeadLetter, OutboxEntry},
};

/// An outcome for the saga runner.
#[derive(Debug)]
pub(crate) struct Reported {
    /// Saga the outcome belongs to.
    pub saga_id: String,
    /// The engine event.
    pub event: Event,
}

/// What the runner hands its committed effects to. Every call is made only
/// for state that a store commit made durable (the runner's types keep
/// that, see [`crate::effects`]).
pub(crate) trait CommandSink: Send + Sync + 'static {
    /// Sends `entry` in the background; its outcome comes back as a
    /// [`Reported`] on the runner's outcomes channel. Only a committed
    /// batch yields a [`Durable`] command.
    fn dispatch(&self, entry: Durable<OutboxEntry>);

    /// Withdraws the command for `saga_id`/`step`/`kind` if it has not been
    /// answered yet (an operator abort settled it).
    fn withdraw(&self, saga_id: &str, step: usize, kind: CommandKind);

    /// Publishes a durable dead letter on `saga.dlq` and waits for the
    /// server to have it; the error says why not (retried on restart).
    fn publish_dead_letter(&self, letter: DeadLetter) -> BoxFuture<'static, Result<(), String>>;
}
