//! Every command against nbdkit-, qemu- and nbd-server-like servers: flags
//! on the wire, reply kinds, errors, strict checks, batching and the buffer
//! contract.

mod support;

use nbd_proto::wire::{chunk, cmd, nbd_error, ChunkHeader, Put, ReplyHeader};
use nbd_proto::*;
use support::pair::Pair;
use support::server::Behaviour;

fn presets() -> [(&'static str, Behaviour); 3] {
    let mut nbd_server = Behaviour::nbd_server();
    nbd_server.exports.push((String::new(), String::new()));
    [("nbdkit", Behaviour::nbdkit()), ("qemu", Behaviour::qemu()), ("nbd-server", nbd_server)]
}

fn ready(b: Behaviour) -> Pair {
    let mut cfg = Config::default();
    cfg.add_meta_context("base:allocation").unwrap();
    cfg.add_meta_context("qemu:allocation-depth").unwrap();
    let p = Pair::connect(cfg, b, 1 << 20);
    assert_eq!(p.state(), PublicState::Ready, "{:?}", p.client.error());
    p
}

#[test]
fn every_command_on_every_server() {
    for (name, b) in presets() {
        let mut p = ready(b);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let w = p.client.write(5000, data.clone(), CmdFlags::FUA).unwrap();
        let r = p.client.read(5000, vec![0; data.len()], CmdFlags::empty()).unwrap();
        let f = p.client.flush(CmdFlags::empty()).unwrap();
        let t = p.client.trim(8192, 4096, CmdFlags::empty()).unwrap();
        p.drive();
        p.completed(w).unwrap();
        assert_eq!(p.completed(r).unwrap().unwrap(), data, "{name}");
        p.completed(f).unwrap();
        p.completed(t).unwrap();
        assert!(p.server.disk[8192..12288].iter().all(|&b| b == 0), "{name}: trim reached the disk");
        let kinds: Vec<u16> = p.server.requests.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [cmd::WRITE, cmd::READ, cmd::FLUSH, cmd::TRIM], "{name}");
        assert_eq!(p.server.requests[0].flags, CmdFlags::FUA.bits(), "{name}");
        if name != "nbd-server" {
            let z = p.client.write_zeroes(5000, 1000, CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO).unwrap();
            let c = p.client.cache(0, 65536, CmdFlags::empty()).unwrap();
            p.drive();
            p.completed(z).unwrap();
            p.completed(c).unwrap();
            assert!(p.server.disk[5000..6000].iter().all(|&b| b == 0), "{name}");
            let zero = p.server.requests.iter().find(|r| r.kind == cmd::WRITE_ZEROES).unwrap();
            assert_eq!(zero.flags, (CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO).bits());
        }
        p.client.disconnect().unwrap();
        p.drive();
        assert_eq!(p.state(), PublicState::Closed, "{name}");
        assert_eq!(p.server.requests.last().unwrap().kind, cmd::DISC);
    }
}

#[test]
fn sixty_four_commands_in_flight() {
    for (name, b) in presets() {
        let mut p = ready(b);
        for i in 0..256u32 {
            p.server.disk[i as usize * 4096..][..4].copy_from_slice(&i.to_be_bytes());
        }
        let cookies: Vec<Cookie> =
            (0..64u64).map(|i| p.client.read(i * 4096 * 3, vec![0; 4096], CmdFlags::empty()).unwrap()).collect();
        assert_eq!(p.client.in_flight(), 64);
        p.drive();
        for (i, c) in cookies.into_iter().enumerate() {
            let buf = p.completed(c).unwrap().unwrap();
            assert_eq!(&buf[..4], &(i as u32 * 3).to_be_bytes(), "{name}: read {i}");
        }
        assert_eq!(p.client.in_flight(), 0);
    }
}

