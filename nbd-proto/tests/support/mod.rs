//! Shared test support: a scripted server, an in-memory pair, a blocking
//! driver, and the fuzz harness.
pub mod driver;
pub mod fuzz_client;
pub mod pair;
pub mod peers;
pub mod server;
