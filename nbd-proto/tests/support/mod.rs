//! Shared test support: a scripted server, an in-memory pair, real
//! servers, the fuzz harness, and encoders for hand-crafted server bytes.
pub mod craft;
pub mod fuzz_client;
pub mod fuzz_handshake;
pub mod fuzz_record;
pub mod fuzz_transmission;
pub mod pair;
pub mod peers;
pub mod rng;
pub mod server;
