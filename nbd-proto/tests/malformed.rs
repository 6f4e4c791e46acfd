//! The hostile-server suite.
//!
//! Every case plays a server that breaks the protocol and proves one
//! contract, [`assert_dead`]: the connection ends dead with the expected
//! typed error; every command in flight completes exactly once, failing
//! with that error's errno and handing its buffer back; a pending `opt_*`
//! command completes with the same error; nothing is left to send or wait
//! for; nothing more is accepted; and late bytes change nothing. Nothing
//! may panic. Transmission cases run under every way of cutting the byte
//! stream. Server errors that are not protocol violations are shown to
//! leave the connection usable.

mod support;

use nbd_proto::errno::{ECONNRESET, EINVAL, EIO, ENOSPC, ENOTCONN, ENOTSUP, EPERM, EPROTO};
use nbd_proto::wire::{self, chunk, cmd, info, nbd_error, opt, rep, OptionHeader, RequestHeader};
use nbd_proto::*;
use std::collections::HashMap;
use std::ops::Deref;
use support::craft::*;
use support::pair::{Pair, Split};
use support::server::{Behaviour, Server, Style};

/// Every transmission case runs under each of these.
const SPLITS: [Split; 6] = [
    Split::Whole,
    Split::Bytewise,
    Split::Random(1),
    Split::Random(7),
    Split::Random(0x5eed),
    Split::Random(0xdead_beef),
];

/// Handshake cases, which are more numerous, run under these.
const HS_SPLITS: [Split; 4] = [Split::Whole, Split::Bytewise, Split::Random(3), Split::Random(0xbeef)];

/// A split for the `i`-th of many runs, so long sweeps still see every kind.
fn rotating_split(i: usize) -> Split {
    match i % 3 {
        0 => Split::Whole,
        1 => Split::Bytewise,
        _ => Split::Random(i as u64),
    }
}

// ---- the contract -------------------------------------------------------------

/// How the connection must have died.
#[derive(Debug, Clone)]
enum Cause {
    /// Exactly this error.
    Exact(Error),
    /// The transport ended early: any `TransportError::Eof`.
    Eof,
}

impl From<ProtocolError> for Cause {
    fn from(e: ProtocolError) -> Self {
        Cause::Exact(Error::Protocol(e))
    }
}

impl Cause {
    /// The errno every failed command must carry, stated here rather than
    /// taken from `Error::errno`, so the mapping is checked too.
    fn errno(&self) -> i32 {
        match self {
            Cause::Exact(Error::Protocol(_)) => EPROTO,
            Cause::Exact(e) => e.errno(),
            Cause::Eof => ENOTCONN,
        }
    }

    fn matches(&self, e: &Error) -> bool {
        match self {
            Cause::Exact(want) => want == e,
            Cause::Eof => matches!(e, Error::Transport(TransportError::Eof(_))),
        }
    }
}

/// A command lent to the connection: its cookie, and the length of the
/// buffer lent with it, if any.
#[derive(Debug, Clone, Copy)]
struct Lent {
    cookie: Cookie,
    buf: Option<usize>,
}

fn drain_events(p: &mut Pair) {
    while let Some(e) = p.client.poll_event() {
        p.events.push(e);
    }
}

/// Claims the completion of `cookie`, which must have happened exactly once.
fn take_completion(p: &mut Pair, cookie: Cookie, case: &str) -> (Result<(), Error>, Option<Vec<u8>>) {
    drain_events(p);
    let at: Vec<usize> = p
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Complete { cookie: c, .. } if *c == cookie))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{case}: cookie {cookie} completed {} times", at.len());
    let Event::Complete { result, buf, .. } = p.events.remove(at[0]) else { unreachable!() };
    (result, buf)
}

fn stray_completions(p: &Pair) -> Vec<Cookie> {
    p.events
        .iter()
        .filter_map(|e| match e {
            Event::Complete { cookie, .. } => Some(*cookie),
            _ => None,
        })
        .collect()
}

/// The hostile-peer contract: the connection is dead of `cause`; each of
/// `lent` completed exactly once with that error (errno included) and got
/// its buffer back; no other command completed; a pending `opt_*` command
/// (`option_pending`) completed once with the same error; nothing is left
/// to send or wait for; every submission is refused; and late bytes, EOF
/// or transport errors change nothing.
fn assert_dead(p: &mut Pair, cause: impl Into<Cause>, lent: &[Lent], option_pending: bool, case: &str) {
    assert_ended(p, PublicState::Dead, cause.into(), lent, option_pending, case);
}

/// The server hung up between replies: like libnbd, the connection is
/// closed rather than dead, and otherwise ends as [`assert_dead`] says.
fn assert_closed_by_server(p: &mut Pair, lent: &[Lent], case: &str) {
    assert_ended(p, PublicState::Closed, Cause::Eof, lent, false, case);
}

fn assert_ended(p: &mut Pair, end: PublicState, cause: Cause, lent: &[Lent], option_pending: bool, case: &str) {
    drain_events(p);
    assert_eq!(p.state(), end, "{case}: not {} (error {:?})", end.name(), p.client.error());
    let err = p.client.error().cloned().unwrap_or_else(|| panic!("{case}: dead without an error"));
    assert!(cause.matches(&err), "{case}: died of {err:?}, expected {cause:?}");
    assert_eq!(err.errno(), cause.errno(), "{case}: errno of {err:?}");

    for l in lent {
        let (result, buf) = take_completion(p, l.cookie, case);
        let e = result.expect_err(&format!("{case}: cookie {} succeeded on a dead connection", l.cookie));
        assert_eq!(e, err, "{case}: cookie {} failed with another error", l.cookie);
        assert_eq!(e.errno(), cause.errno(), "{case}: cookie {}", l.cookie);
        assert_eq!(buf.map(|b| b.len()), l.buf, "{case}: cookie {}: buffer not handed back", l.cookie);
    }
    assert_eq!(stray_completions(p), Vec::<Cookie>::new(), "{case}: unexpected completions");
    let mut options = Vec::new();
    p.events.retain(|e| match e {
        Event::OptionComplete { result } => {
            options.push(result.clone());
            false
        }
        _ => true,
    });
    if option_pending {
        assert_eq!(options, [Err(err.clone())], "{case}: the pending option must fail once with the cause");
    } else {
        assert_eq!(options, [], "{case}: option completions without a pending option");
    }
    assert_eq!(p.client.in_flight(), 0, "{case}");
    assert_eq!(p.client.direction(), Direction::None, "{case}");
    let mut slices: [&[u8]; 4] = [&[]; 4];
    assert_eq!(p.client.poll_transmit(&mut slices), 0, "{case}: still has bytes to send");

    // Nothing more is accepted.
    let c = &mut p.client;
    let refused = [
        ("read", c.read(0, vec![0; 512], CmdFlags::empty()).map(|_| ())),
        ("read_structured", c.read_structured(0, vec![0; 512], CmdFlags::empty()).map(|_| ())),
        ("write", c.write(0, vec![0; 512], CmdFlags::empty()).map(|_| ())),
        ("flush", c.flush(CmdFlags::empty()).map(|_| ())),
        ("trim", c.trim(0, 512, CmdFlags::empty()).map(|_| ())),
        ("cache", c.cache(0, 512, CmdFlags::empty()).map(|_| ())),
        ("write_zeroes", c.write_zeroes(0, 512, CmdFlags::empty()).map(|_| ())),
        ("block_status", c.block_status(0, 512, CmdFlags::empty()).map(|_| ())),
        ("disconnect", c.disconnect()),
        ("opt_go", c.opt_go()),
        ("opt_info", c.opt_info()),
        ("opt_list", c.opt_list()),
        ("opt_list_meta_context", c.opt_list_meta_context()),
        ("opt_abort", c.opt_abort()),
        ("handle_tls_established", c.handle_tls_established()),
        ("start_connect", c.start_connect()),
        ("handle_connected", c.handle_connected()),
        ("config_mut", c.config_mut().map(|_| ())),
    ];
    for (what, r) in refused {
        match r {
            Err(Error::Local(LocalError::WrongState { state, .. })) if state == end.name() => {}
            other => panic!("{case}: {what} on a {} connection gave {other:?}", end.name()),
        }
    }

    // Late input changes nothing.
    let room = c.recv_buffer();
    let n = room.len().min(32);
    room[..n].fill(0xa5);
    c.handle_received(n);
    c.receive(&simple(1, 0));
    c.handle_eof();
    c.handle_transport_error(ECONNRESET, "late");
    c.handle_sent(0);
    assert_eq!(c.state(), end, "{case}");
    assert_eq!(c.error(), Some(&err), "{case}: the cause changed");
    assert!(c.poll_event().is_none(), "{case}: events after death");
    assert_eq!(c.direction(), Direction::None, "{case}");
}

// ---- transmission set-up ---------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preset {
    /// Structured replies, compact headers, one meta context.
    Nbdkit,
    /// Extended headers, two meta contexts.
    Qemu,
    /// Simple replies only.
    NbdServer,
}

const SR: &[Preset] = &[Preset::Nbdkit, Preset::Qemu];
const ALL: &[Preset] = &[Preset::Nbdkit, Preset::Qemu, Preset::NbdServer];
const NBDKIT: &[Preset] = &[Preset::Nbdkit];
const QEMU: &[Preset] = &[Preset::Qemu];
const NBD_SERVER: &[Preset] = &[Preset::NbdServer];

const DISK: usize = 128 * 1024;

fn setup(preset: Preset) -> (Config, Behaviour) {
    let mut cfg = Config::default();
    match preset {
        Preset::Nbdkit | Preset::Qemu => {
            cfg.add_meta_context("base:allocation").unwrap();
            cfg.add_meta_context("qemu:allocation-depth").unwrap();
        }
        Preset::NbdServer => cfg.set_export_name("exp").unwrap(),
    }
    let b = match preset {
        Preset::Nbdkit => Behaviour::nbdkit(),
        Preset::Qemu => Behaviour::qemu(),
        Preset::NbdServer => Behaviour::nbd_server(),
    };
    (cfg, b)
}

/// Ready, with the scripted server holding its answers back so the test
/// can inject its own.
fn ready(preset: Preset, split: Split) -> Pair {
    let (cfg, b) = setup(preset);
    let mut p = Pair::with_split(cfg, b, DISK, split);
    p.drive();
    assert_eq!(p.state(), PublicState::Ready, "{preset:?}: {:?}", p.client.error());
    assert_eq!(p.client.structured_replies_negotiated(), preset != Preset::NbdServer);
    assert_eq!(p.client.extended_headers_negotiated(), preset == Preset::Qemu);
    drain_events(&mut p);
    p.events.clear();
    p.server.hold = true;
    p
}

/// How replies are encoded on a connection.
#[derive(Debug, Clone, Copy)]
struct Form {
    sr: bool,
    ext: bool,
    /// The first negotiated meta context id.
    ctx: u32,
}

impl Form {
    fn of(p: &Pair) -> Form {
        let ctx = p.client.meta_contexts().and_then(|m| m.first()).map_or(0, |m| m.id);
        Form { sr: p.client.structured_replies_negotiated(), ext: p.client.extended_headers_negotiated(), ctx }
    }

    fn chunk(&self, cookie: Cookie, kind: u16, done: bool, payload: &[u8]) -> Vec<u8> {
        chunk(cookie, kind, done, self.ext, payload)
    }

