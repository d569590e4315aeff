//! The console's pages: the saga list with its counts and filters, one saga
//! (live while it runs), the definitions drawn as graphs. Every page reads
//! through `SagaService` or an index; maud escapes everything it renders.

use std::{
    convert::Infallible,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{
        sse::{Event, KeepAlive, Sse},
        Html, IntoResponse, Redirect, Response,
    },
};
use futures::{Stream, StreamExt};
use maud::{html, Markup, DOCTYPE};
use saga_core::plan::{mermaid_id, Plan};
use saga_proto::names::{is_terminal, state as state_name, step_status as step_status_name};
use saga_proto::pb::{self, saga_service_server::SagaService};
use serde::Deserialize;
use tonic::Request;
use uuid::Uuid;

use super::Console;
use crate::engine::{StateTag, StepStatus};

/// Sagas per list page.
const PAGE: u32 = 50;
/// How long the counts per state are reused: a page view never scans the
/// state index more than once per interval, however many tabs are open.
const COUNTS_FRESH_FOR: Duration = Duration::from_secs(2);

/// The states in the order the counts show them.
const STATES: [StateTag; 6] = [
    StateTag::Running,
    StateTag::Compensating,
    StateTag::Failed,
    StateTag::Pending,
    StateTag::Completed,
    StateTag::Compensated,
];

pub(super) async fn home() -> Redirect {
    Redirect::to("/console/sagas")
}

/// The list's query string: the filters, the page token, and whether only
/// the rows are wanted (the script's refresh).
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct ListParams {
    #[serde(default)]
    pub(super) state: String,
    #[serde(default)]
    pub(super) definition: String,
    #[serde(default)]
    pub(super) customer: String,
    #[serde(default)]
    pub(super) order: String,
    /// Created at or after (`datetime-local`, UTC, or RFC 3339).
    #[serde(default)]
    pub(super) from: String,
    /// Created before.
    #[serde(default)]
    pub(super) to: String,
    #[serde(default)]
    pub(super) page: String,
    #[serde(default)]
    pub(super) fragment: String,
}

impl ListParams {
    /// The `ListSagas` request these filters make, newest first.
    ///
    /// # Errors
    /// A state or a time the console cannot read, naming the field.
    pub(super) fn request(&self, page_size: u32) -> Result<pb::ListSagasRequest, String> {
        let state = match self.state.trim() {
            "" => pb::SagaState::Unspecified,
            s => pb::SagaState::from_str_name(&format!("SAGA_STATE_{}", s.to_ascii_uppercase()))
                .ok_or_else(|| format!("state: unknown state `{s}`"))?,
        };
        Ok(pb::ListSagasRequest {
            state: state as i32,
            page_size,
            page_token: self.page.trim().to_string(),
            definition: self.definition.trim().to_string(),
            customer_id: self.customer.trim().to_string(),
            order_id: self.order.trim().to_string(),
            created_after: time_param("from", &self.from)?,
            created_before: time_param("to", &self.to)?,
            newest_first: true,
        })
    }

    /// This query string with `page` set to `token` (for the next page's link).
    fn with_page(&self, token: &str) -> String {
        let pairs = [
            ("state", &self.state),
            ("definition", &self.definition),
            ("customer", &self.customer),
            ("order", &self.order),
            ("from", &self.from),
            ("to", &self.to),
        ];
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs.iter().filter(|(_, v)| !v.trim().is_empty()) {
            q.append_pair(k, v.trim());
        }
        q.append_pair("page", token);
        format!("/console/sagas?{}", q.finish())
    }
}

/// A time filter: empty, an RFC 3339 time, or the browser's `datetime-local`
/// (`2026-12-03T10:15`, read as UTC).
fn time_param(field: &str, value: &str) -> Result<Option<prost_types::Timestamp>, String> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let with_seconds = if v.len() == 16 {
        format!("{v}:00")
    } else {
        v.to_string()
    };
    humantime::parse_rfc3339_weak(&with_seconds)
        .map(|t| Some(prost_types::Timestamp::from(t)))
        .map_err(|_| format!("{field}: `{v}` is not a time (2026-12-03T10:15 or RFC 3339)"))
}

