//! Every good path of transmission, as scripts against nbdkit-like,
//! qemu-like (extended headers, sparse reads, NONE terminators, 64 KiB
//! data chunks) and nbd-server-like (simple replies only) servers: every
//! command and flag, many commands in flight, structured reads with holes,
//! block status with several contexts, server errors under every reply
//! style, disconnect, strict-mode checks, wrong states, replies out of
//! order, vectored zero-copy sends, batching and zero-copy receives.

mod support;

use nbd_proto::errno::{ECONNRESET, EINVAL, ENOSPC, ENOTCONN, ENOTSUP, EPERM, ERANGE};
use nbd_proto::wire::{cmd, nbd_error};
use nbd_proto::*;
use support::pair::{Pair, Split};
use support::server::Behaviour;

const SIZE: usize = 1 << 20;
const KIB: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preset {
    Nbdkit,
    Qemu,
    NbdServer,
}

const PRESETS: [Preset; 3] = [Preset::Nbdkit, Preset::Qemu, Preset::NbdServer];

impl Preset {
    fn behaviour(self) -> Behaviour {
        match self {
            Preset::Nbdkit => Behaviour::nbdkit(),
            Preset::Qemu => Behaviour::qemu(),
            Preset::NbdServer => Behaviour::nbd_server(),
        }
    }

    /// Asks for both contexts and names the export the server has.
    fn config(self) -> Config {
        let mut c = Config::default();
        c.add_meta_context("base:allocation").unwrap();
        c.add_meta_context("qemu:allocation-depth").unwrap();
        if self == Preset::NbdServer {
            c.set_export_name("exp").unwrap();
        }
        c
    }

    fn structured(self) -> bool {
        self != Preset::NbdServer
    }
}

fn ready_with(preset: Preset, b: Behaviour, config: Config, size: usize, split: Split) -> Pair {
    let mut p = Pair::with_split(config, b, size, split);
    p.drive();
    assert_eq!(p.state(), PublicState::Ready, "{preset:?}: {:?}", p.client.error());
    assert_eq!(p.client.extended_headers_negotiated(), preset == Preset::Qemu, "{preset:?}");
    assert_eq!(p.client.structured_replies_negotiated(), preset.structured(), "{preset:?}");
    assert_eq!(p.transcript, ["Connected"]);
    p.transcript.clear();
    p.events.clear();
    p
}

fn ready(preset: Preset) -> Pair {
    ready_with(preset, preset.behaviour(), preset.config(), SIZE, Split::Whole)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed | 1).collect()
}

/// The read chunks reported for `cookie`, in arrival order.
fn chunks(p: &Pair, cookie: Cookie) -> Vec<(u64, u64, ChunkStatus)> {
    p.events
        .iter()
        .filter_map(|e| match e {
            Event::ReadChunk { cookie: c, offset, length, status } if *c == cookie => Some((*offset, *length, *status)),
            _ => None,
        })
        .collect()
}

/// The extents reported for `cookie`: (context id, offset, extents).
fn extents(p: &Pair, cookie: Cookie) -> Vec<(u32, u64, Vec<Extent>)> {
    p.events
        .iter()
        .filter_map(|e| match e {
            Event::Extents { cookie: c, context_id, offset, extents } if *c == cookie => {
                Some((*context_id, *offset, extents.clone()))
            }
            _ => None,
        })
        .collect()
}

fn ext(length: u64, flags: u64) -> Extent {
    Extent { length, flags }
}

/// Sends everything the client has queued to the server, without letting
/// the server's answers back.
fn send_to_server(p: &mut Pair) {
    loop {
        let mut slices: [&[u8]; 64] = [&[]; 64];
        let n = p.client.poll_transmit(&mut slices);
        let bytes = slices[..n].concat();
        if bytes.is_empty() {
            return;
        }
        p.client.handle_sent(bytes.len());
        p.server.receive(&bytes);
    }
}

/// One receive of exactly `bytes`, wherever `recv_buffer` points.
fn receive_once(c: &mut Connection<Vec<u8>>, bytes: &[u8]) {
    let dest = c.recv_buffer();
    assert!(dest.len() >= bytes.len(), "room for {} bytes, not {}", dest.len(), bytes.len());
    dest[..bytes.len()].copy_from_slice(bytes);
    c.handle_received(bytes.len());
}

fn server_error(e: &Error) -> (i32, Option<&str>) {
    match e {
        Error::Server(ServerError::Command { errno, message }) => (*errno, message.as_deref()),
        other => panic!("not a server command error: {other:?}"),
    }
}

// ---- every command ------------------------------------------------------------

#[test]
fn every_command_against_every_server() {
    for preset in PRESETS {
        let mut p = ready(preset);
        let data = pattern(20_000, 0x10);
        let w = p.client.write(8192, data.clone(), CmdFlags::empty()).unwrap();
        assert_eq!(w, 1, "cookies start at 1");
        let r = p.client.read(8192, vec![0; data.len()], CmdFlags::empty()).unwrap();
        let rs = p.client.read_structured(0, vec![0xff; 40 * KIB], CmdFlags::empty()).unwrap();
        let f = p.client.flush(CmdFlags::empty()).unwrap();
        let t = p.client.trim(12288, 4096, CmdFlags::empty()).unwrap();
        assert_eq!((r, rs, f, t), (2, 3, 4, 5), "cookies increase by one");
        assert_eq!(p.client.in_flight(), 5);
        p.drive();
        assert_eq!(p.completed(w).unwrap(), Some(data.clone()), "{preset:?}: the write's buffer comes back");
        assert_eq!(p.completed(r).unwrap().unwrap(), data, "{preset:?}");
        let whole = p.completed(rs).unwrap().unwrap();
        let mut expected = vec![0; 40 * KIB];
        expected[8192..28192].copy_from_slice(&data);
        assert_eq!(whole, expected, "{preset:?}: structured read of data and zeroes");
        let reported: u64 = chunks(&p, rs).iter().map(|c| c.1).sum();
        assert_eq!(reported, 40 * KIB as u64, "{preset:?}: chunks cover the read");
        p.completed(f).unwrap();
        p.completed(t).unwrap();
        assert!(p.server.disk[12288..16384].iter().all(|&b| b == 0), "{preset:?}: trimmed");
        assert_eq!(&p.server.disk[8192..12288], &data[..4096]);

        let mut kinds = vec![cmd::WRITE, cmd::READ, cmd::READ, cmd::FLUSH, cmd::TRIM];
        if preset == Preset::NbdServer {
            // Not advertised: refused locally, nothing sent.
            let e = p.client.cache(0, 4096, CmdFlags::empty()).unwrap_err();
            assert_eq!(e, Error::Local(LocalError::Unsupported("cache operations")));
            let e = p.client.write_zeroes(0, 4096, CmdFlags::empty()).unwrap_err();
            assert_eq!(e, Error::Local(LocalError::Unsupported("zero operations")));
            let e = p.client.block_status(0, 4096, CmdFlags::empty()).unwrap_err();
            assert_eq!(e.errno(), ENOTSUP);
        } else {
            let c = p.client.cache(0, 64 * KIB as u64, CmdFlags::empty()).unwrap();
            let z = p.client.write_zeroes(8192, 1000, CmdFlags::empty()).unwrap();
            let b = p.client.block_status(0, 64 * KIB as u64, CmdFlags::empty()).unwrap();
            p.drive();
            p.completed(c).unwrap();
            p.completed(z).unwrap();
            p.completed(b).unwrap();
            assert!(p.server.disk[8192..9192].iter().all(|&b| b == 0), "{preset:?}: zeroed");
            let contexts = if preset == Preset::Qemu { 2 } else { 1 };
            assert_eq!(extents(&p, b).len(), contexts, "{preset:?}");
            kinds.extend([cmd::CACHE, cmd::WRITE_ZEROES, cmd::BLOCK_STATUS]);
        }
        assert_eq!(p.client.in_flight(), 0);
        p.client.disconnect().unwrap();
        p.drive();
        assert_eq!(p.state(), PublicState::Closed, "{preset:?}");
        assert_eq!(p.client.direction(), Direction::None);
        kinds.push(cmd::DISC);
        let seen: Vec<u16> = p.server.requests.iter().map(|r| r.kind).collect();
        assert_eq!(seen, kinds, "{preset:?}");
    }
}

