//! Saga definitions: YAML files parsed into raw serde structs, then validated
//! into closed, immutable domain types ([`SagaDefinition`], [`StepDefinition`],
//! [`RetryPolicy`]).
//!
//! This is the only place that reads YAML. Every check happens here, at
//! start-up, and reports `file:line:column: reason`; nothing downstream
//! re-checks a definition. No I/O beyond reading the definition files.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, Spanned};

/// Longest step timeout a definition may declare.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most attempts a retry policy may declare.
const MAX_ATTEMPTS: u32 = 1000;

/// A definition file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// The file (or directory) could not be read.
    #[error("{path}: cannot read: {reason}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// OS error text.
        reason: String,
    },
    /// The file is not a valid definition.
    #[error("{path}:{line}:{column}: {reason}")]
    Invalid {
        /// The YAML file.
        path: PathBuf,
        /// 1-based line (0 when the parser gave none).
        line: u64,
        /// 1-based column (0 when the parser gave none).
        column: u64,
        /// What is wrong, naming the key or step.
        reason: String,
    },
}

impl DefinitionError {
    fn at(path: &Path, loc: Location, reason: impl Into<String>) -> Self {
        DefinitionError::Invalid {
            path: path.to_path_buf(),
            line: loc.line(),
            column: loc.column(),
            reason: reason.into(),
        }
    }

    /// The reason text without the location prefix.
    pub fn reason(&self) -> &str {
        match self {
            DefinitionError::Io { reason, .. } | DefinitionError::Invalid { reason, .. } => reason,
        }
    }
}

/// How a step's command is retried on a transient failure (error reply,
/// timeout, no responders). Attempts count the first try.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Total attempts, first included; ≥ 1.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "duration_ms")]
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    #[serde(with = "duration_ms")]
    pub max_backoff: Duration,
    /// Growth factor between delays; ≥ 1.
    pub multiplier: f32,
    /// Randomise delays so retries of many sagas do not march in step.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delays between attempts, as an iterator (the `backon` crate's
    /// exponential backoff): the n-th item is the wait before attempt n+2.
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        use backon::BackoffBuilder;
        let mut builder = backon::ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(self.multiplier)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize);
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder.build()
    }

    /// Wait before `attempt` (1-based): zero for the first, then the policy's backoff.
    pub fn delay_before(&self, attempt: u32) -> Duration {
        match attempt {
            0 | 1 => Duration::ZERO,
            n => self.delays().nth(n as usize - 2).unwrap_or(self.max_backoff),
        }
    }
}

/// One validated step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDefinition {
    /// Unique within the definition.
    pub name: String,
    /// NATS subject token of the participant (`saga.cmd.<participant>.*`).
    pub participant: String,
    /// Forward action.
    pub action: String,
    /// Compensating action; `None` for `compensation: none`.
    pub compensation: Option<String>,
    /// Request timeout of one attempt.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Retry policy of both the action and its compensation.
    pub retry: RetryPolicy,
}

/// A validated saga definition, identified by `name@version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaDefinition {
    /// Definition name, e.g. `order`.
    pub name: String,
    /// Version ≥ 1; several versions may be loaded side by side.
    pub version: u32,
    /// Steps in forward order; never empty.
    pub steps: Vec<StepDefinition>,
    /// JSON Schema file for the order, resolved against the definition's directory.
    #[serde(default)]
    pub input_schema: Option<PathBuf>,
    /// File the definition came from.
    #[serde(default)]
    pub source: PathBuf,
}

impl SagaDefinition {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Every loaded definition, by name and version.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    by_name: BTreeMap<String, BTreeMap<u32, Arc<SagaDefinition>>>,
}

