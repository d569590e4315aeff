//! Several coordinators on the `jetstream` store: partitions, leases, failover.
//!
//! Every saga belongs to one of `--partitions` partitions (from its id, see
//! [`crate::store::jetstream::partition_of`]). A coordinator runs the sagas of the
//! partitions it holds a **lease** on. Leases live in the JetStream KV bucket
//! `SAGA_LEASES` (`lease.p<n>` → `{"holder","expires_at_ms"}`), next to one
//! heartbeat per coordinator (`member.<instance>`):
//! - every `ttl/4` a coordinator renews its leases with a revision-checked
//!   update (a lease someone else took fails, and the partition is released
//!   at once) and refreshes its heartbeat;
//! - it aims at its fair share, `ceil(partitions / live members)`: it takes
//!   free or expired leases (again revision-checked, so two takers cannot both
//!   win) and, above its share, hands one back per round (a newcomer gets work);
//! - taking a partition loads its running sagas and re-sends their in-flight
//!   commands; a lease not renewed within `ttl` is somebody else's to take, so
//!   a coordinator that dies (kill -9) loses its partitions after at most `ttl`;
//! - every 8 rounds it rescans its partitions' running sagas and resumes any
//!   not running here: a former holder that had not yet noticed its lease was
//!   gone may have created or advanced one after the takeover's load, then let
//!   it go.
//!
//! **Why a lease hand-over cannot split the brain**: the lease only decides
//! who *tries* to run a partition. Every saga write is fenced by the saga
//! record's own KV revision ([`crate::jetstream`]): a coordinator that still
//! believes it holds an expired lease (paused, partitioned away) and writes a
//! saga the new holder already advanced gets "wrong last revision" and drops
//! it; if it writes first, the new holder's next write fails instead and it
//! reloads the saga from that write. Either way each saga has one linear
//! history, and a command re-sent by both is applied once by the participants
//! (same idempotency key). Expiry is judged on the taker's clock: clocks
//! must agree to well within `ttl` (NTP), or a lease is taken early — which
//! costs duplicate re-sends, never a double effect.
//!
//! `CreateOrder` draws the new saga's id inside a partition the receiving
//! coordinator holds (a retry whose key names a saga elsewhere goes to that
//! partition's holder, [`crate::create_forward`]); `GetSaga`/`ListSagas` read
//! the shared store on any coordinator; operator RPCs are forwarded over NATS
//! to the partition's holder (`saga.coordinator.operate.<partition>`).

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, kv};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

pub(crate) use crate::partition::Ownership;
use crate::{
    clock::now_ms,
    engine::{Event, SignalFate, SignalRefused, StateTag},
    ops::{OperateError, Operated},
    partition::partition_of,
    store::{Loaded, PartitionedStore, StoreError},
};

/// Bucket of the leases and heartbeats.
pub const LEASES_BUCKET: &str = "SAGA_LEASES";
/// Rounds (of `ttl/4`) between two rescans of the held partitions.
const RESCAN_EVERY: u64 = 8;
/// Prefix of the subjects operator events are forwarded on (`.<partition>`).
pub(crate) const OPERATE_SUBJECT: &str = "saga.coordinator.operate";

/// What the cluster code asks of the saga runner: run the sagas of a
/// partition taken over, stop running those of one given up, and apply a
/// forwarded operator event. A trait, so this module does not depend on the
/// runner (which draws its ids in the [`Ownership`] this module keeps).
pub(crate) trait SagaHost: Clone + Send + Sync + 'static {
    /// Runs `sagas` with their in-flight commands; returns how many were new.
    fn adopt(&self, sagas: Vec<Loaded>) -> impl Future<Output = Result<usize, OperateError>> + Send;
    /// Stops running the sagas of `partition` (of `partitions`) once what was
    /// decided for them is written; returns their ids.
    fn release(
        &self,
        partition: u32,
        partitions: u32,
    ) -> impl Future<Output = Result<Vec<String>, OperateError>> + Send;
    /// Applies an operator event; answers once its result is durable.
    fn operate(
        &self,
        saga_id: Uuid,
        event: Event,
    ) -> impl Future<Output = Result<Operated, OperateError>> + Send;
}