#[test]
fn flags_reach_the_server() {
    for preset in PRESETS {
        let mut p = ready(preset);
        p.server.disk[..8192].fill(0x42);
        let mut submitted = vec![
            // Strict mode's AUTO_FLAG marks a WRITE's length as its payload's
            // under extended headers, as libnbd does.
            (
                p.client.write(0, vec![1; 512], CmdFlags::FUA).unwrap(),
                CmdFlags::FUA
                    | if p.client.extended_headers_negotiated() { CmdFlags::PAYLOAD_LEN } else { CmdFlags::empty() },
            ),
            (p.client.trim(4096, 512, CmdFlags::FUA).unwrap(), CmdFlags::FUA),
            (p.client.flush(CmdFlags::empty()).unwrap(), CmdFlags::empty()),
        ];
        if preset.structured() {
            let zero = CmdFlags::FUA | CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO;
            submitted.extend([
                (p.client.write_zeroes(8192, 512, zero).unwrap(), zero),
                (p.client.read(0, vec![0; 512], CmdFlags::DF).unwrap(), CmdFlags::DF),
                (p.client.block_status(0, 64 * KIB as u64, CmdFlags::REQ_ONE).unwrap(), CmdFlags::REQ_ONE),
            ]);
        } else {
            // Without structured replies DF is not offered at all.
            assert!(p.client.read(0, vec![0; 512], CmdFlags::DF).is_err());
        }
        p.drive();
        assert_eq!(p.server.requests.len(), submitted.len(), "{preset:?}");
        for (req, &(cookie, flags)) in p.server.requests.iter().zip(&submitted) {
            assert_eq!(req.cookie, cookie, "{preset:?}");
            assert_eq!(req.flags, flags.bits(), "{preset:?}: cookie {cookie}");
        }
        for &(cookie, _) in &submitted {
            p.completed(cookie).unwrap_or_else(|e| panic!("{preset:?}: cookie {cookie}: {e}"));
        }
        if preset.structured() {
            let bs = submitted.last().unwrap().0;
            let got = extents(&p, bs);
            assert!(!got.is_empty());
            assert!(got.iter().all(|(_, _, e)| e.len() == 1), "{preset:?}: REQ_ONE gives one extent: {got:?}");
        }
    }
}

/// Strict mode's AUTO_FLAG sets PAYLOAD_LEN on WRITE exactly when extended
/// headers were negotiated, whatever the caller passed.
#[test]
fn auto_flag_matches_payload_len_to_the_headers() {
    for preset in PRESETS {
        let mut p = ready(preset);
        let extended = p.client.extended_headers_negotiated();
        let want = if extended { CmdFlags::PAYLOAD_LEN } else { CmdFlags::empty() };
        let a = p.client.write(0, vec![1; 512], CmdFlags::PAYLOAD_LEN).unwrap();
        let b = p.client.write(512, vec![1; 512], CmdFlags::empty()).unwrap();
        p.drive();
        for (req, cookie) in p.server.requests.iter().zip([a, b]) {
            assert_eq!(req.cookie, cookie, "{preset:?}");
            assert_eq!(req.flags, want.bits(), "{preset:?}: extended headers {extended}");
        }
    }
}

#[test]
fn df_reads_arrive_in_one_chunk_even_from_a_sparse_server() {
    let mut p = ready(Preset::Qemu);
    p.server.disk[4096..8192].fill(9);
    let plain = p.client.read_structured(0, vec![0xff; 32 * KIB], CmdFlags::empty()).unwrap();
    let df = p.client.read_structured(0, vec![0xff; 32 * KIB], CmdFlags::DF).unwrap();
    p.drive();
    assert!(chunks(&p, plain).len() > 1, "sparse without DF");
    assert_eq!(chunks(&p, df), [(0, 32 * KIB as u64, ChunkStatus::Data)]);
    let a = p.completed(plain).unwrap().unwrap();
    let b = p.completed(df).unwrap().unwrap();
    assert_eq!(a, b);
    assert_eq!(&a[..], &p.server.disk[..32 * KIB]);
}

// ---- many in flight ------------------------------------------------------------

#[test]
fn sixty_four_commands_in_flight() {
    for preset in PRESETS {
        for split in [Split::Whole, Split::Random(3)] {
            let mut p = ready_with(preset, preset.behaviour(), preset.config(), SIZE, split);
            let mut cookies = Vec::new();
            for i in 0..32u8 {
                let at = u64::from(i) * 8192;
                cookies.push(p.client.write(at, vec![i + 1; 1024], CmdFlags::empty()).unwrap());
                cookies.push(p.client.read(at, vec![0; 2048], CmdFlags::empty()).unwrap());
            }
            assert_eq!(p.client.in_flight(), 64);
            assert_eq!(cookies, (1..=64).collect::<Vec<_>>());
            p.drive();
            assert_eq!(p.client.in_flight(), 0, "{preset:?} {split:?}");
            assert_eq!(p.server.requests.len(), 64);
            for (i, pair) in cookies.chunks(2).enumerate() {
                p.completed(pair[0]).unwrap();
                let buf = p.completed(pair[1]).unwrap().unwrap();
                // The server handles requests in order: each read sees its write.
                assert_eq!(&buf[..1024], &[i as u8 + 1; 1024][..], "{preset:?} {split:?}: read {i}");
                assert_eq!(&buf[1024..], &[0; 1024][..]);
            }
            assert!(p.events.iter().all(|e| !matches!(e, Event::Complete { .. })), "no stray completions");
            assert_eq!(p.state(), PublicState::Ready);
        }
    }
}