    /// A chunk header claiming `length` bytes, with none of them.
    fn header(&self, cookie: Cookie, kind: u16, length: u64) -> Vec<u8> {
        chunk_header(cookie, kind, 0, self.ext, length)
    }

    fn data(&self, cookie: Cookie, done: bool, offset: u64, len: usize) -> Vec<u8> {
        self.chunk(cookie, chunk::OFFSET_DATA, done, &data(offset, &vec![0xd7; len]))
    }

    fn hole(&self, cookie: Cookie, done: bool, offset: u64, len: u32) -> Vec<u8> {
        self.chunk(cookie, chunk::OFFSET_HOLE, done, &hole(offset, len))
    }

    fn none(&self, cookie: Cookie) -> Vec<u8> {
        self.chunk(cookie, chunk::NONE, true, &[])
    }

    /// A successful reply without payload, in the negotiated form.
    fn ok(&self, cookie: Cookie) -> Vec<u8> {
        if self.sr {
            self.none(cookie)
        } else {
            simple(cookie, 0)
        }
    }

    fn status_kind(&self) -> u16 {
        if self.ext {
            chunk::BLOCK_STATUS_EXT
        } else {
            chunk::BLOCK_STATUS
        }
    }

    /// A block status chunk of the kind the negotiated headers call for.
    fn status(&self, cookie: Cookie, done: bool, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
        if self.ext {
            let wide: Vec<(u64, u64)> = extents.iter().map(|&(l, f)| (u64::from(l), u64::from(f))).collect();
            self.chunk(cookie, chunk::BLOCK_STATUS_EXT, done, &status_ext(id, wide.len() as u32, &wide))
        } else {
            self.chunk(cookie, chunk::BLOCK_STATUS, done, &status(id, extents))
        }
    }

    /// A chunk length nothing could hold: 2^40 with extended headers, the
    /// largest 32-bit length without.
    fn huge(&self) -> u64 {
        if self.ext {
            1 << 40
        } else {
            u64::from(u32::MAX)
        }
    }
}

/// The commands every transmission case has in flight.
struct Flight {
    /// READ of 4096 bytes at 0.
    r: Cookie,
    /// READ of 4096 bytes at 8192 with DF (structured replies only).
    df: Cookie,
    /// BLOCK_STATUS of 65536 bytes at 0 (structured replies only).
    bs: Cookie,
    /// The same with REQ_ONE (structured replies only).
    one: Cookie,
    /// FLUSH.
    fl: Cookie,
    /// WRITE of 512 bytes at 0.
    wr: Cookie,
    lent: Vec<Lent>,
    form: Form,
}

impl Deref for Flight {
    type Target = Form;
    fn deref(&self) -> &Form {
        &self.form
    }
}

impl Flight {
    fn without(&self, cookie: Cookie) -> Vec<Lent> {
        self.lent.iter().copied().filter(|l| l.cookie != cookie).collect()
    }
}

/// Submits the flight and, if `send`, transmits it to the (holding) server.
fn submit(p: &mut Pair, send: bool) -> Flight {
    let form = Form::of(p);
    let mut lent = Vec::new();
    let mut add = |r: Result<Cookie, Error>, buf: Option<usize>| {
        let cookie = r.expect("command accepted");
        lent.push(Lent { cookie, buf });
        cookie
    };
    let c = &mut p.client;
    let r = add(c.read(0, vec![0xee; 4096], CmdFlags::empty()), Some(4096));
    let (df, bs, one) = if form.sr {
        (
            add(c.read(8192, vec![0xee; 4096], CmdFlags::DF), Some(4096)),
            add(c.block_status(0, 65536, CmdFlags::empty()), None),
            add(c.block_status(0, 65536, CmdFlags::REQ_ONE), None),
        )
    } else {
        (0, 0, 0)
    };
    let fl = add(c.flush(CmdFlags::empty()), None);
    let wr = add(c.write(0, vec![0x5a; 512], CmdFlags::empty()), Some(512));
    if send {
        p.drive();
        assert_eq!(p.server.requests.len(), lent.len(), "every request reached the server");
        assert_eq!(p.state(), PublicState::Ready);
    }
    assert!(p.events.is_empty());
    Flight { r, df, bs, one, fl, wr, lent, form }
}

type Bytes = fn(&Flight) -> Vec<u8>;
type Expect = fn(&Flight) -> ProtocolError;

/// One malformed reply stream, the presets it applies to, and the error it
/// must kill the connection with.
struct Case {
    name: &'static str,
    presets: &'static [Preset],
    bytes: Bytes,
    expected: Expect,
}

fn case(name: &'static str, presets: &'static [Preset], bytes: Bytes, expected: Expect) -> Case {
    Case { name, presets, bytes, expected }
}

/// Runs each case on each of its presets under every split.
fn run_cases(cases: &[Case]) {
    let mut names = std::collections::HashSet::new();
    for c in cases {
        assert!(names.insert(c.name), "case names are unique: {}", c.name);
        for &preset in c.presets {
            for split in SPLITS {
                let name = format!("{} [{preset:?}, {split:?}]", c.name);
                let mut p = ready(preset, split);
                let f = submit(&mut p, true);
                p.inject(&(c.bytes)(&f));
                assert_dead(&mut p, (c.expected)(&f), &f.lent, false, &name);
            }
        }
    }
}

// ---- transmission: framing ---------------------------------------------------------

#[test]
fn framing_violations() {
    run_cases(&[
        case(
            "bad reply magic",
            ALL,
            |_| [vec![0xde, 0xad, 0xbe, 0xef], vec![0; 28]].concat(),
            |_| ProtocolError::BadReplyMagic(0xdead_beef),
        ),
        case(
            "request magic as a reply",
            ALL,
            |f| {
                let mut v = Vec::new();
                RequestHeader { flags: 0, kind: cmd::READ, cookie: f.r, offset: 0, length: 0 }.encode(false, &mut v);
                v
            },
            |_| ProtocolError::BadReplyMagic(wire::REQUEST_MAGIC),
        ),
        case(
            "option reply in transmission",
            ALL,
            |f| option_reply(opt::GO, rep::ACK, &f.r.to_be_bytes()),
            |_| ProtocolError::BadReplyMagic((wire::OPTION_REPLY_MAGIC >> 32) as u32),
        ),
        case("unknown cookie", ALL, |f| f.ok(999), |_| ProtocolError::UnknownCookie(999)),
        case("cookie 0", ALL, |f| f.ok(0), |_| ProtocolError::UnknownCookie(0)),
        case(
            "structured reply not negotiated",
            NBD_SERVER,
            |f| chunk(f.fl, chunk::NONE, true, false, &[]),
            |_| ProtocolError::ReplyNotNegotiated("a structured"),
        ),
        case(
            "structured read reply not negotiated",
            NBD_SERVER,
            |f| chunk(f.r, chunk::OFFSET_DATA, true, false, &data(0, &[1; 4096])),
            |_| ProtocolError::ReplyNotNegotiated("a structured"),
        ),
        case(
            "extended reply not negotiated",
            &[Preset::Nbdkit, Preset::NbdServer],
            |f| chunk(f.fl, chunk::NONE, true, true, &[]),
            |_| ProtocolError::ReplyNotNegotiated("an extended"),
        ),
        case(
            "compact structured reply under extended headers",
            QEMU,
            |f| chunk(f.fl, chunk::NONE, true, false, &[]),
            |_| ProtocolError::ReplyNotNegotiated("a compact structured"),
        ),
        case(
            "simple reply under extended headers",
            QEMU,
            |f| simple(f.fl, 0),
            |_| ProtocolError::ReplyNotNegotiated("a simple"),
        ),
        case(
            "simple error reply under extended headers",
            QEMU,
            |f| simple(f.fl, nbd_error::EIO),
            |_| ProtocolError::ReplyNotNegotiated("a simple"),
        ),
        case(
            "simple reply with data to a read under structured replies",
            NBDKIT,
            |f| [simple(f.r, 0), vec![7; 4096]].concat(),
            |_| ProtocolError::SimpleReadUnderStructured,
        ),
        case(
            "simple reply after structured chunks",
            NBDKIT,
            |f| [f.data(f.r, false, 0, 2048), simple(f.r, 0)].concat(),
            |_| ProtocolError::ReplyNotNegotiated("a simple reply after structured chunks: a"),
        ),
        case("NONE without DONE", SR, |f| f.chunk(f.fl, chunk::NONE, false, &[]), |_| ProtocolError::NoneWithoutDone),
        case(
            "NONE with a payload",
            SR,
            |f| f.chunk(f.fl, chunk::NONE, true, &[0; 4]),
            |_| ProtocolError::BadChunkLength { kind: chunk::NONE, length: 4 },
        ),
        case("unknown chunk type 3", SR, |f| f.chunk(f.fl, 3, true, &[]), |_| ProtocolError::UnknownChunkType(3)),
        case(
            "unknown chunk type 4 with a payload",
            SR,
            |f| f.chunk(f.r, 4, false, &[0; 16]),
            |_| ProtocolError::UnknownChunkType(4),
        ),
        case(
            "unknown chunk type 0x7fff",
            SR,
            |f| f.chunk(f.bs, 0x7fff, true, &[]),
            |_| ProtocolError::UnknownChunkType(0x7fff),
        ),
        case(
            "DATA chunk to a FLUSH",
            SR,
            |f| f.data(f.fl, true, 0, 16),
            |_| ProtocolError::ChunkNotForCommand { kind: chunk::OFFSET_DATA, command: cmd::FLUSH },
        ),
        case(
            "DATA chunk to a WRITE",
            SR,
            |f| f.data(f.wr, true, 0, 512),
            |_| ProtocolError::ChunkNotForCommand { kind: chunk::OFFSET_DATA, command: cmd::WRITE },
        ),
        case(
            "DATA chunk to a BLOCK_STATUS",
            SR,
            |f| f.data(f.bs, true, 0, 16),
            |_| ProtocolError::ChunkNotForCommand { kind: chunk::OFFSET_DATA, command: cmd::BLOCK_STATUS },
        ),
        case(
            "HOLE chunk to a FLUSH",
            SR,
            |f| f.hole(f.fl, true, 0, 16),
            |_| ProtocolError::ChunkNotForCommand { kind: chunk::OFFSET_HOLE, command: cmd::FLUSH },
        ),
        case(
            "BLOCK_STATUS chunk to a READ",
            SR,
            |f| f.status(f.r, true, f.ctx, &[(4096, 0)]),
            |f| ProtocolError::ChunkNotForCommand { kind: f.status_kind(), command: cmd::READ },
        ),
    ]);
}

