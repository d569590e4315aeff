//! Driving orders: the order mix (each order knows the terminal state it
//! must reach), one order from `CreateOrder` to its terminal state
//! (`WatchSaga`, or `GetSaga` polling), and the two loads: closed loop (N
//! orders, C in flight) and open loop (a steady rate).
//!
//! Latency is end to end: from the moment `CreateOrder` is sent to the
//! moment the terminal state is seen by the client, in an HDR histogram
//! of microseconds.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use rand::{rngs::StdRng, Rng, SeedableRng};
use saga_proto::pb::{self, saga_service_client::SagaServiceClient, SagaState};
use tonic::transport::Channel;

use super::{
    cli::Follow,
    sys::{RARE, RARE_QUANTITY, SKUS},
};

/// The terminal state an order must reach, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Completed,
    /// Above the customer limit: charge rejected, reservation released.
    Declined,
    /// An item of the SKU without stock: reservation rejected.
    OutOfStock,
}

impl Expect {
    fn state(self) -> SagaState {
        match self {
            Expect::Completed => SagaState::Completed,
            Expect::Declined | Expect::OutOfStock => SagaState::Compensated,
        }
    }
}

/// The order mix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mix {
    pub(crate) declined_share: f64,
    pub(crate) out_of_stock_share: f64,
    pub(crate) customer_limit_cents: i64,
}

impl Mix {
    /// Orders that all complete.
    pub(crate) fn all_complete(customer_limit_cents: i64) -> Self {
        Mix {
            declined_share: 0.0,
            out_of_stock_share: 0.0,
            customer_limit_cents,
        }
    }

    /// Order `i` of the run tagged `tag`: the same `(seed, tag, i)` always
    /// gives the same order and idempotency key.
    pub(crate) fn order(&self, seed: u64, tag: &str, i: usize) -> (pb::CreateOrderRequest, Expect) {
        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let item = |sku: &str, quantity: u32| pb::OrderItem {
            sku: sku.into(),
            quantity,
        };
        let roll: f64 = rng.random();
        let limit = self.customer_limit_cents;
        let (items, amount, expect) = if roll < self.declined_share {
            (
                vec![item(SKUS[0], rng.random_range(1..4))],
                limit + rng.random_range(1..5000),
                Expect::Declined,
            )
        } else if roll < self.declined_share + self.out_of_stock_share {
            (
                vec![item(SKUS[0], 1), item(RARE, RARE_QUANTITY)],
                500,
                Expect::OutOfStock,
            )
        } else {
            let mut items = vec![item(SKUS[0], rng.random_range(1..4))];
            if rng.random_bool(0.5) {
                items.push(item(
                    SKUS[1 + rng.random_range(0..SKUS.len() - 1)],
                    rng.random_range(1..3),
                ));
            }
            (items, rng.random_range(100..limit.min(50_000)), Expect::Completed)
        };
        let req = pb::CreateOrderRequest {
            customer_id: format!("c-{}", i % 1000),
            items,
            amount_cents: amount,
            currency: "EUR".into(),
            idempotency_key: format!("bench-{seed}-{tag}-{i}"),
            order_id: format!("{tag}-{i}"),
            ..Default::default()
        };
        (req, expect)
    }
}

/// gRPC clients over a few HTTP/2 connections per coordinator, and how
/// orders are followed.
#[derive(Clone)]
pub(crate) struct Driver {
    /// Per coordinator, its connections.
    clients: Vec<Vec<SagaServiceClient<Channel>>>,
    follow: Follow,
    order_timeout: Duration,
}

