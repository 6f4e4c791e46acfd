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

// ---- a small-I/O session through opt mode ---------------------------------------

const DISK: usize = 256 * 1024;

/// FNV-1a, to compare disks without printing them.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// One whole session under `split`: opt-mode negotiation (list, list meta
/// contexts, info, go) with two meta contexts, then writes, reads (plain,
/// structured, DF), block status (full and REQ_ONE), trim, zero, cache,
/// flush, commands hitting an injected EIO, and a disconnect with reads
/// still in flight. Returns everything observable: every event, every
/// submission's result, the requests the server saw, a digest of its disk,
/// and the final state.
fn small_session(name: &str, mut b: Behaviour, split: Split) -> (Vec<String>, PublicState) {
    b.fail = Some((128 * 1024, 132 * 1024, nbd_error::EIO));
    b.exports.push(("other".into(), "not this one".into()));
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    cfg.full_info = true;
    cfg.add_meta_context("base:allocation").unwrap();
    cfg.add_meta_context("qemu:allocation-depth").unwrap();
    if name == "nbd-server" {
        cfg.set_export_name("exp").unwrap();
    }
    let mut p = Pair::with_split(cfg, b, DISK, split);
    p.drive();
    let mut log = Vec::new();

    // Negotiation, one option at a time.
    type Opt = fn(&mut Connection<Vec<u8>>) -> Result<(), Error>;
    let options: [(&str, Opt); 4] = [
        ("list", Connection::opt_list),
        ("list_meta_context", Connection::opt_list_meta_context),
        ("info", Connection::opt_info),
        ("go", Connection::opt_go),
    ];
    for (what, start) in options {
        log.push(format!("opt_{what}: {:?}", start(&mut p.client)));
        p.drive();
        log.push(format!("state {:?}", p.state()));
    }

    // A burst of commands, all in flight together.
    let c = &mut p.client;
    let results = [
        c.write(1000, (0..3000u32).map(|i| (i % 199) as u8 + 1).collect(), CmdFlags::empty()),
        c.write(70_000, vec![0x5e; 12_000], CmdFlags::FUA),
        c.write(200_000, vec![0x77; 3000], CmdFlags::empty()),
        c.read(0, vec![0xff; 512], CmdFlags::empty()),
        c.read(68_000, vec![0xff; 33_000], CmdFlags::empty()),
        c.read_structured(0, vec![0xff; 84_000], CmdFlags::empty()),
        c.read_structured(196_608, vec![0xff; 16384], CmdFlags::DF),
        c.block_status(0, 128 * 1024, CmdFlags::empty()),
        c.block_status(65536, 65536, CmdFlags::REQ_ONE),
        c.block_status(0, DISK as u64, CmdFlags::empty()),
        c.trim(72_000, 4096, CmdFlags::empty()),
        c.write_zeroes(80_000, 2048, CmdFlags::NO_HOLE | CmdFlags::FUA),
        c.cache(0, 65536, CmdFlags::empty()),
        c.flush(CmdFlags::FUA),
        c.read(129 * 1024, vec![0xff; 1024], CmdFlags::empty()),
        c.write(130 * 1024, vec![1; 1024], CmdFlags::empty()),
        c.read_structured(127 * 1024, vec![0xff; 4096], CmdFlags::empty()),
        c.read(DISK as u64 - 512, vec![0xff; 1024], CmdFlags::empty()),
    ];
    log.extend(results.iter().map(|r| format!("submit: {r:?}")));
    p.drive();
    log.push(format!("state {:?}, in flight {}", p.state(), p.client.in_flight()));

    // Reads still in flight when the disconnect is queued.
    let c = &mut p.client;
    for i in 0..4u64 {
        let r = c.read(i * 50_000, vec![0xff; 2000], CmdFlags::empty());
        log.push(format!("submit: {r:?}"));
    }
    log.push(format!("disconnect: {:?}", p.client.disconnect()));
    log.push(format!("after disconnect: {:?}", p.client.flush(CmdFlags::empty())));
    p.drive();

    log.extend(p.transcript.iter().cloned());
    log.extend(p.server.requests.iter().map(|r| format!("request {r:?}")));
    log.push(format!("options {:?}", p.server.options));
    log.push(format!("disk {:#x}", digest(&p.server.disk)));
    log.push(format!("direction {:?}", p.client.direction()));
    (log, p.state())
}

