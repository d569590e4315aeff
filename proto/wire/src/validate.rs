//! The rules an order and a command must keep, in one place: the participants
//! check every command they receive with them, and the coordinator's
//! `CreateOrder` can check an order with the same functions, so the two sides
//! cannot disagree on what an order may contain.
//!
//! Pure functions over the envelope types: no I/O, no clock, no allocation
//! beyond the error. Each error names the field at fault the way the gRPC
//! API does (`items[2].quantity`). The numeric and length bounds are those of
//! the order schema `saga-definitions/schemas/order.v1.json` (a test keeps
//! them equal on a corpus of orders); the character rules (no control
//! characters, no Unicode format characters, no surrounding whitespace) are
//! stricter than the schema can say, and the test lists those cases too.

use std::fmt;

use crate::{idempotency_key, Command, CommandKind, OrderPayload};

/// Longest order id or customer id, in characters (the schema's `maxLength`).
pub const MAX_ID_CHARS: usize = 128;
/// Longest SKU, in characters (the schema's `items[].sku.maxLength`).
pub const MAX_SKU_CHARS: usize = 64;
/// Most lines in one order (the schema's `items.maxItems`).
pub const MAX_ITEMS: usize = 100;
/// Most units on one line (the schema's `items[].quantity.maximum`).
pub const MAX_QUANTITY: u32 = 1000;
/// Largest amount, in minor units (the schema's `amount_cents.maximum`).
pub const MAX_AMOUNT_CENTS: i64 = 100_000_000;
/// Longest step, action or definition name, in characters (the definition
/// loader's rule for names).
pub const MAX_NAME_CHARS: usize = 64;

/// A value refused, with the path of the field that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `items[2].quantity` or `saga_id`.
    pub field: String,
    /// Why it is refused, lowercase, e.g. `must be at least 1`.
    pub reason: String,
}

impl FieldError {
    /// A refusal of `field` for `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

/// Unicode format characters (general category Cf, Unicode 16.0), as
/// inclusive ranges: invisible characters that change how text is shown
/// (U+202E reverses it, U+200B is a zero-width space) or hide a difference
/// between two ids that look the same.
const FORMAT_CHARS: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Whether `c` is refused inside an id: a control character (Cc), a format
/// character (Cf), or the line and paragraph separators U+2028 and U+2029.
pub fn is_forbidden_char(c: char) -> bool {
    let n = u32::from(c);
    c.is_control()
        || n == 0x2028
        || n == 0x2029
        || FORMAT_CHARS.iter().any(|&(lo, hi)| (lo..=hi).contains(&n))
}

/// Checks a free-text id (order id, customer id, SKU): not empty, at most
/// `max_chars` characters, no leading or trailing whitespace, no character
/// [`is_forbidden_char`] refuses.
///
/// # Errors
/// The first rule `value` breaks, naming `field`.
pub fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > max_chars {
        return Err(FieldError::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if value.trim() != value {
        return Err(FieldError::new(field, "must not start or end with whitespace"));
    }
    if let Some(c) = value.chars().find(|c| is_forbidden_char(*c)) {
        return Err(FieldError::new(
            field,
            format!(
                "must not contain control or format characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// Checks an order id or a customer id: [`check_text`] with [`MAX_ID_CHARS`].
///
/// # Errors
/// The first rule `value` breaks, naming `field`.
pub fn check_id(field: &str, value: &str) -> Result<(), FieldError> {
    check_text(field, value, MAX_ID_CHARS)
}

/// Checks a saga id: a UUID in its canonical form, 36 characters, lower-case
/// hexadecimal digits with hyphens at 8, 13, 18 and 23 (what the
/// coordinator generates). Any other spelling of the same UUID is refused,
/// so one saga has one key.
///
/// # Errors
/// `value` is not a canonical UUID, naming `field`.
pub fn check_saga_id(field: &str, value: &str) -> Result<(), FieldError> {
    let canonical = value.len() == 36
        && value.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        });
    if canonical {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be a UUID in canonical lower-case hyphenated form",
        ))
    }
}

/// Checks a step, action or participant name as the definition loader
/// accepts it: 1-64 lower-case letters, digits, `-` or `_`, starting with a letter.
///
/// # Errors
/// `value` is not such a name, naming `field`.
pub fn check_name(field: &str, value: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_CHARS
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be 1-64 lower-case letters, digits, `-` or `_`, starting with a letter",
        ))
    }
}

/// Checks a definition reference, `<name>@<version>` (version ≥ 1).
///
/// # Errors
/// `value` is not such a reference, naming `field`.
pub fn check_definition(field: &str, value: &str) -> Result<(), FieldError> {
    let bad = || FieldError::new(field, "must be `<name>@<version>`");
    let (name, version) = value.split_once('@').ok_or_else(bad)?;
    check_name(field, name)?;
    let digits = !version.is_empty() && version.len() <= 10 && version.bytes().all(|b| b.is_ascii_digit());
    match version.parse::<u32>() {
        Ok(v) if digits && v >= 1 => Ok(()),
        _ => Err(bad()),
    }
}