impl Definitions {
    /// Loads every `*.yaml` / `*.yml` file of `dir` (not recursive).
    ///
    /// # Errors
    /// The first unreadable or invalid file, a duplicate `name@version`, or an
    /// empty directory.
    pub fn load_dir(dir: &Path) -> Result<Self, DefinitionError> {
        let io = |e: std::io::Error| DefinitionError::Io {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        let mut defs = Definitions::default();
        for file in &files {
            defs.insert(load_file(file)?)?;
        }
        if defs.is_empty() {
            return Err(DefinitionError::Io {
                path: dir.to_path_buf(),
                reason: "no *.yaml saga definition found".into(),
            });
        }
        Ok(defs)
    }

    /// Adds a definition.
    ///
    /// # Errors
    /// When the same `name@version` is already loaded.
    pub fn insert(&mut self, def: SagaDefinition) -> Result<(), DefinitionError> {
        let versions = self.by_name.entry(def.name.clone()).or_default();
        if let Some(existing) = versions.get(&def.version) {
            return Err(DefinitionError::Invalid {
                path: def.source.clone(),
                line: 1,
                column: 1,
                reason: format!(
                    "definition {} is already defined in {}",
                    def.id(),
                    existing.source.display()
                ),
            });
        }
        versions.insert(def.version, Arc::new(def));
        Ok(())
    }

    /// The definition `name@version`, or the latest version of `name` when `version` is `None`.
    pub fn get(&self, name: &str, version: Option<u32>) -> Option<Arc<SagaDefinition>> {
        let versions = self.by_name.get(name)?;
        match version {
            Some(v) => versions.get(&v).cloned(),
            None => versions.values().next_back().cloned(),
        }
    }

    /// Every definition, by name then version.
    pub fn all(&self) -> impl Iterator<Item = &Arc<SagaDefinition>> {
        self.by_name.values().flat_map(|v| v.values())
    }

    /// Whether nothing is loaded.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Reads and validates one definition file.
///
/// # Errors
/// Unreadable file or any validation failure, with line and column.
pub fn load_file(path: &Path) -> Result<SagaDefinition, DefinitionError> {
    let text = std::fs::read_to_string(path).map_err(|e| DefinitionError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse(path, &text)
}

/// Parses and validates definition text; `path` names it in errors and
/// anchors `input_schema`.
///
/// # Errors
/// Syntax errors, unknown keys, missing keys, bad durations, bad names,
/// duplicate steps, missing compensations, out-of-range numbers.
pub fn parse(path: &Path, text: &str) -> Result<SagaDefinition, DefinitionError> {
    let raw: RawDefinition = serde_saphyr::from_str(text).map_err(|e| {
        let loc = e.location().unwrap_or(Location::UNKNOWN);
        let reason = e.without_snippet().to_string();
        // The rendered message may repeat the location; keep the first line, which says what.
        let reason = reason.lines().next().unwrap_or("invalid YAML").trim().to_string();
        DefinitionError::at(path, loc, reason)
    })?;
    validate(path, raw)
}

fn validate(path: &Path, raw: RawDefinition) -> Result<SagaDefinition, DefinitionError> {
    let name = ident(path, &raw.name, "name")?;
    if raw.version.value == 0 {
        return Err(DefinitionError::at(
            path,
            raw.version.referenced,
            "version must be ≥ 1",
        ));
    }
    let default_timeout = match &raw.defaults.timeout {
        Some(t) => timeout(path, t, "defaults.timeout")?,
        None => Duration::from_secs(2),
    };
    let default_retry = retry(
        path,
        &raw.defaults.retry,
        RetryPolicy::default(),
        "defaults.retry",
    )?;
    if raw.steps.value.is_empty() {
        return Err(DefinitionError::at(
            path,
            raw.steps.referenced,
            "steps must list at least one step",
        ));
    }
    let mut steps: Vec<StepDefinition> = Vec::with_capacity(raw.steps.value.len());
    for step in &raw.steps.value {
        let step_name = ident(path, &step.name, "steps[].name")?;
        if steps.iter().any(|s| s.name == step_name) {
            return Err(DefinitionError::at(
                path,
                step.name.referenced,
                format!("duplicate step name `{step_name}`"),
            ));
        }
        let participant = ident(path, &step.participant, "participant")?;
        let action = ident(path, &step.action, "action")?;
        let compensation = match &step.compensation {
            None => {
                return Err(DefinitionError::at(
                    path,
                    step.name.referenced,
                    format!(
                        "step `{step_name}` has no compensation; name the compensating action \
                         or write `compensation: none`"
                    ),
                ))
            }
            Some(c) if c.value == "none" => None,
            Some(c) => Some(ident(path, c, "compensation")?),
        };
        let timeout = match &step.timeout {
            Some(t) => timeout(path, t, "timeout")?,
            None => default_timeout,
        };
        let retry = retry(path, &step.retry, default_retry, "retry")?;
        steps.push(StepDefinition {
            name: step_name,
            participant,
            action,
            compensation,
            timeout,
            retry,
        });
    }
    let input_schema = match &raw.input_schema {
        None => None,
        Some(s) => {
            let base = path.parent().unwrap_or_else(|| Path::new("."));
            let schema = base.join(&s.value);
            let text = std::fs::read_to_string(&schema).map_err(|e| {
                DefinitionError::at(
                    path,
                    s.referenced,
                    format!("input_schema {}: {e}", schema.display()),
                )
            })?;
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
                return Err(DefinitionError::at(
                    path,
                    s.referenced,
                    format!("input_schema {} is not JSON: {e}", schema.display()),
                ));
            }
            Some(schema)
        }
    };
    Ok(SagaDefinition {
        name,
        version: raw.version.value,
        steps,
        input_schema,
        source: path.to_path_buf(),
    })
}

/// Names become NATS subject tokens and idempotency-key parts: lowercase
/// letters, digits, `-` and `_`, starting with a letter, at most 64 characters.
fn ident(path: &Path, value: &Spanned<String>, what: &str) -> Result<String, DefinitionError> {
    let v = value.value.as_str();
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.starts_with(|c: char| c.is_ascii_lowercase())
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(v.to_string())
    } else {
        Err(DefinitionError::at(
            path,
            value.referenced,
            format!(
                "{what} `{v}` is not a valid name: use 1-64 lowercase letters, digits, `-` or `_`, \
                 starting with a letter"
            ),
        ))
    }
}

fn duration(path: &Path, value: &Spanned<String>, what: &str) -> Result<Duration, DefinitionError> {
    humantime::parse_duration(value.value.trim()).map_err(|e| {
        DefinitionError::at(
            path,
            value.referenced,
            format!(
                "{what}: `{}` is not a duration ({e}); write e.g. 500ms, 2s, 1m",
                value.value
            ),
        )
    })
}

fn timeout(path: &Path, value: &Spanned<String>, what: &str) -> Result<Duration, DefinitionError> {
    let d = duration(path, value, what)?;
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(DefinitionError::at(
            path,
            value.referenced,
            format!("{what} must be > 0 and ≤ 1h"),
        ));
    }
    Ok(d)
}

