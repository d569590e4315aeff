//! `ListSagas` on sled: which index a query scans, and the attribute index
//! (`by_attr`) its customer, order and definition filters read. A saga's
//! entries are written once, with its creation (those fields never change),
//! and removed with it by retention; a store written by an earlier version
//! is indexed once on open.

use std::ops::Bound;

use uuid::Uuid;

use super::Store;
use crate::{
    engine::{Saga, StateTag},
    store::{
        codec::decode,
        keys::{attr_key, attr_prefix, saga_key, state_key, Attr},
        query::{Summary, SCAN_BUDGET},
        ListQuery, Page, StoreError,
    },
};

/// `meta` key set once every saga in `sagas` has its `by_attr` entries.
pub(super) const ATTR_INDEX_BUILT: &[u8] = b"attr-index-v1";

/// Sagas indexed per batch when an earlier version's store is indexed.
const INDEX_BATCH: usize = 10_000;

/// The `by_attr` keys of `saga`: its customer, its order id and its
/// definition's name.
pub(super) fn attr_keys(saga: &Saga) -> Result<[Vec<u8>; 3], StoreError> {
    let id = saga_key(&saga.id)?;
    Ok([
        attr_key(Attr::Customer, &saga.order.customer_id, &id),
        attr_key(Attr::Order, &saga.order.order_id, &id),
        attr_key(Attr::Definition, &saga.definition.name, &id),
    ])
}

/// Which tree a query scans and the key prefix its entries share there.
enum Source {
    Attr(Vec<u8>),
    State(Vec<u8>),
    All,
}

impl Source {
    /// The most selective index for `q`: an order id names one or a few
    /// sagas, a customer some, a definition or a state many.
    fn for_query(q: &ListQuery) -> Self {
        if let Some(o) = &q.order_id {
            Source::Attr(attr_prefix(Attr::Order, o))
        } else if let Some(c) = &q.customer_id {
            Source::Attr(attr_prefix(Attr::Customer, c))
        } else if let Some(d) = q.definition_name() {
            Source::Attr(attr_prefix(Attr::Definition, d))
        } else if let Some(tag) = q.state {
            Source::State(vec![tag as u8])
        } else {
            Source::All
        }
    }

    fn prefix(&self) -> &[u8] {
        match self {
            Source::Attr(p) | Source::State(p) => p,
            Source::All => &[],
        }
    }
}

