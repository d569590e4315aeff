//! The loyalty participant of `saga-definitions/order-with-loyalty.yaml`,
//! written with the participant kit: its two actions are all there is. The
//! Python one in `python/` speaks the same protocol; either can serve the step.
//!
//! ```sh
//! cargo run -p participants --example loyalty -- --store sled --data-dir ./data/loyalty
//! ```
//!
//! `grant` gives the order's customer one point per whole 100 cents (at least
//! one) and refuses the customer `blocked`; `revoke` takes back what `grant`
//! gave, which the kit hands it as the forward's `ok` data.

use participants::kit::{Participant, Tx, TxResult};
use saga_wire::{Command, Reply};
use serde_json::{json, Value};

fn grant(tx: &mut Tx<'_>, cmd: &Command) -> TxResult<Reply> {
    if cmd.payload.customer_id == "blocked" {
        return Ok(Reply::rejected("customer_blocked"));
    }
    let points = (cmd.payload.amount_cents / 100).max(1);
    let key = format!("points/{}", cmd.payload.customer_id);
    let balance = tx.get::<i64>(&key)?.unwrap_or(0) + points;
    tx.put(&key, &balance)?;
    Ok(Reply::ok(json!({ "points": points, "balance": balance })))
}

fn revoke(tx: &mut Tx<'_>, cmd: &Command, granted: &Value) -> TxResult<Reply> {
    let points = granted["points"].as_i64().unwrap_or(0);
    let key = format!("points/{}", cmd.payload.customer_id);
    let balance = tx.get::<i64>(&key)?.unwrap_or(0) - points;
    tx.put(&key, &balance)?;
    Ok(Reply::ok(
        json!({ "undone": true, "points": points, "balance": balance }),
    ))
}

fn main() -> std::process::ExitCode {
    Participant::new("loyalty")
        .action("grant", "revoke", grant, revoke)
        .main()
}
