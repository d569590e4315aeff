//! Tests of the sled store over a temp-dir database.

use std::time::Duration;

use saga_wire::{CommandKind, Item, OrderPayload};

use super::{events_log::events_tree_name, legacy::LEGACY_EVENTS_TREE, record::SagaRecordIn, *};
use crate::{
    definition::SagaDefinition,
    engine::{self, Event, Outcome},
    store::{
        keys::{history_key, saga_key},
        query::Summary,
        OutboxEntry,
    },
};

fn def() -> SagaDefinition {
    crate::store::fixtures::two_step_order()
}

fn new_saga(key: Option<&str>) -> Transition {
    let order = OrderPayload {
        order_id: "o".into(),
        customer_id: "c".into(),
        items: vec![Item {
            sku: "A".into(),
            quantity: 1,
        }],
        amount_cents: 5,
        currency: "EUR".into(),
    };
    engine::create(
        Uuid::now_v7().to_string(),
        def().into(),
        order,
        "corr".into(),
        key.map(Into::into),
        1,
    )
}

#[tokio::test]
async fn transitions_round_trip_with_index_history_and_outbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let created = new_saga(Some("client-key"));
    store.write(&created, None).expect("write created");
    let started = engine::transition(&created.saga, &Event::Start, 2)
        .expect("ok")
        .expect("changes");
    store.write(&started, Some(&created.saga)).expect("write started");
    store.flush().await.expect("flush");
    let id = Uuid::parse_str(&created.saga.id).expect("uuid");

    assert_eq!(store.get(&id).expect("get"), Some(started.saga.clone()));
    assert_eq!(store.saga_for_key("client-key").expect("key"), Some(id));
    assert_eq!(store.history(&id).expect("history").len(), 2);
    let outbox = store.outbox().expect("outbox");
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].subject, "saga.cmd.inventory.reserve");
    assert_eq!(store.active().expect("active").len(), 1);

    let reply = Event::Reply {
        step: 0,
        kind: CommandKind::Forward,
        attempt: 1,
        outcome: Outcome::Rejected("insufficient_stock".into()),
    };
    let done = engine::transition(&started.saga, &reply, 3)
        .expect("ok")
        .expect("changes");
    store.write(&done, Some(&started.saga)).expect("write done");
    store.flush().await.expect("flush");
    assert!(
        store.outbox().expect("outbox").is_empty(),
        "settled command left the outbox"
    );
    assert!(store.active().expect("active").is_empty());
    let counts = store.count_by_state().expect("counts");
    assert!(counts.contains(&(StateTag::Compensated, 1)) && counts.contains(&(StateTag::Running, 0)));
    let history = store.history(&id).expect("history");
    assert_eq!(history.iter().map(|h| h.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn staged_writes_reach_readers_only_through_a_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let created = new_saga(Some("staged-key"));
    let id = Uuid::parse_str(&created.saga.id).expect("uuid");
    store.write(&created, None).expect("write");
    let started = engine::transition(&created.saga, &Event::Start, 2)
        .expect("ok")
        .expect("changes");
    store.write(&started, Some(&created.saga)).expect("write");
    // Readers see nothing yet; the runner sees its latest write.
    assert_eq!(store.get(&id).expect("get"), None);
    assert!(store.outbox().expect("outbox").is_empty());
    assert_eq!(store.saga_for_key("staged-key").expect("key"), None);
    assert_eq!(store.get_latest(&id).expect("latest"), Some(started.saga.clone()));

    store.flush_writes().await.expect("flush");
    assert_eq!(store.get(&id).expect("get"), Some(started.saga.clone()));
    assert_eq!(store.get_latest(&id).expect("latest"), Some(started.saga));
    assert_eq!(store.saga_for_key("staged-key").expect("key"), Some(id));
    assert_eq!(store.outbox().expect("outbox").len(), 1);
    // Two transitions of one saga in one batch: the index holds the last state only.
    assert_eq!(
        store
            .list(&ListQuery::page(Some(StateTag::Pending), None, 10))
            .expect("list")
            .sagas
            .len(),
        0
    );
    assert_eq!(store.history(&id).expect("history").len(), 2);
}

#[tokio::test]
async fn definitions_are_stored_once_and_records_of_earlier_versions_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, id_b) = {
        let store = Store::open(dir.path()).expect("open");
        let a = new_saga(None);
        // The same name@version with other content: a reference of its own.
        let mut edited = def();
        edited.steps[0].timeout = Duration::from_secs(9);
        let mut b = new_saga(None);
        b.saga.definition = edited.into();
        store.write(&a, None).expect("write");
        store.write(&b, None).expect("write");
        store.write(&new_saga(None), None).expect("write");
        store.flush_writes().await.expect("flush");
        assert_eq!(store.definitions.len(), 2, "one row per distinct definition");
        let id_b = Uuid::parse_str(&b.saga.id).expect("uuid");
        (a, b, id_b)
    };
    // Reopened: the definitions come from the tree.
    let store = Store::open(dir.path()).expect("reopen");
    let id_a = Uuid::parse_str(&a.saga.id).expect("uuid");
    assert_eq!(store.get(&id_a).expect("get"), Some(a.saga.clone()));
    assert_eq!(store.get(&id_b).expect("get"), Some(b.saga.clone()));
    assert_eq!(
        store
            .get(&id_b)
            .expect("get")
            .map(|s| s.definition.steps[0].timeout),
        Some(Duration::from_secs(9))
    );
    // A record with the definition inline (as written before `definition_ref`).
    let old = new_saga(None);
    let inline = encode(&serde_json::json!({ "saga": old.saga })).expect("encode");
    let old_id = Uuid::parse_str(&old.saga.id).expect("uuid");
    store.sagas.insert(old_id.as_bytes(), inline).expect("insert");
    assert_eq!(store.get(&old_id).expect("get"), Some(old.saga));
    // A reference to nothing is corruption, not a panic.
    let good = String::from_utf8(store.encode_record(&new_saga(None).saga).expect("encode")).expect("utf8");
    assert!(good.contains(r#""definition_ref":"order@1#0""#), "{good}");
    let dangling = good.replace("order@1#0", "nope@1#0").into_bytes();
    let e = store.decode_record(&dangling).expect_err("refused");
    assert!(e.to_string().contains("unknown definition nope@1#0"), "{e}");
}

#[tokio::test]
async fn list_pages_in_creation_order_and_filters_by_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = new_saga(None);
        store.write(&t, None).expect("write");
        if i % 2 == 0 {
            let s = engine::transition(&t.saga, &Event::Start, 2)
                .expect("ok")
                .expect("changes");
            store.write(&s, Some(&t.saga)).expect("write");
        }
        ids.push(t.saga.id.clone());
    }
    store.flush().await.expect("flush");
    let p1 = store.list(&ListQuery::page(None, None, 2)).expect("list");
    assert_eq!(
        p1.sagas.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        ids[..2]
    );
    let p2 = store.list(&ListQuery::page(None, p1.next, 2)).expect("list");
    let p3 = store.list(&ListQuery::page(None, p2.next, 2)).expect("list");
    assert_eq!(p3.sagas.len(), 1);
    assert!(p3.next.is_none());
    let running = store
        .list(&ListQuery::page(Some(StateTag::Running), None, 2))
        .expect("list");
    assert_eq!(running.sagas.len(), 2);
    let rest = store
        .list(&ListQuery::page(Some(StateTag::Running), running.next, 2))
        .expect("list");
    assert_eq!(rest.sagas.len(), 1);
    assert!(rest.next.is_none());
    assert_eq!(
        store
            .list(&ListQuery::page(Some(StateTag::Pending), None, 10))
            .expect("list")
            .sagas
            .len(),
        2
    );
}

