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

/// How [`encode`] begins every value of format [`FORMAT`]: `v` is its first
/// key, and serde_json writes no whitespace.
const CURRENT_PREFIX: &[u8] = b"{\"v\":1,";

/// Decodes a value [`encode`] wrote: the version first, then the value from
/// the same bytes (its `v` is an unknown field the value ignores). Neither
/// pass buffers (`#[serde(flatten)]` on the way in would make serde copy
/// every value into an intermediate tree first). A value that begins as
/// [`encode`] writes the current format is read in one pass: the version
/// pass walks the whole value to find `v`, and was half of a read's decoding.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("{what}: {e}"));
    if bytes.starts_with(CURRENT_PREFIX) {
        return serde_json::from_slice(bytes).map_err(corrupt);
    }
    let Version { v } = serde_json::from_slice(bytes).map_err(corrupt)?;
    if v != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "{what}: unsupported format version {v}"
        )));
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Value {
        a: u32,
        b: String,
    }

    #[test]
    fn a_value_reads_back_whether_or_not_it_begins_as_encode_writes() {
        let value = Value { a: 7, b: "x".into() };
        let bytes = encode(&value).expect("encode");
        assert!(
            bytes.starts_with(CURRENT_PREFIX),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(decode::<Value>(&bytes, "value").expect("decode"), value);
        // The same value written another way (key order, spaces) takes the two passes.
        for other in [
            &br#"{"a":7,"v":1,"b":"x"}"#[..],
            br#"{ "v": 1, "a": 7, "b": "x" }"#,
        ] {
            assert_eq!(decode::<Value>(other, "value").expect("decode"), value);
        }
    }

    #[test]
    fn another_format_version_is_refused_however_it_is_written() {
        for bytes in [
            &br#"{"v":2,"a":7,"b":"x"}"#[..],
            br#"{"v":10,"a":7,"b":"x"}"#,
            br#"{"a":7,"b":"x","v":2}"#,
            br#"{"a":7,"b":"x"}"#,
        ] {
            assert!(
                matches!(decode::<Value>(bytes, "value"), Err(StoreError::Corrupt(_))),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
