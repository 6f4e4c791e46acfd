//! The `server` harness: arbitrary bytes play a hostile client against
//! the server role, which a memory disk answers.
//!
//! Input layout: byte 0 chooses the server ([`config_for`]: TLS policy,
//! reply formats offered, a read-only export, block size constraints, a
//! small limit on requests in flight); byte 1 how requests are answered
//! (bit 0: at once, else held to the end of the frame; bit 1: held ones
//! in reverse order; bit 2: sparse READ replies; bit 3: every fifth
//! request fails with EIO); then frames of client bytes (see
//! `fuzz_client`), each fed in pieces of varying size. Every request is
//! checked against what the server advertised, every lent buffer must
//! come back exactly once, and after EOF the connection must be finished
//! with nothing left to send.

#![allow(dead_code)]

use super::fuzz_client::{frames, push_frames, Summary};
use super::server_pair::Disk;
use nbd_proto::server::{self, Command, Event, Export, Phase, Request, TlsPolicy};
use nbd_proto::wire::nbd_error;
use nbd_proto::{BlockSize, CmdFlags, Config, Connection, Direction, PublicState, TlsMode, TransmissionFlags as TF};
use std::collections::HashMap;

pub const SIZE: u64 = 1 << 20;

/// The server settings of the selector byte.
pub fn config_for(selector: u8) -> server::Config {
    let mut e = Export::new("", SIZE);
    e.description = "fuzz".into();
    if selector & 16 != 0 {
        e.flags |= TF::READ_ONLY;
        e.flags.remove(TF::SEND_FLUSH);
    }
    if selector & 32 != 0 {
        e.block_size = Some(BlockSize { minimum: 512, preferred: 4096, maximum: 64 * 1024 });
    }
    server::Config {
        exports: vec![e, Export::new("b", 8192)],
        tls: [TlsPolicy::Off, TlsPolicy::Allow, TlsPolicy::Require, TlsPolicy::Off][usize::from(selector & 3)],
        structured_replies: selector & 4 == 0,
        extended_headers: selector & 8 == 0,
        max_in_flight: if selector & 64 != 0 { 2 } else { 16 },
    }
}

type Srv = server::Connection<Vec<u8>>;

/// Plays the disk behind the server and checks what the server hands out.
struct Harness {
    s: Srv,
    disk: Disk,
    mode: u8,
    held: Vec<(Request, Option<Vec<u8>>)>,
    requests: HashMap<u64, Request>,
    lent: i64,
    accepted: usize,
    succeeded: usize,
    connected: bool,
    sent: Vec<u8>,
}

impl Harness {
    fn new(selector: u8, mode: u8) -> Self {
        let mut disk = Disk::new(SIZE as usize);
        disk.bytes[4096..8192].fill(0x5a);
        disk.sparse = mode & 4 != 0;
        Harness {
            s: Srv::new(config_for(selector)),
            disk,
            mode,
            held: Vec::new(),
            requests: HashMap::new(),
            lent: 0,
            accepted: 0,
            succeeded: 0,
            connected: false,
            sent: Vec::new(),
        }
    }

    /// Checks a request against what the server advertised.
    fn check(&self, r: &Request) {
        let export = &self.s.config().exports[self.s.export().expect("a request before an export was chosen")];
        let adv = self.s.transmission_flags();
        let end = r.offset.checked_add(r.length).expect("offset + length overflows");
        assert!(end <= export.size, "{r:?} passes the end");
        let b = export.effective_block_size();
        let min = u64::from(b.minimum);
        if r.command != Command::Flush {
            assert!(r.offset % min == 0 && r.length % min == 0, "{r:?} unaligned");
        }
        let stores = matches!(r.command, Command::Write | Command::Trim | Command::WriteZeroes);
        assert!(!(stores && adv.contains(TF::READ_ONLY)), "{r:?} on a read-only export");
        if matches!(r.command, Command::Read | Command::Write) {
            assert!(r.length <= u64::from(b.maximum), "{r:?} above the maximum");
        }
        assert!(!r.flags.contains(CmdFlags::FUA) || adv.contains(TF::SEND_FUA));
        assert!(!r.flags.contains(CmdFlags::DF) || adv.contains(TF::SEND_DF));
        assert!(!r.flags.contains(CmdFlags::PAYLOAD_LEN), "PAYLOAD_LEN is the core's");
        match r.command {
            Command::BlockStatus => {
                assert!(!r.contexts.is_empty() && r.length > 0);
                assert!(r.contexts.iter().all(|c| self.s.meta_contexts().iter().any(|m| m.id == *c)));
            }
            Command::Flush => assert!(adv.contains(TF::SEND_FLUSH) && r.offset == 0 && r.length == 0),
            Command::Trim => assert!(adv.contains(TF::SEND_TRIM)),
            Command::Cache => assert!(adv.contains(TF::SEND_CACHE)),
            Command::WriteZeroes => assert!(adv.contains(TF::SEND_WRITE_ZEROES)),
            _ => assert!(r.contexts.is_empty()),
        }
    }