#[tokio::test]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = new_saga(None);
    {
        let store = Store::open(dir.path()).expect("open");
        store.write(&t, None).expect("write");
        store.flush().await.expect("flush");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let id = Uuid::parse_str(&t.saga.id).expect("uuid");
    assert_eq!(
        store.get(&id).expect("get").map(|s| s.state),
        Some(engine::SagaState::Pending)
    );
}

/// Sequence numbers of the events `pending` holds, per saga, in order.
fn sequences(pending: &[(Vec<u8>, EventRecord)], saga: &Transition) -> Vec<u64> {
    pending
        .iter()
        .filter(|(_, r)| r.event.saga_id == saga.saga.id)
        .map(|(_, r)| r.event.sequence)
        .collect()
}

fn keys(pending: &[(Vec<u8>, EventRecord)]) -> Vec<Vec<u8>> {
    pending.iter().map(|(k, _)| k.clone()).collect()
}

fn generations(dir: &Path) -> Vec<String> {
    let db = open_db(dir, DEFAULT_CACHE_BYTES).expect("open");
    let mut names: Vec<String> = db
        .tree_names()
        .iter()
        .filter_map(|n| String::from_utf8(n.to_vec()).ok())
        .filter(|n| n.starts_with("events"))
        .collect();
    names.sort();
    names
}

/// A kill -9 while sled writes a snapshot leaves `snap.<lsn>.generating`
/// (renamed when complete). sled 0.34.7 took it for the newest snapshot and
/// refused to open (sled issue 1527); the vendored copy passes over it.
#[tokio::test]
async fn a_snapshot_cut_short_by_a_crash_does_not_stop_the_store_from_opening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = new_saga(None);
    {
        let store = Store::open(dir.path()).expect("open");
        store.write(&t, None).expect("write");
        store.flush().await.expect("flush");
    }
    // One empty, one torn: the two ways a crash leaves it.
    let leftovers: [(&str, &[u8]); 2] = [
        ("snap.FFFFFFFFFFFFFFFF.generating", b""),
        ("snap.FFFFFFFFFFFFFFFE.generating", b"0123456789abcdef"),
    ];
    for (name, bytes) in leftovers {
        std::fs::write(dir.path().join(name), bytes).expect("leftover snapshot");
    }
    let store = Store::open(dir.path()).expect("opens past the leftover snapshots");
    let id = Uuid::parse_str(&t.saga.id).expect("uuid");
    assert_eq!(
        store.get(&id).expect("get").map(|s| s.state),
        Some(engine::SagaState::Pending)
    );
}

#[tokio::test]
async fn events_are_pending_in_commit_order_until_published_also_after_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (new_saga(None), new_saga(None));
    {
        let store = Store::open(dir.path()).expect("open");
        store.write(&a, None).expect("write");
        store.write(&b, None).expect("write");
        let a1 = engine::transition(&a.saga, &Event::Start, 2)
            .expect("ok")
            .expect("changes");
        store.write(&a1, Some(&a.saga)).expect("write");
        // One events-log entry for the three transitions of this commit.
        store.flush_writes().await.expect("flush");
        // Staged events are not pending; committed ones are, in commit order.
        let b1 = engine::transition(&b.saga, &Event::Start, 3)
            .expect("ok")
            .expect("changes");
        store.write(&b1, Some(&b.saga)).expect("write");
        let pending = store.events_pending(100).expect("pending");
        assert_eq!(sequences(&pending, &a), vec![1, 2]);
        assert_eq!(sequences(&pending, &b), vec![1]);
        let first = &pending[0].1.event;
        assert_eq!(
            (first.saga_id.as_str(), first.event.as_str()),
            (a.saga.id.as_str(), "created")
        );
        assert_eq!(first.order, a.saga.order);
        assert_eq!(pending[0].1.subject, "saga.events.order.created");
        store.flush_writes().await.expect("flush");
        assert_eq!(store.events_backlog(), 4);
        // The first commit's events are out.
        let pending = store.events_pending(1).expect("pending");
        assert_eq!(pending.len(), 3);
        store.events_published(&keys(&pending)).expect("published");
        store.flush().await.expect("flush");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let pending = store.events_pending(100).expect("pending");
    assert_eq!(sequences(&pending, &a), Vec::<u64>::new());
    assert_eq!(sequences(&pending, &b), vec![2]);
    store.events_published(&keys(&pending)).expect("published");
    assert!(store.events_pending(100).expect("pending").is_empty());
    assert_eq!(store.events_backlog(), 0);
    // New events continue after the published ones.
    let a1 = store
        .get(&Uuid::parse_str(&a.saga.id).expect("uuid"))
        .expect("get")
        .expect("saga");
    let a2 = engine::transition(
        &a1,
        &Event::Abort {
            reason: "test".into(),
        },
        4,
    )
    .expect("ok")
    .expect("changes");
    store.write(&a2, Some(&a1)).expect("write");
    store.flush_writes().await.expect("flush");
    let pending = store.events_pending(100).expect("pending");
    assert_eq!(sequences(&pending, &a), (3..=a2.saga.seq).collect::<Vec<_>>());
}

