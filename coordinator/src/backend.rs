//! Which store the coordinator runs on, as `--store` names it. Only the
//! wiring in `lib.rs` reads this: everything else holds a
//! [`crate::store::SharedStore`] and asks its capabilities, never its kind.

/// Which store, chosen by `--store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// sled on local disk (default).
    Sled,
    /// JetStream KV buckets, shared by several coordinators.
    Jetstream,
}
