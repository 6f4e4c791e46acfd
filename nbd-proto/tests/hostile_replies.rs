//! Malformed transmission replies: each must kill the connection with a
//! typed protocol error, fail every in-flight command with EPROTO exactly
//! once, hand every buffer back, and never panic, under every split of the
//! byte stream.

mod support;

use nbd_proto::errno::EPROTO;
use nbd_proto::wire::{chunk, nbd_error, ChunkHeader, Put, ReplyHeader};
use nbd_proto::*;
use support::pair::{Pair, Split};
use support::server::Behaviour;

const SPLITS: [Split; 5] = [Split::Whole, Split::Bytewise, Split::Random(1), Split::Random(7), Split::Random(99)];

/// A connection held at Ready with the server's answers held back.
fn held(behaviour: Behaviour, split: Split) -> Pair {
    let mut cfg = Config::default();
    cfg.add_meta_context("base:allocation").unwrap();
    cfg.add_meta_context("qemu:allocation-depth").unwrap();
    let mut p = Pair::with_split(cfg, behaviour, 1 << 20, split);
    p.drive();
    assert_eq!(p.state(), PublicState::Ready, "{:?}", p.client.error());
    p.server.hold = true;
    p
}

fn chunk(cookie: u64, kind: u16, done: bool, extended: bool, payload: &[u8]) -> Vec<u8> {
    let h = ChunkHeader {
        flags: if done { chunk::FLAG_DONE } else { 0 },
        kind,
        cookie,
        offset: 0,
        length: payload.len() as u64,
        extended,
    };
    let mut out = Vec::new();
    ReplyHeader::Chunk(h).encode(&mut out);
    out.extend_from_slice(payload);
    out
}

fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u64(offset);
    p.extend_from_slice(bytes);
    p
}

fn hole(offset: u64, len: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u64(offset);
    p.put_u32(len);
    p
}

fn error(value: u32, msg: &[u8], declared: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u32(value);
    p.put_u16(declared);
    p.extend_from_slice(msg);
    p
}

fn status(id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u32(id);
    for &(l, f) in extents {
        p.put_u32(l);
        p.put_u32(f);
    }
    p
}

/// The three commands every case has in flight: a 4 KiB read at 0
/// (cookie 1), a block status of 64 KiB at 0 (cookie 2), a flush (cookie 3).
fn submit(p: &mut Pair) -> Vec<Cookie> {
    let c = vec![
        p.client.read(0, vec![0xee; 4096], CmdFlags::empty()).unwrap(),
        p.client.block_status(0, 65536, CmdFlags::empty()).unwrap(),
        p.client.flush(CmdFlags::empty()).unwrap(),
    ];
    p.drive();
    assert_eq!(p.server.requests.len(), 3);
    c
}

/// The contract: dead with `expected`, every command failed once with its
/// errno and its buffer back, nothing more to do, nothing more accepted.
fn assert_killed(p: &mut Pair, cookies: &[Cookie], expected: &ProtocolError, case: &str) {
    assert_eq!(p.state(), PublicState::Dead, "{case}: not dead");
    assert_eq!(p.client.error(), Some(&Error::Protocol(expected.clone())), "{case}");
    for &c in cookies {
        let e = p.completed(c).expect_err(case);
        assert_eq!(e.errno(), EPROTO, "{case}: cookie {c}");
        assert!(p.completion(c).is_none(), "{case}: cookie {c} completed twice");
    }
    assert_eq!(p.client.in_flight(), 0, "{case}");
    assert_eq!(p.client.direction(), Direction::None, "{case}");
    assert!(p.client.read(0, vec![0; 1], CmdFlags::empty()).is_err(), "{case}: accepted a command when dead");
    // More bytes from the dead peer change nothing.
    p.inject(&[0; 64]);
    assert_eq!(p.state(), PublicState::Dead, "{case}");
}

