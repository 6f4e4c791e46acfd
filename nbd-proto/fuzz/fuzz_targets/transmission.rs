//! Commands chosen by the input against arbitrary replies, after a canned handshake; see
//! `tests/support/fuzz_transmission.rs` for the input layout and invariants.
#![no_main]

include!("harnesses.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    support::fuzz_transmission::run_transmission(data);
});
