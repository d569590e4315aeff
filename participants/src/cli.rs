//! The participant processes: parse config, set up tracing, bind
//! `--http-addr`, wire SIGINT/SIGTERM to the shutdown token, run; a failure
//! exits non-zero with the error. The `inventory`, `payment` and `shipping`
//! binaries and the multi-call `saga` binary (deploy/saga) call these; each
//! builds its own tokio runtime. The services themselves are the modules'
//! `run` functions.

use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{bind_http, init_tracing, inventory, payment, shipping, shutdown_on_signal, LogFormat};

/// The inventory process with `args` (`args[0]` is the program name).
///
/// Bad flags exit at once with clap's message and code 2; any other failure
/// is logged, printed as `inventory: …` and returns `ExitCode::FAILURE`.
pub fn inventory(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let config = inventory::InventoryConfig::parse_from(args);
    let (log, addr, ports) = (config.log_format, config.http_addr, config.ports_file.clone());
    let trace = config.trace.clone();
    process("inventory", log, &trace, addr, ports, |http, shutdown| {
        inventory::run(config, http, shutdown)
    })
}

/// The payment process with `args` (`args[0]` is the program name); exits as
/// [`inventory`] does.
pub fn payment(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let config = payment::PaymentConfig::parse_from(args);
    let (log, addr, ports) = (config.log_format, config.http_addr, config.ports_file.clone());
    let trace = config.trace.clone();
    process("payment", log, &trace, addr, ports, |http, shutdown| {
        payment::run(config, http, shutdown)
    })
}

/// The shipping process with `args` (`args[0]` is the program name); exits as
/// [`inventory`] does.
pub fn shipping(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let config = shipping::ShippingConfig::parse_from(args);
    let (log, addr, ports) = (config.log_format, config.http_addr, config.ports_file.clone());
    let trace = config.trace.clone();
    process("shipping", log, &trace, addr, ports, |http, shutdown| {
        shipping::run(config, http, shutdown)
    })
}

/// Transparent huge pages off for this process, as the coordinator does (its
/// `cli.rs` says why): with it inventory and payment used 12–15% less CPU
/// per saga at C=64 (docs/benchmarks.md).
fn huge_pages_off(name: &str) {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("{name}: transparent huge pages stay on: {e}");
    }
}

/// The sequence every participant process shares (the kit's too), on a new
/// multi-threaded runtime.
pub(crate) fn process<F, Fut>(
    name: &str,
    log_format: LogFormat,
    trace: &saga_trace::TraceArgs,
    http_addr: SocketAddr,
    ports_file: Option<PathBuf>,
    run: F,
) -> ExitCode
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    huge_pages_off(name);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match init_tracing(log_format, trace, name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let http = bind_http(http_addr, ports_file.as_deref()).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(shutdown.clone()));
        run(http, shutdown).await
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
