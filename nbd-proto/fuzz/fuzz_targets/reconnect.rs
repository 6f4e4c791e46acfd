//! A `transmission` session whose transport arbitrary bytes may cut, with
//! the client keeping its commands and restarting; see
//! `tests/support/fuzz_reconnect.rs` for the input layout and invariants.
#![no_main]

include!("harnesses.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    support::fuzz_reconnect::run_reconnect(data);
});