/// Where an operator event or a signal goes: to this coordinator's runner,
/// or (jetstream store) forwarded to the coordinator holding the saga's partition.
#[derive(Clone)]
pub(crate) struct Router<R> {
    runner: R,
    forward: Option<(async_nats::Client, Ownership)>,
}

impl<R: SagaHost> Router<R> {
    /// Everything to `runner`.
    pub(crate) fn local(runner: R) -> Self {
        Router {
            runner,
            forward: None,
        }
    }

    /// Sagas of partitions not held here go over `nats` to their holder.
    pub(crate) fn forwarding(mut self, nats: async_nats::Client, ownership: Ownership) -> Self {
        self.forward = Some((nats, ownership));
        self
    }

    /// Applies `event` where the saga runs; answers once its result is durable.
    ///
    /// # Errors
    /// As [`SagaHost::operate`], or the forwarding's failure.
    pub(crate) async fn operate(&self, saga_id: Uuid, event: Event) -> Result<Operated, OperateError> {
        match &self.forward {
            Some((nats, ownership)) if !ownership.owns(&saga_id.to_string()) => {
                forward_operate(nats, ownership.partitions(), saga_id, &event).await
            }
            _ => self.runner.operate(saga_id, event).await,
        }
    }
}

/// Cluster settings (`--partitions`, `--lease-ttl`, `--instance-id`, `--kv-replicas`).
#[derive(Debug, Clone)]
pub(crate) struct ClusterSettings {
    /// This coordinator's name in leases and logs.
    pub instance: String,
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    expires_at_ms: u64,
}

fn lease_key(p: u32) -> String {
    format!("lease.p{p:04}")
}

fn member_key(instance: &str) -> String {
    format!("member.{instance}")
}

/// An operator event forwarded to the partition's holder.
#[derive(Debug, Serialize, Deserialize)]
struct Forwarded {
    saga_id: String,
    /// `Some(reason)`: abort; `None`: retry (or the signal).
    abort: Option<String>,
    /// A signal (coordinators of earlier versions never forward one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signal: Option<ForwardedSignal>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ForwardedSignal {
    name: String,
    id: String,
    payload: serde_json::Value,
}

/// The holder's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum ForwardReply {
    Changed { state: String },
    Unchanged { state: String },
    Signalled { fate: SignalFate, state: String },
    Refused { why: SignalRefused },
    NotFound,
    Error { message: String },
}

/// Forwards an operator event for a saga whose partition another
/// coordinator holds, and returns its answer.
///
/// # Errors
/// No holder answered in 5 s (a hand-over in progress), or its error.
async fn forward_operate(
    nats: &async_nats::Client,
    partitions: u32,
    saga_id: Uuid,
    event: &Event,
) -> Result<Operated, OperateError> {
    let (abort, signal) = match event {
        Event::Abort { reason } => (Some(reason.clone()), None),
        Event::Signal { name, id, payload } => (
            None,
            Some(ForwardedSignal {
                name: name.clone(),
                id: id.clone(),
                payload: payload.clone(),
            }),
        ),
        _ => (None, None),
    };
    let body = serde_json::to_vec(&Forwarded {
        saga_id: saga_id.to_string(),
        abort,
        signal,
    })
    .map_err(|e| OperateError::Elsewhere(e.to_string()))?;
    let subject = format!(
        "{OPERATE_SUBJECT}.{}",
        partition_of(&saga_id.to_string(), partitions)
    );
    let reply = tokio::time::timeout(Duration::from_secs(5), nats.request(subject, body.into()))
        .await
        .map_err(|_| {
            OperateError::Elsewhere("no coordinator holds the saga's partition right now; retry".into())
        })?
        .map_err(|e| OperateError::Elsewhere(format!("forwarding to the saga's coordinator: {e}")))?;
    let state = |s: &str| {
        StateTag::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| OperateError::Elsewhere(format!("unknown state {s} from the saga's coordinator")))
    };
    match serde_json::from_slice::<ForwardReply>(&reply.payload) {
        Ok(ForwardReply::Changed { state: s }) => Ok(Operated::Changed(state(&s)?)),
        Ok(ForwardReply::Unchanged { state: s }) => Ok(Operated::Unchanged(state(&s)?)),
        Ok(ForwardReply::Signalled { fate, state: s }) => Ok(Operated::Signalled(fate, state(&s)?)),
        Ok(ForwardReply::Refused { why }) => Err(OperateError::Refused(why)),
        Ok(ForwardReply::NotFound) => Err(OperateError::NotFound(saga_id)),
        Ok(ForwardReply::Error { message }) => Err(OperateError::Elsewhere(message)),
        Err(e) => Err(OperateError::Elsewhere(format!(
            "unreadable answer from the saga's coordinator: {e}"
        ))),
    }
}

