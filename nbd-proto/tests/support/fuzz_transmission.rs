//! The `transmission` harness: a well-formed handshake gets the client to
//! ready, then commands chosen by the input meet arbitrary replies.
//!
//! Input layout: byte 0 is the preset ([`preset_config`]: bits 0-2 which
//! server and settings, bit 3 strict mode, bit 4 export name "exp", bit 7
//! the handshake is in the stream rather than canned); byte 1 counts the
//! operations that follow (at most 64), 6 bytes each ([`Op::decode`]); then frames
//! (see `fuzz_client`). Without bit 7 the client first receives the
//! handshake the scripted server gives the preset. At every frame boundary
//! the script submits operations up to the next `Yield`; when they run
//! out and nothing is in flight, it disconnects.

#![allow(dead_code)]

use super::fuzz_client::{drain, play, scripted_server, ClientScript, Cmd, Conn, Script, Summary, Tracker};
use super::server::{Behaviour, Server, Style};
use nbd_proto::{CmdFlags, Config, PublicState, StrictMode};
use std::sync::OnceLock;

/// The server each preset's canned handshake comes from, and the client
/// settings that go with it.
pub const PRESETS: [&str; 8] =
    ["nbdkit", "qemu", "qemu-compact", "nbd-server", "oldstyle", "nbdkit-simple", "qemu-no-contexts", "newstyle"];

pub const STRICT: u8 = 8;
pub const EXPORT_EXP: u8 = 16;
pub const IN_STREAM: u8 = 128;

/// The largest READ or WRITE buffer, and the most operations, an input
/// asks for: enough for every receive path, small enough to run fast.
pub const MAX_BUFFER: u64 = 256 * 1024;
pub const MAX_OPS: usize = 64;

fn behaviour(index: usize) -> Behaviour {
    match index {
        0 | 5 => Behaviour::nbdkit(),
        1 | 2 | 6 => Behaviour::qemu(),
        3 => Behaviour::nbd_server(),
        4 => Behaviour { style: Style::Oldstyle, ..Behaviour::nbdkit() },
        _ => Behaviour { style: Style::Newstyle, ..Behaviour::nbdkit() },
    }
}

/// The client settings of the preset byte.
pub fn preset_config(preset: u8) -> Config {
    let index = usize::from(preset & 7);
    let mut cfg = Config::default();
    if index != 6 {
        cfg.add_meta_context("base:allocation").unwrap();
        cfg.add_meta_context("qemu:allocation-depth").unwrap();
    }
    cfg.request_extended_headers = index != 2;
    cfg.request_structured_replies = index != 5;
    if preset & STRICT == 0 {
        cfg.strict = StrictMode::empty();
    }
    if preset & EXPORT_EXP != 0 {
        cfg.set_export_name("exp").unwrap();
    }
    cfg
}

/// The preset's scripted server, before any handshake.
pub fn preset_server(preset: u8) -> Server {
    let mut b = behaviour(usize::from(preset & 7));
    b.exports.push((String::new(), String::new()));
    scripted_server(b)
}

/// A scripted server for the preset that has brought the preset's client
/// to ready, and what it sent to get there.
pub fn scripted_handshake(preset: u8) -> (Server, Vec<u8>) {
    let index = usize::from(preset & 7);
    let mut c = Conn::new(preset_config(preset & 7));
    c.handle_connected().unwrap();
    let mut server = preset_server(preset);
    let mut received = Vec::new();
    loop {
        server.receive(&ClientScript::transmit(&mut c));
        let out = std::mem::take(&mut server.out);
        if out.is_empty() {
            break;
        }
        c.receive(&out);
        received.extend_from_slice(&out);
    }
    assert_eq!(c.state(), PublicState::Ready, "preset {}: {:?}", PRESETS[index], c.error());
    (server, received)
}

/// What the scripted server sends to get the preset's client to ready.
pub fn canned_handshake(preset: u8) -> &'static [u8] {
    static CANNED: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let all = CANNED.get_or_init(|| (0..PRESETS.len() as u8).map(|i| scripted_handshake(i).1).collect());
    &all[usize::from(preset & 7)]
}

/// One operation of the script.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Cmd(Cmd),
    /// Wait for the next frame.
    Yield,
    Disconnect,
    AbandonUnsent,
}

impl Op {
    /// `[op, flags, a (u16 BE), b (u16 BE)]`: the low 4 bits of `op` pick
    /// the operation; the offset is `a * 512`, or `u64::MAX - a` with bit 5;
    /// the length is `b`, or with bit 6 `b * 16` (at most [`MAX_BUFFER`])
    /// for a buffer and, for other commands, `b * 64 KiB` or, if `b`'s top
    /// bit is set, the rest times 4 GiB (past 32 bits).
    pub fn decode(r: [u8; 6]) -> Op {
        let a = u64::from(u16::from_be_bytes([r[2], r[3]]));
        let b = u64::from(u16::from_be_bytes([r[4], r[5]]));
        let offset = if r[0] & 0x20 != 0 { u64::MAX - a } else { a << 9 };
        let big = r[0] & 0x40 != 0;
        let buf = if big { (b << 4).min(MAX_BUFFER) as usize } else { b as usize };
        let len = match (big, b & 0x8000 != 0) {
            (false, _) => b,
            (true, false) => b << 16,
            (true, true) => (b & 0x7fff) << 32,
        };
        let flags = CmdFlags::from_bits_retain(u16::from(r[1]));
        Op::Cmd(match r[0] & 15 {
            0 => Cmd::Read { offset, len: buf, flags, chunks: false },
            1 => Cmd::Read { offset, len: buf, flags, chunks: true },
            2 => Cmd::Write { offset, len: buf, flags },
            3 => Cmd::Flush(flags),
            4 => Cmd::Trim { offset, len, flags },
            5 => Cmd::Cache { offset, len, flags },
            6 => Cmd::Zero { offset, len, flags },
            7 => Cmd::BlockStatus { offset, len, flags },
            9 => return Op::Disconnect,
            10 => return Op::AbandonUnsent,
            11 => Cmd::BlockStatusFilter { offset, len, flags },
            _ => return Op::Yield,
        })
    }

