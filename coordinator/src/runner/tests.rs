//! Runner tests on the in-memory store and a fake command sink: no NATS, no
//! disk. Each test holds, fails or loses commits on purpose and checks what
//! the runner lets out (the sink checks every command it gets against what
//! the store has committed at that moment).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use saga_wire::CommandKind;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    effects::Durable,
    engine::Outcome,
    store::{memory::MemoryStore, DeadLetter, SagaStore},
};

/// Every await of the runner is bounded: a test fails, it does not hang.
const WAIT: Duration = Duration::from_secs(5);

fn definition() -> Arc<SagaDefinition> {
    Arc::new(crate::store::fixtures::two_step_order())
}

fn new_saga(key: Option<&str>) -> NewSaga {
    NewSaga {
        definition: definition(),
        version_requested: false,
        order: crate::store::fixtures::order(),
        order_id_given: true,
        correlation_id: "corr".into(),
        idempotency_key: key.map(Into::into),
    }
}

/// A sink that records what it gets, and what it got that the store had
/// not committed at that moment (must stay empty).
struct FakeSink {
    store: MemoryStore,
    sent: Mutex<Vec<OutboxEntry>>,
    early: Mutex<Vec<OutboxEntry>>,
    withdrawn: Mutex<Vec<(String, usize, CommandKind)>>,
    wake: tokio::sync::Notify,
}

impl FakeSink {
    fn sent(&self) -> Vec<OutboxEntry> {
        lock(&self.sent).clone()
    }

    fn sent_for(&self, saga_id: &str) -> Vec<(usize, CommandKind)> {
        self.sent()
            .iter()
            .filter(|e| e.saga_id == saga_id)
            .map(|e| (e.step, e.kind))
            .collect()
    }

