//! `when:` conditions of saga steps: CEL expressions (Common Expression
//! Language), parsed and evaluated by the `cel` crate, never by a parser of
//! our own.
//!
//! A condition is checked once, when its definition loads: its size, its
//! syntax, the names it reads (`order` and its five fields, `steps` and the
//! steps that run before its own), the functions it calls and how deep it
//! nests. Evaluation then only reads the order and the earlier outputs it is
//! given: no I/O and no clock here (the crate's `chrono` feature is off, so
//! CEL has no `timestamp`, `duration` or `now` to read one with).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::{Arc, OnceLock},
};

use cel::{
    common::ast::{operators, CallExpr, ComprehensionExpr, EntryExpr, Expr, LiteralValue},
    objects::{Key, Map},
    parser::{ParseErrors, Parser},
    Context, Env, ExecutionError, IdedExpr, Value,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most bytes of one `when:` expression.
pub const MAX_CONDITION_BYTES: usize = 1024;

/// Deepest nesting of brackets (`(`, `[`, `{`) in a condition, and of
/// expressions as the parser counts them; real conditions nest a handful of
/// levels. The crate's generated parser recurses through several rules a
/// level: about 10 KiB of stack a level optimised, 250 KiB unoptimised (where
/// 15 levels overflowed a 2 MiB thread; the workspace builds `cel` at
/// opt-level 1 in dev for that).
const MAX_NESTING: u16 = 32;

/// Stack of the thread that parses, whatever the caller has left: twice what
/// even an unoptimised parser needs at [`MAX_NESTING`] (under 8 MiB).
const PARSE_STACK_BYTES: usize = 16 * 1024 * 1024;

/// Deepest parsed tree (operators and selections count too), which our walk
/// and the evaluator recurse through on the caller's stack: the evaluator
/// takes about 2 KiB a level optimised, so 128 KiB at this bound.
const MAX_TREE_DEPTH: u16 = 64;

/// Most comprehensions (`exists`, `all`, `map`, ...) nested in one another.
/// Each multiplies the work by the size of what it ranges over: two allow
/// "every item against an output's list", three over lists of 100,000 would
/// be 10^15 steps. This caps the worst case, it does not budget it: the crate
/// has no evaluation cost limit, and `in` on a list is a loop too, so two
/// loops over a large output are still slow.
const MAX_LOOP_NESTING: u8 = 2;

/// Deepest JSON (order or step output) turned into CEL values: serde_json's
/// own recursion limit when it parses text, so nothing read from the wire is
/// refused, and a bound on the conversion's recursion for values built otherwise.
const MAX_JSON_DEPTH: usize = 128;

/// The fields of the order payload a condition may read as `order.<field>`.
const ORDER_FIELDS: [&str; 5] = ["order_id", "customer_id", "items", "amount_cents", "currency"];

/// A step's `when:` condition: a checked CEL expression that decides whether
/// the step runs.
///
/// Two conditions are equal when their sources are; serialized, a condition
/// is its source string.
#[derive(Clone)]
pub struct Condition {
    source: String,
    /// Parsed once; shared so that cloning a definition does not copy trees.
    expr: Arc<IdedExpr>,
    /// The step keys the expression reads, as written (`charge_payment` for
    /// `steps.charge_payment`), with the step each names when that was
    /// checked: evaluation gives `steps` these and no others.
    reads: Arc<[(String, Option<String>)]>,
}

/// Why a condition was refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ConditionError {
    /// Names the offending identifier, step or function, or gives the parser's message.
    pub reason: String,
}

impl ConditionError {
    fn new(reason: impl Into<String>) -> Self {
        ConditionError {
            reason: reason.into(),
        }
    }
}

impl Condition {
    /// Parses and checks `source` at load time. `earlier_steps` are the names
    /// of the steps that run before the step carrying the condition (the only
    /// ones whose outputs it may read).
    ///
    /// In the expression, `steps.<name>` and `steps["<name>"]` read an earlier
    /// step; a name with `-` may also be written with `_`
    /// (`steps.charge_payment` for `charge-payment`). Where a step's own name
    /// is another step's `_` spelling, the step that has that name is meant.
    ///
    /// # Errors
    ///
    /// [`ConditionError`] when `source` is empty or longer than
    /// [`MAX_CONDITION_BYTES`], is not valid CEL (with the parser's line and
    /// column), nests too deep, reads a name other than `order` and `steps`,
    /// a field `order` does not have, or a step not in `earlier_steps`, or
    /// calls a function CEL does not have.
    pub fn parse(source: &str, earlier_steps: &[&str]) -> Result<Condition, ConditionError> {
        Self::compile(source, Some(earlier_steps))
    }