#[tokio::test]
async fn events_not_handed_over_in_memory_are_read_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let sagas: Vec<Transition> = (0..4).map(|_| new_saga(None)).collect();
    for t in &sagas {
        store.write(t, None).expect("write");
        store.flush_writes().await.expect("flush");
    }
    // The third commit did not fit in memory (as past the bound).
    lock(&store.events_ready).queue.retain(|(_, seq, _)| *seq != 2);
    let mut order = Vec::new();
    for expected in [2, 2] {
        let pending = store.events_pending(100).expect("pending");
        assert_eq!(pending.len(), expected, "{order:?}");
        order.extend(pending.iter().map(|(_, r)| r.event.saga_id.clone()));
        store.events_published(&keys(&pending)).expect("published");
    }
    assert!(store.events_pending(100).expect("pending").is_empty());
    let ids: Vec<String> = sagas.iter().map(|t| t.saga.id.clone()).collect();
    assert_eq!(order, ids, "each once, in commit order");
}

#[tokio::test]
async fn published_generations_are_dropped_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = Store::open(dir.path()).expect("open");
        store.events_rotate = 3;
        let mut all = Vec::new();
        for round in 0..4 {
            for _ in 0..2 {
                let t = new_saga(None);
                store.write(&t, None).expect("write");
                store.flush_writes().await.expect("flush");
                all.push(t);
            }
            let pending = store.events_pending(100).expect("pending");
            assert_eq!(pending.len(), 2, "round {round}: only the new transitions");
            store.events_published(&keys(&pending)).expect("published");
        }
        // Rotated after entries 3 and 7; generation 0 was dropped once the
        // cursor entered generation 1, which stays until it enters 2.
        let names = |s: &Store| read_lock(&s.events).iter().map(|(g, _)| *g).collect::<Vec<_>>();
        assert_eq!(names(&store), vec![1, 2]);
        let t = new_saga(None);
        store.write(&t, None).expect("write");
        store.flush_writes().await.expect("flush");
        let pending = store.events_pending(100).expect("pending");
        assert_eq!(sequences(&pending, &t), vec![1]);
        store.events_published(&keys(&pending)).expect("published");
        assert_eq!(names(&store), vec![2]);
        store.flush().await.expect("flush");
    }
    assert_eq!(generations(dir.path()), vec![events_tree_name(2)]);
    let store = Store::open(dir.path()).expect("reopen");
    assert!(store.events_pending(100).expect("pending").is_empty());
}

#[tokio::test]
async fn an_earlier_versions_events_outbox_is_converted_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (new_saga(None), new_saga(None));
    {
        let store = Store::open(dir.path()).expect("open").without_events();
        store.write(&a, None).expect("write");
        store.write(&b, None).expect("write");
        store.flush_writes().await.expect("flush");
        assert!(
            store.events_pending(100).expect("pending").is_empty(),
            "--no-events logs nothing"
        );
        let legacy = store.db.open_tree(LEGACY_EVENTS_TREE).expect("tree");
        for t in [&b, &a] {
            let id = saga_key(&t.saga.id).expect("key");
            let h = &t.history[0];
            legacy
                .insert(
                    history_key(&id, h.seq),
                    encode(&EventRecord::new(&t.saga, h)).expect("encode"),
                )
                .expect("insert");
        }
        store.flush().await.expect("flush");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let pending = store.events_pending(100).expect("pending");
    // Time order, then key order (saga id: creation order).
    let ids: Vec<&str> = pending.iter().map(|(_, r)| r.event.saga_id.as_str()).collect();
    assert_eq!(ids, vec![a.saga.id.as_str(), b.saga.id.as_str()]);
    drop(store);
    assert_eq!(generations(dir.path()), vec![events_tree_name(0)]);
}

#[tokio::test]
async fn prune_removes_old_terminal_sagas_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let rejected = |t: &Transition, now| {
        let started = engine::transition(&t.saga, &Event::Start, now)
            .expect("ok")
            .expect("changes");
        let reply = Event::Reply {
            step: 0,
            kind: CommandKind::Forward,
            attempt: 1,
            outcome: Outcome::Rejected("insufficient_stock".into()),
        };
        let done = engine::transition(&started.saga, &reply, now)
            .expect("ok")
            .expect("changes");
        (started, done)
    };
    // Old and finished; finished but recently updated; still running.
    let old = new_saga(Some("old-key"));
    let recent = new_saga(None);
    let running = new_saga(None);
    store.write(&old, None).expect("write");
    store.write(&recent, None).expect("write");
    store.write(&running, None).expect("write");
    let (s1, d1) = rejected(&old, 10);
    store.write(&s1, Some(&old.saga)).expect("write");
    store.write(&d1, Some(&s1.saga)).expect("write");
    let (s2, d2) = rejected(&recent, u64::MAX / 2);
    store.write(&s2, Some(&recent.saga)).expect("write");
    store.write(&d2, Some(&s2.saga)).expect("write");
    let s3 = engine::transition(&running.saga, &Event::Start, 10)
        .expect("ok")
        .expect("changes");
    store.write(&s3, Some(&running.saga)).expect("write");
    store.flush().await.expect("flush");
    let id = |t: &Transition| Uuid::parse_str(&t.saga.id).expect("uuid");
    let cutoff = crate::clock::now_ms() + 60_000;

    // Unpublished events hold a saga back.
    assert_eq!(store.prune(cutoff, 100).expect("prune"), 0);
    let keys: Vec<Vec<u8>> = store
        .events_pending(1000)
        .expect("events")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    store.events_published(&keys).expect("published");

    assert_eq!(store.prune(cutoff, 100).expect("prune"), 1);
    assert_eq!(store.get(&id(&old)).expect("get"), None);
    assert!(store.history(&id(&old)).expect("history").is_empty());
    assert_eq!(store.saga_for_key("old-key").expect("key"), None);
    assert_eq!(
        store.by_attr.len(),
        6,
        "the pruned saga's customer, order and definition entries go"
    );
    assert!(store.get(&id(&recent)).expect("get").is_some());
    assert!(store.get(&id(&running)).expect("get").is_some());
    let counts = store.count_by_state().expect("counts");
    assert!(counts.contains(&(StateTag::Compensated, 1)) && counts.contains(&(StateTag::Running, 1)));
    assert_eq!(
        store.prune(cutoff, 100).expect("prune"),
        0,
        "nothing left to prune"
    );
}