impl Driver {
    /// Opens `connections` channels to each of `addrs`.
    ///
    /// # Errors
    /// No address, or no connection within 10 s.
    pub(crate) async fn connect(
        addrs: &[std::net::SocketAddr],
        connections: usize,
        follow: Follow,
        order_timeout: Duration,
    ) -> Result<Self> {
        anyhow::ensure!(!addrs.is_empty(), "no coordinator to drive");
        let mut clients = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let mut per = Vec::with_capacity(connections.max(1));
            for _ in 0..connections.max(1) {
                per.push(
                    SagaServiceClient::new(saga_testkit::channel(*addr).await?)
                        .max_decoding_message_size(64 << 20),
                );
            }
            clients.push(per);
        }
        Ok(Driver {
            clients,
            follow,
            order_timeout,
        })
    }

    /// A client of the first coordinator, for worker `n`.
    pub(crate) fn client(&self, n: usize) -> SagaServiceClient<Channel> {
        self.client_of(0, n)
    }

    /// The client of coordinator `c` (modulo their number) for worker `n`.
    fn client_of(&self, c: usize, n: usize) -> SagaServiceClient<Channel> {
        let per = &self.clients[c % self.clients.len()];
        per[n % per.len()].clone()
    }

    /// Places order number `order` (on the coordinators in turn) from worker
    /// `worker`, and follows it to its terminal state on the coordinator
    /// that created it.
    pub(crate) async fn one(&self, worker: usize, order: usize, req: pb::CreateOrderRequest) -> OrderResult {
        let mut client = self.client_of(order, worker);
        let sent = Instant::now();
        let run = async {
            let (created, retries) = create(&mut client, req).await?;
            let acked = sent.elapsed();
            // A retried create may have landed before its UNAVAILABLE: then the key is ours.
            anyhow::ensure!(
                created.created || retries > 0,
                "its idempotency key matched an existing saga ({}): not a new order",
                created.saga_id
            );
            let followed = self.follow_saga(&mut client, &created.saga_id).await?;
            anyhow::Ok((created.saga_id, acked, followed, retries))
        };
        match tokio::time::timeout(self.order_timeout, run).await {
            Ok(Ok((saga_id, acked, f, retries))) => OrderResult {
                saga_id,
                latency: sent.elapsed(),
                acked,
                state: Some(f.state),
                reason: f.reason,
                fallback: f.fallback,
                not_found: f.not_found,
                retries,
                error: None,
            },
            Ok(Err(e)) => OrderResult::failed(format!("{e:#}")),
            Err(_) => OrderResult::failed(format!("not terminal within {:?}", self.order_timeout)),
        }
    }

    /// How the saga ended, as followed on `client`.
    async fn follow_saga(&self, client: &mut SagaServiceClient<Channel>, saga_id: &str) -> Result<Followed> {
        let start = Instant::now();
        let mut not_found = false;
        if self.follow == Follow::Watch {
            match client
                .watch_saga(pb::WatchSagaRequest {
                    saga_id: saga_id.into(),
                })
                .await
            {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(saga)) if saga_testkit::is_terminal(saga.state) => {
                                // Read the stream to its end (the server closes it after the
                                // terminal state): dropping it early makes the client's h2 reset
                                // the stream, and after ~1000 such resets on one connection it
                                // gives up the connection (GOAWAY too_many_internal_resets).
                                while let Ok(Some(_)) = stream.message().await {}
                                return Ok(Followed {
                                    state: saga.state,
                                    reason: saga.reason,
                                    fallback: false,
                                    not_found,
                                });
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(s) => {
                                not_found |= s.code() == tonic::Code::NotFound;
                                break;
                            }
                        }
                    }
                }
                Err(s) => not_found |= s.code() == tonic::Code::NotFound,
            }
        }
        let mut pause = Duration::from_millis(1);
        loop {
            match client
                .get_saga(pb::GetSagaRequest {
                    saga_id: saga_id.into(),
                })
                .await
            {
                Ok(saga) => {
                    let saga = saga.into_inner();
                    if saga_testkit::is_terminal(saga.state) {
                        return Ok(Followed {
                            state: saga.state,
                            reason: saga.reason,
                            fallback: self.follow == Follow::Watch,
                            not_found,
                        });
                    }
                }
                // A stale read of a saga CreateOrder acknowledged (the jetstream store may read
                // a replica that has not applied the write yet): counted, and read again.
                Err(s) if s.code() == tonic::Code::NotFound && start.elapsed() < NOT_FOUND_GRACE => {
                    not_found = true;
                }
                Err(s) => return Err(s.into()),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// How long after CreateOrder a NOT_FOUND for the new saga counts as a stale
/// read (read again) rather than an error.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(2);

/// How a followed saga ended.
struct Followed {
    state: i32,
    reason: String,
    /// The watch stream failed and GetSaga polling took over.
    fallback: bool,
    /// WatchSaga or GetSaga answered NOT_FOUND for it at first.
    not_found: bool,
}

/// `CreateOrder`, retried while the coordinator answers UNAVAILABLE (with
/// the jetstream store, while partitions move between coordinators); the
/// answer and how many retries it took. The caller's timeout bounds it.
///
/// # Errors
/// Any other gRPC error.
async fn create(
    client: &mut SagaServiceClient<Channel>,
    req: pb::CreateOrderRequest,
) -> Result<(pb::CreateOrderResponse, usize)> {
    let mut retries = 0;
    loop {
        match client.create_order(req.clone()).await {
            Ok(r) => return Ok((r.into_inner(), retries)),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

/// What became of one order.
#[derive(Debug, Clone)]
pub(crate) struct OrderResult {
    pub(crate) saga_id: String,
    /// CreateOrder sent → terminal state seen.
    pub(crate) latency: Duration,
    /// CreateOrder sent → its answer (the saga is durable).
    pub(crate) acked: Duration,
    pub(crate) state: Option<i32>,
    pub(crate) reason: String,
    /// The watch stream failed and GetSaga polling took over.
    pub(crate) fallback: bool,
    /// CreateOrder answers UNAVAILABLE before it was accepted.
    pub(crate) retries: usize,
    /// The saga was NOT_FOUND at first right after CreateOrder acknowledged it.
    pub(crate) not_found: bool,
    pub(crate) error: Option<String>,
}

impl OrderResult {
    fn failed(error: String) -> Self {
        OrderResult {
            saga_id: String::new(),
            latency: Duration::ZERO,
            acked: Duration::ZERO,
            state: None,
            reason: String::new(),
            fallback: false,
            retries: 0,
            not_found: false,
            error: Some(error),
        }
    }
}

/// A latency histogram in microseconds, up to ten minutes.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .expect("constant bounds 1..600e6 with 3 significant figures are valid")
}

/// `d` in whole microseconds for a histogram (which takes no 0).
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Counts of a load: outcomes, mismatches, latencies.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    pub(crate) placed: usize,
    pub(crate) states: BTreeMap<&'static str, usize>,
    pub(crate) completed: usize,
    pub(crate) mismatches: usize,
    pub(crate) errors: usize,
    pub(crate) fallbacks: usize,
    /// CreateOrder retries after UNAVAILABLE.
    pub(crate) retries: usize,
    /// Orders whose saga WatchSaga or GetSaga did not find at first, right
    /// after CreateOrder acknowledged it (a stale read; read again).
    pub(crate) not_found: usize,
    /// A few mismatches and errors, for the report.
    pub(crate) examples: Vec<String>,
    /// End to end, µs.
    pub(crate) latency: Histogram<u64>,
    /// CreateOrder answer, µs.
    pub(crate) acked: Histogram<u64>,
    /// Saga ids, when asked for.
    pub(crate) ids: Vec<String>,
    keep_ids: bool,
}

impl Tally {
    pub(crate) fn new(keep_ids: bool) -> Self {
        Tally {
            placed: 0,
            states: BTreeMap::new(),
            completed: 0,
            mismatches: 0,
            errors: 0,
            fallbacks: 0,
            retries: 0,
            not_found: 0,
            examples: Vec::new(),
            latency: histogram(),
            acked: histogram(),
            ids: Vec::new(),
            keep_ids,
        }
    }

    pub(crate) fn add(&mut self, r: OrderResult, expect: Expect) {
        self.placed += 1;
        self.fallbacks += usize::from(r.fallback);
        self.retries += r.retries;
        self.not_found += usize::from(r.not_found);
        let Some(state) = r.state else {
            self.errors += 1;
            self.mismatches += 1;
            if self.examples.len() < 10 {
                self.examples
                    .push(format!("{expect:?} order: {}", r.error.unwrap_or_default()));
            }
            return;
        };
        let name = saga_proto::names::state(state);
        *self.states.entry(name).or_default() += 1;
        if state == SagaState::Completed as i32 {
            self.completed += 1;
        }
        if state != expect.state() as i32 {
            self.mismatches += 1;
            if self.examples.len() < 10 {
                self.examples.push(format!(
                    "saga {} ({expect:?} order) ended {name}: {}",
                    r.saga_id, r.reason
                ));
            }
        }
        let _ = self.latency.record(micros(r.latency));
        let _ = self.acked.record(micros(r.acked));
        if self.keep_ids {
            self.ids.push(r.saga_id);
        }
    }

    pub(crate) fn merge(&mut self, other: Tally) {
        self.placed += other.placed;
        for (k, v) in other.states {
            *self.states.entry(k).or_default() += v;
        }
        self.completed += other.completed;
        self.mismatches += other.mismatches;
        self.errors += other.errors;
        self.fallbacks += other.fallbacks;
        self.retries += other.retries;
        self.not_found += other.not_found;
        for e in other.examples {
            if self.examples.len() < 10 {
                self.examples.push(e);
            }
        }
        let _ = self.latency.add(&other.latency);
        let _ = self.acked.add(&other.acked);
        self.ids.extend(other.ids);
    }
}

/// A closed-loop load: `orders` orders, `concurrency` in flight, stopping
/// early (no new orders) at `max_time`.
pub(crate) struct Closed<'a> {
    pub(crate) driver: &'a Driver,
    pub(crate) mix: Mix,
    pub(crate) seed: u64,
    pub(crate) tag: String,
    pub(crate) orders: usize,
    pub(crate) concurrency: usize,
    pub(crate) max_time: Duration,
    pub(crate) keep_ids: bool,
}

impl Closed<'_> {
    /// Runs it; the tally and how long it took.
    ///
    /// # Errors
    /// A worker task panicked.
    pub(crate) async fn run(&self, bar: &ProgressBar) -> Result<(Tally, Duration)> {
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let deadline = start + self.max_time;
        let mut workers = Vec::with_capacity(self.concurrency);
        for w in 0..self.concurrency {
            let (next, driver, mix, seed, tag, orders, keep_ids, bar) = (
                next.clone(),
                self.driver.clone(),
                self.mix,
                self.seed,
                self.tag.clone(),
                self.orders,
                self.keep_ids,
                bar.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut tally = Tally::new(keep_ids);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= orders || Instant::now() >= deadline {
                        break;
                    }
                    let (req, expect) = mix.order(seed, &tag, i);
                    let r = driver.one(w, i, req).await;
                    tally.add(r, expect);
                    bar.inc(1);
                }
                tally
            }));
        }
        let mut tally = Tally::new(self.keep_ids);
        for w in workers {
            tally.merge(w.await?);
        }
        Ok((tally, start.elapsed()))
    }
}