fn retry(
    path: &Path,
    raw: &Option<Spanned<RawRetry>>,
    base: RetryPolicy,
    what: &str,
) -> Result<RetryPolicy, DefinitionError> {
    let Some(raw) = raw else { return Ok(base) };
    let at = raw.referenced;
    let r = &raw.value;
    let mut p = base;
    if let Some(n) = r.max_attempts {
        p.max_attempts = n;
    }
    if let Some(d) = &r.initial_backoff {
        p.initial_backoff = duration(path, d, &format!("{what}.initial_backoff"))?;
    }
    if let Some(d) = &r.max_backoff {
        p.max_backoff = duration(path, d, &format!("{what}.max_backoff"))?;
    }
    if let Some(m) = r.multiplier {
        p.multiplier = m;
    }
    if let Some(j) = r.jitter {
        p.jitter = j;
    }
    if p.max_attempts == 0 || p.max_attempts > MAX_ATTEMPTS {
        return Err(DefinitionError::at(
            path,
            at,
            format!("{what}.max_attempts must be 1..={MAX_ATTEMPTS}"),
        ));
    }
    if !(p.multiplier.is_finite() && p.multiplier >= 1.0) {
        return Err(DefinitionError::at(
            path,
            at,
            format!("{what}.multiplier must be ≥ 1.0"),
        ));
    }
    if p.initial_backoff > p.max_backoff {
        return Err(DefinitionError::at(
            path,
            at,
            format!("{what}.initial_backoff exceeds max_backoff"),
        ));
    }
    Ok(p)
}

// ---- raw YAML shapes: untrusted, never leave this module ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: Spanned<String>,
    version: Spanned<u32>,
    #[serde(default)]
    input_schema: Option<Spanned<String>>,
    #[serde(default)]
    defaults: RawDefaults,
    steps: Spanned<Vec<RawStep>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    initial_backoff: Option<Spanned<String>>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
    #[serde(default)]
    multiplier: Option<f32>,
    #[serde(default)]
    jitter: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    participant: Spanned<String>,
    action: Spanned<String>,
    #[serde(default)]
    compensation: Option<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
}

mod duration_ms {
    //! Durations stored as whole milliseconds in saga snapshots.
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl fmt::Display for SagaDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"name: order
version: 1
defaults:
  timeout: 2s
  retry: { max_attempts: 5, initial_backoff: 50ms, max_backoff: 2s, multiplier: 2.0, jitter: true }
steps:
  - name: reserve-inventory
    participant: inventory
    action: reserve
    compensation: release
  - name: charge-payment
    participant: payment
    action: charge
    compensation: refund
    timeout: 5s
"#;

    fn err(text: &str) -> DefinitionError {
        match parse(Path::new("bad.yaml"), text) {
            Ok(d) => panic!("expected an error, got {d:?}"),
            Err(e) => e,
        }
    }

    fn line_of(e: &DefinitionError) -> u64 {
        match e {
            DefinitionError::Invalid { line, .. } => *line,
            DefinitionError::Io { .. } => 0,
        }
    }