#[test]
fn unknown_format_versions_are_reported_as_corrupt() {
    let e = decode::<SagaRecordIn>(br#"{"v":9,"saga":{}}"#, "saga record").expect_err("refused");
    assert!(e.to_string().contains("stored data is corrupt"), "{e}");
}

/// Applies `event` to `saga`, writes the transition (from `saga`) and
/// returns it with the number of sled writes it staged.
fn step(store: &Store, saga: &engine::Saga, event: Event, now: u64) -> (Transition, usize) {
    let t = engine::transition(saga, &event, now)
        .expect("ok")
        .expect("changes");
    let before = store.staged().ops.len();
    store.write(&t, Some(saga)).expect("write");
    let writes = store.staged().ops.len() - before;
    (t, writes)
}

/// Drives the started saga `started` to FAILED (reserved, charge declined,
/// release rejected), writing each transition from time `now` on.
fn to_failed(store: &Store, started: &engine::Saga, now: u64) -> Transition {
    let (t, _) = step(
        store,
        started,
        reply(0, 1, Outcome::Ok(serde_json::json!({"r": 1}))),
        now,
    );
    let (t, _) = step(
        store,
        &t.saga,
        reply(1, 1, Outcome::Rejected("declined".into())),
        now + 1,
    );
    let release_failed = Event::Reply {
        step: 0,
        kind: CommandKind::Compensate,
        attempt: 1,
        outcome: Outcome::Rejected("locked".into()),
    };
    step(store, &t.saga, release_failed, now + 2).0
}

fn reply(step: usize, attempt: u32, outcome: Outcome) -> Event {
    Event::Reply {
        step,
        kind: CommandKind::Forward,
        attempt,
        outcome,
    }
}

/// Entries in the events log's generations.
fn events_entries(store: &Store) -> usize {
    read_lock(&store.events).iter().map(|(_, tree)| tree.len()).sum()
}

/// Flushes and returns the sled writes that took: the staged ops and the
/// commit's events-log entry.
async fn flushed_writes(store: &Store) -> usize {
    let (staged, entries) = (store.staged().ops.len(), events_entries(store));
    store.flush_writes().await.expect("flush");
    staged + events_entries(store) - entries
}

/// `get_with_history` (one scan of the journal) reads what `get` and
/// `history` read apart.
fn assert_read_together(store: &Store, id: &Uuid) {
    let apart = (store.get(id).expect("get"), store.history(id).expect("history"));
    let (saga, history) = store.get_with_history(id).expect("read").expect("stored");
    assert_eq!(Some(saga), apart.0);
    assert_eq!(history, apart.1);
}

#[tokio::test]
async fn a_two_step_saga_costs_fifteen_writes_and_reads_back_at_every_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let created = new_saga(Some("fifteen"));
    let id = Uuid::parse_str(&created.saga.id).expect("uuid");
    // Created and started in one transition, as the runner writes a new saga.
    let mut first = engine::transition(&created.saga, &Event::Start, 2)
        .expect("ok")
        .expect("changes");
    first.history.splice(0..0, created.history.clone());
    store.write(&first, None).expect("write");
    // snapshot, journal entry, state index, idempotency key, events entry,
    // and the customer, order and definition entries ListSagas filters read
    assert_eq!(flushed_writes(&store).await, 8);
    assert_eq!(store.get(&id).expect("get"), Some(first.saga.clone()));
    assert_read_together(&store, &id);

    let (reserved, _) = step(
        &store,
        &first.saga,
        reply(0, 1, Outcome::Ok(serde_json::json!({"r": 1}))),
        3,
    );
    assert_eq!(flushed_writes(&store).await, 2, "journal entry and events entry");
    assert_eq!(store.get(&id).expect("get"), Some(reserved.saga.clone()));
    assert_read_together(&store, &id);
    let in_flight = store.in_flight(&id).expect("in flight");
    assert_eq!(
        in_flight.iter().map(|e| e.subject.as_str()).collect::<Vec<_>>(),
        ["saga.cmd.payment.charge"]
    );

    let (done, _) = step(
        &store,
        &reserved.saga,
        reply(1, 1, Outcome::Ok(serde_json::json!({"ok": true}))),
        4,
    );
    // snapshot, journal entry, state index out and in, events entry
    assert_eq!(flushed_writes(&store).await, 5);
    assert_eq!(done.saga.state, engine::SagaState::Completed);
    assert_eq!(store.get(&id).expect("get"), Some(done.saga.clone()));
    assert_read_together(&store, &id);
    assert!(store.in_flight(&id).expect("in flight").is_empty());
    let seqs: Vec<u64> = store
        .history(&id)
        .expect("history")
        .iter()
        .map(|h| h.seq)
        .collect();
    assert_eq!(seqs, (1..=done.saga.seq).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_group_commit_writes_one_events_entry_for_all_its_transitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let sagas: Vec<Transition> = (0..3).map(|_| new_saga(None)).collect();
    for t in &sagas {
        store.write(t, None).expect("write");
    }
    // 3 × (snapshot, journal entry, state index, 3 attribute entries) and one events entry
    assert_eq!(flushed_writes(&store).await, 19);
    let pending = store.events_pending(100).expect("pending");
    let ids: Vec<&str> = pending.iter().map(|(_, r)| r.event.saga_id.as_str()).collect();
    assert_eq!(ids, sagas.iter().map(|t| t.saga.id.as_str()).collect::<Vec<_>>());
    assert!(pending.windows(2).all(|w| w[0].0 == w[1].0), "one key");
    // Read from the log as after a restart: the same events.
    lock(&store.events_ready).queue.clear();
    let from_log = store.events_pending(100).expect("pending");
    assert_eq!(keys(&from_log), keys(&pending));
    assert_eq!(
        from_log.iter().map(|(_, r)| r.event.sequence).collect::<Vec<_>>(),
        [1, 1, 1]
    );
    store.events_published(&keys(&pending)).expect("published");
    assert_eq!(store.events_backlog(), 0);
}

#[tokio::test]
async fn a_reader_holding_the_snapshot_a_transaction_replaced_reads_again() {
    // CI once saw a COMPENSATED saga with its first step still RUNNING: GetSaga
    // read the record, a transition committed a snapshot and an entry without
    // steps, and the read folded that entry into the old record.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut d = def();
    d.steps[0].retry.max_attempts = 50;
    let mut created = new_saga(None);
    created.saga.definition = std::sync::Arc::new(d);
    let id = Uuid::parse_str(&created.saga.id).expect("uuid");
    store.write(&created, None).expect("write");
    let (mut t, _) = step(&store, &created.saga, Event::Start, 2);
    store.flush_writes().await.expect("flush");
    let old = store.get(&id).expect("get").expect("stored");
    let mut attempt = 1;
    // Retries until one writes the next snapshot.
    while t.saga.seq / journal::SNAPSHOT_EVERY == old.seq / journal::SNAPSHOT_EVERY {
        (t, _) = step(
            &store,
            &t.saga,
            reply(0, attempt, Outcome::Transient("timeout".into())),
            3,
        );
        attempt += 1;
    }
    store.flush_writes().await.expect("flush");

    assert_eq!(
        store.fold_after(id.as_bytes(), old).expect("fold"),
        None,
        "told to read again"
    );
    assert_eq!(store.get(&id).expect("get"), Some(t.saga.clone()));
    let (loaded, in_flight) = store.load(id.as_bytes()).expect("load").expect("stored");
    assert_eq!(loaded, t.saga);
    assert_eq!(in_flight.len(), 1, "the last attempt's command: {in_flight:?}");
}

#[tokio::test]
async fn a_long_journal_folds_to_the_saga_through_snapshots_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = def();
    for s in &mut d.steps {
        s.retry.max_attempts = 50;
    }
    let mut created = new_saga(None);
    created.saga.definition = std::sync::Arc::new(d);
    let id = Uuid::parse_str(&created.saga.id).expect("uuid");
    let mut history = created.history.clone();
    let saga = {
        let store = Store::open(dir.path()).expect("open");
        store.write(&created, None).expect("write");
        let (mut t, _) = step(&store, &created.saga, Event::Start, 2);
        history.extend(t.history.clone());
        // 30 transient failures: the history passes the snapshot bound twice.
        for attempt in 1..=30 {
            let (next, _) = step(
                &store,
                &t.saga,
                reply(0, attempt, Outcome::Transient("timeout".into())),
                3,
            );
            history.extend(next.history.clone());
            t = next;
            if attempt % 7 == 0 {
                store.flush_writes().await.expect("flush");
                assert_eq!(store.get(&id).expect("get"), Some(t.saga.clone()));
            }
        }
        store.flush_writes().await.expect("flush");
        assert_eq!(store.get(&id).expect("get"), Some(t.saga.clone()));
        let snapshot = store
            .decode_record(&store.sagas.get(id.as_bytes()).expect("get").expect("record"))
            .expect("decode");
        assert!(
            snapshot.seq > journal::SNAPSHOT_EVERY,
            "a snapshot was written on the way"
        );
        assert!(t.saga.seq - snapshot.seq <= journal::SNAPSHOT_EVERY);
        t.saga
    };
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.get(&id).expect("get"), Some(saga.clone()));
    assert_eq!(store.history(&id).expect("history"), history);
    let loaded = crate::store::SagaStore::resume_at_start(&store).expect("resume");
    assert_eq!(loaded.len(), 1);
    let (resumed, in_flight) = &loaded[0];
    assert_eq!(resumed, &saga);
    assert_eq!(in_flight.len(), 1, "one command in flight: {in_flight:?}");
    assert_eq!(
        (in_flight[0].step, in_flight[0].message.attempt),
        (0, 31),
        "the last attempt's command"
    );
}