/// An open-loop load: orders at `rate` per second for `duration` (at most
/// `max_in_flight` at once: beyond that the rate is not kept and the tally
/// says how many were placed), each followed to its end.
pub(crate) struct Open<'a> {
    pub(crate) driver: &'a Driver,
    pub(crate) mix: Mix,
    pub(crate) seed: u64,
    pub(crate) tag: String,
    pub(crate) rate: f64,
    pub(crate) duration: Duration,
    pub(crate) max_in_flight: usize,
}

impl Open<'_> {
    /// Runs it, calling `tick` about once a second (for sampling); the tally
    /// and how long placing and finishing took.
    ///
    /// # Errors
    /// The collector task failed.
    pub(crate) async fn run(
        &self,
        bar: &ProgressBar,
        mut tick: impl FnMut(Duration),
    ) -> Result<(Tally, Duration)> {
        let gate = Arc::new(tokio::sync::Semaphore::new(self.max_in_flight.max(1)));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(OrderResult, Expect)>();
        let collector = {
            let bar = bar.clone();
            tokio::spawn(async move {
                let mut tally = Tally::new(false);
                while let Some((r, e)) = rx.recv().await {
                    tally.add(r, e);
                    bar.inc(1);
                }
                tally
            })
        };
        let start = Instant::now();
        let total = (self.rate * self.duration.as_secs_f64()).round() as usize;
        let mut last_tick = Duration::ZERO;
        tick(Duration::ZERO);
        for i in 0..total {
            // Due time of order i: keeps the rate exact on average even when
            // the timer fires late.
            let due = start + Duration::from_secs_f64(i as f64 / self.rate);
            tokio::time::sleep_until(due.into()).await;
            let permit = gate.clone().acquire_owned().await?;
            let (req, expect) = self.mix.order(self.seed, &self.tag, i);
            let (driver, tx) = (self.driver.clone(), tx.clone());
            tokio::spawn(async move {
                let r = driver.one(i, i, req).await;
                drop(permit);
                let _ = tx.send((r, expect));
            });
            let now = start.elapsed();
            if now >= last_tick + Duration::from_secs(1) {
                last_tick = now;
                tick(now);
            }
        }
        drop(tx);
        // Keep sampling while the last orders finish.
        let mut collector = collector;
        loop {
            tokio::select! {
                t = &mut collector => return Ok((t?, start.elapsed())),
                _ = tokio::time::sleep(Duration::from_secs(1)) => tick(start.elapsed()),
            }
        }
    }
}