/// Answers operator events forwarded for the partitions held here (the
/// others are left to their holder: no reply).
async fn serve_forwarded<R: SagaHost>(
    nats: async_nats::Client,
    ownership: Ownership,
    runner: R,
    stop: CancellationToken,
) {
    let mut sub = match nats.subscribe(format!("{OPERATE_SUBJECT}.*")).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot subscribe to forwarded operator events");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let answer = match serde_json::from_slice::<Forwarded>(&msg.payload) {
            Err(e) => ForwardReply::Error {
                message: format!("malformed forwarded operator event: {e}"),
            },
            Ok(f) => {
                if !ownership.owns(&f.saga_id) {
                    continue;
                }
                let Ok(id) = Uuid::parse_str(&f.saga_id) else {
                    continue;
                };
                let event = match (f.abort, f.signal) {
                    (Some(reason), _) => Event::Abort { reason },
                    (None, Some(ForwardedSignal { name, id, payload })) => {
                        Event::Signal { name, id, payload }
                    }
                    (None, None) => Event::Retry,
                };
                match runner.operate(id, event).await {
                    Ok(Operated::Changed(s)) => ForwardReply::Changed {
                        state: s.as_str().into(),
                    },
                    Ok(Operated::Unchanged(s)) => ForwardReply::Unchanged {
                        state: s.as_str().into(),
                    },
                    Ok(Operated::Signalled(fate, s)) => ForwardReply::Signalled {
                        fate,
                        state: s.as_str().into(),
                    },
                    Err(OperateError::Refused(why)) => ForwardReply::Refused { why },
                    Err(OperateError::NotFound(_)) => ForwardReply::NotFound,
                    Err(e) => ForwardReply::Error {
                        message: e.to_string(),
                    },
                }
            }
        };
        if let Ok(body) = serde_json::to_vec(&answer) {
            let _ = nats.publish(reply_to, body.into()).await;
        }
    }
}

/// Opens (creating when absent) the leases bucket.
///
/// # Errors
/// JetStream refused or did not answer.
pub(crate) async fn open_leases(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, StoreError> {
    match js.get_key_value(LEASES_BUCKET).await {
        Ok(s) => Ok(s),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: LEASES_BUCKET.into(),
                history: 1,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::JetStream(format!("create bucket {LEASES_BUCKET}: {e}"))),
    }
}

struct Held {
    revision: u64,
    renewed: Instant,
}

/// Keeps this coordinator's leases until `stop`: renews, takes its share,
/// hands back above it, loads taken partitions into the runner, reloads
/// sagas whose write was lost, and answers forwarded operator events. On
/// stop it deletes its leases so the others take over at once.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<R: SagaHost>(
    nats: async_nats::Client,
    leases: kv::Store,
    store: Arc<dyn PartitionedStore>,
    ownership: Ownership,
    runner: R,
    settings: ClusterSettings,
    mut lost: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    let forwarded = tokio::spawn(serve_forwarded(
        nats.clone(),
        ownership.clone(),
        runner.clone(),
        stop.clone(),
    ));
    let mut manager = Manager {
        leases,
        store,
        ownership,
        runner,
        settings,
        held: HashMap::new(),
        reload: Vec::new(),
        rounds: 0,
    };
    let tick = (manager.settings.lease_ttl / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            id = lost.recv() => {
                match id {
                    Some(id) => manager.reload.push(id),
                    None => break,
                }
                continue;
            }
            _ = tokio::time::sleep(tick) => {}
        }
        manager.round().await;
    }
    manager.hand_back_all().await;
    let _ = forwarded.await;
}

