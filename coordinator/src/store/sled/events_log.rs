//! The sled store's events log: per group commit, one entry pointing to the
//! history entries its transitions wrote, in commit order, published by the
//! events publisher and dropped a whole generation at a time. It must not
//! decide anything: it
//! records what the runner's transitions wrote.

use std::{collections::HashMap, sync::Arc};

use serde::Deserialize;
use uuid::Uuid;

use super::{lock, read_lock, write_lock, Store};
use crate::{
    definition::SagaDefinition,
    engine::HistoryEntry,
    store::{codec::decode, keys::be_u64, EventRecord, StoreError},
};

/// Published events-log pointers after which a new generation is started.
pub(super) const EVENTS_ROTATE: u64 = 50_000;
/// `meta` key of the events publisher's cursor.
pub(super) const EVENTS_CURSOR: &[u8] = b"events-cursor";
/// The stored cursor is rewritten at most this often (and at a rotation or
/// a drop of a generation, and at the final flush): at low load every
/// transition is a publish of its own, and a write per publish was a fifth
/// of the store's writes. After a crash the events of the last interval
/// are published again, which JetStream drops as duplicates.
pub(super) const EVENTS_CURSOR_SAVE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// Name prefix of the events log's generations.
pub(super) const EVENTS_TREE: &str = "events.";

pub(super) fn events_tree_name(generation: u64) -> String {
    format!("{EVENTS_TREE}{generation:016x}")
}

/// An events-log entry of one pointer (format 1, as earlier versions wrote
/// one per transition, and as the conversion of an older log still does).
pub(super) fn event_pointer(id: &[u8; 16], first: u64, last: u64, at_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + POINTER_LEN);
    v.push(1);
    push_pointer(&mut v, id, first, last, at_ms);
    v
}

/// An events-log entry of the pointers of one group commit (format 2).
pub(super) fn event_pointers(pointers: &[EventPointer]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + POINTER_LEN * pointers.len());
    v.push(2);
    for p in pointers {
        push_pointer(&mut v, &p.id, p.first, p.last, p.at_ms);
    }
    v
}

const POINTER_LEN: usize = 40;

fn push_pointer(v: &mut Vec<u8>, id: &[u8; 16], first: u64, last: u64, at_ms: u64) {
    v.extend_from_slice(id);
    v.extend_from_slice(&first.to_be_bytes());
    v.extend_from_slice(&last.to_be_bytes());
    v.extend_from_slice(&at_ms.to_be_bytes());
}

/// The history entries `first..=last` of saga `id`, written at `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EventPointer {
    pub(super) id: [u8; 16],
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) at_ms: u64,
}

/// The pointers of an events-log entry of either format.
pub(super) fn parse_event_pointers(v: &[u8]) -> Result<Vec<EventPointer>, StoreError> {
    let body = match v {
        [1, rest @ ..] if rest.len() == POINTER_LEN => rest,
        [2, rest @ ..] if !rest.is_empty() && rest.len() % POINTER_LEN == 0 => rest,
        [1 | 2, ..] => {
            return Err(StoreError::Corrupt(format!(
                "events log: entry of {} bytes",
                v.len()
            )))
        }
        [version, ..] => {
            return Err(StoreError::Corrupt(format!(
                "events log: unsupported format version {version}"
            )))
        }
        [] => return Err(StoreError::Corrupt("events log: empty entry".into())),
    };
    body.chunks_exact(POINTER_LEN)
        .map(|p| {
            let mut id = [0; 16];
            id.copy_from_slice(&p[..16]);
            Ok(EventPointer {
                id,
                first: be_u64(&p[16..24], "events log")?,
                last: be_u64(&p[24..32], "events log")?,
                at_ms: be_u64(&p[32..40], "events log")?,
            })
        })
        .collect()
}