#[test]
fn structured_reads_report_data_and_holes_and_zero_fill() {
    let mut p = ready(Behaviour::qemu());
    p.server.disk[65536..65536 + 4096].fill(0x77);
    let r = p.client.read_structured(0, vec![0xff; 200_000], CmdFlags::empty()).unwrap();
    p.drive();
    let buf = p.completed(r).unwrap().unwrap();
    assert!(buf[..65536].iter().all(|&b| b == 0), "hole zero-filled over 0xff");
    assert!(buf[65536..69632].iter().all(|&b| b == 0x77));
    assert!(buf[69632..].iter().all(|&b| b == 0));
    let mut chunks: Vec<(u64, u64, ChunkStatus)> = p
        .events
        .iter()
        .filter_map(|e| match e {
            Event::ReadChunk { cookie, offset, length, status } if *cookie == r => Some((*offset, *length, *status)),
            _ => None,
        })
        .collect();
    chunks.sort_by_key(|c| c.0);
    assert_eq!(chunks[0], (0, 65536, ChunkStatus::Hole));
    assert_eq!(chunks[1], (65536, 4096, ChunkStatus::Data));
    assert_eq!(chunks.iter().map(|c| c.1).sum::<u64>(), 200_000, "chunks cover the read");

    // Without structured replies: one Data chunk for the whole buffer.
    let mut p = ready(presets()[2].1.clone());
    let r = p.client.read_structured(0, vec![1; 1000], CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(r).unwrap();
    assert!(p.events.iter().any(|e| matches!(e, Event::ReadChunk { length: 1000, status: ChunkStatus::Data, .. })));
}

#[test]
fn block_status_one_event_per_context() {
    let mut p = ready(Behaviour::qemu());
    p.server.disk[8192..12288].fill(1);
    let bs = p.client.block_status(0, 65536, CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(bs).unwrap();
    let mut seen: Vec<(u32, Vec<Extent>)> = p
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Extents { cookie, context_id, extents, offset: 0 } if *cookie == bs => {
                Some((*context_id, extents.clone()))
            }
            _ => None,
        })
        .collect();
    seen.sort_by_key(|s| s.0);
    assert_eq!(seen.len(), 2);
    assert_eq!(p.client.meta_context_name(seen[0].0), Some("base:allocation"));
    assert_eq!(
        seen[0].1,
        [Extent { length: 8192, flags: 3 }, Extent { length: 4096, flags: 0 }, Extent { length: 53248, flags: 3 }]
    );
    assert_eq!(seen[1].1, [Extent { length: 65536, flags: 1 }]);

    let one = p.client.block_status(0, 65536, CmdFlags::REQ_ONE).unwrap();
    p.drive();
    p.completed(one).unwrap();
    assert_eq!(p.server.requests.last().unwrap().flags, CmdFlags::REQ_ONE.bits());
}

#[test]
fn server_errors_under_every_reply_style() {
    for (name, mut b) in presets() {
        b.fail = Some((0, 4096, nbd_error::ENOSPC));
        let mut p = ready(b);
        let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
        let w = p.client.write(0, vec![0; 512], CmdFlags::empty()).unwrap();
        let ok = p.client.read(8192, vec![0; 512], CmdFlags::empty()).unwrap();
        p.drive();
        for c in [r, w] {
            let e = p.completed(c).unwrap_err();
            assert_eq!(e.errno(), errno::ENOSPC, "{name}");
            assert!(matches!(e, Error::Server(ServerError::Command { .. })), "{name}: {e:?}");
        }
        p.completed(ok).unwrap();
        assert_eq!(p.state(), PublicState::Ready, "{name}: a server error is not fatal");
    }
}

