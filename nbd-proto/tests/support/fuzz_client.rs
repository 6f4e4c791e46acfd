//! The fuzz harnesses' engine and the `client` harness: arbitrary bytes
//! play the server against a client script. Shared by the cargo-fuzz
//! targets (`client`, `handshake`, `transmission`) and the plain tests.
//!
//! Every harness input ends in the server's byte stream as frames (a
//! 16-bit big-endian length, then that many bytes, fewer if the input
//! ends). The script acts after every frame shorter than 65535 bytes (a
//! full frame continues in the next one), so a recorded session replays
//! with its commands submitted before their replies arrive. Each frame
//! goes in through `recv_buffer` in pieces of varying size. [`Tracker`]
//! checks every event and, after EOF, that everything finished.
//!
//! `client` input: byte 0 selects the client settings ([`config_for`]);
//! then frames. The script: opt mode's list, list meta contexts, info and
//! go, then every command once, then disconnect.

#![allow(dead_code)]

use nbd_proto::{CmdFlags, Config, Connection, Cookie, Error, Event, HandshakeFlags, PublicState, StrictMode, TlsMode};
use std::collections::{HashMap, HashSet};

use super::server::{Behaviour, Server};

pub type Conn = Connection<Vec<u8>>;

/// A scripted server as the seeds are recorded against: 1 MiB, with one
/// block of data among zeroes.
pub fn scripted_server(b: Behaviour) -> Server {
    let mut s = Server::new(b, 1 << 20);
    s.disk[4096..8192].fill(0x5a);
    s
}

/// The largest frame; a frame this long is continued by the next one.
pub const FULL_FRAME: usize = u16::MAX as usize;

/// Settings chosen by the selector byte.
pub fn config_for(selector: u8) -> Config {
    let mut cfg = Config::default();
    cfg.request_structured_replies = selector & 1 == 0;
    cfg.request_extended_headers = selector & 2 == 0;
    cfg.opt_mode = selector & 4 != 0;
    cfg.full_info = selector & 8 != 0;
    if selector & 16 == 0 {
        cfg.add_meta_context("base:allocation").unwrap();
        cfg.add_meta_context("qemu:allocation-depth").unwrap();
    }
    // Mostly let every command through, so the reply parser sees them all.
    if selector & 32 == 0 {
        cfg.strict = StrictMode::empty();
    }
    if selector & 64 != 0 {
        cfg.handshake_flags = HandshakeFlags::FIXED_NEWSTYLE;
    }
    if selector & 128 != 0 {
        cfg.tls = TlsMode::Allow;
    }
    cfg
}

/// One command a script submits.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    Read {
        offset: u64,
        len: usize,
        flags: CmdFlags,
        chunks: bool,
    },
    Write {
        offset: u64,
        len: usize,
        flags: CmdFlags,
    },
    Flush(CmdFlags),
    Trim {
        offset: u64,
        len: u64,
        flags: CmdFlags,
    },
    Cache {
        offset: u64,
        len: u64,
        flags: CmdFlags,
    },
    Zero {
        offset: u64,
        len: u64,
        flags: CmdFlags,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        flags: CmdFlags,
    },
    /// Block status for the first negotiated context alone (a payload).
    BlockStatusFilter {
        offset: u64,
        len: u64,
        flags: CmdFlags,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    BlockStatus,
    Other,
}

/// A command accepted and not yet completed.
#[derive(Debug)]
struct Live {
    kind: Kind,
    offset: u64,
    length: u64,
}

/// What a session came to; the committed real sessions must replay to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub accepted: usize,
    pub succeeded: usize,
    pub options_ok: usize,
    pub options_failed: usize,
    pub connected: bool,
    pub end: &'static str,
}

impl Summary {
    /// An input too short to start a session.
    pub fn empty() -> Summary {
        Summary { accepted: 0, succeeded: 0, options_ok: 0, options_failed: 0, connected: false, end: "created" }
    }

    /// One line of the real corpus manifest.
    pub fn line(&self) -> String {
        format!(
            "accepted={} succeeded={} options_ok={} options_failed={} connected={} end={}",
            self.accepted, self.succeeded, self.options_ok, self.options_failed, self.connected, self.end
        )
    }
}