/// Checks an ISO 4217 currency code as the API accepts it: three upper-case
/// ASCII letters (the schema's `^[A-Z]{3}$`).
///
/// # Errors
/// `value` is not such a code, naming `field`.
pub fn check_currency(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() == 3 && value.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be a 3-letter upper-case ISO 4217 code",
        ))
    }
}

impl OrderPayload {
    /// Checks the order as `CreateOrder` and the order schema would: ids
    /// ([`check_id`]), 1 to [`MAX_ITEMS`] lines, SKUs ([`check_text`] up to
    /// [`MAX_SKU_CHARS`]), quantities 1 to [`MAX_QUANTITY`], an amount of 1
    /// to [`MAX_AMOUNT_CENTS`], a currency code ([`check_currency`]).
    ///
    /// # Errors
    /// The first field at fault, in field order.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_id("order_id", &self.order_id)?;
        check_id("customer_id", &self.customer_id)?;
        if self.items.is_empty() {
            return Err(FieldError::new("items", "at least one item is required"));
        }
        if self.items.len() > MAX_ITEMS {
            return Err(FieldError::new("items", format!("at most {MAX_ITEMS} items")));
        }
        for (i, item) in self.items.iter().enumerate() {
            check_text(&format!("items[{i}].sku"), &item.sku, MAX_SKU_CHARS)?;
            if item.quantity < 1 {
                return Err(FieldError::new(
                    format!("items[{i}].quantity"),
                    "must be at least 1",
                ));
            }
            if item.quantity > MAX_QUANTITY {
                return Err(FieldError::new(
                    format!("items[{i}].quantity"),
                    format!("must be at most {MAX_QUANTITY}"),
                ));
            }
        }
        if self.amount_cents < 1 {
            return Err(FieldError::new("amount_cents", "must be greater than 0"));
        }
        if self.amount_cents > MAX_AMOUNT_CENTS {
            return Err(FieldError::new(
                "amount_cents",
                format!("must be at most {MAX_AMOUNT_CENTS}"),
            ));
        }
        check_currency("currency", &self.currency)
    }
}

impl Command {
    /// Checks the envelope, not the order: a canonical saga id
    /// ([`check_saga_id`]), the definition, step and action names, an
    /// attempt ≥ 1, the idempotency key `<saga_id>/<step>/<kind>`, and an
    /// `input` that is absent or an object. Whether the action belongs to
    /// the participant and matches the subject is the receiver's check.
    ///
    /// # Errors
    /// The first field at fault.
    pub fn validate_envelope(&self) -> Result<(), FieldError> {
        check_saga_id("saga_id", &self.saga_id)?;
        check_definition("definition", &self.definition)?;
        check_name("step", &self.step)?;
        check_name("action", &self.action)?;
        if self.attempt < 1 {
            return Err(FieldError::new("attempt", "must be at least 1"));
        }
        let expected = idempotency_key(&self.saga_id, &self.step, self.kind);
        if self.idempotency_key != expected {
            return Err(FieldError::new(
                "idempotency_key",
                format!("must be `{expected}`"),
            ));
        }
        if !(self.input.is_null() || self.input.is_object()) {
            return Err(FieldError::new("input", "must be an object when present"));
        }
        Ok(())
    }

