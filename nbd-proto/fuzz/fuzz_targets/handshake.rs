//! Opt mode: a script of opt_* calls chosen by the input against arbitrary server bytes; see
//! `tests/support/fuzz_handshake.rs` for the input layout and invariants.
#![no_main]

include!("harnesses.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    support::fuzz_handshake::run_handshake(data);
});