impl Store {
    /// A page of the sagas `q` accepts, in its direction, scanning the most
    /// selective index `q` allows over the id range of its time filters
    /// (ids are UUID v7: key order is creation order), at most
    /// [`SCAN_BUDGET`] candidates.
    ///
    /// # Errors
    /// sled errors; a corrupt record or index key.
    pub(crate) fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        self.list_within(q, SCAN_BUDGET)
    }

    /// [`Store::list`] examining at most `budget` candidates.
    pub(super) fn list_within(&self, q: &ListQuery, budget: usize) -> Result<Page, StoreError> {
        let source = Source::for_query(q);
        let tree = match source {
            Source::Attr(_) => &self.by_attr,
            Source::State(_) => &self.by_state,
            Source::All => &self.sagas,
        };
        let prefix = source.prefix();
        let key = |id: &[u8; 16]| [prefix, id].concat();
        let (lo, hi) = q.id_bounds();
        let (lo, hi) = (key(&lo), key(&hi));
        let (mut from, mut to) = (Bound::Included(lo.clone()), Bound::Included(hi.clone()));
        if let Some(after) = q.after {
            let k = key(after.as_bytes());
            match q.newest_first {
                false if k >= lo => from = Bound::Excluded(k),
                true if k <= hi => to = Bound::Excluded(k),
                _ => {}
            }
        }
        if range_is_empty(&from, &to) {
            return Ok(Page {
                sagas: Vec::new(),
                next: None,
            });
        }
        let scan = tree.range::<Vec<u8>, _>((from, to));
        let scan: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match q.newest_first {
            true => Box::new(scan.rev()),
            false => Box::new(scan),
        };
        let (mut sagas, mut examined, mut next) = (Vec::new(), 0, None);
        let mut last: Option<Uuid> = None;
        for kv in scan {
            let (k, v) = kv?;
            if sagas.len() == q.limit || examined == budget {
                next = last;
                break;
            }
            let id = k
                .get(prefix.len()..)
                .and_then(|b| Uuid::from_slice(b).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("list index key of {} bytes", k.len())))?;
            examined += 1;
            last = Some(id);
            let summary = match (&source, q.state) {
                (Source::State(_), Some(tag)) => self.indexed_summary(tag, &id, &v)?,
                // The state index answers a state filter without reading the record.
                (Source::Attr(_), Some(tag)) => match self.by_state.get(state_key(tag, id.as_bytes()))? {
                    Some(v) => self.indexed_summary(tag, &id, &v)?,
                    None => continue,
                },
                // The scan reads the records themselves.
                (Source::All, _) => self.record_summary(&id, &v)?,
                (Source::Attr(_) | Source::State(_), None) => self.get(&id)?.map(|s| Summary::of(&s)),
            };
            // A saga can be pruned between the scan and the read; skipped then.
            if let Some(s) = summary.filter(|s| q.matches(s)) {
                sagas.push(s);
            }
        }
        Ok(Page { sagas, next })
    }

    /// The summary of saga `id` from its `by_state` entry `value` under
    /// `tag`: the summary a terminal saga's entry holds, else (an active
    /// saga's entry, or one an earlier version wrote) from its record.
    fn indexed_summary(&self, tag: StateTag, id: &Uuid, value: &[u8]) -> Result<Option<Summary>, StoreError> {
        if value.is_empty() {
            return Ok(self.get(id)?.map(|s| Summary::of(&s)));
        }
        let stored = decode(value, "state index summary")?;
        Ok(Some(Summary::from_stored(id, tag, stored)))
    }

    /// The summary of saga `id` from its record `value` as a scan of
    /// `sagas` found it: an ended saga's needs nothing else, an active
    /// saga's the journal entries after it (the record again only when a
    /// newer snapshot was written since the scan read it).
    fn record_summary(&self, id: &Uuid, value: &[u8]) -> Result<Option<Summary>, StoreError> {
        let (saga, latest) = self.decode_snapshot(value)?;
        let saga = match latest {
            true => Some(saga),
            false => match self.fold_after(id.as_bytes(), saga)? {
                Some(saga) => Some(saga),
                None => self.get(id)?,
            },
        };
        Ok(saga.map(|s| Summary::of(&s)))
    }

    /// Writes the `by_attr` entries of every saga, once, for a store an
    /// earlier version wrote (a new store is marked at once). Entries are
    /// idempotent: a crash part way through means doing it again.
    pub(super) fn with_attr_index(self) -> Result<Self, StoreError> {
        if self.meta.contains_key(ATTR_INDEX_BUILT)? {
            return Ok(self);
        }
        let (mut batch, mut in_batch, mut indexed) = (sled::Batch::default(), 0, 0usize);
        for kv in self.sagas.iter() {
            let (_, v) = kv?;
            // Customer, order and definition are fixed at creation: the snapshot has them.
            for k in attr_keys(&self.decode_record(&v)?)? {
                batch.insert(k, &[]);
            }
            in_batch += 1;
            if in_batch == INDEX_BATCH {
                self.by_attr.apply_batch(std::mem::take(&mut batch))?;
                indexed += in_batch;
                in_batch = 0;
            }
        }
        self.by_attr.apply_batch(batch)?;
        indexed += in_batch;
        self.meta.insert(ATTR_INDEX_BUILT, &[1u8][..])?;
        self.db.flush()?;
        if indexed > 0 {
            tracing::info!(
                sagas = indexed,
                "sagas indexed by customer, order and definition (upgrade)"
            );
        }
        Ok(self)
    }
}

fn range_is_empty(from: &Bound<Vec<u8>>, to: &Bound<Vec<u8>>) -> bool {
    match (from, to) {
        (Bound::Included(a), Bound::Included(b)) => a > b,
        (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => a >= b,
        _ => false,
    }
}
