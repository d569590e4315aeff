//! An analytics consumer of the saga events: keeps a running revenue and
//! cancellation count from the `SAGA_EVENTS` JetStream stream.
//!
//! ```sh
//! cargo run -p participants --example revenue -- --nats-url nats://127.0.0.1:4222
//! ```
//!
//! It uses a durable pull consumer (`revenue` by default) filtered on the
//! terminal events, acknowledges each event after folding it in, and so
//! resumes where it stopped after a restart. A real service would keep its
//! totals (and the set of counted sagas) in its own database, in the same
//! transaction as its bookkeeping of the last sequence it processed.

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use clap::Parser;
use futures::StreamExt;
use participants::analytics::Revenue;
use saga_wire::SagaEvent;

#[derive(Parser)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Events stream.
    #[arg(long, default_value = "SAGA_EVENTS")]
    stream: String,
    /// Durable consumer name (progress is kept under it).
    #[arg(long, default_value = "revenue")]
    durable: String,
    /// Stop after this many terminal events (default: run until Ctrl-C).
    #[arg(long)]
    limit: Option<u64>,
    /// NATS credentials and TLS.
    #[command(flatten)]
    security: saga_nats::NatsSecurity,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.security.validate().map_err(anyhow::Error::msg)?;
    let client = args
        .security
        .apply(
            async_nats::ConnectOptions::new()
                .name("revenue-example")
                // The inbox the events role's NATS permissions allow.
                .custom_inbox_prefix(saga_nats::Role::Events.inbox_prefix()),
        )
        .await?
        .connect(&args.nats_url)
        .await
        .with_context(|| format!("cannot reach NATS at {}", args.nats_url))?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&args.stream).await.context("events stream")?;
    let consumer = stream
        .get_or_create_consumer(
            &args.durable,
            pull::Config {
                durable_name: Some(args.durable.clone()),
                filter_subjects: ["completed", "compensated", "failed"]
                    .iter()
                    .map(|e| saga_wire::event_subject("*", e))
                    .collect(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut totals = Revenue::default();
    let mut seen = 0;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
        match serde_json::from_slice::<SagaEvent>(&message.payload) {
            Ok(e) => {
                if totals.apply(&e) {
                    println!("{} {}: {}", e.saga_id, e.event, totals.summary());
                }
            }
            Err(e) => eprintln!("skipping an unreadable event on {}: {e}", message.subject),
        }
        message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        seen += 1;
        if args.limit.is_some_and(|l| seen >= l) {
            break;
        }
    }
    Ok(())
}