#[tokio::test]
async fn a_store_of_the_layout_before_the_journal_upgrades_on_open_with_nothing_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let created = new_saga(Some("before-journal"));
    let started = engine::transition(&created.saga, &Event::Start, 2)
        .expect("ok")
        .expect("changes");
    let id = saga_key(&started.saga.id).expect("key");
    let uuid = Uuid::from_bytes(id);
    let history: Vec<_> = created.history.iter().chain(&started.history).cloned().collect();
    let outbox: Vec<OutboxEntry> = started
        .commands
        .iter()
        .map(|c| OutboxEntry::new(&started.saga, c))
        .collect();
    {
        // What the previous version wrote: a record per transition, one
        // history row per entry, the outbox row, the index and a pointer.
        let store = Store::open(dir.path()).expect("open");
        let db = &store.db;
        store
            .sagas
            .insert(&id[..], store.encode_record(&started.saga).expect("record"))
            .expect("insert");
        for h in &history {
            store
                .history
                .insert(history_key(&id, h.seq), encode(h).expect("encode"))
                .expect("insert");
        }
        let old_outbox = db.open_tree(legacy::LEGACY_OUTBOX_TREE).expect("tree");
        for e in &outbox {
            old_outbox
                .insert(
                    crate::store::keys::outbox_key(&id, e.step, e.kind),
                    encode(e).expect("encode"),
                )
                .expect("insert");
        }
        store
            .by_state
            .insert(state_key(StateTag::Running, &id), &[][..])
            .expect("insert");
        store
            .idempotency
            .insert("before-journal", &id[..])
            .expect("insert");
        let log = read_lock(&store.events).last().expect("generation").1.clone();
        log.insert(0u64.to_be_bytes(), events_log::event_pointer(&id, 1, 2, 2))
            .expect("insert");
        db.flush().expect("flush");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.get(&uuid).expect("get"), Some(started.saga.clone()));
    assert_eq!(store.history(&uuid).expect("history"), history);
    assert_eq!(store.saga_for_key("before-journal").expect("key"), Some(uuid));
    let loaded = crate::store::SagaStore::resume_at_start(&store).expect("resume");
    assert_eq!(loaded, vec![(started.saga.clone(), outbox.clone())]);
    assert!(
        store
            .db
            .open_tree(legacy::LEGACY_OUTBOX_TREE)
            .expect("tree")
            .is_empty(),
        "the old outbox moved into the journal"
    );
    let pending = store.events_pending(10).expect("pending");
    assert_eq!(
        sequences(&pending, &created),
        vec![1, 2],
        "the old pointer's events"
    );

    // The saga goes on in the new layout: the reply settles the old command.
    let (reserved, _) = step(
        &store,
        &started.saga,
        reply(0, 1, Outcome::Ok(serde_json::json!({"ok": true}))),
        3,
    );
    store.flush_writes().await.expect("flush");
    assert_eq!(store.get(&uuid).expect("get"), Some(reserved.saga.clone()));
    let in_flight = store.in_flight(&uuid).expect("in flight");
    assert_eq!(
        in_flight.iter().map(|e| e.subject.as_str()).collect::<Vec<_>>(),
        ["saga.cmd.payment.charge"]
    );
    let all: Vec<_> = history.iter().chain(&reserved.history).cloned().collect();
    assert_eq!(store.history(&uuid).expect("history"), all);
    drop(store);
    // Opening again converts nothing more and loses nothing.
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.get(&uuid).expect("get"), Some(reserved.saga));
    assert_eq!(store.in_flight(&uuid).expect("in flight").len(), 1);
}

