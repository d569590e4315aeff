//! Saga events for the rest of the system: every history entry of every saga,
//! published to the JetStream stream `SAGA_EVENTS` on
//! `saga.events.<definition>.<event>` (and under the definition's domain
//! alias, e.g. `orders.completed`) AFTER the transition that made it is
//! durable.
//!
//! With sled the store logs a pointer to each transition's history entries
//! in the same transaction as the entries (the events log, see `store`);
//! with jetstream it keeps them in memory until they are out. This module
//! reads what is pending, makes sure it is durable (the runner's group
//! commit usually covered it already, else one flush), publishes in commit
//! order (per saga, in sequence) and then records how far it got. So a
//! crash neither loses an event (a committed one is still pending and is
//! published on the next start) nor invents one (no event exists without
//! its committed transition). A crash after the publish but before the
//! record re-publishes on restart; the `Nats-Msg-Id` header
//! (`<saga_id>:<sequence>`, `…:<alias>` for the alias copy) makes JetStream
//! drop the copy inside the stream's duplicate window. Consumers that may see
//! a re-publish after a longer outage dedupe on `(saga_id, sequence)`.
//!
//! It never decides anything about sagas and never blocks them: while
//! JetStream is unreachable events wait in sled and publication is retried
//! with backoff.

use std::{collections::BTreeSet, time::Duration};

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{store::SharedStore, telemetry};

/// Most events published before their acknowledgements are awaited.
const BATCH: usize = 256;

/// The default linger: at low load, the events of a saga's commits go out in
/// one burst instead of one each (issue 18 measured it; docs/benchmarks.md).
pub(crate) const DEFAULT_LINGER: Duration = Duration::from_millis(5);

/// The events stream's default size bound: 1 GiB (docs/events.md says how to size it).
pub(crate) const DEFAULT_MAX_BYTES: i64 = 1 << 30;

/// Where and how events are kept.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// Publish events at all.
    pub enabled: bool,
    /// Stream name.
    pub stream: String,
    /// Oldest event the stream keeps (zero: no age limit).
    pub max_age: Duration,
    /// Largest size of the stream in bytes (-1: no limit); oldest events go first.
    /// Applied on every start, so a changed limit reaches an existing stream.
    pub max_bytes: i64,
    /// Replicas of the stream (1 on a single server, 3 on the compose cluster).
    pub replicas: usize,
    /// Window in which JetStream drops a re-published event with the same `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Wait this long after a wake-up from idle before publishing (zero: at once).
    pub linger: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            enabled: true,
            stream: "SAGA_EVENTS".into(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: DEFAULT_MAX_BYTES,
            replicas: 1,
            duplicate_window: Duration::from_secs(10 * 60),
            linger: DEFAULT_LINGER,
        }
    }
}

/// Wakes the publisher after a flush that wrote events; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct EventsWake(std::sync::Arc<Notify>);

impl EventsWake {
    /// There are new durable events.
    pub(crate) fn wake(&self) {
        self.0.notify_one();
    }
}