    /// Evaluates the condition against `order` (the JSON of the order payload:
    /// `order_id`, `customer_id`, `items[{sku, quantity}]`, `amount_cents`,
    /// `currency`) and `outputs` (step name → output JSON; a step that gave no
    /// output is absent).
    ///
    /// The same order and outputs give the same answer, but for what CEL
    /// leaves open: the order a map's keys are iterated in (the crate's maps
    /// are hash maps), so a list made from a map (`m.map(k, k)`) may come out
    /// in any order. `exists`, `all`, `in`, `size` and `==` do not depend on it.
    ///
    /// # Errors
    ///
    /// The evaluator's message when evaluation fails (a missing key, a type
    /// mismatch), and "the condition yields `<type>`, not a bool" when the
    /// expression yields anything but a bool.
    pub fn eval(
        &self,
        order: &serde_json::Value,
        outputs: &BTreeMap<String, serde_json::Value>,
    ) -> Result<bool, String> {
        let mut steps = HashMap::new();
        for (key, step) in self.reads.iter() {
            let output = match step {
                Some(step) => outputs.get(step),
                None => lookup_output(outputs, key),
            };
            if let Some(output) = output {
                let entry = HashMap::from([(Key::from("output"), json_to_cel(output, 0)?)]);
                steps.insert(Key::from(key.as_str()), map_value(entry));
            }
        }
        let mut context = Context::with_env(env());
        context.add_variable_as_val("order", to_val(json_to_cel(order, 0)?)?);
        context.add_variable_as_val("steps", to_val(map_value(steps))?);
        match context.resolve(&self.expr) {
            Ok(Value::Bool(answer)) => Ok(answer),
            Ok(other) => Err(format!("the condition yields {}, not a bool", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The expression as written in the definition.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Parses and checks `source`; with `earlier_steps` of `None` (a
    /// condition deserialized from what a checked one serialized to) any step
    /// name is accepted, everything else is checked as at load.
    fn compile(source: &str, earlier_steps: Option<&[&str]>) -> Result<Condition, ConditionError> {
        if source.trim().is_empty() {
            return Err(ConditionError::new("the condition is empty"));
        }
        if source.len() > MAX_CONDITION_BYTES {
            return Err(ConditionError::new(format!(
                "the condition is {} bytes long; at most {MAX_CONDITION_BYTES} are allowed",
                source.len()
            )));
        }
        let nesting = bracket_nesting(source);
        if nesting > usize::from(MAX_NESTING) {
            return Err(ConditionError::new(format!(
                "the condition nests brackets {nesting} deep; at most {MAX_NESTING} are allowed"
            )));
        }
        let expr = parse_on_own_stack(source)?;
        let mut check = Check {
            earlier_steps,
            reads: BTreeMap::new(),
            functions: BTreeSet::new(),
            loops: 0,
        };
        check.expr(&expr, &mut Vec::new(), 0)?;
        for (name, member) in &check.functions {
            if !function_exists(name, *member) {
                return Err(ConditionError::new(format!(
                    "unknown function `{name}`: CEL's standard library has no such {}",
                    if *member { "method" } else { "function" }
                )));
            }
        }
        Ok(Condition {
            source: source.to_string(),
            expr: Arc::new(expr),
            reads: check.reads.into_iter().collect(),
        })
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Condition {}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

/// Re-parses the source with every check but the step names: those were
/// checked against the definition when the condition was first parsed, and
/// the earlier steps are not known here.
impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Condition::compile(&source, None).map_err(serde::de::Error::custom)
    }
}

/// The standard library, built once: it registers a few hundred overloads.
fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    Arc::clone(ENV.get_or_init(|| Arc::new(Env::stdlib())))
}

/// How deep `(`, `[` and `{` nest in `source`. Brackets inside string
/// literals count too: telling them apart would take a CEL lexer, and a
/// string needs 32 unclosed brackets in a row to be refused for them.
fn bracket_nesting(source: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for b in source.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Parses `source` on a thread of its own with a stack of
/// [`PARSE_STACK_BYTES`], so that the parser's deep recursion cannot overflow
/// the caller's (a tokio worker has 2 MiB). A panic in the parser is an error
/// too, not the caller's panic.
fn parse_on_own_stack(source: &str) -> Result<IdedExpr, ConditionError> {
    std::thread::scope(|scope| {
        let parser = std::thread::Builder::new()
            .name("cel-parse".into())
            .stack_size(PARSE_STACK_BYTES)
            // `Parser::new` has CEL's standard macros (`has`, `exists`, ...) and
            // no optional syntax (`a.?b`), which the checks here do not follow.
            .spawn_scoped(scope, || {
                Parser::new()
                    .max_recursion_depth(MAX_NESTING)
                    .parse(source)
                    .map_err(|e| parse_reason(&e))
            })
            .map_err(|e| ConditionError::new(format!("cannot start the CEL parser: {e}")))?;
        match parser.join() {
            Ok(parsed) => parsed.map_err(ConditionError::new),
            Err(_) => Err(ConditionError::new("the CEL parser failed on this condition")),
        }
    })
}

/// The parser's errors as one line each, with their line and column in the
/// expression (the crate's own rendering adds a caret drawing over two lines).
fn parse_reason(errors: &ParseErrors) -> String {
    let mut out = Vec::new();
    for e in &errors.errors {
        let (line, column) = e.pos;
        // The crate words its recursion limit as a debug dump of an inner error.
        if e.msg.contains("Recursion limit of") {
            out.push(format!(
                "the condition nests deeper than {MAX_NESTING} expressions"
            ));
        } else if line > 0 {
            out.push(format!("line {line}, column {column}: {}", e.msg));
        } else {
            out.push(e.msg.clone());
        }
    }
    if out.is_empty() {
        "invalid CEL".to_string()
    } else {
        format!("invalid CEL: {}", out.join("; "))
    }
}

/// The load-time walk over the parsed expression.
struct Check<'a> {
    /// `None`: any step name is accepted (see [`Condition::compile`]).
    earlier_steps: Option<&'a [&'a str]>,
    /// Step keys read, as written, and the step each names (`None` unchecked).
    reads: BTreeMap<String, Option<String>>,
    /// Functions called by name, and whether as a method (`x.f()`).
    functions: BTreeSet<(String, bool)>,
    /// Comprehension loops around the expression being checked.
    loops: u8,
}

impl Check<'_> {
    /// Checks `e`; `scope` holds the comprehension variables bound around it
    /// (`i` in `items.exists(i, ...)`, and the macro's own accumulator).
    fn expr(&mut self, e: &IdedExpr, scope: &mut Vec<String>, depth: u16) -> Result<(), ConditionError> {
        if depth > MAX_TREE_DEPTH {
            return Err(ConditionError::new(format!(
                "the condition nests deeper than {MAX_TREE_DEPTH} levels of operators and calls"
            )));
        }
        let depth = depth + 1;
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) => Ok(()),
            Expr::Ident(name) => self.ident(name, scope),
            Expr::Select(select) => {
                if let Some(root) = self.root(&select.operand, scope) {
                    return self.field(root, &select.field);
                }
                self.expr(&select.operand, scope, depth)
            }
            Expr::Call(call) => self.call(call, scope, depth),
            Expr::Comprehension(c) => self.comprehension(c, scope, depth),
            Expr::List(list) => {
                for element in &list.elements {
                    self.expr(element, scope, depth)?;
                }
                Ok(())
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(m) => {
                            self.expr(&m.key, scope, depth)?;
                            self.expr(&m.value, scope, depth)?;
                        }
                        EntryExpr::StructField(f) => self.expr(&f.value, scope, depth)?,
                    }
                }
                Ok(())
            }
            // `Type{field: ...}` needs a message type; a condition has none to name.
            Expr::Struct(s) => Err(ConditionError::new(format!(
                "`{}{{...}}` builds a message; a condition has no message types",
                s.type_name
            ))),
        }
    }

    /// A bare identifier: a comprehension variable, `order`, or a type name
    /// (`int`, `string`, ...) as `type(x) == int` compares with. `steps` bare
    /// would read every step's output, the later ones included.
    fn ident(&mut self, name: &str, scope: &[String]) -> Result<(), ConditionError> {
        if scope.iter().any(|bound| bound == name) || name == "order" || is_type_name(name) {
            return Ok(());
        }
        if name == "steps" {
            return Err(ConditionError::new(
                "`steps` is read one step at a time: `steps.<name>` or `steps[\"<name>\"]`",
            ));
        }
        Err(ConditionError::new(format!(
            "unknown name `{name}`: a condition may use `order` and `steps`"
        )))
    }

    /// `order` or `steps` when `e` is that variable (and no comprehension
    /// variable of the same name hides it).
    fn root(&self, e: &IdedExpr, scope: &[String]) -> Option<Root> {
        match &e.expr {
            Expr::Ident(name) if !scope.iter().any(|bound| bound == name) => match name.as_str() {
                "order" => Some(Root::Order),
                "steps" => Some(Root::Steps),
                _ => None,
            },
            _ => None,
        }
    }

    /// `order.<field>` or `steps.<step>`, written with a dot or with a literal index.
    fn field(&mut self, root: Root, field: &str) -> Result<(), ConditionError> {
        match root {
            Root::Order => {
                if ORDER_FIELDS.contains(&field) {
                    Ok(())
                } else {
                    Err(ConditionError::new(format!(
                        "the order has no field `{field}`: it has {}",
                        quoted(&ORDER_FIELDS)
                    )))
                }
            }
            Root::Steps => {
                let step = match self.earlier_steps {
                    Some(earlier) => Some(resolve_step(field, earlier)?.to_string()),
                    None => None,
                };
                self.reads.insert(field.to_string(), step);
                Ok(())
            }
        }
    }

    fn call(&mut self, call: &CallExpr, scope: &mut Vec<String>, depth: u16) -> Result<(), ConditionError> {
        if call.func_name == operators::INDEX && call.target.is_none() {
            if let [operand, index] = call.args.as_slice() {
                if let Some(root) = self.root(operand, scope) {
                    return match &index.expr {
                        Expr::Literal(LiteralValue::String(key)) => self.field(root, key.inner()),
                        _ if root == Root::Steps => Err(ConditionError::new(
                            "`steps[...]` takes a step's name as a string literal, \
                             so that it can be checked when the definition loads",
                        )),
                        _ => self.expr(index, scope, depth),
                    };
                }
            }
        }
        // Operators (`_&&_`, `!_`, `@in`, ...) are not identifiers: only names a
        // person wrote are looked up.
        if is_identifier(&call.func_name) {
            self.functions
                .insert((call.func_name.clone(), call.target.is_some()));
        }
        if let Some(target) = &call.target {
            self.expr(target, scope, depth)?;
        }
        for arg in &call.args {
            self.expr(arg, scope, depth)?;
        }
        Ok(())
    }

    /// A macro's expansion: the range and the initial value are outside the
    /// loop's variables; the loop sees its variables and the accumulator, the
    /// result the accumulator alone.
    fn comprehension(
        &mut self,
        c: &ComprehensionExpr,
        scope: &mut Vec<String>,
        depth: u16,
    ) -> Result<(), ConditionError> {
        if self.loops >= MAX_LOOP_NESTING {
            return Err(ConditionError::new(format!(
                "the condition nests more than {MAX_LOOP_NESTING} comprehensions \
                 (`exists`, `all`, `map`, ...) in one another"
            )));
        }
        self.expr(&c.iter_range, scope, depth)?;
        self.expr(&c.accu_init, scope, depth)?;
        let outer = scope.len();
        scope.push(c.accu_var.clone());
        self.expr(&c.result, scope, depth)?;
        scope.push(c.iter_var.clone());
        scope.extend(c.iter_var2.clone());
        self.loops += 1;
        let inner = self
            .expr(&c.loop_cond, scope, depth)
            .and_then(|()| self.expr(&c.loop_step, scope, depth));
        self.loops -= 1;
        scope.truncate(outer);
        inner
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    Order,
    Steps,
}