struct Manager<R> {
    leases: kv::Store,
    store: Arc<dyn PartitionedStore>,
    ownership: Ownership,
    runner: R,
    settings: ClusterSettings,
    held: HashMap<u32, Held>,
    reload: Vec<String>,
    rounds: u64,
}

impl<R: SagaHost> Manager<R> {
    fn lease_value(&self) -> Option<bytes::Bytes> {
        let lease = Lease {
            holder: self.settings.instance.clone(),
            expires_at_ms: now_ms() + u64::try_from(self.settings.lease_ttl.as_millis()).unwrap_or(u64::MAX),
        };
        serde_json::to_vec(&lease).ok().map(Into::into)
    }

    async fn round(&mut self) {
        let Some(value) = self.lease_value() else { return };
        let partitions = self.ownership.partitions();
        // Heartbeat.
        if let Err(e) = self
            .leases
            .put(member_key(&self.settings.instance), value.clone())
            .await
        {
            warn!(error = %e, "heartbeat not written");
        }
        // Renew, all at once (a round must stay short while NATS is slow).
        let renewals = futures::future::join_all(self.held.iter().map(|(p, h)| {
            let (leases, value) = (&self.leases, value.clone());
            async move { (*p, leases.update(lease_key(*p), value, h.revision).await) }
        }))
        .await;
        let mut lost = Vec::new();
        for (p, result) in renewals {
            let Some(h) = self.held.get_mut(&p) else { continue };
            match result {
                Ok(rev) => {
                    h.revision = rev;
                    h.renewed = Instant::now();
                }
                Err(e) if saga_nats::is_wrong_revision(&e) => {
                    warn!(partition = p, "lease taken by another coordinator");
                    lost.push(p);
                }
                Err(e) => {
                    // Unknown: keep trying while the lease cannot have expired.
                    if h.renewed.elapsed() > self.settings.lease_ttl * 3 / 4 {
                        warn!(partition = p, error = %e, "lease not renewed in time; letting it go");
                        lost.push(p);
                    }
                }
            }
        }
        for p in lost {
            self.held.remove(&p);
            self.stop_running(p).await;
        }
        // Census: live members and free leases.
        let now = now_ms();
        let entries: Vec<(String, Option<(Lease, u64)>)> = match self.entries().await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot read the leases");
                return;
            }
        };
        let alive = entries
            .iter()
            .filter(|(k, v)| {
                k.starts_with("member.") && v.as_ref().is_some_and(|(l, _)| l.expires_at_ms > now)
            })
            .count()
            .max(1);
        let share = usize::try_from(partitions).unwrap_or(usize::MAX).div_ceil(alive);
        if self.held.len() < share {
            let leases: HashMap<String, (Lease, u64)> = entries
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect();
            // Start at a different place on each coordinator so they do not all contend.
            let offset = self
                .settings
                .instance
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            for k in 0..partitions {
                if self.held.len() >= share {
                    break;
                }
                let p = (k + offset) % partitions;
                if self.held.contains_key(&p) {
                    continue;
                }
                let taken = match leases.get(&lease_key(p)) {
                    None => self.leases.create(lease_key(p), value.clone()).await.ok(),
                    Some((l, rev)) if l.expires_at_ms <= now => {
                        self.leases.update(lease_key(p), value.clone(), *rev).await.ok()
                    }
                    Some(_) => None,
                };
                if let Some(revision) = taken {
                    self.held.insert(
                        p,
                        Held {
                            revision,
                            renewed: Instant::now(),
                        },
                    );
                    self.start_running(p).await;
                }
            }
        } else if self.held.len() > share {
            // Above the share (a coordinator joined): hand one back per round.
            if let Some(&p) = self.held.keys().max() {
                if let Some(h) = self.held.remove(&p) {
                    self.stop_running(p).await;
                    let _ = self
                        .leases
                        .delete_expect_revision(lease_key(p), Some(h.revision))
                        .await;
                    info!(partition = p, share, "partition handed back for a newcomer");
                }
            }
        }
        // Every few rounds, look for running sagas of our partitions that are not
        // running here: one a former holder created or advanced after we loaded
        // the partition (it had not yet noticed its lease was gone) and then let go.
        self.rounds += 1;
        if self.rounds % RESCAN_EVERY == 0 {
            for p in self.held.keys().copied().collect::<Vec<_>>() {
                match self.store.load_partition(p).await {
                    Ok(sagas) if !sagas.is_empty() => {
                        let adopted = self.runner.adopt(sagas).await.unwrap_or(0);
                        if adopted > 0 {
                            info!(
                                partition = p,
                                adopted, "running sagas found on a rescan and resumed"
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!(partition = p, error = %e, "rescan failed; retried later"),
                }
            }
        }
        // Sagas whose write was lost: reload the ones still ours.
        for id in std::mem::take(&mut self.reload) {
            if !self.ownership.owns(&id) {
                continue;
            }
            match self.store.load(&id).await {
                Ok(Some(loaded)) => {
                    let _ = self.runner.adopt(vec![loaded]).await;
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(saga_id = %id, error = %e, "reload failed; retried next round");
                    self.reload.push(id);
                }
            }
        }
        if let Err(e) = self.store.retire_published().await {
            warn!(error = %e, "cannot retire finished sagas from the index; retried next round");
        }
    }

    /// Every key of the leases bucket with its lease (or heartbeat) and revision.
    async fn entries(&self) -> Result<Vec<(String, Option<(Lease, u64)>)>, String> {
        let keys: Vec<String> = self
            .leases
            .keys()
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let entries = futures::future::join_all(keys.into_iter().map(|k| async move {
            // Through the leader: a replica's stale revision would make every take fail.
            let entry = crate::store::jetstream::leader_get(&self.leases, &k)
                .await
                .map_err(|e| e.to_string())?;
            let value = entry.and_then(|(v, rev)| serde_json::from_slice::<Lease>(&v).ok().map(|l| (l, rev)));
            Ok::<_, String>((k, value))
        }))
        .await;
        entries.into_iter().collect()
    }

    /// Took partition `p`: run its sagas.
    async fn start_running(&mut self, p: u32) {
        let t0 = Instant::now();
        self.ownership.hold(p);
        match self.store.load_partition(p).await {
            Ok(sagas) => {
                let n = sagas.len();
                let adopted = self.runner.adopt(sagas).await.unwrap_or(0);
                info!(partition = p, sagas = n, adopted, took_ms = t0.elapsed().as_millis() as u64,
                      instance = %self.settings.instance, "partition taken");
            }
            Err(e) => {
                warn!(partition = p, error = %e, "cannot load the partition; handing it back");
                self.ownership.give_up(p);
                if let Some(h) = self.held.remove(&p) {
                    let _ = self
                        .leases
                        .delete_expect_revision(lease_key(p), Some(h.revision))
                        .await;
                }
            }
        }
    }

    /// Lost or gave up partition `p`: stop running its sagas.
    async fn stop_running(&mut self, p: u32) {
        self.ownership.give_up(p);
        let _ = self.runner.release(p, self.ownership.partitions()).await;
    }

    /// At shutdown: delete the leases so the others take over at once.
    async fn hand_back_all(&mut self) {
        for (p, h) in std::mem::take(&mut self.held) {
            self.ownership.give_up(p);
            let _ = self
                .leases
                .delete_expect_revision(lease_key(p), Some(h.revision))
                .await;
        }
        let _ = self.leases.delete(member_key(&self.settings.instance)).await;
        info!(instance = %self.settings.instance, "leases handed back");
    }
}
