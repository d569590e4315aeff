//! The one process wrapper: the system's binaries (and nats-server) as
//! separate OS processes, their output appended to a log file, killed with
//! SIGKILL or stopped with SIGTERM, restarted with the same arguments (so
//! the same data directory). A service started on port 0 reports the
//! addresses it bound in a ports file (`--ports-file`), read by
//! [`Proc::ports`]: nothing binds a port, drops it and hands the number on.

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Where cargo put the workspace binaries (`target/<profile>/`), found from
/// the running executable (`target/<profile>/deps/<test>`, or
/// `target/<profile>/saga-bench`).
///
/// # Errors
/// When a binary is missing: they must be built first (`cargo build --workspace --bins`, as `make test` does).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .map(Path::to_path_buf)
        .context("cannot locate the target directory")?;
    if dir.ends_with("deps") {
        dir.pop();
    }
    require_bins(&dir, "cargo build --workspace --bins (make test does)")?;
    Ok(dir)
}

/// Fails unless the coordinator and participant binaries are in `dir`; the
/// message says to run `how`.
///
/// # Errors
/// A binary is missing.
pub fn require_bins(dir: &Path, how: &str) -> Result<()> {
    for b in ["coordinator", "inventory", "payment"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} is missing: build the binaries first with {how}",
                dir.join(b).display()
            );
        }
    }
    Ok(())
}

/// The addresses a service wrote to its ports file, by name (`grpc`, `http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(BTreeMap<String, SocketAddr>);

impl Ports {
    /// The address named `name`.
    ///
    /// # Errors
    /// The service did not report one.
    pub fn get(&self, name: &str) -> Result<SocketAddr> {
        self.0
            .get(name)
            .copied()
            .with_context(|| format!("no {name} address in the ports file ({:?})", self.0))
    }

    fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let map: BTreeMap<String, String> = serde_json::from_str(&text).ok()?;
        let parsed = map
            .into_iter()
            .map(|(k, v)| v.parse().ok().map(|a| (k, a)))
            .collect::<Option<BTreeMap<_, _>>>()?;
        Some(Ports(parsed))
    }
}

/// One service process that can be killed and restarted.
pub struct Proc {
    /// Short name for tables and logs.
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    ports_file: Option<PathBuf>,
    child: Option<Child>,
    /// How many times [`Proc::kill`] stopped it while it ran.
    pub kills: u32,
}

impl Proc {
    /// Describes (does not start) a process.
    pub fn new(name: &str, program: PathBuf, args: Vec<String>, log: PathBuf) -> Self {
        Proc {
            name: name.into(),
            program,
            args,
            env: Vec::new(),
            log,
            ports_file: None,
            child: None,
            kills: 0,
        }
    }

    /// The workspace's coordinator binary on `nats` (its credentials in the
    /// environment), its data under `dir/coordinator`, its log and ports file
    /// beside it, gRPC and HTTP on port 0, then `extra` arguments.
    ///
    /// # Errors
    /// The binaries are not built ([`bin_dir`]).
    pub fn coordinator(
        dir: &Path,
        definitions: &Path,
        nats: &crate::NatsServer,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args: Vec<String> = [
            "--nats-url",
            &nats.url(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            &dir.join("coordinator").display().to_string(),
            "--definitions-dir",
            &definitions.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Ok(Proc::new(
            "coordinator",
            bin_dir()?.join("coordinator"),
            args,
            dir.join("coordinator.log"),
        )
        .envs(nats.access().env(&crate::Role::Coordinator))
        .ports_file(dir.join("coordinator.ports")))
    }

    /// Sets an environment variable for every start.
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// [`Proc::env`] for each pair (e.g. [`crate::NatsAccess::env`]).
    pub fn envs(mut self, pairs: Vec<(String, String)>) -> Self {
        self.env.extend(pairs);
        self
    }

    /// Passes `--ports-file <path>` and reads it back in [`Proc::ports`].
    #[must_use]
    pub fn ports_file(mut self, path: PathBuf) -> Self {
        self.set_arg("--ports-file", &path.display().to_string());
        self.ports_file = Some(path);
        self
    }

    /// Starts it (its output appended to its log file).
    ///
    /// The participants' HTTP ports default to port 0 (through their
    /// `*_HTTP_ADDR` variables), so several systems on one machine never
    /// collide on 9465–9467; an explicit `--http-addr` in the arguments wins.
    ///
    /// # Errors
    /// Spawn failure.
    pub fn start(&mut self) -> Result<()> {
        if let Some(p) = &self.ports_file {
            // The previous run's file would be read before this one listens.
            let _ = std::fs::remove_file(p);
        }
        let out = OpenOptions::new().create(true).append(true).open(&self.log)?;
        let err = out.try_clone()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("INVENTORY_HTTP_ADDR", "127.0.0.1:0")
            .env("PAYMENT_HTTP_ADDR", "127.0.0.1:0")
            .env("SHIPPING_HTTP_ADDR", "127.0.0.1:0")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the running process has written its ports file.
    ///
    /// # Errors
    /// No ports file configured, the process exited, or no file within `timeout`.
    pub fn ports(&mut self, timeout: Duration) -> Result<Ports> {
        let path = self
            .ports_file
            .clone()
            .with_context(|| format!("{} was started without a ports file", self.name))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = Ports::read(&path) {
                return Ok(p);
            }
            self.check_alive()?;
            if self.child.is_none() {
                bail!("{} is not running", self.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} wrote no ports file within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Replaces the value that follows `flag` in its arguments (for the next
    /// start), or appends `flag value`.
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        if let Some(i) = self.args.iter().position(|a| a == flag) {
            if let Some(v) = self.args.get_mut(i + 1) {
                *v = value.to_string();
                return;
            }
        }
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.kills += 1;
        }
    }

    /// Whether it is running; an error when it exited by itself.
    ///
    /// # Errors
    /// It exited by itself: its status and the tail of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                bail!(
                    "{} exited by itself ({status}); log tail:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
        }
        Ok(())
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after `grace`; how long it took to exit.
    pub fn terminate(&mut self, grace: Duration) -> Duration {
        let start = Instant::now();
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            while start.elapsed() < grace {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return start.elapsed();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        start.elapsed()
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        self.terminate(Duration::from_secs(10));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
