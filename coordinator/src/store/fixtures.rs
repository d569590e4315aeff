//! Test fixtures shared by the stores' and the runner's unit tests.

use std::{path::PathBuf, time::Duration};

use crate::definition::{RetryPolicy, SagaDefinition, StepDefinition};

/// The shipped order saga's shape: reserve-inventory (release), then
/// charge-payment (refund), each with a 1 s timeout and the default retry.
pub(crate) fn two_step_order() -> SagaDefinition {
    let step = |n: &str, p: &str, a: &str, c: &str| StepDefinition {
        name: n.into(),
        participant: p.into(),
        action: a.into(),
        compensation: Some(c.into()),
        timeout: Duration::from_secs(1),
        retry: RetryPolicy::default(),
        group: None,
        on_failure: Default::default(),
        input: Default::default(),
        compensation_input: Default::default(),
        output_schema: None,
        kind: Default::default(),
        when: None,
    };
    SagaDefinition {
        name: "order".into(),
        version: 1,
        steps: vec![
            step("reserve-inventory", "inventory", "reserve", "release"),
            step("charge-payment", "payment", "charge", "refund"),
        ],
        input_schema: None,
        events: Default::default(),
        deadline: None,
        source: PathBuf::new(),
    }
}

/// One order of one item: `o-1` by `c-1`, 500 EUR cents.
pub(crate) fn order() -> saga_wire::OrderPayload {
    saga_wire::OrderPayload {
        order_id: "o-1".into(),
        customer_id: "c-1".into(),
        items: vec![saga_wire::Item {
            sku: "A".into(),
            quantity: 1,
        }],
        amount_cents: 500,
        currency: "EUR".into(),
    }
}