    /// Waits until at least `n` commands were sent.
    async fn wait_sent(&self, n: usize) {
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                let notified = self.wake.notified();
                if lock(&self.sent).len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{n} commands expected, sent: {:?}", self.sent());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl CommandSink for FakeSink {
    fn dispatch(&self, entry: Durable<OutboxEntry>) {
        let entry = entry.into_inner();
        if !self.store.durable_outbox(&entry.saga_id).contains(&entry) {
            lock(&self.early).push(entry.clone());
        }
        lock(&self.sent).push(entry);
        self.wake.notify_waiters();
    }

    fn withdraw(&self, saga_id: &str, step: usize, kind: CommandKind) {
        lock(&self.withdrawn).push((saga_id.to_string(), step, kind));
    }

    fn publish_dead_letter(&self, _letter: DeadLetter) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A runner on `store` with a fake sink.
struct Harness {
    store: MemoryStore,
    sink: Arc<FakeSink>,
    handle: RunnerHandle,
    outcomes: mpsc::UnboundedSender<Reported>,
    /// Sagas whose write was lost (with a cluster).
    lost: Option<mpsc::UnboundedReceiver<String>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

impl Harness {
    /// `cluster`: run as one coordinator of a cluster holding every partition.
    async fn start(store: MemoryStore, resident: usize, cluster: bool) -> Harness {
        let sink = Arc::new(FakeSink {
            store: store.clone(),
            sent: Mutex::default(),
            early: Mutex::default(),
            withdrawn: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        });
        let (handle, outcomes, inputs) = channel(resident);
        let (cluster, lost) = match cluster {
            true => {
                let ownership = Ownership::new(1);
                ownership.hold(0);
                let (tx, rx) = mpsc::unbounded_channel();
                (Some((ownership, tx)), Some(rx))
            }
            false => (None, None),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            Arc::new(store.clone()),
            cluster,
            sink.clone(),
            crate::events::EventsWake::default(),
            inputs,
            shutdown.clone(),
        ));
        let started = tokio::time::timeout(WAIT, handle.wait_running(true)).await;
        assert!(started.is_ok(), "the runner did not start");
        Harness {
            store,
            sink,
            handle,
            outcomes,
            lost,
            shutdown,
            task,
        }
    }

    /// Creates a saga and waits for the answer.
    async fn create(&self, key: Option<&str>) -> Result<Created, CreateError> {
        match tokio::time::timeout(WAIT, self.handle.create(new_saga(key))).await {
            Ok(result) => result,
            Err(_) => panic!("create did not answer"),
        }
    }

    /// Reports `outcome` for the command `entry`.
    fn reply(&self, entry: &OutboxEntry, outcome: Outcome) {
        let sent = self.outcomes.send(Reported {
            saga_id: entry.saga_id.clone(),
            event: Event::Reply {
                step: entry.step,
                kind: entry.kind,
                attempt: entry.message.attempt,
                outcome,
            },
        });
        assert!(sent.is_ok(), "the runner stopped");
    }

    /// Stops the runner and returns how it ended.
    async fn stop(self) -> Result<(), StoreError> {
        self.shutdown.cancel();
        self.join().await
    }

    async fn join(self) -> Result<(), StoreError> {
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => panic!("runner panicked: {e}"),
            Err(_) => panic!("runner did not stop"),
        }
    }

    fn assert_nothing_early(&self) {
        assert_eq!(*lock(&self.sink.early), Vec::new(), "sent before its commit");
    }
}

/// Waits (yielding, no sleep) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

fn ok() -> Outcome {
    Outcome::Ok(serde_json::json!({}))
}

fn saga_id(created: &Result<Created, CreateError>) -> String {
    match created {
        Ok(Created::New { saga_id, .. }) => saga_id.clone(),
        other => panic!("a new saga expected, got {other:?}"),
    }
}

#[tokio::test]
async fn nothing_leaves_before_its_commit() {
    let h = Harness::start(MemoryStore::like_sled(), 100, false).await;
    h.store.hold_commits();
    let create = tokio::spawn({
        let handle = h.handle.clone();
        async move { handle.create(new_saga(Some("k-1"))).await }
    });
    until("the creation's commit to begin", || {
        h.store.commits_in_flight() == 1
    })
    .await;
    // Decided, staged, its commit under way: nothing sent, nobody answered.
    assert!(h.sink.sent().is_empty(), "sent while the commit was held");
    assert!(!create.is_finished(), "answered while the commit was held");

    h.store.release_commits();
    let created = match tokio::time::timeout(WAIT, create).await {
        Ok(Ok(result)) => result,
        other => panic!("create did not answer: {other:?}"),
    };
    let id = saga_id(&created);
    h.sink.wait_sent(1).await;
    assert_eq!(h.sink.sent_for(&id), vec![(0, CommandKind::Forward)]);
    assert!(h.store.durable(&id).is_some());
    h.assert_nothing_early();

    // The reply's transition too: the next command leaves only after its commit.
    h.store.hold_commits();
    let first = h.sink.sent()[0].clone();
    h.reply(&first, ok());
    until("the reply's commit to begin", || h.store.commits_in_flight() == 1).await;
    assert_eq!(h.sink.sent().len(), 1, "the next step left before its commit");
    h.store.release_commits();
    h.sink.wait_sent(2).await;
    assert_eq!(h.sink.sent_for(&id)[1], (1, CommandKind::Forward));
    h.assert_nothing_early();
    assert!(h.stop().await.is_ok());
}

#[tokio::test]
async fn a_failed_commit_sends_nothing_and_stops_the_runner() {
    let h = Harness::start(MemoryStore::like_sled(), 100, false).await;
    h.store.fail_next_commit();
    let created = h.create(Some("k-1")).await;
    assert!(matches!(created, Err(CreateError::Stopped)), "{created:?}");
    let store = h.store.clone();
    let sink = h.sink.clone();
    let ended = h.join().await;
    assert!(ended.is_err(), "the runner must stop on a failed commit");
    assert!(
        sink.sent().is_empty(),
        "sent after a failed commit: {:?}",
        sink.sent()
    );
    assert!(store.resume_at_start().map(|v| v.is_empty()).unwrap_or(false));
}

#[tokio::test]
async fn a_failed_commit_discards_what_was_staged_after_it() {
    let h = Harness::start(MemoryStore::like_sled(), 100, false).await;
    h.store.hold_commits();
    let first = tokio::spawn({
        let handle = h.handle.clone();
        async move { handle.create(new_saga(Some("k-1"))).await }
    });
    until("the first commit to begin", || h.store.commits_in_flight() == 1).await;
    // Decided while the first commit runs: staged, waiting for the next.
    let second = tokio::spawn({
        let handle = h.handle.clone();
        async move { handle.create(new_saga(Some("k-2"))).await }
    });
    until("the second creation to be staged", || h.store.staged_len() > 0).await;
    h.store.fail_next_commit();
    h.store.release_commits();
    for create in [first, second] {
        match tokio::time::timeout(WAIT, create).await {
            Ok(Ok(Err(CreateError::Stopped))) => {}
            other => panic!("a stopped runner's answer expected, got {other:?}"),
        }
    }
    let (store, sink) = (h.store.clone(), h.sink.clone());
    assert!(h.join().await.is_err());
    assert!(sink.sent().is_empty(), "sent: {:?}", sink.sent());
    assert_eq!(
        store.staged_len(),
        0,
        "what was staged after the failed commit stays staged"
    );
    assert!(store.resume_at_start().map(|v| v.is_empty()).unwrap_or(false));
}

#[tokio::test]
async fn a_lost_creation_is_refused_and_handed_over_for_a_reload() {
    let mut h = Harness::start(MemoryStore::like_jetstream(), 100, true).await;
    h.store.lose_next_commit();
    let created = h.create(Some("k-1")).await;
    assert!(matches!(created, Err(CreateError::Lost)), "{created:?}");
    let lost = h.lost.as_mut().map(|rx| rx.try_recv());
    let Some(Ok(id)) = lost else {
        panic!("the lost saga was not handed over: {lost:?}");
    };
    assert!(h.store.durable(&id).is_none());
    assert!(h.sink.sent().is_empty(), "a lost saga's command was sent");
    assert!(h.stop().await.is_ok());
}

#[tokio::test]
async fn a_lost_transition_turns_into_a_reload_not_a_send() {
    let mut h = Harness::start(MemoryStore::like_jetstream(), 100, true).await;
    let id = saga_id(&h.create(Some("k-1")).await);
    h.sink.wait_sent(1).await;
    let reserve = h.sink.sent()[0].clone();

    // Another coordinator wrote the saga meanwhile: this one's reply transition is lost.
    h.store.lose_next_commit();
    h.reply(&reserve, ok());
    let lost = tokio::time::timeout(WAIT, async { h.lost.as_mut()?.recv().await }).await;
    assert_eq!(lost.ok().flatten().as_deref(), Some(id.as_str()));
    assert_eq!(
        h.sink.sent_for(&id),
        vec![(0, CommandKind::Forward)],
        "the lost transition's command left"
    );

    // The owner reloads it from what is durable: the in-flight command is re-sent.
    let durable = h
        .store
        .durable(&id)
        .map(|saga| (saga, h.store.durable_outbox(&id)));
    let Some(loaded) = durable else {
        panic!("saga {id} is not durable");
    };
    let adopted = tokio::time::timeout(WAIT, h.handle.adopt(vec![loaded])).await;
    assert!(matches!(adopted, Ok(Ok(1))), "{adopted:?}");
    h.sink.wait_sent(2).await;
    assert_eq!(
        h.sink.sent_for(&id),
        vec![(0, CommandKind::Forward), (0, CommandKind::Forward)]
    );
    h.assert_nothing_early();
    assert!(h.stop().await.is_ok());
}

/// The hand-over gap of a cluster: a saga in a held partition is in flight in
/// the store but not run here (a former holder created it after this
/// coordinator's takeover load, then let it go). An operator event for it
/// must make the runner run it, not only hold it in memory: the rescan skips a
/// saga already in memory, and its command would never be sent again.
#[tokio::test]
async fn an_event_for_a_saga_in_flight_but_not_run_here_runs_it() {
    let h = Harness::start(MemoryStore::like_jetstream(), 100, true).await;
    let id = saga_id(&h.create(Some("k-1")).await);
    h.sink.wait_sent(1).await;
    let released = tokio::time::timeout(WAIT, h.handle.release(0, 1)).await;
    assert!(
        matches!(&released, Ok(Ok(ids)) if ids == &vec![id.clone()]),
        "{released:?}"
    );
    let Ok(uuid) = Uuid::parse_str(&id) else {
        panic!("saga id {id} is not a uuid");
    };
    // A signal the definition has no step for: refused, and the saga runs.
    let signal = Event::Signal {
        name: "nobody-waits".into(),
        id: "s-1".into(),
        payload: serde_json::json!({}),
    };
    let answered = tokio::time::timeout(WAIT, h.handle.operate(uuid, signal)).await;
    assert!(matches!(answered, Ok(Err(_))), "{answered:?}");
    h.sink.wait_sent(2).await;
    assert_eq!(
        h.sink.sent_for(&id),
        vec![(0, CommandKind::Forward), (0, CommandKind::Forward)],
        "the in-flight command was not sent again"
    );
    // Its reply moves it on: the next step's command leaves.
    let reserve = h.sink.sent()[1].clone();
    h.reply(&reserve, ok());
    h.sink.wait_sent(3).await;
    assert_eq!(h.sink.sent_for(&id)[2], (1, CommandKind::Forward));
    h.assert_nothing_early();
    assert!(h.stop().await.is_ok());
}

#[tokio::test]
async fn evicted_sagas_are_read_back_on_their_next_event() {
    let resident = 2;
    let h = Harness::start(MemoryStore::like_sled(), resident, false).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(saga_id(&h.create(Some(&format!("k-{n}"))).await));
    }
    h.sink.wait_sent(ids.len()).await;
    assert_eq!(h.store.read_backs(), 0);
    for entry in h.sink.sent() {
        h.reply(&entry, ok());
    }
    h.sink.wait_sent(2 * ids.len()).await;
    // At most `resident` stayed in memory: the others were read back.
    assert!(
        h.store.read_backs() >= ids.len() - resident,
        "{} read backs",
        h.store.read_backs()
    );
    for id in &ids {
        assert_eq!(
            h.sink.sent_for(id),
            vec![(0, CommandKind::Forward), (1, CommandKind::Forward)]
        );
    }
    // And they finish from there.
    for entry in h.sink.sent().into_iter().filter(|e| e.step == 1) {
        h.reply(&entry, ok());
    }
    until("every saga to complete", || {
        ids.iter().all(|id| {
            h.store
                .durable(id)
                .is_some_and(|s| s.state.tag() == StateTag::Completed)
        })
    })
    .await;
    h.assert_nothing_early();
    assert!(h.stop().await.is_ok());
}

