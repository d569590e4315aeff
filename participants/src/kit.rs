//! The participant kit: a participant written as its actions alone.
//!
//! ```no_run
//! use participants::kit::{Participant, Tx, TxResult};
//! use saga_wire::{Command, Reply};
//!
//! fn book(tx: &mut Tx<'_>, cmd: &Command) -> TxResult<Reply> {
//!     let booked: u64 = tx.get("booked")?.unwrap_or(0);
//!     tx.put("booked", &(booked + 1))?;
//!     Ok(Reply::ok(serde_json::json!({ "seat": booked + 1, "order": cmd.payload.order_id })))
//! }
//! fn unbook(tx: &mut Tx<'_>, _cmd: &Command, _booked: &serde_json::Value) -> TxResult<Reply> {
//!     let booked: u64 = tx.get("booked")?.unwrap_or(0);
//!     tx.put("booked", &booked.saturating_sub(1))?;
//!     Ok(Reply::ok(serde_json::json!({ "undone": true })))
//! }
//! fn main() -> std::process::ExitCode {
//!     Participant::new("seats").action("book", "unbook", book, unbook).main()
//! }
//! ```
//!
//! What the kit does so an action does not have to (docs/participants.md):
//! the command-line and environment settings every participant has
//! ([`KitConfig`]: NATS URL and credentials, `--store sled|jetstream`, HTTP
//! port, reply retention); the protocol ([`crate::runtime`]: queue group,
//! validation of every message, `error` replies to malformed ones); the
//! guarantee ([`crate::store`]: an action's writes, its reply and the
//! idempotency record commit together, once per key, durable before the
//! reply; tombstones); the admin subjects (`stats` from counters kept in the
//! same transactions, paged `effects`: the `ok` data of every forward not
//! compensated); `/metrics`, `/health`, `/ready`; SIGTERM.
//!
//! An action is a pure function of the command and of what it reads through
//! [`Tx`]: the store may run it several times and keeps only the last run, so
//! it must not call out (a gateway call belongs in a [`crate::runtime::Handler`]
//! of its own, as payment's does).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use saga_wire::{saga_of_key, Command, CommandKind, Reply};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    runtime::{BoxFuture, Effects, Handler},
    store::{self, tx_get, tx_put, SharedStore, StateTx, StoreError, StoreKind},
    telemetry, ConfigError, LogFormat,
};

pub use crate::store::{TxError, TxResult};

/// Where an action's own keys live in the state (beside the kit's).
const STATE_PREFIX: &str = "state/";
/// `effect/<forward key>`: the `ok` data of a forward not compensated.
const EFFECT_PREFIX: &str = "effect/";
/// The kit's counters, in the jetstream store's root document.
const COUNTS_KEY: &str = "meta/kit-counts";

/// The business state as an action sees it: typed values under its own keys,
/// read and written inside the command's transaction.
pub struct Tx<'a> {
    inner: &'a mut dyn StateTx,
    /// Whether the action wrote anything (an `error` answered after a write
    /// must not commit it).
    wrote: bool,
}

impl Tx<'_> {
    /// The value under `key`, if any.
    ///
    /// # Errors
    /// Pass them on with `?` (the store retries or fails the command); a
    /// stored value that does not decode as `T` aborts the command.
    pub fn get<T: DeserializeOwned>(&mut self, key: &str) -> TxResult<Option<T>> {
        tx_get(self.inner, &format!("{STATE_PREFIX}{key}"))
    }

    /// Writes `value` under `key`.
    ///
    /// # Errors
    /// Pass them on with `?`.
    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) -> TxResult<()> {
        self.wrote = true;
        tx_put(self.inner, &format!("{STATE_PREFIX}{key}"), value)
    }

    /// Removes `key`.
    ///
    /// # Errors
    /// Pass them on with `?`.
    pub fn remove(&mut self, key: &str) -> TxResult<()> {
        self.wrote = true;
        self.inner.remove(&format!("{STATE_PREFIX}{key}"))
    }
}