#[test]
fn duplicate_reply_for_a_completed_cookie() {
    for &preset in ALL {
        for split in SPLITS {
            let case = format!("duplicate reply [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let f = submit(&mut p, true);
            p.inject(&f.ok(f.fl));
            assert_eq!(take_completion(&mut p, f.fl, &case), (Ok(()), None), "{case}");
            assert_eq!(p.state(), PublicState::Ready, "{case}");
            p.inject(&f.ok(f.fl));
            assert_dead(&mut p, ProtocolError::UnknownCookie(f.fl), &f.without(f.fl), false, &case);

            // A read reply, complete, then more of it.
            let case = format!("read data after its reply ended [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let f = submit(&mut p, true);
            let first = if f.sr { f.data(f.r, true, 0, 4096) } else { [simple(f.r, 0), vec![0xd7; 4096]].concat() };
            p.inject(&first);
            let (result, buf) = take_completion(&mut p, f.r, &case);
            assert_eq!(result, Ok(()), "{case}");
            assert_eq!(buf, Some(vec![0xd7; 4096]), "{case}");
            let again = if f.sr { f.data(f.r, true, 0, 4096) } else { simple(f.r, 0) };
            p.inject(&again);
            assert_dead(&mut p, ProtocolError::UnknownCookie(f.r), &f.without(f.r), false, &case);
        }
    }
}

/// Sends at most `max` bytes of what the client has queued, to the server.
fn send_partial(p: &mut Pair, max: usize) -> usize {
    let mut sent = 0;
    while sent < max {
        let mut slices: [&[u8]; 8] = [&[]; 8];
        let n = p.client.poll_transmit(&mut slices);
        let mut bytes: Vec<u8> = slices[..n].concat();
        if bytes.is_empty() {
            break;
        }
        bytes.truncate(max - sent);
        p.client.handle_sent(bytes.len());
        p.server.receive(&bytes);
        sent += bytes.len();
    }
    sent
}

#[test]
fn reply_to_a_request_not_yet_fully_sent() {
    for &preset in ALL {
        for split in SPLITS {
            // Nothing sent at all: the reply is for a request still queued.
            let case = format!("reply to a queued request [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let f = submit(&mut p, false);
            assert_eq!(p.state(), PublicState::Processing);
            p.inject(&f.ok(f.fl));
            assert_dead(&mut p, ProtocolError::ReplyBeforeRequest(f.fl), &f.lent, false, &case);
            assert!(p.server.requests.is_empty(), "{case}");

            // The WRITE header left, half its payload did not.
            let case = format!("reply to a write whose payload is half sent [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let wr = p.client.write(0, vec![1; 512], CmdFlags::empty()).unwrap();
            let form = Form::of(&p);
            let header = RequestHeader::size(form.ext);
            assert_eq!(send_partial(&mut p, header + 256), header + 256);
            p.inject(&form.ok(wr));
            assert_dead(
                &mut p,
                ProtocolError::ReplyBeforeRequest(wr),
                &[Lent { cookie: wr, buf: Some(512) }],
                false,
                &case,
            );

            // A whole WRITE left, then 10 bytes of a FLUSH header: the reply
            // to the flush is early, and the write fails with it.
            let case = format!("reply to a half-sent flush [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let wr = p.client.write(0, vec![1; 512], CmdFlags::empty()).unwrap();
            let fl = p.client.flush(CmdFlags::empty()).unwrap();
            assert_eq!(send_partial(&mut p, header + 512 + 10), header + 512 + 10);
            assert_eq!(p.server.requests.len(), 1, "{case}: the write arrived");
            p.inject(&form.ok(fl));
            let lent = [Lent { cookie: wr, buf: Some(512) }, Lent { cookie: fl, buf: None }];
            assert_dead(&mut p, ProtocolError::ReplyBeforeRequest(fl), &lent, false, &case);
        }
    }
}

// ---- transmission: read chunks -----------------------------------------------------

#[test]
fn read_chunk_violations() {
    run_cases(&[
        case(
            "DATA chunk of length 8 (no data)",
            SR,
            |f| f.data(f.r, true, 0, 0),
            |_| ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: 8 },
        ),
        case(
            "DATA chunk of length 4",
            SR,
            |f| f.chunk(f.r, chunk::OFFSET_DATA, true, &[0; 4]),
            |_| ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: 4 },
        ),
        case(
            "DATA chunk of length 0",
            SR,
            |f| f.chunk(f.r, chunk::OFFSET_DATA, true, &[]),
            |_| ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: 0 },
        ),
        case(
            "DATA chunk longer than the request",
            SR,
            |f| f.data(f.r, true, 0, 4097),
            |_| ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: 4105 },
        ),
        case(
            "DATA chunk before the request",
            SR,
            |f| f.data(f.df, true, 4096, 4096),
            |_| ProtocolError::ChunkOutOfRange { offset: 4096, length: 4096 },
        ),
        case(
            "DATA chunk one byte before the request",
            SR,
            |f| f.data(f.df, true, 8191, 16),
            |_| ProtocolError::ChunkOutOfRange { offset: 8191, length: 16 },
        ),
        case(
            "DATA chunk past the end of the request",
            SR,
            |f| f.data(f.r, true, 4000, 200),
            |_| ProtocolError::ChunkOutOfRange { offset: 4000, length: 200 },
        ),
        case(
            "DATA chunk starting at the end of the request",
            SR,
            |f| f.data(f.r, true, 4096, 1),
            |_| ProtocolError::ChunkOutOfRange { offset: 4096, length: 1 },
        ),
        case(
            "DATA chunk whose offset wraps around",
            SR,
            |f| f.data(f.r, true, u64::MAX - 2, 16),
            |_| ProtocolError::ChunkOutOfRange { offset: u64::MAX - 2, length: 16 },
        ),
        case(
            "HOLE chunk before the request",
            SR,
            |f| f.hole(f.df, true, 0, 4096),
            |_| ProtocolError::ChunkOutOfRange { offset: 0, length: 4096 },
        ),
        case(
            "HOLE chunk past the end of the request",
            SR,
            |f| f.hole(f.r, true, 4000, 200),
            |_| ProtocolError::ChunkOutOfRange { offset: 4000, length: 200 },
        ),
        case(
            "HOLE chunk longer than the request",
            SR,
            |f| f.hole(f.r, true, 0, u32::MAX),
            |_| ProtocolError::ChunkOutOfRange { offset: 0, length: u64::from(u32::MAX) },
        ),
        case(
            "HOLE chunk whose offset wraps around",
            SR,
            |f| f.hole(f.r, true, u64::MAX, 4096),
            |_| ProtocolError::ChunkOutOfRange { offset: u64::MAX, length: 4096 },
        ),
        case(
            "overlapping DATA chunks",
            SR,
            |f| [f.data(f.r, false, 0, 2048), f.data(f.r, true, 2000, 2096)].concat(),
            |_| ProtocolError::ChunkOverlap { offset: 2000, length: 2096 },
        ),
        case(
            "the same DATA chunk twice",
            SR,
            |f| [f.data(f.r, false, 0, 1024), f.data(f.r, true, 0, 1024)].concat(),
            |_| ProtocolError::ChunkOverlap { offset: 0, length: 1024 },
        ),
        case(
            "DATA inside an earlier DATA chunk",
            SR,
            |f| [f.data(f.r, false, 0, 4096), f.data(f.r, true, 1000, 100)].concat(),
            |_| ProtocolError::ChunkOverlap { offset: 1000, length: 100 },
        ),
        case(
            "HOLE overlapping DATA",
            SR,
            |f| [f.data(f.r, false, 0, 2048), f.hole(f.r, true, 1024, 3072)].concat(),
            |_| ProtocolError::ChunkOverlap { offset: 1024, length: 3072 },
        ),
        case(
            "DATA overlapping HOLE",
            SR,
            |f| [f.hole(f.r, false, 2048, 2048), f.data(f.r, true, 0, 2049)].concat(),
            |_| ProtocolError::ChunkOverlap { offset: 0, length: 2049 },
        ),
        case(
            "DONE before the read was covered",
            SR,
            |f| f.data(f.r, true, 0, 2048),
            |_| ProtocolError::IncompleteRead { covered: 2048, expected: 4096 },
        ),
        case(
            "NONE before the read was covered",
            SR,
            |f| [f.data(f.r, false, 2048, 2048), f.none(f.r)].concat(),
            |_| ProtocolError::IncompleteRead { covered: 2048, expected: 4096 },
        ),
        case(
            "NONE as the whole reply to a read",
            SR,
            |f| f.none(f.r),
            |_| ProtocolError::IncompleteRead { covered: 0, expected: 4096 },
        ),
        case(
            "a gap between chunks",
            SR,
            |f| [f.data(f.r, false, 0, 1024), f.hole(f.r, true, 2048, 2048)].concat(),
            |_| ProtocolError::IncompleteRead { covered: 3072, expected: 4096 },
        ),
        case(
            "HOLE chunk with length field 16",
            SR,
            |f| f.chunk(f.r, chunk::OFFSET_HOLE, true, &[hole(0, 4096), vec![0; 4]].concat()),
            |_| ProtocolError::BadChunkLength { kind: chunk::OFFSET_HOLE, length: 16 },
        ),
        case(
            "HOLE chunk with length field 8",
            SR,
            |f| f.chunk(f.r, chunk::OFFSET_HOLE, true, &hole(0, 4096)[..8]),
            |_| ProtocolError::BadChunkLength { kind: chunk::OFFSET_HOLE, length: 8 },
        ),
        case(
            "HOLE of size zero",
            SR,
            |f| f.hole(f.r, true, 0, 0),
            |_| ProtocolError::BadChunkLength { kind: chunk::OFFSET_HOLE, length: 12 },
        ),
        case(
            "DF read answered with two DATA chunks",
            SR,
            |f| [f.data(f.df, false, 8192, 2048), f.data(f.df, true, 10240, 2048)].concat(),
            |_| ProtocolError::FragmentedDf,
        ),
        case(
            "DF read answered with DATA and HOLE",
            SR,
            |f| [f.data(f.df, false, 8192, 2048), f.hole(f.df, true, 10240, 2048)].concat(),
            |_| ProtocolError::FragmentedDf,
        ),
    ]);
}

// ---- transmission: error chunks ----------------------------------------------------

#[test]
fn error_chunk_violations() {
    run_cases(&[
        case(
            "ERROR chunk with error 0",
            SR,
            |f| f.chunk(f.fl, chunk::ERROR, true, &error(0, b"fine?")),
            |_| ProtocolError::ZeroErrorInErrorChunk,
        ),
        case(
            "ERROR_OFFSET chunk with error 0",
            SR,
            |f| f.chunk(f.r, chunk::ERROR_OFFSET, true, &error_offset(0, b"", 0)),
            |_| ProtocolError::ZeroErrorInErrorChunk,
        ),
        case(
            "unknown error chunk type with error 0",
            SR,
            |f| f.chunk(f.fl, chunk::ERROR_BIT | 77, true, &error(0, b"")),
            |_| ProtocolError::ZeroErrorInErrorChunk,
        ),
        case(
            "error message longer than the chunk",
            SR,
            |f| f.chunk(f.fl, chunk::ERROR, true, &error_declared(nbd_error::EIO, b"abc", 40)),
            |_| ProtocolError::ErrorMessageTooLong(40),
        ),
        case(
            "error message one byte longer than the chunk",
            SR,
            |f| f.chunk(f.r, chunk::ERROR, true, &error_declared(nbd_error::EIO, b"abc", 4)),
            |_| ProtocolError::ErrorMessageTooLong(4),
        ),
        case(
            "ERROR chunk shorter than its fixed fields",
            SR,
            |f| f.chunk(f.fl, chunk::ERROR, true, &error(nbd_error::EIO, b"")[..5]),
            |_| ProtocolError::BadChunkLength { kind: chunk::ERROR, length: 5 },
        ),
        case(
            "ERROR chunk with bytes after the message",
            SR,
            |f| f.chunk(f.fl, chunk::ERROR, true, &[error(nbd_error::EIO, b"ab"), vec![0; 2]].concat()),
            |_| ProtocolError::BadChunkLength { kind: chunk::ERROR, length: 10 },
        ),
        case(
            "ERROR message longer than 4096 bytes",
            SR,
            |f| f.chunk(f.fl, chunk::ERROR, true, &error(nbd_error::EIO, &[b'x'; 5000])),
            |_| ProtocolError::BadChunkLength { kind: chunk::ERROR, length: 5006 },
        ),
        case(
            "ERROR_OFFSET chunk with bytes after its offset",
            SR,
            |f| f.chunk(f.r, chunk::ERROR_OFFSET, true, &[error_offset(nbd_error::EIO, b"m", 10), vec![9; 4]].concat()),
            |_| ProtocolError::BadChunkLength { kind: chunk::ERROR_OFFSET, length: 19 },
        ),
        case(
            "ERROR_OFFSET chunk with one byte after its offset",
            SR,
            |f| f.chunk(f.r, chunk::ERROR_OFFSET, false, &[error_offset(nbd_error::EIO, b"", 0), vec![0]].concat()),
            |_| ProtocolError::BadChunkLength { kind: chunk::ERROR_OFFSET, length: 15 },
        ),
        case(
            "ERROR_OFFSET chunk without room for its offset",
            SR,
            |f| f.chunk(f.r, chunk::ERROR_OFFSET, true, &[error(nbd_error::EIO, b"abcd"), vec![0; 4]].concat()),
            |_| ProtocolError::BadChunkLength { kind: chunk::ERROR_OFFSET, length: 14 },
        ),
        case(
            "ERROR_OFFSET far outside the request",
            SR,
            |f| f.chunk(f.r, chunk::ERROR_OFFSET, true, &error_offset(nbd_error::EIO, b"", 1 << 19)),
            |_| ProtocolError::ChunkOutOfRange { offset: 1 << 19, length: 0 },
        ),
        case(
            "ERROR_OFFSET at the end of the request",
            SR,
            |f| f.chunk(f.r, chunk::ERROR_OFFSET, true, &error_offset(nbd_error::EIO, b"", 4096)),
            |_| ProtocolError::ChunkOutOfRange { offset: 4096, length: 0 },
        ),
        case(
            "ERROR_OFFSET before the request",
            SR,
            |f| f.chunk(f.df, chunk::ERROR_OFFSET, false, &error_offset(nbd_error::EIO, b"bad", 8191)),
            |_| ProtocolError::ChunkOutOfRange { offset: 8191, length: 0 },
        ),
    ]);
}

// ---- transmission: block status ------------------------------------------------------

#[test]
fn block_status_violations() {
    run_cases(&[
        case(
            "BLOCK_STATUS for an unknown context",
            SR,
            |f| f.status(f.bs, true, 42, &[(4096, 0)]),
            |_| ProtocolError::UnknownContext(42),
        ),
        case(
            "BLOCK_STATUS for context 0",
            SR,
            |f| f.status(f.bs, true, 0, &[(4096, 0)]),
            |_| ProtocolError::UnknownContext(0),
        ),
        case(
            "BLOCK_STATUS for the same context twice",
            SR,
            |f| [f.status(f.bs, false, f.ctx, &[(4096, 0)]), f.status(f.bs, true, f.ctx, &[(4096, 0)])].concat(),
            |f| ProtocolError::DuplicateContext(f.ctx),
        ),
        case(
            "zero-length extent after another",
            SR,
            |f| f.status(f.bs, true, f.ctx, &[(4096, 0), (0, 0)]),
            |_| ProtocolError::ZeroLengthExtent,
        ),
        case(
            "zero-length first extent",
            SR,
            |f| f.status(f.bs, true, f.ctx, &[(0, 3)]),
            |_| ProtocolError::ZeroLengthExtent,
        ),
        case(
            "an extent after one reaching the end",
            SR,
            |f| f.status(f.bs, true, f.ctx, &[(65536, 0), (4096, 0)]),
            |_| ProtocolError::ExtentsBeyondRequest,
        ),
        case(
            "an extent after several reaching the end",
            SR,
            |f| f.status(f.bs, true, f.ctx, &[(32768, 0), (32768, 3), (1, 0)]),
            |_| ProtocolError::ExtentsBeyondRequest,
        ),
        case(
            "an extent after one overshooting the end",
            SR,
            |f| f.status(f.bs, true, f.ctx, &[(1 << 20, 0), (512, 0)]),
            |_| ProtocolError::ExtentsBeyondRequest,
        ),
        case(
            "REQ_ONE answered with two extents",
            SR,
            |f| f.status(f.one, true, f.ctx, &[(4096, 0), (4096, 3)]),
            |_| ProtocolError::ReqOneViolated,
        ),
        case(
            "BLOCK_STATUS of length 10",
            NBDKIT,
            |f| f.chunk(f.bs, chunk::BLOCK_STATUS, true, &status(f.ctx, &[(4096, 0)])[..10]),
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS, length: 10 },
        ),
        case(
            "BLOCK_STATUS without extents",
            NBDKIT,
            |f| f.chunk(f.bs, chunk::BLOCK_STATUS, true, &status(f.ctx, &[])),
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS, length: 4 },
        ),
        case(
            "BLOCK_STATUS with half an extent extra",
            NBDKIT,
            |f| f.chunk(f.bs, chunk::BLOCK_STATUS, true, &[status(f.ctx, &[(4096, 0)]), vec![0; 4]].concat()),
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS, length: 16 },
        ),
        case(
            "BLOCK_STATUS_EXT without extended headers",
            NBDKIT,
            |f| f.chunk(f.bs, chunk::BLOCK_STATUS_EXT, true, &status_ext(f.ctx, 1, &[(4096, 0)])),
            |_| ProtocolError::ReplyNotNegotiated("a 64-bit block status"),
        ),
        case(
            "BLOCK_STATUS_EXT with half a descriptor extra",
            QEMU,
            |f| {
                f.chunk(f.bs, chunk::BLOCK_STATUS_EXT, true, &[status_ext(f.ctx, 1, &[(4096, 0)]), vec![0; 8]].concat())
            },
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS_EXT, length: 32 },
        ),
        case(
            "BLOCK_STATUS_EXT without descriptors",
            QEMU,
            |f| f.chunk(f.bs, chunk::BLOCK_STATUS_EXT, true, &status_ext(f.ctx, 0, &[])),
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS_EXT, length: 8 },
        ),
        case(
            "BLOCK_STATUS_EXT counting more descriptors than it has",
            QEMU,
            |f| f.chunk(f.bs, chunk::BLOCK_STATUS_EXT, true, &status_ext(f.ctx, 5, &[(4096, 0)])),
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS_EXT, length: 24 },
        ),
        case(
            "BLOCK_STATUS_EXT counting fewer descriptors than it has",
            QEMU,
            |f| f.chunk(f.bs, chunk::BLOCK_STATUS_EXT, true, &status_ext(f.ctx, 1, &[(4096, 0), (4096, 3)])),
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS_EXT, length: 40 },
        ),
    ]);
}

