//! The core stays pure: no async runtime, store, network or HTTP crate in its
//! normal dependency tree (dev-dependencies may have anything).

use std::process::Command;

/// Crates that mean I/O or a runtime; none may be reachable from saga-core.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "sled",
    "async-nats",
    "tonic",
    "hyper",
    "axum",
    "reqwest",
    "mio",
    "h2",
    "prost",
];

#[test]
fn core_dependency_tree_has_no_io_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "saga-core",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(
        names.contains(&"saga-core"),
        "cargo tree listed no saga-core:\n{tree}"
    );
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|f| names.contains(f)).collect();
    assert!(found.is_empty(), "saga-core depends on {found:?}:\n{tree}");
}
