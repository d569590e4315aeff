//! `payment` binary: parse config, set up tracing, bind `--http-addr`, wire
//! SIGINT/SIGTERM to the shutdown token, run; a failure exits non-zero with the error.

use std::process::ExitCode;

use clap::Parser;
use participants::{bind_http, init_tracing, payment, shutdown_on_signal};
use tokio_util::sync::CancellationToken;

/// mimalloc: the engine allocates and frees many small buffers across threads
/// (JSON, sled nodes, NATS messages); glibc's malloc showed up as ~20% of the
/// coordinator's CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = payment::PaymentConfig::parse();
    init_tracing(config.log_format);
    let http = match bind_http(config.http_addr, config.ports_file.as_deref()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "payment failed");
            eprintln!("payment: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    match payment::run(config, http, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "payment failed");
            eprintln!("payment: {e:#}");
            ExitCode::FAILURE
        }
    }
}