/// A step name as a CEL identifier: `charge-payment` → `charge_payment`.
fn alias(step: &str) -> String {
    step.replace('-', "_")
}

/// The earlier step `key` names: the one of that name, else the one whose
/// `_` spelling it is, if only one is.
fn resolve_step<'a>(key: &str, earlier: &[&'a str]) -> Result<&'a str, ConditionError> {
    if let Some(step) = earlier.iter().find(|step| **step == key) {
        return Ok(step);
    }
    let spelled: Vec<&str> = earlier
        .iter()
        .copied()
        .filter(|step| alias(step) == key)
        .collect();
    match spelled.as_slice() {
        [step] => Ok(step),
        [] => {
            let allowed = if earlier.is_empty() {
                "none: no step runs before this one".to_string()
            } else {
                quoted(earlier)
            };
            Err(ConditionError::new(format!(
                "`steps.{key}` is not a step that runs before this one; \
                 the condition may read {allowed}"
            )))
        }
        several => Err(ConditionError::new(format!(
            "`steps.{key}` could be any of {}: write `steps[\"<name>\"]`",
            quoted(several)
        ))),
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The output `key` (as the condition wrote it) names: the step of that
/// name, else the step whose `_` spelling it is.
fn lookup_output<'a>(
    outputs: &'a BTreeMap<String, serde_json::Value>,
    key: &str,
) -> Option<&'a serde_json::Value> {
    outputs.get(key).or_else(|| {
        outputs
            .iter()
            .find(|(name, _)| name.contains('-') && alias(name) == key)
            .map(|(_, output)| output)
    })
}

