//! The split-stream property: however the byte streams are cut (whole, one
//! byte at a time, random cuts), a session produces the same events in
//! the same order and ends in the same state.

mod support;

use nbd_proto::wire::nbd_error;
use nbd_proto::*;
use support::pair::{Pair, Split};
use support::server::Behaviour;

/// One full session: handshake with meta contexts, every command, an
/// injected server error, disconnect.
fn session(mut b: Behaviour, split: Split) -> (Vec<String>, PublicState, usize) {
    b.fail = Some((200_000, 200_001, nbd_error::EIO));
    let mut cfg = Config::default();
    cfg.full_info = true;
    cfg.add_meta_context("base:allocation").unwrap();
    cfg.add_meta_context("qemu:allocation-depth").unwrap();
    let mut p = Pair::with_split(cfg, b, 256 * 1024, split);
    p.drive();
    let c = &mut p.client;
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let accepted = [
        c.write(1000, data, CmdFlags::FUA),
        c.read(0, vec![0; 80_000], CmdFlags::empty()),
        c.read_structured(60_000, vec![0xff; 100_000], CmdFlags::empty()),
        c.block_status(0, 256 * 1024, CmdFlags::empty()),
        c.trim(4096, 8192, CmdFlags::empty()),
        c.write_zeroes(16384, 4096, CmdFlags::empty()),
        c.read(199_000, vec![0; 4096], CmdFlags::empty()),
        c.flush(CmdFlags::empty()),
    ]
    .iter()
    .filter(|r| r.is_ok())
    .count();
    p.drive();
    let _ = p.client.disconnect();
    p.drive();
    let end = p.state();
    (p.transcript, end, accepted)
}

#[test]
fn every_split_gives_the_same_session() {
    let mut nbd_server = Behaviour::nbd_server();
    nbd_server.exports.push((String::new(), String::new()));
    for (name, b) in [("nbdkit", Behaviour::nbdkit()), ("qemu", Behaviour::qemu()), ("nbd-server", nbd_server)] {
        let (reference, end, accepted) = session(b.clone(), Split::Whole);
        assert_eq!(end, PublicState::Closed, "{name}");
        assert!(accepted >= 6, "{name}");
        let completions = reference.iter().filter(|e| e.starts_with("Complete")).count();
        assert_eq!(completions, accepted, "{name}: every command completed");
        assert!(reference.iter().any(|e| e.contains("Err(Server(Command { errno: 5")), "{name}: the EIO arrived");
        let (bytewise, _, _) = session(b.clone(), Split::Bytewise);
        assert_eq!(bytewise, reference, "{name}: one byte at a time");
        for seed in 0..50 {
            let (cut, end, _) = session(b.clone(), Split::Random(seed * 7919 + 1));
            assert_eq!(end, PublicState::Closed);
            assert_eq!(cut, reference, "{name}: random cuts, seed {seed}");
        }
    }
}