/// Checks every event against what was submitted; panics on a broken
/// invariant.
#[derive(Debug, Default)]
pub struct Tracker {
    live: HashMap<Cookie, Live>,
    seen: HashSet<Cookie>,
    pub accepted: usize,
    pub succeeded: usize,
    option_pending: bool,
    pub options_ok: usize,
    pub options_failed: usize,
    connected: usize,
    pub lost: usize,
    pub reconnected: usize,
}

impl Tracker {
    /// Submits `cmd`; an accepted command is remembered.
    pub fn submit(&mut self, c: &mut Conn, cmd: Cmd) {
        let (r, kind, offset, length) = match cmd {
            Cmd::Read { offset, len, flags, chunks: false } => {
                (c.read(offset, vec![0; len], flags), Kind::Read, offset, len as u64)
            }
            Cmd::Read { offset, len, flags, chunks: true } => {
                (c.read_structured(offset, vec![0; len], flags), Kind::Read, offset, len as u64)
            }
            Cmd::Write { offset, len, flags } => {
                (c.write(offset, vec![0; len], flags), Kind::Write, offset, len as u64)
            }
            Cmd::Flush(flags) => (c.flush(flags), Kind::Other, 0, 0),
            Cmd::Trim { offset, len, flags } => (c.trim(offset, len, flags), Kind::Other, offset, len),
            Cmd::Cache { offset, len, flags } => (c.cache(offset, len, flags), Kind::Other, offset, len),
            Cmd::Zero { offset, len, flags } => (c.write_zeroes(offset, len, flags), Kind::Other, offset, len),
            Cmd::BlockStatus { offset, len, flags } => {
                (c.block_status(offset, len, flags), Kind::BlockStatus, offset, len)
            }
            Cmd::BlockStatusFilter { offset, len, flags } => {
                let first: Vec<u32> = c.meta_contexts().unwrap_or_default().iter().take(1).map(|m| m.id).collect();
                (c.block_status_filter(offset, len, &first, flags), Kind::BlockStatus, offset, len)
            }
        };
        if let Ok(cookie) = r {
            assert!(self.seen.insert(cookie), "cookie {cookie} handed out twice");
            self.live.insert(cookie, Live { kind, offset, length });
            self.accepted += 1;
        }
    }

    /// Starts an `opt_*` call; returns whether it was accepted.
    pub fn option(&mut self, r: Result<(), Error>) -> bool {
        if r.is_ok() {
            assert!(!self.option_pending, "two options in flight");
            self.option_pending = true;
        }
        r.is_ok()
    }

    pub fn option_pending(&self) -> bool {
        self.option_pending
    }

    pub fn in_flight(&self) -> usize {
        self.live.len()
    }

    /// Checks one event.
    pub fn check(&mut self, e: &Event<Vec<u8>>, c: &Conn) {
        match e {
            Event::Complete { cookie, result, buf } => {
                let live = self.live.remove(cookie).unwrap_or_else(|| {
                    panic!("completion for cookie {cookie}, which was never accepted or already completed")
                });
                match live.kind {
                    Kind::Read | Kind::Write => {
                        let len = buf.as_ref().map(Vec::len);
                        assert_eq!(len, Some(live.length as usize), "cookie {cookie}: the buffer comes back whole");
                    }
                    _ => assert!(buf.is_none(), "cookie {cookie}: a buffer for a command without one"),
                }
                self.succeeded += usize::from(result.is_ok());
            }
            Event::ReadChunk { cookie, offset, length, status } => {
                let live = self.live.get(cookie).expect("a read chunk for a command not in flight");
                assert_eq!(live.kind, Kind::Read, "a read chunk for a command that is not a read");
                let end = offset.checked_add(*length).expect("read chunk end overflows");
                assert!(*offset >= live.offset && end - live.offset <= live.length, "read chunk outside the request");
                match status {
                    nbd_proto::ChunkStatus::Error { errno } => assert_ne!(*errno, 0),
                    _ => assert!(*length > 0, "an empty data or hole chunk"),
                }
            }
            Event::Extents { cookie, context_id, offset, extents } => {
                let live = self.live.get(cookie).expect("extents for a command not in flight");
                assert_eq!(live.kind, Kind::BlockStatus, "extents for a command that is not block status");
                assert_eq!(*offset, live.offset);
                assert!(c.meta_context_name(*context_id).is_some(), "extents for unnegotiated context {context_id}");
                assert!(!extents.is_empty() && extents.iter().all(|x| x.length > 0), "empty extents");
            }
            Event::OptionComplete { result } => {
                assert!(self.option_pending, "option completion without an option");
                self.option_pending = false;
                match result {
                    Ok(()) => self.options_ok += 1,
                    Err(_) => self.options_failed += 1,
                }
            }
            Event::ExportListed { .. } | Event::MetaContextListed { .. } => {
                assert!(self.option_pending, "a listing outside an option");
            }
            Event::Connected => {
                self.connected += 1;
                assert_eq!(self.connected, 1, "connected twice");
            }
            Event::StartTls => {}
            Event::TransportLost { error } => {
                assert!(c.config().keep_commands_on_loss, "lost without keeping commands: {error}");
                assert!(c.is_lost());
                self.lost += 1;
            }
            Event::Reconnected => {
                assert!(!c.is_lost(), "reconnected while lost");
                self.reconnected += 1;
                assert!(self.reconnected <= self.lost, "reconnected more often than lost");
            }
        }
    }