#[tokio::test]
async fn the_events_cursor_is_stored_at_most_every_interval_and_at_the_final_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (new_saga(None), new_saga(None));
    {
        let mut store = Store::open(dir.path()).expect("open");
        // Longer than the test: the second publish falls within the interval however slow the host.
        store.cursor_save_every = Duration::from_secs(3600);
        store.write(&a, None).expect("write");
        store.flush_writes().await.expect("flush");
        store
            .events_published(&keys(&store.events_pending(10).expect("pending")))
            .expect("published");
        store.write(&b, None).expect("write");
        store.flush_writes().await.expect("flush");
        // Within the interval: the cursor moves in memory only.
        store
            .events_published(&keys(&store.events_pending(10).expect("pending")))
            .expect("published");
        assert!(store.events_pending(10).expect("pending").is_empty());
        store.db.flush().expect("sled flush");
    }
    // A crash at this point publishes b's event again (JetStream drops the copy); never loses one.
    let store = Store::open(dir.path()).expect("reopen");
    let pending = store.events_pending(10).expect("pending");
    assert_eq!(
        (sequences(&pending, &a), sequences(&pending, &b)),
        (vec![], vec![1])
    );
    store.events_published(&keys(&pending)).expect("published");
    store.flush().await.expect("final flush");
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    assert!(
        store.events_pending(10).expect("pending").is_empty(),
        "the final flush stored the cursor"
    );
}

#[tokio::test]
async fn a_store_of_an_earlier_version_is_indexed_for_the_list_filters_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids: Vec<String> = {
        let store = Store::open(dir.path()).expect("open");
        let sagas: Vec<Transition> = (0..3).map(|_| new_saga(None)).collect();
        for t in &sagas {
            store.write(t, None).expect("write");
        }
        store.flush().await.expect("flush");
        // What an earlier version left: no attribute index, no mark.
        store.by_attr.clear().expect("clear");
        store.meta.remove(listing::ATTR_INDEX_BUILT).expect("unmark");
        store.db.flush().expect("flush");
        sagas.iter().map(|t| t.saga.id.clone()).collect()
    };
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.by_attr.len(), 9);
    let q = ListQuery {
        customer_id: Some("c".into()),
        limit: 10,
        ..Default::default()
    };
    let page = store.list(&q).expect("list");
    assert_eq!(page.sagas.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), ids);
    let q = ListQuery {
        order_id: Some("o".into()),
        newest_first: true,
        ..q
    };
    assert_eq!(store.list(&q).expect("list").sagas.len(), 3);
}

#[tokio::test]
async fn a_page_out_of_scan_budget_ends_short_with_a_token_to_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let sagas: Vec<Transition> = (0..5).map(|_| new_saga(None)).collect();
    for t in &sagas {
        store.write(t, None).expect("write");
    }
    let last = &sagas[4];
    let started = engine::transition(&last.saga, &Event::Start, 2)
        .expect("ok")
        .expect("changes");
    store.write(&started, Some(&last.saga)).expect("write");
    store.flush().await.expect("flush");
    // Only the last of the customer's five sagas is RUNNING; two examined a page.
    let mut q = ListQuery {
        customer_id: Some("c".into()),
        state: Some(StateTag::Running),
        limit: 10,
        ..Default::default()
    };
    let (mut found, mut pages) = (Vec::new(), 0);
    loop {
        let page = store.list_within(&q, 2).expect("list");
        pages += 1;
        found.extend(page.sagas.into_iter().map(|s| s.id));
        match page.next {
            Some(next) => q.after = Some(next),
            None => break,
        }
    }
    assert_eq!(found, std::slice::from_ref(&last.saga.id));
    assert_eq!(pages, 3, "2 + 2 + 1 candidates");
}

/// What a scan of the state index counts, to check the kept counts against.
fn scanned_counts(store: &Store) -> Vec<(StateTag, usize)> {
    StateTag::ALL
        .iter()
        .map(|t| (*t, store.by_state.scan_prefix([*t as u8]).count()))
        .collect()
}

#[tokio::test]
async fn the_kept_counts_match_a_scan_of_the_index_through_writes_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        let rejected = Event::Reply {
            step: 0,
            kind: CommandKind::Forward,
            attempt: 1,
            outcome: Outcome::Rejected("insufficient_stock".into()),
        };
        for i in 0..5 {
            let created = new_saga(None);
            store.write(&created, None).expect("write created");
            let started = engine::transition(&created.saga, &Event::Start, 2)
                .expect("ok")
                .expect("changes");
            store.write(&started, Some(&created.saga)).expect("write started");
            if i % 2 == 0 {
                // Staged in the same group commit as the start: one transaction moves the key twice.
                let done = engine::transition(&started.saga, &rejected, 3)
                    .expect("ok")
                    .expect("changes");
                store.write(&done, Some(&started.saga)).expect("write done");
            }
            store.flush().await.expect("flush");
        }
        let counts = store.count_by_state().expect("counts");
        assert_eq!(counts, scanned_counts(&store));
        assert!(counts.contains(&(StateTag::Running, 2)) && counts.contains(&(StateTag::Compensated, 3)));
        store.flush().await.expect("flush");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.count_by_state().expect("counts"), scanned_counts(&store));
    assert!(store
        .count_by_state()
        .expect("counts")
        .contains(&(StateTag::Compensated, 3)));
}

