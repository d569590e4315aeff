//! `saga.v1.SagaService` over tonic: input validation, mapping between the
//! protobuf messages and the engine's types, and the single place where
//! internal errors become gRPC statuses.
//!
//! Untrusted input is checked here and only here; a request that fails a
//! check changes nothing and gets `INVALID_ARGUMENT` naming the field.
//! Reads go straight to the store; creations and operator actions go
//! through the runner. Operator RPCs (`AbortSaga`, `RetrySaga`) need
//! `authorization: Bearer <operator token>` (compared exactly, in constant
//! time): missing or malformed → `UNAUTHENTICATED`,
//! wrong (or none configured) → `PERMISSION_DENIED`, checked before anything else;
//! each refusal is logged at warn (method, peer, reason; never the token) and counted.
//!
//! Limits: a request is at most [`MAX_REQUEST_BYTES`]; at most 100 items;
//! ids, SKUs and reasons at most 128 characters without control characters.

use std::time::Duration;

use prost_types::Timestamp;
use saga_proto::pb::{self, saga_service_server::SagaService};
use saga_wire::{CommandKind, Item, OrderPayload};
use tonic::{Request, Response, Status};
use tracing::warn;
use uuid::Uuid;

use crate::{
    cluster::Router,
    definition::{Catalog, Definitions},
    engine::{self, Event, HistoryEntry, Saga, SignalRefused, StateTag, StepStatus},
    partition::Ownership,
    runner::{CreateError, Created, NewSaga, OperateError, Operated, RunnerHandle},
    store::{query, ListQuery, SharedStore, StoreError},
};

/// Largest accepted gRPC request, in bytes.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// gRPC metadata key that carries the caller's correlation id.
pub(crate) const CORRELATION_METADATA: &str = "x-correlation-id";
/// Default and largest `ListSagas` page.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
const MAX_TEXT: usize = 128;

/// The service implementation.
pub(crate) struct SagaApi {
    store: SharedStore,
    definitions: Catalog,
    runner: RunnerHandle,
    operator_token: Option<String>,
    /// Where operator events and signals go (jetstream store: sagas held elsewhere to their holder).
    router: Router<RunnerHandle>,
    /// jetstream store: where a creation only another coordinator may make is sent.
    forward: Option<(async_nats::Client, Ownership)>,
    /// Oldest saga `RetrySaga` may resume (zero: no limit), see `Config::command_horizon`.
    command_horizon: std::time::Duration,
}

impl SagaApi {
    /// A service reading `store`, creating and operating through `runner`;
    /// operator RPCs need `operator_token` (refused when `None`).
    pub(crate) fn new(
        store: SharedStore,
        definitions: Catalog,
        runner: RunnerHandle,
        operator_token: Option<String>,
    ) -> Self {
        SagaApi {
            store,
            definitions,
            router: Router::local(runner.clone()),
            forward: None,
            runner,
            // An empty token means none: it must never match an empty bearer.
            operator_token: operator_token.filter(|t| !t.is_empty()),
            command_horizon: std::time::Duration::ZERO,
        }
    }

    /// jetstream store: operator events for sagas whose partition is not
    /// held here are forwarded over `nats` to the coordinator holding it, and
    /// so are creations only that one may make ([`crate::create_forward`]).
    pub(crate) fn with_forwarding(mut self, nats: async_nats::Client, ownership: Ownership) -> Self {
        self.router = self.router.forwarding(nats.clone(), ownership.clone());
        self.forward = Some((nats, ownership));
        self
    }

    /// Where operator events and signals go.
    pub(crate) fn router(&self) -> Router<RunnerHandle> {
        self.router.clone()
    }

    /// `RetrySaga` and `AbortSaga` refuse sagas started longer than `horizon`
    /// ago (zero: no limit).
    pub(crate) fn with_command_horizon(mut self, horizon: std::time::Duration) -> Self {
        self.command_horizon = horizon;
        self
    }

    /// A retry re-sends commands under their original idempotency keys, and
    /// an abort's compensations look up the forward replies stored under
    /// theirs; past the horizon the participants may have forgotten those
    /// keys: a repeated command would be applied again, a compensation would
    /// find nothing to undo.
    async fn check_horizon(&self, id: &Uuid) -> Result<(), Status> {
        if self.command_horizon.is_zero() {
            return Ok(());
        }
        let Some(saga) = self.store.get(id).await.map_err(store_status)? else {
            return Ok(()); // The runner answers NOT_FOUND.
        };
        if let Some(age) =
            crate::engine::past_command_horizon(&saga, self.command_horizon, crate::clock::now_ms())
        {
            return Err(Status::failed_precondition(format!(
                "saga {id} started {} ago, past the command horizon ({}): its participants may have \
                 forgotten its commands' idempotency keys, so a command could be applied twice or a \
                 compensation find nothing to undo; reconcile it by hand",
                humantime::format_duration(std::time::Duration::from_secs(age.as_secs())),
                humantime::format_duration(self.command_horizon),
            )));
        }
        Ok(())
    }