/// `GET /console/sagas`: counts, filters, the newest sagas first, paged.
pub(super) async fn sagas(State(c): State<Console>, Query(p): Query<ListParams>) -> Response {
    let listed = match p.request(PAGE) {
        Ok(req) => c
            .api
            .list_sagas(Request::new(req))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_string()),
        Err(e) => Err(e),
    };
    if !p.fragment.is_empty() {
        return match listed {
            Ok(page) => Html(rows(&page.sagas).into_string()).into_response(),
            Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
        };
    }
    let counts = counts(&c).await;
    let status = if listed.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let defs: Vec<String> = {
        let current = c.catalog.current();
        let mut names: Vec<String> = current.all().map(|d| d.name.clone()).collect();
        names.dedup();
        names
    };
    let body = html! {
        h1 { "Sagas" }
        div.counts {
            @for (tag, n) in &counts {
                @let name = tag.as_str();
                a class=(if p.state.eq_ignore_ascii_case(name) { "on" } else { "" })
                  href={ "/console/sagas?state=" (name.to_ascii_lowercase()) } data-state=(name) {
                    span.state.(name) { (name) } b { (n.map_or_else(|| "–".to_string(), |n| n.to_string())) }
                }
            }
            a class=(if p.state.is_empty() { "on" } else { "" }) href="/console/sagas" { span.state { "ALL" } b { "" } }
        }
        @if counts.iter().all(|(_, n)| n.is_none()) {
            p.muted { "This store (" (c.store.name()) ") keeps no state index to count from." }
        }
        form #filters method="get" action="/console/sagas" {
            label { "state"
                select name="state" {
                    option value="" { "any" }
                    @for tag in STATES {
                        option value=(tag.as_str().to_ascii_lowercase()) selected[p.state.eq_ignore_ascii_case(tag.as_str())] { (tag.as_str()) }
                    }
                }
            }
            label { "definition"
                input name="definition" list="definition-names" value=(p.definition) placeholder="order or order@1";
                datalist #definition-names { @for d in &defs { option value=(d) {} } }
            }
            label { "customer id" input name="customer" value=(p.customer); }
            label { "order id" input name="order" value=(p.order); }
            label { "created from (UTC)" input type="datetime-local" name="from" value=(p.from); }
            label { "created before (UTC)" input type="datetime-local" name="to" value=(p.to); }
            button type="submit" { "Filter" }
            a href="/console/sagas" { "clear" }
        }
        div.actions {
            button data-action="bulk-retry" title="Retry every FAILED saga the filters select" { "Retry FAILED in this selection…" }
            button.danger data-action="bulk-abort" title="Abort every running saga the filters select" { "Abort running in this selection…" }
        }
        @match &listed {
            Ok(page) => {
                table #sagas {
                    thead { tr { th { "saga" } th { "state" } th { "definition" } th { "current step" } th { "order" } th { "customer" } th { "created" } th { "updated" } } }
                    tbody data-live[p.page.is_empty()] { (rows(&page.sagas)) }
                }
                div.pager {
                    @if !p.page.is_empty() { a href="/console/sagas" { "← newest" } }
                    @if !page.next_page_token.is_empty() { a #older href=(p.with_page(&page.next_page_token)) { "older →" } }
                }
            }
            Err(e) => { div.flash.error { (e) } }
        }
    };
    (status, layout("Sagas", &c, body)).into_response()
}

fn rows(sagas: &[pb::SagaSummary]) -> Markup {
    html! {
        @for s in sagas {
            @let state = state_name(s.state);
            tr data-saga=(s.saga_id) {
                td.mono { a href={ "/console/sagas/" (s.saga_id) } { (s.saga_id) } }
                td { span.state.(state) { (state) } }
                td { (s.definition) }
                td { (s.current_step) }
                td { (s.order_id) }
                td { (s.customer_id) }
                td.mono { (ts(s.created_at.as_ref())) }
                td.mono { (ts(s.updated_at.as_ref())) }
            }
        }
        @if sagas.is_empty() { tr { td colspan="8" .muted { "No saga matches." } } }
    }
}

