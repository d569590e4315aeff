//! Who may publish and subscribe what on the saga bus.
//!
//! Every process connects as the NATS user of its [`Role`] (an nkey: the
//! server keeps only public keys, each process reads its own seed file), and
//! the server enforces the role's permissions, so a message no coordinator
//! sent cannot reach a participant and a reply no participant sent cannot
//! reach the coordinator — refused by the server, not by luck:
//!
//! | role | publish | subscribe |
//! |---|---|---|
//! | coordinator | anything (commands, events, KV, `$JS.API`) | its inbox `_INBOX_coordinator.>`, `saga.coordinator.>`, `saga.signal` in queue group `coordinator` |
//! | participant `p` | replies to requests it received (`allow_responses`), the JetStream API of its own KV buckets `PART_p_STATE`/`PART_p_REPLIES` | `saga.cmd.p.*` in queue group `p`, `saga.admin.p.>`, its inbox `_INBOX_p.>` |
//! | events | consumer and ack API of the events stream | everything but commands, admin, coordinator traffic, inboxes of others, `$JS`/`$KV` |
//! | admin | `saga.admin.>` | its inbox `_INBOX_admin.>` |
//! | signals | `saga.signal` (requests for `await` steps: a webhook gateway) | its inbox `_INBOX_signals.>` |
//!
//! [`Bundle::create_or_load`] writes one seed file per role (mode 0600) the
//! first time and reuses them afterwards, and renders the `authorization`
//! block nats-server reads (`nats-auth.conf`, JSON, which nats-server's
//! config format accepts). Pure data and files: no network.
#![deny(unreachable_pub)]
#![warn(missing_docs)]

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

/// File name of the rendered server configuration in a bundle's directory.
pub const SERVER_CONFIG: &str = "nats-auth.conf";

/// The participants the shipped definitions talk to.
pub const SHIPPED_PARTICIPANTS: [&str; 3] = ["inventory", "payment", "shipping"];

/// Participants of the examples that are not shipped services: the Python
/// `loyalty` participant (`participants/examples/python/`). The test kit's
/// servers have users for them too; deployments add them with
/// `sagactl nats-auth --participant NAME`.
pub const EXAMPLE_PARTICIPANTS: [&str; 1] = ["loyalty"];

/// A process's part on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// The coordinator (every replica shares the role).
    Coordinator,
    /// A participant service, by the name its subjects and queue group use.
    Participant(String),
    /// A reader of the saga events (analytics, the revenue example).
    Events,
    /// An operator's tool asking `saga.admin.>` (stats, effects).
    Admin,
    /// A sender of signals for `await` steps (`saga.signal`), e.g. the
    /// service receiving a payment provider's webhooks.
    Signals,
}

impl Role {
    /// The NATS user name (also the seed file's stem).
    pub fn user(&self) -> String {
        match self {
            Role::Coordinator => "coordinator".into(),
            Role::Participant(p) => format!("participant-{p}"),
            Role::Events => "events".into(),
            Role::Admin => "admin".into(),
            Role::Signals => "signals".into(),
        }
    }

    /// The inbox prefix the role's client must use: the permissions let
    /// only this role subscribe to it.
    pub fn inbox_prefix(&self) -> String {
        match self {
            Role::Participant(p) => format!("_INBOX_{p}"),
            other => format!("_INBOX_{}", other.user()),
        }
    }

    /// The role's NATS permissions (nats-server's `permissions` block).
    /// `events_stream` names the JetStream stream an events reader may consume.
    pub fn permissions(&self, events_stream: &str) -> Value {
        let inbox = format!("{}.>", self.inbox_prefix());
        match self {
            // The coordinator writes commands, events (including the domain
            // aliases definitions choose), KV records and stream settings;
            // nothing it publishes is taken on trust by another coordinator.
            Role::Coordinator => json!({
                "publish": { "allow": [">"] },
                "subscribe": { "allow": [inbox, "saga.coordinator.>", "saga.signal coordinator"] },
            }),
            Role::Participant(p) => {
                // Publish: a reply to each request it received, and the
                // JetStream API of its own two KV buckets (the jetstream
                // store), named exactly: nothing of another participant's.
                let mut publish = vec!["$JS.API.INFO".to_string()];
                for bucket in participant_buckets(p) {
                    let stream = format!("KV_{bucket}");
                    publish.extend([
                        format!("$JS.API.STREAM.INFO.{stream}"),
                        format!("$JS.API.STREAM.CREATE.{stream}"),
                        format!("$JS.API.STREAM.MSG.GET.{stream}"),
                        format!("$JS.API.DIRECT.GET.{stream}"),
                        format!("$JS.API.DIRECT.GET.{stream}.>"),
                        format!("$JS.API.CONSUMER.CREATE.{stream}"),
                        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                        format!("$JS.API.CONSUMER.INFO.{stream}.>"),
                        format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
                        format!("$JS.FC.{stream}.>"),
                        format!("$KV.{bucket}.>"),
                    ]);
                }
                json!({
                    "publish": { "allow": publish },
                    "allow_responses": { "max": 1 },
                    "subscribe": { "allow": [format!("saga.cmd.{p}.* {p}"), format!("saga.admin.{p}.>"), inbox] },
                })
            }
            Role::Events => {
                let s = events_stream;
                json!({
                    "publish": { "allow": [
                        "$JS.API.INFO",
                        format!("$JS.API.STREAM.INFO.{s}"),
                        format!("$JS.API.CONSUMER.CREATE.{s}"),
                        format!("$JS.API.CONSUMER.CREATE.{s}.>"),
                        format!("$JS.API.CONSUMER.DURABLE.CREATE.{s}.>"),
                        format!("$JS.API.CONSUMER.INFO.{s}.>"),
                        format!("$JS.API.CONSUMER.DELETE.{s}.>"),
                        format!("$JS.API.CONSUMER.MSG.NEXT.{s}.>"),
                        format!("$JS.ACK.{s}.>"),
                        format!("$JS.FC.{s}.>"),
                    ] },
                    "subscribe": {
                        "allow": [">"],
                        "deny": [
                            "saga.cmd.>", "saga.admin.>", "saga.coordinator.>", "saga.signal",
                            "_INBOX_coordinator.>", "_INBOX_admin.>", "_INBOX.>",
                            "$JS.>", "$KV.>",
                        ],
                    },
                })
            }
            Role::Admin => json!({
                "publish": { "allow": ["saga.admin.>"] },
                "subscribe": { "allow": [inbox] },
            }),
            Role::Signals => json!({
                "publish": { "allow": ["saga.signal"] },
                "subscribe": { "allow": [inbox] },
            }),
        }
    }
}

