//! The sled store's saga record: the saga with its definition by reference
//! to a row of the `definitions` tree (stored once per distinct content),
//! read also with the definition inline as earlier versions wrote it. It
//! must not know about anything but the record and its definition.

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{lock, Store};
use crate::{
    definition::SagaDefinition,
    engine::{Saga, SagaState, StepProgress},
    store::{
        codec::{decode, encode},
        StoreError,
    },
};

/// A saga record as written: the saga with its definition by reference
/// (`name@version#n`, a row of the `definitions` tree), so the snapshot is
/// stored once per distinct definition instead of in every record at every
/// transition (it was over half of each record's bytes).
#[derive(Serialize)]
pub(super) struct SagaRecordOut<'a> {
    pub(super) saga: SagaOut<'a>,
}

#[derive(Serialize)]
pub(super) struct SagaOut<'a> {
    pub(super) id: &'a str,
    pub(super) definition_ref: &'a str,
    pub(super) order: &'a saga_wire::OrderPayload,
    pub(super) correlation_id: &'a str,
    pub(super) idempotency_key: &'a Option<String>,
    pub(super) state: &'a SagaState,
    pub(super) steps: &'a [StepProgress],
    pub(super) reason: &'a Option<String>,
    pub(super) created_at_ms: u64,
    pub(super) updated_at_ms: u64,
    pub(super) seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) deadline_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(super) signals: &'a [crate::engine::ReceivedSignal],
    /// Set on a snapshot of an ended saga: one written since a saga leaving
    /// its end writes a snapshot too (`journal::snapshot_due`), so such a
    /// record is the saga's latest state and a read needs no journal.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) ended_is_latest: bool,
}

/// A saga record as read: the definition by reference, or inline (records
/// written before `definition_ref` existed).
#[derive(Debug, Deserialize)]
pub(super) struct SagaRecordIn {
    pub(super) saga: SagaIn,
}

#[derive(Debug, Deserialize)]
pub(super) struct SagaIn {
    pub(super) id: String,
    #[serde(default)]
    pub(super) definition: Option<Arc<SagaDefinition>>,
    #[serde(default)]
    pub(super) definition_ref: Option<String>,
    pub(super) order: saga_wire::OrderPayload,
    pub(super) correlation_id: String,
    pub(super) idempotency_key: Option<String>,
    pub(super) state: SagaState,
    pub(super) steps: Vec<StepProgress>,
    pub(super) reason: Option<String>,
    pub(super) created_at_ms: u64,
    pub(super) updated_at_ms: u64,
    pub(super) seq: u64,
    #[serde(default)]
    pub(super) deadline_at_ms: Option<u64>,
    #[serde(default)]
    pub(super) signals: Vec<crate::engine::ReceivedSignal>,
    /// Absent from records of earlier versions: their reads fold the journal.
    #[serde(default)]
    pub(super) ended_is_latest: bool,
}

/// The definitions saga records refer to, in memory: by the `Arc` the
/// runner's sagas share (so naming it costs no encoding) and by reference.
#[derive(Default)]
pub(super) struct DefinitionRefs {
    pub(super) by_arc: Vec<(std::sync::Weak<SagaDefinition>, String)>,
    pub(super) by_ref: HashMap<String, Arc<SagaDefinition>>,
}

