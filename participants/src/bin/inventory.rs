//! `inventory` binary: parse config, set up tracing, wire SIGINT/SIGTERM to the
//! shutdown token, run; a failure exits non-zero with the error.

use std::process::ExitCode;

use clap::Parser;
use participants::{init_tracing, inventory, shutdown_on_signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = inventory::InventoryConfig::parse();
    init_tracing(config.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    match inventory::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "inventory failed");
            eprintln!("inventory: {e:#}");
            ExitCode::FAILURE
        }
    }
}
