//! What the coordinator must not take on trust (issue 15): participant
//! replies (an output's size and declared schema), operator bearer tokens,
//! definition files of any size, and a stream that grows without bound.
//! A real nats-server per test; where a reply must be hostile the test plays
//! the participant itself on `saga.cmd.<participant>.*`.

use anyhow::{Context, Result};
use saga_proto::pb;
use saga_testkit::*;
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

/// The value of the sample `name{labels…}` on `/metrics` (0 when absent).
async fn metric(c: &RunningCoordinator, name: &str, label: &str) -> Result<f64> {
    let (code, body) = http_get(c.http_addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum())
}

// ---- operator auth ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_auth_failures_are_counted_and_a_token_with_spaces_is_refused() -> Result<()> {
    let s = System::bare(None).await?;
    let c = RunningCoordinator::start_with(&s.nats.url(), &s.path("coordinator"), &s.definitions, |c| {
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

    let c = RunningCoordinator::start(&s.nats.url(), &s.path("coordinator"), &s.definitions).await?;
    c.wait_ready().await?;
    eventually(WAIT, "the stream's max_bytes set to 1 GiB", || {
        let js = js.clone();
        async move { max_bytes(js).await == Some(1 << 30) }
    })
    .await
    .with_context(|| "the default events stream must be bounded (1 GiB)")?;
    c.stop().await?;

    // A changed flag reaches the existing stream on the next start.
    let c = RunningCoordinator::start_with(&s.nats.url(), &s.path("coordinator"), &s.definitions, |c| {
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

    let c = RunningCoordinator::start(&s.nats.url(), &s.path("coordinator"), &defs).await?;
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
    let c = RunningCoordinator::start(&s.nats.url(), &s.path("coordinator"), &defs).await?;
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
    let c = RunningCoordinator::start_with(&s.nats.url(), &s.path("coordinator"), &defs, |c| {
        c.max_steps = 150;
    })
    .await?;
    c.wait_ready().await?;
    c.stop().await
}
