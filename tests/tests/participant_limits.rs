//! `--max-in-flight`: a participant never sees more commands at once than
//! its limit, before and after a coordinator restart, and a command that
//! waits for room spends no attempt (its deadline does not run).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Result;
use futures::StreamExt;
use saga_proto::pb;
use saga_testkit::*;

const LIMIT: usize = 3;
const SAGAS: usize = 16;
/// Longer than a third of the fake step's 300 ms timeout: a queued
/// command whose deadline ran would time out and be retried.
const HOLD: Duration = Duration::from_millis(120);

/// A participant `fake` that holds each command for [`HOLD`] (each in a task
/// of its own, so commands overlap) and counts how many it holds at once.
struct Concurrent {
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    attempts: Arc<Mutex<Vec<u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Concurrent {
    async fn start(client: &async_nats::Client) -> Result<Self> {
        let mut sub = client.subscribe("saga.cmd.fake.*").await?;
        client.flush().await?;
        let now: Arc<AtomicUsize> = Arc::default();
        let most: Arc<AtomicUsize> = Arc::default();
        let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
        let (c, n, m, a) = (client.clone(), now.clone(), most.clone(), attempts.clone());
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(cmd) = serde_json::from_slice::<saga_wire::Command>(&msg.payload) else {
                    continue;
                };
                if let Ok(mut a) = a.lock() {
                    a.push(cmd.attempt);
                }
                let (c, n, m) = (c.clone(), n.clone(), m.clone());
                tokio::spawn(async move {
                    let held = n.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(held, Ordering::SeqCst);
                    tokio::time::sleep(HOLD).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                    let ok = saga_wire::Reply::Ok {
                        data: serde_json::json!({}),
                    };
                    let body = serde_json::to_vec(&ok).unwrap_or_default();
                    if let Some(reply) = msg.reply {
                        let _ = c.publish(reply, body.into()).await;
                    }
                });
            }
        });
        Ok(Concurrent {
            now,
            most,
            attempts,
            task,
        })
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
}

impl Drop for Concurrent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_limited(s: &mut System) -> Result<()> {
    let c = RunningCoordinator::start_with(
        &s.nats.access(),
        &s.dir.path().join("coordinator"),
        &s.definitions,
        |c| c.max_in_flight = format!("fake={LIMIT}").parse().expect("limits"),
    )
    .await?;
    c.wait_ready().await?;
    s.coordinator = Some(c);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_sees_at_most_its_limit_also_after_a_restart_burst() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = System::bare(Some(fake_definitions(dir.path(), 3)?)).await?;
    s.start_inventory().await?;
    let fake = Concurrent::start(&s.client).await?;
    start_limited(&mut s).await?;
    let mut g = s.grpc().await?;
    let mut ids = Vec::new();
    for _ in 0..SAGAS {
        let req = pb::CreateOrderRequest {
            definition: "fake".into(),
            ..order("c-1", &[("A-1", 1)], 100)
        };
        ids.push(g.create_order(req).await?.into_inner().saga_id);
    }
    // The queue is visible while it waits.
    let http = s
        .coordinator
        .as_ref()
        .map(|c| c.http_addr)
        .ok_or_else(|| anyhow::anyhow!("no coordinator"))?;
    eventually(Duration::from_secs(5), "a queue in the gauge", || async {
        http_get(http, "/metrics").await.is_ok_and(|(_, body)| {
            body.lines()
                .any(|l| l.starts_with("saga_dispatch_queued{participant=\"fake\"}") && !l.ends_with(" 0"))
        })
    })
    .await?;
    // A restart with commands in flight and queued: the resumed commands
    // leave at once, under the same limit.
    s.stop_coordinator().await?;
    eventually(Duration::from_secs(5), "the fake idle", || async {
        fake.now.load(Ordering::SeqCst) == 0
    })
    .await?;
    start_limited(&mut s).await?;
    let mut g = s.grpc().await?;
    for id in &ids {
        let done = wait_terminal(&mut g, id, Duration::from_secs(60)).await?;
        assert!(is_terminal(done.state), "{done:#?}");
    }
    assert_eq!(fake.most(), LIMIT, "reached, never passed");
    let attempts = fake.attempts.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(
        attempts.iter().all(|a| *a == 1),
        "no command timed out while it waited: {attempts:?}"
    );
    s.shutdown().await
}
