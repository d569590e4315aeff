//! The console as an operator has it open. `--stored`: each page fetched
//! over and over, its latency and the coordinator's CPU per page (what a
//! page costs at that many stored sagas). `--console-tab`: during each sweep
//! run, a sagas list left open, fetched once and then its rows every 2 s as
//! the page's script does, so the run's sagas/s is measured with it.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Result};
use hdrhistogram::Histogram;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    drive::histogram,
    sys::{self, http_get},
};

/// How often the list page's script fetches its rows (`console.js`).
const REFRESH: Duration = Duration::from_secs(2);

/// One console page fetched `n` times back to back.
#[derive(Debug, Clone)]
pub(crate) struct PageCost {
    pub(crate) name: &'static str,
    pub(crate) latency: Histogram<u64>,
    /// The coordinator's CPU time over the fetches, per fetch (µs).
    pub(crate) cpu_us: Option<f64>,
    /// The page's size, bytes.
    pub(crate) bytes: usize,
}

/// Times each console page `n` times on the coordinator at `http` (whose
/// process is `pid`): the list with its counts, its rows (the refresh), a
/// list filtered by `customer`, the page of saga `id`, the definitions.
///
/// # Errors
/// A page did not answer 200.
pub(crate) async fn page_costs(
    http: SocketAddr,
    pid: Option<u32>,
    ticks: f64,
    id: &str,
    customer: &str,
    n: usize,
) -> Result<Vec<PageCost>> {
    let pages: [(&'static str, String); 5] = [
        ("sagas list, counts and 50 newest", "/console/sagas".into()),
        (
            "sagas list rows (the 2 s refresh)",
            "/console/sagas?fragment=1".into(),
        ),
        (
            "list filtered by a customer",
            format!("/console/sagas?customer={customer}"),
        ),
        ("a saga's page", format!("/console/sagas/{id}")),
        ("definitions", "/console/definitions".into()),
    ];
    let cpu = || pid.and_then(|p| sys::sample(p, ticks).ok()).map(|s| s.cpu_s);
    let mut out = Vec::new();
    for (name, path) in pages {
        let mut latency = histogram();
        let mut bytes = 0;
        let before = cpu();
        for _ in 0..n.max(1) {
            let t = Instant::now();
            let (code, body) = http_get(http, &path).await?;
            ensure!(code == 200, "console {path}: HTTP {code}");
            let _ = latency.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
            bytes = body.len();
        }
        let cpu_us = before.zip(cpu()).map(|(b, a)| (a - b) * 1e6 / n.max(1) as f64);
        out.push(PageCost {
            name,
            latency,
            cpu_us,
            bytes,
        });
    }
    Ok(out)
}

/// A sagas list left open in a browser tab.
pub(crate) struct Tab {
    stop: watch::Sender<bool>,
    task: JoinHandle<TabFigures>,
}

/// What the open tab fetched during a run.
#[derive(Debug, Clone)]
pub(crate) struct TabFigures {
    pub(crate) fetches: usize,
    pub(crate) failures: usize,
    pub(crate) latency: Histogram<u64>,
}

impl Tab {
    /// Opens the list on the coordinator at `http`: the page now, its rows every 2 s.
    pub(crate) fn open(http: SocketAddr) -> Tab {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut f = TabFigures {
                fetches: 0,
                failures: 0,
                latency: histogram(),
            };
            let mut path = "/console/sagas";
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return f,
                }
                let t = Instant::now();
                match http_get(http, path).await {
                    Ok((200, _)) => {
                        f.fetches += 1;
                        let _ = f
                            .latency
                            .record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                    }
                    _ => f.failures += 1,
                }
                path = "/console/sagas?fragment=1";
            }
        });
        Tab { stop, task }
    }

    /// Closes the tab and says what it fetched.
    pub(crate) async fn close(self) -> Option<TabFigures> {
        let _ = self.stop.send(true);
        self.task.await.ok()
    }
}