// ---- transmission: lengths nothing could hold ----------------------------------------

/// Each of these is only a header: the connection must die from it alone,
/// at once, without waiting for (or allocating) the payload it claims.
#[test]
fn huge_chunk_lengths_fail_from_the_header_alone() {
    let started = std::time::Instant::now();
    run_cases(&[
        case(
            "huge DATA chunk",
            SR,
            |f| f.header(f.r, chunk::OFFSET_DATA, f.huge()),
            |f| ProtocolError::BadChunkLength { kind: chunk::OFFSET_DATA, length: f.huge() },
        ),
        case(
            "huge HOLE chunk",
            SR,
            |f| f.header(f.r, chunk::OFFSET_HOLE, f.huge()),
            |f| ProtocolError::BadChunkLength { kind: chunk::OFFSET_HOLE, length: f.huge() },
        ),
        case(
            "huge NONE chunk",
            SR,
            |f| f.header(f.fl, chunk::NONE, f.huge()),
            |f| ProtocolError::BadChunkLength { kind: chunk::NONE, length: f.huge() },
        ),
        case(
            "huge ERROR chunk",
            SR,
            |f| f.header(f.fl, chunk::ERROR, f.huge()),
            |f| ProtocolError::BadChunkLength { kind: chunk::ERROR, length: f.huge() },
        ),
        case(
            "huge ERROR_OFFSET chunk",
            SR,
            |f| f.header(f.r, chunk::ERROR_OFFSET, f.huge()),
            |f| ProtocolError::BadChunkLength { kind: chunk::ERROR_OFFSET, length: f.huge() },
        ),
        case(
            "huge unknown error chunk",
            SR,
            |f| f.header(f.fl, chunk::ERROR_BIT | 77, f.huge()),
            |f| ProtocolError::BadChunkLength { kind: chunk::ERROR_BIT | 77, length: f.huge() },
        ),
        case(
            "huge block status chunk",
            SR,
            |f| f.header(f.bs, f.status_kind(), f.huge()),
            |f| ProtocolError::BadChunkLength { kind: f.status_kind(), length: f.huge() },
        ),
        case(
            "huge 32-bit block status chunk under extended headers",
            QEMU,
            |f| f.header(f.bs, chunk::BLOCK_STATUS, 1 << 40),
            |_| ProtocolError::BadChunkLength { kind: chunk::BLOCK_STATUS, length: 1 << 40 },
        ),
        case(
            "huge block status chunk of a valid shape",
            SR,
            |f| f.header(f.bs, f.status_kind(), if f.ext { 8 + (16 << 32) } else { 4 + 8 * 0x1fff_ffff }),
            |f| ProtocolError::BadChunkLength {
                kind: f.status_kind(),
                length: if f.ext { 8 + (16 << 32) } else { 4 + 8 * 0x1fff_ffff },
            },
        ),
        case("huge unknown chunk", SR, |f| f.header(f.fl, 77, f.huge()), |_| ProtocolError::UnknownChunkType(77)),
        case(
            "huge DATA chunk to a write",
            SR,
            |f| f.header(f.wr, chunk::OFFSET_DATA, f.huge()),
            |_| ProtocolError::ChunkNotForCommand { kind: chunk::OFFSET_DATA, command: cmd::WRITE },
        ),
    ]);
    // Allocating or waiting for any of those payloads would take far longer.
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "took {:?}", started.elapsed());
}

// ---- transmission: truncated streams --------------------------------------------------

/// Small commands whose complete reply stream the scripted server produces.
fn small_flight(p: &mut Pair) -> Vec<Lent> {
    let sr = p.client.structured_replies_negotiated();
    let c = &mut p.client;
    let mut lent = vec![
        Lent { cookie: c.read(0, vec![0xee; 1024], CmdFlags::empty()).unwrap(), buf: Some(1024) },
        Lent { cookie: c.read(8192, vec![0xee; 1024], CmdFlags::empty()).unwrap(), buf: Some(1024) },
    ];
    if sr {
        lent.push(Lent { cookie: c.block_status(0, 16384, CmdFlags::empty()).unwrap(), buf: None });
    }
    lent.push(Lent { cookie: c.flush(CmdFlags::empty()).unwrap(), buf: None });
    lent.push(Lent { cookie: c.write(4096, vec![0x33; 256], CmdFlags::empty()).unwrap(), buf: Some(256) });
    lent
}

