//! The order schema (`saga-definitions/schemas/order.v1.json`) and
//! `OrderPayload::validate` judge a corpus of orders alike, so the two
//! cannot drift; the character rules the schema cannot express are listed
//! apart, as orders the schema accepts and the validator refuses.

use saga_wire::OrderPayload;
use serde_json::{json, Value};

fn schema() -> jsonschema::Validator {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../saga-definitions/schemas/order.v1.json"
    );
    let text = std::fs::read_to_string(path).expect("order.v1.json is readable");
    let schema: Value = serde_json::from_str(&text).expect("order.v1.json is JSON");
    jsonschema::validator_for(&schema).expect("order.v1.json compiles")
}

fn good() -> Value {
    json!({"order_id": "o-1", "customer_id": "c-1",
           "items": [{"sku": "A-1", "quantity": 2}, {"sku": "B-2", "quantity": 1}],
           "amount_cents": 1999, "currency": "EUR"})
}

/// `good()` with `path` (`items.1.quantity`) set to `value`.
fn with(path: &str, value: Value) -> Value {
    let mut v = good();
    let mut at = &mut v;
    for p in path.split('.') {
        at = match p.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[p],
        };
    }
    *at = value;
    v
}

/// The validator's verdict; values serde cannot even read into an
/// `OrderPayload` (a negative quantity, a string amount) count as refused.
fn rust_accepts(v: &Value) -> bool {
    serde_json::from_value::<OrderPayload>(v.clone()).is_ok_and(|o| o.validate().is_ok())
}

#[test]
fn the_schema_and_the_validator_agree() {
    let schema = schema();
    let max_items: Vec<Value> = (0..100)
        .map(|i| json!({"sku": format!("S-{i}"), "quantity": 1}))
        .collect();
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"sku": format!("S-{i}"), "quantity": 1}))
        .collect();
    let corpus: Vec<(&str, Value, bool)> = vec![
        ("good", good(), true),
        (
            "one item",
            with("items", json!([{"sku": "A-1", "quantity": 1}])),
            true,
        ),
        ("100 items", with("items", json!(max_items)), true),
        ("101 items", with("items", json!(too_many)), false),
        ("no items", with("items", json!([])), false),
        ("quantity 0", with("items.1.quantity", json!(0)), false),
        ("quantity -1", with("items.1.quantity", json!(-1)), false),
        ("quantity 1000", with("items.1.quantity", json!(1000)), true),
        ("quantity 1001", with("items.1.quantity", json!(1001)), false),
        ("quantity 1.5", with("items.1.quantity", json!(1.5)), false),
        ("amount 1", with("amount_cents", json!(1)), true),
        ("amount 0", with("amount_cents", json!(0)), false),
        ("amount -50000", with("amount_cents", json!(-50_000)), false),
        ("amount max", with("amount_cents", json!(100_000_000)), true),
        ("amount max + 1", with("amount_cents", json!(100_000_001)), false),
        ("amount as text", with("amount_cents", json!("1999")), false),
        ("currency USD", with("currency", json!("USD")), true),
        ("currency lower", with("currency", json!("eur")), false),
        ("currency 4 letters", with("currency", json!("EURO")), false),
        ("currency 2 letters", with("currency", json!("EU")), false),
        ("currency empty", with("currency", json!("")), false),
        ("currency digits", with("currency", json!("123")), false),
        ("empty customer", with("customer_id", json!("")), false),
        ("empty order id", with("order_id", json!("")), false),
        ("customer 128", with("customer_id", json!("c".repeat(128))), true),
        ("customer 129", with("customer_id", json!("c".repeat(129))), false),
        ("order id 129", with("order_id", json!("o".repeat(129))), false),
        ("customer in Greek", with("customer_id", json!("πελάτης")), true),
        ("sku 64", with("items.0.sku", json!("s".repeat(64))), true),
        ("sku 65", with("items.0.sku", json!("s".repeat(65))), false),
        ("empty sku", with("items.0.sku", json!("")), false),
        ("sku with a space inside", with("items.0.sku", json!("A 1")), true),
        (
            "missing currency",
            {
                let mut v = good();
                v.as_object_mut().expect("object").remove("currency");
                v
            },
            false,
        ),
        ("missing quantity", with("items.0", json!({"sku": "A-1"})), false),
        ("unknown field", with("coupon", json!("FREE")), false),
        ("unknown item field", with("items.0.price", json!(1)), false),
    ];
    for (name, order, valid) in &corpus {
        assert_eq!(schema.is_valid(order), *valid, "schema on {name}: {order}");
        assert_eq!(rust_accepts(order), *valid, "validator on {name}: {order}");
    }
    // What only the validator refuses: characters and spacing a schema
    // `maxLength`/`minLength` cannot see.
    let stricter = [
        ("customer with U+202E", with("customer_id", json!("c\u{202E}1"))),
        ("sku with U+202E", with("items.0.sku", json!("\u{202E}1-A"))),
        ("order id with U+200B", with("order_id", json!("o\u{200B}"))),
        ("order id with U+2028", with("order_id", json!("o\u{2028}1"))),
        (
            "customer with a control character",
            with("customer_id", json!("c\u{7}")),
        ),
        ("customer of spaces", with("customer_id", json!("   "))),
        ("sku with a leading space", with("items.0.sku", json!(" A-1"))),
    ];
    for (name, order) in &stricter {
        assert!(schema.is_valid(order), "the schema accepts {name}");
        assert!(!rust_accepts(order), "the validator refuses {name}");
    }
}
