//! What `ListSagas` asks a store for: filters, a direction and a page. Pure:
//! every store scans what it can narrow by its own indexes and keeps the
//! sagas [`ListQuery::matches`] accepts, so the stores cannot disagree on
//! what a filter means.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::engine::{Saga, SagaState, StateTag, StepStatus};

/// At most this many candidate sagas are examined for one page: a filter
/// that matches rarely inside the index a store scans ends the page early
/// with a token to go on, instead of reading the whole store in one call.
pub(crate) const SCAN_BUDGET: usize = 10_000;

/// Saga ids are UUID v7 made from the same clock as `created_at_ms`, moments
/// apart; a time range is narrowed on the ids with this margin (a clock
/// step between the two reads) and then checked exactly on the records.
const ID_TIME_SLACK_MS: u64 = 60_000;

/// One `ListSagas` page request; every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ListQuery {
    pub state: Option<StateTag>,
    /// A definition name (any version), or `name@version`.
    pub definition: Option<String>,
    pub customer_id: Option<String>,
    pub order_id: Option<String>,
    /// Created at or after this time (ms since the epoch).
    pub created_from_ms: Option<u64>,
    /// Created before this time (ms since the epoch, exclusive).
    pub created_before_ms: Option<u64>,
    /// Newest first (else oldest first).
    pub newest_first: bool,
    /// The previous page's token: this page starts strictly past it.
    pub after: Option<Uuid>,
    pub limit: usize,
}

impl ListQuery {
    /// Up to `limit` sagas past `after`, oldest first, only in `state` when given.
    #[cfg(test)]
    pub(crate) fn page(state: Option<StateTag>, after: Option<Uuid>, limit: usize) -> Self {
        ListQuery {
            state,
            after,
            limit,
            ..Default::default()
        }
    }

    /// Whether the saga `s` summarises passes every filter (the cursor is
    /// not a filter).
    pub(crate) fn matches(&self, s: &Summary) -> bool {
        self.state.is_none_or(|t| s.state == t)
            && self.customer_id.as_deref().is_none_or(|c| s.customer_id == c)
            && self.order_id.as_deref().is_none_or(|o| s.order_id == o)
            && self.created_from_ms.is_none_or(|t| s.created_at_ms >= t)
            && self.created_before_ms.is_none_or(|t| s.created_at_ms < t)
            && self
                .definition
                .as_deref()
                .is_none_or(|d| match d.split_once('@') {
                    Some((name, version)) => {
                        s.definition_name == name && s.definition_version.to_string() == version
                    }
                    None => s.definition_name == d,
                })
    }

    /// The definition name the filter names (without a version).
    pub(crate) fn definition_name(&self) -> Option<&str> {
        self.definition
            .as_deref()
            .map(|d| d.split_once('@').map_or(d, |(name, _)| name))
    }

    /// The smallest and the largest saga id (inclusive) the time filters
    /// can match, by the ids' v7 timestamps, with [`ID_TIME_SLACK_MS`].
    pub(crate) fn id_bounds(&self) -> ([u8; 16], [u8; 16]) {
        let lo = match self.created_from_ms {
            Some(t) => v7_edge(t.saturating_sub(ID_TIME_SLACK_MS), 0x00),
            None => [0x00; 16],
        };
        let hi = match self.created_before_ms {
            Some(t) => v7_edge(t.saturating_add(ID_TIME_SLACK_MS), 0xff),
            None => [0xff; 16],
        };
        (lo, hi)
    }

    /// Whether `id` lies past the cursor, in the page's direction.
    pub(crate) fn past_cursor(&self, id: &Uuid) -> bool {
        match (self.after, self.newest_first) {
            (None, _) => true,
            (Some(a), false) => *id > a,
            (Some(a), true) => *id < a,
        }
    }
}