/// The counts per state, at most [`COUNTS_FRESH_FOR`] old; `None` per
/// state where the store cannot count.
async fn counts(c: &Console) -> Vec<(StateTag, Option<usize>)> {
    let cached = match c.counts.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let fresh = match cached {
        Some((at, counts)) if at.elapsed() < COUNTS_FRESH_FOR => Some(counts),
        _ => match c.store.count_by_state().await {
            Ok(Some(counts)) => {
                if let Ok(mut g) = c.counts.lock() {
                    *g = Some((Instant::now(), counts.clone()));
                }
                Some(counts)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "console: counting sagas failed");
                None
            }
        },
    };
    STATES
        .iter()
        .map(|tag| {
            (
                *tag,
                fresh
                    .as_ref()
                    .map(|f| f.iter().find(|(t, _)| t == tag).map_or(0, |(_, n)| *n)),
            )
        })
        .collect()
}

/// `GET /console/sagas/{id}`.
pub(super) async fn saga(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let got = c
        .api
        .get_saga(Request::new(pb::GetSagaRequest { saga_id: id.clone() }))
        .await;
    let saga = match got {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let code = match s.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let body = html! { h1 { "Saga" } div.flash.error { (s.message()) } };
            return (code, layout("Saga", &c, body)).into_response();
        }
    };
    let raw = match Uuid::parse_str(&saga.saga_id) {
        Ok(uuid) => match c.store.get(&uuid).await {
            Ok(Some(s)) => serde_json::to_string_pretty(&s).unwrap_or_default(),
            _ => String::new(),
        },
        Err(_) => String::new(),
    };
    let terminal = is_terminal(saga.state);
    let body = html! {
        div #saga data-live-saga=[(!terminal).then_some(saga.saga_id.as_str())] { (saga_body(&saga)) }
        h2 { "Raw record (as the page was loaded)" }
        pre.mono #raw { (raw) }
    };
    layout(&format!("Saga {}", saga.saga_id), &c, body).into_response()
}

/// What the live view replaces: header, actions, timeline, outputs, history.
fn saga_body(s: &pb::Saga) -> Markup {
    let state = state_name(s.state);
    let terminal = is_terminal(s.state);
    html! {
        h1 { "Saga " span.mono { (s.saga_id) } " " span.state.(state) #saga-state { (state) } }
        dl.header-grid {
            dt { "definition" } dd { a href={ "/console/definitions?saga=" (s.saga_id) } { (s.definition) } " (graph of its path)" }
            dt { "order" } dd { (s.order_id) " · customer " (s.customer_id) " · " (money(s.amount_cents, &s.currency)) " · "
                @for (i, item) in s.items.iter().enumerate() { @if i > 0 { ", " } (item.sku) " × " (item.quantity) } }
            dt { "correlation id" } dd.mono { (s.correlation_id) }
            @if !s.idempotency_key.is_empty() { dt { "idempotency key" } dd.mono { (s.idempotency_key) } }
            @if !s.current_step.is_empty() { dt { "current step" } dd { (s.current_step) } }
            @if !s.reason.is_empty() { dt { "reason" } dd { (s.reason) } }
            dt { "created" } dd.mono { (ts(s.created_at.as_ref())) }
            dt { "updated" } dd.mono { (ts(s.updated_at.as_ref())) }
            @if let Some(d) = &s.deadline_at { dt { "deadline" } dd.mono { (ts(Some(d))) } }
            @if !s.kept_signals.is_empty() { dt { "signals kept" } dd { (s.kept_signals.join(", ")) } }
        }
        div.actions {
            @if !terminal { button.danger data-action="abort" data-saga=(s.saga_id) { "Abort…" } }
            @if s.state == pb::SagaState::Failed as i32 { button data-action="retry" data-saga=(s.saga_id) { "Retry" } }
            @if terminal { span.muted { "Finished: the page no longer updates." } } @else { span.muted #live-note { "Live: this page follows the saga." } }
        }
        h2 { "Steps" }
        div.timeline {
            @for group in groups(&s.steps) {
                div.group {
                    @for st in group {
                        @let status = step_status_name(st.status);
                        div class={ "step " (status) } data-step=(st.name) {
                            b { (st.name) } " " span.state.(status) { (status) }
                            div.meta {
                                @match st.kind.as_str() {
                                    "await" => { "await " (st.signal) }
                                    "sleep" => { "sleep" }
                                    _ => { (st.participant) "." (st.action) @if !st.compensation.is_empty() { " · undo " (st.compensation) } }
                                }
                                " · attempts " (st.attempts)
                                @if st.compensation_attempts > 0 { " · undo attempts " (st.compensation_attempts) }
                                @if st.duration_ms > 0 { " · " (st.duration_ms) " ms" }
                            }
                            @if !st.last_outcome.is_empty() { div.meta { "last: " (st.last_outcome) } }
                            @if !st.when.is_empty() { div.meta { "when " code { (st.when) } } }
                            @if let Some(d) = &st.due_at { div.meta { "timer due " (ts(Some(d))) } }
                        }
                    }
                }
            }
        }
        h2 { "Step inputs and outputs" }
        table #io {
            thead { tr { th { "step" } th { "input (JSON)" } th { "output (JSON)" } th { "compensation input (JSON)" } } }
            tbody {
                @for st in s.steps.iter().filter(|st| !(st.input_json.is_empty() && st.output_json.is_empty() && st.compensation_input_json.is_empty())) {
                    tr { td { (st.name) } td.mono { (st.input_json) } td.mono { (st.output_json) } td.mono { (st.compensation_input_json) } }
                }
            }
        }
        p.muted { "Every command also carries the order above; the inputs are each step's `input:` mapping over it and the outputs before it." }
        h2 { "History" }
        table #history {
            thead { tr { th { "#" } th { "at" } th { "event" } th { "step" } th { "attempt" } th { "detail" } th { "state" } } }
            tbody {
                @for h in &s.history {
                    tr { td { (h.seq) } td.mono { (ts(h.at.as_ref())) } td { (h.kind) } td { (h.step) }
                         td { @if h.attempt > 0 { (h.attempt) } } td { (h.detail) } td { (state_name(h.state)) } }
                }
            }
        }
    }
}

