//! The wall clock, read in one place: the runner passes the time into the
//! pure engine, the API and the cluster code compare against it. A leaf
//! module: it must not import any other module of the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time, ms since the Unix epoch (0 before the epoch, saturated
/// far in the future), so callers never handle a clock error.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