type Case = (&'static str, fn(&Pair) -> Vec<u8>, ProtocolError);

fn structured_cases() -> Vec<Case> {
    vec![
        ("bad reply magic", |_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0], ProtocolError::BadReplyMagic(0xdead_beef)),
        ("unknown cookie", |_| chunk(77, chunk::NONE, true, false, &[]), ProtocolError::UnknownCookie(77)),
        (
            "extended reply not negotiated",
            |_| chunk(3, chunk::NONE, true, true, &[]),
            ProtocolError::ReplyNotNegotiated("an extended"),
        ),
        (
            "simple reply with data to a read",
            |_| {
                let mut v = Vec::new();
                ReplyHeader::Simple { error: 0, cookie: 1 }.encode(&mut v);
                v
            },
            ProtocolError::SimpleReadUnderStructured,
        ),
        (
            "data chunk to a flush",
            |_| chunk(3, chunk::OFFSET_DATA, true, false, &data(0, &[1; 16])),
            ProtocolError::ChunkNotForCommand { kind: chunk::OFFSET_DATA, command: 3 },
        ),
        (
            "data chunk shorter than 9",
            |_| chunk(1, chunk::OFFSET_DATA, true, false, &data(0, &[])),
            ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: 8 },
        ),
        (
            "data chunk longer than the request",
            |_| chunk(1, chunk::OFFSET_DATA, true, false, &data(0, &[0; 4097])),
            ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: 4105 },
        ),
        (
            "data chunk past the end of the request",
            |_| chunk(1, chunk::OFFSET_DATA, true, false, &data(4000, &[0; 200])),
            ProtocolError::ChunkOutOfRange { offset: 4000, length: 200 },
        ),
        (
            "data chunk offset wraps around",
            |_| chunk(1, chunk::OFFSET_DATA, true, false, &data(u64::MAX - 2, &[0; 16])),
            ProtocolError::ChunkOutOfRange { offset: u64::MAX - 2, length: 16 },
        ),
        (
            "overlapping data chunks",
            |_| {
                let mut v = chunk(1, chunk::OFFSET_DATA, false, false, &data(0, &[1; 2048]));
                v.extend(chunk(1, chunk::OFFSET_DATA, true, false, &data(2000, &[2; 2096])));
                v
            },
            ProtocolError::ChunkOverlap { offset: 2000, length: 2096 },
        ),
        (
            "hole overlapping data",
            |_| {
                let mut v = chunk(1, chunk::OFFSET_DATA, false, false, &data(0, &[1; 2048]));
                v.extend(chunk(1, chunk::OFFSET_HOLE, true, false, &hole(1024, 3072)));
                v
            },
            ProtocolError::ChunkOverlap { offset: 1024, length: 3072 },
        ),
        (
            "incomplete coverage",
            |_| {
                let mut v = chunk(1, chunk::OFFSET_DATA, false, false, &data(0, &[1; 2048]));
                v.extend(chunk(1, chunk::NONE, true, false, &[]));
                v
            },
            ProtocolError::IncompleteRead { covered: 2048, expected: 4096 },
        ),
        (
            "hole chunk of wrong length",
            |_| chunk(1, chunk::OFFSET_HOLE, true, false, &data(0, &[0; 8])),
            ProtocolError::BadChunkLength { kind: chunk::OFFSET_HOLE, length: 16 },
        ),
        (
            "hole of size zero",
            |_| chunk(1, chunk::OFFSET_HOLE, true, false, &hole(0, 0)),
            ProtocolError::BadChunkLength { kind: chunk::OFFSET_HOLE, length: 12 },
        ),
        ("NONE without DONE", |_| chunk(3, chunk::NONE, false, false, &[]), ProtocolError::NoneWithoutDone),
        (
            "NONE with a payload",
            |_| chunk(3, chunk::NONE, true, false, &[0; 4]),
            ProtocolError::BadChunkLength { kind: chunk::NONE, length: 4 },
        ),
        ("unknown chunk type", |_| chunk(3, 77, true, false, &[]), ProtocolError::UnknownChunkType(77)),
        (
            "error chunk with error 0",
            |_| chunk(3, chunk::ERROR, true, false, &error(0, b"", 0)),
            ProtocolError::ZeroErrorInErrorChunk,
        ),
        (
            "error message longer than the chunk",
            |_| chunk(3, chunk::ERROR, true, false, &error(5, b"abc", 40)),
            ProtocolError::ErrorMessageTooLong(40),
        ),
        (
            "error offset outside the request",
            |_| {
                let mut p = error(5, b"", 0);
                p.put_u64(1 << 19);
                chunk(1, chunk::ERROR_OFFSET, true, false, &p)
            },
            ProtocolError::ChunkOutOfRange { offset: 1 << 19, length: 0 },
        ),
        (
            "block status for an unknown context",
            |_| chunk(2, chunk::BLOCK_STATUS, true, false, &status(42, &[(4096, 0)])),
            ProtocolError::UnknownContext(42),
        ),
        (
            "block status for one context twice",
            |p| {
                let id = p.client.meta_contexts().unwrap()[0].id;
                let mut v = chunk(2, chunk::BLOCK_STATUS, false, false, &status(id, &[(4096, 0)]));
                v.extend(chunk(2, chunk::BLOCK_STATUS, true, false, &status(id, &[(4096, 0)])));
                v
            },
            ProtocolError::DuplicateContext(1),
        ),
        (
            "zero-length extent",
            |_| chunk(2, chunk::BLOCK_STATUS, true, false, &status(1, &[(4096, 0), (0, 0)])),
            ProtocolError::ZeroLengthExtent,
        ),
        (
            "extents beyond the request",
            |_| chunk(2, chunk::BLOCK_STATUS, true, false, &status(1, &[(65536, 0), (4096, 0)])),
            ProtocolError::ExtentsBeyondRequest,
        ),
        (
            "block status of bad length",
            |_| chunk(2, chunk::BLOCK_STATUS, true, false, &status(1, &[(4096, 0)])[..10]),
            ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS, length: 10 },
        ),
        (
            "64-bit block status without extended headers",
            |_| chunk(2, chunk::BLOCK_STATUS_EXT, true, false, &[0; 24]),
            ProtocolError::ReplyNotNegotiated("a 64-bit block status"),
        ),
        (
            "block status chunk larger than any bound",
            |_| {
                let mut v = Vec::new();
                let h = ChunkHeader {
                    flags: 0,
                    kind: chunk::BLOCK_STATUS,
                    cookie: 2,
                    offset: 0,
                    length: 0xffff_fffc,
                    extended: false,
                };
                ReplyHeader::Chunk(h).encode(&mut v);
                v
            },
            ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS, length: 0xffff_fffc },
        ),
    ]
}

