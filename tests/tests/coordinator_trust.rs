//! What the coordinator must not take on trust (issue 15): participant
//! replies (an output's size and declared schema), operator bearer tokens,
//! definition files of any size, and a stream that grows without bound.
//! A real nats-server per test; where a reply must be hostile the test plays
//! the participant itself on `saga.cmd.<participant>.*`.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use saga_proto::pb::{self, SagaState};
use saga_testkit::*;
use saga_wire::Reply;
use tonic::{metadata::MetadataValue, Code};

const TOKEN: &str = "operator-token-0123456789";

fn with_bearer<T>(msg: T, header: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(h) = header {
        if let Ok(v) = MetadataValue::try_from(h) {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

/// The sum of the samples `name{…}` on `/metrics` whose labels include
/// every one of `labels` (`;`-separated `key="value"`), 0 when absent.
async fn metric(c: &RunningCoordinator, name: &str, labels: &str) -> Result<f64> {
    let (code, body) = http_get(c.http_addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.split(';').all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum())
}

// ---- operator auth ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_auth_failures_are_counted_and_a_token_with_spaces_is_refused() -> Result<()> {
    let s = System::bare(None).await?;
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.operator_token = Some(TOKEN.into());
    })
    .await?;
    c.wait_ready().await?;
    let mut g = c.client().await?;
    let abort = |header: Option<String>| {
        with_bearer(
            pb::AbortSagaRequest {
                // No such saga: an accepted token gets NOT_FOUND, a refused one never gets that far.
                saga_id: uuid::Uuid::now_v7().to_string(),
                reason: "test".into(),
            },
            header.as_deref(),
        )
    };
    let before_wrong = metric(&c, "saga_operator_auth_failures_total", "reason=\"wrong\"").await?;
    let before_missing = metric(&c, "saga_operator_auth_failures_total", "reason=\"missing\"").await?;
    let before_malformed = metric(&c, "saga_operator_auth_failures_total", "reason=\"malformed\"").await?;

    let accepted = g.abort_saga(abort(Some(format!("Bearer {TOKEN}")))).await;
    assert_eq!(accepted.map(drop).map_err(|s| s.code()), Err(Code::NotFound));
    for spaced in [format!("Bearer {TOKEN} "), format!("Bearer  {TOKEN}")] {
        let refused = g.abort_saga(abort(Some(spaced.clone()))).await;
        assert_eq!(
            refused.map(drop).map_err(|s| s.code()),
            Err(Code::PermissionDenied),
            "{spaced:?} must not match the token"
        );
    }
    let missing = g.abort_saga(abort(None)).await;
    assert_eq!(
        missing.map(drop).map_err(|s| s.code()),
        Err(Code::Unauthenticated)
    );
    let malformed = g
        .retry_saga(with_bearer(
            pb::RetrySagaRequest {
                saga_id: uuid::Uuid::now_v7().to_string(),
            },
            Some(&format!("Basic {TOKEN}")),
        ))
        .await;
    assert_eq!(
        malformed.map(drop).map_err(|s| s.code()),
        Err(Code::Unauthenticated)
    );

    // The recorder is process-wide: other tests of this binary may count too, so deltas.
    let wrong = metric(&c, "saga_operator_auth_failures_total", "reason=\"wrong\"").await? - before_wrong;
    let missing =
        metric(&c, "saga_operator_auth_failures_total", "reason=\"missing\"").await? - before_missing;
    let malformed =
        metric(&c, "saga_operator_auth_failures_total", "reason=\"malformed\"").await? - before_malformed;
    assert!(wrong >= 2.0, "wrong: {wrong}");
    assert!(missing >= 1.0, "missing: {missing}");
    assert!(malformed >= 1.0, "malformed: {malformed}");
    c.stop().await
}