/// The scripted server's complete answer to `submit_fn`'s commands, and the
/// stream position at which each command completes.
/// The first `fill` bytes of the disk are not zero (qemu answers zeroes
/// with HOLE chunks).
fn record_replies(
    preset: Preset,
    submit_fn: fn(&mut Pair) -> Vec<Lent>,
    fill: usize,
) -> (Vec<u8>, HashMap<Cookie, usize>) {
    let mut p = ready(preset, Split::Whole);
    p.server.hold = false;
    p.server.disk[..fill].fill(0x42);
    let lent = submit_fn(&mut p);
    assert!(send_partial(&mut p, usize::MAX) > 0);
    let stream = std::mem::take(&mut p.server.out);
    assert!(!stream.is_empty());
    // Where each command completes, delivering one byte at a time.
    let mut done_at = HashMap::new();
    for i in 0..stream.len() {
        p.deliver(&stream[i..=i]);
        for l in &lent {
            if !done_at.contains_key(&l.cookie) && p.completion(l.cookie).is_some() {
                done_at.insert(l.cookie, i + 1);
            }
        }
    }
    assert_eq!(p.state(), PublicState::Ready, "{preset:?}: the recorded stream is valid");
    assert_eq!(done_at.len(), lent.len(), "{preset:?}: every command completes");
    (stream, done_at)
}

/// Cuts the recorded stream at `cut`, ends the transport, and checks that
/// commands whose reply was whole succeeded and every other one failed
/// with ENOTCONN.
fn truncate_at(
    preset: Preset,
    split: Split,
    submit_fn: fn(&mut Pair) -> Vec<Lent>,
    stream: &[u8],
    done_at: &HashMap<Cookie, usize>,
    cut: usize,
) {
    let case = format!("EOF after {cut} of {} reply bytes [{preset:?}, {split:?}]", stream.len());
    let mut p = ready(preset, split);
    let lent = submit_fn(&mut p);
    p.drive();
    p.inject(&stream[..cut]);
    let mut failing = Vec::new();
    for l in lent {
        if done_at[&l.cookie] <= cut {
            let (result, buf) = take_completion(&mut p, l.cookie, &case);
            assert_eq!(result, Ok(()), "{case}: cookie {}", l.cookie);
            assert_eq!(buf.map(|b| b.len()), l.buf, "{case}");
        } else {
            failing.push(l);
        }
    }
    if cut == stream.len() {
        assert_eq!(p.state(), PublicState::Ready, "{case}");
        assert_eq!(p.client.in_flight(), 0, "{case}");
        return;
    }
    assert!(!failing.is_empty(), "{case}: a cut stream leaves something in flight");
    let between_replies = match p.state() {
        PublicState::Ready => true,
        PublicState::Processing => false,
        other => panic!("{case}: a valid prefix left the connection {}", other.name()),
    };
    if cut == 0 || done_at.values().any(|&end| end == cut) {
        assert!(between_replies, "{case}: a reply ended here, yet the connection is mid-reply");
    }
    p.eof();
    if between_replies {
        assert_closed_by_server(&mut p, &failing, &case);
    } else {
        assert_dead(&mut p, Cause::Eof, &failing, false, &case);
    }
}

#[test]
fn eof_at_every_byte_of_a_reply_stream() {
    for &preset in ALL {
        let (stream, done_at) = record_replies(preset, small_flight, 2048);
        for cut in 0..=stream.len() {
            truncate_at(preset, rotating_split(cut), small_flight, &stream, &done_at, cut);
        }
    }
}

/// A read large enough to be received straight into the caller's buffer.
fn large_read(p: &mut Pair) -> Vec<Lent> {
    let c = &mut p.client;
    vec![
        Lent { cookie: c.flush(CmdFlags::empty()).unwrap(), buf: None },
        Lent { cookie: c.read(0, vec![0xee; 65536], CmdFlags::empty()).unwrap(), buf: Some(65536) },
        Lent { cookie: c.flush(CmdFlags::empty()).unwrap(), buf: None },
    ]
}

#[test]
fn eof_inside_a_large_read_payload() {
    for &preset in ALL {
        let (stream, done_at) = record_replies(preset, large_read, 65536);
        let (first, read) = (done_at[&1], done_at[&2]);
        let header = if preset == Preset::Qemu { 32 } else { 20 };
        let data_start = if preset == Preset::NbdServer { first + 16 } else { first + header + 8 };
        let cuts = [
            0,
            first,
            first + 1,
            first + 15,
            data_start - 8,
            data_start - 1,
            data_start,
            data_start + 1,
            data_start + 32767,
            data_start + 32768,
            data_start + 65535,
            read,
            stream.len() - 1,
            stream.len(),
        ];
        for (i, cut) in cuts.into_iter().enumerate() {
            for split in [Split::Whole, Split::Bytewise, Split::Random(i as u64)] {
                truncate_at(preset, split, large_read, &stream, &done_at, cut);
            }
        }
    }
}

// ---- transmission: server errors are not protocol errors --------------------------------

fn server_error(errno: i32, message: Option<&str>) -> Error {
    Error::Server(ServerError::Command { errno, message: message.map(str::to_owned) })
}