    /// The record [`Self::decode`] reads back as this operation (offsets
    /// in 512-byte units up to 32 MiB).
    pub fn encode(self) -> [u8; 6] {
        let (kind, offset, len, flags) = match self {
            Op::Cmd(Cmd::Read { offset, len, flags, chunks }) => (u8::from(chunks), offset, len as u64, flags),
            Op::Cmd(Cmd::Write { offset, len, flags }) => (2, offset, len as u64, flags),
            Op::Cmd(Cmd::Flush(flags)) => (3, 0, 0, flags),
            Op::Cmd(Cmd::Trim { offset, len, flags }) => (4, offset, len, flags),
            Op::Cmd(Cmd::Cache { offset, len, flags }) => (5, offset, len, flags),
            Op::Cmd(Cmd::Zero { offset, len, flags }) => (6, offset, len, flags),
            Op::Cmd(Cmd::BlockStatus { offset, len, flags }) => (7, offset, len, flags),
            Op::Yield => (8, 0, 0, CmdFlags::empty()),
            Op::Disconnect => (9, 0, 0, CmdFlags::empty()),
            Op::AbandonUnsent => (10, 0, 0, CmdFlags::empty()),
            Op::Cmd(Cmd::BlockStatusFilter { offset, len, flags }) => (11, offset, len, flags),
        };
        assert!(offset % 512 == 0 && offset >> 9 <= 0xffff, "offset {offset} not encodable");
        let unit = if matches!(self, Op::Cmd(Cmd::Read { .. } | Cmd::Write { .. })) { 4 } else { 16 };
        let (big, b) = if len > 0xffff { (0x40, len >> unit) } else { (0, len) };
        let exact = big == 0 || (b << unit == len && (unit == 4 || b < 0x8000));
        assert!(b <= 0xffff && exact, "length {len} not encodable");
        let [a0, a1] = ((offset >> 9) as u16).to_be_bytes();
        let [b0, b1] = (b as u16).to_be_bytes();
        [kind | big, flags.bits() as u8, a0, a1, b0, b1]
    }
}

/// The preset and operations as the input's leading bytes.
pub fn encode_header(preset: u8, ops: &[Op]) -> Vec<u8> {
    let mut v = vec![preset, u8::try_from(ops.len()).expect("at most 255 operations")];
    for op in ops {
        v.extend_from_slice(&op.encode());
    }
    v
}

pub struct TransmissionScript {
    ops: Vec<Op>,
    next: usize,
    disconnected: bool,
}

impl Script for TransmissionScript {
    fn step(&mut self, c: &mut Conn, t: &mut Tracker) {
        if !matches!(c.state(), PublicState::Ready | PublicState::Processing) {
            return;
        }
        while let Some(&op) = self.ops.get(self.next) {
            self.next += 1;
            match op {
                Op::Cmd(cmd) => t.submit(c, cmd),
                Op::Yield => return,
                Op::Disconnect => self.disconnected |= c.disconnect().is_ok(),
                Op::AbandonUnsent => {
                    c.abandon_unsent();
                    drain(c, self, t);
                }
            }
        }
        if t.in_flight() == 0 && !self.disconnected {
            self.disconnected = c.disconnect().is_ok();
        }
    }
}

/// A `transmission` input's client, ready to play its stream.
pub fn start(data: &[u8]) -> Option<(Conn, TransmissionScript, Tracker, &[u8])> {
    start_with(data, |_| {})
}

/// As [`start`], with the preset's settings changed by `adjust`.
pub fn start_with(data: &[u8], adjust: impl FnOnce(&mut Config)) -> Option<(Conn, TransmissionScript, Tracker, &[u8])> {
    let (&preset, rest) = data.split_first()?;
    let (&count, rest) = rest.split_first()?;
    let n = usize::from(count).min(MAX_OPS).min(rest.len() / 6);
    let ops = rest[..n * 6].chunks_exact(6).map(|r| Op::decode(r.try_into().unwrap())).collect();
    let mut script = TransmissionScript { ops, next: 0, disconnected: false };
    let mut t = Tracker::default();
    let mut cfg = preset_config(preset);
    adjust(&mut cfg);
    let mut c = Conn::new(cfg);
    c.handle_connected().unwrap();
    if preset & IN_STREAM == 0 {
        c.receive(canned_handshake(preset));
        ClientScript::transmit(&mut c);
        drain(&mut c, &mut script, &mut t);
        assert_eq!(c.state(), PublicState::Ready, "the canned handshake failed: {:?}", c.error());
    }
    Some((c, script, t, &rest[n * 6..]))
}

/// Runs one `transmission` input; panics if an invariant breaks.
pub fn run_transmission(data: &[u8]) -> Summary {
    let Some((mut c, mut script, mut t, stream)) = start(data) else { return Summary::empty() };
    play(&mut c, &mut script, &mut t, stream)
}