/// A CEL identifier (`[_a-zA-Z][_a-zA-Z0-9]*`), as a function a person
/// names is; the parser's operator names are not.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Whether `name` is a type the standard environment knows (`int`,
/// `string`, `null_type`, ...). The crate keeps its type table to itself, so
/// the evaluator is asked: an identifier that resolves in a context with no
/// variables is a type.
fn is_type_name(name: &str) -> bool {
    let probe = IdedExpr {
        id: 0,
        expr: Expr::Ident(name.to_string()),
    };
    Context::with_env(env()).resolve(&probe).is_ok()
}

/// Whether CEL's standard library declares `name` (as a method when
/// `member`). The crate keeps its function table to itself, so the evaluator
/// is asked: a call with no arguments to a declared name fails as a missing
/// overload, to an undeclared one as an undeclared reference.
fn function_exists(name: &str, member: bool) -> bool {
    let probe = IdedExpr {
        id: 0,
        expr: Expr::Call(CallExpr {
            func_name: name.to_string(),
            target: member.then(|| {
                Box::new(IdedExpr {
                    id: 1,
                    expr: Expr::Literal(LiteralValue::Null),
                })
            }),
            args: Vec::new(),
        }),
    };
    !matches!(
        Context::with_env(env()).resolve(&probe),
        Err(ExecutionError::UndeclaredReference(ref n)) if n.as_str() == name
    )
}