/// What a list page shows of a saga, and all that a filter reads: a page
/// is built from these, so a store can answer it from an index that keeps
/// them without reading the sagas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    pub id: String,
    pub state: StateTag,
    pub definition_name: String,
    pub definition_version: u32,
    /// The step(s) in flight (see [`current_step`]).
    pub current_step: String,
    pub order_id: String,
    pub customer_id: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Summary {
    pub(crate) fn of(saga: &Saga) -> Self {
        Summary {
            id: saga.id.clone(),
            state: saga.state.tag(),
            definition_name: saga.definition.name.clone(),
            definition_version: saga.definition.version,
            current_step: current_step(saga),
            order_id: saga.order.order_id.clone(),
            customer_id: saga.order.customer_id.clone(),
            created_at_ms: saga.created_at_ms,
            updated_at_ms: saga.updated_at_ms,
        }
    }

    /// `name@version`, as [`crate::engine::SagaDefinition::id`].
    pub(crate) fn definition(&self) -> String {
        format!("{}@{}", self.definition_name, self.definition_version)
    }

    /// What a store keeps of it beside a key that holds its id and state.
    pub(crate) fn stored(&self) -> StoredSummary<'_> {
        StoredSummary {
            definition: &self.definition_name,
            version: self.definition_version,
            current_step: &self.current_step,
            order_id: &self.order_id,
            customer_id: &self.customer_id,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        }
    }

    /// The summary [`Summary::stored`] kept of saga `id` in `state`.
    pub(crate) fn from_stored(id: &Uuid, state: StateTag, s: StoredSummaryIn) -> Self {
        Summary {
            id: id.to_string(),
            state,
            definition_name: s.definition,
            definition_version: s.version,
            current_step: s.current_step,
            order_id: s.order_id,
            customer_id: s.customer_id,
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
        }
    }
}

/// A [`Summary`] without its id and state, as a store writes it.
#[derive(Debug, Serialize)]
pub(crate) struct StoredSummary<'a> {
    definition: &'a str,
    version: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    current_step: &'a str,
    order_id: &'a str,
    customer_id: &'a str,
    created_at_ms: u64,
    updated_at_ms: u64,
}

/// [`StoredSummary`] read back.
#[derive(Debug, Deserialize)]
pub(crate) struct StoredSummaryIn {
    definition: String,
    version: u32,
    #[serde(default)]
    current_step: String,
    order_id: String,
    customer_id: String,
    created_at_ms: u64,
    updated_at_ms: u64,
}

/// The step(s) in flight: one name, or a group's names joined by `,`.
pub(crate) fn current_step(saga: &Saga) -> String {
    let busy = |status: StepStatus| match saga.state {
        SagaState::Running { .. } => status.in_flight(),
        SagaState::Compensating { .. } => status == StepStatus::Compensating,
        SagaState::Pending | SagaState::Completed | SagaState::Compensated | SagaState::Failed { .. } => {
            false
        }
    };
    saga.definition
        .steps
        .iter()
        .zip(&saga.steps)
        .filter(|(_, p)| busy(p.status))
        .map(|(d, _)| d.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A 16-byte id whose 48-bit v7 timestamp is `ms`, the rest `fill`.
fn v7_edge(ms: u64, fill: u8) -> [u8; 16] {
    let mut id = [fill; 16];
    let ms = ms.min((1 << 48) - 1).to_be_bytes();
    id[..6].copy_from_slice(&ms[2..]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_bounds_hold_every_v7_id_of_the_time_range() {
        let q = ListQuery {
            created_from_ms: Some(1_700_000_000_000),
            created_before_ms: Some(1_700_000_100_000),
            ..Default::default()
        };
        let (lo, hi) = q.id_bounds();
        for ms in [1_700_000_000_000u64, 1_700_000_050_000, 1_700_000_099_999] {
            let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
            let id = *Uuid::new_v7(ts).as_bytes();
            assert!(lo <= id && id <= hi, "{ms}");
        }
        let long_before = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, 1_600_000_000, 0));
        assert!(*long_before.as_bytes() < lo);
        assert_eq!(ListQuery::default().id_bounds(), ([0; 16], [0xff; 16]));
    }

    #[test]
    fn the_cursor_follows_the_direction() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let up = ListQuery {
            after: Some(a),
            ..Default::default()
        };
        assert!(up.past_cursor(&b) && !up.past_cursor(&a));
        let down = ListQuery {
            after: Some(b),
            newest_first: true,
            ..Default::default()
        };
        assert!(down.past_cursor(&a) && !down.past_cursor(&b));
    }

    #[test]
    fn a_definition_filter_names_a_name_or_one_version() {
        let q = |d: &str| ListQuery {
            definition: Some(d.into()),
            ..Default::default()
        };
        assert_eq!(q("order").definition_name(), Some("order"));
        assert_eq!(q("order@2").definition_name(), Some("order"));
    }
}
