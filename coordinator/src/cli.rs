//! The `coordinator` process: parse config, set up tracing, bind, wire
//! signals, run. Both the `coordinator` binary and the multi-call `saga`
//! binary (`saga coordinator …`, deploy/saga) call [`main`]; it builds its own
//! tokio runtime, so a caller needs none. Nothing else lives here: the server
//! is [`crate::run_with_reload`].
//!
//! SIGINT / SIGTERM stop it gracefully; SIGHUP re-reads the definitions
//! directory (a bad file leaves the old set in force; the log says why).

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{init_tracing, run_with_reload, Config, Listeners, ReloadRequest};

/// Runs the coordinator with `args` (`args[0]` is the program name, as in
/// `std::env::args_os`) until SIGINT/SIGTERM or a fatal error.
///
/// Bad flags exit at once with clap's message and code 2; a failure to start
/// or a fatal error while running prints `Error: …` on stderr (as a `main`
/// returning `anyhow::Result` does) and returns `ExitCode::FAILURE`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let config = Config::parse_from(args);
    huge_pages_off();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

/// Transparent huge pages off for this process, before the runtime's threads
/// allocate. mimalloc hands freed memory back to the kernel and faults it in
/// again; with huge pages each such fault zeroes 2 MiB. At C=64 that was 6% of
/// the coordinator's CPU, and without it it ran a quarter to a third more
/// sagas/s (docs/benchmarks.md, *Transparent huge pages off*).
fn huge_pages_off() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("coordinator: transparent huge pages stay on: {e}");
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let telemetry = init_tracing(config.log_format, &config.trace)?;
    let result = serve_traced(config).await;
    // Off the runtime's workers: the exporter thread sends what is queued.
    tokio::task::block_in_place(|| telemetry.shutdown());
    result
}

async fn serve_traced(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let listeners = Listeners::bind(&config).await?;
    if let Some(path) = &config.ports_file {
        let (grpc, http) = listeners.local_addrs()?;
        let ports = serde_json::json!({ "grpc": grpc.to_string(), "http": http.to_string() });
        write_ports_file(path, &ports.to_string())?;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let (reload_tx, reloads) = mpsc::channel(4);
    tokio::spawn(reload_on_sighup(reload_tx));
    if let Err(e) = run_with_reload(config, listeners, shutdown, reloads).await {
        tracing::error!(error = %e, "coordinator failed");
        return Err(e.into());
    }
    Ok(())
}

/// Writes `text` to `path` whole (a temp file renamed over it), so a reader
/// polling for the file never sees half of it.
fn write_ports_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| anyhow::anyhow!("ports file {}: {e}", path.display()))
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn shutdown_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let ctrl_c = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("signal received; shutting down");
    token.cancel();
}

/// Asks for a definitions reload on every SIGHUP (the coordinator logs the result).
async fn reload_on_sighup(reloads: mpsc::Sender<ReloadRequest>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP handler not installed: definitions cannot be reloaded");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading saga definitions");
        let (answer, _result) = tokio::sync::oneshot::channel();
        if reloads.send(answer).await.is_err() {
            return;
        }
    }
}
