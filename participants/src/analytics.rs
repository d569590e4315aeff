//! How an analytics service attaches to the saga events: a running revenue
//! and cancellation count folded from the `SAGA_EVENTS` stream (see the
//! `revenue` example, which feeds it from a durable JetStream consumer).
//!
//! Pure: no I/O. Events may be re-delivered (at-least-once consumers, a
//! coordinator re-publishing after a long outage), so each saga counts once
//! however often its terminal event arrives.

use std::collections::{BTreeMap, HashSet};

use saga_wire::SagaEvent;

/// Totals so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revenue {
    /// Orders whose saga completed.
    pub completed: u64,
    /// Orders whose saga was compensated (cancelled).
    pub cancelled: u64,
    /// Sagas that need an operator.
    pub failed: u64,
    /// Revenue of completed orders, in minor units, per currency.
    pub revenue_cents: BTreeMap<String, i64>,
    counted: HashSet<String>,
}

impl Revenue {
    /// Folds one event in; returns whether it changed the totals.
    pub fn apply(&mut self, e: &SagaEvent) -> bool {
        let terminal = matches!(e.event.as_str(), "completed" | "compensated" | "failed");
        if !terminal || !self.counted.insert(e.saga_id.clone()) {
            return false;
        }
        match e.event.as_str() {
            "completed" => {
                self.completed += 1;
                *self.revenue_cents.entry(e.order.currency.clone()).or_default() += e.order.amount_cents;
            }
            "compensated" => self.cancelled += 1,
            _ => self.failed += 1,
        }
        true
    }

    /// One line for a terminal: `completed 3, cancelled 1, failed 0, revenue 59.97 EUR`.
    pub fn summary(&self) -> String {
        let revenue = if self.revenue_cents.is_empty() {
            "0".to_string()
        } else {
            self.revenue_cents
                .iter()
                .map(|(cur, c)| format!("{}.{:02} {cur}", c / 100, c % 100))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "completed {}, cancelled {}, failed {}, revenue {revenue}",
            self.completed, self.cancelled, self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use saga_wire::{Item, OrderPayload};

    use super::*;

    fn event(saga: &str, event: &str, cents: i64) -> SagaEvent {
        SagaEvent {
            v: 1,
            saga_id: saga.into(),
            definition: "order@1".into(),
            sequence: 5,
            event: event.into(),
            step: None,
            attempt: None,
            detail: None,
            state: "COMPLETED".into(),
            at_ms: 0,
            saga_created_at_ms: 0,
            correlation_id: "c".into(),
            order: OrderPayload {
                order_id: "o".into(),
                customer_id: "c".into(),
                items: vec![Item {
                    sku: "A".into(),
                    quantity: 1,
                }],
                amount_cents: cents,
                currency: "EUR".into(),
            },
        }
    }

    #[test]
    fn terminal_events_count_once_per_saga() {
        let mut r = Revenue::default();
        assert!(!r.apply(&event("s1", "step_succeeded", 500)));
        assert!(r.apply(&event("s1", "completed", 500)));
        assert!(
            !r.apply(&event("s1", "completed", 500)),
            "a re-delivery counts once"
        );
        assert!(r.apply(&event("s2", "compensated", 900)));
        assert!(r.apply(&event("s3", "completed", 1999)));
        assert_eq!((r.completed, r.cancelled, r.failed), (2, 1, 0));
        assert_eq!(r.revenue_cents.get("EUR"), Some(&2499));
        assert_eq!(
            r.summary(),
            "completed 2, cancelled 1, failed 0, revenue 24.99 EUR"
        );
    }
}
