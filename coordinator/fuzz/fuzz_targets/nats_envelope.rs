//! Command and reply envelopes from NATS: decoded or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = participants::runtime::decode("saga.cmd.inventory.reserve", data, &["reserve", "release"]);
    let _ = serde_json::from_slice::<saga_wire::Reply>(data);
});
