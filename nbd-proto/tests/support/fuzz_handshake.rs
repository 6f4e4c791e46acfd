//! The `handshake` harness: opt mode with a script of `opt_*` calls and
//! setting changes chosen by the input, against arbitrary server bytes.
//!
//! Input layout: byte 0 selects the client settings ([`config_for`], opt
//! mode always on); byte 1's low 4 bits count the steps that follow, one
//! byte each ([`Step::from_byte`]); then frames (see `fuzz_client`). Each
//! step runs when no option is pending; setting changes run at once, an
//! `opt_*` call waits for its completion. When the steps run out, the
//! script aborts if still negotiating, or reads once, asks block status
//! and disconnects if it got to transmission.

#![allow(dead_code)]

use super::fuzz_client::{config_for, play, Cmd, Conn, Script, Summary, Tracker};
use nbd_proto::{CmdFlags, Config, PublicState, TlsMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    List,
    ListMetaContext,
    Info,
    Go,
    Abort,
    ExportName(&'static str),
    StructuredReplies(bool),
    ExtendedHeaders(bool),
    Tls(TlsMode),
    MetaContexts(u8),
    FullInfo(bool),
    BlockSize(bool),
    /// The single options of libnbd 1.16-1.18, asked for by the caller.
    OptStructuredReply,
    OptExtendedHeaders,
    OptSetMetaContext,
    OptStartTls,
}

pub const EXPORT_NAMES: [&str; 4] = ["", "exp", "a", "b"];
const TLS_MODES: [TlsMode; 3] = [TlsMode::Disable, TlsMode::Allow, TlsMode::Require];

impl Step {
    /// The low 4 bits pick the step, the high 4 its argument.
    pub fn from_byte(b: u8) -> Step {
        let arg = b >> 4;
        match b & 15 {
            0 => Step::List,
            1 => Step::ListMetaContext,
            2 => Step::Info,
            3 => Step::Go,
            4 => Step::Abort,
            5 => Step::ExportName(EXPORT_NAMES[usize::from(arg & 3)]),
            6 => Step::StructuredReplies(arg & 1 != 0),
            7 => Step::ExtendedHeaders(arg & 1 != 0),
            8 => Step::Tls(TLS_MODES[usize::from(arg % 3)]),
            9 => Step::MetaContexts(arg & 3),
            10 => Step::FullInfo(arg & 1 != 0),
            11 => Step::BlockSize(arg & 1 != 0),
            12 => Step::OptStructuredReply,
            13 => Step::OptExtendedHeaders,
            14 => Step::OptSetMetaContext,
            _ => Step::OptStartTls,
        }
    }

    /// The byte [`Self::from_byte`] reads back as this step.
    pub fn to_byte(self) -> u8 {
        match self {
            Step::List => 0,
            Step::ListMetaContext => 1,
            Step::Info => 2,
            Step::Go => 3,
            Step::Abort => 4,
            Step::ExportName(n) => 5 | (EXPORT_NAMES.iter().position(|x| *x == n).expect("a known name") as u8) << 4,
            Step::StructuredReplies(on) => 6 | u8::from(on) << 4,
            Step::ExtendedHeaders(on) => 7 | u8::from(on) << 4,
            Step::Tls(m) => 8 | (TLS_MODES.iter().position(|x| *x == m).unwrap() as u8) << 4,
            Step::MetaContexts(v) => 9 | (v & 3) << 4,
            Step::FullInfo(on) => 10 | u8::from(on) << 4,
            Step::BlockSize(on) => 11 | u8::from(on) << 4,
            Step::OptStructuredReply => 12,
            Step::OptExtendedHeaders => 13,
            Step::OptSetMetaContext => 14,
            Step::OptStartTls => 15,
        }
    }

    /// Changes a setting; `false` for the steps that are `opt_*` calls.
    fn configure(self, cfg: &mut Config) -> bool {
        match self {
            Step::ExportName(n) => cfg.set_export_name(n).unwrap(),
            Step::StructuredReplies(on) => cfg.request_structured_replies = on,
            Step::ExtendedHeaders(on) => cfg.request_extended_headers = on,
            Step::Tls(m) => cfg.tls = m,
            Step::MetaContexts(v) => {
                cfg.clear_meta_contexts();
                for (bit, name) in [(1, "base:allocation"), (2, "qemu:")] {
                    if v & bit != 0 {
                        cfg.add_meta_context(name).unwrap();
                    }
                }
            }
            Step::FullInfo(on) => cfg.full_info = on,
            Step::BlockSize(on) => cfg.request_block_size = on,
            _ => return false,
        }
        true
    }
}

/// The selector and steps as the input's leading bytes.
pub fn encode_header(selector: u8, steps: &[Step]) -> Vec<u8> {
    assert!(steps.len() < 16);
    let mut v = vec![selector, steps.len() as u8];
    v.extend(steps.iter().map(|s| s.to_byte()));
    v
}

pub struct HandshakeScript {
    steps: Vec<Step>,
    next: usize,
    tested: bool,
    disconnected: bool,
}

impl HandshakeScript {
    pub fn new(steps: Vec<Step>) -> Self {
        HandshakeScript { steps, next: 0, tested: false, disconnected: false }
    }
}

impl Script for HandshakeScript {
    fn step(&mut self, c: &mut Conn, t: &mut Tracker) {
        match c.state() {
            PublicState::Negotiating => {
                while !t.option_pending() && c.state() == PublicState::Negotiating {
                    let Some(&step) = self.steps.get(self.next) else {
                        t.option(c.opt_abort());
                        return;
                    };
                    self.next += 1;
                    if step.configure(c.config_mut().expect("negotiating")) {
                        continue;
                    }
                    t.option(match step {
                        Step::List => c.opt_list(),
                        Step::ListMetaContext => c.opt_list_meta_context(),
                        Step::Info => c.opt_info(),
                        Step::Go => c.opt_go(),
                        Step::OptStructuredReply => c.opt_structured_reply(),
                        Step::OptExtendedHeaders => c.opt_extended_headers(),
                        Step::OptSetMetaContext => c.opt_set_meta_context(None),
                        Step::OptStartTls => c.opt_starttls(),
                        _ => c.opt_abort(),
                    });
                }
            }
            PublicState::Ready | PublicState::Processing if !self.tested => {
                // What was negotiated must be usable.
                self.tested = true;
                t.submit(c, Cmd::Read { offset: 0, len: 512, flags: CmdFlags::empty(), chunks: true });
                if c.meta_contexts().is_some_and(|m| !m.is_empty()) {
                    t.submit(c, Cmd::BlockStatus { offset: 0, len: 512, flags: CmdFlags::empty() });
                }
            }
            PublicState::Ready | PublicState::Processing if t.in_flight() == 0 && !self.disconnected => {
                self.disconnected = c.disconnect().is_ok();
            }
            _ => {}
        }
    }
}

/// A `handshake` input's client, ready to play its stream.
pub fn start(data: &[u8]) -> Option<(Conn, HandshakeScript, Tracker, &[u8])> {
    let (&selector, rest) = data.split_first()?;
    let (&count, rest) = rest.split_first()?;
    let n = usize::from(count & 15).min(rest.len());
    let steps = rest[..n].iter().map(|&b| Step::from_byte(b)).collect();
    let mut cfg = config_for(selector);
    cfg.opt_mode = true;
    let mut c = Conn::new(cfg);
    c.handle_connected().unwrap();
    Some((c, HandshakeScript::new(steps), Tracker::default(), &rest[n..]))
}

/// Runs one `handshake` input; panics if an invariant breaks.
pub fn run_handshake(data: &[u8]) -> Summary {
    let Some((mut c, mut script, mut t, stream)) = start(data) else { return Summary::empty() };
    play(&mut c, &mut script, &mut t, stream)
}
