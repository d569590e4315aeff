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
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, Spanned};

/// Longest step timeout a definition may declare.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest wait a definition may declare: an `await`'s timeout, a `sleep`,
/// the saga's `deadline`.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most attempts a retry policy may declare.
const MAX_ATTEMPTS: u32 = 1000;
/// Largest definition file, in bytes.
pub const MAX_FILE_BYTES: usize = 256 * 1024;
/// Most entries of one `input:` or `compensation_input:` map.
pub const MAX_INPUT_ENTRIES: usize = 32;
/// Longest key of an `input:` / `compensation_input:` map, in bytes.
pub const MAX_INPUT_KEY_BYTES: usize = 64;
/// Longest value (literal or reference) of an input map, in bytes.
pub const MAX_INPUT_VALUE_BYTES: usize = 1024;
/// Largest `output_schema:` of one step, as compact JSON, in bytes.
pub const MAX_OUTPUT_SCHEMA_BYTES: usize = 16 * 1024;

/// Bounds on the size of a definition, checked at load (a saga's cost grows
/// with its steps: every transition writes the saga whole, `GetSaga` returns
/// it whole). The other bounds are fixed: [`MAX_FILE_BYTES`], names of 64
/// characters, alias subjects of 200, [`MAX_INPUT_ENTRIES`],
/// [`MAX_INPUT_KEY_BYTES`], [`MAX_INPUT_VALUE_BYTES`], [`MAX_OUTPUT_SCHEMA_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most steps in one definition, those of its `parallel:` groups included.
    pub max_steps: usize,
    /// Most steps in one `parallel:` group (sent in one transition).
    pub max_group_steps: usize,
}

impl Limits {
    /// Default of [`Limits::max_steps`] (the coordinator's `--max-steps`).
    pub const DEFAULT_MAX_STEPS: usize = 100;
    /// Default of [`Limits::max_group_steps`] (the coordinator's `--max-group-steps`).
    pub const DEFAULT_MAX_GROUP_STEPS: usize = 16;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps: Self::DEFAULT_MAX_STEPS,
            max_group_steps: Self::DEFAULT_MAX_GROUP_STEPS,
        }
    }
}

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
    /// The group the step runs in: the index of the group's first step. Steps
    /// of one `parallel:` block share it; a sequential step is its own group.
    /// `None` in snapshots written before groups existed: its own index.
    #[serde(default)]
    pub group: Option<usize>,
    /// What a failure of the forward action does to the saga.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Extra input of the forward command (`input` in the envelope), each
    /// value a literal or a reference resolved when the command is built.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input: BTreeMap<String, InputValue>,
    /// Extra input of the compensation command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compensation_input: BTreeMap<String, InputValue>,
    /// The JSON Schema the forward action's output (`data` of its `ok`
    /// reply) must match to be stored; a reply whose output does not is
    /// malformed (outcome unknown). `None`: any output (within the size bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<OutputSchema>,
    /// What the step does; a command unless it waits for a signal or sleeps.
    #[serde(default, skip_serializing_if = "StepKind::is_command")]
    pub kind: StepKind,
    /// `when:` (the step's own, or its `parallel:` group's): evaluated when the
    /// step's group starts; false, the step is SKIPPED (never run, never undone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<crate::condition::Condition>,
}

impl StepDefinition {
    /// The signal an `await` step waits for.
    pub fn awaits(&self) -> Option<&str> {
        match &self.kind {
            StepKind::Await { signal } => Some(signal),
            StepKind::Command | StepKind::Sleep { .. } => None,
        }
    }
}

/// What a step does. `await` and `sleep` steps send nothing, have nothing to
/// undo and are never retried: they end by a signal, a timer or the saga's end.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepKind {
    /// Sends `action` to `participant` (and `compensation` to undo it).
    #[default]
    Command,
    /// Waits for the signal `signal` for at most the step's `timeout`; the
    /// signal's payload is the step's output.
    Await {
        /// Signal name, unique within the definition.
        signal: String,
    },
    /// Waits `duration` (a durable timer), then succeeds.
    Sleep {
        /// How long.
        #[serde(with = "duration_ms")]
        duration: Duration,
    },
}

impl StepKind {
    /// Whether the step sends a command.
    pub fn is_command(&self) -> bool {
        matches!(self, StepKind::Command)
    }

    /// `command`, `await` or `sleep`, as shown to operators.
    pub fn as_str(&self) -> &'static str {
        match self {
            StepKind::Command => "command",
            StepKind::Await { .. } => "await",
            StepKind::Sleep { .. } => "sleep",
        }
    }
}

/// A step's `output_schema:`: the schema as JSON (what saga snapshots store)
/// and the validator compiled from it once, shared by every clone.
///
/// Only the schema itself counts: no `$ref` outside it (`#…`) is allowed, and
/// the validator's retriever refuses every URI, so nothing is ever fetched
/// or read from disk.
#[derive(Clone)]
pub struct OutputSchema {
    json: Arc<serde_json::Value>,
    compiled: Arc<std::sync::OnceLock<Result<Arc<jsonschema::Validator>, String>>>,
}

impl OutputSchema {
    /// Checks and compiles `json` as an output schema.
    ///
    /// # Errors
    /// A schema over [`MAX_OUTPUT_SCHEMA_BYTES`], with a `$ref` that is not
    /// local (`#…`), or that is not a valid JSON Schema.
    pub fn new(json: serde_json::Value) -> Result<Self, String> {
        let size = serde_json::to_vec(&json).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_OUTPUT_SCHEMA_BYTES {
            return Err(format!(
                "output_schema is {size} bytes of JSON; at most {MAX_OUTPUT_SCHEMA_BYTES}"
            ));
        }
        if let Some(r) = remote_ref(&json) {
            return Err(format!(
                "output_schema: `$ref: {r}` points outside the schema; only local references (`#/…`) are allowed"
            ));
        }
        let schema = OutputSchema {
            json: Arc::new(json),
            compiled: Arc::default(),
        };
        schema.validator()?;
        Ok(schema)
    }

    /// The schema as JSON.
    pub fn json(&self) -> &serde_json::Value {
        &self.json
    }

    fn validator(&self) -> Result<Arc<jsonschema::Validator>, String> {
        self.compiled
            .get_or_init(|| {
                jsonschema::options()
                    .with_retriever(NoRetrieval)
                    .build(&self.json)
                    .map(Arc::new)
                    .map_err(|e| format!("output_schema is not a valid JSON Schema: {e}"))
            })
            .clone()
    }

    /// Checks a step's output against the schema.
    ///
    /// # Errors
    /// The first violation as `output.path: message`, or why the schema (from
    /// a stored snapshot) does not compile.
    pub fn check(&self, output: &serde_json::Value) -> Result<(), String> {
        let validator = self.validator()?;
        let first = validator.iter_errors(output).next().map(|e| {
            let at = match field_path(e.instance_path().as_str()).as_str() {
                "order" => "output".to_string(),
                p if p.starts_with('[') => format!("output{p}"),
                p => format!("output.{p}"),
            };
            // The message may quote the output: keep it short, it goes to logs and the history.
            let mut m = format!("{at}: {e}");
            if m.len() > 300 {
                let cut = (0..=300).rev().find(|i| m.is_char_boundary(*i)).unwrap_or(0);
                m.truncate(cut);
                m.push('…');
            }
            m
        });
        first.map_or(Ok(()), Err)
    }
}

