//! The [`SagaStore`] contract, checked on every store that can run here
//! (sled on a temp dir, the in-memory store): what a reader sees before and
//! after a commit, and what a commit makes durable.

use std::{path::PathBuf, sync::Arc, time::Duration};

use saga_wire::{Item, OrderPayload};
use uuid::Uuid;

use super::{memory::MemoryStore, SagaStore, Store};
use crate::{
    definition::{RetryPolicy, SagaDefinition, StepDefinition},
    engine::{self, Event, Transition},
};

fn started_saga(key: &str) -> Transition {
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
    let definition = Arc::new(SagaDefinition {
        name: "order".into(),
        version: 1,
        steps: vec![step],
        input_schema: None,
        events: Default::default(),
        deadline: None,
        source: PathBuf::new(),
    });
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
    let mut created = engine::create(
        Uuid::now_v7().to_string(),
        definition,
        order,
        "corr".into(),
        Some(key.into()),
        1,
    );
    // Written with its start, as the runner does.
    let started = match engine::transition(&created.saga, &Event::Start, 2) {
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
    let page = store.list(None, None, 10).await.map(|p| p.sagas.len());
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
