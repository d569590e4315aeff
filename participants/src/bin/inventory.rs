//! `inventory` binary: parse config, set up tracing, wire signals, run.

use clap::Parser;
use participants::{init_tracing, inventory, shutdown_on_signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = inventory::InventoryConfig::parse();
    init_tracing(config.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    if let Err(e) = inventory::run(config, shutdown).await {
        tracing::error!(error = %e, "inventory failed");
        return Err(e);
    }
    Ok(())
}