#[tokio::test]
async fn an_abort_withdraws_the_commands_still_waiting_for_their_commit() {
    let h = Harness::start(MemoryStore::like_sled(), 100, false).await;
    let id = saga_id(&h.create(Some("k-1")).await);
    h.sink.wait_sent(1).await;
    let reserve = h.sink.sent()[0].clone();

    // The reply decides `charge-payment`; its commit is held ...
    h.store.hold_commits();
    h.reply(&reserve, ok());
    until("the reply's commit to begin", || h.store.commits_in_flight() == 1).await;
    // ... and an abort is decided meanwhile: the charge is moot.
    let uuid = Uuid::parse_str(&id).ok();
    let operate = tokio::spawn({
        let handle = h.handle.clone();
        async move {
            match uuid {
                Some(uuid) => Some(
                    handle
                        .operate(
                            uuid,
                            Event::Abort {
                                reason: "test".into(),
                            },
                        )
                        .await,
                ),
                None => None,
            }
        }
    });
    until("the abort to be staged", || h.store.staged_len() > 0).await;
    h.store.release_commits();
    let operated = tokio::time::timeout(WAIT, operate).await;
    assert!(
        matches!(
            operated,
            Ok(Ok(Some(Ok(Operated::Changed(StateTag::Compensating)))))
        ),
        "{operated:?}"
    );
    // The compensation left; the charge never did, and it was withdrawn.
    until("the compensation to be sent", || {
        h.sink
            .sent_for(&id)
            .iter()
            .any(|(_, kind)| *kind == CommandKind::Compensate)
    })
    .await;
    assert!(
        !h.sink.sent_for(&id).contains(&(1, CommandKind::Forward)),
        "the aborted saga's charge was sent: {:?}",
        h.sink.sent_for(&id)
    );
    assert!(lock(&h.sink.withdrawn).contains(&(id.clone(), 1, CommandKind::Forward)));
    h.assert_nothing_early();
    assert!(h.stop().await.is_ok());
}
