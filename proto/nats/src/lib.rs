//! NATS connection security shared by every binary: an nkey seed file (the
//! default deployment's, see `saga-auth`), user/password, token or a
//! credentials file, and TLS (CA, client certificate). The same flags and
//! environment variables on the coordinator and every participant, so a
//! deployment sets them once.
//!
//! [`connect`] is the one way every process reaches NATS: these settings,
//! the first connection retried with exponential backoff and jitter
//! (`backon`), then async-nats' own unlimited reconnects, each change
//! reported to the caller (readiness).
//!
//! Secrets (password, token) are never printed: `Debug` redacts them, and
//! clap hides their environment values in `--help`.
#![deny(unreachable_pub)]
#![warn(missing_docs)]

use std::{fmt, future::Future, path::PathBuf, time::Duration};

pub use saga_auth::Role;

/// How to authenticate to NATS and whether to use TLS.
#[derive(Clone, Default, clap::Args)]
pub struct NatsSecurity {
    /// NATS user name (with `--nats-password`).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (with `--nats-user`). Never logged.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS authentication token. Never logged.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT + NKey seed, `.creds`).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding this process's NATS nkey user seed (`SU…`), as
    /// `sagactl nats-auth` writes them. The seed is never logged.
    #[arg(long, env = "NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate (implies TLS).
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for NATS mutual TLS (with `--nats-tls-key`).
    #[arg(long, env = "NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of `--nats-tls-cert`.
    #[arg(long, env = "NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS (also implied by `tls://` URLs).
    #[arg(long, env = "NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
}

impl fmt::Debug for NatsSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsSecurity")
            .field("nats_user", &self.nats_user)
            .field("nats_password", &redacted(&self.nats_password))
            .field("nats_token", &redacted(&self.nats_token))
            .field("nats_creds", &self.nats_creds)
            .field("nats_nkey", &self.nats_nkey)
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_cert", &self.nats_tls_cert)
            .field("nats_tls_key", &self.nats_tls_key)
            .field("nats_tls_required", &self.nats_tls_required)
            .finish()
    }
}

impl NatsSecurity {
    /// Checks the settings are consistent and the files they name exist.
    ///
    /// # Errors
    /// A sentence naming the flag at fault.
    pub fn validate(&self) -> Result<(), String> {
        let methods = [
            self.nats_user.is_some() || self.nats_password.is_some(),
            self.nats_token.is_some(),
            self.nats_creds.is_some(),
            self.nats_nkey.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(
                "use only one of --nats-user/--nats-password, --nats-token, --nats-creds and --nats-nkey"
                    .into(),
            );
        }
        if self.nats_user.is_some() != self.nats_password.is_some() {
            return Err("--nats-user and --nats-password go together".into());
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return Err("--nats-tls-cert and --nats-tls-key go together".into());
        }
        let files = [
            ("--nats-creds", &self.nats_creds),
            ("--nats-nkey", &self.nats_nkey),
            ("--nats-tls-ca", &self.nats_tls_ca),
            ("--nats-tls-cert", &self.nats_tls_cert),
            ("--nats-tls-key", &self.nats_tls_key),
        ];
        for (flag, file) in files {
            if let Some(path) = file {
                if !path.is_file() {
                    return Err(format!("{flag} {}: no such file", path.display()));
                }
            }
        }
        Ok(())
    }

    /// Whether TLS is asked for (a CA, a client certificate or `--nats-tls-required`).
    pub fn tls(&self) -> bool {
        self.nats_tls_required || self.nats_tls_ca.is_some() || self.nats_tls_cert.is_some()
    }