/// Runs an action; an `error` it answers after writing aborts the
/// transaction (a store commits the writes of an effect whose reply it does
/// not store, and the retry would apply them again), the reply kept in
/// `refused` for the caller to answer.
fn run_action(
    state: &mut dyn StateTx,
    refused: &std::sync::Mutex<Option<Reply>>,
    action: impl FnOnce(&mut Tx<'_>) -> TxResult<Reply>,
) -> TxResult<Reply> {
    let mut tx = Tx {
        inner: state,
        wrote: false,
    };
    let reply = action(&mut tx)?;
    if tx.wrote && matches!(reply, Reply::Error { .. }) {
        if let Ok(mut slot) = refused.lock() {
            *slot = Some(reply);
        }
        return Err(TxError::Abort("the action answered `error` after writing".into()));
    }
    Ok(reply)
}

/// A forward action: the command, the state; the reply (only `ok` and
/// `rejected` are stored; an `error` commits nothing and is retried).
pub trait Forward: Fn(&mut Tx<'_>, &Command) -> TxResult<Reply> + Send + Sync + 'static {}
impl<F: Fn(&mut Tx<'_>, &Command) -> TxResult<Reply> + Send + Sync + 'static> Forward for F {}

/// A compensation: also gets the `ok` data its forward answered (it runs only
/// when that forward took effect).
pub trait Compensate:
    Fn(&mut Tx<'_>, &Command, &serde_json::Value) -> TxResult<Reply> + Send + Sync + 'static
{
}
impl<F: Fn(&mut Tx<'_>, &Command, &serde_json::Value) -> TxResult<Reply> + Send + Sync + 'static> Compensate
    for F
{
}

struct Action {
    forward: &'static str,
    compensation: &'static str,
    apply: Box<dyn Forward>,
    undo: Box<dyn Compensate>,
}

/// A participant made of its actions (see the module docs).
pub struct Participant {
    name: String,
    actions: Vec<Action>,
    names: Vec<&'static str>,
}

impl Participant {
    /// A participant named `name` (its subject token, queue group and NATS
    /// user `participant-<name>`), with no action yet.
    pub fn new(name: &str) -> Self {
        Participant {
            name: name.to_string(),
            actions: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Adds a forward action and its compensation.
    #[must_use]
    pub fn action(
        mut self,
        forward: &'static str,
        compensation: &'static str,
        apply: impl Forward,
        undo: impl Compensate,
    ) -> Self {
        self.names.extend([forward, compensation]);
        self.actions.push(Action {
            forward,
            compensation,
            apply: Box::new(apply),
            undo: Box::new(undo),
        });
        self
    }

    /// The whole process: settings from the command line and the environment
    /// ([`KitConfig`]), tracing, the HTTP port, SIGINT/SIGTERM, then
    /// [`Participant::run`]; a failure is logged and exits non-zero.
    pub fn main(self) -> ExitCode {
        use clap::{CommandFactory, FromArgMatches};
        let name = self.name.clone();
        // clap wants a 'static name; one leak for the life of the process.
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        let matches = KitConfig::command()
            .name(static_name)
            .about(format!("The {name} saga participant"))
            .get_matches();
        let config = match KitConfig::from_arg_matches(&matches) {
            Ok(c) => c,
            Err(e) => e.exit(),
        };
        let (log, addr, ports) = (config.log_format, config.http_addr, config.ports_file.clone());
        let trace = config.trace.clone();
        crate::cli::process(&name, log, &trace, addr, ports, |http, shutdown| {
            self.run(config, http, shutdown)
        })
    }

    /// Serves the participant until `shutdown`, its HTTP surface on `http`.
    ///
    /// # Errors
    /// Invalid settings or actions, the store cannot be opened, shutdown
    /// before NATS was reachable, a subscription failure.
    pub async fn run(
        self,
        config: KitConfig,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.validate()?;
        config.validate()?;
        let nats = crate::NatsTarget {
            url: config.nats_url.clone(),
            security: config.nats_security.clone(),
        };
        let target = crate::StoreTarget {
            kind: config.store,
            data_dir: config
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("./data").join(&self.name)),
            kv_replicas: config.kv_replicas,
            root_prefixes: vec!["meta/".to_string()],
            // Its compensation removes the effect row: a reply row would
            // save nothing there.
            reply_rows: None,
        };
        target.validate()?;
        let name = self.name.clone();
        crate::serve_participant(
            &name,
            &target,
            &nats,
            http,
            config.retention,
            shutdown,
            |store| async move {
                Ok(Arc::new(KitHandler {
                    participant: self,
                    store,
                    commands: AtomicU64::new(0),
                    dedupe_hits: AtomicU64::new(0),
                }) as Arc<dyn Handler>)
            },
        )
        .await
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| {
            Err(ConfigError::Invalid {
                setting: "participant",
                reason,
            })
        };
        if saga_wire::check_name("participant", &self.name).is_err() {
            return invalid(format!("`{}` is not a valid participant name", self.name));
        }
        if self.actions.is_empty() {
            return invalid("no action".into());
        }
        for (i, a) in self.names.iter().enumerate() {
            if saga_wire::check_name("action", a).is_err() {
                return invalid(format!("`{a}` is not a valid action name"));
            }
            if self.names[..i].contains(a) {
                return invalid(format!("action `{a}` given twice"));
            }
        }
        Ok(())
    }
}

/// The settings every kit participant takes (flags and environment).
#[derive(Debug, Clone, clap::Parser)]
#[command(version)]
pub struct KitConfig {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_security: saga_nats::NatsSecurity,
    /// Where idempotency records and state live: `sled` (embedded, this
    /// process only) or `jetstream` (KV buckets `PART_<name>_*`, shared by replicas).
    #[arg(long, env = "PARTICIPANT_STORE", value_enum, default_value = "sled")]
    pub store: StoreKind,
    /// Directory of the sled database (default `./data/<name>`).
    #[arg(long, env = "PARTICIPANT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Replicas of the KV buckets when this participant creates them (jetstream store).
    #[arg(long, env = "PARTICIPANT_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// Address of the HTTP server: `GET /metrics`, `/health`, `/ready` (port 0: any free one).
    #[arg(long, env = "PARTICIPANT_HTTP_ADDR", default_value = "127.0.0.1:0")]
    pub http_addr: SocketAddr,
    /// Once the HTTP server listens, write `{"http":"<addr>"}` to this file.
    #[arg(long, env = "PARTICIPANT_PORTS_FILE")]
    pub ports_file: Option<PathBuf>,
    /// Retention of the replies stored under idempotency keys.
    #[command(flatten)]
    pub retention: crate::ReplyRetention,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// OTLP trace export (off unless an endpoint is set).
    #[command(flatten)]
    pub trace: saga_trace::TraceArgs,
}

impl KitConfig {
    /// Settings for a participant in a test: `nats_url`, sled in `data_dir`,
    /// HTTP on a free loopback port.
    pub fn for_tests(nats_url: &str, data_dir: &std::path::Path) -> Self {
        KitConfig {
            nats_url: nats_url.into(),
            nats_security: saga_nats::NatsSecurity::default(),
            store: StoreKind::Sled,
            data_dir: Some(data_dir.into()),
            kv_replicas: 1,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ports_file: None,
            retention: crate::ReplyRetention::default(),
            log_format: LogFormat::Pretty,
            trace: saga_trace::TraceArgs::default(),
        }
    }

    /// Checks the settings before anything starts.
    ///
    /// # Errors
    /// An empty URL, inconsistent NATS security settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nats_url.trim().is_empty() {
            return Err(ConfigError::Invalid {
                setting: "nats-url",
                reason: "empty".into(),
            });
        }
        self.nats_security
            .validate()
            .map_err(|reason| ConfigError::Invalid {
                setting: "nats-security",
                reason,
            })
    }
}

/// The kit's figures, kept in each command's transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Counts {
    /// Forwards that took effect and are not compensated.
    effects: u64,
    /// Forwards answered `ok`.
    applied: u64,
    /// Forwards answered `rejected`.
    rejected: u64,
    /// Compensations that undid a forward.
    compensated: u64,
}

/// A forward's effect as `effects` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recorded {
    action: String,
    data: serde_json::Value,
}

struct KitHandler {
    participant: Participant,
    store: SharedStore,
    commands: AtomicU64,
    dedupe_hits: AtomicU64,
}

impl KitHandler {
    async fn run(&self, cmd: Command) -> Result<Reply, StoreError> {
        let key = cmd.idempotency_key.clone();
        let forward = self.participant.actions.iter().find(|a| a.forward == cmd.action);
        let compensation = self
            .participant
            .actions
            .iter()
            .find(|a| a.compensation == cmd.action);
        let refused = std::sync::Mutex::new(None);
        let applied = match (cmd.kind, forward, compensation) {
            (CommandKind::Forward, Some(a), _) => {
                self.store
                    .apply_forward(&key, &|state| {
                        let reply = run_action(&mut *state, &refused, |tx| (a.apply)(tx, &cmd))?;
                        let mut counts: Counts = tx_get(state, COUNTS_KEY)?.unwrap_or_default();
                        match &reply {
                            Reply::Ok { data } => {
                                let effect = Recorded {
                                    action: a.forward.to_string(),
                                    data: data.clone(),
                                };
                                tx_put(state, &format!("{EFFECT_PREFIX}{key}"), &effect)?;
                                counts.effects += 1;
                                counts.applied += 1;
                            }
                            Reply::Rejected { .. } => counts.rejected += 1,
                            // Nothing is stored for an error: no count either.
                            Reply::Error { .. } => return Ok(reply),
                        }
                        tx_put(state, COUNTS_KEY, &counts)?;
                        Ok(reply)
                    })
                    .await
            }
            (CommandKind::Compensate, _, Some(a)) => {
                self.store
                    .apply_compensation(&key, &|state, forward_key, data| {
                        let reply = run_action(&mut *state, &refused, |tx| (a.undo)(tx, &cmd, data))?;
                        if matches!(reply, Reply::Ok { .. }) {
                            state.remove(&format!("{EFFECT_PREFIX}{forward_key}"))?;
                            let mut counts: Counts = tx_get(state, COUNTS_KEY)?.unwrap_or_default();
                            counts.effects = counts.effects.saturating_sub(1);
                            counts.compensated += 1;
                            tx_put(state, COUNTS_KEY, &counts)?;
                        }
                        Ok(reply)
                    })
                    .await
            }
            (kind, _, _) => return Ok(crate::runtime::wrong_direction(kind, &cmd.action)),
        };
        let (reply, hit) = match applied {
            Ok(done) => done,
            // Aborted by `run_action`: nothing committed, the action's own `error` answered.
            Err(e) => match refused.lock().ok().and_then(|mut r| r.take()) {
                Some(reply) => return Ok(reply),
                None => return Err(e),
            },
        };
        if hit {
            self.dedupe_hits.fetch_add(1, Ordering::Relaxed);
            telemetry::dedupe_hit(&self.participant.name);
        }
        Ok(reply)
    }
}

impl Handler for KitHandler {
    fn participant(&self) -> &str {
        &self.participant.name
    }

    fn actions(&self) -> &[&str] {
        &self.participant.names
    }

    fn handle(&self, cmd: Command) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            self.commands.fetch_add(1, Ordering::Relaxed);
            crate::runtime::store_reply(&self.participant.name, self.run(cmd).await)
        })
    }

    fn stats(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let counts: Counts = match store::get_as(self.store.as_ref(), COUNTS_KEY).await {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => return serde_json::json!({"error": e.to_string()}),
            };
            serde_json::json!({
                "effects": counts.effects,
                "applied": counts.applied,
                "rejected": counts.rejected,
                "compensated": counts.compensated,
                "commands": self.commands.load(Ordering::Relaxed),
                "dedupe_hits": self.dedupe_hits.load(Ordering::Relaxed),
            })
        })
    }

    /// `{saga_id: {"action", "data"}}` for every forward not compensated.
    fn effects<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Effects, StoreError>> {
        Box::pin(async move {
            let page = self.store.scan(EFFECT_PREFIX, cursor, limit).await?;
            page.into_iter()
                .map(|(key, bytes)| {
                    let effect: Recorded = store::decode(format!("{EFFECT_PREFIX}{key}").as_bytes(), &bytes)?;
                    let saga = saga_of_key(&key).to_string();
                    Ok((key, saga, serde_json::json!(effect)))
                })
                .collect()
        })
    }

    fn store(&self) -> &SharedStore {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use saga_wire::{self as wire, Item, OrderPayload};

    use super::*;

    fn counter() -> Participant {
        Participant::new("counter").action(
            "add",
            "subtract",
            |tx: &mut Tx<'_>, cmd: &Command| {
                if cmd.payload.customer_id == "no" {
                    return Ok(Reply::rejected("refused"));
                }
                let n: i64 = tx.get("n")?.unwrap_or(0) + cmd.payload.amount_cents;
                tx.put("n", &n)?;
                Ok(Reply::ok(
                    serde_json::json!({ "added": cmd.payload.amount_cents, "n": n }),
                ))
            },
            |tx: &mut Tx<'_>, _cmd: &Command, added: &serde_json::Value| {
                let Some(added) = added["added"].as_i64() else {
                    return Err(TxError::Abort("no `added` in the forward's reply".into()));
                };
                let n: i64 = tx.get("n")?.unwrap_or(0) - added;
                tx.put("n", &n)?;
                Ok(Reply::ok(serde_json::json!({ "undone": true, "n": n })))
            },
        )
    }

    fn handler(dir: &std::path::Path) -> KitHandler {
        let store: SharedStore =
            Arc::new(store::Store::new(crate::open_db(dir).expect("sled")).expect("store"));
        KitHandler {
            participant: counter(),
            store,
            commands: AtomicU64::new(0),
            dedupe_hits: AtomicU64::new(0),
        }
    }

    fn cmd(saga: &str, kind: CommandKind, customer: &str, amount_cents: i64) -> Command {
        let action = if kind == CommandKind::Forward {
            "add"
        } else {
            "subtract"
        };
        Command {
            saga_id: saga.into(),
            definition: "d@1".into(),
            step: "count".into(),
            action: action.into(),
            kind,
            attempt: 1,
            idempotency_key: wire::idempotency_key(saga, "count", kind),
            payload: OrderPayload {
                order_id: "o".into(),
                customer_id: customer.into(),
                items: vec![Item {
                    sku: "A".into(),
                    quantity: 1,
                }],
                amount_cents,
                currency: "EUR".into(),
            },
            input: serde_json::Value::Null,
        }
    }

    #[tokio::test]
    async fn an_action_applies_once_its_compensation_undoes_it_and_the_figures_follow() {
        let dir = tempfile::tempdir().expect("tmp");
        let h = handler(dir.path());
        let first = h.handle(cmd("s1", CommandKind::Forward, "c", 5)).await;
        assert_eq!(first, Reply::ok(serde_json::json!({"added": 5, "n": 5})));
        assert_eq!(
            h.handle(cmd("s1", CommandKind::Forward, "c", 5)).await,
            first,
            "a repeat"
        );
        h.handle(cmd("s2", CommandKind::Forward, "c", 7)).await;
        assert_eq!(
            h.handle(cmd("s3", CommandKind::Forward, "no", 1)).await,
            Reply::rejected("refused")
        );
        let effects = crate::runtime::all_effects(&h).await;
        assert_eq!(effects["s1"]["data"]["added"], 5);
        assert_eq!(effects["s1"]["action"], "add");
        assert!(effects.get("s3").is_none(), "a rejected forward has no effect");

        let undone = h.handle(cmd("s1", CommandKind::Compensate, "c", 5)).await;
        assert_eq!(undone, Reply::ok(serde_json::json!({"undone": true, "n": 7})));
        assert_eq!(h.handle(cmd("s1", CommandKind::Compensate, "c", 5)).await, undone);
        let effects = crate::runtime::all_effects(&h).await;
        assert!(effects.get("s1").is_none(), "compensated");
        assert!(effects.get("s2").is_some());

        let stats = h.stats().await;
        assert_eq!(
            (
                &stats["effects"],
                &stats["applied"],
                &stats["rejected"],
                &stats["compensated"]
            ),
            (
                &serde_json::json!(1),
                &serde_json::json!(2),
                &serde_json::json!(1),
                &serde_json::json!(1)
            ),
            "{stats}"
        );
        assert_eq!(stats["dedupe_hits"], 2);
    }

    #[tokio::test]
    async fn a_compensation_first_leaves_a_tombstone_and_a_wrong_direction_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let h = handler(dir.path());
        let early = h.handle(cmd("s1", CommandKind::Compensate, "c", 5)).await;
        assert!(matches!(early, Reply::Ok { .. }), "{early:?}");
        assert_eq!(
            h.handle(cmd("s1", CommandKind::Forward, "c", 5)).await,
            Reply::rejected(store::TOMBSTONE_REASON)
        );
        let mut backwards = cmd("s2", CommandKind::Forward, "c", 5);
        backwards.action = "subtract".into();
        assert!(matches!(h.handle(backwards).await, Reply::Error { .. }));
        assert_eq!(h.stats().await["applied"], 0);
    }

    #[tokio::test]
    async fn an_error_answered_after_writing_commits_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut h = handler(dir.path());
        h.participant = Participant::new("counter").action(
            "add",
            "subtract",
            |tx: &mut Tx<'_>, cmd: &Command| {
                let n: i64 = tx.get("n")?.unwrap_or(0) + cmd.payload.amount_cents;
                tx.put("n", &n)?;
                if cmd.payload.customer_id == "flaky" {
                    return Ok(Reply::error("the ledger is busy"));
                }
                Ok(Reply::ok(serde_json::json!({ "n": n })))
            },
            |_: &mut Tx<'_>, _: &Command, _: &serde_json::Value| Ok(Reply::ok(serde_json::Value::Null)),
        );
        let flaky = h.handle(cmd("s1", CommandKind::Forward, "flaky", 5)).await;
        assert_eq!(
            flaky,
            Reply::error("the ledger is busy"),
            "the action's own error"
        );
        // The retry finds nothing applied: n counts the 5 once, not twice.
        let mut retry = cmd("s1", CommandKind::Forward, "c", 5);
        retry.attempt = 2;
        assert_eq!(h.handle(retry).await, Reply::ok(serde_json::json!({ "n": 5 })));
    }

    #[test]
    fn bad_names_and_no_action_are_refused() {
        assert!(Participant::new("x").validate().is_err(), "no action");
        assert!(counter().validate().is_ok());
        let twice = counter().action(
            "add",
            "undo",
            |_: &mut Tx<'_>, _: &Command| Ok(Reply::ok(serde_json::Value::Null)),
            |_: &mut Tx<'_>, _: &Command, _: &serde_json::Value| Ok(Reply::ok(serde_json::Value::Null)),
        );
        assert!(twice.validate().is_err(), "`add` twice");
        let mut bad = counter();
        bad.name = "no spaces".into();
        assert!(bad.validate().is_err());
    }
}