/// The JetStream KV buckets of participant `p` (its jetstream store): the
/// only JetStream its role may use.
pub fn participant_buckets(p: &str) -> [String; 2] {
    [format!("PART_{p}_STATE"), format!("PART_{p}_REPLIES")]
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.user())
    }
}

/// Why a bundle could not be made or read.
#[derive(Debug)]
pub enum AuthError {
    /// A file could not be read or written.
    Io(PathBuf, io::Error),
    /// A seed file holds no valid user seed.
    BadSeed(PathBuf),
    /// A participant name that cannot be a NATS subject token or queue group.
    BadName(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            AuthError::BadSeed(p) => write!(f, "{}: not an nkey user seed", p.display()),
            AuthError::BadName(n) => write!(f, "participant name {n:?}: use a-z, 0-9, '-' and '_' only"),
        }
    }
}

impl std::error::Error for AuthError {}

/// The roles of one deployment, their seed files and the server config.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    /// Each role with its public key.
    users: Vec<(Role, String)>,
    events_stream: String,
}

impl Bundle {
    /// The roles of a deployment with these participants.
    pub fn roles(participants: &[&str]) -> Vec<Role> {
        let mut roles = vec![Role::Coordinator, Role::Events, Role::Admin, Role::Signals];
        roles.extend(participants.iter().map(|p| Role::Participant((*p).to_string())));
        roles
    }

    /// Reads the seed of each role from `dir`, creating the ones missing
    /// (the first start), and writes the server config for them.
    ///
    /// # Errors
    /// An unreadable or invalid seed file, a bad participant name, a file
    /// that cannot be written.
    pub fn create_or_load(dir: &Path, participants: &[&str], events_stream: &str) -> Result<Self, AuthError> {
        for p in participants {
            let ok = !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !ok {
                return Err(AuthError::BadName((*p).to_string()));
            }
        }
        fs::create_dir_all(dir).map_err(|e| AuthError::Io(dir.to_path_buf(), e))?;
        restrict(dir, 0o700)?;
        let mut users = Vec::new();
        for role in Self::roles(participants) {
            let path = seed_path(dir, &role);
            let key = match fs::read_to_string(&path) {
                Ok(seed) => {
                    nkeys::KeyPair::from_seed(seed.trim()).map_err(|_| AuthError::BadSeed(path.clone()))?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let key = nkeys::KeyPair::new_user();
                    let seed = key.seed().map_err(|_| AuthError::BadSeed(path.clone()))?;
                    write_private(&path, seed.as_bytes())?;
                    key
                }
                Err(e) => return Err(AuthError::Io(path, e)),
            };
            if !key.public_key().starts_with('U') {
                return Err(AuthError::BadSeed(path));
            }
            users.push((role, key.public_key()));
        }
        let bundle = Bundle {
            dir: dir.to_path_buf(),
            users,
            events_stream: events_stream.to_string(),
        };
        let conf = bundle.server_config(&[]);
        write_private(&bundle.server_config_path(), conf.as_bytes())?;
        Ok(bundle)
    }

    /// The seed file `role` connects with (`--nats-nkey`).
    pub fn seed_file(&self, role: &Role) -> PathBuf {
        seed_path(&self.dir, role)
    }

    /// The server config written by [`Bundle::create_or_load`] (`nats-server -c`).
    pub fn server_config_path(&self) -> PathBuf {
        self.dir.join(SERVER_CONFIG)
    }

    /// The roles in the bundle.
    pub fn users(&self) -> impl Iterator<Item = &Role> {
        self.users.iter().map(|(r, _)| r)
    }