impl fmt::Debug for OutputSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OutputSchema").field(&self.json).finish()
    }
}

impl PartialEq for OutputSchema {
    fn eq(&self, other: &Self) -> bool {
        self.json == other.json
    }
}

impl Serialize for OutputSchema {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

impl<'de> Deserialize<'de> for OutputSchema {
    /// From a stored snapshot: compiled on first use (a snapshot's schema
    /// was checked when its definition was loaded).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(OutputSchema {
            json: Arc::new(serde_json::Value::deserialize(d)?),
            compiled: Arc::default(),
        })
    }
}

/// The retriever of output schemas: nothing outside the schema is fetched.
struct NoRetrieval;

impl jsonschema::Retrieve for NoRetrieval {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("{uri}: output schemas may not reference other documents").into())
    }
}

/// The first `$ref` / `$dynamicRef` / `$recursiveRef` of `json` that is not
/// local (does not start with `#`).
fn remote_ref(json: &serde_json::Value) -> Option<String> {
    match json {
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("$ref" | "$dynamicRef" | "$recursiveRef", serde_json::Value::String(r))
                if !r.starts_with('#') =>
            {
                Some(r.clone())
            }
            _ => remote_ref(v),
        }),
        serde_json::Value::Array(items) => items.iter().find_map(remote_ref),
        _ => None,
    }
}

/// What a step's failure (rejected, or out of attempts) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Undo what the saga did so far, newest first (the safe default).
    #[default]
    Compensate,
    /// A transient failure never exhausts the step: it is retried (at the
    /// retry policy's longest backoff) until it answers. A business rejection
    /// still compensates.
    RetryForever,
    /// Go on with the next step as if this one had succeeded (it has no
    /// output). Its effect, if its outcome is unknown, is still undone if the
    /// saga compensates later.
    Continue,
}

impl OnFailure {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Compensate => "compensate",
            OnFailure::RetryForever => "retry_forever",
            OnFailure::Continue => "continue",
        }
    }
}

/// One value of a step's `input` / `compensation_input`.
///
/// Syntax (validated at load): a string that is exactly one reference,
/// `${order}`, `${order.<field>…}`, `${steps.<step>.output}` or
/// `${steps.<step>.output.<key>…}`, or any string without `${` (a literal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputValue {
    /// A literal string.
    Literal {
        /// The text.
        value: String,
    },
    /// A field of the order (the whole order for an empty path).
    Order {
        /// Keys into the order's JSON.
        path: Vec<String>,
    },
    /// A field of a step's output (`data` of its `ok` reply).
    StepOutput {
        /// Index of the step.
        step: usize,
        /// Keys into the output.
        path: Vec<String>,
    },
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
    /// Domain aliases: a saga event (`completed`, …) also published under a
    /// business subject (`orders.completed`).
    #[serde(default)]
    pub events: BTreeMap<String, String>,
    /// How long a saga may take from its creation: past it, a saga that is
    /// still running compensates (`deadline:`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration_ms")]
    pub deadline: Option<Duration>,
    /// File the definition came from.
    #[serde(default)]
    pub source: PathBuf,
}

impl SagaDefinition {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The group of step `i` (the index of its group's first step).
    pub fn group_of(&self, i: usize) -> usize {
        self.steps.get(i).and_then(|s| s.group).unwrap_or(i)
    }

    /// The steps of the group starting at `g`, in order.
    pub fn group(&self, g: usize) -> std::ops::Range<usize> {
        let end = (g..self.steps.len())
            .find(|&k| self.group_of(k) != g)
            .unwrap_or(self.steps.len());
        g..end
    }

    /// The first step of the group after the one starting at `g`, if any.
    pub fn next_group(&self, g: usize) -> Option<usize> {
        let end = self.group(g).end;
        (end < self.steps.len()).then_some(end)
    }

    /// Checks the output of step `i`'s forward action against its
    /// `output_schema`, if it declares one.
    ///
    /// # Errors
    /// As [`OutputSchema::check`].
    pub fn check_output(&self, i: usize, output: &serde_json::Value) -> Result<(), String> {
        match self.steps.get(i).and_then(|s| s.output_schema.as_ref()) {
            Some(schema) => schema.check(output),
            None => Ok(()),
        }
    }

    /// The `await` step waiting for `signal`, if any.
    pub fn await_step(&self, signal: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.awaits() == Some(signal))
    }

    /// The groups, in order, as step-index ranges.
    pub fn groups(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut g = Some(0).filter(|_| !self.steps.is_empty());
        while let Some(start) = g {
            out.push(self.group(start));
            g = self.next_group(start);
        }
        out
    }
}

/// Every loaded definition, by name and version, with the compiled input
/// schemas of those that declare one.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    by_name: BTreeMap<String, BTreeMap<u32, Arc<SagaDefinition>>>,
    schemas: BTreeMap<String, Arc<jsonschema::Validator>>,
}

impl Definitions {
    /// Loads every `*.yaml` / `*.yml` file of `dir` (not recursive).
    ///
    /// # Errors
    /// The first unreadable or invalid file, a duplicate `name@version`, or an
    /// empty directory.
    pub fn load_dir(dir: &Path) -> Result<Self, DefinitionError> {
        Self::load_dir_with(dir, &Limits::default())
    }

    /// [`Definitions::load_dir`] with `limits` instead of the defaults.
    ///
    /// # Errors
    /// As [`Definitions::load_dir`], and a file beyond `limits`.
    pub fn load_dir_with(dir: &Path, limits: &Limits) -> Result<Self, DefinitionError> {
        let mut defs = Definitions::default();
        for file in &yaml_files(dir)? {
            defs.insert(load_file_with(file, limits)?)?;
        }
        Ok(defs)
    }

    /// What `sagactl validate` checks: each path (a file, or a directory's
    /// `*.yaml` files) loaded exactly as [`Definitions::load_dir`] does, into
    /// one set (so a `name@version` defined twice is caught), carrying on
    /// after a bad file to report every error, not only the first.
    pub fn validate_paths(paths: &[PathBuf]) -> (Definitions, Vec<DefinitionError>) {
        let mut defs = Definitions::default();
        let mut errors = Vec::new();
        for path in paths {
            let files = if path.is_dir() {
                match yaml_files(path) {
                    Ok(files) => files,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                }
            } else {
                vec![path.clone()]
            };
            for file in files {
                if let Err(e) = load_file(&file).and_then(|d| defs.insert(d)) {
                    errors.push(e);
                }
            }
        }
        (defs, errors)
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
        if let Some(file) = &def.input_schema {
            let validator = compile_schema(file).map_err(|reason| DefinitionError::Invalid {
                path: def.source.clone(),
                line: 1,
                column: 1,
                reason,
            })?;
            self.schemas.insert(def.id(), Arc::new(validator));
        }
        versions.insert(def.version, Arc::new(def));
        Ok(())
    }

