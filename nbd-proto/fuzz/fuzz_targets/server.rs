//! Arbitrary bytes play a hostile client against the server role, which a
//! memory disk answers; see `tests/support/fuzz_server.rs` for the input
//! layout and invariants.
#![no_main]

include!("harnesses.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    support::fuzz_server::run_server(data);
});
