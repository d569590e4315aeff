//! The runner's durable timers in memory: what [`engine::timers`] lists for
//! every in-flight saga, ordered by due time. Nothing here is stored: a
//! saga's timers are part of its record (an await's or a sleep's `due_at_ms`,
//! the saga's `deadline_at_ms`), so a restart arms them again from the sagas
//! it resumes, and one that came due while the coordinator was down fires at
//! once. An entry is the saga's 16-byte id, its due time and which timer:
//! the saga itself may be evicted from memory meanwhile.

use std::collections::BTreeSet;

use uuid::Uuid;

use crate::engine::{self, Saga, Timer};

/// The timers armed, earliest first.
#[derive(Debug, Default)]
pub(super) struct Timers {
    queue: BTreeSet<(u64, Uuid, Timer)>,
}

impl Timers {
    /// Arms what `next` lists and disarms what `previous` listed but `next`
    /// does not (`None`: a saga not armed before, or gone now).
    pub(super) fn rearm(&mut self, previous: Option<&Saga>, next: Option<&Saga>) {
        let old = previous.map(engine::timers).unwrap_or_default();
        let new = next.map(engine::timers).unwrap_or_default();
        if old == new {
            return;
        }
        let Some(id) = previous.or(next).and_then(|s| Uuid::parse_str(&s.id).ok()) else {
            return;
        };
        for (due, timer) in old.iter().filter(|t| !new.contains(t)) {
            self.queue.remove(&(*due, id, *timer));
        }
        for (due, timer) in new {
            self.queue.insert((due, id, timer));
        }
    }

    /// When the earliest timer fires.
    pub(super) fn next_due(&self) -> Option<u64> {
        self.queue.first().map(|(due, _, _)| *due)
    }

    /// Takes up to `limit` timers due at `now_ms`, earliest first.
    pub(super) fn take_due(&mut self, now_ms: u64, limit: usize) -> Vec<(Uuid, Timer)> {
        let mut out = Vec::new();
        while out.len() < limit {
            match self.queue.first() {
                Some((due, _, _)) if *due <= now_ms => {}
                _ => break,
            }
            if let Some((_, id, timer)) = self.queue.pop_first() {
                out.push((id, timer));
            }
        }
        out
    }

    /// How many are armed.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saga(deadline: Option<u64>) -> Saga {
        let def = crate::store::fixtures::two_step_order();
        let order = saga_wire::OrderPayload {
            order_id: "o".into(),
            customer_id: "c".into(),
            items: vec![saga_wire::Item {
                sku: "A".into(),
                quantity: 1,
            }],
            amount_cents: 1,
            currency: "EUR".into(),
        };
        let mut s = engine::create(Uuid::now_v7().to_string(), def.into(), order, "c".into(), None, 0).saga;
        s.deadline_at_ms = deadline;
        s
    }

    #[test]
    fn timers_are_armed_replaced_and_taken_in_due_order() {
        let mut t = Timers::default();
        let (a, b) = (saga(Some(500)), saga(Some(100)));
        t.rearm(None, Some(&a));
        t.rearm(None, Some(&b));
        assert_eq!((t.len(), t.next_due()), (2, Some(100)));
        // Unchanged: nothing moves; the deadline moved: replaced, not added.
        t.rearm(Some(&a), Some(&a));
        let mut a2 = a.clone();
        a2.deadline_at_ms = Some(50);
        t.rearm(Some(&a), Some(&a2));
        assert_eq!((t.len(), t.next_due()), (2, Some(50)));
        assert!(t.take_due(49, 10).is_empty());
        let ids = |v: Vec<(Uuid, Timer)>| v.into_iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(t.take_due(1_000, 1)), std::slice::from_ref(&a.id));
        assert_eq!(ids(t.take_due(1_000, 10)), std::slice::from_ref(&b.id));
        assert_eq!(t.len(), 0);
        // A saga gone (finished, released): disarmed.
        t.rearm(None, Some(&b));
        t.rearm(Some(&b), None);
        assert_eq!(t.len(), 0);
    }
}