    /// Checks `input` against the definition's `input_schema`, if it has one.
    ///
    /// # Errors
    /// The first violation as `field.path: message` (`items[0].quantity: …`).
    pub fn check_input(&self, def: &SagaDefinition, input: &serde_json::Value) -> Result<(), String> {
        let Some(validator) = self.schemas.get(&def.id()) else {
            return Ok(());
        };
        match validator.iter_errors(input).next() {
            None => Ok(()),
            Some(e) => Err(format!("{}: {e}", field_path(e.instance_path().as_str()))),
        }
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

/// The definitions in force, replaced as a whole by [`Catalog::reload`] (on
/// SIGHUP): a reader always sees one complete, validated set. Running sagas
/// never look here again (they carry their definition's snapshot), so a
/// version removed by a reload still finishes the sagas that started on it.
#[derive(Debug, Clone)]
pub struct Catalog {
    dir: PathBuf,
    limits: Limits,
    current: Arc<RwLock<Arc<Definitions>>>,
}

impl Catalog {
    /// Loads `dir` (see [`Definitions::load_dir`]).
    ///
    /// # Errors
    /// As [`Definitions::load_dir`]: nothing starts with a bad directory.
    pub fn load(dir: &Path) -> Result<Self, DefinitionError> {
        Self::load_with(dir, Limits::default())
    }

    /// Loads `dir` within `limits`, which its reloads keep to as well.
    ///
    /// # Errors
    /// As [`Definitions::load_dir_with`].
    pub fn load_with(dir: &Path, limits: Limits) -> Result<Self, DefinitionError> {
        let defs = Definitions::load_dir_with(dir, &limits)?;
        Ok(Catalog {
            limits,
            ..Self::with(dir, defs)
        })
    }

    /// A catalog holding `defs` whose reloads read `dir` (with the default limits).
    pub fn with(dir: &Path, defs: Definitions) -> Self {
        Catalog {
            dir: dir.to_path_buf(),
            limits: Limits::default(),
            current: Arc::new(RwLock::new(Arc::new(defs))),
        }
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<Definitions> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the directory again; the new set replaces the old one only when
    /// every file in it is valid (and within the catalog's limits). Returns
    /// the ids added and removed.
    ///
    /// # Errors
    /// The first bad file (or an empty directory): the old set stays in force.
    pub fn reload(&self) -> Result<(Vec<String>, Vec<String>), DefinitionError> {
        let fresh = Definitions::load_dir_with(&self.dir, &self.limits)?;
        let old = self.current();
        let ids = |d: &Definitions| d.all().map(|x| x.id()).collect::<std::collections::BTreeSet<_>>();
        let (before, after) = (ids(&old), ids(&fresh));
        let added = after.difference(&before).cloned().collect();
        let removed = before.difference(&after).cloned().collect();
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(fresh),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(fresh),
        }
        Ok((added, removed))
    }
}

/// The `*.yaml` / `*.yml` files of `dir` (not recursive), sorted.
///
/// # Errors
/// An unreadable directory, or one without a definition file.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, DefinitionError> {
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
    if files.is_empty() {
        return Err(DefinitionError::Io {
            path: dir.to_path_buf(),
            reason: "no *.yaml saga definition found".into(),
        });
    }
    Ok(files)
}

/// Reads and compiles a JSON Schema file (drafts 4 to 2020-12, as the file's
/// `$schema` says).
fn compile_schema(file: &Path) -> Result<jsonschema::Validator, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("input_schema {}: {e}", file.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("input_schema {} is not JSON: {e}", file.display()))?;
    jsonschema::validator_for(&json)
        .map_err(|e| format!("input_schema {} is not a valid JSON Schema: {e}", file.display()))
}

/// `/items/0/quantity` → `items[0].quantity`; the root is `order`.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    if out.is_empty() {
        "order".into()
    } else {
        out
    }
}

/// Reads and validates one definition file (with the default [`Limits`]).
///
/// # Errors
/// Unreadable file or any validation failure, with line and column.
pub fn load_file(path: &Path) -> Result<SagaDefinition, DefinitionError> {
    load_file_with(path, &Limits::default())
}

/// [`load_file`] within `limits`. Reads at most [`MAX_FILE_BYTES`] + 1 bytes.
///
/// # Errors
/// As [`load_file`], and a file beyond `limits` or [`MAX_FILE_BYTES`].
pub fn load_file_with(path: &Path, limits: &Limits) -> Result<SagaDefinition, DefinitionError> {
    use std::io::Read;
    let io = |e: std::io::Error| DefinitionError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    check_file_size(path, &bytes)?;
    let text = String::from_utf8(bytes).map_err(|e| DefinitionError::Io {
        path: path.to_path_buf(),
        reason: format!("not UTF-8: {e}"),
    })?;
    parse_with(path, &text, limits)
}

/// A file over [`MAX_FILE_BYTES`] is refused at the line and column where it crosses the bound.
fn check_file_size(path: &Path, bytes: &[u8]) -> Result<(), DefinitionError> {
    if bytes.len() <= MAX_FILE_BYTES {
        return Ok(());
    }
    let head = &bytes[..MAX_FILE_BYTES];
    let line = head.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = head.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Err(DefinitionError::Invalid {
        path: path.to_path_buf(),
        line: line as u64,
        column: (MAX_FILE_BYTES - line_start + 1) as u64,
        reason: format!(
            "the file is larger than {} KiB, the most a definition may be",
            MAX_FILE_BYTES / 1024
        ),
    })
}

/// Parses and validates definition text; `path` names it in errors and
/// anchors `input_schema`. Uses the default [`Limits`].
///
/// # Errors
/// Syntax errors, unknown keys, missing keys, bad durations, bad names,
/// duplicate steps, missing compensations, out-of-range numbers, sizes
/// beyond the limits.
pub fn parse(path: &Path, text: &str) -> Result<SagaDefinition, DefinitionError> {
    parse_with(path, text, &Limits::default())
}

/// [`parse`] within `limits`.
///
/// # Errors
/// As [`parse`].
pub fn parse_with(path: &Path, text: &str, limits: &Limits) -> Result<SagaDefinition, DefinitionError> {
    check_file_size(path, text.as_bytes())?;
    // Tighter than the parser's defaults: a definition needs few nodes and
    // no alias storms (the file size bounds the text, not what aliases expand to).
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_aliases: 256,
            max_anchors: 256,
            max_nodes: 100_000,
            max_depth: 32,
            max_documents: 1,
            max_total_scalar_bytes: 4 * MAX_FILE_BYTES,
        },
    };
    let raw: RawDefinition = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let loc = e.location().unwrap_or(Location::UNKNOWN);
        let reason = e.without_snippet().to_string();
        // The rendered message may repeat the location; keep the first line, which says what.
        let reason = reason.lines().next().unwrap_or("invalid YAML").trim().to_string();
        DefinitionError::at(path, loc, reason)
    })?;
    validate(path, raw, limits)
}