    /// Checks the caller's bearer token for an operator RPC `method`; a
    /// refusal is logged and counted (see [`authorize`]).
    fn authorize<T>(&self, request: &Request<T>, method: &str) -> Result<(), Status> {
        authorize(self.operator_token.as_deref(), request, method)
    }

    /// The operator-token check of the operator RPCs, for an action made of
    /// several of them (the console's bulk actions check before counting).
    ///
    /// # Errors
    /// As the operator RPCs: `UNAUTHENTICATED`, `PERMISSION_DENIED`.
    pub(crate) fn authorize_operator<T>(&self, request: &Request<T>, method: &str) -> Result<(), Status> {
        self.authorize(request, method)
    }

    async fn operate(&self, saga_id: Uuid, event: Event, verb: &str) -> Result<pb::OperatorResponse, Status> {
        match self.router.operate(saga_id, event).await {
            Ok(Operated::Changed(state)) => Ok(pb::OperatorResponse {
                saga_id: saga_id.to_string(),
                state: state_to_pb(state) as i32,
            }),
            Ok(Operated::Unchanged(state) | Operated::Signalled(_, state)) => {
                Err(Status::failed_precondition(format!(
                    "saga {saga_id} is {}: nothing to {verb}",
                    state.as_str()
                )))
            }
            Err(e) => Err(operate_status(e)),
        }
    }
}

/// The status of an operator event or a signal that could not be applied.
pub(crate) fn operate_status(e: OperateError) -> Status {
    match e {
        OperateError::NotFound(id) => Status::not_found(format!("saga {id} not found")),
        OperateError::Store(e) => store_status(e),
        OperateError::Refused(why @ SignalRefused::UnknownName { .. }) => invalid("name", why),
        OperateError::Refused(why @ SignalRefused::Payload { .. }) => {
            Status::invalid_argument(why.to_string())
        }
        OperateError::Refused(why) => Status::failed_precondition(why.to_string()),
        e @ (OperateError::Stopped | OperateError::NotStarted | OperateError::Elsewhere(_)) => {
            Status::unavailable(e.to_string())
        }
    }
}

/// A saga as `GetSaga` shows it, and whether it is terminal.
async fn view(store: &SharedStore, id: &Uuid) -> Result<Option<(pb::Saga, bool)>, Status> {
    let Some((saga, history)) = store.get_with_history(id).await.map_err(store_status)? else {
        return Ok(None);
    };
    Ok(Some((saga_to_pb(&saga, &history), saga.state.is_terminal())))
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Corrupt(_) => Status::data_loss(e.to_string()),
        StoreError::Sled(_) | StoreError::JetStream(_) | StoreError::Unavailable(_) => {
            Status::unavailable(e.to_string())
        }
    }
}

/// `value` without surrounding whitespace (what a client meant), checked
/// with saga-wire's id rules, the ones the participants apply again.
fn text(field: &str, value: &str) -> Result<String, Status> {
    let v = value.trim();
    saga_wire::check_id(field, v).map_err(field_status)?;
    Ok(v.to_string())
}

fn field_status(e: saga_wire::FieldError) -> Status {
    invalid(&e.field, e.reason)
}

/// Validates a `CreateOrderRequest` into a [`NewSaga`]: the one boundary
/// where an order from outside becomes a closed type (also a fuzz target,
/// through [`crate::check_create_order`]).
///
/// # Errors
/// `INVALID_ARGUMENT` naming the first bad field.
pub(crate) fn validate_create(
    req: pb::CreateOrderRequest,
    definitions: &Definitions,
    correlation_id: String,
) -> Result<NewSaga, Status> {
    let name = if req.definition.trim().is_empty() {
        "order"
    } else {
        req.definition.trim()
    };
    let version = (req.definition_version != 0).then_some(req.definition_version);
    let definition = definitions.get(name, version).ok_or_else(|| match version {
        Some(v) if definitions.get(name, None).is_some() => invalid(
            "definition_version",
            format!("definition `{name}` has no version {v}"),
        ),
        _ => invalid("definition", format!("unknown saga definition `{name}`")),
    })?;
    // Normalized here (surrounding whitespace, the defaults); every rule on
    // the values is saga-wire's, the one the participants check again.
    let order_id_given = !req.order_id.trim().is_empty();
    let order_id = if order_id_given {
        req.order_id.trim().to_string()
    } else {
        Uuid::new_v4().to_string()
    };
    let currency = match req.currency.trim() {
        "" => "EUR".to_string(),
        c => c.to_string(),
    };
    let idempotency_key = match req.idempotency_key.trim() {
        "" => None,
        k => Some(text("idempotency_key", k)?),
    };
    let order = OrderPayload {
        order_id,
        customer_id: req.customer_id.trim().to_string(),
        items: req
            .items
            .iter()
            .map(|i| Item {
                sku: i.sku.trim().to_string(),
                quantity: i.quantity,
            })
            .collect(),
        amount_cents: req.amount_cents,
        currency,
    };
    order.validate().map_err(field_status)?;
    // The definition's own contract (its `input_schema`), after the engine's.
    let input = serde_json::to_value(&order).map_err(|e| Status::internal(e.to_string()))?;
    definitions
        .check_input(&definition, &input)
        .map_err(Status::invalid_argument)?;
    Ok(NewSaga {
        definition,
        version_requested: version.is_some(),
        order,
        order_id_given,
        correlation_id,
        idempotency_key,
    })
}

