//! Pieces shared by everything that runs a NATS JetStream cluster on
//! loopback (the cluster tests and `saga-bench --store jetstream`): the
//! nodes' command lines, waiting for a meta leader, and reading the
//! coordinators' partition leases.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use futures::TryStreamExt;

/// The arguments of node `i` of a cluster whose nodes listen for clients on
/// `client` ports and for routes on `route` ports, JetStream stored in
/// `dir/nats-<i>`.
pub fn node_args(dir: &Path, i: usize, client: &[u16], route: &[u16], cluster_name: &str) -> Vec<String> {
    let routes = route
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        client[i].to_string(),
        "-n".into(),
        format!("node-{i}"),
        "-js".into(),
        "-sd".into(),
        dir.join(format!("nats-{i}")).display().to_string(),
        "--cluster_name".into(),
        cluster_name.into(),
        "--cluster".into(),
        format!("nats://127.0.0.1:{}", route[i]),
        "--routes".into(),
        routes,
    ]
}

/// Connects to comma-separated `urls` and waits until JetStream answers (on
/// a cluster: a meta leader is elected); `alive` is asked between attempts
/// and ends the wait with its error (a node that exited).
///
/// # Errors
/// Not within 60 s, or `alive` failed.
pub async fn jetstream_ready(
    urls: &str,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let client = async_nats::connect(urls.split(',').map(str::trim).collect::<Vec<_>>()).await?;
            let js = async_nats::jetstream::new(client.clone());
            tokio::time::timeout(Duration::from_secs(2), js.query_account()).await??;
            anyhow::Ok(client)
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("JetStream on {urls} not ready within 60s")))
            }
            Err(_) => {
                alive()?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

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
    let kv = js.get_key_value(coordinator::cluster::LEASES_BUCKET).await?;
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
