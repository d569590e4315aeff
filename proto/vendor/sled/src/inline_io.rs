//! Log writes on the calling thread (a patch of this vendored copy).
//!
//! sled hands each sealed log buffer to a thread of its I/O pool and the
//! flushing thread waits for it on a condition variable: two thread hand-offs
//! per buffer. A thread that only commits and flushes (a group commit) gains
//! nothing from them; inside [`with_inline_log_writes`] the buffers that its
//! own operations seal are written by it instead.
//!
//! A transaction seals two or three buffers (what was written before it,
//! its batch manifest, its writes), each synced on its own. Inside the scope
//! a buffer is written at once but its sync waits in this thread's pending
//! list, and one `sync_file_range` over all of them settles the list. It is
//! settled before this thread waits for the stable lsn, before it blocks on
//! sled's concurrency-control lock, and when the scope ends: a thread never
//! waits on anything while holding back the stable lsn others may wait for.
//!
//! Inside [`with_deferred_log_writes`] (a thread that must not block on
//! I/O) a sealed buffer is not written at all: it waits in a queue of the
//! log that the next thread to wait for the stable lsn writes and settles.

use std::cell::{Cell, RefCell};
use std::convert::TryFrom;

use crate::pagecache::{IoBufs, Written};
use crate::{Arc, Result};

thread_local! {
    static INLINE: Cell<bool> = Cell::new(false);
    static DEFER: Cell<bool> = Cell::new(false);
    static PENDING: RefCell<Vec<(Arc<IoBufs>, Written)>> = RefCell::new(Vec::new());
}

/// Runs `f` with the log buffers that this thread seals written by this
/// thread, not by sled's I/O pool. Use it only on threads that may block on
/// disk I/O (never on an async runtime's worker). Everything written is
/// synced before it returns; a failed sync is stored as sled's error, so
/// the next operation reports it.
pub fn with_inline_log_writes<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            // A failure is sled's global error now, seen by every later call.
            let _ = settle();
            let was = self.0;
            INLINE.with(|c| c.set(was));
        }
    }
    let _reset = Reset(INLINE.with(|c| c.replace(true)));
    f()
}

/// Runs `f` with the log buffers that this thread seals left for the next
/// thread that waits for them to be stable (a flush, inside
/// [`with_inline_log_writes`] or not; sled's own flusher thread at the
/// latest), which writes them and syncs them all with its own. For threads
/// that must not block on disk I/O (an async runtime's workers) and whose
/// writes are always followed by a flush: nothing written inside `f` is on
/// disk before that flush, where outside `f` sled's I/O pool would be writing
/// it meanwhile, with a thread hand-off and a sync per buffer.
pub fn with_deferred_log_writes<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            let was = self.0;
            DEFER.with(|c| c.set(was));
        }
    }
    let _reset = Reset(DEFER.with(|c| c.replace(true)));
    f()
}

/// Whether this thread leaves the log buffers it seals for a flush.
pub(crate) fn deferring() -> bool {
    DEFER.with(Cell::get)
}

/// Whether this thread writes the log buffers it seals itself.
pub(crate) fn active() -> bool {
    INLINE.with(Cell::get)
}

/// Keeps a written buffer's sync for the next [`settle`].
pub(crate) fn defer(iobufs: Arc<IoBufs>, written: Written) {
    PENDING.with(|p| p.borrow_mut().push((iobufs, written)));
}

/// Whether this thread holds writes not yet synced.
pub(crate) fn pending() -> bool {
    PENDING.with(|p| !p.borrow().is_empty())
}

/// Syncs this thread's pending writes (one call per log file, over the
/// range that covers them all), then marks them stable in the order they
/// were written. On a failure every pending write is dropped unmarked and
/// the error is stored for every waiter, as the I/O pool's task does.
pub(crate) fn settle() -> Result<()> {
    let mut pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let mut result = Ok(());
    while !pending.is_empty() {
        let iobufs = pending[0].0.clone();
        let (same, rest): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(i, _)| std::ptr::eq::<IoBufs>(&**i, &*iobufs));
        pending = rest;
        let start = same.iter().map(|(_, w)| w.log_offset).min().unwrap_or(0);
        let end = same
            .iter()
            .map(|(_, w)| w.log_offset + w.total_len as u64)
            .max()
            .unwrap_or(start);
        let synced = iobufs
            .sync_range(start, usize::try_from(end - start).unwrap_or(usize::MAX))
            .and_then(|()| same.iter().try_for_each(|(_, w)| iobufs.after_sync(w)));
        if let Err(e) = synced {
            let lsn = same.first().map_or(0, |(_, w)| w.base_lsn);
            result = Err(iobufs.fail_write(lsn, e));
        }
    }
    result
}