/// Why an operator RPC was refused: the `reason` label of
/// [`telemetry::OPERATOR_AUTH_FAILURES`] and of the warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    /// No token is configured: operator RPCs are off.
    Disabled,
    /// No `authorization` metadata.
    Missing,
    /// `authorization` is there but not `Bearer <token>` (another scheme,
    /// not ASCII, an empty token).
    Malformed,
    /// A bearer token that is not the operator token.
    Wrong,
}

impl AuthFailure {
    fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Disabled => "disabled",
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Wrong => "wrong",
        }
    }

    fn status(self) -> Status {
        match self {
            AuthFailure::Disabled => Status::permission_denied(
                "operator RPCs are disabled: start the coordinator with --operator-token",
            ),
            AuthFailure::Missing | AuthFailure::Malformed => {
                Status::unauthenticated("operator RPC: `authorization: Bearer <token>` metadata required")
            }
            AuthFailure::Wrong => Status::permission_denied("operator RPC: invalid token"),
        }
    }
}

/// The bearer check itself: `header` (the `authorization` value) must be
/// exactly `Bearer <expected>`, compared in constant time, nothing trimmed.
fn check_bearer(expected: Option<&str>, header: Option<&[u8]>) -> Result<(), AuthFailure> {
    use subtle::ConstantTimeEq;
    let Some(expected) = expected.filter(|t| !t.is_empty()) else {
        return Err(AuthFailure::Disabled);
    };
    let Some(header) = header else {
        return Err(AuthFailure::Missing);
    };
    let given = match header.strip_prefix(b"Bearer ") {
        Some(t) if !t.is_empty() => t,
        _ => return Err(AuthFailure::Malformed),
    };
    if bool::from(given.ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(AuthFailure::Wrong)
    }
}

/// Checks an operator RPC's bearer token; a refusal is logged at warn
/// (method, peer address, reason; never the token) and counted in
/// `saga_operator_auth_failures_total{reason}`.
fn authorize<T>(expected: Option<&str>, request: &Request<T>, method: &str) -> Result<(), Status> {
    let header = request.metadata().get("authorization").map(|v| v.as_bytes());
    check_bearer(expected, header).map_err(|failure| {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        warn!(method, peer, reason = failure.as_str(), "operator RPC refused");
        metrics::counter!(crate::telemetry::OPERATOR_AUTH_FAILURES, "reason" => failure.as_str())
            .increment(1);
        failure.status()
    })
}

/// The client's trace context (`traceparent`, `tracestate` metadata), if valid.
fn client_trace<T>(req: &Request<T>) -> Option<saga_trace::SpanContext> {
    let text = |key: &str| req.metadata().get(key).and_then(|v| v.to_str().ok());
    saga_trace::propagation::parse(text("traceparent")?, text("tracestate"))
}

/// The caller's `x-correlation-id` when it is a sane token, else a new UUID.
fn correlation_id<T>(req: &Request<T>) -> String {
    checked_correlation_id(
        req.metadata()
            .get(CORRELATION_METADATA)
            .and_then(|v| v.to_str().ok()),
    )
}

/// A caller's correlation id if it is acceptable, else a fresh one.
pub(crate) fn checked_correlation_id(given: Option<&str>) -> String {
    given
        .map(str::trim)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_TEXT
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
        })
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

