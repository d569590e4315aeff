//! The [`SagaStore`] contract, checked on every store that can run here
//! (sled on a temp dir, the in-memory store): what a reader sees before and
//! after a commit, and what a commit makes durable.

use std::{path::PathBuf, sync::Arc, time::Duration};

use saga_wire::{Item, OrderPayload};
use uuid::Uuid;

use super::{memory::MemoryStore, ListQuery, SagaStore, Store};
use crate::{
    definition::{RetryPolicy, SagaDefinition, StepDefinition},
    engine::{self, Event, StateTag, Transition},
};

fn definition(name: &str) -> Arc<SagaDefinition> {
    let step = StepDefinition {
        name: "reserve-inventory".into(),
        participant: "inventory".into(),
        action: "reserve".into(),
        compensation: Some("release".into()),
        timeout: Duration::from_secs(1),
        retry: RetryPolicy::default(),
        group: None,
        on_failure: Default::default(),
        input: Default::default(),
        compensation_input: Default::default(),
        output_schema: None,
        kind: Default::default(),
        when: None,
    };
    Arc::new(SagaDefinition {
        name: name.into(),
        version: 1,
        steps: vec![step],
        input_schema: None,
        events: Default::default(),
        deadline: None,
        source: PathBuf::new(),
    })
}

/// A new saga of `def`, created at `at_ms` and started 1 ms later, as the runner writes it.
fn started(
    def: Arc<SagaDefinition>,
    customer: &str,
    order_id: &str,
    at_ms: u64,
    key: Option<&str>,
) -> Transition {
    let order = OrderPayload {
        order_id: order_id.into(),
        customer_id: customer.into(),
        items: vec![Item {
            sku: "A".into(),
            quantity: 1,
        }],
        amount_cents: 5,
        currency: "EUR".into(),
    };
    let mut created = engine::create(
        Uuid::now_v7().to_string(),
        def,
        order,
        "corr".into(),
        key.map(str::to_string),
        at_ms,
    );
    // Written with its start, as the runner does.
    let started = match engine::transition(&created.saga, &Event::Start, at_ms + 1) {
        Ok(Some(t)) => t,
        other => panic!("start: {other:?}"),
    };
    created.history.extend(started.history);
    Transition {
        saga: started.saga,
        history: created.history,
        commands: started.commands,
        settled: started.settled,
    }
}

fn started_saga(key: &str) -> Transition {
    started(definition("order"), "c", "o", 1, Some(key))
}

async fn check_contract(store: &dyn SagaStore) {
    let t = started_saga("k-1");
    let id = Uuid::parse_str(&t.saga.id).unwrap_or_default();
    let stage = store.stage(&t, None);
    assert!(stage.is_ok(), "{stage:?}");

    // Staged: the runner reads it back; nobody else sees it yet.
    let latest = store.get_latest(&id).await;
    assert!(
        matches!(&latest, Ok(Some(s)) if s.seq == t.saga.seq),
        "{latest:?}"
    );
    assert!(
        matches!(store.get(&id).await, Ok(None)),
        "{}: visible before its commit",
        store.name()
    );

    let committed = match store.begin_commit().await {
        Ok(Ok(committed)) => committed,
        other => panic!("{}: commit: {other:?}", store.name()),
    };
    assert!(committed.lost().is_empty());

    // Durable: readable by everyone, resumable with its command.
    assert!(matches!(store.get(&id).await, Ok(Some(_))));
    assert_eq!(store.saga_for_key("k-1").await.ok().flatten(), Some(id));
    let with_history = store.get_with_history(&id).await.ok().flatten();
    assert_eq!(with_history.map(|(_, h)| h.len()), Some(t.history.len()));
    let resumed = store.resume_at_start().unwrap_or_default();
    assert_eq!(resumed.len(), 1, "{}", store.name());
    assert_eq!(resumed[0].1.len(), t.commands.len());
    let page = store
        .list(&ListQuery::page(None, None, 10))
        .await
        .map(|p| p.sagas.len());
    assert_eq!(page.ok(), Some(1));

    // Its events wait until published.
    let pending = store.events_pending(100).unwrap_or_default();
    assert!(!pending.is_empty(), "{}: no events", store.name());
    let keys: Vec<Vec<u8>> = pending.iter().map(|(k, _)| k.clone()).collect();
    assert!(store.events_published(&keys).is_ok());
    assert!(store.events_pending(100).unwrap_or_default().is_empty());
}

#[tokio::test]
async fn the_sled_store_keeps_the_contract() {
    let dir = tempfile::tempdir();
    let Ok(dir) = dir else {
        panic!("temp dir: {dir:?}");
    };
    match Store::open(dir.path()) {
        Ok(store) => check_contract(&store).await,
        Err(e) => panic!("open: {e}"),
    }
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    check_contract(&MemoryStore::like_sled()).await;
    check_contract(&MemoryStore::like_jetstream()).await;
}

