//! Arbitrary bytes play the server against a fixed client script; see
//! `tests/support/fuzz_client.rs` for the input layout and invariants.
#![no_main]

include!("harnesses.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    support::fuzz_client::run_client(data);
});