#[tokio::test]
async fn an_ended_record_is_the_latest_state_since_a_retry_out_of_an_end_rewrites_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let created = new_saga(None);
    store.write(&created, None).expect("write");
    let (t, _) = step(&store, &created.saga, Event::Start, 2);
    let failed = to_failed(&store, &t.saga, 3);
    assert!(
        matches!(failed.saga.state, engine::SagaState::Failed { .. }),
        "{:?}",
        failed.saga.state
    );
    store.flush_writes().await.expect("flush");
    let id = Uuid::parse_str(&failed.saga.id).expect("id");
    let key = saga_key(&failed.saga.id).expect("key");
    let record = store.sagas.get(key).expect("get").expect("record");
    assert!(
        store.decode_snapshot(&record).expect("decode").1,
        "an ended record is marked"
    );
    assert_eq!(store.get(&id).expect("get"), Some(failed.saga.clone()));

    // The retry leaves the end: a snapshot of its own, so the record is not an ended one.
    let (retried, _) = step(&store, &failed.saga, Event::Retry, 6);
    assert!(!retried.saga.state.is_terminal());
    let staged: Vec<Tree> = store.staged().ops.iter().map(|(tree, _, _)| *tree).collect();
    assert!(
        staged.iter().any(|tree| matches!(tree, Tree::Sagas)),
        "the retry writes a snapshot: {staged:?}"
    );
    store.flush_writes().await.expect("flush");
    assert_eq!(store.get(&id).expect("get"), Some(retried.saga.clone()));
    assert_read_together(&store, &id);

    // An earlier version's ended record (unmarked) with the retry's entry after
    // it, as that version wrote a retry: the read folds the entry in.
    let unmarked = String::from_utf8(store.encode_record(&failed.saga).expect("encode"))
        .expect("utf8")
        .replace(",\"ended_is_latest\":true", "");
    assert!(!store.decode_snapshot(unmarked.as_bytes()).expect("decode").1);
    store.sagas.insert(key, unmarked.as_bytes()).expect("insert");
    let entry = journal::entry(&failed.saga, &retried).expect("an entry, not a snapshot");
    store
        .journal
        .insert(
            history_key(&key, retried.saga.seq),
            encode(&entry).expect("encode"),
        )
        .expect("insert");
    assert_eq!(store.get(&id).expect("get"), Some(retried.saga));
}

#[tokio::test]
async fn entries_keep_commands_by_step_and_attempt_and_nothing_empty_and_earlier_entries_still_read() {
    use crate::definition::InputValue;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut d = def();
    d.steps[0].input = [(
        "order".to_string(),
        InputValue::Order {
            path: vec!["order_id".into()],
        },
    )]
    .into();
    d.steps[0].compensation_input = [(
        "reservation".to_string(),
        InputValue::StepOutput {
            step: 0,
            path: vec!["reservation_id".into()],
        },
    )]
    .into();
    d.steps[1].input = [("note".to_string(), InputValue::Literal { value: "gift".into() })].into();
    let mut created = new_saga(None);
    created.saga.definition = std::sync::Arc::new(d);
    let id = Uuid::parse_str(&created.saga.id).expect("uuid");
    let key = saga_key(&created.saga.id).expect("key");
    store.write(&created, None).expect("write");
    let release = Event::Reply {
        step: 0,
        kind: CommandKind::Compensate,
        attempt: 1,
        outcome: Outcome::Transient("timeout".into()),
    };
    let events = [
        Event::Start,
        reply(0, 1, Outcome::Transient("timeout".into())),
        reply(0, 2, Outcome::Ok(serde_json::json!({"reservation_id": "r-9"}))),
        reply(1, 1, Outcome::Rejected("declined".into())),
        release,
    ];
    // Each transition's commands as the engine built them, by journal key.
    let mut whole = Vec::new();
    let mut saga = created.saga.clone();
    for (now, event) in events.iter().enumerate() {
        let (t, _) = step(&store, &saga, event.clone(), now as u64 + 2);
        store.flush_writes().await.expect("flush");
        let expected: Vec<OutboxEntry> = t.commands.iter().map(|c| OutboxEntry::new(&t.saga, c)).collect();
        assert_eq!(expected.len(), 1, "one command in flight after {event:?}");
        let (_, in_flight) = store.load(id.as_bytes()).expect("load").expect("stored");
        assert_eq!(in_flight, expected, "after {event:?}");
        whole.push((history_key(&key, t.saga.seq), expected));
        saga = t.saga;
    }
    let last = &whole[whole.len() - 1].1[0];
    assert_eq!(last.kind, CommandKind::Compensate);
    assert_eq!(last.message.attempt, 2);
    assert_eq!(last.message.input, serde_json::json!({"reservation": "r-9"}));
    for (k, _) in &whole {
        let v = store.journal.get(k).expect("get").expect("entry");
        let text = String::from_utf8_lossy(&v);
        assert!(
            !text.contains("saga.cmd.") && !text.contains("amount_cents"),
            "{text}"
        );
        for empty in [
            r#""reason":null"#,
            r#""step":null"#,
            r#""attempt":null"#,
            r#""detail":null"#,
            ":[]",
        ] {
            assert!(!text.contains(empty), "{empty} in {text}");
        }
    }
    let history = store.history(&id).expect("history");

    // The entries as the version before wrote them: each command whole, and
    // every empty field written out.
    for (k, commands) in &whole {
        let v = store.journal.get(k).expect("get").expect("entry");
        let mut entry: serde_json::Value = serde_json::from_slice(&v).expect("json");
        let fields = entry.as_object_mut().expect("an object");
        fields.remove("sent").expect("sent");
        fields.insert("commands".into(), serde_json::to_value(commands).expect("json"));
        for (field, empty) in [
            ("reason", serde_json::Value::Null),
            ("steps", serde_json::json!([])),
            ("settled", serde_json::json!([])),
        ] {
            fields.entry(field).or_insert(empty);
        }
        for h in fields["history"].as_array_mut().expect("history") {
            let h = h.as_object_mut().expect("an object");
            for field in ["step", "attempt", "detail"] {
                h.entry(field).or_insert(serde_json::Value::Null);
            }
        }
        store
            .journal
            .insert(k, serde_json::to_vec(&entry).expect("json"))
            .expect("insert");
    }
    let (loaded, in_flight) = store.load(id.as_bytes()).expect("load").expect("stored");
    assert_eq!(loaded, saga);
    assert_eq!(in_flight, whole[whole.len() - 1].1);
    assert_eq!(store.history(&id).expect("history"), history);
    assert_read_together(&store, &id);
}