#[test]
fn server_errors_leave_the_connection_ready() {
    for &preset in ALL {
        for split in SPLITS {
            let case = format!("server errors [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let f = submit(&mut p, true);
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            if f.sr {
                // An ERROR chunk, then NONE with DONE.
                bytes.extend(f.chunk(f.fl, chunk::ERROR, false, &error(nbd_error::ENOSPC, b"full")));
                bytes.extend(f.none(f.fl));
                expected.push((f.fl, server_error(ENOSPC, Some("full"))));
                // An error at an offset inside the read, then all the data.
                bytes.extend(f.chunk(f.r, chunk::ERROR_OFFSET, false, &error_offset(nbd_error::EIO, b"bad", 100)));
                bytes.extend(f.data(f.r, true, 0, 4096));
                expected.push((f.r, server_error(EIO, Some("bad"))));
                // An ERROR chunk with DONE and an unknown NBD error value.
                bytes.extend(f.chunk(f.df, chunk::ERROR, true, &error(4242, b"")));
                expected.push((f.df, server_error(EINVAL, None)));
                // An unknown error type (bit 15 set) with a known value and
                // bytes of its own after the message.
                let unknown = [error(nbd_error::ENOSPC, b"x"), vec![1, 2, 3]].concat();
                bytes.extend(f.chunk(f.bs, chunk::ERROR_BIT | 77, true, &unknown));
                expected.push((f.bs, server_error(ENOSPC, Some("x"))));
                // An unknown error type with an unknown value, then NONE.
                bytes.extend(f.chunk(f.one, chunk::ERROR_BIT | 0x1234, false, &error(9999, b"")));
                bytes.extend(f.none(f.one));
                expected.push((f.one, server_error(EINVAL, None)));
                // Errors to other commands: simple (nbdkit), or a chunk when
                // extended headers leave no simple replies (qemu).
                bytes.extend(if f.ext {
                    f.chunk(f.wr, chunk::ERROR, true, &error(nbd_error::EPERM, b""))
                } else {
                    simple(f.wr, nbd_error::EPERM)
                });
                expected.push((f.wr, server_error(EPERM, None)));
            } else {
                bytes.extend(simple(f.r, nbd_error::EIO));
                expected.push((f.r, server_error(EIO, None)));
                bytes.extend(simple(f.fl, 4242));
                expected.push((f.fl, server_error(EINVAL, None)));
                bytes.extend(simple(f.wr, nbd_error::ENOSPC));
                expected.push((f.wr, server_error(ENOSPC, None)));
            }
            p.inject(&bytes);
            assert_eq!(p.state(), PublicState::Ready, "{case}: {:?}", p.client.error());
            assert_eq!(p.client.error(), None, "{case}");
            for (cookie, want) in expected {
                let (result, buf) = take_completion(&mut p, cookie, &case);
                assert_eq!(result, Err(want), "{case}: cookie {cookie}");
                let lent = f.lent.iter().find(|l| l.cookie == cookie).unwrap();
                assert_eq!(buf.map(|b| b.len()), lent.buf, "{case}: cookie {cookie}");
            }
            assert_eq!(stray_completions(&p), Vec::<Cookie>::new(), "{case}");
            assert_eq!(p.client.in_flight(), 0, "{case}");
            assert_eq!(p.client.direction(), Direction::Read, "{case}");

            // And the connection still works.
            p.server.hold = false;
            p.server.disk[..512].fill(0x42);
            let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
            p.drive();
            assert_eq!(take_completion(&mut p, r, &case), (Ok(()), Some(vec![0x42; 512])), "{case}");
        }
    }
}

/// A command that already carries a server error when the connection dies
/// keeps that error (the first one wins, as libnbd reports it); every other
/// command fails with the protocol error.
#[test]
fn a_command_keeps_its_server_error_when_the_connection_dies() {
    for &preset in SR {
        for split in SPLITS {
            let case = format!("server error then violation [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let f = submit(&mut p, true);
            p.inject(&f.chunk(f.r, chunk::ERROR_OFFSET, false, &error_offset(nbd_error::EIO, b"bad", 100)));
            assert_eq!(p.state(), PublicState::Ready, "{case}");
            p.inject(&[0xde, 0xad, 0xbe, 0xef]);
            let (result, buf) = take_completion(&mut p, f.r, &case);
            assert_eq!(result, Err(server_error(EIO, Some("bad"))), "{case}");
            assert_eq!(buf.map(|b| b.len()), Some(4096), "{case}");
            assert_dead(&mut p, ProtocolError::BadReplyMagic(0xdead_beef), &f.without(f.r), false, &case);
        }
    }
}

/// The edges the checks above must not overreach: these are all valid.
#[test]
fn legal_edges_are_accepted() {
    for &preset in SR {
        for split in SPLITS {
            let case = format!("legal edges [{preset:?}, {split:?}]");
            let mut p = ready(preset, split);
            let f = submit(&mut p, true);
            let mut bytes = Vec::new();
            // The last byte first, then the rest, then NONE.
            bytes.extend(f.data(f.r, false, 4095, 1));
            bytes.extend(f.hole(f.r, false, 0, 2048));
            bytes.extend(f.data(f.r, false, 2048, 2047));
            bytes.extend(f.none(f.r));
            // An error at the last byte of a read is a server error; then
            // DF: one chunk covering everything.
            bytes.extend(f.chunk(f.df, chunk::ERROR_OFFSET, false, &error_offset(nbd_error::EIO, b"", 8192 + 4095)));
            bytes.extend(f.hole(f.df, true, 8192, 4096));
            // The last extent may overshoot the request, for every context.
            for (i, m) in p.client.meta_contexts().unwrap().iter().enumerate() {
                let last = i + 1 == p.client.meta_contexts().unwrap().len();
                bytes.extend(f.status(f.bs, last, m.id, &[(65535, 0), (u32::MAX, 3)]));
            }
            // REQ_ONE: one extent, longer than asked.
            bytes.extend(f.status(f.one, true, f.ctx, &[(1 << 20, 0)]));
            bytes.extend(f.ok(f.wr));
            bytes.extend(f.ok(f.fl));
            p.inject(&bytes);
            assert_eq!(p.state(), PublicState::Ready, "{case}: {:?}", p.client.error());
            let mut want = vec![0xd7; 4096];
            want[..2048].fill(0);
            assert_eq!(take_completion(&mut p, f.r, &case), (Ok(()), Some(want)), "{case}");
            let df = take_completion(&mut p, f.df, &case);
            assert_eq!(df, (Err(server_error(EIO, None)), Some(vec![0; 4096])), "{case}");
            assert_eq!(take_completion(&mut p, f.bs, &case), (Ok(()), None), "{case}");
            assert_eq!(take_completion(&mut p, f.one, &case), (Ok(()), None), "{case}");
            assert_eq!(take_completion(&mut p, f.wr, &case), (Ok(()), Some(vec![0x5a; 512])), "{case}");
            assert_eq!(take_completion(&mut p, f.fl, &case), (Ok(()), None), "{case}");
            assert_eq!(stray_completions(&p), Vec::<Cookie>::new(), "{case}");
            assert_eq!(p.client.in_flight(), 0, "{case}");
        }
    }
}

// ---- handshake ----------------------------------------------------------------------

/// A client with no server behind it: the test plays the server by hand.
/// (The pair's scripted server is never driven; `deliver` is the only way
/// bytes reach the client.)
fn raw(cfg: Config, split: Split) -> Pair {
    Pair::with_split(cfg, Behaviour::nbdkit(), 0, split)
}

/// A client that asks for nothing optional: its first option is GO.
fn bare(f: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = Config::default();
    cfg.request_structured_replies = false;
    cfg.request_block_size = false;
    f(&mut cfg);
    cfg
}

/// Sends everything the client has queued; returns the option codes in it,
/// after `skip` bytes (the 4-byte client flags start a newstyle client's
/// stream).
fn options_sent(p: &mut Pair, skip: usize) -> Vec<u32> {
    let sent = support::fuzz_client::ClientScript::transmit(&mut p.client);
    let mut options = Vec::new();
    let mut rest = sent.get(skip..).unwrap_or_default();
    while let Some(h) = rest.get(..OptionHeader::SIZE).and_then(OptionHeader::decode) {
        options.push(h.option);
        rest = rest.get(OptionHeader::SIZE + h.length as usize..).unwrap_or_default();
    }
    assert!(rest.is_empty(), "unparsed client bytes {rest:?}");
    options
}

/// Who asks for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The automatic sequence (no `opt_*` command pending).
    Auto,
    /// Opt mode, `opt_go` pending.
    OptGo,
    /// Opt mode, `opt_info` pending.
    OptInfo,
}

impl Mode {
    fn option(self) -> u32 {
        if self == Mode::OptInfo {
            opt::INFO
        } else {
            opt::GO
        }
    }

    fn pending(self) -> bool {
        self != Mode::Auto
    }
}

const MODES: [Mode; 3] = [Mode::Auto, Mode::OptGo, Mode::OptInfo];

/// A hand-played handshake: the server says `prelude`; in opt mode the
/// test then calls `opt_go` / `opt_info`; the last option the client sent
/// must be `asks`; then the server says `replies`.
fn play(cfg: Config, mode: Mode, split: Split, prelude: &[u8], asks: u32, replies: &[u8]) -> Pair {
    let mut cfg = cfg;
    if mode.pending() {
        cfg.opt_mode = true;
    }
    let mut p = raw(cfg, split);
    p.deliver(prelude);
    match mode {
        Mode::Auto => {}
        Mode::OptGo | Mode::OptInfo => {
            assert_eq!(p.state(), PublicState::Negotiating, "{mode:?}: {:?}", p.client.error());
            let asked = if mode == Mode::OptGo { p.client.opt_go() } else { p.client.opt_info() };
            asked.unwrap();
        }
    }
    assert_eq!(p.state(), PublicState::Connecting, "{mode:?}: {:?}", p.client.error());
    assert_eq!(options_sent(&mut p, 4).last(), Some(&asks), "{mode:?}: the client asked something else");
    p.deliver(replies);
    p
}

#[test]
fn bad_greeting_magic() {
    let cases: [(&str, Vec<u8>, ProtocolError); 5] = [
        (
            "bad NBDMAGIC",
            [b"NBDMAGIX".to_vec(), greeting(3)[8..].to_vec()].concat(),
            ProtocolError::BadMagic { what: "greeting", got: u64::from_be_bytes(*b"NBDMAGIX") },
        ),
        (
            "NBDMAGIC byte-swapped",
            [wire::NBDMAGIC.swap_bytes().to_be_bytes().to_vec(), greeting(3)[8..].to_vec()].concat(),
            ProtocolError::BadMagic { what: "greeting", got: wire::NBDMAGIC.swap_bytes() },
        ),
        (
            "bad version magic",
            [wire::NBDMAGIC.to_be_bytes().to_vec(), vec![1; 8], vec![0, 3]].concat(),
            ProtocolError::BadMagic { what: "greeting version", got: 0x0101_0101_0101_0101 },
        ),
        (
            "option reply magic as the version",
            [wire::NBDMAGIC.to_be_bytes(), wire::OPTION_REPLY_MAGIC.to_be_bytes()].concat(),
            ProtocolError::BadMagic { what: "greeting version", got: wire::OPTION_REPLY_MAGIC },
        ),
        (
            "NBDMAGIC twice",
            [wire::NBDMAGIC.to_be_bytes(), wire::NBDMAGIC.to_be_bytes()].concat(),
            ProtocolError::BadMagic { what: "greeting version", got: wire::NBDMAGIC },
        ),
    ];
    for (name, bytes, expected) in cases {
        for opt_mode in [false, true] {
            for split in HS_SPLITS {
                let case = format!("{name} [opt mode {opt_mode}, {split:?}]");
                let mut p = raw(bare(|c| c.opt_mode = opt_mode), split);
                p.deliver(&bytes);
                assert_dead(&mut p, expected.clone(), &[], false, &case);
            }
        }
    }
}

/// A malformed answer to GO or INFO; `o` is the option asked.
struct GoCase {
    name: &'static str,
    replies: fn(u32) -> Vec<u8>,
    expected: fn(u32) -> ProtocolError,
}

#[test]
fn malformed_replies_to_go_and_info() {
    let cases = [
        GoCase {
            name: "bad option reply magic",
            replies: |_| vec![0xab; 20],
            expected: |_| ProtocolError::BadMagic { what: "option reply", got: 0xabab_abab_abab_abab },
        },
        GoCase {
            name: "reply to a different option",
            replies: |_| option_reply(opt::LIST, rep::ACK, &[]),
            expected: |o| ProtocolError::OptionReplyMismatch { sent: o, got: opt::LIST },
        },
        GoCase {
            name: "reply to an unknown option",
            replies: |_| option_reply(0x1234, rep::INFO, &info_export(4096, 1)),
            expected: |o| ProtocolError::OptionReplyMismatch { sent: o, got: 0x1234 },
        },
        GoCase {
            name: "SERVER reply",
            replies: |o| option_reply(o, rep::SERVER, &[0; 4]),
            expected: |o| ProtocolError::UnexpectedOptionReply { option: o, reply: rep::SERVER },
        },
        GoCase {
            name: "META_CONTEXT reply",
            replies: |o| option_reply(o, rep::META_CONTEXT, &meta_context(1, "base:allocation")),
            expected: |o| ProtocolError::UnexpectedOptionReply { option: o, reply: rep::META_CONTEXT },
        },
        GoCase {
            name: "unknown reply type",
            replies: |o| option_reply(o, 77, &[]),
            expected: |o| ProtocolError::UnexpectedOptionReply { option: o, reply: 77 },
        },
        GoCase {
            name: "ACK with a payload",
            replies: |o| option_reply(o, rep::ACK, &[1]),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::ACK, length: 1 },
        },
        GoCase {
            name: "ACK with a payload after INFO_EXPORT",
            replies: |o| {
                [option_reply(o, rep::INFO, &info_export(4096, 1)), option_reply(o, rep::ACK, &[0; 4])].concat()
            },
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::ACK, length: 4 },
        },
        GoCase {
            name: "oversize INFO reply (header only)",
            replies: |o| option_reply_header(o, rep::INFO, 64 * 1024 + 1),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::INFO, length: 64 * 1024 + 1 },
        },
        GoCase {
            name: "oversize error reply (header only)",
            replies: |o| option_reply_header(o, rep::ERR_UNKNOWN, u32::MAX),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::ERR_UNKNOWN, length: u32::MAX },
        },
        GoCase {
            name: "INFO without a type",
            replies: |o| option_reply(o, rep::INFO, &[0]),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::INFO, length: 1 },
        },
        GoCase {
            name: "INFO_EXPORT of 10 bytes",
            replies: |o| option_reply(o, rep::INFO, &info_export(4096, 1)[..10]),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::INFO, length: 10 },
        },
        GoCase {
            name: "INFO_EXPORT of 14 bytes",
            replies: |o| option_reply(o, rep::INFO, &[info_export(4096, 1), vec![0; 2]].concat()),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::INFO, length: 14 },
        },
        GoCase {
            name: "INFO_BLOCK_SIZE of 10 bytes",
            replies: |o| {
                let infos = [info_export(4096, 1), info_block_size(512, 4096, 1 << 20)[..10].to_vec()];
                infos.iter().flat_map(|i| option_reply(o, rep::INFO, i)).collect()
            },
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::INFO, length: 10 },
        },
        GoCase {
            name: "INFO_BLOCK_SIZE of 18 bytes",
            replies: |o| option_reply(o, rep::INFO, &[info_block_size(512, 4096, 1 << 20), vec![0; 4]].concat()),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::INFO, length: 18 },
        },
        GoCase {
            name: "INFO_NAME longer than 4096 bytes",
            replies: |o| option_reply(o, rep::INFO, &[info::NAME.to_be_bytes().to_vec(), vec![b'n'; 4097]].concat()),
            expected: |o| ProtocolError::BadOptionReplyLength { option: o, reply: rep::INFO, length: 4099 },
        },
        GoCase {
            name: "ACK without INFO_EXPORT",
            replies: |o| option_reply(o, rep::ACK, &[]),
            expected: ProtocolError::MissingExportInfo,
        },
        GoCase {
            name: "ACK after only INFO_BLOCK_SIZE",
            replies: |o| {
                [option_reply(o, rep::INFO, &info_block_size(512, 4096, 1 << 20)), option_reply(o, rep::ACK, &[])]
                    .concat()
            },
            expected: ProtocolError::MissingExportInfo,
        },
        GoCase {
            name: "export size 2^63 in INFO_EXPORT",
            replies: |o| option_reply(o, rep::INFO, &info_export(1 << 63, 1)),
            expected: |_| ProtocolError::SizeTooLarge(1 << 63),
        },
        GoCase {
            name: "export size 2^64-1 in INFO_EXPORT",
            replies: |o| option_reply(o, rep::INFO, &info_export(u64::MAX, 1)),
            expected: |_| ProtocolError::SizeTooLarge(u64::MAX),
        },
    ];
    for c in &cases {
        for mode in MODES {
            for split in HS_SPLITS {
                let case = format!("{} [{mode:?}, {split:?}]", c.name);
                let o = mode.option();
                let mut p = play(bare(|_| {}), mode, split, &greeting(3), o, &(c.replies)(o));
                assert_dead(&mut p, (c.expected)(o), &[], mode.pending(), &case);
            }
        }
    }
}