    /// The end of a session: every command and option finished, nothing
    /// left to send or wait for.
    pub fn finish(&self, c: &mut Conn) -> Summary {
        let end = c.state();
        assert!(matches!(end, PublicState::Dead | PublicState::Closed), "after EOF the state is {}", end.name());
        assert!(self.live.is_empty(), "commands never completed: {:?}", self.live.keys().collect::<Vec<_>>());
        assert!(!self.option_pending, "a pending option was never completed");
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.direction(), nbd_proto::Direction::None);
        assert!(ClientScript::transmit(c).is_empty(), "bytes to send after the end");
        Summary {
            accepted: self.accepted,
            succeeded: self.succeeded,
            options_ok: self.options_ok,
            options_failed: self.options_failed,
            connected: self.connected > 0,
            end: end.name(),
        }
    }
}

/// What a client does between frames.
pub trait Script {
    /// Submits whatever the current state calls for; called once at every
    /// frame boundary.
    fn step(&mut self, c: &mut Conn, t: &mut Tracker);
    /// Reacts to an event the tracker has checked.
    fn on_event(&mut self, _e: &Event<Vec<u8>>, _c: &mut Conn) {}
}

/// Checks and hands on every pending event; plays a transparent TLS layer.
pub fn drain(c: &mut Conn, script: &mut impl Script, t: &mut Tracker) {
    while let Some(e) = c.poll_event() {
        t.check(&e, c);
        if matches!(e, Event::StartTls) {
            c.handle_tls_established().expect("awaiting TLS");
        }
        script.on_event(&e, c);
    }
}

/// Splits a framed stream; the flag says whether the script acts after it.
pub fn frames(mut stream: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    std::iter::from_fn(move || {
        if stream.is_empty() {
            return None;
        }
        let len = match stream {
            [a, b, rest @ ..] => {
                stream = rest;
                usize::from(u16::from_be_bytes([*a, *b]))
            }
            _ => std::mem::take(&mut stream).len(),
        };
        let (frame, rest) = stream.split_at(len.min(stream.len()));
        stream = rest;
        Some((frame, len < FULL_FRAME))
    })
}

/// Appends `bytes` to a framed stream, split so that the script acts only
/// after the last piece.
pub fn push_frames(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut rest = bytes;
    loop {
        let n = rest.len().min(FULL_FRAME);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if n < FULL_FRAME {
            return;
        }
    }
}

const PIECES: [usize; 7] = [1, 3, 17, 256, 4096, 9, 65536];

/// Delivers `frame` through `recv_buffer` in pieces of the sizes in
/// [`PIECES`] (cycling with `i`), sending and draining events after each,
/// until the connection is over or lost.
pub fn feed(c: &mut Conn, script: &mut impl Script, t: &mut Tracker, mut frame: &[u8], i: &mut usize) {
    while !frame.is_empty() && !matches!(c.state(), PublicState::Dead | PublicState::Closed) && !c.awaits_restart() {
        let dest = c.recv_buffer();
        let n = PIECES[*i % PIECES.len()].min(dest.len()).min(frame.len());
        assert!(n > 0, "the client offered no room to receive into");
        dest[..n].copy_from_slice(&frame[..n]);
        c.handle_received(n);
        frame = &frame[n..];
        *i += 1;
        ClientScript::transmit(c);
        drain(c, script, t);
    }
}