/// p-quantile of a µs histogram, in milliseconds.
pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Max of a µs histogram, in milliseconds.
pub(crate) fn max_ms(h: &Histogram<u64>) -> f64 {
    h.max() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_deterministic_and_keeps_its_shares() {
        let mix = Mix {
            declined_share: 0.2,
            out_of_stock_share: 0.1,
            customer_limit_cents: 10_000,
        };
        let (a, _) = mix.order(7, "t", 3);
        let (b, _) = mix.order(7, "t", 3);
        assert_eq!(a, b);
        let mut counts = BTreeMap::new();
        for i in 0..10_000 {
            let (req, e) = mix.order(7, "t", i);
            match e {
                Expect::Declined => assert!(req.amount_cents > 10_000),
                Expect::OutOfStock => assert!(req.items.iter().any(|i| i.sku == RARE)),
                Expect::Completed => {
                    assert!(req.amount_cents <= 10_000 && req.items.iter().all(|i| i.sku != RARE))
                }
            }
            *counts.entry(format!("{e:?}")).or_insert(0usize) += 1;
        }
        let share = |k: &str| counts.get(k).copied().unwrap_or(0) as f64 / 10_000.0;
        assert!((share("Declined") - 0.2).abs() < 0.02, "{counts:?}");
        assert!((share("OutOfStock") - 0.1).abs() < 0.02, "{counts:?}");
    }
}
