//! The processes under test: nats-server, inventory, payment and coordinator
//! as separate OS processes on loopback (logs to files in the data dir),
//! their CPU seconds and memory read from `/proc`, and the coordinator's
//! `/metrics` scraped over plain HTTP/1.1.
//!
//! Nothing here measures latency: that is `drive`'s job.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use saga_proto::pb;
use saga_testkit::{NatsAccess, NatsCluster, NatsServer, Proc, Role};

use crate::cli::{Setup, Store};

/// nats-server with JetStream (the coordinator publishes its saga events to
/// a stream, and the jetstream store keeps its sagas there) stored in the
/// data dir: a single server, or a cluster, from the test kit.
pub(crate) struct Nats {
    nodes: Vec<NatsServer>,
    /// The client URL of every node, comma-separated (as `--nats-url` takes them).
    pub(crate) url: String,
    /// The URL and users (the kit's servers enforce the NATS permissions).
    pub(crate) access: NatsAccess,
}

impl Nats {
    /// Starts a single server in `dir`.
    ///
    /// # Errors
    /// No binary (the message says how to install one), or it did not come up in 10 s.
    pub(crate) fn start(dir: &Path) -> Result<Self> {
        let server = NatsServer::start_in(dir, "nats-server", &[])?;
        let url = server.url();
        let access = server.access();
        Ok(Nats {
            nodes: vec![server],
            url,
            access,
        })
    }

    /// Starts a cluster of `n` JetStream nodes (`nats-0`…) in `dir`;
    /// [`Nats::jetstream_ready`] waits until it has a meta leader.
    ///
    /// # Errors
    /// No binary, or a node did not come up.
    pub(crate) fn cluster(dir: &Path, n: usize) -> Result<Self> {
        let cluster = NatsCluster::start(dir, n, "saga-bench")?;
        let url = cluster.url();
        let access = cluster.access();
        Ok(Nats {
            nodes: cluster.nodes,
            url,
            access,
        })
    }

    /// Connects to it and waits until JetStream answers (on a cluster: a
    /// meta leader is elected); the client.
    ///
    /// # Errors
    /// Not within 60 s, or a node exited.
    pub(crate) async fn jetstream_ready(&mut self) -> Result<async_nats::Client> {
        let nodes = &mut self.nodes;
        saga_testkit::jetstream_ready(&self.access, || {
            nodes.iter_mut().try_for_each(NatsServer::check_alive)
        })
        .await
    }

    /// `(name, pid)` of its running nodes.
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        self.nodes
            .iter()
            .filter_map(|s| s.pid().map(|p| (s.name().to_string(), p)))
            .collect()
    }
}

/// The first of comma-separated NATS URLs.
pub(crate) fn first_url(urls: &str) -> &str {
    urls.split(',').next().unwrap_or(urls)
}

/// A client of the bench's own NATS (as the kit's harness), or of the
/// target's at comma-separated `urls`.
///
/// # Errors
/// No server answered.
pub(crate) async fn client(nats: Option<&Nats>, urls: &str) -> Result<async_nats::Client> {
    match nats {
        Some(n) => n.access.connect().await,
        None => connect_nats(urls).await,
    }
}

/// An async-nats client of comma-separated `urls`.
///
/// # Errors
/// No server answered.
pub(crate) async fn connect_nats(urls: &str) -> Result<async_nats::Client> {
    async_nats::connect(urls.split(',').map(str::trim).collect::<Vec<_>>())
        .await
        .with_context(|| format!("connecting to NATS at {urls}"))
}

/// Stock of every SKU orders normally use: large enough that only the
/// intended orders run out.
pub(crate) const PLENTY: u64 = 1_000_000_000;
/// SKUs with plenty of stock.
pub(crate) const SKUS: &[&str] = &["A-1", "B-2", "C-3"];
/// The SKU with (almost) no stock: an order for [`RARE_QUANTITY`] of it is refused.
pub(crate) const RARE: &str = "RARE-1";
/// Quantity of [`RARE`] an out-of-stock order asks for.
pub(crate) const RARE_QUANTITY: u32 = 1000;