/// Validates a `ListSagasRequest` into the store's [`ListQuery`].
///
/// # Errors
/// `INVALID_ARGUMENT` naming the first bad field.
pub(crate) fn list_query(req: &pb::ListSagasRequest) -> Result<ListQuery, Status> {
    let limit = match req.page_size {
        0 => DEFAULT_PAGE,
        n if n > MAX_PAGE => return Err(invalid("page_size", format!("must be at most {MAX_PAGE}"))),
        n => n,
    };
    let optional = |field: &str, v: &str| match v.trim() {
        "" => Ok(None),
        v => text(field, v).map(Some),
    };
    let definition = match req.definition.trim() {
        "" => None,
        d if d.contains('@') => Some(saga_wire::check_definition("definition", d).map(|()| d.to_string())),
        d => Some(saga_wire::check_name("definition", d).map(|()| d.to_string())),
    }
    .transpose()
    .map_err(field_status)?;
    let query = ListQuery {
        state: state_from_pb(req.state)?,
        definition,
        customer_id: optional("customer_id", &req.customer_id)?,
        order_id: optional("order_id", &req.order_id)?,
        created_from_ms: req
            .created_after
            .as_ref()
            .map(|t| millis("created_after", t))
            .transpose()?,
        created_before_ms: req
            .created_before
            .as_ref()
            .map(|t| millis("created_before", t))
            .transpose()?,
        newest_first: req.newest_first,
        after: match req.page_token.trim() {
            "" => None,
            t => Some(parse_saga_id("page_token", t)?),
        },
        limit: limit as usize,
    };
    if let (Some(from), Some(before)) = (query.created_from_ms, query.created_before_ms) {
        if from >= before {
            return Err(invalid("created_before", "must be later than created_after"));
        }
    }
    Ok(query)
}

/// A timestamp as ms since the epoch; before 1970 or malformed is refused.
fn millis(field: &str, t: &Timestamp) -> Result<u64, Status> {
    let seconds = u64::try_from(t.seconds).map_err(|_| invalid(field, "must not be before 1970"))?;
    let nanos = u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| invalid(field, "nanos must be 0 to 999,999,999"))?;
    seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(u64::from(nanos / 1_000_000)))
        .ok_or_else(|| invalid(field, "too far in the future"))
}

fn parse_saga_id(field: &str, id: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(id.trim()).map_err(|_| invalid(field, format!("`{id}` is not a saga id (UUID)")))
}

