//! `payment` binary: parse config, set up tracing, wire SIGINT/SIGTERM to the
//! shutdown token, run; a failure exits non-zero with the error.

use std::process::ExitCode;

use clap::Parser;
use participants::{init_tracing, payment, shutdown_on_signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = payment::PaymentConfig::parse();
    init_tracing(config.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    match payment::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "payment failed");
            eprintln!("payment: {e:#}");
            ExitCode::FAILURE
        }
    }
}
