//! The console's write actions: abort, retry, and both in bulk over a
//! filtered selection. Each goes through `SagaService` with the operator
//! token the page sent (`X-Saga-Operator-Token`), so it is checked (and a
//! refusal logged and counted) exactly as for gRPC; the token itself is
//! never logged, stored or echoed.

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use saga_proto::names::state as state_name;
use saga_proto::pb::{self, saga_service_server::SagaService};
use serde::Deserialize;
use serde_json::json;
use tonic::{metadata::MetadataValue, Request};

use super::{pages::ListParams, Console};

/// At most this many sagas per bulk action (the count is shown first).
const BULK_MAX: usize = 1000;

/// A JSON `{"error": …}` answer.
pub(super) fn refused(code: StatusCode, why: String) -> Response {
    (code, Json(json!({ "error": why }))).into_response()
}

fn status_code(s: &tonic::Status) -> StatusCode {
    match s.code() {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn from_status(s: &tonic::Status) -> Response {
    let why = match s.code() {
        tonic::Code::Unauthenticated => {
            "the operator token is needed for this (asked once per tab)".to_string()
        }
        tonic::Code::PermissionDenied => format!("refused: {}", s.message()),
        _ => s.message().to_string(),
    };
    refused(status_code(s), why)
}

/// The header the page sends the operator token in (`Authorization` may
/// hold the browser's Basic credentials for `--console-token`).
const OPERATOR_TOKEN_HEADER: &str = "x-saga-operator-token";

/// `message` as a tonic request carrying the caller's operator token as
/// `authorization: Bearer`, the way the operator RPCs take it.
fn authorized<T>(headers: &HeaderMap, message: T) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(v) = headers
        .get(OPERATOR_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| MetadataValue::try_from(format!("Bearer {}", t.trim())).ok())
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AbortBody {
    #[serde(default)]
    reason: String,
}

/// `POST /console/api/sagas/{id}/abort` `{"reason": …}`.
pub(super) async fn abort(
    State(c): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Option<Json<AbortBody>>,
) -> Response {
    let reason = body.map(|Json(b)| b.reason).unwrap_or_default();
    let req = authorized(&headers, pb::AbortSagaRequest { saga_id: id, reason });
    match c.api.abort_saga(req).await {
        Ok(r) => answer(&r.into_inner()),
        Err(s) => from_status(&s),
    }
}

/// `POST /console/api/sagas/{id}/retry`.
pub(super) async fn retry(State(c): State<Console>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    match c
        .api
        .retry_saga(authorized(&headers, pb::RetrySagaRequest { saga_id: id }))
        .await
    {
        Ok(r) => answer(&r.into_inner()),
        Err(s) => from_status(&s),
    }
}

fn answer(r: &pb::OperatorResponse) -> Response {
    Json(json!({ "saga_id": r.saga_id, "state": state_name(r.state) })).into_response()
}

/// A bulk action: the list filters, then `confirm: false` for the count
/// alone, or `confirm: true` with the count the operator saw.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BulkBody {
    action: String,
    /// The list page's filters (`page` and `fragment` are ignored).
    #[serde(default)]
    filters: ListParams,
    #[serde(default)]
    confirm: bool,
    #[serde(default)]
    expected: Option<usize>,
    #[serde(default)]
    reason: String,
}

/// `POST /console/api/bulk`: retry the FAILED sagas, or abort the running
/// ones, of a filtered selection (the state filter is the action's own).
pub(super) async fn bulk(
    State(c): State<Console>,
    headers: HeaderMap,
    body: Option<Json<BulkBody>>,
) -> Response {
    let Some(Json(b)) = body else {
        return refused(
            StatusCode::BAD_REQUEST,
            "a JSON body {action, filters, confirm} is needed".into(),
        );
    };
    // The token first: without it not even the count is given.
    if let Err(s) = c.api.authorize_operator(&authorized(&headers, ()), "ConsoleBulk") {
        return from_status(&s);
    }
    let states: &[&str] = match b.action.as_str() {
        "retry" => &["failed"],
        "abort" => &["pending", "running"],
        other => {
            return refused(
                StatusCode::BAD_REQUEST,
                format!("action: `{other}` is not retry or abort"),
            )
        }
    };
    if !b.filters.state.is_empty() && !states.contains(&b.filters.state.to_ascii_lowercase().as_str()) {
        return Json(json!({ "count": 0, "done": 0, "refused": 0 })).into_response();
    }
    let mut ids = Vec::new();
    for state in states {
        let params = ListParams {
            state: (*state).into(),
            page: String::new(),
            ..b.filters.clone()
        };
        let mut req = match params.request(1000) {
            Ok(r) => r,
            Err(e) => return refused(StatusCode::BAD_REQUEST, e),
        };
        loop {
            let page = match c.api.list_sagas(Request::new(req.clone())).await {
                Ok(p) => p.into_inner(),
                Err(s) => return from_status(&s),
            };
            ids.extend(page.sagas.into_iter().map(|s| s.saga_id));
            if ids.len() > BULK_MAX {
                return refused(
                    StatusCode::BAD_REQUEST,
                    format!("more than {BULK_MAX} sagas selected: narrow the filters"),
                );
            }
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
    }
    if !b.confirm {
        return Json(json!({ "count": ids.len() })).into_response();
    }
    if b.expected != Some(ids.len()) {
        return refused(
            StatusCode::CONFLICT,
            format!(
                "the selection changed: {} sagas now, {} confirmed; look again",
                ids.len(),
                b.expected.map_or_else(|| "none".to_string(), |n| n.to_string())
            ),
        );
    }
    let (mut done, mut refused_n, mut first_error) = (0usize, 0usize, None);
    for id in &ids {
        let result = match b.action.as_str() {
            "retry" => {
                c.api
                    .retry_saga(authorized(&headers, pb::RetrySagaRequest { saga_id: id.clone() }))
                    .await
            }
            _ => {
                let reason = match b.reason.trim() {
                    "" => "operator bulk abort (console)".to_string(),
                    r => r.to_string(),
                };
                c.api
                    .abort_saga(authorized(
                        &headers,
                        pb::AbortSagaRequest {
                            saga_id: id.clone(),
                            reason,
                        },
                    ))
                    .await
            }
        };
        match result {
            Ok(_) => done += 1,
            Err(s) => {
                refused_n += 1;
                first_error.get_or_insert_with(|| format!("{id}: {}", s.message()));
            }
        }
    }
    tracing::warn!(action = %b.action, done, refused = refused_n, "console bulk action");
    Json(json!({ "count": ids.len(), "done": done, "refused": refused_n, "first_error": first_error }))
        .into_response()
}