fn map_value(entries: HashMap<Key, Value>) -> Value {
    Value::Map(Map {
        map: Arc::new(entries),
    })
}

fn to_val(value: Value) -> Result<Box<dyn cel::common::value::Val>, String> {
    value.try_into().map_err(|e: ExecutionError| e.to_string())
}

/// JSON as CEL values. Integers stay integers: `int` when they fit, `uint`
/// above `i64::MAX`; other numbers are doubles.
fn json_to_cel(json: &serde_json::Value, depth: usize) -> Result<Value, String> {
    if depth > MAX_JSON_DEPTH {
        return Err(format!("the JSON nests deeper than {MAX_JSON_DEPTH} levels"));
    }
    Ok(match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                // A serde_json number is an i64, a u64 or a finite f64.
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => Value::List(Arc::new(
            items
                .iter()
                .map(|item| json_to_cel(item, depth + 1))
                .collect::<Result<_, _>>()?,
        )),
        serde_json::Value::Object(fields) => map_value(
            fields
                .iter()
                .map(|(k, v)| Ok((Key::from(k.as_str()), json_to_cel(v, depth + 1)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The steps before `ship` in the examples: the names conditions may read.
    const EARLIER: [&str; 2] = ["reserve-inventory", "charge-payment"];

    fn order(items: &[(&str, u32)], amount_cents: u64, currency: &str) -> serde_json::Value {
        let items: Vec<_> = items
            .iter()
            .map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity}))
            .collect();
        json!({
            "order_id": "o-1",
            "customer_id": "c-1",
            "items": items,
            "amount_cents": amount_cents,
            "currency": currency,
        })
    }

    fn physical_order() -> serde_json::Value {
        order(&[("DIGITAL-EBOOK", 1), ("BOOK-1", 2)], 15_000, "EUR")
    }

    fn digital_order() -> serde_json::Value {
        order(&[("DIGITAL-EBOOK", 1)], 500, "USD")
    }

    fn outputs(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
        pairs
            .iter()
            .map(|(step, output)| (step.to_string(), output.clone()))
            .collect()
    }

    fn parse(source: &str) -> Condition {
        match Condition::parse(source, &EARLIER) {
            Ok(condition) => condition,
            Err(e) => panic!("{source}: {e}"),
        }
    }

    fn refused(source: &str) -> String {
        match Condition::parse(source, &EARLIER) {
            Ok(condition) => panic!("{source} was accepted: {condition:?}"),
            Err(e) => e.reason,
        }
    }

    fn eval(
        source: &str,
        order: &serde_json::Value,
        outputs: &BTreeMap<String, serde_json::Value>,
    ) -> Result<bool, String> {
        parse(source).eval(order, outputs)
    }

    #[test]
    fn a_physical_item_is_found_among_the_items() {
        let source = r#"order.items.exists(i, !i.sku.startsWith("DIGITAL-"))"#;
        let none = BTreeMap::new();
        assert_eq!(eval(source, &physical_order(), &none), Ok(true));
        assert_eq!(eval(source, &digital_order(), &none), Ok(false));
    }

    #[test]
    fn amount_and_currency_compare_as_int_and_string() {
        let source = r#"order.amount_cents > 10000 && order.currency == "EUR""#;
        let none = BTreeMap::new();
        assert_eq!(eval(source, &physical_order(), &none), Ok(true));
        assert_eq!(eval(source, &order(&[("A", 1)], 15_000, "USD"), &none), Ok(false));
        assert_eq!(eval(source, &order(&[("A", 1)], 10_000, "EUR"), &none), Ok(false));
    }

    #[test]
    fn size_counts_the_items() {
        let none = BTreeMap::new();
        assert_eq!(eval("size(order.items) > 1", &physical_order(), &none), Ok(true));
        assert_eq!(eval("size(order.items) > 1", &digital_order(), &none), Ok(false));
    }

    #[test]
    fn an_earlier_output_is_read_by_its_underscore_alias() {
        let source = "steps.charge_payment.output.three_ds == true";
        let with = outputs(&[("charge-payment", json!({"three_ds": true}))]);
        let without = outputs(&[("charge-payment", json!({"three_ds": false}))]);
        assert_eq!(eval(source, &physical_order(), &with), Ok(true));
        assert_eq!(eval(source, &physical_order(), &without), Ok(false));
    }

    #[test]
    fn has_tests_an_output_key_read_by_the_step_name() {
        let source = r#"has(steps["charge-payment"].output.three_ds)"#;
        let with = outputs(&[("charge-payment", json!({"three_ds": false}))]);
        let without = outputs(&[("charge-payment", json!({"id": "ch-1"}))]);
        assert_eq!(eval(source, &physical_order(), &with), Ok(true));
        assert_eq!(eval(source, &physical_order(), &without), Ok(false));
    }

    #[test]
    fn has_tells_whether_an_earlier_step_gave_an_output() {
        let source = "has(steps.reserve_inventory)";
        let with = outputs(&[("reserve-inventory", json!({}))]);
        assert_eq!(eval(source, &physical_order(), &with), Ok(true));
        assert_eq!(eval(source, &physical_order(), &BTreeMap::new()), Ok(false));
    }

    #[test]
    fn output_integers_stay_integers() {
        let out = outputs(&[(
            "reserve-inventory",
            json!({"held": 3, "big": u64::MAX, "ratio": 0.5}),
        )]);
        let order = physical_order();
        assert_eq!(
            eval("steps.reserve_inventory.output.held == 3", &order, &out),
            Ok(true)
        );
        assert_eq!(
            eval("type(steps.reserve_inventory.output.held) == int", &order, &out),
            Ok(true)
        );
        assert_eq!(
            eval(
                "steps.reserve_inventory.output.big == 18446744073709551615u",
                &order,
                &out
            ),
            Ok(true)
        );
        assert_eq!(
            eval("steps.reserve_inventory.output.ratio < 1.0", &order, &out),
            Ok(true)
        );
    }

    #[test]
    fn comprehension_variables_are_not_top_level_names() {
        let none = BTreeMap::new();
        let source = "order.items.all(item, order.items.exists(other, other.quantity >= item.quantity))";
        assert_eq!(eval(source, &physical_order(), &none), Ok(true));
        // A comprehension variable may even hide `order`.
        assert_eq!(
            eval(
                "order.items.all(order, order.quantity > 0)",
                &physical_order(),
                &none
            ),
            Ok(true)
        );
        assert!(refused("order.items.all(i, j.quantity > 0)").contains("unknown name `j`"));
    }

    #[test]
    fn an_unknown_top_level_name_is_refused_by_name() {
        assert_eq!(
            refused("ordr.amount_cents > 1"),
            "unknown name `ordr`: a condition may use `order` and `steps`"
        );
        assert!(refused("optional.of(1) == optional.of(1)").contains("unknown name `optional`"));
    }

    #[test]
    fn a_type_name_is_not_an_unknown_name() {
        let none = BTreeMap::new();
        assert_eq!(
            eval("type(order.currency) == string", &physical_order(), &none),
            Ok(true)
        );
    }

    #[test]
    fn an_unknown_step_is_refused_with_the_allowed_names() {
        let reason = refused("steps.refund.output.ok == true");
        assert_eq!(
            reason,
            "`steps.refund` is not a step that runs before this one; \
             the condition may read `reserve-inventory`, `charge-payment`"
        );
        assert!(refused(r#"has(steps["refund"].output)"#).contains("`steps.refund`"));
    }

    #[test]
    fn a_later_step_is_refused() {
        // `ship` runs after `charge-payment`: its condition sees the two before.
        let reason = match Condition::parse("steps.ship.output.ok", &["reserve-inventory"]) {
            Ok(c) => panic!("accepted {c:?}"),
            Err(e) => e.reason,
        };
        assert!(reason.contains("`steps.ship`"), "{reason}");
        assert!(Condition::parse("steps.charge_payment.output.ok", &["reserve-inventory"]).is_err());
        // The first step has nothing before it.
        let first = Condition::parse("has(steps.reserve_inventory)", &[]);
        assert!(matches!(first, Err(e) if e.reason.contains("none: no step runs before this one")));
    }

    #[test]
    fn steps_is_read_one_named_step_at_a_time() {
        assert!(refused(r#""charge-payment" in steps"#).contains("one step at a time"));
        assert!(refused("size(steps) > 0").contains("one step at a time"));
        assert!(refused("steps[order.currency].output.ok").contains("string literal"));
    }

    #[test]
    fn a_step_name_is_preferred_to_another_steps_alias_and_an_ambiguous_alias_is_refused() {
        let earlier = ["charge-payment", "charge_payment"];
        let condition = match Condition::parse("steps.charge_payment.output.n == 2", &earlier) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let out = outputs(&[
            ("charge-payment", json!({"n": 1})),
            ("charge_payment", json!({"n": 2})),
        ]);
        assert_eq!(condition.eval(&physical_order(), &out), Ok(true));

        let ambiguous = Condition::parse("steps.a_b_c.output.ok", &["a-b_c", "a_b-c"]);
        assert!(matches!(ambiguous, Err(e) if e.reason.contains("could be any of `a-b_c`, `a_b-c`")));
        assert!(Condition::parse(r#"steps["a-b_c"].output.ok"#, &["a-b_c", "a_b-c"]).is_ok());
    }

    #[test]
    fn outputs_of_steps_the_condition_does_not_name_are_not_visible() {
        // Only the named steps go into `steps`; a later one passed by mistake stays out.
        let out = outputs(&[("charge-payment", json!({})), ("ship", json!({}))]);
        assert_eq!(
            eval("has(steps.charge_payment)", &physical_order(), &out),
            Ok(true)
        );
    }

    #[test]
    fn an_unknown_order_field_is_refused() {
        let reason = refused("order.amount > 100");
        assert_eq!(
            reason,
            "the order has no field `amount`: it has `order_id`, `customer_id`, `items`, \
             `amount_cents`, `currency`"
        );
        assert!(refused("has(order.total)").contains("`total`"));
        assert!(refused(r#"order["total"] > 1"#).contains("`total`"));
        for field in ORDER_FIELDS {
            parse(&format!("has(order.{field})"));
        }
    }

    #[test]
    fn an_unknown_function_is_refused() {
        assert_eq!(
            refused("isBig(order.amount_cents)"),
            "unknown function `isBig`: CEL's standard library has no such function"
        );
        assert_eq!(
            refused("order.currency.isEuro()"),
            "unknown function `isEuro`: CEL's standard library has no such method"
        );
        // Standard functions and methods pass, whichever way they are called.
        parse(r#"order.currency.matches("^E") && order.customer_id.endsWith("1")"#);
        parse(r#"int(order.amount_cents) + size("ab") > 0 && string(1) == "1""#);
        parse(r#"order.currency.contains("U") || size(order.currency) == 3"#);
    }

    #[test]
    fn a_syntax_error_gives_the_parsers_message_and_position() {
        let reason = refused("order.amount_cents >");
        assert!(
            reason.starts_with("invalid CEL: line 1, column 21: Syntax error:"),
            "{reason}"
        );
        let reason = refused("(order.amount_cents > 1\n && true");
        assert!(reason.starts_with("invalid CEL: line 2, column 9:"), "{reason}");
        assert!(reason.contains("missing ')'"), "{reason}");
        // The optional syntax is off: it would escape the checks.
        assert!(refused("order.?currency == 'EUR'").contains("unsupported syntax"));
    }

    #[test]
    fn empty_and_too_long_conditions_are_refused() {
        assert_eq!(refused(""), "the condition is empty");
        assert_eq!(refused("  \n "), "the condition is empty");
        let longest = format!("true{}", " ".repeat(MAX_CONDITION_BYTES - 4));
        parse(&longest);
        let too_long = format!("true{}", " ".repeat(MAX_CONDITION_BYTES - 3));
        assert_eq!(
            refused(&too_long),
            "the condition is 1025 bytes long; at most 1024 are allowed"
        );
    }

    #[test]
    fn a_non_bool_result_is_an_evaluation_error() {
        let none = BTreeMap::new();
        assert_eq!(
            eval("order.amount_cents", &physical_order(), &none),
            Err("the condition yields int, not a bool".to_string())
        );
        assert_eq!(
            eval("order.items", &physical_order(), &none),
            Err("the condition yields list, not a bool".to_string())
        );
    }

    #[test]
    fn a_missing_key_is_an_evaluation_error_with_the_crates_message() {
        let out = outputs(&[("charge-payment", json!({"three_ds": true}))]);
        assert_eq!(
            eval(
                "steps.charge_payment.output.missing == 1",
                &physical_order(),
                &out
            ),
            Err("No such key: missing".to_string())
        );
        // An earlier step that gave no output is absent from `steps`.
        assert_eq!(
            eval(
                "steps.reserve_inventory.output.held == 1",
                &physical_order(),
                &out
            ),
            Err("No such key: reserve_inventory".to_string())
        );
        assert_eq!(
            eval(r#"order.currency > 1"#, &physical_order(), &out),
            Err("found no matching overload for '_>_' applied to '(string, int)'".to_string())
        );
    }

    #[test]
    fn evaluation_is_repeatable() {
        let condition = parse(r#"order.items.exists(i, i.sku == "BOOK-1" && i.quantity == 2)"#);
        let none = BTreeMap::new();
        for _ in 0..3 {
            assert_eq!(condition.eval(&physical_order(), &none), Ok(true));
        }
    }

    #[test]
    fn serde_round_trips_through_the_source_string() {
        let source = r#"steps.charge_payment.output.three_ds == true && size(order.items) > 1"#;
        let condition = parse(source);
        let json = serde_json::to_string(&condition).expect("serializes");
        assert_eq!(json, serde_json::to_string(source).expect("a string serializes"));
        let back: Condition = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, condition);
        assert_eq!(back.source(), source);
        let out = outputs(&[("charge-payment", json!({"three_ds": true}))]);
        assert_eq!(back.eval(&physical_order(), &out), Ok(true));
        assert_eq!(format!("{back:?}"), format!("Condition({source:?})"));
    }

    #[test]
    fn deserializing_an_invalid_source_is_a_serde_error() {
        let err = serde_json::from_str::<Condition>(r#""ordr.items""#).expect_err("refused");
        assert!(err.to_string().contains("unknown name `ordr`"), "{err}");
        assert!(serde_json::from_str::<Condition>(r#""1 +""#).is_err());
        assert!(serde_json::from_str::<Condition>("17").is_err());
    }

    /// Nested brackets are counted before the parser runs; operators chained
    /// without brackets are bounded by the parsed tree's depth. None of these
    /// may overflow the stack of a test thread (2 MiB).
    #[test]
    fn deep_nesting_is_refused_or_parsed_never_a_crash() {
        let cases = [
            format!("{}true{}", "(".repeat(400), ")".repeat(400)),
            "(".repeat(MAX_CONDITION_BYTES),
            "[".repeat(MAX_CONDITION_BYTES),
            format!("{}1{} == 1", "{1:".repeat(250), "}".repeat(250)),
            format!("{}1{} == 1", "size(".repeat(170), ")".repeat(170)),
            format!("{}true{}", "[1].exists(x,".repeat(70), ")".repeat(70)),
            format!("order{} == 1", ".a".repeat(500)),
            format!("order.items{} == 1", "[0]".repeat(330)),
            format!("1{} == 1", "+1".repeat(500)),
            format!("true{}", "==true".repeat(170)),
            format!("{}true", "true ? true : ".repeat(75)),
            format!("'a'{} == 1", ".size()".repeat(140)),
            "ma[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\x0c\0\0\0[[[[putTo?[[[[ep".to_string(),
        ];
        for source in cases {
            let source: String = source.chars().take(MAX_CONDITION_BYTES).collect();
            let result = Condition::parse(&source, &EARLIER);
            assert!(result.is_err(), "{source}");
        }
        let refused_brackets = refused(&format!("{}true{}", "(".repeat(33), ")".repeat(33)));
        assert_eq!(
            refused_brackets,
            "the condition nests brackets 33 deep; at most 32 are allowed"
        );
        let refused_chain = refused(&format!("1{} == 1", "+1".repeat(100)));
        assert!(refused_chain.contains("deeper than 64 levels"), "{refused_chain}");
        let refused_ternary = refused(&format!("{}true", "true ? true : ".repeat(40)));
        assert!(
            refused_ternary.contains("deeper than 32 expressions"),
            "{refused_ternary}"
        );
    }

    /// Up to the bounds, a condition parses and evaluates on a 2 MiB stack.
    #[test]
    fn nesting_up_to_the_bounds_parses_and_evaluates() {
        let none = BTreeMap::new();
        let accepted = [
            (format!("{}true{}", "(".repeat(32), ")".repeat(32)), Ok(true)),
            (format!("{}1{} == [1]", "[".repeat(31), "]".repeat(31)), Ok(false)),
            (format!("1{} == 61", "+1".repeat(60)), Ok(true)),
            (format!("{}true", "!".repeat(1000)), Ok(true)),
            (format!("{}1 == 1", "-".repeat(1000)), Ok(true)),
            (format!("true{}", "&&true".repeat(170)), Ok(true)),
        ];
        for (source, expected) in accepted {
            assert_eq!(
                parse(&source).eval(&physical_order(), &none),
                expected,
                "{source}"
            );
        }
    }

    #[test]
    fn comprehensions_nest_at_most_two_deep() {
        let two = "order.items.exists(a, order.items.exists(b, a.sku != b.sku))";
        assert_eq!(eval(two, &physical_order(), &BTreeMap::new()), Ok(true));
        let three = "order.items.exists(a, order.items.exists(b, order.items.exists(c, a == c)))";
        assert!(refused(three).contains("more than 2 comprehensions"));
        // One after another is not nesting.
        parse("order.items.map(i, i.quantity).filter(q, q > 1).exists(q, q > 1)");
    }

    #[test]
    fn json_nested_too_deep_is_an_evaluation_error() {
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        let out = outputs(&[("charge-payment", deep)]);
        let result = eval("has(steps.charge_payment)", &physical_order(), &out);
        assert_eq!(result, Err("the JSON nests deeper than 128 levels".to_string()));
    }
}
