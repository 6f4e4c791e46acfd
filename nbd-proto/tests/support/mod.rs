//! Shared test support: a scripted server, an in-memory pair, a blocking driver.
pub mod driver;
pub mod pair;
pub mod server;
