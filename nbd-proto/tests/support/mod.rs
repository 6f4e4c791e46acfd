//! Shared test support: a scripted server, an in-memory pair, real
//! servers, the fuzz harness, encoders for hand-crafted server bytes, and
//! the client role paired with the server role.
pub mod craft;
pub mod fuzz_client;
pub mod fuzz_handshake;
pub mod fuzz_reconnect;
pub mod fuzz_record;
pub mod fuzz_server;
pub mod fuzz_transmission;
pub mod pair;
pub mod peers;
pub mod rng;
pub mod server;
pub mod server_pair;
