//! Arbitrary protobuf bytes through the CreateOrder decoder and validation.
#![no_main]
use std::sync::OnceLock;

use saga_core::definition::{self, Definitions};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The shipped definitions (so the order's JSON Schema is fuzzed too), or a
/// one-step stand-in when the fuzzer runs from elsewhere.
fn definitions() -> &'static Definitions {
    static DEFS: OnceLock<Definitions> = OnceLock::new();
    DEFS.get_or_init(|| {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../saga-definitions");
        if let Ok(d) = Definitions::load_dir(&shipped) {
            return d;
        }
        let yaml = "name: order\nversion: 1\nsteps:\n  - name: a\n    participant: p\n    action: x\n    compensation: none\n";
        let mut d = Definitions::default();
        if let Ok(def) = definition::parse(std::path::Path::new("fuzz.yaml"), yaml) {
            let _ = d.insert(def);
        }
        d
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = saga_proto::pb::CreateOrderRequest::decode(data) {
        let _ = coordinator::check_create_order(req, definitions());
    }
});