/// Publishes the events outbox until `shutdown`.
pub(crate) async fn run(
    store: SharedStore,
    client: async_nats::Client,
    config: EventsConfig,
    wake: EventsWake,
    shutdown: CancellationToken,
) {
    let js = jetstream::new(client.clone());
    let mut subjects: BTreeSet<String> = BTreeSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut stream_ready = false;
    let mut counted = std::time::Instant::now();
    // Whether the last read found nothing: the next events wait for the linger.
    let mut caught_up = false;
    // On start, events or not: the stream's limits are the flags' (a changed
    // `--events-max-bytes` reaches an existing stream), its alias subjects kept.
    let start = async {
        let own = format!("{}.>", saga_wire::EVENTS_SUBJECT_PREFIX);
        let mut existing = BTreeSet::new();
        if let Ok(stream) = js.get_stream(&config.stream).await {
            existing.extend(
                stream
                    .cached_info()
                    .config
                    .subjects
                    .iter()
                    .filter(|s| **s != own)
                    .cloned(),
            );
        }
        ensure_stream(&js, &config, &existing).await.map(|()| existing)
    };
    tokio::select! {
        _ = shutdown.cancelled() => return,
        r = start => match r {
            Ok(existing) => {
                subjects = existing;
                stream_ready = true;
            }
            Err(e) => warn!(error = %e, "events stream not set up yet; retried with the first events"),
        },
    }
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let pending = match store.events_pending(BATCH) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the events outbox");
                Vec::new()
            }
        };
        // Counting the outbox walks it: only when the batch did not hold all of
        // it, and at most once a second.
        if pending.len() < BATCH {
            metrics::gauge!(telemetry::EVENTS_BACKLOG).set(pending.len() as f64);
        } else if counted.elapsed() >= Duration::from_secs(1) {
            metrics::gauge!(telemetry::EVENTS_BACKLOG).set(store.events_backlog() as f64);
            counted = std::time::Instant::now();
        }
        if pending.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                // Woken with commands and replies: they go out on the
                // connection first (the runner's release says why).
                _ = wake.0.notified() => tokio::task::yield_now().await,
                // A safety net: events written by a path that did not wake us.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            caught_up = true;
            continue;
        }
        // After idle, a linger lets the commits that follow share one burst
        // (and its acknowledgements); a full batch goes at once.
        if std::mem::take(&mut caught_up) && !config.linger.is_zero() && pending.len() < BATCH {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(config.linger) => {}
            }
            continue;
        }
        let result = async {
            // Publish only what is durable: these events were read after their commit;
            // unless the runner's group commit already covered every write, flush.
            store
                .ensure_durable()
                .await
                .map_err(|e| format!("flush before publishing: {e}"))?;
            // Every alias subject must be one of the stream's subjects before it is published to.
            let aliases: BTreeSet<String> = pending.iter().filter_map(|(_, r)| r.alias.clone()).collect();
            if !stream_ready || !aliases.is_subset(&subjects) {
                subjects.extend(aliases);
                ensure_stream(&js, &config, &subjects).await?;
                stream_ready = true;
            }
            publish(&js, &pending).await
        }
        .await;
        match result {
            Ok(duplicates) => {
                let keys: Vec<Vec<u8>> = pending.iter().map(|(k, _)| k.clone()).collect();
                if let Err(e) = store.events_published(&keys) {
                    warn!(error = %e, "cannot remove published events from the outbox");
                }
                metrics::counter!(telemetry::EVENTS_PUBLISHED).increment(keys.len() as u64);
                if duplicates > 0 {
                    info!(
                        duplicates,
                        "events re-published after a restart were dropped by JetStream"
                    );
                }
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, pending = pending.len(),
                      "cannot publish saga events; they wait in the outbox");
                stream_ready = false;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Creates the stream, or updates its subjects and limits.
async fn ensure_stream(
    js: &jetstream::Context,
    config: &EventsConfig,
    aliases: &BTreeSet<String>,
) -> Result<(), String> {
    let mut subjects = vec![format!("{}.>", saga_wire::EVENTS_SUBJECT_PREFIX)];
    subjects.extend(aliases.iter().cloned());
    let wanted = stream::Config {
        name: config.stream.clone(),
        subjects,
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        num_replicas: config.replicas.max(1),
        duplicate_window: config.duplicate_window,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    // An existing stream is updated: a changed size or age limit is applied on start.
    let info = js
        .create_or_update_stream(wanted)
        .await
        .map_err(|e| format!("stream {}: {e}", config.stream))?;
    debug!(stream = %config.stream, ?aliases, max_bytes = info.config.max_bytes,
           max_age = ?info.config.max_age, "events stream ready");
    Ok(())
}

/// Publishes a batch (pipelined), then awaits every acknowledgement in order.
/// Returns how many JetStream reported as duplicates.
async fn publish(
    js: &jetstream::Context,
    batch: &[(Vec<u8>, crate::store::EventRecord)],
) -> Result<usize, String> {
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(batch.len() * 2);
    for (_, record) in batch {
        let e = &record.event;
        let body = serde_json::to_vec(e).map_err(|err| err.to_string())?;
        let id = format!("{}:{}", e.saga_id, e.sequence);
        let message = |msg_id: String| {
            jetstream::message::PublishMessage::build()
                .payload(body.clone().into())
                .message_id(msg_id)
                .header(saga_wire::CORRELATION_HEADER, e.correlation_id.as_str())
        };
        acks.push(
            js.send_publish(record.subject.clone(), message(id.clone()))
                .await
                .map_err(|err| format!("publish {}: {err}", record.subject))?,
        );
        if let Some(alias) = &record.alias {
            acks.push(
                js.send_publish(alias.clone(), message(format!("{id}:{alias}")))
                    .await
                    .map_err(|err| format!("publish {alias}: {err}"))?,
            );
        }
    }
    let mut duplicates = 0;
    for ack in acks {
        let ack = ack.await.map_err(|e| format!("publish ack: {e}"))?;
        if ack.duplicate {
            duplicates += 1;
        }
    }
    Ok(duplicates)
}