// ---- the events stream ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_stream_is_bounded_by_default_and_an_existing_one_is_updated() -> Result<()> {
    use async_nats::jetstream::stream;
    let s = System::bare(None).await?;
    let js = async_nats::jetstream::new(s.client.clone());
    // A stream left by an older coordinator with no size limit.
    js.create_stream(stream::Config {
        name: "SAGA_EVENTS".into(),
        subjects: vec!["saga.events.>".into()],
        max_bytes: -1,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let max_bytes = |js: async_nats::jetstream::Context| async move {
        let mut st = js.get_stream("SAGA_EVENTS").await.ok()?;
        st.info().await.ok().map(|i| i.config.max_bytes)
    };

    let c = RunningCoordinator::start(&s.nats.access(), &s.path("coordinator"), &s.definitions).await?;
    c.wait_ready().await?;
    eventually(WAIT, "the stream's max_bytes set to 1 GiB", || {
        let js = js.clone();
        async move { max_bytes(js).await == Some(1 << 30) }
    })
    .await
    .with_context(|| "the default events stream must be bounded (1 GiB)")?;
    c.stop().await?;

    // A changed flag reaches the existing stream on the next start.
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &s.definitions, |c| {
        c.events_max_bytes = 64 << 20;
    })
    .await?;
    c.wait_ready().await?;
    eventually(WAIT, "the stream's max_bytes set to 64 MiB", || {
        let js = js.clone();
        async move { max_bytes(js).await == Some(64 << 20) }
    })
    .await?;
    c.stop().await
}

// ---- definition size ----

/// A definition of `n` sequential steps on a participant nobody runs; step
/// `k` (0-based) starts at line `4 + 5 * k`.
fn long_definition(n: usize) -> String {
    let mut y = String::from("name: long\nversion: 1\nsteps:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - name: s{i}\n    participant: nobody\n    action: a\n    compensation: none\n    timeout: 1s\n"
        ));
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_step_definition_is_refused_at_load_and_on_reload_with_its_line() -> Result<()> {
    let s = System::bare(None).await?;
    let defs = s.path("defs");
    std::fs::create_dir_all(&defs)?;
    let file = defs.join("long.yaml");
    std::fs::write(&file, long_definition(101))?;

    let c = RunningCoordinator::start(&s.nats.access(), &s.path("coordinator"), &defs).await?;
    let refused = tokio::time::timeout(WAIT, c.stop())
        .await
        .context("a coordinator with a 101-step definition must not start")?
        .expect_err("refused at load");
    let text = refused.to_string();
    let at = format!("{}:504:5:", file.display());
    assert!(text.contains(&at), "{text} should name {at}");
    assert!(text.contains("at most 100 steps"), "{text}");

    // 100 load; a reload to 101 is refused and the 100-step version stays in force.
    std::fs::write(&file, long_definition(100))?;
    let c = RunningCoordinator::start(&s.nats.access(), &s.path("coordinator"), &defs).await?;
    c.wait_ready().await?;
    std::fs::write(&file, long_definition(101).replace("version: 1", "version: 2"))?;
    let e = c.reload().await?.expect_err("reload refused");
    assert!(e.to_string().contains(&at), "{e}");
    let mut g = c.client().await?;
    let loaded = g
        .list_definitions(pb::ListDefinitionsRequest::default())
        .await?
        .into_inner()
        .definitions;
    assert_eq!(
        loaded
            .iter()
            .map(|d| (d.name.as_str(), d.version))
            .collect::<Vec<_>>(),
        [("long", 1)]
    );
    c.stop().await?;

    // The bound is a flag: with --max-steps 150 the 101 steps load.
    let c = RunningCoordinator::start_with(&s.nats.access(), &s.path("coordinator"), &defs, |c| {
        c.max_steps = 150;
    })
    .await?;
    c.wait_ready().await?;
    c.stop().await
}

// ---- participant replies ----

const TRUST_DEFS: &str = "defaults:
  timeout: 2s
  retry: { max_attempts: 2, initial_backoff: 10ms, max_backoff: 20ms, multiplier: 2.0, jitter: false }
steps:
  - name: reserve
    participant: fake
    action: reserve
    compensation: release
    compensation_input:
      reservation_id: \"${steps.reserve.output.reservation_id}\"
";

