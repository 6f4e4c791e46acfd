//! Arbitrary bytes play the server against a fixed client script; see
//! `tests/support/fuzz_client.rs` for the input layout and invariants.
#![no_main]

#[path = "../../tests/support/fuzz_client.rs"]
mod fuzz_client;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_client::run_client(data);
});
