//! The versioned envelope every stored value is written in (`{"v":1,…}`,
//! JSON), shared by the sled and the jetstream stores: one place decides
//! the format version and refuses an unknown one as corrupt data. Pure
//! functions; no I/O here.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::StoreError;

/// Format version of every stored value.
pub(crate) const FORMAT: u32 = 1;

#[derive(Serialize)]
pub(crate) struct Versioned<T> {
    pub(crate) v: u32,
    #[serde(flatten)]
    pub(crate) value: T,
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Versioned { v: FORMAT, value })
        .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

/// The format version of a stored value, read on its own.
#[derive(Deserialize)]
pub(crate) struct Version {
    pub(crate) v: u32,
}

/// Decodes a value [`encode`] wrote: the version first, then the value from
/// the same bytes (its `v` is an unknown field the value ignores). Two
/// passes, but neither buffers: `#[serde(flatten)]` on the way in would make
/// serde copy every value into an intermediate tree first.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("{what}: {e}"));
    let Version { v } = serde_json::from_slice(bytes).map_err(corrupt)?;
    if v != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "{what}: unsupported format version {v}"
        )));
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}
