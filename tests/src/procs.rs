//! The system's binaries as separate OS processes, for the chaos suite:
//! spawned with their logs appended to files, killed with SIGKILL and
//! restarted with the same arguments (so the same data directory and port).

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Where cargo put the workspace binaries (`target/<profile>/`), found from
/// the running test executable (`target/<profile>/deps/<test>`).
///
/// # Errors
/// When a binary is missing: they must be built first (`cargo build --workspace --bins`, as `make test` does).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("cannot locate the target directory")?;
    for b in ["coordinator", "inventory", "payment"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} is missing: build the binaries first with `cargo build --workspace --bins` (make test does)",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}

/// One service process that can be killed and restarted.
pub struct Proc {
    /// Short name for tables and logs.
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// How many times it was killed.
    pub kills: u32,
}

impl Proc {
    /// Describes (does not start) a process.
    pub fn new(name: &str, program: PathBuf, args: Vec<String>, log: PathBuf) -> Self {
        Proc {
            name: name.into(),
            program,
            args,
            log,
            child: None,
            kills: 0,
        }
    }

    /// Starts it (its output appended to its log file).
    ///
    /// The participants' HTTP ports default to a free one (port 0, through
    /// their `*_HTTP_ADDR` variables), so several clusters, or a local
    /// deployment, on one machine never collide on 9465/9466; an explicit
    /// `--http-addr` in the arguments wins.
    ///
    /// # Errors
    /// Spawn failure.
    pub fn start(&mut self) -> Result<()> {
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
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.kills += 1;
        }
    }

    /// Whether it is running (restarts it if it died on its own, reporting that).
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

    /// Graceful stop: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
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
