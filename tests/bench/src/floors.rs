//! The floors: what this machine can do at best, measured in the same run
//! as the engine so that ratios hold on a noisy, shared machine.
//!
//! - NATS request-reply against the same nats-server, with a trivial
//!   responder task in this process (its own connection, as a participant
//!   has): the sequential round trip and the throughput with C in flight.
//!   Payloads are the size of a real command and reply.
//! - sled, in a temp dir on the same file system as the engine's data:
//!   insert + flush per write, and 100 inserts per flush.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::StreamExt;

use super::drive::histogram;

const SUBJECT: &str = "bench.floor.echo";

/// NATS request-reply floor.
#[derive(Debug, Clone)]
pub(crate) struct NatsFloor {
    /// Sequential round trip, µs.
    pub(crate) rtt_p50_us: f64,
    pub(crate) rtt_p99_us: f64,
    /// `(in flight, requests/s)`.
    pub(crate) throughput: Vec<(usize, f64)>,
}

impl NatsFloor {
    /// Requests/s at `c` in flight.
    pub(crate) fn at(&self, c: usize) -> Option<f64> {
        self.throughput.iter().find(|(k, _)| *k == c).map(|(_, v)| *v)
    }
}

/// Measures the NATS floor between two connections: `round_trips`
/// sequential requests, then `each` of load per concurrency.
///
/// # Errors
/// A request that was not answered.
pub(crate) async fn nats(
    responder: async_nats::Client,
    requester: async_nats::Client,
    round_trips: usize,
    concurrencies: &[usize],
    each: Duration,
) -> Result<NatsFloor> {
    let mut sub = responder.subscribe(SUBJECT).await?;
    responder.flush().await?;
    let reply_body = bytes_of(60);
    let task = {
        let responder = responder.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    let _ = responder.publish(reply, reply_body.clone()).await;
                }
            }
        })
    };
    let command = bytes_of(400);
    // The responder's SUB reaches the server asynchronously (async-nats' flush
    // only drains the socket): wait until the subject has a responder.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = requester.request(SUBJECT, command.clone()).await {
        if Instant::now() > deadline {
            return Err(e).context("NATS floor: the responder never answered");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Warm up the connections and the subscription.
    for _ in 0..50 {
        requester
            .request(SUBJECT, command.clone())
            .await
            .context("NATS floor: warm-up request")?;
    }
    let mut h = histogram();
    for _ in 0..round_trips {
        let t = Instant::now();
        requester
            .request(SUBJECT, command.clone())
            .await
            .context("NATS floor: sequential request")?;
        let _ = h.record(
            u64::try_from(t.elapsed().as_nanos() / 1000)
                .unwrap_or(u64::MAX)
                .max(1),
        );
    }
    let mut throughput = Vec::new();
    for &c in concurrencies {
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + each;
        let mut tasks = Vec::with_capacity(c);
        for _ in 0..c {
            let (requester, command, done) = (requester.clone(), command.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    requester
                        .request(SUBJECT, command.clone())
                        .await
                        .with_context(|| format!("NATS floor: request with {c} in flight"))?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        throughput.push((
            c,
            done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        ));
    }
    task.abort();
    Ok(NatsFloor {
        rtt_p50_us: h.value_at_quantile(0.5) as f64,
        rtt_p99_us: h.value_at_quantile(0.99) as f64,
        throughput,
    })
}

fn bytes_of(n: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; n])
}

/// sled floor.
#[derive(Debug, Clone)]
pub(crate) struct SledFloor {
    /// insert + flush, median µs.
    pub(crate) flush_p50_us: f64,
    /// insert + flush, writes/s.
    pub(crate) per_write_per_s: f64,
    /// 100 inserts per flush, writes/s.
    pub(crate) batched_per_s: f64,
}

/// Measures the sled floor in `dir` (removed afterwards).
///
/// # Errors
/// sled errors.
pub(crate) fn sled(dir: &Path, writes: usize, batches: usize) -> Result<SledFloor> {
    let db = sled::Config::new()
        .path(dir)
        .open()
        .context("opening the sled floor db")?;
    let value = vec![b'v'; 300];
    let key = |i: u64| i.to_be_bytes();
    for i in 0..20u64 {
        db.insert(key(i), value.as_slice())?;
        db.flush()?;
    }
    let mut h = histogram();
    let start = Instant::now();
    for i in 0..writes as u64 {
        let t = Instant::now();
        db.insert(key(1_000 + i), value.as_slice())?;
        db.flush()?;
        let _ = h.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
    }
    let per_write_per_s = writes as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut n = 10_000_000u64;
    for _ in 0..batches {
        for _ in 0..100 {
            db.insert(key(n), value.as_slice())?;
            n += 1;
        }
        db.flush()?;
    }
    let batched_per_s = (batches * 100) as f64 / start.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Ok(SledFloor {
        flush_p50_us: h.value_at_quantile(0.5) as f64,
        per_write_per_s,
        batched_per_s,
    })
}
