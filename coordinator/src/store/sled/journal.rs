//! The sled store's journal: one entry per transition, keyed by saga id ++
//! the sequence of the transition's last history entry (u64 BE), holding
//! what the transition changed — state, reason, time, the steps it touched,
//! its history entries, the commands it put in flight and those it settled.
//! A saga is its last snapshot (the `sagas` record, written when the saga is
//! created, ends, leaves an end, or its journal passes [`SNAPSHOT_EVERY`]
//! entries) with the entries after it folded in; its history and its
//! commands in flight are folded from all its entries. A command is kept
//! as what the engine chose for it (step, direction, attempt, input) and
//! built again from the saga when read ([`Sent`]). Pure encoding and
//! folding; the reads and writes are the store's.

use serde::{Deserialize, Serialize};

use crate::{
    engine::{self, Command, EventKind, HistoryEntry, Saga, SagaState, StateTag, StepProgress, Transition},
    store::{OutboxEntry, StoreError},
};
use saga_wire::CommandKind;

/// A snapshot is written when a saga's history sequence crosses a multiple
/// of this, so reading a saga folds at most this many history entries' worth
/// of journal (a bound without a per-saga counter in memory).
pub(super) const SNAPSHOT_EVERY: u64 = 16;

/// A journal entry as written (borrowing the transition). What is empty is
/// left out (read back as `None` or empty): a two-step saga's entries wrote
/// about 15 `null`s and `[]`s between them.
#[derive(Serialize)]
pub(super) struct EntryOut<'a> {
    state: &'a SagaState,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    updated_at_ms: u64,
    seq: u64,
    /// The steps the transition changed, by index.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    steps: Vec<(usize, &'a StepProgress)>,
    history: Vec<HistoryOut<'a>>,
    /// The commands the transition put in flight.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sent: Vec<SentOut<'a>>,
    /// Commands whole, as an earlier version's outbox held them (moved
    /// here on open, `legacy`); new entries keep them as `sent`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    commands: Vec<OutboxEntry>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    settled: &'a [(usize, CommandKind)],
    /// Written beside a snapshot at its sequence (and so carrying no steps).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    snapshot: bool,
}

/// A [`HistoryEntry`] as an entry keeps it: the step, attempt and detail a
/// kind has none of are left out (read back as `None`).
#[derive(Serialize)]
struct HistoryOut<'a> {
    seq: u64,
    at_ms: u64,
    kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    state: StateTag,
}

fn history(entries: &[HistoryEntry]) -> Vec<HistoryOut<'_>> {
    entries
        .iter()
        .map(|h| {
            // Every field by name: a field added to `HistoryEntry` must be placed here.
            let HistoryEntry {
                seq,
                at_ms,
                kind,
                step,
                attempt,
                detail,
                state,
            } = h;
            HistoryOut {
                seq: *seq,
                at_ms: *at_ms,
                kind: *kind,
                step: step.as_deref(),
                attempt: *attempt,
                detail: detail.as_deref(),
                state: *state,
            }
        })
        .collect()
}

/// A journal entry read to be folded into its saga (its commands are
/// skipped, not built; its history too, unless `H` is `Vec<HistoryEntry>`).
#[derive(Debug, Deserialize)]
pub(super) struct EntryIn<H = serde::de::IgnoredAny> {
    state: SagaState,
    reason: Option<String>,
    updated_at_ms: u64,
    seq: u64,
    #[serde(default)]
    steps: Vec<(usize, StepProgress)>,
    #[serde(default)]
    snapshot: bool,
    #[serde(default)]
    pub(super) history: H,
}

impl<H> EntryIn<H> {
    /// The sequence of the entry's last history entry (its key's).
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }
}

/// A journal entry read for its history only (the rest is skipped, not built).
#[derive(Deserialize)]
pub(super) struct HistoryIn {
    #[serde(default)]
    pub(super) history: Vec<HistoryEntry>,
}

/// A command as an entry keeps it: what the engine chose. Its subject,
/// envelope, timeout and retry follow from the saga's id, definition and
/// order ([`engine::command`]), fixed at creation: kept whole they were
/// over half of an entry's bytes, the order and the saga id written again
/// in every command.
#[derive(Serialize)]
pub(super) struct SentOut<'a> {
    step: usize,
    kind: CommandKind,
    attempt: u32,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    input: &'a serde_json::Value,
}