#[test]
fn replies_in_reverse_order() {
    for preset in PRESETS {
        let mut p = ready(preset);
        for i in 0..8u8 {
            p.server.disk[usize::from(i) * 512..][..512].fill(i + 1);
        }
        let reads: Vec<Cookie> =
            (0..8u64).map(|i| p.client.read(i * 512, vec![0; 512], CmdFlags::empty()).unwrap()).collect();
        send_to_server(&mut p);
        // The eight replies are the same size: cut them apart, last first.
        let stream = std::mem::take(&mut p.server.out);
        assert_eq!(stream.len() % 8, 0, "{preset:?}");
        let reversed: Vec<&[u8]> = stream.chunks(stream.len() / 8).rev().collect();
        p.deliver(&reversed.concat());
        let order: Vec<Cookie> = p
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Complete { cookie, .. } => Some(*cookie),
                _ => None,
            })
            .collect();
        assert_eq!(order, reads.iter().rev().copied().collect::<Vec<_>>(), "{preset:?}");
        for (i, r) in reads.into_iter().enumerate() {
            assert_eq!(p.completed(r).unwrap().unwrap(), vec![i as u8 + 1; 512], "{preset:?}: read {i}");
        }
        assert_eq!(p.state(), PublicState::Ready);
    }
}

// ---- structured reads and block status -------------------------------------------

#[test]
fn read_structured_reports_data_and_holes_and_zero_fills_holes() {
    let mut p = ready(Preset::Qemu);
    p.server.disk[4096..8192].fill(0x33);
    p.server.disk[200_000..270_000].fill(0x44);
    let r = p.client.read_structured(0, vec![0xff; 300_000], CmdFlags::empty()).unwrap();
    p.drive();
    use ChunkStatus::{Data, Hole};
    assert_eq!(
        chunks(&p, r),
        [
            (0, 4096, Hole),
            (4096, 4096, Data),
            (8192, 188_416, Hole),
            // Data comes in chunks of at most 64 KiB.
            (196_608, 65536, Data),
            (262_144, 8192, Data),
            (270_336, 29_664, Hole),
        ]
    );
    let buf = p.completed(r).unwrap().unwrap();
    assert_eq!(&buf[..], &p.server.disk[..300_000], "holes were zero-filled over 0xff");

    // A read_structured inside one hole, at an offset.
    let r = p.client.read_structured(20_000, vec![0xff; 1000], CmdFlags::empty()).unwrap();
    p.drive();
    assert_eq!(chunks(&p, r), [(20_000, 1000, Hole)]);
    assert_eq!(p.completed(r).unwrap().unwrap(), vec![0; 1000]);

    // nbdkit and nbd-server: one Data chunk for the whole read.
    for preset in [Preset::Nbdkit, Preset::NbdServer] {
        let mut p = ready(preset);
        p.server.disk[4096..8192].fill(0x33);
        let r = p.client.read_structured(1000, vec![0xff; 20_000], CmdFlags::empty()).unwrap();
        p.drive();
        assert_eq!(chunks(&p, r), [(1000, 20_000, Data)], "{preset:?}");
        assert_eq!(&p.completed(r).unwrap().unwrap()[..], &p.server.disk[1000..21_000]);
    }
}

#[test]
fn plain_reads_report_no_chunks() {
    for preset in PRESETS {
        let mut p = ready(preset);
        let r = p.client.read(0, vec![0xff; 100_000], CmdFlags::empty()).unwrap();
        p.drive();
        assert_eq!(p.completed(r).unwrap().unwrap(), vec![0; 100_000], "{preset:?}: holes zero-filled");
        assert!(p.events.is_empty(), "{preset:?}: {:?}", p.events);
    }
}