fn validate(path: &Path, raw: RawDefinition, limits: &Limits) -> Result<SagaDefinition, DefinitionError> {
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
    // Flatten the list: a `parallel:` item becomes one group of several steps.
    let mut flat: Vec<(&Spanned<RawStep>, usize)> = Vec::new();
    // A `parallel:` item's `when:`, by the group's first step.
    let mut group_when: BTreeMap<usize, &Spanned<String>> = BTreeMap::new();
    for item in &raw.steps.value {
        match &item.value.parallel {
            Some(inner) => {
                let r = &item.value;
                let extra = r.name.is_some()
                    || r.participant.is_some()
                    || r.action.is_some()
                    || r.compensation.is_some()
                    || r.timeout.is_some()
                    || r.retry.is_some()
                    || r.on_failure.is_some()
                    || r.input.is_some()
                    || r.compensation_input.is_some()
                    || r.output_schema.is_some()
                    || r.await_signal.is_some()
                    || r.sleep.is_some();
                if extra {
                    return Err(DefinitionError::at(
                        path,
                        item.referenced,
                        "a `parallel:` item holds only the list of its steps",
                    ));
                }
                if inner.len() < 2 {
                    return Err(DefinitionError::at(
                        path,
                        item.referenced,
                        "`parallel:` needs at least two steps",
                    ));
                }
                if let Some(extra) = inner.get(limits.max_group_steps) {
                    return Err(DefinitionError::at(
                        path,
                        extra.referenced,
                        format!(
                            "`parallel:` holds at most {} steps (the coordinator's --max-group-steps)",
                            limits.max_group_steps
                        ),
                    ));
                }
                let group = flat.len();
                if let Some(w) = &r.when {
                    group_when.insert(group, w);
                }
                for s in inner {
                    if s.value.parallel.is_some() {
                        return Err(DefinitionError::at(
                            path,
                            s.referenced,
                            "`parallel:` groups cannot be nested",
                        ));
                    }
                    flat.push((s, group));
                }
            }
            None => flat.push((item, flat.len())),
        }
        if let Some((extra, _)) = flat.get(limits.max_steps) {
            return Err(DefinitionError::at(
                path,
                extra.referenced,
                format!(
                    "a definition holds at most {} steps (the coordinator's --max-steps); this is step {}",
                    limits.max_steps,
                    limits.max_steps + 1
                ),
            ));
        }
    }
    let names: Vec<Option<String>> = flat
        .iter()
        .map(|(s, _)| s.value.name.as_ref().map(|n| n.value.clone()))
        .collect();
    let mut steps: Vec<StepDefinition> = Vec::with_capacity(flat.len());
    for (index, (item, group)) in flat.iter().enumerate() {
        let step = &item.value;
        // Earlier groups' steps only: a condition is evaluated when its group starts.
        let earlier: Vec<&str> = flat
            .iter()
            .take_while(|(_, g)| g < group)
            .filter_map(|(s, _)| s.value.name.as_ref().map(|n| n.value.as_str()))
            .collect();
        let when_src = match (step.when.as_ref(), group_when.get(group)) {
            (Some(own), Some(_)) => {
                return Err(DefinitionError::at(
                    path,
                    own.referenced,
                    "a step of a `parallel:` group with a `when:` has none of its own",
                ))
            }
            (own, of_group) => own.or(of_group.copied()),
        };
        let when = match when_src {
            None => None,
            Some(w) => Some(
                crate::condition::Condition::parse(&w.value, &earlier)
                    .map_err(|e| DefinitionError::at(path, w.referenced, format!("when: {e}")))?,
            ),
        };
        let required = |v: &Option<Spanned<String>>, key: &str| {
            v.clone()
                .ok_or_else(|| DefinitionError::at(path, item.referenced, format!("step is missing `{key}`")))
        };
        let raw_name = required(&step.name, "name")?;
        let step_name = ident(path, &raw_name, "steps[].name")?;
        if steps.iter().any(|s| s.name == step_name) {
            return Err(DefinitionError::at(
                path,
                raw_name.referenced,
                format!("duplicate step name `{step_name}`"),
            ));
        }
        if step.await_signal.is_some() || step.sleep.is_some() {
            let mut wait = wait_step(path, item, step_name, *group)?;
            wait.when = when;
            if let (Some(signal), Some(raw)) = (wait.awaits(), &step.await_signal) {
                if let Some(other) = steps.iter().find(|s| s.awaits() == Some(signal)) {
                    return Err(DefinitionError::at(
                        path,
                        raw.referenced,
                        format!("signal `{signal}` is already awaited by step `{}`", other.name),
                    ));
                }
            }
            steps.push(wait);
            continue;
        }
        let participant = ident(path, &required(&step.participant, "participant")?, "participant")?;
        let action = ident(path, &required(&step.action, "action")?, "action")?;
        let compensation = match &step.compensation {
            None => {
                return Err(DefinitionError::at(
                    path,
                    raw_name.referenced,
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
        let on_failure = match step.on_failure.as_ref().map(|v| (v, v.value.as_str())) {
            None | Some((_, "compensate")) => OnFailure::Compensate,
            Some((_, "retry_forever")) => OnFailure::RetryForever,
            Some((_, "continue")) => OnFailure::Continue,
            Some((v, other)) => {
                return Err(DefinitionError::at(
                    path,
                    v.referenced,
                    format!("on_failure `{other}`: use compensate, retry_forever or continue"),
                ))
            }
        };
        if compensation.is_none() && step.compensation_input.is_some() {
            return Err(DefinitionError::at(
                path,
                raw_name.referenced,
                format!("step `{step_name}` has compensation_input but no compensation"),
            ));
        }
        // Forward input sees earlier groups; the compensation also its own step.
        let input = inputs(path, &step.input, &names, &flat, *group, None, "input")?;
        let compensation_input = inputs(
            path,
            &step.compensation_input,
            &names,
            &flat,
            *group,
            Some(index),
            "compensation_input",
        )?;
        let output_schema = match &step.output_schema {
            None => None,
            Some(raw) => Some(
                OutputSchema::new(raw.value.clone())
                    .map_err(|reason| DefinitionError::at(path, raw.referenced, reason))?,
            ),
        };
        steps.push(StepDefinition {
            name: step_name,
            participant,
            action,
            compensation,
            timeout,
            retry,
            group: Some(*group),
            on_failure,
            input,
            compensation_input,
            output_schema,
            kind: StepKind::Command,
            when,
        });
    }
    let deadline = match &raw.deadline {
        Some(d) => Some(wait_duration(path, d, "deadline")?),
        None => None,
    };
    let input_schema = match &raw.input_schema {
        None => None,
        Some(s) => {
            let base = path.parent().unwrap_or_else(|| Path::new("."));
            let schema = base.join(&s.value);
            compile_schema(&schema).map_err(|reason| DefinitionError::at(path, s.referenced, reason))?;
            Some(schema)
        }
    };
    let mut events = BTreeMap::new();
    if let Some(aliases) = &raw.events {
        for (event, subject) in &aliases.value {
            if EventKind::parse(event).is_none() {
                return Err(DefinitionError::at(
                    path,
                    subject.referenced,
                    format!(
                        "events: `{event}` is not a saga event; use one of {}",
                        EventKind::ALL.map(EventKind::as_str).join(", ")
                    ),
                ));
            }
            if !is_plain_subject(&subject.value) {
                return Err(DefinitionError::at(
                    path,
                    subject.referenced,
                    format!(
                        "events.{event}: `{}` is not a NATS subject (dot-separated tokens of letters, digits, \
                         `-` and `_`; no wildcards)",
                        subject.value
                    ),
                ));
            }
            if subject.value.starts_with("saga.") {
                return Err(DefinitionError::at(
                    path,
                    subject.referenced,
                    format!("events.{event}: `saga.` subjects are the engine's own; pick a business name"),
                ));
            }
            events.insert(event.clone(), subject.value.clone());
        }
    }
    Ok(SagaDefinition {
        name,
        version: raw.version.value,
        steps,
        input_schema,
        events,
        deadline,
        source: path.to_path_buf(),
    })
}

/// An `await:` or `sleep:` step: it sends nothing, so it takes none of a
/// command's keys; an await needs its `timeout` (a wait without an end would
/// hold the saga, and what it reserved, forever).
fn wait_step(
    path: &Path,
    item: &Spanned<RawStep>,
    name: String,
    group: usize,
) -> Result<StepDefinition, DefinitionError> {
    let step = &item.value;
    let what = if step.await_signal.is_some() {
        "await"
    } else {
        "sleep"
    };
    let at = |reason: String| DefinitionError::at(path, item.referenced, reason);
    if step.await_signal.is_some() && step.sleep.is_some() {
        return Err(at(format!(
            "step `{name}` both awaits and sleeps; make them two steps"
        )));
    }
    let command_keys = [
        ("participant", step.participant.is_some()),
        ("action", step.action.is_some()),
        ("compensation", step.compensation.is_some()),
        ("retry", step.retry.is_some()),
        ("input", step.input.is_some()),
        ("compensation_input", step.compensation_input.is_some()),
    ];
    let sleep_keys = [
        ("timeout", step.timeout.is_some()),
        ("on_failure", step.on_failure.is_some()),
        ("output_schema", step.output_schema.is_some()),
    ];
    let refused = command_keys
        .iter()
        .chain(sleep_keys.iter().filter(|_| step.sleep.is_some()))
        .find(|(_, given)| *given);
    if let Some((key, _)) = refused {
        return Err(at(format!(
            "`{what}` step `{name}` takes no `{key}` (it sends no command{})",
            if step.sleep.is_some() {
                " and cannot fail"
            } else {
                ""
            }
        )));
    }
    let no_retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    let (kind, timeout, on_failure) = match (&step.await_signal, &step.sleep) {
        (Some(signal), _) => {
            let signal = ident(path, signal, "await")?;
            let Some(t) = &step.timeout else {
                return Err(at(format!(
                    "`await` step `{name}` needs a `timeout` (how long to wait for `{signal}`, up to 30 days)"
                )));
            };
            let on_failure = match step.on_failure.as_ref().map(|v| (v, v.value.as_str())) {
                None | Some((_, "compensate")) => OnFailure::Compensate,
                Some((_, "continue")) => OnFailure::Continue,
                Some((v, other)) => {
                    return Err(DefinitionError::at(
                        path,
                        v.referenced,
                        format!("on_failure `{other}`: an await is not retried; use compensate or continue"),
                    ))
                }
            };
            (
                StepKind::Await { signal },
                wait_duration(path, t, "timeout")?,
                on_failure,
            )
        }
        (None, Some(d)) => {
            let duration = wait_duration(path, d, "sleep")?;
            (StepKind::Sleep { duration }, duration, OnFailure::Compensate)
        }
        (None, None) => return Err(at(format!("step `{name}` is neither an await nor a sleep"))),
    };
    let output_schema = match &step.output_schema {
        None => None,
        Some(raw) => Some(
            OutputSchema::new(raw.value.clone())
                .map_err(|reason| DefinitionError::at(path, raw.referenced, reason))?,
        ),
    };
    Ok(StepDefinition {
        name,
        participant: String::new(),
        action: String::new(),
        compensation: None,
        timeout,
        retry: no_retry,
        group: Some(group),
        on_failure,
        input: BTreeMap::new(),
        compensation_input: BTreeMap::new(),
        output_schema,
        kind,
        when: None,
    })
}

/// A wait (await timeout, sleep, deadline): > 0 and ≤ [`MAX_WAIT`].
fn wait_duration(path: &Path, value: &Spanned<String>, what: &str) -> Result<Duration, DefinitionError> {
    let d = duration(path, value, what)?;
    if d.is_zero() || d > MAX_WAIT {
        return Err(DefinitionError::at(
            path,
            value.referenced,
            format!("{what} must be > 0 and ≤ 30 days"),
        ));
    }
    Ok(d)
}

/// A saga event: the kind of a history entry, which a definition may alias
/// (`events:`). Stored and published as its snake_case name (the names
/// earlier versions wrote as strings), so one list serves the engine, the
/// stores and the definitions' validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// `created`.
    Created,
    /// `started`.
    Started,
    /// `step_succeeded`.
    StepSucceeded,
    /// `step_retry`.
    StepRetry,
    /// `step_rejected`.
    StepRejected,
    /// `step_unknown`.
    StepUnknown,
    /// `step_failed`.
    StepFailed,
    /// `compensating`.
    Compensating,
    /// `compensation_succeeded`.
    CompensationSucceeded,
    /// `compensation_retry`.
    CompensationRetry,
    /// `compensation_failed`.
    CompensationFailed,
    /// `completed`.
    Completed,
    /// `compensated`.
    Compensated,
    /// `failed`.
    Failed,
    /// `aborted`.
    Aborted,
    /// `retried`.
    Retried,
    /// `step_waiting`: an await step began waiting for its signal.
    StepWaiting,
    /// `step_sleeping`: a sleep step began.
    StepSleeping,
    /// `step_skipped`: a step's `when:` was false.
    StepSkipped,
    /// `signal_received`: a signal came before its step waits, and is kept.
    SignalReceived,
    /// `deadline_passed`: the saga's deadline passed while it ran.
    DeadlinePassed,
}

impl EventKind {
    /// Every saga event.
    pub const ALL: [EventKind; 21] = [
        EventKind::Created,
        EventKind::Started,
        EventKind::StepSucceeded,
        EventKind::StepRetry,
        EventKind::StepRejected,
        EventKind::StepUnknown,
        EventKind::StepFailed,
        EventKind::Compensating,
        EventKind::CompensationSucceeded,
        EventKind::CompensationRetry,
        EventKind::CompensationFailed,
        EventKind::Completed,
        EventKind::Compensated,
        EventKind::Failed,
        EventKind::Aborted,
        EventKind::Retried,
        EventKind::StepWaiting,
        EventKind::StepSleeping,
        EventKind::StepSkipped,
        EventKind::SignalReceived,
        EventKind::DeadlinePassed,
    ];

    /// The event's name, as stored, published and written in definitions.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Started => "started",
            EventKind::StepSucceeded => "step_succeeded",
            EventKind::StepRetry => "step_retry",
            EventKind::StepRejected => "step_rejected",
            EventKind::StepUnknown => "step_unknown",
            EventKind::StepFailed => "step_failed",
            EventKind::Compensating => "compensating",
            EventKind::CompensationSucceeded => "compensation_succeeded",
            EventKind::CompensationRetry => "compensation_retry",
            EventKind::CompensationFailed => "compensation_failed",
            EventKind::Completed => "completed",
            EventKind::Compensated => "compensated",
            EventKind::Failed => "failed",
            EventKind::Aborted => "aborted",
            EventKind::Retried => "retried",
            EventKind::StepWaiting => "step_waiting",
            EventKind::StepSleeping => "step_sleeping",
            EventKind::StepSkipped => "step_skipped",
            EventKind::SignalReceived => "signal_received",
            EventKind::DeadlinePassed => "deadline_passed",
        }
    }

    /// The event named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A literal NATS subject: dot-separated non-empty tokens of ASCII letters,
/// digits, `-` and `_`, at most 200 characters.
fn is_plain_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// Parses and checks one step's `input` or `compensation_input` map: each
/// reference must name a step of an earlier group (or, for a compensation,
/// the step itself), so it has run before the command that uses it.
fn inputs(
    path: &Path,
    raw: &Option<BTreeMap<String, Spanned<String>>>,
    names: &[Option<String>],
    flat: &[(&Spanned<RawStep>, usize)],
    group: usize,
    own: Option<usize>,
    what: &str,
) -> Result<BTreeMap<String, InputValue>, DefinitionError> {
    let mut out = BTreeMap::new();
    let Some(raw) = raw else { return Ok(out) };
    if let Some((key, value)) = raw.iter().nth(MAX_INPUT_ENTRIES) {
        return Err(DefinitionError::at(
            path,
            value.referenced,
            format!("{what}.{key}: {what} holds at most {MAX_INPUT_ENTRIES} entries"),
        ));
    }
    for (key, value) in raw {
        let at =
            |reason: String| DefinitionError::at(path, value.referenced, format!("{what}.{key}: {reason}"));
        let text = value.value.as_str();
        if key.len() > MAX_INPUT_KEY_BYTES {
            let shown: String = key.chars().take(MAX_INPUT_KEY_BYTES).collect();
            return Err(DefinitionError::at(
                path,
                value.referenced,
                format!("{what}.{shown}…: a key is at most {MAX_INPUT_KEY_BYTES} bytes"),
            ));
        }
        if text.len() > MAX_INPUT_VALUE_BYTES {
            return Err(at(format!("a value is at most {MAX_INPUT_VALUE_BYTES} bytes")));
        }
        let Some(inner) = text.strip_prefix("${").and_then(|t| t.strip_suffix('}')) else {
            if text.contains("${") {
                return Err(at(format!(
                    "`{text}`: a reference must be the whole value, e.g. `${{steps.charge-payment.output.charge_id}}`"
                )));
            }
            out.insert(
                key.clone(),
                InputValue::Literal {
                    value: text.to_string(),
                },
            );
            continue;
        };
        let parts: Vec<&str> = inner.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(at(format!("`{text}` has an empty path segment")));
        }
        let parsed = match parts.as_slice() {
            ["order", rest @ ..] => InputValue::Order {
                path: rest.iter().map(|p| p.to_string()).collect(),
            },
            ["steps", step, "output", rest @ ..] => {
                let Some(k) = names.iter().position(|n| n.as_deref() == Some(*step)) else {
                    return Err(at(format!("`{text}` names no step `{step}`")));
                };
                let ran_before = flat[k].1 < group || own == Some(k);
                if !ran_before {
                    return Err(at(format!(
                        "`{text}`: step `{step}` has not run before this {} (it must be in an earlier group)",
                        if own.is_some() { "compensation" } else { "step" }
                    )));
                }
                InputValue::StepOutput {
                    step: k,
                    path: rest.iter().map(|p| p.to_string()).collect(),
                }
            }
            _ => {
                return Err(at(format!(
                "`{text}` is not a reference: use `${{order.<field>}}` or `${{steps.<step>.output.<key>}}`"
            )))
            }
        };
        out.insert(key.clone(), parsed);
    }
    Ok(out)
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
    steps: Spanned<Vec<Spanned<RawStep>>>,
    #[serde(default)]
    events: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    #[serde(default)]
    deadline: Option<Spanned<String>>,
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

/// A step, or (with `parallel:` and nothing else) a group of steps run at once.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    participant: Option<Spanned<String>>,
    #[serde(default)]
    action: Option<Spanned<String>>,
    #[serde(default)]
    compensation: Option<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    on_failure: Option<Spanned<String>>,
    #[serde(default)]
    input: Option<BTreeMap<String, Spanned<String>>>,
    #[serde(default)]
    compensation_input: Option<BTreeMap<String, Spanned<String>>>,
    #[serde(default)]
    output_schema: Option<Spanned<serde_json::Value>>,
    #[serde(default)]
    parallel: Option<Vec<Spanned<RawStep>>>,
    #[serde(default, rename = "await")]
    await_signal: Option<Spanned<String>>,
    #[serde(default)]
    when: Option<Spanned<String>>,
    #[serde(default)]
    sleep: Option<Spanned<String>>,
}

mod opt_duration_ms {
    //! Optional durations stored as whole milliseconds.
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
    }
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

    const GROUPED: &str = r#"name: shipped
version: 1
steps:
  - parallel:
      - name: reserve
        participant: inventory
        action: reserve
        compensation: release
        compensation_input:
          reservation_id: "${steps.reserve.output.reservation_id}"
      - name: charge
        participant: payment
        action: charge
        compensation: refund
        on_failure: retry_forever
  - name: ship
    participant: shipping
    action: create-shipment
    compensation: cancel-shipment
    on_failure: continue
    input:
      reservation_id: "${steps.reserve.output.reservation_id}"
      customer: "${order.customer_id}"
      note: fragile
"#;

    #[test]
    fn parallel_groups_outputs_and_on_failure_load() {
        let d = parse(Path::new("shipped.yaml"), GROUPED).expect("valid");
        assert_eq!(d.steps.len(), 3);
        assert_eq!(d.groups(), vec![0..2, 2..3]);
        assert_eq!((d.group_of(0), d.group_of(1), d.group_of(2)), (0, 0, 2));
        assert_eq!(d.next_group(0), Some(2));
        assert_eq!(d.next_group(2), None);
        assert_eq!(d.steps[1].on_failure, OnFailure::RetryForever);
        assert_eq!(d.steps[2].on_failure, OnFailure::Continue);
        assert_eq!(d.steps[0].on_failure, OnFailure::Compensate);
        assert_eq!(
            d.steps[2].input.get("reservation_id"),
            Some(&InputValue::StepOutput {
                step: 0,
                path: vec!["reservation_id".into()]
            })
        );
        assert_eq!(
            d.steps[2].input.get("customer"),
            Some(&InputValue::Order {
                path: vec!["customer_id".into()]
            })
        );
        assert_eq!(
            d.steps[2].input.get("note"),
            Some(&InputValue::Literal {
                value: "fragile".into()
            })
        );
        // A compensation may use its own step's output.
        assert!(matches!(
            d.steps[0].compensation_input.get("reservation_id"),
            Some(InputValue::StepOutput { step: 0, .. })
        ));
    }

    #[test]
    fn bad_references_and_groups_are_refused_with_their_line() {
        let bad = |from: &str, to: &str| {
            let text = GROUPED.replace(from, to);
            assert_ne!(text, GROUPED, "replacement {from:?} did not apply");
            err(&text)
        };
        // A step that does not exist.
        let e = bad(
            "${steps.reserve.output.reservation_id}\"\n      customer",
            "${steps.nope.output.x}\"\n      customer",
        );
        assert!(e.reason().contains("names no step `nope`"), "{e}");
        assert_eq!(line_of(&e), 22, "{e}");
        // A sibling in the same parallel group has not run before.
        let e = bad(
            "        on_failure: retry_forever",
            "        on_failure: retry_forever\n        input:\n          r: \"${steps.reserve.output.reservation_id}\"",
        );
        assert!(e.reason().contains("has not run before"), "{e}");
        // A later step, from a compensation.
        let e = bad(
            "reservation_id: \"${steps.reserve.output.reservation_id}\"\n      - name: charge",
            "reservation_id: \"${steps.ship.output.x}\"\n      - name: charge",
        );
        assert!(e.reason().contains("has not run before"), "{e}");
        // Not a reference, and a reference inside text.
        assert!(bad("\"${order.customer_id}\"", "\"${customer}\"")
            .reason()
            .contains("not a reference"));
        assert!(bad("\"${order.customer_id}\"", "\"id ${order.customer_id}\"")
            .reason()
            .contains("whole value"));
        assert!(bad("on_failure: continue", "on_failure: sometimes")
            .reason()
            .contains("on_failure"));
        // Groups: a lone step, a nested group, a group with other keys.
        let lone = "name: g\nversion: 1\nsteps:\n  - parallel:\n      - name: a\n        participant: p\n        action: x\n        compensation: none\n";
        assert!(err(lone).reason().contains("at least two steps"));
        let nested = "name: g\nversion: 1\nsteps:\n  - parallel:\n      - parallel: []\n      - name: a\n        participant: p\n        action: x\n        compensation: none\n";
        assert!(err(nested).reason().contains("cannot be nested"));
        let mixed = GROUPED.replace("  - parallel:\n", "  - name: oops\n    parallel:\n");
        assert!(err(&mixed).reason().contains("only the list"));
        let missing = GROUPED.replace("        participant: payment\n", "");
        assert!(err(&missing).reason().contains("missing `participant`"));
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
    fn input_schemas_are_loaded_checked_and_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("schemas")).expect("mkdir");
        let schema = r#"{"type":"object","properties":{"items":{"type":"array","items":{"type":"object",
            "properties":{"quantity":{"type":"integer","maximum":10}}}}}}"#;
        std::fs::write(dir.path().join("schemas/o.json"), schema).expect("write");
        let yaml = ORDER.replace("version: 1\n", "version: 1\ninput_schema: schemas/o.json\n");
        std::fs::write(dir.path().join("order.yaml"), &yaml).expect("write");
        let defs = Definitions::load_dir(dir.path()).expect("loads");
        let def = defs.get("order", None).expect("order");
        assert!(defs
            .check_input(&def, &serde_json::json!({"items": [{"quantity": 3}]}))
            .is_ok());
        let e = defs
            .check_input(&def, &serde_json::json!({"items": [{"quantity": 30}]}))
            .expect_err("max");
        assert!(e.starts_with("items[0].quantity: "), "{e}");
        // A schema that is not JSON, or not a schema, is refused at load with the line of the key.
        std::fs::write(dir.path().join("schemas/o.json"), "{nope").expect("write");
        let e = Definitions::load_dir(dir.path()).expect_err("bad json");
        assert_eq!(line_of(&e), 3, "{e}");
        std::fs::write(dir.path().join("schemas/o.json"), r#"{"type": 12}"#).expect("write");
        let e = Definitions::load_dir(dir.path()).expect_err("bad schema");
        assert!(e.reason().contains("not a valid JSON Schema"), "{e}");
        assert_eq!(field_path(""), "order");
        assert_eq!(field_path("/a~1b/3/c"), "a/b[3].c");
    }

    /// A definition of `n` sequential steps, each 5 lines after the 3-line header.
    fn steps_yaml(n: usize) -> String {
        let mut y = String::from("name: long\nversion: 1\nsteps:\n");
        for i in 0..n {
            y.push_str(&format!(
                "  - name: s{i}\n    participant: p\n    action: a\n    compensation: none\n    timeout: 1s\n"
            ));
        }
        y
    }

    fn invalid_at(e: &DefinitionError) -> (u64, u64) {
        match e {
            DefinitionError::Invalid { line, column, .. } => (*line, *column),
            DefinitionError::Io { .. } => (0, 0),
        }
    }

    #[test]
    fn at_most_max_steps_steps_load_and_the_next_one_is_refused_at_its_line() {
        assert_eq!(
            parse(Path::new("ok.yaml"), &steps_yaml(100))
                .expect("100 steps")
                .steps
                .len(),
            100
        );
        let e = err(&steps_yaml(101));
        // Step 101 (index 100) starts at line 4 + 100 * 5.
        assert_eq!(invalid_at(&e), (504, 5), "{e}");
        assert!(
            e.reason().contains("at most 100 steps") && e.reason().contains("--max-steps"),
            "{e}"
        );
        // The bound is the caller's: a coordinator started with --max-steps 10.
        let small = Limits {
            max_steps: 10,
            ..Limits::default()
        };
        let e = parse_with(Path::new("bad.yaml"), &steps_yaml(11), &small).expect_err("11 > 10");
        assert_eq!(line_of(&e), 54, "{e}");
        assert!(parse_with(Path::new("ok.yaml"), &steps_yaml(10), &small).is_ok());
        // Ten thousand steps: refused (by the file size first), never loaded.
        assert!(matches!(
            err(&steps_yaml(10_000)),
            DefinitionError::Invalid { .. }
        ));
    }

    #[test]
    fn a_parallel_group_holds_at_most_max_group_steps() {
        let group = |n: usize| {
            let mut y = String::from("name: wide\nversion: 1\nsteps:\n  - parallel:\n");
            for i in 0..n {
                y.push_str(&format!(
                    "      - name: s{i}\n        participant: p\n        action: a\n        compensation: none\n"
                ));
            }
            y
        };
        assert!(parse(Path::new("ok.yaml"), &group(16)).is_ok());
        let e = err(&group(17));
        // The 17th step of the group starts at line 5 + 16 * 4.
        assert_eq!(invalid_at(&e), (69, 9), "{e}");
        assert!(e.reason().contains("at most 16 steps"), "{e}");
    }

    #[test]
    fn a_file_over_the_size_bound_is_refused_where_it_crosses_it() {
        let mut big = ORDER.to_string();
        let filler = format!("# {}\n", "x".repeat(97)); // 100 bytes a line
        while big.len() <= MAX_FILE_BYTES {
            big.push_str(&filler);
        }
        let e = err(&big);
        assert!(e.reason().contains("larger than 256 KiB"), "{e}");
        let (line, column) = invalid_at(&e);
        let head = &big[..MAX_FILE_BYTES];
        assert_eq!(line as usize, head.lines().count(), "{e}");
        assert!((1..=100).contains(&column), "{e}");
        // Read from disk the same way, without reading the whole file.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("big.yaml"), &big).expect("write");
        let e = load_file(&dir.path().join("big.yaml")).expect_err("too big");
        assert_eq!(invalid_at(&e), (line, column), "{e}");
    }

    #[test]
    fn input_maps_are_bounded() {
        let with_input = |entries: &str| {
            ORDER.replace(
                "    compensation: refund\n",
                &format!("    compensation: refund\n    input:\n{entries}"),
            )
        };
        let many: String = (0..33).map(|i| format!("      k{i:02}: v\n")).collect();
        let e = err(&with_input(&many));
        assert!(e.reason().contains("at most 32 entries"), "{e}");
        assert!(line_of(&e) > 15, "{e}");
        let e = err(&with_input(&format!("      {}: v\n", "k".repeat(65))));
        assert!(e.reason().contains("a key is at most 64 bytes"), "{e}");
        assert_eq!(line_of(&e), 16, "{e}");
        let e = err(&with_input(&format!("      k: {}\n", "v".repeat(1025))));
        assert!(e.reason().contains("a value is at most 1024 bytes"), "{e}");
        assert_eq!(line_of(&e), 16, "{e}");
        assert!(parse(
            Path::new("ok.yaml"),
            &with_input(&format!("      k: {}\n", "v".repeat(1024)))
        )
        .is_ok());
    }

    #[test]
    fn yaml_alias_storms_are_refused_before_they_expand() {
        // Nested `parallel:` is refused only after parsing: aliases must not
        // expand 8^9 steps first.
        let mut y = String::from(
            "name: a\nversion: 1\nsteps:\n  - &s0 {name: a, participant: p, action: x, compensation: none}\n",
        );
        for i in 1..10 {
            let refs = vec![format!("*s{}", i - 1); 8].join(", ");
            y.push_str(&format!("  - &s{i} {{parallel: [{refs}]}}\n"));
        }
        let started = std::time::Instant::now();
        let e = err(&y);
        assert!(matches!(e, DefinitionError::Invalid { .. }), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{e}");
        assert!(
            e.reason().contains("budget") || e.reason().contains("alias"),
            "{e}"
        );
    }

    #[test]
    fn reload_keeps_to_the_catalog_limits_and_keeps_the_old_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("long.yaml"), steps_yaml(5)).expect("write");
        let limits = Limits {
            max_steps: 5,
            ..Limits::default()
        };
        let catalog = Catalog::load_with(dir.path(), limits).expect("5 steps load");
        std::fs::write(dir.path().join("long.yaml"), steps_yaml(6)).expect("write");
        let e = catalog.reload().expect_err("6 > 5");
        assert_eq!(line_of(&e), 29, "{e}");
        assert_eq!(
            catalog.current().get("long", None).map(|d| d.steps.len()),
            Some(5)
        );
        assert!(Catalog::load_with(dir.path(), limits).is_err());
    }

    const WITH_OUTPUT_SCHEMA: &str = r#"name: order
