//! The coordinators' partition leases as the cluster tests and
//! `saga-bench --store jetstream` read them (the NATS cluster itself is
//! [`crate::nats::NatsCluster`]).

use std::collections::BTreeMap;

use anyhow::Result;
use futures::TryStreamExt;

/// A coordinator's lease on a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The coordinator's `--instance-id`.
    pub holder: String,
    /// Until when, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// Every partition lease in the coordinators' leases bucket, by partition.
///
/// # Errors
/// The bucket or a lease cannot be read.
pub async fn leases(client: &async_nats::Client) -> Result<BTreeMap<u32, Lease>> {
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value(coordinator::kv::LEASES_BUCKET).await?;
    let keys: Vec<String> = kv.keys().await?.try_collect().await?;
    let mut out = BTreeMap::new();
    for k in keys.iter().filter(|k| k.starts_with("lease.p")) {
        if let Some(v) = kv.get(k.clone()).await? {
            let lease: serde_json::Value = serde_json::from_slice(&v)?;
            out.insert(
                k.trim_start_matches("lease.p").parse()?,
                Lease {
                    holder: lease["holder"].as_str().unwrap_or_default().to_string(),
                    expires_at_ms: lease["expires_at_ms"].as_u64().unwrap_or(0),
                },
            );
        }
    }
    Ok(out)
}

/// Partition → holder.
///
/// # Errors
/// As [`leases`].
pub async fn holders(client: &async_nats::Client) -> Result<BTreeMap<u32, String>> {
    Ok(leases(client)
        .await?
        .into_iter()
        .map(|(p, l)| (p, l.holder))
        .collect())
}