#[test]
fn block_status_gives_one_extents_event_per_context() {
    let mut p = ready(Preset::Qemu);
    p.server.disk[8192..12288].fill(1);
    let b = p.client.block_status(0, 64 * KIB as u64, CmdFlags::empty()).unwrap();
    let at = p.client.block_status(4096, 16384, CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(b).unwrap();
    p.completed(at).unwrap();
    let base = 1;
    let depth = 2;
    assert_eq!(p.client.meta_context_name(base), Some("base:allocation"));
    assert_eq!(p.client.meta_context_name(depth), Some("qemu:allocation-depth"));
    assert_eq!(
        extents(&p, b),
        [(base, 0, vec![ext(8192, 3), ext(4096, 0), ext(53_248, 3)]), (depth, 0, vec![ext(65536, 1)]),]
    );
    assert_eq!(
        extents(&p, at),
        [(base, 4096, vec![ext(4096, 3), ext(4096, 0), ext(8192, 3)]), (depth, 4096, vec![ext(16384, 1)])]
    );

    // Compact block status (nbdkit), one context.
    let mut p = ready(Preset::Nbdkit);
    p.server.disk[..4096].fill(1);
    let b = p.client.block_status(0, 16384, CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(b).unwrap();
    assert_eq!(extents(&p, b), [(1, 0, vec![ext(4096, 0), ext(12288, 3)])]);
}

#[test]
fn block_status_replies_larger_than_the_receive_buffer() {
    // 4096 alternating extents: an extended reply body of 8 + 4096 * 16
    // bytes, more than the 64 KiB the receive buffer grows to for batching.
    const DISK: usize = 16 << 20;
    for split in [Split::Whole, Split::Random(11)] {
        let mut p = ready_with(Preset::Qemu, Behaviour::qemu(), Preset::Qemu.config(), DISK, split);
        for block in p.server.disk.chunks_mut(8192) {
            block[..4096].fill(1);
        }
        let b = p.client.block_status(0, DISK as u64, CmdFlags::empty()).unwrap();
        p.drive();
        p.completed(b).unwrap();
        let got = extents(&p, b);
        assert_eq!(got.len(), 2, "{split:?}");
        let (id, offset, base) = &got[0];
        assert_eq!((*id, *offset, base.len()), (1, 0, 4096), "{split:?}");
        assert!(base.iter().enumerate().all(|(i, e)| *e == ext(4096, if i % 2 == 0 { 0 } else { 3 })));
        assert_eq!(got[1].2, [ext(DISK as u64, 1)]);
        assert_eq!(p.state(), PublicState::Ready);
    }
}

// ---- server errors ---------------------------------------------------------------

#[test]
fn server_errors_under_every_reply_style() {
    let cases = [
        (nbd_error::EIO, errno::EIO),
        (nbd_error::ENOSPC, errno::ENOSPC),
        (nbd_error::EPERM, EPERM),
        (nbd_error::ESHUTDOWN, errno::ESHUTDOWN),
        // Unknown values become EINVAL, as the protocol asks.
        (12345, EINVAL),
    ];
    for preset in PRESETS {
        for (value, expected) in cases {
            let mut b = preset.behaviour();
            b.fail = Some((65536, 131_072, value));
            let mut p = ready_with(preset, b, preset.config(), SIZE, Split::Whole);
            let read = p.client.read(65536, vec![0; 512], CmdFlags::empty()).unwrap();
            let rs = p.client.read_structured(60_000, vec![0; 10_000], CmdFlags::empty()).unwrap();
            let write = p.client.write(100_000, vec![1; 512], CmdFlags::empty()).unwrap();
            let trim = p.client.trim(130_000, 4096, CmdFlags::empty()).unwrap();
            let fine = p.client.read(0, vec![1; 512], CmdFlags::empty()).unwrap();
            let mut failing = vec![(read, cmd::READ), (rs, cmd::READ), (write, cmd::WRITE), (trim, cmd::TRIM)];
            if preset.structured() {
                failing.push((p.client.block_status(65536, 4096, CmdFlags::empty()).unwrap(), cmd::BLOCK_STATUS));
            }
            p.drive();
            for (cookie, kind) in failing {
                let e = p.completed(cookie).unwrap_err();
                let (errno, message) = server_error(&e);
                assert_eq!(errno, expected, "{preset:?} value {value} kind {kind}");
                assert_eq!(e.errno(), expected);
                // An ERROR chunk carries the server's message; a simple reply has none.
                let chunked = match preset {
                    Preset::Qemu => true,
                    Preset::Nbdkit => kind == cmd::READ || kind == cmd::BLOCK_STATUS,
                    Preset::NbdServer => false,
                };
                assert_eq!(message, chunked.then_some("injected failure"), "{preset:?} kind {kind}");
            }
            assert!(chunks(&p, rs).is_empty(), "{preset:?}: an error without offset is no read chunk");
            assert_eq!(p.completed(fine).unwrap().unwrap(), vec![0; 512]);
            assert!(p.server.disk[100_000..100_512].iter().all(|&b| b == 0), "the failed write wrote nothing");
            // Not fatal: the connection carries on.
            assert_eq!(p.state(), PublicState::Ready, "{preset:?}");
            assert_eq!(p.client.error(), None);
            assert_eq!(p.client.in_flight(), 0);
            let again = p.client.write(0, vec![2; 512], CmdFlags::empty()).unwrap();
            p.drive();
            p.completed(again).unwrap();
        }
    }
}

// ---- disconnect ----------------------------------------------------------------

#[test]
fn disconnect_with_commands_in_flight_then_closed() {
    for preset in PRESETS {
        let mut p = ready(preset);
        let reads: Vec<Cookie> =
            (0..8u64).map(|i| p.client.read(i * 4096, vec![0xff; 4096], CmdFlags::empty()).unwrap()).collect();
        let writes: Vec<Cookie> =
            (0..4u64).map(|i| p.client.write(65536 + i * 512, vec![7; 512], CmdFlags::empty()).unwrap()).collect();
        p.client.disconnect().unwrap();
        assert_eq!(p.client.in_flight(), 12);
        assert_eq!(p.state(), PublicState::Processing);
        // Refused from the moment DISC is queued.
        let e = p.client.flush(CmdFlags::empty()).unwrap_err();
        assert_eq!(e, Error::Local(LocalError::AfterDisconnect));
        assert_eq!(e.errno(), EINVAL);
        assert_eq!(p.client.disconnect().unwrap_err(), Error::Local(LocalError::AfterDisconnect));
        send_to_server(&mut p);
        assert_eq!(p.state(), PublicState::Ready, "{preset:?}: DISC sent, the replies still to come");
        // The replies alone, without the server's hang-up, close the connection.
        let replies = std::mem::take(&mut p.server.out);
        p.deliver(&replies);
        for c in reads {
            assert_eq!(p.completed(c).unwrap().unwrap(), vec![0; 4096], "{preset:?}");
        }
        for c in writes {
            p.completed(c).unwrap();
        }
        assert_eq!(p.state(), PublicState::Closed, "{preset:?}");
        assert_eq!(p.client.direction(), Direction::None);
        assert_eq!(p.client.error(), None);
        assert_eq!(p.server.requests.len(), 13);
        assert_eq!(p.server.requests.last().unwrap().kind, cmd::DISC);
        assert!(p.server.disk[65536..67584].iter().all(|&b| b == 7));
        // Closed: still refused.
        let e = p.client.read(0, vec![0; 1], CmdFlags::empty()).unwrap_err();
        assert!(matches!(e, Error::Local(LocalError::WrongState { state: "closed", .. })), "{e:?}");
        assert_eq!(e.errno(), EINVAL);
        assert_eq!(p.client.disconnect().unwrap_err().errno(), EINVAL);
    }
}

#[test]
fn disconnect_answered_by_a_close_fails_what_is_left() {
    let mut p = ready(Preset::Nbdkit);
    p.server.hold = true;
    let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.client.disconnect().unwrap();
    p.drive();
    assert_eq!(p.state(), PublicState::Ready, "DISC sent, the read still pending");
    // The server closes without answering the read.
    p.server.closed = true;
    p.drive();
    assert_eq!(p.state(), PublicState::Closed);
    let e = p.completed(r).unwrap_err();
    assert_eq!(e.errno(), ENOTCONN);
    assert!(matches!(e, Error::Transport(TransportError::Eof(_))));
    assert_eq!(p.client.in_flight(), 0);
}

#[test]
fn a_transport_failure_fails_commands_in_flight_with_enotconn() {
    let mut p = ready(Preset::Nbdkit);
    p.server.hold = true;
    let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    let w = p.client.write(0, vec![1; 512], CmdFlags::empty()).unwrap();
    p.drive();
    assert_eq!(p.client.in_flight(), 2);
    p.client.handle_transport_error(ECONNRESET, "recv");
    p.collect();
    assert_eq!(p.state(), PublicState::Dead);
    // The connection keeps the failure's errno; the commands it cut off
    // fail with ENOTCONN, as in libnbd.
    assert_eq!(p.client.error().map(Error::errno), Some(ECONNRESET));
    for c in [r, w] {
        let e = p.completed(c).map(|_| ()).unwrap_err();
        assert_eq!(e.errno(), ENOTCONN, "{e}");
        assert!(e.to_string().contains("recv"), "{e}");
    }
    assert_eq!(p.client.in_flight(), 0);
}

#[test]
fn a_sender_failure_fails_commands_in_flight_with_its_own_errno() {
    const EPIPE: i32 = 32;
    let mut p = ready(Preset::Nbdkit);
    p.server.hold = true;
    let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    let w = p.client.write(0, vec![1; 512], CmdFlags::empty()).unwrap();
    p.drive();
    p.client.handle_sender_error(EPIPE, "concurrent writer");
    p.collect();
    assert_eq!(p.state(), PublicState::Dead);
    // Unlike a transport failure, the sender's errno is each command's:
    // it is what lost their bytes.
    assert_eq!(p.client.error().map(Error::errno), Some(EPIPE));
    for c in [r, w] {
        let e = p.completed(c).map(|_| ()).unwrap_err();
        assert_eq!(e.errno(), EPIPE, "{e}");
        assert!(e.to_string().contains("concurrent writer"), "{e}");
    }
    assert_eq!(p.client.in_flight(), 0);
    assert!(p.client.read(0, vec![0; 512], CmdFlags::empty()).is_err(), "dead: nothing more is taken");
}

#[test]
fn disconnect_with_nothing_in_flight_closes_once_sent() {
    for preset in PRESETS {
        let mut p = ready(preset);
        p.client.disconnect().unwrap();
        assert_eq!(p.client.direction(), Direction::Both);
        p.drive();
        assert_eq!(p.state(), PublicState::Closed);
        assert!(p.transcript.is_empty(), "{preset:?}: nothing to report");
        let disc = p.server.requests.last().unwrap();
        assert_eq!((disc.kind, disc.offset, disc.length), (cmd::DISC, 0, 0));
    }
}

// ---- strict mode -------------------------------------------------------------------

type Submit = fn(&mut Connection<Vec<u8>>) -> Result<Cookie, Error>;

struct StrictCase {
    preset: Preset,
    b: Behaviour,
    meta: bool,
    size: usize,
    bit: StrictMode,
    submit: Submit,
    refused: LocalError,
    errno: i32,
    /// What the server makes of the request once it is let through.
    outcome: Result<(), i32>,
}

fn strict_cases() -> Vec<StrictCase> {
    use TransmissionFlags as TF;
    let case = |preset: Preset, bit, submit, refused, errno, outcome| StrictCase {
        preset,
        b: preset.behaviour(),
        meta: true,
        size: SIZE,
        bit,
        submit,
        refused,
        errno,
        outcome,
    };
    let read_only = Behaviour { flags: Behaviour::nbdkit().flags | TF::READ_ONLY, ..Behaviour::nbdkit() };
    let no_fua = Behaviour { flags: Behaviour::nbdkit().flags - TF::SEND_FUA, ..Behaviour::nbdkit() };
    let aligned = Behaviour { block_size: Some((512, 4096, 32 << 20)), ..Behaviour::nbdkit() };
    vec![
        case(
            Preset::Nbdkit,
            StrictMode::FLAGS,
            |c| c.read(0, vec![0; 512], CmdFlags::FUA),
            LocalError::InvalidFlags(CmdFlags::FUA.bits().into()),
            EINVAL,
            Ok(()),
        ),
        case(
            Preset::NbdServer,
            StrictMode::FLAGS,
            |c| c.flush(CmdFlags::NO_HOLE),
            LocalError::InvalidFlags(CmdFlags::NO_HOLE.bits().into()),
            EINVAL,
            Ok(()),
        ),
        StrictCase {
            b: read_only.clone(),
            ..case(
                Preset::Nbdkit,
                StrictMode::COMMANDS,
                |c| c.write(0, vec![1; 512], CmdFlags::empty()),
                LocalError::ReadOnly,
                EPERM,
                Ok(()),
            )
        },
        StrictCase {
            b: read_only,
            ..case(
                Preset::Nbdkit,
                StrictMode::COMMANDS,
                |c| c.write_zeroes(0, 512, CmdFlags::empty()),
                LocalError::ReadOnly,
                EPERM,
                Ok(()),
            )
        },
        case(
            Preset::NbdServer,
            StrictMode::COMMANDS,
            |c| c.write_zeroes(0, 512, CmdFlags::empty()),
            LocalError::Unsupported("zero operations"),
            EINVAL,
            Ok(()),
        ),
        case(
            Preset::NbdServer,
            StrictMode::COMMANDS,
            |c| c.cache(0, 512, CmdFlags::empty()),
            LocalError::Unsupported("cache operations"),
            EINVAL,
            Ok(()),
        ),
        StrictCase {
            b: no_fua.clone(),
            ..case(
                Preset::Nbdkit,
                StrictMode::COMMANDS,
                |c| c.write(0, vec![1; 512], CmdFlags::FUA),
                LocalError::Unsupported("the FUA flag"),
                EINVAL,
                Ok(()),
            )
        },
        // FLUSH takes no flags at all (libnbd's mask).
        case(
            Preset::Nbdkit,
            StrictMode::FLAGS,
            |c| c.flush(CmdFlags::FUA),
            LocalError::InvalidFlags(1),
            EINVAL,
            Ok(()),
        ),
        // No context negotiated: the server answers with nothing but NONE.
        StrictCase {
            meta: false,
            ..case(
                Preset::Nbdkit,
                StrictMode::COMMANDS,
                |c| c.block_status(0, 4096, CmdFlags::empty()),
                LocalError::NoMetaContexts,
                ENOTSUP,
                Ok(()),
            )
        },
        case(
            Preset::Qemu,
            StrictMode::BOUNDS,
            |c| c.read(SIZE as u64 - 256, vec![0; 512], CmdFlags::empty()),
            LocalError::OutOfBounds { stores_data: false },
            EINVAL,
            Err(EINVAL),
        ),
        case(
            Preset::NbdServer,
            StrictMode::BOUNDS,
            |c| c.trim(SIZE as u64, 1, CmdFlags::empty()),
            LocalError::OutOfBounds { stores_data: true },
            ENOSPC,
            Err(EINVAL),
        ),
        case(
            Preset::Nbdkit,
            StrictMode::ZERO_SIZE,
            |c| c.trim(0, 0, CmdFlags::empty()),
            LocalError::ZeroSize,
            EINVAL,
            Ok(()),
        ),
        case(
            Preset::NbdServer,
            StrictMode::ZERO_SIZE,
            |c| c.read(4096, vec![], CmdFlags::empty()),
            LocalError::ZeroSize,
            EINVAL,
            Ok(()),
        ),
        StrictCase {
            b: aligned,
            ..case(
                Preset::Nbdkit,
                StrictMode::ALIGN,
                |c| c.read(1, vec![0; 512], CmdFlags::empty()),
                LocalError::Unaligned,
                EINVAL,
                Ok(()),
            )
        },
        // A server that advertised no maximum gets 32 MiB payloads at most.
        StrictCase {
            size: (32 << 20) + 4096,
            ..case(
                Preset::NbdServer,
                StrictMode::PAYLOAD,
                |c| c.write(0, vec![0; (32 << 20) + 1], CmdFlags::empty()),
                LocalError::PayloadTooLarge { max: 32 << 20 },
                ERANGE,
                Ok(()),
            )
        },
    ]
}

#[test]
fn strict_mode_refuses_locally_and_each_bit_lets_the_request_through() {
    for case in strict_cases() {
        let what = format!("{:?} {:?} {:?}", case.preset, case.bit, case.refused);
        let mut config = case.preset.config();
        if !case.meta {
            config.clear_meta_contexts();
        }
        let mut p = ready_with(case.preset, case.b.clone(), config.clone(), case.size, Split::Whole);
        assert_eq!(p.client.config().strict, StrictMode::all(), "strict by default");
        let e = (case.submit)(&mut p.client).unwrap_err();
        assert_eq!(e, Error::Local(case.refused.clone()), "{what}");
        assert_eq!(e.errno(), case.errno, "{what}");
        p.drive();
        assert!(p.server.requests.is_empty(), "{what}: nothing sent");
        assert_eq!(p.client.in_flight(), 0);
        assert_eq!(p.state(), PublicState::Ready, "{what}: a local refusal changes nothing");
        assert_eq!(p.client.flush(CmdFlags::empty()).unwrap(), 1, "{what}: no cookie was used up");

        config.strict = StrictMode::all() - case.bit;
        let mut q = ready_with(case.preset, case.b, config, case.size, Split::Whole);
        let cookie = (case.submit)(&mut q.client).unwrap_or_else(|e| panic!("{what}: still refused: {e}"));
        q.drive();
        assert_eq!(q.server.requests.len(), 1, "{what}: the request reached the server");
        assert_eq!(q.server.requests[0].cookie, cookie);
        let result = q.completed(cookie).map(|_| ()).map_err(|e| {
            assert!(matches!(e, Error::Server(_)), "{what}: the server's answer, not a local one: {e:?}");
            e.errno()
        });
        assert_eq!(result, case.outcome, "{what}");
        assert_eq!(q.state(), PublicState::Ready, "{what}");
    }

    // READ and WRITE stop at 64 MiB whatever the strictness and whatever
    // the server advertised; strict mode holds WRITE to the advertised
    // maximum, but never below 1 MiB.
    for (advertised, payload_max) in [(32 << 20, 32 << 20), (128 << 10, 1 << 20), (1 << 30, 64 << 20)] {
        let b = Behaviour { block_size: Some((1, 4096, advertised)), ..Behaviour::nbd_server() };
        for strict in [StrictMode::all(), StrictMode::empty()] {
            let mut config = Preset::NbdServer.config();
            config.strict = strict;
            let mut p = ready_with(Preset::NbdServer, b.clone(), config, (64 << 20) + 4096, Split::Whole);
            assert_eq!(p.client.payload_maximum(), payload_max, "advertised {advertised}");
            let e = p.client.read(0, vec![0; (64 << 20) + 1], CmdFlags::empty()).unwrap_err();
            assert_eq!(e, Error::Local(LocalError::TooLarge { max: 64 << 20 }), "{strict:?}");
            let e = p.client.write(0, vec![0; payload_max as usize + 1], CmdFlags::empty());
            match strict.is_empty() {
                true if payload_max < 64 << 20 => assert!(e.is_ok(), "{strict:?}: {e:?}"),
                true => assert_eq!(e.unwrap_err(), Error::Local(LocalError::TooLarge { max: 64 << 20 })),
                false => assert_eq!(e.unwrap_err(), Error::Local(LocalError::PayloadTooLarge { max: payload_max })),
            }
        }
    }
}

/// No request range may wrap past 2^64, whatever the strictness: the
/// fuzzer found a READ at 2^64-1 that strict mode off let through, whose
/// reply chunks then passed a wrapping end check.
#[test]
fn ranges_past_two_to_the_64_are_refused_whatever_the_strictness() {
    for strict in [StrictMode::all(), StrictMode::empty()] {
        let mut config = Preset::Nbdkit.config();
        config.strict = strict;
        let mut p = ready_with(Preset::Nbdkit, Behaviour::nbdkit(), config, SIZE, Split::Whole);
        let refusals = [
            p.client.read(u64::MAX, vec![0; 4096], CmdFlags::empty()).unwrap_err(),
            p.client.write(u64::MAX - 10, vec![0; 11], CmdFlags::empty()).unwrap_err(),
            p.client.trim(1, u64::MAX, CmdFlags::empty()).unwrap_err(),
            p.client.cache(u64::MAX, 2, CmdFlags::empty()).unwrap_err(),
            p.client.write_zeroes(u64::MAX / 2 + 1, u64::MAX / 2 + 1, CmdFlags::empty()).unwrap_err(),
            p.client.block_status(u64::MAX, 2, CmdFlags::empty()).unwrap_err(),
        ];
        for e in refusals {
            if strict.is_empty() {
                assert_eq!(e, Error::Local(LocalError::RangeOverflow), "{strict:?}");
                assert_eq!(e.errno(), EINVAL);
            } else {
                assert!(matches!(e, Error::Local(LocalError::OutOfBounds { .. })), "{strict:?}: {e:?}");
            }
        }
        p.drive();
        assert!(p.server.requests.is_empty(), "{strict:?}: nothing was sent");
        if strict.is_empty() {
            // A range that ends at the last byte, 2^64-1, does not wrap.
            assert!(p.client.read(u64::MAX - 4095, vec![0; 4095], CmdFlags::empty()).is_ok());
        }
    }
}

#[test]
fn compact_headers_cap_lengths_whatever_the_strictness() {
    for strict in [StrictMode::all(), StrictMode::empty()] {
        let mut config = Preset::Nbdkit.config();
        config.strict = strict;
        let mut p = ready_with(Preset::Nbdkit, Behaviour::nbdkit(), config, SIZE, Split::Whole);
        let e = p.client.trim(0, 1 << 32, CmdFlags::empty()).unwrap_err();
        // libnbd checks the bounds first, then the header's limit.
        if strict.is_empty() {
            assert_eq!(e, Error::Local(LocalError::TooLarge { max: u64::from(u32::MAX) }));
            assert_eq!(e.errno(), ERANGE);
        } else {
            assert_eq!(e, Error::Local(LocalError::OutOfBounds { stores_data: true }));
            assert_eq!(e.errno(), ENOSPC);
        }
        p.drive();
        assert!(p.server.requests.is_empty());
    }

    // Extended headers carry 64-bit lengths: strict mode refuses one beyond
    // the disk as out of bounds, not as too large for the header...
    let mut p = ready(Preset::Qemu);
    let e = p.client.trim(0, 1 << 33, CmdFlags::empty()).unwrap_err();
    assert_eq!(e, Error::Local(LocalError::OutOfBounds { stores_data: true }));
    // ...and without it the server sees the whole length.
    let mut config = Preset::Qemu.config();
    config.strict = StrictMode::empty();
    let mut p = ready_with(Preset::Qemu, Behaviour::qemu(), config, SIZE, Split::Whole);
    let t = p.client.trim(0, (1 << 32) + 4096, CmdFlags::empty()).unwrap();
    p.drive();
    assert_eq!(p.server.requests[0].length, (1 << 32) + 4096);
    assert_eq!(p.completed(t).unwrap_err().errno(), EINVAL, "out of bounds, says the server");
}

// ---- wrong states -------------------------------------------------------------------

fn every_command(c: &mut Connection<Vec<u8>>) -> Vec<Result<Cookie, Error>> {
    vec![
        c.read(0, vec![0; 512], CmdFlags::empty()),
        c.read_structured(0, vec![0; 512], CmdFlags::empty()),
        c.write(0, vec![0; 512], CmdFlags::empty()),
        c.flush(CmdFlags::empty()),
        c.trim(0, 512, CmdFlags::empty()),
        c.cache(0, 512, CmdFlags::empty()),
        c.write_zeroes(0, 512, CmdFlags::empty()),
        c.block_status(0, 512, CmdFlags::empty()),
        c.disconnect().map(|()| 0),
    ]
}

fn assert_all_refused(c: &mut Connection<Vec<u8>>, state: &str, errno: i32) {
    for (i, r) in every_command(c).into_iter().enumerate() {
        let e = r.expect_err(state);
        assert_eq!(e.errno(), errno, "{state}: command {i}: {e}");
        assert!(matches!(&e, Error::Local(LocalError::WrongState { state: s, .. }) if *s == state), "{e:?}");
    }
}

#[test]
fn commands_in_the_wrong_state_are_refused() {
    let mut c: Connection<Vec<u8>> = Connection::new(Preset::Nbdkit.config());
    assert_all_refused(&mut c, "created", ENOTCONN);
    assert_eq!(c.direction(), Direction::None);
    c.start_connect().unwrap();
    assert_all_refused(&mut c, "connecting", EINVAL);
    c.handle_connected().unwrap();
    assert_all_refused(&mut c, "connecting", EINVAL);

    // None of that used a cookie, or sent anything.
    let mut p = Pair::new(Preset::Nbdkit.config(), Behaviour::nbdkit(), SIZE);
    assert_all_refused(&mut p.client, "connecting", EINVAL);
    p.drive();
    assert!(p.server.requests.is_empty());
    assert_eq!(p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap(), 1);

    let mut config = Preset::Nbdkit.config();
    config.opt_mode = true;
    let mut p = Pair::connect(config, Behaviour::nbdkit(), SIZE);
    assert_all_refused(&mut p.client, "negotiating", EINVAL);

    let mut config = Preset::Nbdkit.config();
    config.set_export_name("missing").unwrap();
    let mut p = Pair::connect(config, Behaviour::nbdkit(), SIZE);
    assert_all_refused(&mut p.client, "dead", EINVAL);
}

// ---- batching and zero-copy -----------------------------------------------------------

#[test]
fn many_small_replies_in_one_receive_are_all_parsed() {
    for preset in PRESETS {
        let mut p = ready(preset);
        p.server.disk[..64 * KIB].fill(0x5a);
        let mut reads = Vec::new();
        for i in 0..100u64 {
            p.client.flush(CmdFlags::empty()).unwrap();
            reads.push(p.client.read(i * 64, vec![0; 64], CmdFlags::empty()).unwrap());
        }
        send_to_server(&mut p);
        assert_eq!(p.server.requests.len(), 200);
        let burst = std::mem::take(&mut p.server.out);
        assert!(p.client.recv_buffer().len() >= burst.len(), "{preset:?}: {} bytes fit one receive", burst.len());
        receive_once(&mut p.client, &burst);
        let mut completed = 0;
        while let Some(e) = p.client.poll_event() {
            match e {
                Event::Complete { cookie, result: Ok(()), buf } => {
                    completed += 1;
                    if reads.contains(&cookie) {
                        assert_eq!(buf.unwrap(), vec![0x5a; 64], "{preset:?}");
                    }
                }
                other => panic!("{preset:?}: {other:?}"),
            }
        }
        assert_eq!(completed, 200, "{preset:?}: one receive, two hundred completions");
        assert_eq!(p.client.in_flight(), 0);
        assert_eq!(p.state(), PublicState::Ready);
    }
}

/// Reads the whole (patterned) disk into a fresh buffer and lets the
/// server answer, without delivering the answer: the cookie, where the
/// buffer lives, the data, and the server's byte stream.
fn read_whole_disk(p: &mut Pair, structured: bool) -> (Cookie, usize, Vec<u8>, Vec<u8>) {
    let data = pattern(SIZE, 0x21);
    p.server.disk.copy_from_slice(&data);
    let buf = vec![0u8; SIZE];
    let base = buf.as_ptr() as usize;
    let r = if structured {
        p.client.read_structured(0, buf, CmdFlags::empty())
    } else {
        p.client.read(0, buf, CmdFlags::empty())
    };
    send_to_server(p);
    (r.unwrap(), base, data, std::mem::take(&mut p.server.out))
}

#[test]
fn a_large_simple_read_is_received_straight_into_the_callers_buffer() {
    let mut p = ready(Preset::NbdServer);
    let (r, base, data, stream) = read_whole_disk(&mut p, false);
    assert_eq!(stream.len(), 16 + SIZE, "simple reply header, then the data");

    // The header and the first 1000 bytes arrive through internal space.
    let internal = p.client.recv_buffer().as_ptr() as usize;
    assert!(!(base..base + SIZE).contains(&internal));
    receive_once(&mut p.client, &stream[..16 + 1000]);
    // The rest goes straight into the caller's buffer, at the right place,
    // for the whole remaining payload.
    let dest = p.client.recv_buffer();
    assert_eq!(dest.as_ptr() as usize, base + 1000);
    assert_eq!(dest.len(), SIZE - 1000);
    receive_once(&mut p.client, &stream[16 + 1000..16 + 500_000]);
    let dest = p.client.recv_buffer();
    assert_eq!((dest.as_ptr() as usize, dest.len()), (base + 500_000, SIZE - 500_000));
    receive_once(&mut p.client, &stream[16 + 500_000..]);
    let Some(Event::Complete { cookie, result: Ok(()), buf: Some(buf) }) = p.client.poll_event() else {
        panic!("the read did not complete")
    };
    assert_eq!(cookie, r);
    assert_eq!(buf.as_ptr() as usize, base, "the same buffer came back");
    assert_eq!(buf, data);
    // Nothing in flight: back to internal space.
    let after = p.client.recv_buffer().as_ptr() as usize;
    assert!(!(base..base + SIZE).contains(&after));
}

#[test]
fn large_structured_data_chunks_are_received_straight_into_the_callers_buffer() {
    // qemu: sixteen 64 KiB DATA chunks (32-byte header, 8-byte offset, data),
    // then NONE. nbdkit: one DATA chunk (20-byte header) for the whole read.
    for (preset, chunk, header, tail) in [(Preset::Qemu, 64 * KIB, 40, 32), (Preset::Nbdkit, SIZE, 28, 0)] {
        let mut p = ready(preset);
        let (r, base, data, stream) = read_whole_disk(&mut p, true);
        let n = SIZE / chunk;
        assert_eq!(stream.len(), n * (header + chunk) + tail, "{preset:?}");
        for i in 0..n {
            let at = i * (header + chunk);
            let internal = p.client.recv_buffer().as_ptr() as usize;
            assert!(!(base..base + SIZE).contains(&internal), "{preset:?} chunk {i}: headers go to internal space");
            receive_once(&mut p.client, &stream[at..at + header]);
            let dest = p.client.recv_buffer();
            assert_eq!((dest.as_ptr() as usize, dest.len()), (base + i * chunk, chunk), "{preset:?} chunk {i}");
            receive_once(&mut p.client, &stream[at + header..at + header + chunk]);
        }
        if tail > 0 {
            receive_once(&mut p.client, &stream[n * (header + chunk)..]);
        }
        let mut reported = Vec::new();
        let mut done = None;
        while let Some(e) = p.client.poll_event() {
            match e {
                Event::ReadChunk { offset, length, status: ChunkStatus::Data, .. } => reported.push((offset, length)),
                Event::Complete { cookie, result: Ok(()), buf: Some(buf) } if cookie == r => done = Some(buf),
                other => panic!("{preset:?}: {other:?}"),
            }
        }
        let expected: Vec<(u64, u64)> = (0..n).map(|i| ((i * chunk) as u64, chunk as u64)).collect();
        assert_eq!(reported, expected, "{preset:?}");
        let buf = done.expect("the read completed");
        assert_eq!(buf.as_ptr() as usize, base, "{preset:?}");
        assert_eq!(buf, data);
    }
}

#[test]
fn small_payloads_are_batched_through_internal_space() {
    let mut p = ready(Preset::NbdServer);
    let buf = vec![0u8; 16 * KIB];
    let base = buf.as_ptr() as usize;
    p.client.read(0, buf, CmdFlags::empty()).unwrap();
    send_to_server(&mut p);
    let stream = std::mem::take(&mut p.server.out);
    receive_once(&mut p.client, &stream[..16]);
    let dest = p.client.recv_buffer();
    assert!(!(base..base + 16 * KIB).contains(&(dest.as_ptr() as usize)), "below 32 KiB: copied");
    assert!(dest.len() >= 16 * KIB);
    receive_once(&mut p.client, &stream[16..]);
    assert!(matches!(p.client.poll_event(), Some(Event::Complete { result: Ok(()), .. })));
}

#[test]
fn abandoning_unsent_requests_keeps_the_ones_already_leaving() {
    for preset in PRESETS {
        let mut p = ready(preset);
        let header = if preset == Preset::Qemu { 32 } else { 28 };
        let writes: Vec<Cookie> = (0..4u8)
            .map(|i| p.client.write(u64::from(i) * 4096, vec![i + 1; 4096], CmdFlags::empty()).unwrap())
            .collect();
        // The first request has left, the second has started: both stay.
        let first_two = {
            let mut slices: [&[u8]; 8] = [&[]; 8];
            let n = p.client.poll_transmit(&mut slices);
            slices[..n].concat()[..2 * header + 4096 + 10].to_vec()
        };
        p.client.handle_sent(first_two.len());
        p.server.receive(&first_two);

        assert_eq!(p.client.abandon_unsent(), 2, "{preset:?}");
        p.collect();
        for &cookie in &writes[2..] {
            let e = p.completed(cookie).unwrap_err();
            assert_eq!((e.errno(), e), (ENOTCONN, Error::Local(LocalError::Abandoned)), "{preset:?}");
        }
        assert_eq!(p.client.in_flight(), 2, "{preset:?}");
        // What is left to send is exactly the rest of the second write,
        // and the connection carries on.
        p.drive();
        for (i, &cookie) in writes[..2].iter().enumerate() {
            assert_eq!(p.completed(cookie).unwrap().unwrap(), vec![i as u8 + 1; 4096], "{preset:?}");
        }
        assert!(
            p.server.disk[2 * 4096..4 * 4096].iter().all(|&b| b == 0),
            "{preset:?}: abandoned writes reached the disk"
        );
        let read = p.client.read(0, vec![0; 8192], CmdFlags::empty()).unwrap();
        p.drive();
        assert_eq!(&p.completed(read).unwrap().unwrap()[4096..], &[2; 4096][..], "{preset:?}");
        assert_eq!(p.client.abandon_unsent(), 0, "{preset:?}: nothing left to abandon");

        // Once DISC is queued nothing is abandoned: it must stay last.
        let late = p.client.flush(CmdFlags::empty()).unwrap();
        p.client.disconnect().unwrap();
        assert_eq!(p.client.abandon_unsent(), 0, "{preset:?}");
        p.drive();
        assert_eq!(p.completed(late).map(|_| ()), Ok(()), "{preset:?}");
        assert_eq!(p.state(), PublicState::Closed, "{preset:?}");
    }
}

#[test]
fn requests_leave_in_one_vectored_send_with_payloads_from_the_callers_buffers() {
    for preset in PRESETS {
        let mut p = ready(preset);
        let header = if preset == Preset::Qemu { 32 } else { 28 };
        let mut writes = Vec::new();
        for i in 0..10u8 {
            let buf = vec![i + 1; 4096];
            let base = buf.as_ptr() as usize;
            writes.push((p.client.write(u64::from(i) * 4096, buf, CmdFlags::empty()).unwrap(), base));
        }
        let sent = {
            let mut slices: [&[u8]; 64] = [&[]; 64];
            let n = p.client.poll_transmit(&mut slices);
            // Header, payload, header, payload... each payload the caller's own buffer.
            assert_eq!(n, 20, "{preset:?}");
            for (i, pair) in slices[..n].chunks(2).enumerate() {
                assert_eq!(pair[0].len(), header, "{preset:?}: header {i}");
                assert_eq!((pair[1].as_ptr() as usize, pair[1].len()), (writes[i].1, 4096), "{preset:?}: payload {i}");
            }
            slices[..n].concat()
        };
        // A partial send resumes in the middle of a payload.
        p.client.handle_sent(header + 100);
        p.server.receive(&sent[..header + 100]);
        {
            let mut slices: [&[u8]; 64] = [&[]; 64];
            let n = p.client.poll_transmit(&mut slices);
            assert_eq!(n, 19, "{preset:?}");
            assert_eq!((slices[0].as_ptr() as usize, slices[0].len()), (writes[0].1 + 100, 4096 - 100), "{preset:?}");
        }
        p.drive();
        for (i, (cookie, base)) in writes.into_iter().enumerate() {
            let buf = p.completed(cookie).unwrap().unwrap();
            assert_eq!(buf.as_ptr() as usize, base, "{preset:?}: the same buffer came back");
            assert_eq!(&p.server.disk[i * 4096..][..4096], &buf[..], "{preset:?}: write {i}");
        }
    }
}