#[test]
fn every_malformed_structured_reply_kills_the_connection() {
    for (case, bytes, expected) in structured_cases() {
        for split in SPLITS {
            let mut p = held(Behaviour::nbdkit(), split);
            let cookies = submit(&mut p);
            let bytes = bytes(&p);
            p.inject(&bytes);
            assert_killed(&mut p, &cookies, &expected, &format!("{case} ({split:?})"));
        }
    }
}

#[test]
fn a_duplicate_reply_is_an_unknown_cookie() {
    for split in SPLITS {
        let mut p = held(Behaviour::nbdkit(), split);
        let cookies = submit(&mut p);
        p.inject(&chunk(3, chunk::NONE, true, false, &[]));
        assert!(p.completed(3).is_ok());
        p.inject(&chunk(3, chunk::NONE, true, false, &[]));
        assert_killed(&mut p, &cookies[..2], &ProtocolError::UnknownCookie(3), "duplicate");
    }
}

#[test]
fn a_reply_before_the_request_left_is_refused() {
    let mut p = held(Behaviour::nbdkit(), Split::Whole);
    let c = p.client.flush(CmdFlags::empty()).unwrap();
    p.inject(&chunk(c, chunk::NONE, true, false, &[]));
    assert_killed(&mut p, &[c], &ProtocolError::ReplyBeforeRequest(c), "early reply");
}

#[test]
fn df_read_answered_in_two_chunks_is_refused() {
    let mut p = held(Behaviour::nbdkit(), Split::Whole);
    let c = p.client.read(0, vec![0; 4096], CmdFlags::DF).unwrap();
    p.drive();
    let mut v = chunk(c, chunk::OFFSET_DATA, false, false, &data(0, &[1; 2048]));
    v.extend(chunk(c, chunk::OFFSET_DATA, true, false, &data(2048, &[1; 2048])));
    p.inject(&v);
    assert_killed(&mut p, &[c], &ProtocolError::FragmentedDf, "DF");
}

#[test]
fn req_one_answered_with_two_extents_is_refused() {
    let mut p = held(Behaviour::nbdkit(), Split::Whole);
    let c = p.client.block_status(0, 65536, CmdFlags::REQ_ONE).unwrap();
    p.drive();
    p.inject(&chunk(c, chunk::BLOCK_STATUS, true, false, &status(1, &[(4096, 0), (4096, 3)])));
    assert_killed(&mut p, &[c], &ProtocolError::ReqOneViolated, "REQ_ONE");
}

#[test]
fn structured_reply_without_negotiation_is_refused() {
    let mut b = Behaviour::nbd_server();
    b.exports.push((String::new(), String::new()));
    let mut p = held(b, Split::Whole);
    assert!(!p.client.structured_replies_negotiated());
    let c = p.client.flush(CmdFlags::empty()).unwrap();
    p.drive();
    p.inject(&chunk(c, chunk::NONE, true, false, &[]));
    assert_killed(&mut p, &[c], &ProtocolError::ReplyNotNegotiated("a structured"), "SR not negotiated");
}

