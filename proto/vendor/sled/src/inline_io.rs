//! Log writes on the calling thread (a patch of this vendored copy).
//!
//! sled hands each sealed log buffer to a thread of its I/O pool and the
//! flushing thread waits for it on a condition variable: two thread hand-offs
//! per buffer. A thread that only commits and flushes (a group commit) gains
//! nothing from them; inside [`with_inline_log_writes`] the buffers that its
//! own operations seal are written (and synced) by it instead.

use std::cell::Cell;

thread_local! {
    static INLINE: Cell<bool> = Cell::new(false);
}

/// Runs `f` with the log buffers that this thread seals written by this
/// thread, not by sled's I/O pool. Use it only on threads that may block on
/// disk I/O (never on an async runtime's worker).
pub fn with_inline_log_writes<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            let was = self.0;
            INLINE.with(|c| c.set(was));
        }
    }
    let _reset = Reset(INLINE.with(|c| c.replace(true)));
    f()
}

/// Whether this thread writes the log buffers it seals itself.
pub(crate) fn active() -> bool {
    INLINE.with(Cell::get)
}