#[test]
fn export_sizes_of_2_pow_63_or_more() {
    for size in [1 << 63, (1 << 63) + 1, u64::MAX] {
        for split in HS_SPLITS {
            let expected = ProtocolError::SizeTooLarge(size);

            let case = format!("oldstyle size {size:#x} [{split:?}]");
            let mut p = raw(bare(|_| {}), split);
            p.deliver(&oldstyle(size, 1));
            assert_dead(&mut p, expected.clone(), &[], false, &case);

            // Fixed newstyle without GO: the EXPORT_NAME reply, with and
            // without the 124 zeroes.
            for (flags, zeroes) in [(1, true), (3, false)] {
                for mode in [Mode::Auto, Mode::OptGo] {
                    let case = format!("EXPORT_NAME reply size {size:#x}, zeroes {zeroes} [{mode:?}, {split:?}]");
                    let refused = option_reply(opt::GO, rep::ERR_UNSUP, &[]);
                    let mut p = play(bare(|_| {}), mode, split, &greeting(flags), opt::GO, &refused);
                    assert_eq!(options_sent(&mut p, 0), [opt::EXPORT_NAME], "{case}: falls back to EXPORT_NAME");
                    p.deliver(&export_name_reply(size, 1, zeroes));
                    assert_dead(&mut p, expected.clone(), &[], mode.pending(), &case);
                }
            }

            // Non-fixed newstyle: EXPORT_NAME straight away.
            let case = format!("non-fixed newstyle size {size:#x} [{split:?}]");
            let mut p = raw(bare(|_| {}), split);
            p.deliver(&greeting(0));
            assert_eq!(options_sent(&mut p, 4), [opt::EXPORT_NAME], "{case}");
            p.deliver(&export_name_reply(size, 1, true));
            assert_dead(&mut p, expected, &[], false, &case);
        }
    }
    // One below is fine.
    let mut p = raw(bare(|_| {}), Split::Whole);
    p.deliver(&oldstyle(i64::MAX as u64, 1));
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(p.client.export().size, Some(i64::MAX as u64));
}

#[test]
fn malformed_meta_context_replies() {
    let cfg = || {
        bare(|c| {
            c.request_structured_replies = true;
            c.request_extended_headers = false;
            c.add_meta_context("base:allocation").unwrap();
            c.add_meta_context("qemu:allocation-depth").unwrap();
        })
    };
    let set = opt::SET_META_CONTEXT;
    let ctx = |id: u32, name: &str| option_reply(set, rep::META_CONTEXT, &meta_context(id, name));
    let cases: Vec<(&str, Vec<u8>, ProtocolError)> = vec![
        (
            "context not requested",
            ctx(1, "qemu:dirty-bitmap:x"),
            ProtocolError::MetaContextNotRequested("qemu:dirty-bitmap:x".into()),
        ),
        (
            "context that only shares a prefix",
            ctx(1, "base:allocation-extra"),
            ProtocolError::MetaContextNotRequested("base:allocation-extra".into()),
        ),
        (
            "duplicate context id",
            [ctx(1, "base:allocation"), ctx(1, "qemu:allocation-depth")].concat(),
            ProtocolError::DuplicateMetaContextId(1),
        ),
        (
            "the same context twice",
            [ctx(1, "base:allocation"), ctx(2, "base:allocation")].concat(),
            ProtocolError::MetaContextNotRequested("base:allocation".into()),
        ),
        (
            "META_CONTEXT shorter than an id",
            option_reply(set, rep::META_CONTEXT, &[0, 0, 1]),
            ProtocolError::BadOptionReplyLength { option: set, reply: rep::META_CONTEXT, length: 3 },
        ),
        (
            "META_CONTEXT name longer than 4096 bytes",
            option_reply(set, rep::META_CONTEXT, &meta_context(1, &"b".repeat(4097))),
            ProtocolError::BadOptionReplyLength { option: set, reply: rep::META_CONTEXT, length: 4101 },
        ),
        (
            "INFO reply to SET_META_CONTEXT",
            option_reply(set, rep::INFO, &info_export(4096, 1)),
            ProtocolError::UnexpectedOptionReply { option: set, reply: rep::INFO },
        ),
        (
            "ACK with a payload",
            [ctx(1, "base:allocation"), option_reply(set, rep::ACK, &[0; 2])].concat(),
            ProtocolError::BadOptionReplyLength { option: set, reply: rep::ACK, length: 2 },
        ),
        (
            "GO reply while SET_META_CONTEXT is pending",
            option_reply(opt::GO, rep::INFO, &info_export(4096, 1)),
            ProtocolError::OptionReplyMismatch { sent: set, got: opt::GO },
        ),
    ];
    let prelude = [greeting(3), option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[])].concat();
    for (name, replies, expected) in &cases {
        for mode in MODES {
            for split in HS_SPLITS {
                let case = format!("{name} [{mode:?}, {split:?}]");
                let mut p = play(cfg(), mode, split, &prelude, set, replies);
                assert_dead(&mut p, expected.clone(), &[], mode.pending(), &case);
            }
        }
    }
}

#[test]
fn bytes_after_a_starttls_ack_before_tls() {
    let ack = option_reply(opt::STARTTLS, rep::ACK, &[]);
    let cases: Vec<(&str, Vec<u8>, ProtocolError)> = vec![
        ("garbage after the ACK", [ack.clone(), vec![1, 2, 3]].concat(), ProtocolError::DataBeforeTls),
        (
            "a plaintext option reply after the ACK",
            [ack.clone(), option_reply(opt::GO, rep::INFO, &info_export(4096, 1))].concat(),
            ProtocolError::DataBeforeTls,
        ),
        ("a second ACK", [ack.clone(), ack.clone()].concat(), ProtocolError::DataBeforeTls),
        (
            "SERVER reply to STARTTLS",
            option_reply(opt::STARTTLS, rep::SERVER, &[0; 4]),
            ProtocolError::UnexpectedOptionReply { option: opt::STARTTLS, reply: rep::SERVER },
        ),
        (
            "ACK to STARTTLS with a payload",
            option_reply(opt::STARTTLS, rep::ACK, b"tls"),
            ProtocolError::BadOptionReplyLength { option: opt::STARTTLS, reply: rep::ACK, length: 3 },
        ),
    ];
    for (name, replies, expected) in &cases {
        for tls in [TlsMode::Allow, TlsMode::Require] {
            for opt_mode in [false, true] {
                for split in HS_SPLITS {
                    let case = format!("{name} [{tls:?}, opt mode {opt_mode}, {split:?}]");
                    let cfg = bare(|c| {
                        c.tls = tls;
                        c.opt_mode = opt_mode;
                    });
                    let mut p = play(cfg, Mode::Auto, split, &greeting(3), opt::STARTTLS, replies);
                    assert_dead(&mut p, expected.clone(), &[], false, &case);
                }
            }
        }
    }

    // The ACK alone hands over to TLS; a byte arriving before the TLS layer
    // reports success is plaintext injection.
    for split in HS_SPLITS {
        let case = format!("a byte while the TLS layer handshakes [{split:?}]");
        let mut p = play(bare(|c| c.tls = TlsMode::Allow), Mode::Auto, split, &greeting(3), opt::STARTTLS, &ack);
        assert_eq!(p.state(), PublicState::Connecting, "{case}");
        assert_eq!(p.client.direction(), Direction::None, "{case}: the TLS layer drives now");
        assert!(p.events.iter().any(|e| matches!(e, Event::StartTls)), "{case}");
        p.events.clear();
        p.deliver(&[0x16]);
        assert_dead(&mut p, ProtocolError::DataBeforeTls, &[], false, &case);
    }
}

/// TLS required: a server that refuses STARTTLS, or whose handshake has no
/// room for it, is never talked to in plaintext.
#[test]
fn required_tls_is_never_downgraded() {
    let tls_unavailable = |why| Cause::Exact(ServerError::TlsUnavailable(why).into());
    let refused = option_reply(opt::STARTTLS, rep::ERR_POLICY, b"no");
    for split in HS_SPLITS {
        for opt_mode in [false, true] {
            let case = format!("STARTTLS refused [opt mode {opt_mode}, {split:?}]");
            let cfg = bare(|c| {
                c.tls = TlsMode::Require;
                c.opt_mode = opt_mode;
            });
            let mut p = play(cfg, Mode::Auto, split, &greeting(3), opt::STARTTLS, &refused);
            assert_dead(&mut p, tls_unavailable("refused NBD_OPT_STARTTLS"), &[], false, &case);
        }
        let no_starttls = [
            (oldstyle(4096, 1), "uses the oldstyle handshake"),
            (greeting(0), "does not use the fixed newstyle handshake"),
            (greeting(2), "does not use the fixed newstyle handshake"),
        ];
        for (hello, why) in no_starttls {
            let case = format!("a server that {why} [{split:?}]");
            let mut p = raw(bare(|c| c.tls = TlsMode::Require), split);
            p.deliver(&hello);
            let cause = tls_unavailable(why);
            assert_eq!(cause.errno(), ENOTSUP, "{case}");
            assert_dead(&mut p, cause, &[], false, &case);
        }
    }
}

#[test]
fn garbage_after_the_greeting() {
    for split in HS_SPLITS {
        let case = format!("garbage where an option reply belongs [{split:?}]");
        let mut p = raw(bare(|_| {}), split);
        p.deliver(&[greeting(3), vec![0xab; 40]].concat());
        assert_dead(
            &mut p,
            ProtocolError::BadMagic { what: "option reply", got: 0xabab_abab_abab_abab },
            &[],
            false,
            &case,
        );

        let case = format!("garbage while resting in negotiation [{split:?}]");
        let mut p = raw(bare(|c| c.opt_mode = true), split);
        p.deliver(&[greeting(3), vec![0xab; 40]].concat());
        assert_dead(&mut p, ProtocolError::UnsolicitedData("while negotiating"), &[], false, &case);

        let case = format!("a second reply after opt_list completed [{split:?}]");
        let mut p = raw(bare(|c| c.opt_mode = true), split);
        p.deliver(&greeting(3));
        p.client.opt_list().unwrap();
        p.deliver(&[option_reply(opt::LIST, rep::ACK, &[]), option_reply(opt::LIST, rep::ACK, &[])].concat());
        assert_eq!(p.option_result(), Some(Ok(())), "{case}");
        assert_dead(&mut p, ProtocolError::UnsolicitedData("while negotiating"), &[], false, &case);

        let case = format!("garbage after an oldstyle greeting [{split:?}]");
        let mut p = raw(bare(|_| {}), split);
        p.deliver(&[oldstyle(4096, 1), vec![0xab; 40]].concat());
        assert_dead(&mut p, ProtocolError::BadReplyMagic(0xabab_abab), &[], false, &case);

        let case = format!("a reply after an oldstyle greeting, nothing asked [{split:?}]");
        let mut p = raw(bare(|_| {}), split);
        p.deliver(&[oldstyle(4096, 1), simple(1, 0)].concat());
        assert_dead(&mut p, ProtocolError::UnknownCookie(1), &[], false, &case);

        let case = format!("garbage right after GO succeeded [{split:?}]");
        let go = [option_reply(opt::GO, rep::INFO, &info_export(4096, 1)), option_reply(opt::GO, rep::ACK, &[])];
        let mut p =
            play(bare(|_| {}), Mode::Auto, split, &greeting(3), opt::GO, &[go.concat(), vec![0xab; 40]].concat());
        assert!(p.events.iter().any(|e| matches!(e, Event::Connected)), "{case}: connected first");
        assert_dead(&mut p, ProtocolError::BadReplyMagic(0xabab_abab), &[], false, &case);

        let case = format!("garbage as a non-fixed newstyle EXPORT_NAME reply [{split:?}]");
        let mut p = raw(bare(|_| {}), split);
        p.deliver(&[greeting(0), vec![0xff; 200]].concat());
        assert_dead(&mut p, ProtocolError::SizeTooLarge(u64::MAX), &[], false, &case);
    }
}