impl Store {
    pub(super) fn refs(&self) -> std::sync::MutexGuard<'_, DefinitionRefs> {
        lock(&self.refs)
    }

    /// The reference of `def` in the `definitions` tree, stored there the
    /// first time (a write sled's next flush covers, before the records
    /// that name it). The same `name@version` with other content (a file
    /// edited in place and reloaded) gets a reference of its own.
    pub(super) fn definition_ref(&self, def: &Arc<SagaDefinition>) -> Result<String, StoreError> {
        let mut refs = self.refs();
        if let Some((_, r)) = refs
            .by_arc
            .iter()
            .find(|(weak, _)| weak.upgrade().is_some_and(|d| Arc::ptr_eq(&d, def)))
        {
            return Ok(r.clone());
        }
        let bytes = encode(&**def)?;
        let prefix = format!("{}#", def.id());
        let mut found = None;
        let mut taken = 0;
        for kv in self.definitions.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            taken += 1;
            if v.as_ref() == bytes.as_slice() {
                found = Some(String::from_utf8_lossy(&k).into_owned());
                break;
            }
        }
        let r = match found {
            Some(r) => r,
            None => {
                let r = format!("{prefix}{taken}");
                self.definitions.insert(r.as_bytes(), bytes)?;
                r
            }
        };
        // Definitions dropped since (reloaded away) leave the list on a miss only.
        refs.by_arc.retain(|(weak, _)| weak.strong_count() > 0);
        refs.by_arc.push((Arc::downgrade(def), r.clone()));
        refs.by_ref.insert(r.clone(), def.clone());
        Ok(r)
    }

    /// The definition a record refers to.
    pub(super) fn resolve_definition(&self, r: &str) -> Result<Arc<SagaDefinition>, StoreError> {
        if let Some(def) = self.refs().by_ref.get(r) {
            return Ok(def.clone());
        }
        let bytes = self
            .definitions
            .get(r.as_bytes())?
            .ok_or_else(|| StoreError::Corrupt(format!("saga record names unknown definition {r}")))?;
        let def: Arc<SagaDefinition> = Arc::new(decode(&bytes, "definition snapshot")?);
        Ok(self.refs().by_ref.entry(r.to_string()).or_insert(def).clone())
    }

    pub(super) fn encode_record(&self, saga: &Saga) -> Result<Vec<u8>, StoreError> {
        // Every field by name: a field added to `Saga` must be added here.
        let Saga {
            id,
            definition,
            order,
            correlation_id,
            idempotency_key,
            state,
            steps,
            reason,
            created_at_ms,
            updated_at_ms,
            seq,
            deadline_at_ms,
            signals,
        } = saga;
        let definition_ref = self.definition_ref(definition)?;
        encode(&SagaRecordOut {
            saga: SagaOut {
                id,
                definition_ref: &definition_ref,
                order,
                correlation_id,
                idempotency_key,
                state,
                steps,
                reason,
                created_at_ms: *created_at_ms,
                updated_at_ms: *updated_at_ms,
                seq: *seq,
                deadline_at_ms: *deadline_at_ms,
                signals,
                ended_is_latest: state.is_terminal(),
            },
        })
    }

    /// A record's definition: inline (records of earlier versions) or by reference.
    pub(super) fn record_definition(
        &self,
        id: &str,
        inline: Option<Arc<SagaDefinition>>,
        by_ref: Option<String>,
    ) -> Result<Arc<SagaDefinition>, StoreError> {
        match (inline, by_ref) {
            (Some(inline), _) => Ok(inline),
            (None, Some(r)) => self.resolve_definition(&r),
            (None, None) => Err(StoreError::Corrupt(format!("saga record {id} has no definition"))),
        }
    }

    pub(super) fn decode_record(&self, bytes: &[u8]) -> Result<Saga, StoreError> {
        self.decode_snapshot(bytes).map(|(saga, _)| saga)
    }

    /// A record, and whether it is the saga's latest state (an ended saga's
    /// snapshot written by this version: no journal entry follows it).
    pub(super) fn decode_snapshot(&self, bytes: &[u8]) -> Result<(Saga, bool), StoreError> {
        let SagaIn {
            id,
            definition,
            definition_ref,
            order,
            correlation_id,
            idempotency_key,
            state,
            steps,
            reason,
            created_at_ms,
            updated_at_ms,
            seq,
            deadline_at_ms,
            signals,
            ended_is_latest,
        } = decode::<SagaRecordIn>(bytes, "saga record")?.saga;
        let definition = self.record_definition(&id, definition, definition_ref)?;
        let latest = ended_is_latest && state.is_terminal();
        let saga = Saga {
            id,
            definition,
            order,
            correlation_id,
            idempotency_key,
            state,
            steps,
            reason,
            created_at_ms,
            updated_at_ms,
            seq,
            deadline_at_ms,
            signals,
        };
        Ok((saga, latest))
    }
}