#[test]
fn extended_headers_refuse_compact_and_simple_replies_and_bad_descriptor_counts() {
    type Make = fn(u64) -> Vec<u8>;
    let cases: [(&str, Make, ProtocolError); 3] = [
        (
            "compact chunk",
            |c| chunk(c, chunk::NONE, true, false, &[]),
            ProtocolError::ReplyNotNegotiated("a compact structured"),
        ),
        (
            "simple reply",
            |c| {
                let mut v = Vec::new();
                ReplyHeader::Simple { error: 0, cookie: c }.encode(&mut v);
                v
            },
            ProtocolError::ReplyNotNegotiated("a simple"),
        ),
        (
            "descriptor count disagrees",
            |c| {
                let mut p = Vec::new();
                p.put_u32(1);
                p.put_u32(5);
                p.put_u64(4096);
                p.put_u64(0);
                chunk(c, chunk::BLOCK_STATUS_EXT, true, true, &p)
            },
            ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS_EXT, length: 24 },
        ),
    ];
    for (case, make, expected) in cases {
        let mut p = held(Behaviour::qemu(), Split::Random(3));
        assert!(p.client.extended_headers_negotiated());
        let c = p.client.block_status(0, 65536, CmdFlags::empty()).unwrap();
        p.drive();
        p.inject(&make(c));
        assert_killed(&mut p, &[c], &expected, case);
    }
}

#[test]
fn a_huge_chunk_length_fails_at_once_without_allocating() {
    let mut p = held(Behaviour::qemu(), Split::Whole);
    let c = p.client.read(0, vec![0; 4096], CmdFlags::empty()).unwrap();
    p.drive();
    let h = ChunkHeader { flags: 0, kind: chunk::OFFSET_DATA, cookie: c, offset: 0, length: 1 << 40, extended: true };
    let mut v = Vec::new();
    ReplyHeader::Chunk(h).encode(&mut v);
    p.inject(&v);
    assert_killed(&mut p, &[c], &ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: 1 << 40 }, "huge");
}

#[test]
fn eof_inside_any_reply_fails_every_command_with_enotconn() {
    // A complete, valid reply stream for the three commands, cut at every byte.
    let mut full = chunk(1, chunk::OFFSET_DATA, true, false, &data(0, &[3; 4096]));
    full.extend(chunk(2, chunk::BLOCK_STATUS, true, false, &status(1, &[(65536, 3)])));
    full.extend(chunk(3, chunk::NONE, true, false, &[]));
    for cut in 0..full.len() {
        let mut p = held(Behaviour::nbdkit(), Split::Whole);
        let cookies = submit(&mut p);
        p.inject(&full[..cut]);
        p.eof();
        assert_eq!(p.state(), PublicState::Dead, "cut at {cut}");
        assert!(matches!(p.client.error(), Some(Error::Transport(TransportError::Eof(_)))), "cut at {cut}");
        let mut failed = 0;
        for c in cookies {
            match p.completed(c) {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.errno(), errno::ENOTCONN, "cut at {cut}");
                    failed += 1;
                }
            }
        }
        assert!(failed >= 1, "cut at {cut}: something was still in flight");
        assert_eq!(p.client.in_flight(), 0);
    }
}

#[test]
fn server_errors_are_not_protocol_errors() {
    for split in SPLITS {
        let mut p = held(Behaviour::nbdkit(), split);
        let cookies = submit(&mut p);
        let mut v = chunk(1, chunk::ERROR, true, false, &error(nbd_error::ENOSPC, b"full", 4));
        // An unknown error type (bit 15 set) with an unknown value: EINVAL.
        v.extend(chunk(2, chunk::ERROR_BIT | 77, true, false, &error(4242, b"", 0)));
        let mut simple = Vec::new();
        ReplyHeader::Simple { error: nbd_error::EIO, cookie: 3 }.encode(&mut simple);
        v.extend(simple);
        p.inject(&v);
        assert_eq!(p.state(), PublicState::Ready, "{split:?}");
        let errnos: Vec<i32> = cookies.iter().map(|&c| p.completed(c).unwrap_err().errno()).collect();
        assert_eq!(errnos, [errno::ENOSPC, errno::EINVAL, errno::EIO]);
        let e = Error::Server(ServerError::Command { errno: errno::ENOSPC, message: Some("full".into()) });
        assert!(e.to_string().contains("full"));
    }
}
