//! Definition versions side by side and hot reload (what SIGHUP does), with a
//! real nats-server and both participants.

use std::path::Path;

use anyhow::{ensure, Result};
use saga_proto::pb::{self, SagaState};
use saga_testkit::*;
use tonic::Code;

/// The order saga as `version`, its steps named with `prefix` so the test
/// can tell which version a saga ran.
fn order_version(version: u32, prefix: &str) -> String {
    format!(
        "name: order\nversion: {version}\ndefaults:\n  timeout: 2s\nsteps:\n  - name: {prefix}-reserve\n    \
         participant: inventory\n    action: reserve\n    compensation: release\n  - name: {prefix}-charge\n    \
         participant: payment\n    action: charge\n    compensation: refund\n"
    )
}

async fn versions(
    g: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
) -> Result<Vec<String>> {
    let defs = g
        .list_definitions(pb::ListDefinitionsRequest {})
        .await?
        .into_inner()
        .definitions;
    Ok(defs.iter().map(|d| format!("{}@{}", d.name, d.version)).collect())
}

async fn run_version(s: &System, version: u32) -> Result<pb::Saga> {
    s.run_order(pb::CreateOrderRequest {
        definition_version: version,
        ..order("c-1", &[("A-1", 1)], 500)
    })
    .await
}

fn write(dir: &Path, file: &str, text: &str) -> Result<()> {
    Ok(std::fs::write(dir.join(file), text)?)
}

#[tokio::test]
async fn two_versions_run_side_by_side_and_a_reload_swaps_the_set() -> Result<()> {
    let root = tempfile::tempdir()?;
    let defs = root.path().join("defs");
    std::fs::create_dir_all(&defs)?;
    write(&defs, "order-v1.yaml", &order_version(1, "v1"))?;
    write(&defs, "order-v2.yaml", &order_version(2, "v2"))?;
    let mut s = System::bare(Some(defs.clone())).await?;
    s.start_inventory().await?;
    s.start_payment(&PaymentSettings::default()).await?;
    s.start_coordinator().await?;
    let mut g = s.grpc().await?;
    assert_eq!(versions(&mut g).await?, ["order@1", "order@2"]);

    // No version asked: the latest. Version 1 asked: version 1. Both run at once.
    let (latest, first) = tokio::join!(run_version(&s, 0), run_version(&s, 1));
    let (latest, first) = (latest?, first?);
    assert_eq!(latest.definition, "order@2");
    assert_eq!(latest.state, SagaState::Completed as i32);
    assert_eq!(latest.steps[0].name, "v2-reserve");
    assert_eq!(first.definition, "order@1");
    assert_eq!(first.state, SagaState::Completed as i32);
    assert_eq!(first.steps[1].name, "v1-charge");

    // A new version file and a reload: the new version becomes the default.
    write(&defs, "order-v3.yaml", &order_version(3, "v3"))?;
    let coordinator = s
        .coordinator
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no coordinator"))?;
    let (added, removed) = coordinator.reload().await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((added, removed), (vec!["order@3".to_string()], vec![]));
    assert_eq!(run_version(&s, 0).await?.definition, "order@3");

    // A bad file: the reload is refused with file and line, the old set stays in force.
    write(
        &defs,
        "broken.yaml",
        "name: order\nversion: 4\nsteps:\n  - name: x\n    colour: red\n",
    )?;
    let refused = coordinator.reload().await?.expect_err("bad file refused");
    let text = refused.to_string();
    ensure!(text.contains("broken.yaml:5"), "{text}");
    assert_eq!(versions(&mut g).await?, ["order@1", "order@2", "order@3"]);
    assert_eq!(run_version(&s, 0).await?.definition, "order@3");

    // Removing a version: new sagas cannot ask for it any more.
    std::fs::remove_file(defs.join("broken.yaml"))?;
    std::fs::remove_file(defs.join("order-v1.yaml"))?;
    let (added, removed) = coordinator.reload().await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((added, removed), (vec![], vec!["order@1".to_string()]));
    let err = g
        .create_order(pb::CreateOrderRequest {
            definition_version: 1,
            ..order("c-1", &[("A-1", 1)], 500)
        })
        .await
        .expect_err("version 1 is gone");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("definition_version:"),
        "{}",
        err.message()
    );
    // The sagas that ran on it are still readable as they were.
    let old = g
        .get_saga(pb::GetSagaRequest {
            saga_id: first.saga_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(old.definition, "order@1");
    s.shutdown().await
}