/// Steps in definition order, one inner list per group (a `parallel:`
/// group's steps side by side).
fn groups(steps: &[pb::Step]) -> Vec<Vec<&pb::Step>> {
    let mut out: Vec<Vec<&pb::Step>> = Vec::new();
    for st in steps {
        match out.last_mut() {
            Some(g) if g.first().is_some_and(|f| f.group == st.group) => g.push(st),
            _ => out.push(vec![st]),
        }
    }
    out
}

/// `GET /console/sagas/{id}/live`: the saga body re-rendered at every
/// transition (the `WatchSaga` stream), then `end` once it is terminal.
pub(super) async fn live(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let watch = c
        .api
        .watch_saga(Request::new(pb::WatchSagaRequest { saga_id: id }))
        .await;
    let stream = match watch {
        Ok(r) => r.into_inner(),
        Err(s) => return (StatusCode::NOT_FOUND, s.message().to_string()).into_response(),
    };
    Sse::new(updates(stream))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn updates(
    stream: impl Stream<Item = Result<pb::Saga, tonic::Status>> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    // WatchSaga's stream itself ends once the saga is terminal.
    stream.flat_map(|item| {
        let events = match item {
            Ok(s) => {
                let mut v = vec![Event::default().event("saga").data(saga_body(&s).into_string())];
                if is_terminal(s.state) {
                    v.push(Event::default().event("end").data("terminal"));
                }
                v
            }
            Err(e) => vec![Event::default().event("end").data(e.message())],
        };
        futures::stream::iter(events.into_iter().map(Ok))
    })
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct DefinitionParams {
    #[serde(default)]
    saga: String,
}

/// `GET /console/definitions`: every loaded version as a graph, or with
/// `?saga=` that saga's definition with the path it took marked.
pub(super) async fn definitions(State(c): State<Console>, Query(p): Query<DefinitionParams>) -> Response {
    let marked = match p.saga.trim() {
        "" => None,
        id => match Uuid::parse_str(id) {
            Ok(uuid) => match c.store.get(&uuid).await {
                Ok(Some(s)) => Some(s),
                Ok(None) => {
                    let body = html! { h1 { "Definitions" } div.flash.error { "saga " (id) " not found" } };
                    return (StatusCode::NOT_FOUND, layout("Definitions", &c, body)).into_response();
                }
                Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
            },
            Err(_) => {
                let body =
                    html! { h1 { "Definitions" } div.flash.error { "saga: `" (id) "` is not a saga id" } };
                return (StatusCode::BAD_REQUEST, layout("Definitions", &c, body)).into_response();
            }
        },
    };
    let body = match &marked {
        Some(s) => {
            let graph = format!("{}{}", Plan::of(&s.definition).render_mermaid(), path_classes(s));
            html! {
                h1 { "Path of saga " a.mono href={ "/console/sagas/" (s.id) } { (s.id) } }
                p { (s.definition.id()) " · " span.state.(s.state.tag().as_str()) { (s.state.tag().as_str()) }
                    " · green: done, amber: undone, red: failed, blue: in progress, grey: skipped" }
                pre.mermaid { (graph) }
            }
        }
        None => {
            let current = c.catalog.current();
            html! {
                h1 { "Definitions" }
                @for d in current.all() {
                    h2 #(d.id()) { (d.id()) }
                    p.muted { (d.source.display()) " · " (d.steps.len()) " steps"
                        @if let Some(dl) = d.deadline { " · deadline " (humantime::format_duration(dl)) } }
                    pre.mermaid { (Plan::of(d).render_mermaid()) }
                }
            }
        }
    };
    layout("Definitions", &c, body).into_response()
}

/// Mermaid class lines that colour a saga's steps by what happened to them.
fn path_classes(s: &crate::engine::Saga) -> String {
    let mut out = String::from(
        "  classDef done fill:#d1fadf,stroke:#12b76a\n  classDef undone fill:#fef0c7,stroke:#f79009\n  \
         classDef failed fill:#fee4e2,stroke:#d92d20\n  classDef active fill:#dbe7ff,stroke:#2f5bd3\n  \
         classDef skipped fill:#f2f4f7,stroke:#98a2b3,stroke-dasharray:3 3\n",
    );
    for (def, st) in s.definition.steps.iter().zip(&s.steps) {
        let id = mermaid_id(&def.name);
        let class = match st.status {
            StepStatus::Succeeded => "done",
            StepStatus::Compensated => "undone",
            StepStatus::Rejected
            | StepStatus::Unknown
            | StepStatus::CompensationFailed
            | StepStatus::Failed => "failed",
            StepStatus::Running | StepStatus::Compensating | StepStatus::Waiting | StepStatus::Sleeping => {
                "active"
            }
            StepStatus::Skipped => "skipped",
            StepStatus::Pending => continue,
        };
        out.push_str(&format!("  class s_{id} {class}\n"));
        if matches!(st.status, StepStatus::Compensated | StepStatus::Compensating)
            && def.compensation.is_some()
        {
            let undo = if st.status == StepStatus::Compensated {
                "undone"
            } else {
                "active"
            };
            out.push_str(&format!("  class u_{id} {undo}\n"));
        }
    }
    let end = match s.state.tag() {
        StateTag::Completed => "  class completed done\n",
        StateTag::Compensated => "  class compensated undone\n",
        _ => "",
    };
    out.push_str(end);
    out
}

fn layout(title: &str, c: &Console, body: Markup) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="saga-csrf" content=(c.csrf);
                title { (title) " · saga console" }
                link rel="stylesheet" href="/console/assets/console.css";
            }
            body {
                header {
                    a.brand href="/console/sagas" { "saga console" }
                    a href="/console/sagas" { "Sagas" }
                    a href="/console/sagas?state=running" { "Running" }
                    a href="/console/sagas?state=failed" { "FAILED (dead letters)" }
                    a href="/console/definitions" { "Definitions" }
                    span.right { button data-action="forget-token" title="Forget the operator token this tab keeps" { "Forget token" } }
                }
                main {
                    div #flash {}
                    (body)
                }
                script src="/console/assets/mermaid.min.js" {}
                script src="/console/assets/console.js" {}
            }
        }
    };
    Html(page.into_string())
}

fn ts(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return String::new() };
    let (Ok(secs), Ok(nanos)) = (u64::try_from(t.seconds), u32::try_from(t.nanos)) else {
        return String::new();
    };
    let at = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    humantime::format_rfc3339_millis(at).to_string()
}

fn money(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, (cents % 100).abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_link_keeps_the_filters_encoded_and_reads_back() {
        let p = ListParams {
            state: "failed".into(),
            customer: " a&b=c d ".into(),
            order: "ö/1".into(),
            ..ListParams::default()
        };
        let link = p.with_page("tok+/=");
        assert_eq!(
            link,
            "/console/sagas?state=failed&customer=a%26b%3Dc+d&order=%C3%B6%2F1&page=tok%2B%2F%3D"
        );
        let query = link.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let back: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let get = |k: &str| back.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            (get("customer"), get("order"), get("page")),
            (Some("a&b=c d"), Some("ö/1"), Some("tok+/="))
        );
    }
}
