//! The envelope schemas (`saga-definitions/schemas/command.v1.json`,
//! `reply.v1.json`) and saga-wire's serde types and rules agree: the
//! schemas accept what saga-wire serializes, and a corpus of envelopes is
//! judged alike by the schema and by serde plus `Command::validate`. What
//! a schema cannot express (the key's equality with the other fields, a
//! 32-bit version, the order's character rules; a reply's extra fields,
//! which a receiver ignores but a participant must not send) is listed
//! apart, case by case.

use saga_wire::{idempotency_key, Command, CommandKind, Item, OrderPayload, Reply};
use serde_json::{json, Value};

fn read(name: &str) -> Value {
    let path = format!(
        "{}/../../saga-definitions/schemas/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A validator of `name`, with `order.v1.json` registered for its `$ref`.
fn schema(name: &str) -> jsonschema::Validator {
    let registry = jsonschema::Registry::new()
        .add(
            "https://saga-engine.invalid/schemas/order.v1.json",
            read("order.v1.json"),
        )
        .expect("order.v1.json registers")
        .prepare()
        .expect("registry");
    jsonschema::options()
        .with_registry(&registry)
        .build(&read(name))
        .unwrap_or_else(|e| panic!("{name} compiles: {e}"))
}

const SAGA: &str = "0190b8a4-0000-7000-8000-0000000000aa";

fn command(kind: CommandKind) -> Command {
    let (step, action) = match kind {
        CommandKind::Forward => ("reserve-inventory", "reserve"),
        CommandKind::Compensate => ("reserve-inventory", "release"),
    };
    Command {
        saga_id: SAGA.into(),
        definition: "order@1".into(),
        step: step.into(),
        action: action.into(),
        kind,
        attempt: 1,
        idempotency_key: idempotency_key(SAGA, step, kind),
        payload: OrderPayload {
            order_id: "o-1".into(),
            customer_id: "c-1".into(),
            items: vec![Item {
                sku: "A-1".into(),
                quantity: 2,
            }],
            amount_cents: 1999,
            currency: "EUR".into(),
        },
        input: Value::Null,
    }
}

/// `command(kind)` as JSON with `path` (`payload.items.0.quantity`) set to
/// `value` (or removed, for `None`); the key is made again from the saga
/// id, step and kind when `rekey`, so only the change itself is judged.
fn with(kind: CommandKind, path: &str, value: Option<Value>, rekey: bool) -> Value {
    let mut v = serde_json::to_value(command(kind)).expect("serializes");
    let (parent, last) = path.rsplit_once('.').unwrap_or(("", path));
    let mut at = &mut v;
    for p in parent.split('.').filter(|p| !p.is_empty()) {
        at = match p.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[p],
        };
    }
    match (value, last.parse::<usize>()) {
        (Some(value), Ok(i)) => at[i] = value,
        (Some(value), Err(_)) => at[last] = value,
        (None, _) => {
            at.as_object_mut().expect("an object").remove(last);
        }
    }
    if rekey {
        if let (Some(s), Some(st), Some(k)) = (v["saga_id"].as_str(), v["step"].as_str(), v["kind"].as_str())
        {
            v["idempotency_key"] = json!(format!("{s}/{st}/{k}"));
        }
    }
    v
}

fn set(kind: CommandKind, path: &str, value: Value) -> Value {
    with(kind, path, Some(value), true)
}

/// serde and `Command::validate`: values serde cannot read count as refused.
fn wire_accepts(v: &Value) -> bool {
    serde_json::from_value::<Command>(v.clone()).is_ok_and(|c| c.validate().is_ok())
}

#[test]
fn the_command_schema_accepts_what_saga_wire_sends() {
    let schema = schema("command.v1.json");
    let mut with_input = command(CommandKind::Compensate);
    with_input.input = json!({"reservation_id": "r-1"});
    for cmd in [
        command(CommandKind::Forward),
        command(CommandKind::Compensate),
        with_input,
    ] {
        let v = serde_json::to_value(&cmd).expect("serializes");
        let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{v}: {errors:?}");
    }
}

#[test]
fn the_command_schema_and_the_validator_agree() {
    use CommandKind::{Compensate as C, Forward as F};
    let schema = schema("command.v1.json");
    let uuid_upper = SAGA.to_uppercase();
    let corpus: Vec<(&str, Value, bool)> = vec![
        ("forward", set(F, "attempt", json!(1)), true),
        ("compensation", set(C, "attempt", json!(1)), true),
        ("attempt 7", set(F, "attempt", json!(7)), true),
        ("attempt 0", set(F, "attempt", json!(0)), false),
        ("attempt -1", set(F, "attempt", json!(-1)), false),
        ("attempt 1.5", set(F, "attempt", json!(1.5)), false),
        ("attempt 2^32", set(F, "attempt", json!(4_294_967_296_u64)), false),
        ("attempt as text", set(F, "attempt", json!("1")), false),
        (
            "input object",
            set(F, "input", json!({"charge_id": "ch_1"})),
            true,
        ),
        ("input null", set(F, "input", Value::Null), true),
        ("input array", set(F, "input", json!([1])), false),
        ("input text", set(F, "input", json!("x")), false),
        ("saga id upper-case", set(F, "saga_id", json!(uuid_upper)), false),
        ("saga id short", set(F, "saga_id", json!("s1")), false),
        (
            "saga id in braces",
            set(F, "saga_id", json!(format!("{{{SAGA}}}"))),
            false,
        ),
        (
            "saga id without hyphens",
            set(F, "saga_id", json!(SAGA.replace('-', ""))),
            false,
        ),
        (
            "definition without version",
            set(F, "definition", json!("order")),
            false,
        ),
        (
            "definition version 0",
            set(F, "definition", json!("order@0")),
            false,
        ),
        (
            "definition version 12",
            set(F, "definition", json!("order@12")),
            true,
        ),
        (
            "definition upper-case",
            set(F, "definition", json!("Order@1")),
            false,
        ),
        (
            "definition version x",
            set(F, "definition", json!("order@x")),
            false,
        ),
        (
            "step with a slash",
            set(F, "step", json!("reserve/inventory")),
            false,
        ),
        ("step empty", set(F, "step", json!("")), false),
        (
            "step of 64",
            set(F, "step", json!(format!("s{}", "x".repeat(63)))),
            true,
        ),
        (
            "step of 65",
            set(F, "step", json!(format!("s{}", "x".repeat(64)))),
            false,
        ),
        (
            "step starting with a digit",
            set(F, "step", json!("1step")),
            false,
        ),
        ("action upper-case", set(F, "action", json!("RESERVE")), false),
        ("action with a dot", set(F, "action", json!("re.serve")), false),
        ("kind sideways", set(F, "kind", json!("sideways")), false),
        ("kind missing", with(F, "kind", None, false), false),
        (
            "key not a key",
            with(F, "idempotency_key", Some(json!("other/key")), false),
            false,
        ),
        ("key missing", with(F, "idempotency_key", None, false), false),
        ("payload missing", with(F, "payload", None, false), false),
        (
            "forward amount 0",
            set(F, "payload.amount_cents", json!(0)),
            false,
        ),
        ("forward no items", set(F, "payload.items", json!([])), false),
        (
            "forward currency eur",
            set(F, "payload.currency", json!("eur")),
            false,
        ),
        (
            "forward quantity 1001",
            set(F, "payload.items.0.quantity", json!(1001)),
            false,
        ),
        (
            "compensation amount 0",
            set(C, "payload.amount_cents", json!(0)),
            true,
        ),
        (
            "compensation amount -5",
            set(C, "payload.amount_cents", json!(-5)),
            true,
        ),
        ("compensation no items", set(C, "payload.items", json!([])), true),
        (
            "compensation empty ids",
            set(C, "payload.order_id", json!("")),
            true,
        ),
        (
            "compensation quantity -1",
            set(C, "payload.items.0.quantity", json!(-1)),
            false,
        ),
        (
            "compensation amount as text",
            set(C, "payload.amount_cents", json!("5")),
            false,
        ),
        (
            "compensation payload field",
            set(C, "payload.coupon", json!("FREE")),
            false,
        ),
        (
            "forward payload field",
            set(F, "payload.coupon", json!("FREE")),
            false,
        ),
        ("item field", set(F, "payload.items.0.price", json!(1)), false),
        ("unknown field", set(F, "priority", json!("high")), false),
        (
            "compensation missing currency",
            with(C, "payload.currency", None, true),
            false,
        ),
        ("not an object", json!([1, 2]), false),
    ];
    for (name, v, valid) in &corpus {
        assert_eq!(schema.is_valid(v), *valid, "schema on {name}: {v}");
        assert_eq!(wire_accepts(v), *valid, "saga-wire on {name}: {v}");
    }
    // What only saga-wire refuses.
    let stricter = [
        (
            "key of another step",
            with(
                F,
                "idempotency_key",
                Some(json!(format!("{SAGA}/charge-payment/forward"))),
                false,
            ),
        ),
        (
            "key of the other kind",
            with(
                F,
                "idempotency_key",
                Some(json!(format!("{SAGA}/reserve-inventory/compensate"))),
                false,
            ),
        ),
        (
            "key of another saga",
            with(
                F,
                "idempotency_key",
                Some(json!(
                    "0190b8a4-0000-7000-8000-0000000000bb/reserve-inventory/forward"
                )),
                false,
            ),
        ),
        (
            "definition version over 32 bits",
            set(F, "definition", json!("order@9999999999")),
        ),
        (
            "definition version of 11 digits",
            set(F, "definition", json!("order@00000000001")),
        ),
        (
            "forward customer with U+202E",
            set(F, "payload.customer_id", json!("c\u{202E}1")),
        ),
        (
            "forward sku with a leading space",
            set(F, "payload.items.0.sku", json!(" A-1")),
        ),
    ];
    for (name, v) in &stricter {
        assert!(schema.is_valid(v), "the schema accepts {name}: {v}");
        assert!(!wire_accepts(v), "saga-wire refuses {name}: {v}");
    }
}

#[test]
fn the_reply_schema_and_saga_wire_agree() {
    let schema = schema("reply.v1.json");
    for reply in [
        Reply::ok(json!({"reservation_id": "r-1", "items": [{"sku": "A-1", "quantity": 2}]})),
        Reply::ok(Value::Null),
        Reply::rejected("compensated_before_forward"),
        Reply::error("gateway_unavailable"),
    ] {
        let v = serde_json::to_value(&reply).expect("serializes");
        assert!(schema.is_valid(&v), "{v}");
        assert_eq!(serde_json::from_value::<Reply>(v).ok(), Some(reply));
    }
    let reads = |v: &Value| serde_json::from_value::<Reply>(v.clone()).is_ok();
    let corpus = [
        ("ok without data", json!({"outcome": "ok"}), true),
        ("ok with a number", json!({"outcome": "ok", "data": 5}), true),
        (
            "rejected",
            json!({"outcome": "rejected", "reason": "card_declined"}),
            true,
        ),
        ("error", json!({"outcome": "error", "reason": "boom"}), true),
        ("no outcome", json!({"data": {}}), false),
        ("unknown outcome", json!({"outcome": "maybe"}), false),
        ("outcome upper-case", json!({"outcome": "OK"}), false),
        ("rejected without reason", json!({"outcome": "rejected"}), false),
        ("error without reason", json!({"outcome": "error"}), false),
        ("reason a number", json!({"outcome": "error", "reason": 5}), false),
        ("not an object", json!("ok"), false),
        ("an array", json!([{"outcome": "ok"}]), false),
    ];
    for (name, v, valid) in &corpus {
        assert_eq!(schema.is_valid(v), *valid, "schema on {name}: {v}");
        assert_eq!(reads(v), *valid, "saga-wire on {name}: {v}");
    }
    // A receiver ignores fields it does not know; a participant sends none.
    let stricter = [
        (
            "ok with an extra field",
            json!({"outcome": "ok", "data": {}, "at": 1}),
        ),
        (
            "rejected with data",
            json!({"outcome": "rejected", "reason": "x", "data": {}}),
        ),
    ];
    for (name, v) in &stricter {
        assert!(!schema.is_valid(v), "the schema refuses {name}: {v}");
        assert!(reads(v), "saga-wire reads {name}: {v}");
    }
}
