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