    fn answer(&mut self, r: &Request, data: Option<Vec<u8>>) {
        if self.mode & 8 != 0 && r.id % 5 == 0 {
            self.s.reply_error(r.id, nbd_error::EIO, "fuzz").unwrap();
            return;
        }
        self.succeeded += 1;
        self.lent += self.disk.serve(&mut self.s, r, data);
    }

    /// Takes every event, answering or holding requests.
    fn drain(&mut self) {
        loop {
            let mut slices: [&[u8]; 8] = [&[]; 8];
            let n = self.s.poll_transmit(&mut slices);
            let bytes: Vec<u8> = slices[..n].concat();
            if !bytes.is_empty() {
                // A partial send now and then.
                let k = if bytes.len() > 7 && self.sent.len() % 3 == 0 { bytes.len() / 2 } else { bytes.len() };
                self.sent.extend_from_slice(&bytes[..k]);
                self.s.handle_sent(k);
                continue;
            }
            let Some(e) = self.s.poll_event() else { return };
            match e {
                Event::Request(r) => {
                    self.check(&r);
                    self.accepted += 1;
                    self.requests.insert(r.id, r.clone());
                    if r.command == Command::Write {
                        self.lent += 1;
                        self.s.receive_write(r.id, vec![0; r.length as usize]).unwrap();
                    } else if self.mode & 1 != 0 {
                        self.answer(&r, None);
                    } else {
                        self.held.push((r, None));
                    }
                }
                Event::WriteData { id, buf } => {
                    self.lent -= 1;
                    let r = self.requests[&id].clone();
                    assert_eq!(buf.len() as u64, r.length, "the payload fills the buffer");
                    if self.mode & 1 != 0 {
                        self.answer(&r, Some(buf));
                    } else {
                        self.held.push((r, Some(buf)));
                    }
                }
                Event::BufferReturned { .. } => self.lent -= 1,
                Event::StartTls => self.s.handle_tls_established().expect("TLS right after StartTls"),
                Event::ExportSelected { .. } => {
                    assert!(!self.connected, "two exports selected");
                    self.connected = true;
                }
                Event::Disconnect => {}
            }
        }
    }

    /// Answers what was held, in the order the mode says.
    fn release(&mut self) {
        let mut held = std::mem::take(&mut self.held);
        if self.mode & 2 != 0 {
            held.reverse();
        }
        for (r, data) in held {
            self.answer(&r, data);
        }
        self.drain();
    }

    fn feed(&mut self, mut frame: &[u8], i: &mut usize) {
        const PIECES: [usize; 7] = [1, 3, 17, 256, 4096, 9, 65536];
        while !frame.is_empty() {
            if !self.s.direction().wants_read() {
                // Held requests keep the server from reading (the limit on
                // requests in flight, a WRITE awaiting its payload): answer.
                if self.held.is_empty() {
                    return;
                }
                self.release();
                continue;
            }
            let dest = self.s.recv_buffer();
            assert!(!dest.is_empty(), "the server wants to read but offers no room");
            let n = PIECES[*i % PIECES.len()].min(dest.len()).min(frame.len());
            dest[..n].copy_from_slice(&frame[..n]);
            self.s.handle_received(n);
            frame = &frame[n..];
            *i += 1;
            self.drain();
        }
    }

    fn finish(mut self) -> Summary {
        self.release();
        self.s.handle_eof();
        self.drain();
        self.release();
        let phase = self.s.phase();
        assert!(matches!(phase, Phase::Closed | Phase::Dead), "after EOF the phase is {phase:?}");
        assert_eq!(self.s.direction(), Direction::None);
        assert_eq!(self.s.in_flight(), 0);
        assert_eq!(self.lent, 0, "every lent buffer comes back once");
        let mut slices: [&[u8]; 1] = [&[]];
        assert_eq!(self.s.poll_transmit(&mut slices), 0, "bytes to send after the end");
        Summary {
            accepted: self.accepted,
            succeeded: self.succeeded,
            options_ok: 0,
            options_failed: 0,
            connected: self.connected,
            end: if phase == Phase::Closed { "closed" } else { "dead" },
        }
    }
}

