//! The `jetstream` store (in progress).

use super::{Scanned, StoreError};

/// The `jetstream` store.
pub struct JsStore;

impl JsStore {
    /// Opens the buckets of `participant`.
    ///
    /// # Errors
    /// Not built yet.
    pub async fn open(
        _client: &async_nats::Client,
        _participant: &str,
        _replicas: usize,
        _retention: std::time::Duration,
    ) -> Result<Self, StoreError> {
        Err(StoreError::JetStream("not built yet".into()))
    }
}

impl super::ParticipantStore for JsStore {
    fn apply_forward<'a>(
        &'a self,
        _: &'a str,
        _: super::Effect<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(saga_wire::Reply, bool), StoreError>> {
        unimplemented!()
    }
    fn apply_compensation<'a>(
        &'a self,
        _: &'a str,
        _: super::Undo<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(saga_wire::Reply, bool), StoreError>> {
        unimplemented!()
    }
    fn stored_reply<'a>(
        &'a self,
        _: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<saga_wire::Reply>, StoreError>> {
        unimplemented!()
    }
    fn update_state<'a>(
        &'a self,
        _: super::Change<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        unimplemented!()
    }
    fn get<'a>(&'a self, _: &'a str) -> futures::future::BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        unimplemented!()
    }
    fn scan<'a>(
        &'a self,
        _: &'a str,
        _: Option<&'a str>,
        _: usize,
    ) -> futures::future::BoxFuture<'a, Result<Scanned, StoreError>> {
        unimplemented!()
    }
    fn probe_writable(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        unimplemented!()
    }
    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        unimplemented!()
    }
    fn prune_replies(&self, _: u64, _: usize) -> futures::future::BoxFuture<'_, Result<usize, StoreError>> {
        unimplemented!()
    }
    fn kind(&self) -> &'static str {
        "jetstream"
    }
}