/// A key handed to the events publisher: generation ++ sequence.
pub(super) fn events_log_key(generation: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&generation.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// What a saga's events take from its record: the fields fixed when it was
/// created (so any later record of the saga gives the same).
pub(super) struct EventSource {
    pub(super) id: String,
    pub(super) definition: Arc<SagaDefinition>,
    pub(super) order: saga_wire::OrderPayload,
    pub(super) correlation_id: String,
    pub(super) created_at_ms: u64,
}

/// A saga record read for its events only: the rest is skipped, not built.
#[derive(Deserialize)]
pub(super) struct EventSourceRecordIn {
    pub(super) saga: EventSourceIn,
}

#[derive(Deserialize)]
pub(super) struct EventSourceIn {
    pub(super) id: String,
    #[serde(default)]
    pub(super) definition: Option<Arc<SagaDefinition>>,
    #[serde(default)]
    pub(super) definition_ref: Option<String>,
    pub(super) order: saga_wire::OrderPayload,
    pub(super) correlation_id: String,
    pub(super) created_at_ms: u64,
}

/// Most events that wait in memory for the publisher.
pub(super) const EVENTS_READY: usize = 16_384;

/// See `Store::events_ready`.
#[derive(Default)]
pub(super) struct EventsReady {
    /// Sequence of the first pointer not yet published.
    pub(super) next: u64,
    /// `(generation, sequence, the events of its entry)`.
    pub(super) queue: std::collections::VecDeque<(u64, u64, Vec<EventRecord>)>,
    /// Events in `queue`.
    pub(super) held: usize,
}

/// Most sagas whose [`EventSource`] the events publisher keeps: a saga's
/// transitions are close together in the log, so most are read once.
pub(super) const EVENT_SOURCES: usize = 8192;

/// The events publisher's recently read [`EventSource`]s, oldest first out.
#[derive(Default)]
pub(super) struct EventSources {
    pub(super) by_id: HashMap<[u8; 16], Arc<EventSource>>,
    pub(super) order: std::collections::VecDeque<[u8; 16]>,
}

/// The event of history entry `h` of the saga `source` describes.
fn event_of(source: &EventSource, h: &HistoryEntry) -> EventRecord {
    EventRecord::build(
        &source.id,
        &source.definition,
        &source.order,
        &source.correlation_id,
        source.created_at_ms,
        h,
    )
}

impl Store {
    /// Opens the events log: its generations (those before the publisher's
    /// cursor are published and dropped), the cursor, the next sequence; a
    /// log of an earlier version is converted first.
    pub(super) fn with_events_log(self) -> Result<Self, StoreError> {
        let cursor = match self.meta.get(EVENTS_CURSOR)? {
            Some(v) if v.len() == 16 => Some((
                be_u64(&v[..8], "events cursor")?,
                be_u64(&v[8..], "events cursor")?,
            )),
            Some(v) => return Err(StoreError::Corrupt(format!("events cursor of {} bytes", v.len()))),
            None => None,
        };
        let mut generations: Vec<u64> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|name| {
                std::str::from_utf8(name)
                    .ok()?
                    .strip_prefix(EVENTS_TREE)
                    .map(str::to_owned)
            })
            .filter_map(|hex| u64::from_str_radix(&hex, 16).ok())
            .collect();
        generations.sort_unstable();
        if let Some((published, _)) = cursor {
            for g in generations.iter().filter(|g| **g < published) {
                self.db.drop_tree(events_tree_name(*g))?;
            }
            generations.retain(|g| *g >= published);
        }
        if generations.is_empty() {
            generations.push(cursor.map_or(0, |(g, _)| g));
        }
        let mut trees = Vec::with_capacity(generations.len());
        let (mut first_pending, mut last) = (None, None);
        for g in generations {
            let tree = self.db.open_tree(events_tree_name(g))?;
            if let Some((k, _)) = tree.first()? {
                first_pending = first_pending.or(Some(be_u64(&k, "events log key")?));
            }
            if let Some((k, _)) = tree.last()? {
                last = last.max(Some(be_u64(&k, "events log key")?));
            }
            trees.push((g, tree));
        }
        let next = last.max(cursor.map(|(_, seq)| seq)).map_or(0, |seq| seq + 1);
        *write_lock(&self.events) = trees;
        *lock(&self.events_cursor) = cursor;
        self.staged().next_event = next;
        lock(&self.events_ready).next = match cursor {
            Some((_, seq)) => seq + 1,
            None => first_pending.unwrap_or(next),
        };
        self.convert_legacy_events()?;
        Ok(self)
    }

    /// The events log's entries after the publisher's cursor, oldest
    /// generation first, each with its log key (generation ++ sequence).
    pub(super) fn events_after_cursor(
        &self,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<EventPointer>), StoreError>> {
        let cursor = *lock(&self.events_cursor);
        let generations = read_lock(&self.events).clone();
        generations.into_iter().flat_map(move |(g, tree)| {
            let from = match cursor {
                Some((published, seq)) if published == g => seq.saturating_add(1),
                Some((published, _)) if published > g => u64::MAX,
                _ => 0,
            };
            tree.range(from.to_be_bytes()..).map(move |kv| {
                let (k, v) = kv?;
                Ok((
                    events_log_key(g, be_u64(&k, "events log key")?),
                    parse_event_pointers(&v)?,
                ))
            })
        })
    }

    /// Events not yet acknowledged by JetStream, whole events-log entries
    /// (group commits) until there are `limit` or more, in commit order,
    /// each with its log key
    /// (the same for the events of one entry). Each event is built from its
    /// history entry and the saga record. A transition whose saga is gone
    /// (pruned by an operator's retention shorter than the publisher's
    /// delay) is skipped with a warning.
    ///
    /// # Errors
    /// sled errors; a corrupt entry.
    pub(crate) fn events_pending(&self, limit: usize) -> Result<Vec<(Vec<u8>, EventRecord)>, StoreError> {
        let mut out = Vec::new();
        {
            // Handed over in memory: the unpublished run that starts at the
            // next entry, if it does.
            let ready = lock(&self.events_ready);
            let run = ready.queue.iter().skip_while(|(_, seq, _)| *seq < ready.next);
            for (expected, (generation, seq, events)) in (ready.next..).zip(run) {
                if *seq != expected || out.len() >= limit {
                    break;
                }
                let key = events_log_key(*generation, *seq);
                out.extend(events.iter().map(|e| (key.clone(), e.clone())));
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
        for entry in self.events_after_cursor() {
            if out.len() >= limit {
                break;
            }
            let (key, pointers) = entry?;
            for p in pointers {
                let Some(source) = self.event_source(&p.id)? else {
                    tracing::warn!(saga_id = %Uuid::from_bytes(p.id), first = p.first, last = p.last,
                                   "saga events skipped: the saga is no longer stored");
                    continue;
                };
                for h in self.history_between(&p.id, p.first, p.last)? {
                    out.push((key.clone(), event_of(&source, &h)));
                }
            }
            if out.is_empty() {
                // Nothing of it to publish: acknowledged now (a later key's
                // acknowledgement covers one after events).
                self.events_published(&[key])?;
            }
        }
        Ok(out)
    }

    /// The creation-time fields of saga `id` for its events (cached).
    pub(super) fn event_source(&self, id: &[u8; 16]) -> Result<Option<Arc<EventSource>>, StoreError> {
        if let Some(source) = lock(&self.event_sources).by_id.get(id) {
            return Ok(Some(source.clone()));
        }
        let Some(bytes) = self.sagas.get(id)? else {
            return Ok(None);
        };
        let r = decode::<EventSourceRecordIn>(&bytes, "saga record")?.saga;
        let definition = self.record_definition(&r.id, r.definition, r.definition_ref)?;
        let source = Arc::new(EventSource {
            id: r.id,
            definition,
            order: r.order,
            correlation_id: r.correlation_id,
            created_at_ms: r.created_at_ms,
        });
        let mut cache = lock(&self.event_sources);
        if cache.order.len() >= EVENT_SOURCES {
            if let Some(old) = cache.order.pop_front() {
                cache.by_id.remove(&old);
            }
        }
        cache.order.push_back(*id);
        cache.by_id.insert(*id, source.clone());
        Ok(Some(source))
    }

    /// Number of events waiting to be published.
    pub(crate) fn events_backlog(&self) -> usize {
        self.events_after_cursor()
            .filter_map(Result::ok)
            .flat_map(|(_, pointers)| pointers)
            .map(|p| usize::try_from(p.last.saturating_sub(p.first) + 1).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add)
    }

    /// Time of the oldest transition whose events wait to be published.
    pub(super) fn oldest_pending_event_ms(&self) -> Result<Option<u64>, StoreError> {
        self.events_after_cursor()
            .next()
            .transpose()
            .map(|e| e.and_then(|(_, pointers)| pointers.iter().map(|p| p.at_ms).min()))
    }

    /// Records that JetStream acknowledged the events up to the largest of
    /// `keys` (not flushed: re-publishing after a crash is deduplicated by
    /// JetStream on `Nats-Msg-Id`). Drops the generations wholly published;
    /// starts a new generation once the current one holds
    /// `events_rotate` (`EVENTS_ROTATE`) published pointers.
    ///
    /// # Errors
    /// sled errors; a malformed key.
    pub(crate) fn events_published(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let Some(max) = keys.iter().max() else {
            return Ok(());
        };
        if max.len() != 16 {
            return Err(StoreError::Corrupt(format!(
                "events log key of {} bytes",
                max.len()
            )));
        }
        let at = (
            be_u64(&max[..8], "events log key")?,
            be_u64(&max[8..], "events log key")?,
        );
        if lock(&self.events_cursor).is_some_and(|c| c >= at) {
            return Ok(());
        }
        // One publisher: nothing moves the cursor between the check and here.
        *lock(&self.events_cursor) = Some(at);
        let (generation, seq) = at;
        {
            let mut ready = lock(&self.events_ready);
            ready.next = seq + 1;
            while ready.queue.front().is_some_and(|(_, s, _)| *s <= seq) {
                if let Some((_, _, events)) = ready.queue.pop_front() {
                    ready.held = ready.held.saturating_sub(events.len());
                }
            }
        }
        let (dropped, rotate) = {
            let generations = read_lock(&self.events);
            let dropped = generations.iter().any(|(g, _)| *g < generation);
            let rotate = match generations.last() {
                Some((g, tree)) if *g == generation => match tree.first()? {
                    Some((k, _)) => seq >= be_u64(&k, "events log key")?.saturating_add(self.events_rotate),
                    None => false,
                },
                _ => false,
            };
            (dropped, rotate)
        };
        let save_due = lock(&self.cursor_saved).is_none_or(|(t, _)| t.elapsed() >= self.cursor_save_every);
        if dropped || rotate || save_due {
            // Before a generation goes: a stored cursor must never point before a dropped one.
            self.save_events_cursor()?;
        }
        if !dropped && !rotate {
            return Ok(());
        }
        let mut gone = Vec::new();
        {
            let mut generations = write_lock(&self.events);
            generations.retain(|(g, _)| {
                let keep = *g >= generation;
                if !keep {
                    gone.push(*g);
                }
                keep
            });
            if rotate {
                let next = generation + 1;
                generations.push((next, self.db.open_tree(events_tree_name(next))?));
            }
        }
        // No transaction writes to a generation that is not the last.
        for g in gone {
            self.db.drop_tree(events_tree_name(g))?;
        }
        Ok(())
    }
}

impl Store {
    /// Stores the publisher's cursor as it is in memory (not flushed: the
    /// next flush covers it), if it moved since it was last stored.
    ///
    /// # Errors
    /// sled errors.
    pub(super) fn save_events_cursor(&self) -> Result<(), StoreError> {
        let mut saved = lock(&self.cursor_saved);
        let Some(cursor) = *lock(&self.events_cursor) else {
            return Ok(());
        };
        if saved.is_none_or(|(_, stored)| stored != cursor) {
            self.meta
                .insert(EVENTS_CURSOR, events_log_key(cursor.0, cursor.1))?;
            metrics::counter!(crate::telemetry::STORE_WRITES).increment(1);
        }
        *saved = Some((std::time::Instant::now(), cursor));
        Ok(())
    }
}