/// A [`SentOut`] as read.
#[derive(Debug, Deserialize)]
pub(super) struct Sent {
    step: usize,
    kind: CommandKind,
    attempt: u32,
    #[serde(default)]
    input: serde_json::Value,
}

impl Sent {
    /// The command the engine sent, built again from `saga` (its snapshot
    /// or a later fold: the fields read are fixed at creation).
    ///
    /// # Errors
    /// The saga's definition has no such step.
    fn command(self, saga: &Saga) -> Result<OutboxEntry, StoreError> {
        let Sent {
            step,
            kind,
            attempt,
            input,
        } = self;
        let c = engine::command(saga, step, kind, attempt, input).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "saga {}: journal sends step {step} of {}",
                saga.id,
                saga.steps.len()
            ))
        })?;
        Ok(OutboxEntry::new(saga, &c))
    }
}

/// A journal entry read for its commands only.
#[derive(Deserialize)]
pub(super) struct CommandsIn {
    #[serde(default)]
    sent: Vec<Sent>,
    #[serde(default)]
    commands: Vec<OutboxEntry>,
    #[serde(default)]
    settled: Vec<(usize, CommandKind)>,
}

/// A journal entry read to be folded into its saga and its commands.
#[derive(Deserialize)]
pub(super) struct BothIn {
    state: SagaState,
    reason: Option<String>,
    updated_at_ms: u64,
    seq: u64,
    #[serde(default)]
    steps: Vec<(usize, StepProgress)>,
    #[serde(default)]
    snapshot: bool,
    #[serde(default)]
    sent: Vec<Sent>,
    #[serde(default)]
    commands: Vec<OutboxEntry>,
    #[serde(default)]
    settled: Vec<(usize, CommandKind)>,
}

/// A [`BothIn`] as what [`fold`] and [`fold_commands`] take.
pub(super) fn split(b: BothIn) -> (EntryIn, CommandsIn) {
    let BothIn {
        state,
        reason,
        updated_at_ms,
        seq,
        steps,
        snapshot,
        sent,
        commands,
        settled,
    } = b;
    (
        EntryIn {
            state,
            reason,
            updated_at_ms,
            seq,
            steps,
            snapshot,
            history: serde::de::IgnoredAny,
        },
        CommandsIn {
            sent,
            commands,
            settled,
        },
    )
}

/// What changed from `previous` to `t.saga`, or `None` when the change is not
/// one an entry can carry (a field fixed at creation moved, the steps
/// changed in number): the store writes a snapshot instead.
pub(super) fn entry<'a>(previous: &Saga, t: &'a Transition) -> Option<EntryOut<'a>> {
    // Every field by name: a field added to `Saga` must be placed here.
    let Saga {
        id,
        definition,
        order,
        correlation_id,
        idempotency_key,
        state,
        steps,
        reason,
        created_at_ms,
        updated_at_ms,
        seq,
        deadline_at_ms,
        signals,
    } = &t.saga;
    // Signals kept or taken change rarely (a snapshot then costs little).
    let fixed = *id == previous.id
        && std::sync::Arc::ptr_eq(definition, &previous.definition)
        && *order == previous.order
        && *correlation_id == previous.correlation_id
        && *idempotency_key == previous.idempotency_key
        && *created_at_ms == previous.created_at_ms
        && *deadline_at_ms == previous.deadline_at_ms
        && *signals == previous.signals
        && steps.len() == previous.steps.len();
    fixed.then(|| EntryOut {
        state,
        reason: reason.as_deref(),
        updated_at_ms: *updated_at_ms,
        seq: *seq,
        steps: steps
            .iter()
            .enumerate()
            .filter(|(i, s)| previous.steps.get(*i) != Some(*s))
            .collect(),
        history: history(&t.history),
        sent: sent(&t.commands),
        commands: Vec::new(),
        settled: &t.settled,
        snapshot: false,
    })
}

/// The entry of `t` when a snapshot of the saga is written beside it: its
/// history and commands; no steps (what it changed is in the snapshot, and
/// a fold starts after the snapshot's sequence).
pub(super) fn beside_snapshot(t: &Transition) -> EntryOut<'_> {
    EntryOut {
        state: &t.saga.state,
        reason: t.saga.reason.as_deref(),
        updated_at_ms: t.saga.updated_at_ms,
        seq: t.saga.seq,
        steps: Vec::new(),
        history: history(&t.history),
        sent: sent(&t.commands),
        commands: Vec::new(),
        settled: &t.settled,
        snapshot: true,
    }
}