/// The server's side of a complete handshake with the scripted server. In
/// opt mode the stream is in two parts: before the client rests in
/// negotiation, and after the test calls `opt_go`.
fn record_handshake(cfg: &Config, b: Behaviour) -> (Vec<u8>, Vec<u8>) {
    let mut c: Connection<Vec<u8>> = Connection::new(cfg.clone());
    c.handle_connected().unwrap();
    let mut server = Server::new(b, 4096);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut opted = false;
    loop {
        let sent = support::fuzz_client::ClientScript::transmit(&mut c);
        server.receive(&sent);
        let out = std::mem::take(&mut server.out);
        if out.is_empty() && sent.is_empty() {
            if c.state() == PublicState::Negotiating && !opted {
                c.opt_go().unwrap();
                opted = true;
                continue;
            }
            break;
        }
        let part = if opted { &mut after } else { &mut before };
        part.extend_from_slice(&out);
        c.receive(&out);
    }
    assert_eq!(c.state(), PublicState::Ready, "recording: {:?}", c.error());
    (before, after)
}

#[test]
fn eof_at_every_byte_of_a_handshake() {
    // Functions, not closures: rustc 1.95's MIR GVN pass miscompiles
    // closures that take a Config by value and are called more than once
    // (release builds only; rust-lang/rust#155241): the scenarios came
    // out with each other's meta contexts.
    fn meta(mut c: Config) -> Config {
        c.add_meta_context("base:allocation").unwrap();
        c
    }
    fn exp(mut c: Config) -> Config {
        c.set_export_name("exp").unwrap();
        c
    }
    fn with(mut c: Config, f: fn(&mut Config)) -> Config {
        f(&mut c);
        c
    }
    let scenarios: Vec<(&str, Config, Behaviour)> = vec![
        ("nbdkit with a meta context", meta(Config::default()), Behaviour::nbdkit()),
        (
            "qemu with meta contexts and full info",
            with(meta(Config::default()), |c| {
                c.add_meta_context("qemu:allocation-depth").unwrap();
                c.full_info = true;
            }),
            Behaviour::qemu(),
        ),
        ("nbd-server", exp(Config::default()), Behaviour::nbd_server()),
        ("oldstyle", Config::default(), Behaviour { style: Style::Oldstyle, ..Behaviour::nbdkit() }),
        ("non-fixed newstyle", Config::default(), Behaviour { style: Style::Newstyle, ..Behaviour::nbdkit() }),
        (
            "EXPORT_NAME fallback with zeroes",
            Config::default(),
            Behaviour { go: false, no_zeroes: false, ..Behaviour::nbdkit() },
        ),
        ("STARTTLS refused", with(Config::default(), |c| c.tls = TlsMode::Allow), Behaviour::nbdkit()),
        ("opt mode, opt_go", with(meta(Config::default()), |c| c.opt_mode = true), Behaviour::nbdkit()),
    ];
    for (n, c, _) in &scenarios {
        eprintln!("DBG0 {n} {:?}", c.meta_contexts());
    }
    let mut runs = 0;
    for (name, cfg, b) in scenarios {
        let (before, after) = record_handshake(&cfg, b);
        assert_eq!(after.is_empty(), !cfg.opt_mode, "{name}");
        let stream = [before.clone(), after].concat();
        for cut in 0..=stream.len() {
            let split = rotating_split(cut + runs);
            runs += 1;
            let case = format!("{name}: EOF after {cut} of {} bytes [{split:?}]", stream.len());
            let mut p = raw(cfg.clone(), split);
            let pending = cfg.opt_mode && cut >= before.len();
            if pending {
                p.deliver(&before);
                assert_eq!(p.state(), PublicState::Negotiating, "{case}");
                p.client.opt_go().unwrap();
                p.deliver(&stream[before.len()..cut]);
            } else {
                p.deliver(&stream[..cut]);
            }
            if cut == stream.len() {
                // Nobody sent the client's last option; once it leaves, the client rests.
                support::fuzz_client::ClientScript::transmit(&mut p.client);
                assert_eq!(p.state(), PublicState::Ready, "{case}: {:?}", p.client.error());
                assert!(p.events.iter().any(|e| matches!(e, Event::Connected)), "{case}");
                assert_eq!(p.option_result(), pending.then_some(Ok(())), "{case}");
                continue;
            }
            assert_eq!(p.state(), PublicState::Connecting, "{case}: {:?}", p.client.error());
            p.eof();
            assert_dead(&mut p, Cause::Eof, &[], pending, &case);
        }
    }
}

// ---- transmission: any single corrupted byte ---------------------------------------------

/// Every single-byte corruption of a valid reply stream: whatever the
/// client makes of it, it never panics, every command completes exactly
/// once, and a connection that dies of it dies of a protocol error, failing
/// every command still in flight with it.
#[test]
fn every_corrupted_byte_of_a_reply_stream() {
    for &preset in ALL {
        let (stream, _) = record_replies(preset, small_flight, 2048);
        for at in 0..stream.len() {
            let split = rotating_split(at);
            let case = format!("byte {at} of {} corrupted [{preset:?}, {split:?}]", stream.len());
            let mut bad = stream.clone();
            bad[at] ^= 0xff;
            let mut p = ready(preset, split);
            let lent = small_flight(&mut p);
            p.drive();
            p.inject(&bad);
            drain_events(&mut p);
            let died = p.state() == PublicState::Dead;
            if died {
                let err = p.client.error().cloned().unwrap();
                assert!(matches!(err, Error::Protocol(_)), "{case}: died of {err:?}");
                // Commands that completed before the death may have any
                // result; the rest carry the cause (or a server error they
                // already had).
                for l in &lent {
                    let (result, buf) = take_completion(&mut p, l.cookie, &case);
                    assert_eq!(buf.map(|b| b.len()), l.buf, "{case}");
                    if let Err(e) = result {
                        assert!(e == err || matches!(e, Error::Server(_)), "{case}: cookie {}: {e:?}", l.cookie);
                    }
                }
                assert_dead(&mut p, Cause::Exact(err), &[], false, &case);
            } else {
                // Undetectable corruption (payload bytes, flags, ...); end
                // the transport and every command is accounted for.
                let between_replies = p.state() == PublicState::Ready;
                p.eof();
                for l in &lent {
                    let (result, buf) = take_completion(&mut p, l.cookie, &case);
                    assert_eq!(buf.map(|b| b.len()), l.buf, "{case}");
                    let fine =
                        matches!(&result, Ok(()) | Err(Error::Server(_) | Error::Transport(TransportError::Eof(_))));
                    assert!(fine, "{case}: cookie {}: {result:?}", l.cookie);
                }
                if between_replies {
                    assert_closed_by_server(&mut p, &[], &case);
                } else {
                    assert_dead(&mut p, Cause::Eof, &[], false, &case);
                }
            }
        }
    }
}

#[test]
fn malformed_replies_to_list_options() {
    let (list, meta) = (opt::LIST, opt::LIST_META_CONTEXT);
    let server = |name_len: u32, name: &[u8]| [name_len.to_be_bytes().to_vec(), name.to_vec()].concat();
    let cases: Vec<(&str, u32, Vec<u8>, Cause)> = vec![
        (
            "SERVER whose name overruns it",
            list,
            option_reply(list, rep::SERVER, &server(100, b"abc")),
            ProtocolError::BadOptionReplyLength { option: list, reply: rep::SERVER, length: 7 }.into(),
        ),
        (
            "SERVER shorter than a name length",
            list,
            option_reply(list, rep::SERVER, &[0, 0]),
            ProtocolError::BadOptionReplyLength { option: list, reply: rep::SERVER, length: 2 }.into(),
        ),
        (
            "INFO reply to LIST",
            list,
            option_reply(list, rep::INFO, &info_export(4096, 1)),
            ProtocolError::UnexpectedOptionReply { option: list, reply: rep::INFO }.into(),
        ),
        (
            "reply to another option while LIST is pending",
            list,
            option_reply(opt::STARTTLS, rep::ACK, &[]),
            ProtocolError::OptionReplyMismatch { sent: list, got: opt::STARTTLS }.into(),
        ),
        (
            "LIST ACK with a payload",
            list,
            [option_reply(list, rep::SERVER, &server(1, b"a")), option_reply(list, rep::ACK, &[1])].concat(),
            ProtocolError::BadOptionReplyLength { option: list, reply: rep::ACK, length: 1 }.into(),
        ),
        (
            "oversize reply after a good one",
            list,
            [option_reply(list, rep::SERVER, &server(1, b"a")), option_reply_header(list, rep::SERVER, 1 << 24)]
                .concat(),
            ProtocolError::BadOptionReplyLength { option: list, reply: rep::SERVER, length: 1 << 24 }.into(),
        ),
        ("EOF while LIST is pending", list, option_reply(list, rep::SERVER, &server(1, b"a")), Cause::Eof),
        (
            "SERVER reply to LIST_META_CONTEXT",
            meta,
            option_reply(meta, rep::SERVER, &server(1, b"a")),
            ProtocolError::UnexpectedOptionReply { option: meta, reply: rep::SERVER }.into(),
        ),
        (
            "META_CONTEXT shorter than an id",
            meta,
            option_reply(meta, rep::META_CONTEXT, &[0, 1]),
            ProtocolError::BadOptionReplyLength { option: meta, reply: rep::META_CONTEXT, length: 2 }.into(),
        ),
        (
            "INFO reply to LIST_META_CONTEXT",
            meta,
            option_reply(meta, rep::INFO, &info_export(4096, 1)),
            ProtocolError::UnexpectedOptionReply { option: meta, reply: rep::INFO }.into(),
        ),
        ("EOF while LIST_META_CONTEXT is pending", meta, vec![], Cause::Eof),
    ];
    for (name, option, replies, expected) in &cases {
        for split in HS_SPLITS {
            let case = format!("{name} [{split:?}]");
            let cfg = bare(|c| {
                c.opt_mode = true;
                c.request_structured_replies = *option == meta;
                c.request_extended_headers = false;
            });
            let mut p = raw(cfg, split);
            let sr = option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
            p.deliver(&if *option == meta { [greeting(3), sr].concat() } else { greeting(3) });
            assert_eq!(p.state(), PublicState::Negotiating, "{case}");
            if *option == meta { p.client.opt_list_meta_context() } else { p.client.opt_list() }.unwrap();
            assert_eq!(options_sent(&mut p, 4).last(), Some(option), "{case}");
            p.deliver(replies);
            if matches!(expected, Cause::Eof) {
                assert_eq!(p.state(), PublicState::Connecting, "{case}");
                p.eof();
            }
            assert_dead(&mut p, expected.clone(), &[], true, &case);
        }
    }
}