/// Every list page `store` gives for the queries a console and sagactl ask,
/// each against the summaries of the sagas read one by one.
fn assert_pages_match_the_sagas(store: &Store, ids: &[Uuid]) {
    let all: Vec<Summary> = ids
        .iter()
        .map(|id| Summary::of(&store.get(id).expect("get").expect("stored")))
        .collect();
    let mut queries = vec![ListQuery::page(None, None, 10)];
    for tag in StateTag::ALL {
        queries.push(ListQuery::page(Some(tag), None, 10));
        queries.push(ListQuery {
            customer_id: Some("c".into()),
            ..ListQuery::page(Some(tag), None, 10)
        });
        queries.push(ListQuery {
            definition: Some("order@1".into()),
            newest_first: true,
            ..ListQuery::page(Some(tag), None, 10)
        });
    }
    for q in queries {
        let mut want: Vec<Summary> = all.iter().filter(|s| q.matches(s)).cloned().collect();
        if q.newest_first {
            want.reverse();
        }
        assert_eq!(store.list(&q).expect("list").sagas, want, "{q:?}");
    }
}

#[tokio::test]
async fn a_terminal_sagas_state_entry_holds_its_summary_and_earlier_empty_entries_read_the_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let (mut ids, mut ended) = (Vec::new(), Vec::new());
    let mut start = || {
        let created = new_saga(None);
        store.write(&created, None).expect("write");
        ids.push(Uuid::parse_str(&created.saga.id).expect("id"));
        step(&store, &created.saga, Event::Start, 2).0
    };
    let running = start();
    let (reserved, _) = step(
        &store,
        &start().saga,
        reply(0, 1, Outcome::Ok(serde_json::json!({"r": 1}))),
        3,
    );
    let (completed, _) = step(
        &store,
        &reserved.saga,
        reply(1, 1, Outcome::Ok(serde_json::json!({}))),
        4,
    );
    let (compensated, _) = step(
        &store,
        &start().saga,
        reply(0, 1, Outcome::Rejected("stock".into())),
        5,
    );
    let failed = to_failed(&store, &start().saga, 6);
    ended.extend([&completed.saga, &compensated.saga, &failed.saga]);
    store.flush_writes().await.expect("flush");
    assert_eq!(
        ended.iter().map(|s| s.state.tag()).collect::<Vec<_>>(),
        [StateTag::Completed, StateTag::Compensated, StateTag::Failed]
    );
    let entry = |s: &engine::Saga| {
        let id = saga_key(&s.id).expect("key");
        store
            .by_state
            .get(state_key(s.state.tag(), &id))
            .expect("get")
            .expect("indexed")
    };
    for s in &ended {
        let stored: crate::store::query::StoredSummaryIn = decode(&entry(s), "summary").expect("decode");
        let id = Uuid::parse_str(&s.id).expect("id");
        assert_eq!(Summary::from_stored(&id, s.state.tag(), stored), Summary::of(s));
    }
    assert!(
        entry(&running.saga).is_empty(),
        "an active saga's entry stays empty"
    );
    assert_pages_match_the_sagas(&store, &ids);

    // An operator's retry leaves FAILED: the entry it moves to is an active one.
    let (retried, _) = step(&store, &failed.saga, Event::Retry, 9);
    store.flush_writes().await.expect("flush");
    assert!(entry(&retried.saga).is_empty());
    assert_pages_match_the_sagas(&store, &ids);

    // Entries as earlier versions wrote them (empty): the pages read the records.
    for s in [&completed.saga, &compensated.saga] {
        let id = saga_key(&s.id).expect("key");
        store
            .by_state
            .insert(state_key(s.state.tag(), &id), &[][..])
            .expect("insert");
    }
    assert_pages_match_the_sagas(&store, &ids);

    // The page of ended sagas is the entries' summaries: a bad one is reported, not skipped.
    let key = state_key(StateTag::Completed, &saga_key(&completed.saga.id).expect("key"));
    store
        .by_state
        .insert(key, &b"{\"v\":1,\"order_id\":7}"[..])
        .expect("insert");
    let e = store
        .list(&ListQuery::page(Some(StateTag::Completed), None, 10))
        .expect_err("a corrupt summary");
    assert!(e.to_string().contains("state index summary"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_now_commits_before_it_returns_on_a_multi_thread_runtime() {
    use crate::store::SagaStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let created = new_saga(Some("now"));
    let id = Uuid::parse_str(&created.saga.id).expect("uuid");
    store.stage(&created, None).expect("stage");
    let committed = store.commit_now().expect("commits here").expect("commit");
    assert!(committed.lost().is_empty());
    assert!(store.staged().ops.is_empty(), "nothing left staged");
    assert!(store.staged().latest.is_empty());
    assert_eq!(store.get(&id).expect("get"), Some(created.saga.clone()));
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.get(&id).expect("get"), Some(created.saga));
    assert_eq!(store.saga_for_key("now").expect("key"), Some(id));
}

#[tokio::test]
async fn commit_now_leaves_the_commit_to_a_task_on_a_current_thread_runtime() {
    use crate::store::SagaStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let created = new_saga(None);
    store.stage(&created, None).expect("stage");
    assert!(store.commit_now().is_none(), "block_in_place would panic here");
    assert!(!store.staged().ops.is_empty(), "still staged");
    let committed = store.begin_commit().await.expect("task").expect("commit");
    assert!(committed.lost().is_empty());
    assert!(store.staged().ops.is_empty());
}
