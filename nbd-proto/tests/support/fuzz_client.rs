//! The fuzz harness: arbitrary bytes play the server against a fixed
//! client script (handshake with meta contexts, opt mode, then every
//! command). Shared by the cargo-fuzz target and the plain corpus test.
//!
//! Input layout: byte 0 selects the client settings; the rest is the
//! server's byte stream as frames (a 16-bit big-endian length, then that
//! many bytes, fewer if the input ends). The client script acts between
//! frames, so a recorded session replays with its commands submitted
//! before their replies arrive. Each frame goes in through
//! `recv_buffer` in pieces of varying size.

#![allow(dead_code)]

use nbd_proto::{CmdFlags, Config, Connection, Event, HandshakeFlags, PublicState, StrictMode, TlsMode};
use std::collections::HashSet;

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

/// What the client does, driven only by the state the connection is in.
#[derive(Default)]
pub struct ClientScript {
    opt_step: usize,
    submitted: bool,
    /// Cookies accepted, and those completed.
    pub accepted: HashSet<u64>,
    pub completed: HashSet<u64>,
    pub succeeded: usize,
    pub option_pending: bool,
}

impl ClientScript {
    /// Submits whatever the current state calls for.
    pub fn step(&mut self, c: &mut Connection<Vec<u8>>) {
        match c.state() {
            PublicState::Negotiating if !self.option_pending => {
                let r = match self.opt_step {
                    0 => c.opt_list(),
                    1 => c.opt_list_meta_context(),
                    2 => c.opt_info(),
                    _ => c.opt_go(),
                };
                self.opt_step += 1;
                self.option_pending = r.is_ok();
            }
            PublicState::Ready | PublicState::Processing if !self.submitted => {
                self.submitted = true;
                let results = [
                    c.read(0, vec![0; 512], CmdFlags::empty()),
                    c.read_structured(4096, vec![0xff; 4096], CmdFlags::DF),
                    c.read_structured(0, vec![0xff; 65536], CmdFlags::empty()),
                    c.write(0, vec![0xaa; 512], CmdFlags::FUA),
                    c.flush(CmdFlags::empty()),
                    c.trim(0, 4096, CmdFlags::empty()),
                    c.cache(0, 4096, CmdFlags::empty()),
                    c.write_zeroes(8192, 4096, CmdFlags::FAST_ZERO | CmdFlags::NO_HOLE),
                    c.block_status(0, 65536, CmdFlags::REQ_ONE),
                    c.block_status(0, 65536, CmdFlags::empty()),
                ];
                self.accepted.extend(results.into_iter().flatten());
            }
            _ => {}
        }
    }

    /// Checks and records one event; panics on a broken invariant.
    pub fn on_event(&mut self, e: &Event<Vec<u8>>, c: &mut Connection<Vec<u8>>) {
        match e {
            Event::Complete { cookie, result, .. } => {
                assert!(self.accepted.contains(cookie), "completion for cookie {cookie} never accepted");
                assert!(self.completed.insert(*cookie), "cookie {cookie} completed twice");
                self.succeeded += usize::from(result.is_ok());
            }
            Event::OptionComplete { .. } => {
                assert!(self.option_pending, "option completion without an option");
                self.option_pending = false;
            }
            // Plays a TLS layer that is transparent.
            Event::StartTls => c.handle_tls_established().expect("awaiting TLS"),
            _ => {}
        }
    }

    pub fn drain(&mut self, c: &mut Connection<Vec<u8>>) {
        while let Some(e) = c.poll_event() {
            self.on_event(&e, c);
        }
    }

    /// Sends everything the client has queued.
    pub fn transmit(c: &mut Connection<Vec<u8>>) -> Vec<u8> {
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

const PIECES: [usize; 7] = [1, 3, 17, 256, 4096, 9, 65536];

/// Runs one input; panics if an invariant breaks. Returns the commands
/// accepted and those that succeeded.
pub fn run_client(data: &[u8]) -> (usize, usize) {
    let Some((&selector, mut stream)) = data.split_first() else { return (0, 0) };
    let mut c: Connection<Vec<u8>> = Connection::new(config_for(selector));
    c.handle_connected().unwrap();
    let mut script = ClientScript::default();
    let mut i = 0;
    while !stream.is_empty() {
        let len = match stream {
            [a, b, rest @ ..] => {
                stream = rest;
                usize::from(u16::from_be_bytes([*a, *b]))
            }
            _ => std::mem::take(&mut stream).len(),
        };
        let (mut frame, rest) = stream.split_at(len.min(stream.len()));
        stream = rest;
        for _ in 0..4 {
            script.step(&mut c);
            ClientScript::transmit(&mut c);
            script.drain(&mut c);
        }
        while !frame.is_empty() && !matches!(c.state(), PublicState::Dead | PublicState::Closed) {
            let dest = c.recv_buffer();
            let n = PIECES[i % PIECES.len()].min(dest.len()).min(frame.len());
            assert!(n > 0, "the client offered no room to receive into");
            dest[..n].copy_from_slice(&frame[..n]);
            c.handle_received(n);
            frame = &frame[n..];
            i += 1;
            ClientScript::transmit(&mut c);
            script.drain(&mut c);
        }
    }
    script.step(&mut c);
    ClientScript::transmit(&mut c);
    script.drain(&mut c);
    c.handle_eof();
    script.drain(&mut c);
    let end = c.state();
    assert!(matches!(end, PublicState::Dead | PublicState::Closed), "after EOF the state is {}", end.name());
    assert_eq!(script.accepted, script.completed, "every accepted command completes exactly once");
    assert!(!script.option_pending, "a pending option was never completed");
    assert_eq!(c.in_flight(), 0);
    (script.accepted.len(), script.succeeded)
}