/// Every id `q` lists, page after page until the token is empty.
async fn listed(store: &dyn SagaStore, q: ListQuery) -> Vec<String> {
    let mut q = q;
    let mut ids = Vec::new();
    for _ in 0..100 {
        let page = match store.list(&q).await {
            Ok(page) => page,
            Err(e) => panic!("{}: list {q:?}: {e}", store.name()),
        };
        assert!(page.sagas.len() <= q.limit);
        ids.extend(page.sagas.into_iter().map(|s| s.id));
        match page.next {
            Some(next) => q.after = Some(next),
            None => return ids,
        }
    }
    panic!("{}: {q:?} never ended", store.name());
}

/// The `ListSagas` filters: each alone and together, both directions, paged.
async fn check_list_filters(store: &dyn SagaStore) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (order, three_ds) = (definition("order"), definition("order-3ds"));
    let sagas = [
        (&order, "c1", "o1"),
        (&order, "c2", "o2"),
        (&three_ds, "c1", "o3"),
        (&order, "c1", "o4"),
        (&three_ds, "c2", "o5"),
    ];
    let mut ids = Vec::new();
    for (i, (def, customer, order_id)) in sagas.into_iter().enumerate() {
        let t = started(def.clone(), customer, order_id, now + 1000 * i as u64, None);
        assert!(store.stage(&t, None).is_ok());
        assert!(matches!(store.begin_commit().await, Ok(Ok(_))));
        ids.push(t.saga.id.clone());
        // Ids made in one millisecond need not sort in creation order.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pick = |which: &[usize]| which.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>();
    let q = |limit: usize| ListQuery {
        limit,
        ..Default::default()
    };
    let name = store.name();
    let customer = |c: &str, limit| ListQuery {
        customer_id: Some(c.into()),
        ..q(limit)
    };
    assert_eq!(
        listed(store, customer("c1", 10)).await,
        pick(&[0, 2, 3]),
        "{name}"
    );
    assert_eq!(
        listed(store, customer("c1", 1)).await,
        pick(&[0, 2, 3]),
        "{name}: paged"
    );
    let newest = ListQuery {
        newest_first: true,
        ..customer("c1", 1)
    };
    assert_eq!(
        listed(store, newest).await,
        pick(&[3, 2, 0]),
        "{name}: newest first"
    );
    let one = ListQuery {
        order_id: Some("o4".into()),
        ..q(10)
    };
    assert_eq!(listed(store, one).await, pick(&[3]), "{name}");
    let none = ListQuery {
        order_id: Some("o".into()),
        ..q(10)
    };
    assert!(
        listed(store, none).await.is_empty(),
        "{name}: an order id is matched whole"
    );
    let def = |d: &str| ListQuery {
        definition: Some(d.into()),
        ..q(10)
    };
    assert_eq!(listed(store, def("order-3ds")).await, pick(&[2, 4]), "{name}");
    assert_eq!(listed(store, def("order-3ds@1")).await, pick(&[2, 4]), "{name}");
    assert!(listed(store, def("order-3ds@2")).await.is_empty(), "{name}");
    assert_eq!(
        listed(store, def("order")).await,
        pick(&[0, 1, 3]),
        "{name}: not order-3ds"
    );
    let both = ListQuery {
        definition: Some("order".into()),
        ..customer("c1", 10)
    };
    assert_eq!(listed(store, both).await, pick(&[0, 3]), "{name}");
    let window = ListQuery {
        created_from_ms: Some(now + 1000),
        created_before_ms: Some(now + 4000),
        ..q(2)
    };
    assert_eq!(
        listed(store, window).await,
        pick(&[1, 2, 3]),
        "{name}: time range"
    );
    let running = ListQuery {
        state: Some(StateTag::Running),
        ..customer("c2", 10)
    };
    assert_eq!(listed(store, running).await, pick(&[1, 4]), "{name}");
    let done = ListQuery {
        state: Some(StateTag::Completed),
        ..customer("c2", 10)
    };
    assert!(listed(store, done).await.is_empty(), "{name}");
    let all = ListQuery {
        newest_first: true,
        ..q(2)
    };
    assert_eq!(listed(store, all).await, pick(&[4, 3, 2, 1, 0]), "{name}");
}

#[tokio::test]
async fn every_store_lists_by_the_same_filters() {
    let dir = tempfile::tempdir();
    let Ok(dir) = dir else {
        panic!("temp dir: {dir:?}");
    };
    match Store::open(dir.path()) {
        Ok(store) => check_list_filters(&store).await,
        Err(e) => panic!("open: {e}"),
    }
    check_list_filters(&MemoryStore::like_sled()).await;
}