/// Runs one `server` input; panics if an invariant breaks.
pub fn run_server(data: &[u8]) -> Summary {
    let [selector, mode, stream @ ..] = data else { return Summary::empty() };
    let mut h = Harness::new(*selector, *mode);
    h.drain();
    let mut i = 0;
    for (frame, acts_after) in frames(stream) {
        h.feed(frame, &mut i);
        if acts_after {
            h.release();
        }
    }
    h.finish()
}

/// A seed: the client role with `client` settings runs `script` against
/// the server the selector chooses; its bytes, one frame per round, follow
/// the two selector bytes.
pub fn record(selector: u8, mode: u8, client: Config, script: &[Step]) -> Vec<u8> {
    let mut c: Connection<Vec<u8>> = Connection::new(client);
    c.handle_connected().unwrap();
    let mut h = Harness::new(selector, mode);
    h.drain();
    let mut stream = Vec::new();
    let mut steps = script.iter();
    let mut i = 0;
    for _ in 0..64 {
        if matches!(c.state(), PublicState::Ready) && c.in_flight() == 0 {
            match steps.next() {
                Some(step) => step.submit(&mut c),
                None => {
                    let _ = c.disconnect();
                }
            }
        }
        let out = super::fuzz_client::ClientScript::transmit(&mut c);
        if !out.is_empty() {
            push_frames(&mut stream, &out);
            h.feed(&out, &mut i);
            h.release();
        }
        let reply = std::mem::take(&mut h.sent);
        c.receive(&reply);
        while let Some(e) = c.poll_event() {
            if matches!(e, nbd_proto::Event::StartTls) {
                c.handle_tls_established().unwrap();
            }
        }
        if out.is_empty() && reply.is_empty() {
            break;
        }
    }
    [&[selector, mode][..], &stream].concat()
}

/// One command of a seed's script.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Read(u64, usize, CmdFlags),
    Write(u64, usize, CmdFlags),
    Zero(u64, u64, CmdFlags),
    Trim(u64, u64),
    Flush,
    Cache(u64, u64),
    Status(u64, u64, CmdFlags),
}

impl Step {
    fn submit(self, c: &mut Connection<Vec<u8>>) {
        let _ = match self {
            Step::Read(o, l, f) => c.read(o, vec![0; l], f),
            Step::Write(o, l, f) => c.write(o, vec![0x33; l], f),
            Step::Zero(o, l, f) => c.write_zeroes(o, l, f),
            Step::Trim(o, l) => c.trim(o, l, CmdFlags::empty()),
            Step::Flush => c.flush(CmdFlags::empty()),
            Step::Cache(o, l) => c.cache(o, l, CmdFlags::empty()),
            Step::Status(o, l, f) => c.block_status(o, l, f),
        };
    }
}

/// Every command, with flags and an out-of-bounds one.
pub const EVERY_STEP: [Step; 10] = [
    Step::Write(0, 8192, CmdFlags::FUA),
    Step::Read(0, 8192, CmdFlags::empty()),
    Step::Read(4096, 4096, CmdFlags::DF),
    Step::Zero(8192, 4096, CmdFlags::NO_HOLE),
    Step::Zero(12288, 4096, CmdFlags::FAST_ZERO),
    Step::Trim(16384, 4096),
    Step::Flush,
    Step::Cache(0, 65536),
    Step::Status(0, 65536, CmdFlags::empty()),
    Step::Read(SIZE - 512, 1024, CmdFlags::empty()),
];

/// Client settings for seeds: reply formats, TLS, opt-less variants.
pub fn seed_clients() -> Vec<(&'static str, Config)> {
    let base = || {
        let mut c = Config::default();
        c.add_meta_context("base:allocation").unwrap();
        c.strict = nbd_proto::StrictMode::empty();
        c
    };
    let mut v = vec![("default", base())];
    let mut c = base();
    c.request_extended_headers = false;
    v.push(("structured", c));
    let mut c = base();
    c.request_structured_replies = false;
    v.push(("simple", c));
    let mut c = base();
    c.tls = TlsMode::Allow;
    c.full_info = true;
    v.push(("tls", c));
    let mut c = base();
    c.handshake_flags = nbd_proto::HandshakeFlags::empty();
    v.push(("oldnew", c));
    v
}