/// Writes `<dir>/order.yaml`: the shipped order saga (reserve-inventory,
/// charge-payment) without its input schema, with `charge_timeout` for the
/// charge step.
///
/// # Errors
/// I/O.
pub(crate) fn write_definitions(dir: &Path, charge_timeout: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("order.yaml"),
        format!(
            "name: order\nversion: 1\ndefaults:\n  timeout: 2s\n  retry: {{ max_attempts: 5, \
             initial_backoff: 50ms, max_backoff: 2s, multiplier: 2.0, jitter: true }}\nsteps:\n  \
             - name: reserve-inventory\n    participant: inventory\n    action: reserve\n    \
             compensation: release\n  - name: charge-payment\n    participant: payment\n    \
             action: charge\n    compensation: refund\n    timeout: {charge_timeout}\n"
        ),
    )?;
    Ok(dir.to_path_buf())
}

/// What a cluster is started with.
pub(crate) struct ClusterSpec<'a> {
    pub(crate) bin_dir: &'a Path,
    /// Comma-separated NATS URLs.
    pub(crate) nats_url: &'a str,
    /// The users of the bench's own NATS, when it started one.
    pub(crate) access: Option<&'a NatsAccess>,
    /// Its data dirs, logs and definitions go under here.
    pub(crate) dir: PathBuf,
    /// The store and the number of coordinators.
    pub(crate) setup: Setup,
    pub(crate) gateway_latency: Duration,
    pub(crate) customer_limit_cents: i64,
    pub(crate) charge_timeout: &'a str,
    pub(crate) log_level: &'a str,
    /// Extra arguments for the coordinators.
    pub(crate) coordinator_args: &'a [String],
    /// The participants' store and how many replicas of each.
    pub(crate) participant_store: Store,
    pub(crate) participant_replicas: usize,
    /// More environment for every process (the OTLP exporters' settings).
    pub(crate) env: &'a [(String, String)],
}

impl ClusterSpec<'_> {
    /// The NATS credentials a process of `role` gets in its environment.
    fn nats_env(&self, role: &Role) -> Vec<(String, String)> {
        self.access.map(|a| a.env(role)).unwrap_or_default()
    }

    /// The arguments of coordinator `i` serving `grpc` and `http`.
    fn coordinator_args(&self, i: usize, defs: &Path) -> Vec<String> {
        let setup = &self.setup;
        let data = if setup.coordinators == 1 {
            "coordinator".to_string()
        } else {
            format!("coordinator-{i}")
        };
        let mut args = strings(&[
            "--nats-url",
            self.nats_url,
            // Port 0: each coordinator reports the ports it bound (its ports file).
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            &self.dir.join(data).display().to_string(),
            "--definitions-dir",
            &defs.display().to_string(),
        ]);
        if setup.replicas() > 1 || setup.store == Store::Jetstream {
            args.extend(strings(&["--events-replicas", &setup.replicas().to_string()]));
        }
        if setup.store == Store::Jetstream {
            args.extend(strings(&[
                "--store",
                "jetstream",
                "--kv-replicas",
                &setup.replicas().to_string(),
                "--partitions",
                &setup.partitions.to_string(),
                "--lease-ttl",
                &humantime::format_duration(setup.lease_ttl).to_string(),
                "--instance-id",
                &instance_id(setup, i),
            ]));
        }
        args.extend(self.coordinator_args.iter().cloned());
        args
    }
}

/// The `--instance-id` of coordinator `i` of `setup`.
fn instance_id(setup: &Setup, i: usize) -> String {
    format!("{}-{i}", setup.slug())
}