/// `trust` (no output schema) and `trust-schema` (the reservation id a
/// short `res_…` string) on the scripted participant `fake`.
fn trust_definitions(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let defs = dir.join("trust-defs");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(
        defs.join("trust.yaml"),
        format!("name: trust\nversion: 1\n{TRUST_DEFS}"),
    )?;
    let schema = "    output_schema:
      type: object
      required: [reservation_id]
      properties:
        reservation_id: { type: string, pattern: \"^res_\", maxLength: 64 }
";
    std::fs::write(
        defs.join("trust-schema.yaml"),
        format!("name: trust-schema\nversion: 1\n{TRUST_DEFS}{schema}"),
    )?;
    Ok(defs)
}

/// Runs a saga of `definition` against a fake participant answering every
/// `reserve` with `ok` and `data`, and every `release` with `ok`. Returns
/// the finished saga and the `input` of every `release` it received.
async fn run_with_forged_output(
    s: &System,
    c: &RunningCoordinator,
    definition: &str,
    data: serde_json::Value,
) -> Result<(pb::Saga, Vec<serde_json::Value>)> {
    let released: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let seen = released.clone();
    let _fake = FakeParticipant::start(&s.client, "fake", move |cmd, _| {
        if cmd.action == "release" {
            if let Ok(mut r) = seen.lock() {
                r.push(cmd.input.clone());
            }
            return FakeAnswer::Reply(Reply::ok(serde_json::json!({})));
        }
        FakeAnswer::Reply(Reply::ok(data.clone()))
    })
    .await?;
    let mut g = c.client().await?;
    let req = pb::CreateOrderRequest {
        definition: definition.into(),
        ..order("c-1", &[("A-1", 1)], 100)
    };
    let id = g.create_order(req).await?.into_inner().saga_id;
    let saga = wait_terminal(&mut g, &id, WAIT).await?;
    let released = released.lock().map(|r| r.clone()).unwrap_or_default();
    Ok((saga, released))
}

fn assert_not_stored(saga: &pb::Saga, released: &[serde_json::Value]) {
    // Outcome unknown, retried, then compensated: never COMPLETED on it.
    assert_eq!(saga.state, SagaState::Compensated as i32, "{saga:#?}");
    assert!(
        saga.history.iter().any(|h| h.detail.contains("malformed reply")),
        "the history says why: {:#?}",
        saga.history
    );
    // The compensation was sent without the forged value: it was never stored.
    assert!(!released.is_empty(), "release sent");
    for input in released {
        assert_eq!(input["reservation_id"], serde_json::Value::Null, "{input}");
    }
    let text: usize = saga.history.iter().map(|h| h.detail.len()).sum::<usize>()
        + saga.steps.iter().map(|p| p.last_outcome.len()).sum::<usize>()
        + saga.reason.len();
    assert!(text < 8 * 1024, "GetSaga carries {text} bytes of reasons");
}

/// The details of a saga's history, one per line.
fn details(saga: &pb::Saga) -> String {
    saga.history
        .iter()
        .map(|h| h.detail.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_ok_output_is_malformed_never_stored_and_the_saga_does_not_complete_on_it() -> Result<()>
{
    let s = System::bare(None).await?;
    let defs = trust_definitions(s.dir.path())?;
    let c = RunningCoordinator::start(&s.nats.access(), &s.path("coordinator"), &defs).await?;
    c.wait_ready().await?;
    let labels = "participant=\"fake\";action=\"reserve\";outcome=\"malformed\"";
    let before = metric(&c, "saga_step_duration_seconds_count", labels).await?;
    // The hostile tester's 900 KB reservation id.
    let forged = serde_json::json!({ "reservation_id": "r".repeat(900 * 1024) });
    let (saga, released) = run_with_forged_output(&s, &c, "trust", forged).await?;
    assert_not_stored(&saga, &released);
    let history = details(&saga);
    assert!(
        history.contains("a step output is at most 65536 bytes"),
        "{history}"
    );
    let counted = metric(&c, "saga_step_duration_seconds_count", labels).await? - before;
    assert!(counted >= 2.0, "both attempts counted as malformed: {counted}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_violating_its_output_schema_is_malformed_and_never_stored() -> Result<()> {
    let s = System::bare(None).await?;
    let defs = trust_definitions(s.dir.path())?;
    let c = RunningCoordinator::start(&s.nats.access(), &s.path("coordinator"), &defs).await?;
    c.wait_ready().await?;
    // Small, but not what the step declares.
    let forged = serde_json::json!({ "reservation_id": "forged; DROP TABLE" });
    let (saga, released) = run_with_forged_output(&s, &c, "trust-schema", forged).await?;
    assert_not_stored(&saga, &released);
    let history = details(&saga);
    assert!(
        history.contains("output_schema") && history.contains("output.reservation_id"),
        "{history}"
    );

    // A conforming output is stored and completes the saga.
    let (saga, _) = run_with_forged_output(
        &s,
        &c,
        "trust-schema",
        serde_json::json!({ "reservation_id": "res_1" }),
    )
    .await?;
    assert_eq!(saga.state, SagaState::Completed as i32, "{saga:#?}");
    c.stop().await
}