version: 1
steps:
  - name: reserve-inventory
    participant: inventory
    action: reserve
    compensation: release
    output_schema:
      type: object
      required: [reservation_id]
      additionalProperties: false
      properties:
        reservation_id: { type: string, maxLength: 64, pattern: "^res_" }
"#;

    #[test]
    fn output_schemas_are_compiled_at_load_and_checked() {
        let d = parse(Path::new("o.yaml"), WITH_OUTPUT_SCHEMA).expect("valid");
        let schema = d.steps[0].output_schema.as_ref().expect("declared");
        assert_eq!(schema.json()["required"], serde_json::json!(["reservation_id"]));
        assert!(d
            .check_output(0, &serde_json::json!({"reservation_id": "res_1"}))
            .is_ok());
        let e = d
            .check_output(0, &serde_json::json!({"reservation_id": "x".repeat(900_000)}))
            .expect_err("too long");
        assert!(e.starts_with("output.reservation_id: "), "{e}");
        assert!(e.len() < 400, "the reason is kept short: {} bytes", e.len());
        assert!(d.check_output(0, &serde_json::json!({})).is_err());
        assert!(d
            .check_output(0, &serde_json::json!({"reservation_id": "res_1", "x": 1}))
            .is_err());
        assert!(d.check_output(0, &serde_json::Value::Null).is_err());
        // A step without a schema takes any output.
        assert!(parse(Path::new("order.yaml"), ORDER)
            .expect("valid")
            .check_output(0, &serde_json::json!([1, 2]))
            .is_ok());
        // The snapshot round trip keeps the schema, compiled again on first use.
        let json = serde_json::to_string(&d).expect("serialises");
        let back: SagaDefinition = serde_json::from_str(&json).expect("deserialises");
        assert_eq!(back, d);
        assert!(back.check_output(0, &serde_json::json!({})).is_err());
        // A snapshot written before output schemas has none.
        let old: StepDefinition = serde_json::from_value(serde_json::json!({
            "name": "a", "participant": "p", "action": "x", "compensation": null,
            "timeout": 1000, "retry": RetryPolicy::default()
        }))
        .expect("old snapshot");
        assert_eq!(old.output_schema, None);
    }

    #[test]
    fn bad_output_schemas_are_refused_with_their_line() {
        let e = err(&WITH_OUTPUT_SCHEMA.replace("type: object", "type: 12"));
        assert!(e.reason().contains("not a valid JSON Schema"), "{e}");
        assert_eq!(line_of(&e), 9, "{e}");
        // Remote and file references are refused, never fetched or read.
        for r in [
            "https://example.invalid/s.json",
            "file:///etc/passwd",
            "other.json#/x",
        ] {
            let e = err(&WITH_OUTPUT_SCHEMA.replace(
                "reservation_id: { type: string",
                &format!("reservation_id: {{ $ref: \"{r}\", type: string"),
            ));
            assert!(e.reason().contains("only local references"), "{r}: {e}");
            assert_eq!(line_of(&e), 9, "{e}");
        }
        // A local reference is fine.
        let local = WITH_OUTPUT_SCHEMA.replace(
            "      properties:\n        reservation_id: { type: string, maxLength: 64, pattern: \"^res_\" }\n",
            "      properties:\n        reservation_id: { $ref: \"#/$defs/id\" }\n      $defs:\n        id: { type: string, maxLength: 64 }\n",
        );
        assert_ne!(local, WITH_OUTPUT_SCHEMA);
        let d = parse(Path::new("o.yaml"), &local).expect("local $ref");
        assert!(d
            .check_output(0, &serde_json::json!({"reservation_id": "x".repeat(65)}))
            .is_err());
        // Bounded in size.
        let big = WITH_OUTPUT_SCHEMA.replace(
            "pattern: \"^res_\"",
            &format!("description: \"{}\"", "d".repeat(17_000)),
        );
        let e = err(&big);
        assert!(e.reason().contains("at most 16384"), "{e}");
        // Not on a `parallel:` item itself.
        let e = err("name: g\nversion: 1\nsteps:\n  - output_schema: {}\n    parallel:\n      - {name: a, participant: p, action: x, compensation: none}\n      - {name: b, participant: p, action: x, compensation: none}\n");
        assert!(e.reason().contains("only the list"), "{e}");
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