/// Inventory, payment and the coordinators started by the harness.
pub(crate) struct Cluster {
    /// At least one; `coordinator` alone, else `coordinator-0`….
    pub(crate) coordinators: Vec<Proc>,
    pub(crate) inventory: Proc,
    pub(crate) payment: Proc,
    /// The other replicas of both (`--participant-replicas`).
    replicas: Vec<Proc>,
    /// gRPC address of each coordinator, in the same order.
    pub(crate) grpc: Vec<SocketAddr>,
    /// HTTP address (`/metrics`, `/ready`) of each coordinator.
    pub(crate) http: Vec<SocketAddr>,
    /// HTTP address (`/metrics`) of every participant process, once started.
    pub(crate) participant_http: Vec<SocketAddr>,
    setup: Setup,
}

impl Cluster {
    /// Starts the services on fresh data dirs (with jetstream: on emptied
    /// buckets) and waits until the participants answer on NATS, every
    /// coordinator serves gRPC and is ready, and (jetstream) the partitions
    /// are spread over the coordinators.
    ///
    /// # Errors
    /// A missing binary, or a service not up within 30 s (the partitions: 60 s).
    pub(crate) async fn start(spec: &ClusterSpec<'_>, nats: &async_nats::Client) -> Result<Self> {
        saga_testkit::process::require_bins(
            spec.bin_dir,
            "cargo build --release --workspace --bins (make bench does), or pass --bin-dir",
        )?;
        std::fs::create_dir_all(&spec.dir)?;
        let defs = write_definitions(&spec.dir.join("defs"), spec.charge_timeout)?;
        let (inventory, payment, replicas) = participants(spec);
        let n = spec.setup.coordinators.max(1);
        let (mut grpc, mut http, mut coordinators) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let name = if n == 1 {
                "coordinator".to_string()
            } else {
                format!("coordinator-{i}")
            };
            coordinators.push(
                Proc::new(
                    &name,
                    spec.bin_dir.join("coordinator"),
                    spec.coordinator_args(i, &defs),
                    spec.dir.join(format!("{name}.log")),
                )
                .envs(spec.nats_env(&Role::Coordinator))
                .envs(spec.env.to_vec())
                .env("RUST_LOG", spec.log_level)
                .ports_file(spec.dir.join(format!("{name}.ports"))),
            );
            // Known once it has started (`start_coordinator`).
            grpc.push(SocketAddr::from(([127, 0, 0, 1], 0)));
            http.push(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        let mut c = Cluster {
            coordinators,
            inventory,
            payment,
            replicas,
            grpc,
            http,
            participant_http: Vec::new(),
            setup: spec.setup,
        };
        if spec.setup.store == Store::Jetstream || spec.participant_store == Store::Jetstream {
            reset_jetstream(nats).await?;
        }
        c.inventory.start()?;
        c.payment.start()?;
        for r in &mut c.replicas {
            r.start()?;
        }
        c.wait_participants(nats).await?;
        let mut participant_http = Vec::new();
        for p in [&mut c.inventory, &mut c.payment]
            .into_iter()
            .chain(c.replicas.iter_mut())
        {
            participant_http.push(p.ports(Duration::from_secs(30))?.get("http")?);
        }
        c.participant_http = participant_http;
        for i in 0..n {
            c.start_coordinator(i)?;
        }
        for i in 0..n {
            c.wait_coordinator(i, Duration::from_secs(30)).await?;
        }
        if spec.setup.store == Store::Jetstream {
            c.wait_partitions(nats, Duration::from_secs(60)).await?;
        }
        Ok(c)
    }

    /// Starts coordinator `i` and learns the addresses it bound (port 0: new
    /// ones at every start).
    ///
    /// # Errors
    /// It did not start, or wrote no ports file within 30 s.
    pub(crate) fn start_coordinator(&mut self, i: usize) -> Result<()> {
        let c = &mut self.coordinators[i];
        c.start()?;
        let ports = c.ports(Duration::from_secs(30))?;
        self.grpc[i] = ports.get("grpc")?;
        self.http[i] = ports.get("http")?;
        Ok(())
    }

    /// Waits until both participants answer their stats subject.
    ///
    /// # Errors
    /// Not within 10 s, or one exited.
    pub(crate) async fn wait_participants(&mut self, nats: &async_nats::Client) -> Result<()> {
        for (p, name) in [(&mut self.inventory, "inventory"), (&mut self.payment, "payment")] {
            if let Err(e) = saga_testkit::wait_participant(nats, name).await {
                p.check_alive()?;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits until coordinator `i` answers gRPC and its `/ready` is 200; how long that took.
    ///
    /// # Errors
    /// Not within `timeout`, or it exited.
    pub(crate) async fn wait_coordinator(&mut self, i: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let (grpc, http) = (self.grpc[i], self.http[i]);
        loop {
            let answers = async {
                let mut g = saga_testkit::connect(grpc).await?;
                tokio::time::timeout(
                    Duration::from_secs(2),
                    g.list_definitions(pb::ListDefinitionsRequest {}),
                )
                .await??;
                anyhow::Ok(())
            };
            if answers.await.is_ok()
                && http_get(http, "/ready")
                    .await
                    .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(start.elapsed());
            }
            let coordinator = &mut self.coordinators[i];
            coordinator.check_alive()?;
            if start.elapsed() > timeout {
                bail!(
                    "{} not ready after {timeout:?}; log tail:\n{}",
                    coordinator.name,
                    coordinator.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// jetstream: waits until every partition is leased to one of this
    /// cluster's coordinators, each holding its fair share at most (the
    /// first one up takes them all and hands back one per lease round).
    ///
    /// # Errors
    /// Not within `timeout` (the message shows the last spread), or a coordinator exited.
    async fn wait_partitions(&mut self, nats: &async_nats::Client, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let n = self.coordinators.len();
        let instances: Vec<String> = (0..n).map(|i| instance_id(&self.setup, i)).collect();
        let partitions = self.setup.partitions;
        let fair = (partitions as usize).div_ceil(n);
        loop {
            let last = match lease_spread(nats, partitions, &instances).await {
                Ok((0, held)) if held.iter().all(|h| (1..=fair).contains(h)) => {
                    super::scenarios::phase(&format!(
                        "{partitions} partitions spread over {n} coordinator(s) {held:?} in {:.1?}",
                        start.elapsed()
                    ));
                    return Ok(());
                }
                Ok((free, held)) => format!("{free} not held, held per coordinator {held:?}"),
                Err(e) => format!("{e:#}"),
            };
            self.check_alive()?;
            if start.elapsed() > timeout {
                bail!("partitions not spread over the coordinators after {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails when a service exited by itself.
    ///
    /// # Errors
    /// Which one, with its log tail.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for c in &mut self.coordinators {
            c.check_alive()?;
        }
        for r in &mut self.replicas {
            r.check_alive()?;
        }
        self.inventory.check_alive()?;
        self.payment.check_alive()
    }

    /// Kills every payment replica and starts each again with `gateway_latency`.
    ///
    /// # Errors
    /// One did not start.
    pub(crate) fn restart_payments(&mut self, gateway_latency: Duration) -> Result<()> {
        let latency = humantime::format_duration(gateway_latency).to_string();
        let replicas = self.replicas.iter_mut().filter(|p| p.name.starts_with("payment"));
        for p in std::iter::once(&mut self.payment).chain(replicas) {
            p.kill();
            p.set_arg("--gateway-latency", &latency);
            p.start()?;
        }
        Ok(())
    }

    /// `(name, /metrics address)` of each payment replica as it runs now (a
    /// restarted one bound a new port).
    ///
    /// # Errors
    /// One has not reported its ports within 30 s.
    pub(crate) fn payment_metrics(&mut self) -> Result<Vec<(String, SocketAddr)>> {
        let replicas = self.replicas.iter_mut().filter(|p| p.name.starts_with("payment"));
        std::iter::once(&mut self.payment)
            .chain(replicas)
            .map(|p| Ok((p.name.clone(), p.ports(Duration::from_secs(30))?.get("http")?)))
            .collect()
    }

    /// `(name, pid)` of its processes.
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        self.coordinators
            .iter()
            .chain([&self.inventory, &self.payment])
            .chain(&self.replicas)
            .filter_map(|s| s.pid().map(|p| (s.name.clone(), p)))
            .collect()
    }

    /// Graceful stop of all.
    pub(crate) fn stop(&mut self) {
        for c in &mut self.coordinators {
            c.terminate(Duration::from_secs(10));
        }
        for r in &mut self.replicas {
            r.terminate(Duration::from_secs(10));
        }
        self.payment.terminate(Duration::from_secs(10));
        self.inventory.terminate(Duration::from_secs(10));
    }
}

/// The inventory and payment services of `spec` (not started): the first
/// replica of each, and the others (`--participant-replicas`).
fn participants(spec: &ClusterSpec<'_>) -> (Proc, Proc, Vec<Proc>) {
    let mut stock: Vec<String> = SKUS.iter().map(|s| format!("{s}={PLENTY}")).collect();
    stock.push(format!("{RARE}=1"));
    let stock = stock.join(",");
    let limit = spec.customer_limit_cents.to_string();
    let latency = humantime::format_duration(spec.gateway_latency).to_string();
    let replica = |name: &str, r: usize, extra: &[&str]| {
        let label = if r == 0 {
            name.to_string()
        } else {
            format!("{name}-{r}")
        };
        let mut args = strings(&[
            "--nats-url",
            spec.nats_url,
            "--data-dir",
            &spec.dir.join(&label).display().to_string(),
            "--http-addr",
            "127.0.0.1:0",
        ]);
        if spec.participant_store == Store::Jetstream {
            args.extend(strings(&[
                "--store",
                "jetstream",
                "--kv-replicas",
                &spec.setup.replicas().to_string(),
            ]));
        }
        args.extend(strings(extra));
        Proc::new(
            &label,
            spec.bin_dir.join(name),
            args,
            spec.dir.join(format!("{label}.log")),
        )
        .envs(spec.nats_env(&Role::Participant(name.into())))
        .envs(spec.env.to_vec())
        .env("RUST_LOG", spec.log_level)
        .ports_file(spec.dir.join(format!("{label}.ports")))
    };
    let inventory_args = ["--stock", stock.as_str()];
    let payment_args = [
        "--customer-limit-cents",
        limit.as_str(),
        "--gateway-latency",
        latency.as_str(),
    ];
    let mut others = Vec::new();
    for r in 1..spec.participant_replicas.max(1) {
        others.push(replica("inventory", r, &inventory_args));
        others.push(replica("payment", r, &payment_args));
    }
    (
        replica("inventory", 0, &inventory_args),
        replica("payment", 0, &payment_args),
        others,
    )
}

/// Deletes the jetstream store's KV buckets, so that a cluster starts as
/// empty as its fresh data dirs (the previous cluster on the same NATS is
/// stopped by then). The events stream stays, as it does for sled: several
/// coordinators creating an R3 stream at once can block one of them for
/// JetStream's 10 s request timeout.
///
/// # Errors
/// JetStream refused a deletion of something that exists.
async fn reset_jetstream(nats: &async_nats::Client) -> Result<()> {
    let js = async_nats::jetstream::new(nats.clone());
    for bucket in [
        coordinator::kv::RECORDS_BUCKET,
        coordinator::kv::ACTIVE_BUCKET,
        coordinator::kv::KEYS_BUCKET,
        coordinator::kv::LEASES_BUCKET,
    ]
    .map(String::from)
    .into_iter()
    .chain(["inventory", "payment"].into_iter().flat_map(|p| {
        [
            participants::store::jetstream::state_bucket(p),
            participants::store::jetstream::replies_bucket(p),
        ]
    })) {
        let bucket = bucket.as_str();
        if js.get_key_value(bucket).await.is_ok() {
            js.delete_key_value(bucket)
                .await
                .with_context(|| format!("deleting the KV bucket {bucket}"))?;
        }
    }
    Ok(())
}

/// The leases of `partitions`: `(partitions not held by a live lease of
/// one of instances, partitions held per instance)`.
///
/// # Errors
/// The bucket or a lease could not be read.
async fn lease_spread(
    nats: &async_nats::Client,
    partitions: u32,
    instances: &[String],
) -> Result<(usize, Vec<usize>)> {
    let leases = saga_testkit::cluster::leases(nats).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let (mut free, mut held) = (0, vec![0; instances.len()]);
    for p in 0..partitions {
        let live = leases
            .get(&p)
            .filter(|l| u128::from(l.expires_at_ms) > now)
            .and_then(|l| instances.iter().position(|i| *i == l.holder));
        match live {
            Some(i) => held[i] += 1,
            None => free += 1,
        }
    }
    Ok((free, held))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

/// CPU time and memory of one process.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    /// utime + stime, in seconds.
    pub(crate) cpu_s: f64,
    /// VmHWM: peak resident set since the process started, KiB.
    pub(crate) hwm_kib: u64,
    /// VmRSS: resident set now, KiB.
    pub(crate) rss_kib: u64,
}

/// The clock tick `/proc/<pid>/stat` counts in (`getconf CLK_TCK`, 100 if that fails).
pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
///
/// # Errors
/// The process is gone or the files do not parse.
pub(crate) fn sample(pid: u32, ticks: f64) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: fields count from after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/<pid>/stat without ')'")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let num = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/stat field {}", i + 3))
    };
    let cpu_s = (num(11)? + num(12)?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_s,
        hwm_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    })
}

pub(crate) use saga_testkit::http_get;

/// The sum of every sample of metric `name` (all label sets) in Prometheus text.
pub(crate) fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The coordinators' group-commit flush count, summed, when every `/metrics` answers.
pub(crate) async fn flushes(metrics: &[SocketAddr]) -> Option<f64> {
    counter(metrics, "saga_store_flushes_total").await
}

/// Gauge (or counter) `name` at one `/metrics`, summed over its label sets.
pub(crate) async fn gauge(addr: SocketAddr, name: &str) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics").await.ok()?;
    (status == 200).then(|| metric_sum(&body, name)).flatten()
}

/// Counter `name` summed over the `/metrics` of `addrs`, when every one answers.
pub(crate) async fn counter(addrs: &[SocketAddr], name: &str) -> Option<f64> {
    if addrs.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    for m in addrs {
        let (status, body) = http_get(*m, "/metrics").await.ok()?;
        if status != 200 {
            return None;
        }
        // The exporter shows a counter only after its first increment.
        sum += metric_sum(&body, name).unwrap_or(0.0);
    }
    Some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_label_sets_and_ignores_longer_names() {
        let text = "# TYPE saga_store_flushes_total counter\nsaga_store_flushes_total 12\n\
                    saga_store_flushes_total_x 5\nsaga_finished_total{state=\"completed\"} 3\n\
                    saga_finished_total{state=\"compensated\"} 2\n";
        assert_eq!(metric_sum(text, "saga_store_flushes_total"), Some(12.0));
        assert_eq!(metric_sum(text, "saga_finished_total"), Some(5.0));
        assert_eq!(metric_sum(text, "nope"), None);
    }

    #[test]
    fn own_process_is_sampled() -> Result<()> {
        let s = sample(std::process::id(), clock_ticks())?;
        assert!(s.hwm_kib > 0 && s.rss_kib > 0);
        Ok(())
    }
}
