//! The stored scenario's timed reads, GetSaga over random ids and a walk
//! through ListSagas pages, made by a client on a thread of its own.
//!
//! On the harness's multi-thread runtime one call hopped between its main
//! thread and both workers (seen with `perf sched`), and each hop can
//! wait milliseconds for an idle vCPU to wake: on the 2-core VM, with
//! 100,000 stored, a fifth to a third of what was timed (docs/benchmarks.md).
//! A current-thread client writes and reads its socket itself.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use rand::{rngs::StdRng, Rng, SeedableRng};
use saga_proto::pb::{self, SagaState};

use super::drive::{histogram, micros};

/// What to read and how often.
pub(crate) struct Plan {
    pub(crate) addr: SocketAddr,
    /// The sagas to pick GetSaga's ids from (at random, from `seed`).
    pub(crate) ids: Vec<String>,
    pub(crate) seed: u64,
    pub(crate) samples: usize,
    /// At most this many COMPLETED pages of `page_size`, from the first.
    pub(crate) pages: usize,
    pub(crate) page_size: u32,
}

/// Each GetSaga's and each ListSagas page's latency, in microseconds.
pub(crate) struct Timed {
    pub(crate) get: Histogram<u64>,
    pub(crate) list: Histogram<u64>,
}

/// Runs `plan` from a new connection on a current-thread runtime of its own
/// (on the blocking pool, so the harness's runtime goes on meanwhile).
///
/// # Errors
/// The connection could not be made, or a read failed.
pub(crate) async fn run(plan: Plan) -> Result<Timed> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the readers' runtime")?
            .block_on(reads(&plan))
    })
    .await
    .context("the readers' thread")?
}

async fn reads(plan: &Plan) -> Result<Timed> {
    let mut g = saga_testkit::connect(plan.addr)
        .await?
        .max_decoding_message_size(64 << 20);
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut get = histogram();
    if !plan.ids.is_empty() {
        for _ in 0..plan.samples {
            let id = &plan.ids[rng.random_range(0..plan.ids.len())];
            let t = Instant::now();
            g.get_saga(pb::GetSagaRequest { saga_id: id.clone() }).await?;
            let _ = get.record(micros(t.elapsed()));
        }
    }
    let mut list = histogram();
    let mut token = String::new();
    for _ in 0..plan.pages {
        let t = Instant::now();
        let page = g
            .list_sagas(pb::ListSagasRequest {
                state: SagaState::Completed as i32,
                page_size: plan.page_size,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let _ = list.record(micros(t.elapsed()));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    Ok(Timed { get, list })
}