fn sent(commands: &[Command]) -> Vec<SentOut<'_>> {
    commands
        .iter()
        .map(|c| SentOut {
            step: c.step,
            kind: c.kind,
            attempt: c.message.attempt,
            input: &c.message.input,
        })
        .collect()
}

/// Whether `t` (written from `previous`) ends with a snapshot of the saga:
/// its first transition, one that ends it, one that leaves an end (an
/// operator's retry of a FAILED saga), or one whose history crosses a
/// multiple of [`SNAPSHOT_EVERY`]. The snapshot at the end costs a write but
/// keeps a finished saga's read off its journal: without it, with 1,000,000
/// stored, GetSaga's p99 went from 0.8 to 2.9 ms and a ListSagas page's from
/// 2.6 to 17.6 ms. The one when leaving an end makes an ended record always
/// the saga's latest state, read without the journal at all.
pub(super) fn snapshot_due(previous: Option<&Saga>, t: &Transition) -> bool {
    match previous {
        None => true,
        Some(p) => {
            t.saga.state.is_terminal()
                || p.state.is_terminal()
                || p.seq / SNAPSHOT_EVERY != t.saga.seq / SNAPSHOT_EVERY
        }
    }
}

/// What [`fold`] did with an entry.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub(super) enum Folded {
    Yes,
    /// The entry was written beside a newer snapshot than the one folded
    /// into (a reader read the `sagas` record just before a transaction
    /// replaced it): it carries no steps, so the reader must start again
    /// from the newer snapshot.
    SnapshotMoved,
}

/// Folds `entry` into `saga` (a snapshot or an earlier fold).
///
/// # Errors
/// An entry that names a step the saga does not have, or goes back in sequence.
pub(super) fn fold<H>(saga: &mut Saga, entry: EntryIn<H>) -> Result<Folded, StoreError> {
    if entry.snapshot && entry.seq > saga.seq {
        return Ok(Folded::SnapshotMoved);
    }
    if entry.seq < saga.seq {
        return Err(StoreError::Corrupt(format!(
            "saga {}: journal entry {} after {}",
            saga.id, entry.seq, saga.seq
        )));
    }
    for (i, step) in entry.steps {
        let len = saga.steps.len();
        let slot = saga.steps.get_mut(i).ok_or_else(|| {
            StoreError::Corrupt(format!("saga {}: journal names step {i} of {len}", saga.id))
        })?;
        *slot = step;
    }
    saga.state = entry.state;
    saga.reason = entry.reason;
    saga.updated_at_ms = entry.updated_at_ms;
    saga.seq = entry.seq;
    Ok(Folded::Yes)
}

/// Folds an entry's commands into the commands in flight: the settled ones
/// leave, the new ones come (replacing one of the same step and kind),
/// built from `saga`, the saga's snapshot or a later fold.
///
/// # Errors
/// An entry that sends a step the saga does not have.
pub(super) fn fold_commands(
    in_flight: &mut Vec<OutboxEntry>,
    entry: CommandsIn,
    saga: &Saga,
) -> Result<(), StoreError> {
    let CommandsIn {
        sent,
        commands,
        settled,
    } = entry;
    in_flight.retain(|e| !settled.contains(&(e.step, e.kind)));
    let sent = sent.into_iter().map(|s| s.command(saga));
    for c in commands.into_iter().map(Ok).chain(sent) {
        let c = c?;
        in_flight.retain(|e| !(e.step == c.step && e.kind == c.kind));
        in_flight.push(c);
    }
    Ok(())
}

/// The entry that carries commands an earlier version kept in its `outbox`
/// tree (converted on open), at the saga's current sequence: folded for the
/// commands in flight, never for the saga (its snapshot is at that sequence).
pub(super) fn legacy_outbox_entry<'a>(saga: &'a Saga, commands: Vec<OutboxEntry>) -> EntryOut<'a> {
    EntryOut {
        state: &saga.state,
        reason: saga.reason.as_deref(),
        updated_at_ms: saga.updated_at_ms,
        seq: saga.seq,
        steps: Vec::new(),
        history: Vec::new(),
        sent: Vec::new(),
        commands,
        settled: &[],
        snapshot: true,
    }
}