    /// nats-server's `authorization` block for every role, plus `extra`
    /// users as given (a test harness may add one of its own).
    pub fn server_config(&self, extra: &[Value]) -> String {
        let mut users: Vec<Value> = self
            .users
            .iter()
            .map(|(role, nkey)| json!({ "nkey": nkey, "permissions": role.permissions(&self.events_stream) }))
            .collect();
        users.extend(extra.iter().cloned());
        let conf = json!({ "authorization": { "users": users } });
        // serde_json cannot fail on a Value it built.
        serde_json::to_string_pretty(&conf).unwrap_or_default()
    }
}

fn seed_path(dir: &Path, role: &Role) -> PathBuf {
    dir.join(format!("{}.nk", role.user()))
}

/// Writes `bytes` to `path` readable by its owner only (through a temp file,
/// so a reader never sees half a file).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    let tmp = path.with_extension("tmp");
    let io = |e| AuthError::Io(path.to_path_buf(), e);
    let _ = fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)
}

fn restrict(dir: &Path, mode: u32) -> Result<(), AuthError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .map_err(|e| AuthError::Io(dir.to_path_buf(), e))?;
    }
    #[cfg(not(unix))]
    let _ = (dir, mode);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_made_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Bundle::create_or_load(dir.path(), &SHIPPED_PARTICIPANTS, "SAGA_EVENTS").expect("create");
        let seed = fs::read_to_string(a.seed_file(&Role::Coordinator)).expect("seed");
        assert!(seed.starts_with("SU"), "a user seed");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(a.seed_file(&Role::Coordinator))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "seed readable by others: {mode:o}");
        }
        let b = Bundle::create_or_load(dir.path(), &SHIPPED_PARTICIPANTS, "SAGA_EVENTS").expect("load");
        assert_eq!(a.users, b.users, "the second start reuses the seeds");
        let conf = fs::read_to_string(b.server_config_path()).expect("conf");
        assert!(
            !conf.contains(seed.trim()),
            "the server config holds public keys only"
        );
        let v: Value = serde_json::from_str(&conf).expect("json");
        assert_eq!(v["authorization"]["users"].as_array().map(Vec::len), Some(7));
    }

    #[test]
    fn a_participant_may_only_answer_and_hear_its_own_commands() {
        let p = Role::Participant("payment".into()).permissions("SAGA_EVENTS");
        let allowed: Vec<&str> = p["publish"]["allow"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let may = |subject: &str| allowed.iter().any(|pattern| matches(pattern, subject));
        for own in [
            "$KV.PART_payment_STATE.root",
            "$KV.PART_payment_REPLIES.k.s/charge-payment/forward",
            "$JS.API.STREAM.MSG.GET.KV_PART_payment_STATE",
            "$JS.API.STREAM.CREATE.KV_PART_payment_REPLIES",
            "$JS.API.CONSUMER.CREATE.KV_PART_payment_STATE.c1.$KV.PART_payment_STATE.>",
        ] {
            assert!(may(own), "its own bucket: {own}");
        }
        for refused in [
            "saga.cmd.payment.charge",
            "saga.cmd.inventory.reserve",
            "saga.events.order.completed",
            "_INBOX_coordinator.x",
            "$KV.PART_inventory_STATE.root",
            "$KV.PART_payment_x_STATE.root",
            "$KV.SAGA_RECORDS.s1",
            "$JS.API.STREAM.MSG.GET.KV_PART_inventory_STATE",
            "$JS.API.DIRECT.GET.KV_PART_shipping_REPLIES.$KV.PART_shipping_REPLIES.k",
            "$JS.API.STREAM.CREATE.KV_SAGA_RECORDS",
            "$JS.API.STREAM.DELETE.KV_PART_payment_STATE",
            "$JS.API.STREAM.PURGE.KV_PART_payment_STATE",
            "$JS.API.CONSUMER.CREATE.SAGA_EVENTS",
        ] {
            assert!(!may(refused), "refused: {refused}");
        }
        assert_eq!(p["allow_responses"]["max"], 1);
        assert!(p["subscribe"]["allow"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("_INBOX_payment.>"))));
        assert_eq!(p["subscribe"]["allow"][0], "saga.cmd.payment.* payment");
        let e = Role::Events.permissions("SAGA_EVENTS");
        assert!(e["subscribe"]["deny"]
            .as_array()
            .is_some_and(|d| d.contains(&json!("saga.cmd.>"))));
    }

    /// NATS subject matching: `*` one token, `>` the rest.
    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn bad_names_and_seeds_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Bundle::create_or_load(dir.path(), &["pay ment"], "S"),
            Err(AuthError::BadName(_))
        ));
        assert!(matches!(
            Bundle::create_or_load(dir.path(), &["Pay.*"], "S"),
            Err(AuthError::BadName(_))
        ));
        fs::write(dir.path().join("coordinator.nk"), "not a seed").expect("write");
        assert!(matches!(
            Bundle::create_or_load(dir.path(), &[], "S"),
            Err(AuthError::BadSeed(_))
        ));
    }
}