    #[test]
    fn the_design_example_loads() {
        let d = parse(Path::new("order.yaml"), ORDER).expect("valid");
        assert_eq!(d.id(), "order@1");
        assert_eq!(d.steps.len(), 2);
        assert_eq!(d.steps[0].timeout, Duration::from_secs(2));
        assert_eq!(d.steps[1].timeout, Duration::from_secs(5));
        assert_eq!(d.steps[1].compensation.as_deref(), Some("refund"));
        assert_eq!(d.steps[0].retry.max_attempts, 5);
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let e = err(&ORDER.replace(
            "    compensation: refund\n",
            "    compensation: refund\n    colour: red\n",
        ));
        assert_eq!(line_of(&e), 15, "{e}");
        assert!(e.to_string().starts_with("bad.yaml:15:"), "{e}");
        assert!(e.reason().contains("colour"), "{e}");
    }

    #[test]
    fn duplicate_step_is_refused() {
        let e = err(&ORDER.replace("name: charge-payment", "name: reserve-inventory"));
        assert_eq!(line_of(&e), 11, "{e}");
        assert!(
            e.reason().contains("duplicate step name `reserve-inventory`"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_is_refused() {
        let e = err(&ORDER.replace("timeout: 5s", "timeout: five seconds"));
        assert_eq!(line_of(&e), 15, "{e}");
        assert!(e.reason().contains("not a duration"), "{e}");
        let e = err(&ORDER.replace("initial_backoff: 50ms", "initial_backoff: soon"));
        assert_eq!(line_of(&e), 5, "{e}");
    }

    #[test]
    fn missing_compensation_is_refused_but_none_is_allowed() {
        let e = err(&ORDER.replace("    compensation: release\n", ""));
        assert_eq!(line_of(&e), 7, "{e}");
        assert!(e.reason().contains("has no compensation"), "{e}");
        let d = parse(
            Path::new("ok.yaml"),
            &ORDER.replace("compensation: release", "compensation: none"),
        )
        .expect("none is allowed");
        assert_eq!(d.steps[0].compensation, None);
    }

    #[test]
    fn bad_participant_and_action_names_are_refused() {
        let e = err(&ORDER.replace("participant: inventory", "participant: Inventory.Service"));
        assert_eq!(line_of(&e), 8, "{e}");
        assert!(
            e.reason()
                .contains("participant `Inventory.Service` is not a valid name"),
            "{e}"
        );
        let e = err(&ORDER.replace("action: charge", "action: \"charge *\""));
        assert!(e.reason().contains("action `charge *`"), "{e}");
    }

    #[test]
    fn other_mistakes_are_refused() {
        assert!(err(&ORDER.replace("version: 1", "version: 0"))
            .reason()
            .contains("version"));
        assert!(err("name: order\nversion: 1\nsteps: []\n")
            .reason()
            .contains("at least one step"));
        assert!(err(&ORDER.replace("max_attempts: 5", "max_attempts: 0"))
            .reason()
            .contains("max_attempts"));
        assert!(err(&ORDER.replace("multiplier: 2.0", "multiplier: 0.5"))
            .reason()
            .contains("multiplier"));
        assert!(err(&ORDER.replace("timeout: 2s", "timeout: 0s"))
            .reason()
            .contains("> 0"));
        let e = err("name: order\nsteps: [\n");
        assert!(matches!(e, DefinitionError::Invalid { .. }), "{e}");
        let e = err("name: order\nsteps:\n  - name: a\n");
        assert!(
            e.reason().contains("version") || e.reason().contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn directory_loading_keeps_versions_and_refuses_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), ORDER).expect("write");
        std::fs::write(
            dir.path().join("b.yaml"),
            ORDER.replace("version: 1", "version: 2"),
        )
        .expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let defs = Definitions::load_dir(dir.path()).expect("loads");
        assert_eq!(defs.all().count(), 2);
        assert_eq!(defs.get("order", None).map(|d| d.version), Some(2));
        assert_eq!(defs.get("order", Some(1)).map(|d| d.version), Some(1));
        assert!(defs.get("order", Some(3)).is_none());
        std::fs::write(dir.path().join("c.yaml"), ORDER).expect("write");
        let e = Definitions::load_dir(dir.path()).expect_err("duplicate");
        assert!(e.reason().contains("order@1 is already defined"), "{e}");
    }

    #[test]
    fn retry_delays_grow_and_stay_bounded() {
        let p = RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            multiplier: 2.0,
            jitter: false,
        };
        let d: Vec<_> = p.delays().collect();
        assert_eq!(d.len(), 5);
        assert_eq!(d[0], Duration::from_millis(10));
        assert_eq!(d[1], Duration::from_millis(20));
        assert_eq!(d[4], Duration::from_millis(40));
        assert_eq!(p.delay_before(1), Duration::ZERO);
        assert_eq!(p.delay_before(3), Duration::from_millis(20));
        let j = RetryPolicy { jitter: true, ..p };
        assert!(j
            .delays()
            .all(|x| x >= Duration::from_millis(10) && x <= Duration::from_millis(80)));
    }
}