fn timestamp(ms: u64) -> Timestamp {
    let d = Duration::from_millis(ms);
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Protobuf enum value of a state tag.
pub(crate) fn state_to_pb(tag: StateTag) -> pb::SagaState {
    match tag {
        StateTag::Pending => pb::SagaState::Pending,
        StateTag::Running => pb::SagaState::Running,
        StateTag::Compensating => pb::SagaState::Compensating,
        StateTag::Completed => pb::SagaState::Completed,
        StateTag::Compensated => pb::SagaState::Compensated,
        StateTag::Failed => pb::SagaState::Failed,
    }
}

fn state_from_pb(value: i32) -> Result<Option<StateTag>, Status> {
    match pb::SagaState::try_from(value) {
        Ok(pb::SagaState::Unspecified) => Ok(None),
        Ok(pb::SagaState::Pending) => Ok(Some(StateTag::Pending)),
        Ok(pb::SagaState::Running) => Ok(Some(StateTag::Running)),
        Ok(pb::SagaState::Compensating) => Ok(Some(StateTag::Compensating)),
        Ok(pb::SagaState::Completed) => Ok(Some(StateTag::Completed)),
        Ok(pb::SagaState::Compensated) => Ok(Some(StateTag::Compensated)),
        Ok(pb::SagaState::Failed) => Ok(Some(StateTag::Failed)),
        Err(_) => Err(invalid("state", format!("unknown state value {value}"))),
    }
}

fn step_status(s: StepStatus) -> pb::StepStatus {
    match s {
        StepStatus::Pending => pb::StepStatus::Pending,
        StepStatus::Running => pb::StepStatus::Running,
        StepStatus::Succeeded => pb::StepStatus::Succeeded,
        StepStatus::Rejected => pb::StepStatus::Rejected,
        StepStatus::Unknown => pb::StepStatus::Unknown,
        StepStatus::Compensating => pb::StepStatus::Compensating,
        StepStatus::Compensated => pb::StepStatus::Compensated,
        StepStatus::CompensationFailed => pb::StepStatus::CompensationFailed,
        StepStatus::Failed => pb::StepStatus::Failed,
        StepStatus::Waiting => pb::StepStatus::Waiting,
        StepStatus::Sleeping => pb::StepStatus::Sleeping,
        StepStatus::Skipped => pb::StepStatus::Skipped,
    }
}

fn items_to_pb(items: &[Item]) -> Vec<pb::OrderItem> {
    items
        .iter()
        .map(|i| pb::OrderItem {
            sku: i.sku.clone(),
            quantity: i.quantity,
        })
        .collect()
}

/// The input step `k`'s command of `kind` was sent with, as JSON: empty before its
/// first attempt and when the step declares none.
fn sent_input(saga: &Saga, k: usize, kind: CommandKind, attempts: u32) -> String {
    match engine::step_input(saga, k, kind) {
        Some(v) if attempts > 0 && !v.is_null() => v.to_string(),
        _ => String::new(),
    }
}

/// The full protobuf view of a saga and its history.
pub(crate) fn saga_to_pb(saga: &Saga, history: &[HistoryEntry]) -> pb::Saga {
    let steps = saga
        .definition
        .steps
        .iter()
        .zip(&saga.steps)
        .enumerate()
        .map(|(i, (d, p))| pb::Step {
            name: d.name.clone(),
            participant: d.participant.clone(),
            action: d.action.clone(),
            compensation: d.compensation.clone().unwrap_or_default(),
            status: step_status(p.status) as i32,
            attempts: p.attempts,
            compensation_attempts: p.compensation_attempts,
            last_outcome: p.last_outcome.clone().unwrap_or_default(),
            started_at: p.started_at_ms.map(timestamp),
            finished_at: p.finished_at_ms.map(timestamp),
            duration_ms: match (p.started_at_ms, p.finished_at_ms) {
                (Some(a), Some(b)) => b.saturating_sub(a),
                _ => 0,
            },
            group: u32::try_from(saga.definition.group_of(i)).unwrap_or(u32::MAX),
            on_failure: d.on_failure.as_str().to_string(),
            kind: d.kind.as_str().to_string(),
            signal: d.awaits().unwrap_or_default().to_string(),
            due_at: p.due_at_ms.map(timestamp),
            signal_id: p.signal_id.clone().unwrap_or_default(),
            output_json: p.output.as_ref().map(|o| o.to_string()).unwrap_or_default(),
            when: d
                .when
                .as_ref()
                .map(|w| w.source().to_string())
                .unwrap_or_default(),
            input_json: sent_input(saga, i, CommandKind::Forward, p.attempts),
            compensation_input_json: sent_input(saga, i, CommandKind::Compensate, p.compensation_attempts),
        })
        .collect();
    let history = history
        .iter()
        .map(|h| pb::HistoryEvent {
            seq: h.seq,
            at: Some(timestamp(h.at_ms)),
            kind: h.kind.as_str().to_string(),
            step: h.step.clone().unwrap_or_default(),
            attempt: h.attempt.unwrap_or(0),
            detail: h.detail.clone().unwrap_or_default(),
            state: state_to_pb(h.state) as i32,
        })
        .collect();
    pb::Saga {
        saga_id: saga.id.clone(),
        definition: saga.definition.id(),
        state: state_to_pb(saga.state.tag()) as i32,
        current_step: query::current_step(saga),
        steps,
        history,
        created_at: Some(timestamp(saga.created_at_ms)),
        updated_at: Some(timestamp(saga.updated_at_ms)),
        order_id: saga.order.order_id.clone(),
        customer_id: saga.order.customer_id.clone(),
        items: items_to_pb(&saga.order.items),
        amount_cents: saga.order.amount_cents,
        currency: saga.order.currency.clone(),
        reason: saga.reason.clone().unwrap_or_default(),
        correlation_id: saga.correlation_id.clone(),
        idempotency_key: saga.idempotency_key.clone().unwrap_or_default(),
        deadline_at: saga.deadline_at_ms.map(timestamp),
        kept_signals: saga.signals.iter().map(|s| s.name.clone()).collect(),
    }
}

/// What `CreateOrder` answers for what the runner did.
fn create_response(created: Created) -> pb::CreateOrderResponse {
    match created {
        Created::New { saga_id, order_id } => pb::CreateOrderResponse {
            saga_id,
            order_id,
            created: true,
            state: pb::SagaState::Running as i32,
        },
        Created::Existing {
            saga_id,
            order_id,
            state,
        } => pb::CreateOrderResponse {
            saga_id,
            order_id,
            created: false,
            state: state_to_pb(state) as i32,
        },
    }
}

/// The status of a creation that failed.
fn create_status(e: CreateError) -> Status {
    match e {
        CreateError::KeyReused(_) => Status::already_exists(format!("idempotency_key: {e}")),
        CreateError::Store(e) => store_status(e),
        CreateError::Stopped
        | CreateError::NotStarted
        | CreateError::NoPartition
        | CreateError::Lost
        | CreateError::HeldElsewhere(_) => Status::unavailable(e.to_string()),
    }
}

impl crate::create_forward::CreateHere for SagaApi {
    /// A creation forwarded by another coordinator: checked as a gRPC request
    /// is (size, encoding, fields), and never forwarded again (a holder that
    /// lost the partition meanwhile refuses, and the client retries).
    async fn create_here(
        &self,
        request: bytes::Bytes,
        correlation_id: Option<String>,
    ) -> Result<pb::CreateOrderResponse, Status> {
        use prost::Message;
        let correlation_id = checked_correlation_id(correlation_id.as_deref());
        let checked = match request.len() {
            n if n > MAX_REQUEST_BYTES => Err(Status::invalid_argument(format!(
                "forwarded creation of {n} bytes is over the limit of {MAX_REQUEST_BYTES}"
            ))),
            _ => pb::CreateOrderRequest::decode(request)
                .map_err(|e| Status::invalid_argument(format!("malformed forwarded creation: {e}")))
                .and_then(|req| validate_create(req, &self.definitions.current(), correlation_id.clone())),
        };
        let new = checked.inspect_err(|status| {
            warn!(correlation_id, error = %status.message(), "forwarded creation refused");
        })?;
        let created = self.runner.create(new).await.map_err(create_status)?;
        Ok(create_response(created))
    }
}

#[tonic::async_trait]
impl SagaService for SagaApi {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let started = std::time::SystemTime::now();
        let correlation_id = correlation_id(&request);
        let client_trace = saga_trace::spans().and(client_trace(&request));
        let req = request.into_inner();
        // Kept only where a creation may have to go to another coordinator.
        let sent = self.forward.as_ref().map(|_| req.clone());
        let new = validate_create(req, &self.definitions.current(), correlation_id)?;
        let correlation_id = new.correlation_id.clone();
        let created = match (self.runner.create(new).await, &self.forward, sent) {
            (Err(CreateError::HeldElsewhere(saga_id)), Some((nats, ownership)), Some(req)) => {
                let forwarded = crate::create_forward::forward(
                    nats,
                    ownership.partitions(),
                    &saga_id,
                    &req,
                    &correlation_id,
                )
                .await?;
                return Ok(Response::new(forwarded));
            }
            (created, _, _) => created.map_err(create_status)?,
        };
        if let Some(spans) = saga_trace::spans() {
            let (saga_id, fresh) = match &created {
                Created::New { saga_id, .. } => (saga_id, true),
                Created::Existing { saga_id, .. } => (saga_id, false),
            };
            if let Some(span) =
                crate::saga_spans::create_order(saga_id, &correlation_id, started, fresh, client_trace)
            {
                spans.emit(span);
            }
        }
        Ok(Response::new(create_response(created)))
    }

    async fn get_saga(&self, request: Request<pb::GetSagaRequest>) -> Result<Response<pb::Saga>, Status> {
        let raw = request.into_inner().saga_id;
        let id = parse_saga_id("saga_id", &raw)?;
        let (saga, _) = view(&self.store, &id)
            .await?
            .ok_or_else(|| Status::not_found(format!("saga {id} not found")))?;
        Ok(Response::new(saga))
    }

    type WatchSagaStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Saga, Status>> + Send>>;

    async fn watch_saga(
        &self,
        request: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        let id = parse_saga_id("saga_id", &request.into_inner().saga_id)?;
        // Subscribe before reading, so no transition falls in between.
        let mut changes = self.runner.subscribe(&id.to_string());
        let (mut saga, mut history) = self
            .store
            .get_with_history(&id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("saga {id} not found")))?;
        // jetstream store: the saga may run on another coordinator, whose
        // transitions wake nobody here; look again every 200 ms as well.
        let poll = self.store.capabilities().shared;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut sent = history.len();
            if tx.send(Ok(saga_to_pb(&saga, &history))).await.is_err() || saga.state.is_terminal() {
                return;
            }
            loop {
                let more = tokio::select! {
                    _ = tx.closed() => return,
                    more = changes.changed() => more,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)), if poll => true,
                };
                // The transition handed over when it continues what is known,
                // else (missed ones, a poll) the latest durable state.
                let known = history.len() as u64;
                let handed = changes.latest().filter(|c| {
                    c.history.first().is_some_and(|h| h.seq <= known + 1)
                        && c.history.last().is_some_and(|h| h.seq > known)
                });
                match handed {
                    Some(change) => {
                        history.extend(change.history.iter().filter(|h| h.seq > known).cloned());
                        saga = change.saga.clone();
                    }
                    None => match store.get_with_history(&id).await {
                        Ok(Some(latest)) => (saga, history) = latest,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(store_status(e))).await;
                            return;
                        }
                    },
                }
                let terminal = saga.state.is_terminal();
                // Nothing new (a poll between transitions): nothing to send.
                if history.len() != sent || terminal {
                    sent = history.len();
                    if tx.send(Ok(saga_to_pb(&saga, &history))).await.is_err() || terminal {
                        return;
                    }
                }
                if !more {
                    let _ = tx
                        .send(Err(Status::unavailable("the coordinator is shutting down")))
                        .await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let query = list_query(&request.into_inner())?;
        let page = self.store.list(&query).await.map_err(|e| {
            warn!(error = %e, "list failed");
            store_status(e)
        })?;
        let sagas = page
            .sagas
            .into_iter()
            .map(|s| pb::SagaSummary {
                definition: s.definition(),
                state: state_to_pb(s.state) as i32,
                created_at: Some(timestamp(s.created_at_ms)),
                updated_at: Some(timestamp(s.updated_at_ms)),
                saga_id: s.id,
                current_step: s.current_step,
                order_id: s.order_id,
                customer_id: s.customer_id,
            })
            .collect();
        Ok(Response::new(pb::ListSagasResponse {
            sagas,
            next_page_token: page.next.map(|u| u.to_string()).unwrap_or_default(),
        }))
    }

    async fn abort_saga(
        &self,
        request: Request<pb::AbortSagaRequest>,
    ) -> Result<Response<pb::OperatorResponse>, Status> {
        self.authorize(&request, "AbortSaga")?;
        let req = request.into_inner();
        let id = parse_saga_id("saga_id", &req.saga_id)?;
        let reason = match req.reason.trim() {
            "" => "operator abort".to_string(),
            r => text("reason", r)?,
        };
        // An abort compensates with the forward replies the participants stored.
        self.check_horizon(&id).await?;
        tracing::warn!(saga_id = %id, reason, "operator abort");
        Ok(Response::new(
            self.operate(id, Event::Abort { reason }, "abort").await?,
        ))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::OperatorResponse>, Status> {
        self.authorize(&request, "RetrySaga")?;
        let id = parse_saga_id("saga_id", &request.into_inner().saga_id)?;
        self.check_horizon(&id).await?;
        tracing::warn!(saga_id = %id, "operator retry");
        Ok(Response::new(
            self.operate(id, Event::Retry, "retry (only FAILED sagas are retried)")
                .await?,
        ))
    }

    async fn signal_saga(
        &self,
        request: Request<pb::SignalSagaRequest>,
    ) -> Result<Response<pb::SignalSagaResponse>, Status> {
        self.authorize(&request, "SignalSaga")?;
        let req = request.into_inner();
        let payload_bytes = req.payload_json.len();
        let payload = match req.payload_json.trim() {
            "" => serde_json::Value::Null,
            json => {
                serde_json::from_str(json).map_err(|e| invalid("payload_json", format!("not JSON: {e}")))?
            }
        };
        let signal = saga_wire::SignalRequest {
            saga_id: req.saga_id,
            name: req.name,
            signal_id: req.signal_id,
            payload,
        };
        signal.check(payload_bytes).map_err(field_status)?;
        let (id, event) = crate::signals::event(signal).map_err(field_status)?;
        let (fate, state) = crate::signals::deliver(&self.router, id, event)
            .await
            .map_err(operate_status)?;
        Ok(Response::new(pb::SignalSagaResponse {
            saga_id: id.to_string(),
            outcome: fate.as_str().to_string(),
            state: state_to_pb(state) as i32,
        }))
    }

    async fn list_definitions(
        &self,
        _request: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        let definitions = self
            .definitions
            .current()
            .all()
            .map(|d| pb::Definition {
                name: d.name.clone(),
                version: d.version,
                source_file: d.source.display().to_string(),
                steps: d
                    .steps
                    .iter()
                    .map(|s| pb::DefinitionStep {
                        name: s.name.clone(),
                        participant: s.participant.clone(),
                        action: s.action.clone(),
                        compensation: s.compensation.clone().unwrap_or_default(),
                        timeout_ms: u64::try_from(s.timeout.as_millis()).unwrap_or(u64::MAX),
                        max_attempts: s.retry.max_attempts,
                        kind: s.kind.as_str().to_string(),
                        signal: s.awaits().unwrap_or_default().to_string(),
                        when: s
                            .when
                            .as_ref()
                            .map(|w| w.source().to_string())
                            .unwrap_or_default(),
                    })
                    .collect(),
                deadline_ms: d
                    .deadline
                    .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect();
        Ok(Response::new(pb::ListDefinitionsResponse { definitions }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::definition;

    fn defs() -> Definitions {
        let yaml = "name: order\nversion: 1\nsteps:\n  - name: a\n    participant: p\n    action: x\n    compensation: none\n";
        let mut d = Definitions::default();
        d.insert(definition::parse(Path::new("t.yaml"), yaml).expect("valid"))
            .expect("insert");
        d
    }

    fn good() -> pb::CreateOrderRequest {
        pb::CreateOrderRequest {
            customer_id: "c-1".into(),
            items: vec![pb::OrderItem {
                sku: "A-1".into(),
                quantity: 2,
            }],
            amount_cents: 1999,
            ..Default::default()
        }
    }

    fn field_error(req: pb::CreateOrderRequest) -> String {
        match validate_create(req, &defs(), "c".into()) {
            Ok(_) => panic!("expected INVALID_ARGUMENT"),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::InvalidArgument);
                s.message().to_string()
            }
        }
    }

    #[test]
    fn a_good_request_gets_defaults() {
        let n = validate_create(good(), &defs(), "c".into()).expect("valid");
        assert_eq!(n.order.currency, "EUR");
        assert!(!n.order_id_given && !n.order.order_id.is_empty());
        assert_eq!(n.definition.id(), "order@1");
        assert_eq!(n.idempotency_key, None);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(pb::CreateOrderRequest, &str)> = vec![
            (
                pb::CreateOrderRequest {
                    customer_id: " ".into(),
                    ..good()
                },
                "customer_id:",
            ),
            (
                pb::CreateOrderRequest {
                    items: vec![],
                    ..good()
                },
                "items:",
            ),
            (
                pb::CreateOrderRequest {
                    items: vec![pb::OrderItem {
                        sku: "".into(),
                        quantity: 1,
                    }],
                    ..good()
                },
                "items[0].sku:",
            ),
            (
                pb::CreateOrderRequest {
                    items: vec![pb::OrderItem {
                        sku: "A".into(),
                        quantity: 0,
                    }],
                    ..good()
                },
                "items[0].quantity:",
            ),
            (
                pb::CreateOrderRequest {
                    amount_cents: 0,
                    ..good()
                },
                "amount_cents:",
            ),
            (
                pb::CreateOrderRequest {
                    amount_cents: -5,
                    ..good()
                },
                "amount_cents:",
            ),
            (
                pb::CreateOrderRequest {
                    currency: "euro".into(),
                    ..good()
                },
                "currency:",
            ),
            (
                pb::CreateOrderRequest {
                    definition: "nope".into(),
                    ..good()
                },
                "definition:",
            ),
            (
                pb::CreateOrderRequest {
                    definition_version: 7,
                    ..good()
                },
                "definition_version:",
            ),
            (
                pb::CreateOrderRequest {
                    customer_id: "x".repeat(200),
                    ..good()
                },
                "customer_id:",
            ),
        ];
        for (req, prefix) in cases {
            let msg = field_error(req);
            assert!(msg.starts_with(prefix), "{msg} should start with {prefix}");
        }
    }

    #[test]
    fn saga_ids_and_states_are_checked() {
        assert_eq!(
            parse_saga_id("saga_id", "nope").map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            state_from_pb(99).map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            state_from_pb(pb::SagaState::Failed as i32).ok(),
            Some(Some(StateTag::Failed))
        );
    }

    const TOKEN: &str = "operator-token-0123456789";

    #[test]
    fn the_bearer_token_is_compared_exactly() {
        let check = |header: Option<&str>| check_bearer(Some(TOKEN), header.map(str::as_bytes));
        assert_eq!(check(Some(&format!("Bearer {TOKEN}"))), Ok(()));
        assert_eq!(check(None), Err(AuthFailure::Missing));
        for malformed in ["", "Bearer ", "Basic abc", &format!("bearer {TOKEN}"), TOKEN] {
            assert_eq!(
                check(Some(malformed)),
                Err(AuthFailure::Malformed),
                "{malformed:?}"
            );
        }
        // Surrounding spaces are not trimmed: the token is not the same bytes.
        for wrong in [
            format!("Bearer  {TOKEN}"),
            format!("Bearer {TOKEN} "),
            format!("Bearer {TOKEN}\t"),
            format!("Bearer {}", &TOKEN[1..]),
            format!("Bearer {TOKEN}x"),
        ] {
            assert_eq!(check(Some(&wrong)), Err(AuthFailure::Wrong), "{wrong:?}");
        }
        assert_eq!(
            check_bearer(None, Some(format!("Bearer {TOKEN}").as_bytes())),
            Err(AuthFailure::Disabled)
        );
        assert_eq!(
            check_bearer(Some(""), Some(b"Bearer ")),
            Err(AuthFailure::Disabled)
        );
    }

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            self.0
                .lock()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        }
    }

    #[test]
    fn refusals_are_logged_with_method_peer_and_reason_but_never_the_token() {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let request = |header: Option<String>| {
            let mut r = Request::new(());
            if let Some(h) = header {
                r.metadata_mut()
                    .insert("authorization", h.parse().expect("ascii metadata"));
            }
            r
        };
        let near_miss = format!("{TOKEN} ");
        tracing::subscriber::with_default(subscriber, || {
            assert!(authorize(
                Some(TOKEN),
                &request(Some(format!("Bearer {TOKEN}"))),
                "AbortSaga"
            )
            .is_ok());
            let wrong = authorize(
                Some(TOKEN),
                &request(Some(format!("Bearer {near_miss}"))),
                "RetrySaga",
            );
            assert_eq!(wrong.map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
            let missing = authorize(Some(TOKEN), &request(None), "AbortSaga");
            assert_eq!(missing.map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
            let malformed = authorize(Some(TOKEN), &request(Some("Basic x".into())), "AbortSaga");
            assert_eq!(malformed.map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        });
        let text = logs.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].contains("WARN") && lines[0].contains("operator RPC refused"),
            "{text}"
        );
        assert!(
            lines[0].contains("method=\"RetrySaga\"") || lines[0].contains("method=RetrySaga"),
            "{text}"
        );
        assert!(
            lines[0].contains("reason=\"wrong\"") || lines[0].contains("reason=wrong"),
            "{text}"
        );
        assert!(lines[0].contains("peer="), "{text}");
        assert!(
            lines[1].contains("missing") && lines[2].contains("malformed"),
            "{text}"
        );
        assert!(!text.contains(TOKEN), "the token was logged: {text}");
    }
}
