// The harnesses live with the tests, which replay the same inputs; every
// target includes them whole (`include!`), as `support`.
#[path = "../../tests/support"]
#[allow(dead_code)]
mod support {
    pub mod fuzz_client;
    pub mod fuzz_handshake;
    pub mod fuzz_reconnect;
    pub mod fuzz_server;
    pub mod fuzz_transmission;
    pub mod pair;
    pub mod server;
    pub mod server_pair;
}