/// Plays `stream` (frames) as the server against `script`, then EOF;
/// panics if an invariant breaks.
pub fn play(c: &mut Conn, script: &mut impl Script, t: &mut Tracker, stream: &[u8]) -> Summary {
    let mut i = 0;
    let mut act = true;
    for (frame, acts_after) in frames(stream) {
        if act {
            script.step(c, t);
            ClientScript::transmit(c);
            drain(c, script, t);
        }
        act = acts_after;
        feed(c, script, t, frame, &mut i);
    }
    script.step(c, t);
    ClientScript::transmit(c);
    drain(c, script, t);
    c.handle_eof();
    drain(c, script, t);
    t.finish(c)
}

/// The fixed script of the `client` harness.
#[derive(Default)]
pub struct ClientScript {
    opt_step: usize,
    submitted: bool,
    disconnected: bool,
}

/// Every command, once, with flags the servers honour.
pub const EVERY_COMMAND: [Cmd; 10] = [
    Cmd::Read { offset: 0, len: 512, flags: CmdFlags::empty(), chunks: false },
    Cmd::Read { offset: 4096, len: 4096, flags: CmdFlags::DF, chunks: true },
    // Large enough to be received straight into the buffer.
    Cmd::Read { offset: 0, len: 36864, flags: CmdFlags::empty(), chunks: true },
    Cmd::Write { offset: 0, len: 512, flags: CmdFlags::FUA },
    Cmd::Flush(CmdFlags::empty()),
    Cmd::Trim { offset: 0, len: 4096, flags: CmdFlags::empty() },
    Cmd::Cache { offset: 0, len: 4096, flags: CmdFlags::empty() },
    Cmd::Zero { offset: 8192, len: 4096, flags: CmdFlags::FAST_ZERO.union(CmdFlags::NO_HOLE) },
    Cmd::BlockStatus { offset: 0, len: 65536, flags: CmdFlags::REQ_ONE },
    Cmd::BlockStatus { offset: 0, len: 65536, flags: CmdFlags::empty() },
];

impl Script for ClientScript {
    fn step(&mut self, c: &mut Conn, t: &mut Tracker) {
        match c.state() {
            PublicState::Negotiating => {
                // An opt_* call refused locally sends nothing; move on.
                while !t.option_pending() && matches!(c.state(), PublicState::Negotiating) {
                    let r = match self.opt_step {
                        0 => c.opt_list(),
                        1 => c.opt_list_meta_context(),
                        2 => c.opt_info(),
                        _ => c.opt_go(),
                    };
                    self.opt_step += 1;
                    t.option(r);
                }
            }
            PublicState::Ready | PublicState::Processing if !self.submitted => {
                self.submitted = true;
                for cmd in EVERY_COMMAND {
                    t.submit(c, cmd);
                }
            }
            PublicState::Ready | PublicState::Processing if t.in_flight() == 0 && !self.disconnected => {
                self.disconnected = c.disconnect().is_ok();
            }
            _ => {}
        }
    }

    /// Like `nbdinfo --list`, takes the first export the server lists
    /// (nbd-server has no default export).
    fn on_event(&mut self, e: &Event<Vec<u8>>, c: &mut Conn) {
        if let Event::ExportListed { name, .. } = e {
            if self.opt_step == 1 && c.config().export_name().is_empty() {
                if let Ok(cfg) = c.config_mut() {
                    cfg.set_export_name(name).expect("a listed name fits");
                }
            }
        }
    }
}

impl ClientScript {
    /// Takes everything the client has queued to send.
    pub fn transmit(c: &mut Conn) -> Vec<u8> {
        let mut sent = Vec::new();
        loop {
            let mut slices: [&[u8]; 16] = [&[]; 16];
            let n = c.poll_transmit(&mut slices);
            let before = sent.len();
            for s in &slices[..n] {
                sent.extend_from_slice(s);
            }
            if sent.len() == before {
                return sent;
            }
            c.handle_sent(sent.len() - before);
        }
    }
}

/// A `client` input's client, ready to play its stream.
pub fn start(data: &[u8]) -> Option<(Conn, ClientScript, Tracker, &[u8])> {
    let (&selector, stream) = data.split_first()?;
    let mut c = Conn::new(config_for(selector));
    c.handle_connected().unwrap();
    Some((c, ClientScript::default(), Tracker::default(), stream))
}

/// Runs one `client` input; panics if an invariant breaks.
pub fn run_client(data: &[u8]) -> Summary {
    let Some((mut c, mut script, mut t, stream)) = start(data) else { return Summary::empty() };
    play(&mut c, &mut script, &mut t, stream)
}