    /// `options` with these credentials and TLS settings.
    ///
    /// # Errors
    /// The credentials file cannot be read or parsed.
    pub async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> std::io::Result<async_nats::ConnectOptions> {
        if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.nats_token {
            options = options.token(token.clone());
        }
        if let Some(creds) = &self.nats_creds {
            options = options.credentials_file(creds).await?;
        }
        if let Some(path) = &self.nats_nkey {
            let seed = std::fs::read_to_string(path)?;
            let seed = seed.trim();
            // Checked here so a wrong file is a start-up error naming the
            // flag, not an endless "authorization violation" retry.
            if !seed.starts_with("SU") || seed.contains(char::is_whitespace) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("--nats-nkey {}: not an nkey user seed", path.display()),
                ));
            }
            options = options.nkey(seed.to_string());
        }
        if let Some(ca) = &self.nats_tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert, &self.nats_tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls() {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// The latest value of `key` in the KV bucket `kv` and its revision, read
/// through the bucket's stream leader: a direct get may be answered by a
/// replica that has not applied the latest write, and a compare-and-set
/// decided on that would be decided on stale data. `None` when the key is
/// absent, deleted or purged (or expired by a TTL marker).
///
/// # Errors
/// JetStream failed or timed out.
pub async fn leader_get(
    kv: &async_nats::jetstream::kv::Store,
    key: &str,
) -> Result<
    Option<async_nats::jetstream::message::StreamMessage>,
    async_nats::jetstream::stream::LastRawMessageError,
> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{}", kv.prefix, key);
    match kv.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => {
            let removed = m
                .headers
                .get("KV-Operation")
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
                || m.headers.get("Nats-Marker-Reason").is_some();
            // Its stream sequence is the key's revision.
            Ok((!removed).then_some(m))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a KV compare-and-set (`update` with a revision) lost: the key's
/// revision moved. async-nats maps only JetStream's error 10071 to
/// `WrongLastRevision`; nats-server 2.12+ also answers 10164 ("wrong last
/// sequence") for the same conflict on a clustered stream, which async-nats
/// reports as `Other` (seen: three participant replicas seeding at once).
pub fn is_wrong_revision(e: &async_nats::jetstream::kv::UpdateError) -> bool {
    e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision || has_wrong_sequence(e)
}

/// Whether a KV `create` failed because the key exists (see
/// [`is_wrong_revision`] for the error code async-nats does not map).
pub fn is_already_exists(e: &async_nats::jetstream::kv::CreateError) -> bool {
    e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists || has_wrong_sequence(e)
}

/// Whether JetStream's own error in `e`'s source chain is a wrong last sequence.
fn has_wrong_sequence(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(js) = err.downcast_ref::<JsError>() {
            let code = js.error_code();
            return code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT;
        }
        next = err.source();
    }
    false
}

/// Messages a subscription buffers before async-nats drops them (see [`connect`]).
pub const SUBSCRIPTION_CAPACITY: usize = 1 << 21;

/// Why [`connect`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials file cannot be read or parsed.
    #[error("nats credentials: {0}")]
    Credentials(std::io::Error),
    /// The URL cannot be parsed (retrying would not help).
    #[error("nats connect: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// Connects to `url` as `role` (its client name and its private inbox
/// prefix, the one its NATS permissions let it subscribe to) with
/// `security`. The first connection is
/// retried with exponential backoff and jitter until it succeeds (callers
/// race it against their shutdown); afterwards async-nats reconnects by
/// itself without limit. `on_connection(true | false)` runs on every
/// (dis)connection and once after the first success.
///
/// Each subscription buffers up to [`SUBSCRIPTION_CAPACITY`] messages
/// instead of async-nats' 65,536: past its buffer async-nats drops messages
/// (a "slow consumer"), and a burst bigger than that is normal here, e.g.
/// every command re-sent at once after a coordinator restart with 100,000
/// sagas in flight, and their replies. A dropped command or reply would only
/// surface as a timeout, much later. The buffer is allocated as it fills.
///
/// # Errors
/// An unreadable credentials file or an unparsable URL.
pub async fn connect<F, Fut>(
    url: &str,
    role: &saga_auth::Role,
    security: &NatsSecurity,
    on_connection: F,
) -> Result<async_nats::Client, ConnectError>
where
    F: Fn(bool) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + Sync + 'static,
{
    use backon::Retryable;
    // Several servers (a cluster) may be given comma-separated.
    let urls: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    // Read the credentials once: a bad file is a configuration error, not a retry.
    let base = security
        .apply(async_nats::ConnectOptions::new())
        .await
        .map_err(ConnectError::Credentials)?
        .name(format!("saga-{role}"))
        .custom_inbox_prefix(role.inbox_prefix())
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .max_reconnects(None);
    let attempt = || {
        let on_connection = on_connection.clone();
        base.clone()
            .event_callback(move |event| {
                let on_connection = on_connection.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("nats connected");
                            on_connection(true).await;
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("nats disconnected");
                            on_connection(false).await;
                        }
                        // Messages were dropped: a reply or a command lost this way
                        // shows up as a timeout much later, so say so now.
                        async_nats::Event::SlowConsumer(sid) => tracing::warn!(
                            subscription = sid,
                            "nats slow consumer: messages dropped because the subscription's buffer was full"
                        ),
                        other => tracing::info!(event = %other, "nats event"),
                    }
                }
            })
            .connect(urls.clone())
    };
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let client = attempt
        .retry(backoff)
        .when(|e| e.kind() != async_nats::ConnectErrorKind::ServerParse)
        .notify(|e, delay| tracing::warn!(error = %e, retry_in = ?delay, "cannot reach NATS; retrying"))
        .await?;
    on_connection(true).await;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The update error async-nats makes of JetStream's answer `code`.
    fn update_error(code: u64) -> async_nats::jetstream::kv::UpdateError {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        let js: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": "wrong last sequence"
        }))
        .expect("a JetStream error");
        let kind = if code == 10071 {
            PublishErrorKind::WrongLastSequence
        } else {
            PublishErrorKind::Other
        };
        PublishError::with_source(kind, js).into()
    }

    #[test]
    fn both_wrong_last_sequence_codes_are_a_lost_compare_and_set() {
        assert!(is_wrong_revision(&update_error(10071)));
        assert!(is_wrong_revision(&update_error(10164)));
        assert!(
            !is_wrong_revision(&update_error(10059)),
            "stream not found is not a conflict"
        );
        let create: async_nats::jetstream::kv::CreateError = update_error(10164).into();
        assert!(is_already_exists(&create));
        let create: async_nats::jetstream::kv::CreateError = update_error(10059).into();
        assert!(!is_already_exists(&create));
    }

    #[test]
    fn secrets_are_redacted_and_mixed_methods_refused() {
        let s = NatsSecurity {
            nats_user: Some("u".into()),
            nats_password: Some("hunter2".into()),
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(s.validate().is_ok());
        let mixed = NatsSecurity {
            nats_token: Some("t".into()),
            ..s.clone()
        };
        assert!(mixed.validate().is_err_and(|e| e.contains("only one")));
        let half = NatsSecurity {
            nats_password: None,
            ..s
        };
        assert!(half.validate().is_err_and(|e| e.contains("go together")));
        let missing = NatsSecurity {
            nats_tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(missing.validate().is_err_and(|e| e.contains("--nats-tls-ca")));
        assert!(missing.tls());
    }
}