#[test]
fn strict_checks_refuse_locally_and_can_be_switched_off() {
    let mut ro = Behaviour::nbdkit();
    ro.flags |= TransmissionFlags::READ_ONLY;
    ro.flags.remove(TransmissionFlags::SEND_CACHE | TransmissionFlags::SEND_FUA);
    ro.block_size = Some((512, 4096, 1 << 25));
    let mut p = Pair::connect(Config::default(), ro, 80 << 20);
    type Submit = fn(&mut Connection<Vec<u8>>) -> Result<Cookie, Error>;
    let cases: [(StrictMode, Submit, LocalError); 9] = [
        (StrictMode::COMMANDS, |c| c.write(0, vec![0; 512], CmdFlags::empty()), LocalError::ReadOnly),
        (StrictMode::COMMANDS, |c| c.cache(0, 512, CmdFlags::empty()), LocalError::Unsupported("cache operations")),
        (StrictMode::COMMANDS, |c| c.flush(CmdFlags::FUA), LocalError::Unsupported("the FUA flag")),
        (StrictMode::FLAGS, |c| c.read(0, vec![0; 512], CmdFlags::NO_HOLE), LocalError::InvalidFlags(2)),
        (StrictMode::FLAGS, |c| c.flush(CmdFlags::REQ_ONE), LocalError::InvalidFlags(8)),
        (StrictMode::BOUNDS, |c| c.read((80 << 20) - 512, vec![0; 1024], CmdFlags::empty()), LocalError::OutOfBounds),
        (StrictMode::ZERO_SIZE, |c| c.read(0, vec![], CmdFlags::empty()), LocalError::ZeroSize),
        (StrictMode::ALIGN, |c| c.read(1, vec![0; 512], CmdFlags::empty()), LocalError::Unaligned),
        (
            StrictMode::PAYLOAD,
            |c| c.read(0, vec![0; (64 << 20) + 512], CmdFlags::empty()),
            LocalError::TooLarge { max: 64 << 20 },
        ),
    ];
    for (bit, submit, expected) in cases {
        let sent = p.server.requests.len();
        assert!(p.client.config_mut().is_err(), "settings are fixed once connected");
        let e = submit(&mut p.client).unwrap_err();
        assert_eq!(e, Error::Local(expected.clone()));
        let errno = match expected {
            LocalError::ReadOnly => errno::EPERM,
            LocalError::TooLarge { .. } => errno::ERANGE,
            _ => errno::EINVAL,
        };
        assert_eq!(e.errno(), errno, "{expected:?}");
        assert_eq!(p.server.requests.len(), sent, "nothing was sent for {expected:?}");
        // The same request with only this check switched off goes out.
        let mut relaxed = Config::default();
        relaxed.strict = StrictMode::all() - bit;
        relaxed.add_meta_context("base:allocation").unwrap();
        let mut b = p.server.b.clone();
        b.flags = p.server.b.flags;
        let mut q = Pair::connect(relaxed, b, 80 << 20);
        q.server.hold = true;
        submit(&mut q.client).unwrap_or_else(|e| panic!("{expected:?} still refused: {e}"));
        q.drive();
        assert_eq!(q.server.requests.len(), 1, "{expected:?}");
    }
    // Compact headers cannot carry 2^32 bytes whatever the strictness.
    let mut q = ready(Behaviour::nbdkit());
    assert_eq!(q.client.trim(0, 1 << 32, CmdFlags::empty()).unwrap_err().errno(), errno::ERANGE);
    assert!(q.client.config_mut().is_err());
}

#[test]
fn block_status_needs_a_negotiated_context() {
    let mut p = Pair::connect(Config::default(), Behaviour::nbdkit(), 4096);
    let e = p.client.block_status(0, 512, CmdFlags::empty()).unwrap_err();
    assert_eq!(e.errno(), errno::ENOTSUP);
}

#[test]
fn commands_after_disconnect_are_refused() {
    let mut p = ready(Behaviour::nbdkit());
    p.server.hold = true;
    let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.client.disconnect().unwrap();
    let e = p.client.flush(CmdFlags::empty()).unwrap_err();
    assert_eq!(e, Error::Local(LocalError::AfterDisconnect));
    p.drive();
    // The read still completes after DISC has gone out; then the connection closes.
    assert_eq!(p.state(), PublicState::Ready);
    let mut v = Vec::new();
    ReplyHeader::Chunk(ChunkHeader {
        flags: 1,
        kind: chunk::OFFSET_DATA,
        cookie: r,
        offset: 0,
        length: 520,
        extended: false,
    })
    .encode(&mut v);
    v.put_u64(0);
    v.extend_from_slice(&[5; 512]);
    p.inject(&v);
    assert_eq!(p.completed(r).unwrap().unwrap(), vec![5; 512]);
    assert_eq!(p.state(), PublicState::Closed);
}

#[test]
fn many_small_replies_in_one_receive_are_all_parsed() {
    let mut p = ready(Behaviour::nbdkit());
    p.server.hold = true;
    let cookies: Vec<Cookie> = (0..100).map(|_| p.client.flush(CmdFlags::empty()).unwrap()).collect();
    p.drive();
    let mut burst = Vec::new();
    for &c in &cookies {
        ReplyHeader::Simple { error: 0, cookie: c }.encode(&mut burst);
    }
    let dest = p.client.recv_buffer();
    assert!(dest.len() >= burst.len());
    dest[..burst.len()].copy_from_slice(&burst);
    p.client.handle_received(burst.len());
    let mut done = 0;
    while let Some(e) = p.client.poll_event() {
        done += usize::from(matches!(e, Event::Complete { result: Ok(()), .. }));
    }
    assert_eq!(done, 100, "one receive, one hundred completions");
}