    /// [`Command::validate_envelope`], then, for a forward command, the
    /// order ([`OrderPayload::validate`], fields prefixed `payload.`). A
    /// compensation's order is not judged: what it undoes is what its
    /// forward stored, never its payload, and it must be able to record
    /// "nothing to undo" for a forward that was refused.
    ///
    /// # Errors
    /// The first field at fault.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.validate_envelope()?;
        if self.kind == CommandKind::Forward {
            self.payload.validate().map_err(|e| FieldError {
                field: format!("payload.{}", e.field),
                reason: e.reason,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Item;

    fn order() -> OrderPayload {
        OrderPayload {
            order_id: "o-1".into(),
            customer_id: "c-1".into(),
            items: vec![
                Item {
                    sku: "A-1".into(),
                    quantity: 2,
                },
                Item {
                    sku: "B-2".into(),
                    quantity: 1,
                },
            ],
            amount_cents: 1999,
            currency: "EUR".into(),
        }
    }

    const SAGA: &str = "0190b8a4-0000-7000-8000-0000000000aa";

    fn command(kind: CommandKind) -> Command {
        Command {
            saga_id: SAGA.into(),
            definition: "order@1".into(),
            step: "reserve-inventory".into(),
            action: "reserve".into(),
            kind,
            attempt: 1,
            idempotency_key: idempotency_key(SAGA, "reserve-inventory", kind),
            payload: order(),
            input: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_good_order_and_command_pass() {
        order().validate().expect("valid order");
        command(CommandKind::Forward).validate().expect("valid command");
        command(CommandKind::Compensate)
            .validate()
            .expect("valid compensation");
    }

    #[test]
    fn each_bad_order_value_names_its_field() {
        type Change = fn(&mut OrderPayload);
        let cases: &[(Change, &str)] = &[
            (|o| o.order_id.clear(), "order_id"),
            (|o| o.customer_id.clear(), "customer_id"),
            (|o| o.customer_id = " c".into(), "customer_id"),
            (|o| o.customer_id = "c\u{202E}1".into(), "customer_id"),
            (|o| o.customer_id = "c\u{200B}".into(), "customer_id"),
            (|o| o.order_id = "o\u{2028}1".into(), "order_id"),
            (|o| o.order_id = "o\u{7}".into(), "order_id"),
            (|o| o.order_id = "x".repeat(129), "order_id"),
            (|o| o.items.clear(), "items"),
            (
                |o| {
                    o.items = vec![o.items[0].clone(); 101];
                },
                "items",
            ),
            (|o| o.items[1].quantity = 0, "items[1].quantity"),
            (|o| o.items[0].quantity = 1001, "items[0].quantity"),
            (|o| o.items[1].sku = "\u{202E}1-A".into(), "items[1].sku"),
            (|o| o.items[0].sku = String::new(), "items[0].sku"),
            (|o| o.items[0].sku = "s".repeat(65), "items[0].sku"),
            (|o| o.amount_cents = 0, "amount_cents"),
            (|o| o.amount_cents = -50_000, "amount_cents"),
            (|o| o.amount_cents = 100_000_001, "amount_cents"),
            (|o| o.currency = "eur".into(), "currency"),
            (|o| o.currency = "EURO".into(), "currency"),
            (|o| o.currency = String::new(), "currency"),
            (|o| o.currency = "€UR".into(), "currency"),
        ];
        for (change, field) in cases {
            let mut o = order();
            change(&mut o);
            let err = o.validate().expect_err(field);
            assert_eq!(err.field, *field, "{o:?}: {err}");
        }
    }

    #[test]
    fn the_saga_id_must_be_a_canonical_uuid() {
        for bad in [
            "",
            "s1",
            "0190B8A4-0000-7000-8000-0000000000AA",
            "0190b8a400007000800000000000aa00",
            "{0190b8a4-0000-7000-8000-0000000000aa}",
            "0190b8a4-0000-7000-8000-0000000000ag",
            "0190b8a4-0000-7000-8000_0000000000aa",
            "0190b8a4-0000-7000-8000-0000000000aa ",
        ] {
            assert!(check_saga_id("saga_id", bad).is_err(), "{bad:?}");
        }
        check_saga_id("saga_id", SAGA).expect("canonical");
    }

    #[test]
    fn each_bad_envelope_value_names_its_field() {
        type Change = fn(&mut Command);
        let cases: &[(Change, &str)] = &[
            (|c| c.saga_id = c.saga_id.to_uppercase(), "saga_id"),
            (|c| c.saga_id.clear(), "saga_id"),
            (|c| c.definition = "order".into(), "definition"),
            (|c| c.definition = "order@0".into(), "definition"),
            (|c| c.definition = "Order@1".into(), "definition"),
            (|c| c.step = "reserve/inventory".into(), "step"),
            (|c| c.step = String::new(), "step"),
            (|c| c.action = "RESERVE".into(), "action"),
            (|c| c.attempt = 0, "attempt"),
            (|c| c.idempotency_key = "other/key".into(), "idempotency_key"),
            (|c| c.input = serde_json::json!([1]), "input"),
            (|c| c.payload.amount_cents = 0, "payload.amount_cents"),
            (|c| c.payload.items.clear(), "payload.items"),
        ];
        for (change, field) in cases {
            let mut c = command(CommandKind::Forward);
            change(&mut c);
            let err = c.validate().expect_err(field);
            assert_eq!(err.field, *field, "{err}");
        }
        let mut undo = command(CommandKind::Compensate);
        undo.payload.items.clear();
        undo.validate().expect("a compensation's order is not judged");
        undo.saga_id = undo.saga_id.to_uppercase();
        assert_eq!(undo.validate().expect_err("envelope").field, "saga_id");
    }

    #[test]
    fn the_format_character_table_is_unicode_category_cf() {
        use unicode_general_category::{get_general_category, GeneralCategory};
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            let cf = get_general_category(c) == GeneralCategory::Format;
            let in_table = FORMAT_CHARS
                .iter()
                .any(|&(lo, hi)| (lo..=hi).contains(&u32::from(c)));
            assert_eq!(cf, in_table, "U+{:04X}", u32::from(c));
        }
        for c in [
            '\u{202E}', '\u{200B}', '\u{2028}', '\u{2029}', '\u{0}', '\u{7F}', '\u{85}',
        ] {
            assert!(is_forbidden_char(c), "U+{:04X}", u32::from(c));
        }
        for c in ['a', 'é', 'ß', '-', ' ', '日'] {
            assert!(!is_forbidden_char(c), "{c}");
        }
    }
}