#[test]
fn small_io_sessions_through_opt_mode_are_split_invariant() {
    for (name, b) in
        [("nbdkit", Behaviour::nbdkit()), ("qemu", Behaviour::qemu()), ("nbd-server", Behaviour::nbd_server())]
    {
        let (reference, end) = small_session(name, b.clone(), Split::Whole);
        assert_eq!(end, PublicState::Closed, "{name}");
        let has = |s: &str| reference.iter().any(|e| e.contains(s));
        assert!(has(r#"ExportListed { name: "other""#), "{name}: listed");
        assert!(has("state Ready"), "{name}: went to Ready");
        assert!(has("Connected"), "{name}");
        assert!(has("Err(Server(Command { errno: 5"), "{name}: the EIO arrived");
        assert!(
            has("submit: Err(Local(OutOfBounds { stores_data: false }))"),
            "{name}: the out-of-bounds read was refused"
        );
        assert!(has("state Ready, in flight 0"), "{name}: the burst completed");
        assert!(has("after disconnect: Err(Local(AfterDisconnect))"), "{name}");
        assert!(has("direction None"), "{name}");
        let accepted = reference.iter().filter(|e| e.starts_with("submit: Ok")).count();
        let completed = reference.iter().filter(|e| e.starts_with("Complete")).count();
        assert_eq!(completed, accepted, "{name}: every accepted command completed once");
        if name == "nbd-server" {
            assert!(!has("Extents"), "{name}: no block status without structured replies");
        } else {
            assert!(has("MetaContextListed"), "{name}");
            assert!(has("Extents"), "{name}");
        }
        if name == "qemu" {
            assert!(has("status: Hole"), "{name}: sparse reads");
        }
        let (bytewise, end) = small_session(name, b.clone(), Split::Bytewise);
        assert_eq!(end, PublicState::Closed);
        assert_eq!(bytewise, reference, "{name}: one byte at a time");
        for seed in 0..50 {
            let (cut, end) = small_session(name, b.clone(), Split::Random(seed * 104_729 + 17));
            assert_eq!(end, PublicState::Closed, "{name}: seed {seed}");
            assert_eq!(cut, reference, "{name}: random cuts, seed {seed}");
        }
    }
}

// ---- submissions interleaved with partial sends ------------------------------------

/// xorshift64, for the send cuts.
fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// Sends at most `max` of the bytes the client has queued.
fn send_some(p: &mut Pair, max: usize) {
    let mut slices: [&[u8]; 8] = [&[]; 8];
    let n = p.client.poll_transmit(&mut slices);
    let bytes = slices[..n].concat();
    let cut = bytes.len().min(max);
    if cut > 0 {
        p.client.handle_sent(cut);
        p.server.receive(&bytes[..cut]);
    }
}

/// Commands submitted one by one. With `seed`, each submission is followed
/// by a partial send of random size and a random delivery of whatever the
/// server has answered, so new requests queue up behind half-sent ones
/// (often in the middle of a WRITE payload); without, each command runs to
/// completion before the next.
fn interleaved(b: Behaviour, export: &str, seed: Option<u64>) -> Vec<String> {
    let mut cfg = Config::default();
    cfg.set_export_name(export).unwrap();
    cfg.add_meta_context("base:allocation").unwrap();
    let split = seed.map_or(Split::Whole, Split::Random);
    let mut p = Pair::with_split(cfg, b, DISK, split);
    p.drive();
    let mut rng = seed.unwrap_or(1) | 1;
    let mut log = Vec::new();
    for i in 0..40u64 {
        let at = (i * 5003) % (DISK as u64 - 20_000);
        let r = match i % 5 {
            0 => p.client.write(at, vec![i as u8 + 1; 3000 + (i as usize * 397) % 9000], CmdFlags::empty()),
            1 => p.client.read(at, vec![0xff; 1000 + (i as usize * 811) % 40_000], CmdFlags::empty()),
            2 => p.client.read_structured(at, vec![0xff; 6000], CmdFlags::empty()),
            3 => p.client.block_status(at, 10_000, CmdFlags::empty()),
            _ => p.client.trim(at, 2048, CmdFlags::empty()),
        };
        log.push(format!("submit {i}: {r:?}"));
        match seed {
            None => p.drive(),
            Some(_) => {
                let max = (next(&mut rng) % 6000) as usize;
                send_some(&mut p, max);
                if next(&mut rng) % 3 == 0 {
                    let out = std::mem::take(&mut p.server.out);
                    p.deliver(&out);
                }
            }
        }
    }
    p.drive();
    log.push(format!("in flight {}", p.client.in_flight()));
    p.client.disconnect().unwrap();
    p.drive();
    log.extend(p.transcript.iter().cloned());
    log.push(format!("disk {:#x}", digest(&p.server.disk)));
    log.push(format!("state {:?}", p.state()));
    log
}

#[test]
fn requests_queued_behind_half_sent_ones_change_nothing() {
    for (name, b, export) in [
        ("nbdkit", Behaviour::nbdkit(), ""),
        ("qemu", Behaviour::qemu(), ""),
        ("nbd-server", Behaviour::nbd_server(), "exp"),
    ] {
        let reference = interleaved(b.clone(), export, None);
        assert_eq!(reference.last().map(String::as_str), Some("state Closed"), "{name}");
        assert!(reference.contains(&"in flight 0".to_owned()), "{name}");
        let accepted = reference.iter().filter(|e| e.starts_with("submit") && e.contains(": Ok(")).count();
        let completed =
            reference.iter().filter(|e| e.starts_with("Complete { cookie: ") && e.contains("result: Ok")).count();
        assert_eq!(completed, accepted, "{name}: every accepted command succeeded");
        for seed in 0..50 {
            let got = interleaved(b.clone(), export, Some(seed * 7727 + 3));
            assert_eq!(got, reference, "{name}: seed {seed}");
        }
    }
}