#[test]
fn many_requests_leave_in_one_vectored_send() {
    let mut p = ready(Behaviour::nbdkit());
    for i in 0..10 {
        p.client.write(i * 4096, vec![i as u8; 4096], CmdFlags::empty()).unwrap();
    }
    {
        let mut slices: [&[u8]; 64] = [&[]; 64];
        let n = p.client.poll_transmit(&mut slices);
        // Header, payload, header, payload... each payload the caller's own buffer.
        assert_eq!(n, 20);
        assert!(slices[..n].iter().skip(1).step_by(2).enumerate().all(|(i, s)| s.len() == 4096 && s[0] == i as u8));
        let total: usize = slices[..n].iter().map(|s| s.len()).sum();
        assert_eq!(total, 10 * (28 + 4096));
    }
    // A partial send resumes mid-slice.
    p.client.handle_sent(28 + 100);
    let mut slices: [&[u8]; 64] = [&[]; 64];
    let n = p.client.poll_transmit(&mut slices);
    assert_eq!(slices[0].len(), 4096 - 100);
    assert_eq!(n, 19);
}

#[test]
fn large_read_payloads_go_straight_into_the_callers_buffer() {
    let mut p = ready(Behaviour::nbdkit());
    p.server.hold = true;
    let r = p.client.read(0, vec![0; 1 << 20], CmdFlags::empty()).unwrap();
    p.drive();
    let mut v = Vec::new();
    let len = (1 << 20) + 8;
    ReplyHeader::Chunk(ChunkHeader {
        flags: 1,
        kind: chunk::OFFSET_DATA,
        cookie: r,
        offset: 0,
        length: len,
        extended: false,
    })
    .encode(&mut v);
    v.put_u64(0);
    p.inject(&v);
    // The next receive goes into the read's own buffer, for the whole payload.
    let dest = p.client.recv_buffer();
    assert_eq!(dest.len(), 1 << 20);
    dest.fill(9);
    p.client.handle_received(1 << 20);
    let Some(Event::Complete { result: Ok(()), buf: Some(buf), .. }) = p.client.poll_event() else {
        panic!("read did not complete")
    };
    assert!(buf.iter().all(|&b| b == 9));
    assert_eq!(buf.len(), 1 << 20);
}

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let mut p = ready(Behaviour::qemu());
    assert!(p.client.extended_headers_negotiated());
    let t = p.client.trim(0, 1 << 20, CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(t).unwrap();
    assert_eq!(p.server.requests.last().unwrap().length, 1 << 20);
    // Beyond 2^32 is refused by bounds here, not by the header format.
    let e = p.client.trim(0, 1 << 33, CmdFlags::empty()).unwrap_err();
    assert_eq!(e, Error::Local(LocalError::OutOfBounds));
}

#[test]
fn replies_in_any_order() {
    let mut p = ready(Behaviour::nbdkit());
    p.server.hold = true;
    let cookies: Vec<Cookie> =
        (0..8u64).map(|i| p.client.read(i * 512, vec![0; 512], CmdFlags::empty()).unwrap()).collect();
    p.drive();
    let mut v = Vec::new();
    for &c in cookies.iter().rev() {
        let h = ChunkHeader { flags: 1, kind: chunk::OFFSET_DATA, cookie: c, offset: 0, length: 520, extended: false };
        ReplyHeader::Chunk(h).encode(&mut v);
        v.put_u64((c - cookies[0]) * 512);
        v.extend_from_slice(&[c as u8; 512]);
    }
    p.inject(&v);
    let order: Vec<Cookie> = p
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Complete { cookie, .. } => Some(*cookie),
            _ => None,
        })
        .collect();
    assert_eq!(order, cookies.iter().rev().copied().collect::<Vec<_>>());
    for c in cookies {
        assert_eq!(p.completed(c).unwrap().unwrap(), vec![c as u8; 512]);
    }
}
