//! `sagactl validate` and `sagactl plan` as a user's CI runs them: the real
//! binary, real files, exit codes and output.

use std::{path::Path, process::Output};

use anyhow::{ensure, Context, Result};

fn sagactl(args: &[&str]) -> Result<Output> {
    let bin = saga_testkit::bin_dir()?.join("sagactl");
    std::process::Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn shipped_definitions() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../saga-definitions")
        .display()
        .to_string()
}

#[test]
fn validate_accepts_the_shipped_definitions() -> Result<()> {
    let out = sagactl(&["validate", &shipped_definitions()])?;
    let stdout = text(&out.stdout);
    ensure!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("order@1"), "{stdout}");
    assert!(stdout.contains("order-with-loyalty@1"), "{stdout}");
    assert!(
        stdout.contains("order-with-shipping@1  (3 steps in 2 groups)"),
        "{stdout}"
    );
    assert!(stdout.contains("order-3ds@1  (5 steps in 5 groups)"), "{stdout}");
    assert!(stdout.contains("4 definition(s) valid, 0 error(s)"), "{stdout}");
    Ok(())
}

#[test]
fn validate_reports_every_bad_file_with_its_line_and_exits_1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A reference to a step that runs after this one (line 9).
    std::fs::write(
        dir.path().join("bad-reference.yaml"),
        "name: bad\nversion: 1\nsteps:\n  - name: charge\n    participant: payment\n    action: charge\n    \
         compensation: refund\n    input:\n      reservation: \"${steps.reserve.output.reservation_id}\"\n  - name: \
         reserve\n    participant: inventory\n    action: reserve\n    compensation: release\n",
    )?;
    // An unknown on_failure (line 7).
    std::fs::write(
        dir.path().join("bad-policy.yaml"),
        "name: other\nversion: 1\nsteps:\n  - name: a\n    participant: p\n    action: x\n    on_failure: \
         shrug\n    compensation: y\n",
    )?;
    // Two files defining the same name@version.
    let one =
        "name: twice\nversion: 3\nsteps:\n  - { name: a, participant: p, action: x, compensation: y }\n";
    std::fs::write(dir.path().join("twice-a.yaml"), one)?;
    std::fs::write(dir.path().join("twice-b.yaml"), one)?;

    let out = sagactl(&["validate", &dir.path().display().to_string()])?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let reference = format!("{}:9:", dir.path().join("bad-reference.yaml").display());
    assert!(stderr.contains(&reference), "{stderr}");
    assert!(
        stderr.contains("step `reserve` has not run before this step"),
        "{stderr}"
    );
    let policy = format!("{}:7:", dir.path().join("bad-policy.yaml").display());
    assert!(stderr.contains(&policy), "{stderr}");
    assert!(stderr.contains("twice@3 is already defined in"), "{stderr}");
    assert!(stdout.contains("1 definition(s) valid, 3 error(s)"), "{stdout}");

    // The same as JSON, for scripts.
    let out = sagactl(&["--json", "validate", &dir.path().display().to_string()])?;
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let errors = v["errors"].as_array().context("errors")?;
    assert_eq!(errors.len(), 3, "{v}");
    assert!(errors.iter().any(|e| e["line"] == 9
        && e["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("bad-reference.yaml"))));
    assert_eq!(v["valid"][0]["definition"], "twice@3");
    Ok(())
}

#[test]
fn validate_of_a_missing_file_fails() -> Result<()> {
    let out = sagactl(&["validate", "/nonexistent/saga.yaml"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/saga.yaml: cannot read"));
    Ok(())
}

#[test]
fn plan_prints_the_groups_and_the_compensation_of_each_failure_point() -> Result<()> {
    let file = format!("{}/order-with-shipping.yaml", shipped_definitions());
    let out = sagactl(&["plan", &file])?;
    let stdout = text(&out.stdout);
    ensure!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for line in [
        "1. parallel, all at once:",
        "├─ reserve-inventory  inventory.reserve",
        "└─ charge-payment  payment.charge",
        "2. create-shipment  shipping.create-shipment",
        "uses output of charge-payment, reserve-inventory",
        "reserve-inventory fails (rejected or out of attempts):",
        "await charge-payment (same group)",
        "1. undo group 1, at once: inventory.release (reserve-inventory) [if its outcome is unknown], \
         payment.refund (charge-payment) [if it succeeded]",
        "1. undo group 2: shipping.cancel-shipment (create-shipment) [if its outcome is unknown]",
        "2. undo group 1, at once: inventory.release (reserve-inventory), payment.refund (charge-payment)",
    ] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }

    let out = sagactl(&["plan", "--mermaid", &file])?;
    let mermaid = text(&out.stdout);
    ensure!(out.status.success(), "{mermaid}");
    assert!(mermaid.starts_with("flowchart TD\n"), "{mermaid}");
    assert!(
        mermaid.contains("u_create_shipment --> u_charge_payment"),
        "{mermaid}"
    );
    assert!(
        mermaid.contains("s_charge_payment -. fails .-> u_reserve_inventory"),
        "{mermaid}"
    );

    let out = sagactl(&["--json", "plan", &file])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v[0]["definition"], "order-with-shipping@1");
    assert_eq!(v[0]["failures"][2]["undo"][1]["steps"][1]["action"], "refund");
    Ok(())
}

#[test]
fn plan_refuses_an_invalid_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "name: x\nversion: 1\nsteps: []\n")?;
    let out = sagactl(&["plan", &file.display().to_string()])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&format!("{}:", file.display())));
    assert!(out.stdout.is_empty());
    Ok(())
}
