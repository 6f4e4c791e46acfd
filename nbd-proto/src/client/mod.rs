//! The NBD client connection: a state machine with no I/O of its own.

mod checks;
mod config;
mod handshake;
mod inflight;
mod input;
mod output;
mod transmission;

pub use config::Config;

use crate::error::{Error, LocalError, ProtocolError, TransportError};
use crate::flags::TransmissionFlags;
use handshake::{Handshake, OptionPlan};
use inflight::InFlight;
use input::Input;
use output::{Milestone, Output, Piece};
use std::collections::VecDeque;
use transmission::Rx;

/// Identifies a command from submission to completion. Cookies start at 1
/// and increase, as libnbd's do.
pub type Cookie = u64;

/// What the caller must wait for before driving the connection again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    None,
    Read,
    Write,
    Both,
}

impl Direction {
    pub fn wants_read(self) -> bool {
        matches!(self, Direction::Read | Direction::Both)
    }
    pub fn wants_write(self) -> bool {
        matches!(self, Direction::Write | Direction::Both)
    }
}

/// The states a libnbd user can observe (`nbd_aio_is_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicState {
    Created,
    Connecting,
    Negotiating,
    Ready,
    Processing,
    Dead,
    Closed,
}

impl PublicState {
    pub fn name(self) -> &'static str {
        match self {
            PublicState::Created => "created",
            PublicState::Connecting => "connecting",
            PublicState::Negotiating => "negotiating",
            PublicState::Ready => "ready",
            PublicState::Processing => "processing",
            PublicState::Dead => "dead",
            PublicState::Closed => "closed",
        }
    }
}

/// The handshake style the server used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Oldstyle,
    Newstyle,
    NewstyleFixed,
}

impl Protocol {
    /// libnbd's `nbd_get_protocol` string.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Oldstyle => "oldstyle",
            Protocol::Newstyle => "newstyle",
            Protocol::NewstyleFixed => "newstyle-fixed",
        }
    }
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// What the server said about the export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: Option<u64>,
    pub flags: TransmissionFlags,
    pub block_size: Option<BlockSize>,
    pub canonical_name: Option<String>,
    pub description: Option<String>,
}

/// Traffic counters, as libnbd's `nbd_stats_*` report them: plaintext
/// bytes of the NBD stream (below any TLS layer they are counted before
/// encryption), and chunks: messages that start with a magic number (the
/// greeting, each option or command request, each reply or reply chunk
/// in transmission; option replies are not counted, as in libnbd).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub chunks_sent: u64,
    pub chunks_received: u64,
}

/// A negotiated meta context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// One block status extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u64,
}

/// What a piece of a structured read reply said about its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStatus {
    /// Data was written into the buffer.
    Data,
    /// The range reads as zeroes; the buffer was zero-filled.
    Hole,
    /// The server reported this error for the range (or for the whole
    /// request when it gave no offset).
    Error { errno: i32 },
}

/// An output of the connection, taken with [`Connection::poll_event`].
#[derive(Debug)]
pub enum Event<B> {
    /// The server accepted STARTTLS. Every byte from now on must pass
    /// through TLS: run the TLS handshake below the NBD layer, then call
    /// [`Connection::handle_tls_established`].
    StartTls,
    /// The handshake finished: transmission may begin.
    Connected,
    /// An export named by `opt_list`.
    ExportListed { name: String, description: String },
    /// A meta context named by `opt_list_meta_context`.
    MetaContextListed { name: String },
    /// An `opt_*` command finished.
    OptionComplete { result: Result<(), Error> },
    /// A piece of a read with `report_chunks` landed in the buffer.
    ReadChunk { cookie: Cookie, offset: u64, length: u64, status: ChunkStatus },
    /// Block status for one meta context.
    Extents { cookie: Cookie, context_id: u32, offset: u64, extents: Vec<Extent> },
    /// A command finished; its buffer, if it had one, is handed back.
    Complete { cookie: Cookie, result: Result<(), Error>, buf: Option<B> },
}

/// How the server answered an option that turns on a reply format
/// (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_EXTENDED_HEADERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Accepted: the format is on.
    Negotiated,
    /// Refused, but the format was on already.
    AlreadyNegotiated,
    /// Refused, and the format is off.
    Unsupported,
}

/// A fact the handshake learned, for a caller that traces the connection
/// (see [`Connection::set_trace`]); taken with [`Connection::poll_note`].
/// Notes change nothing: the same facts drive the connection either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    StructuredReplies(OptionOutcome),
    ExtendedHeaders(OptionOutcome),
    /// The export's size and transmission flags, as the server sent them
    /// (before the flags are normalised).
    Export {
        size: u64,
        flags: u16,
    },
    /// Block size constraints as the server sent them; `accepted` is
    /// false when they made no sense and are ignored.
    BlockSize {
        block: BlockSize,
        accepted: bool,
    },
    /// A meta context the server named (SET or LIST), with its id.
    MetaContext {
        name: String,
        id: u32,
    },
    /// The server refused STARTTLS with `reply`; `continuing` when the
    /// automatic handshake goes on without TLS.
    TlsRefused {
        reply: u32,
        continuing: bool,
    },
    /// An oldstyle server's global flags (the high half of its flags field).
    OldstyleFlags(u16),
}

/// What a command buffer must offer. READ commands write into
/// `as_mut`; WRITE commands send from `as_ref`. A write-only buffer may
/// return an empty slice from `as_mut`.
pub trait CommandBuffer: AsRef<[u8]> + AsMut<[u8]> {}
impl<T: AsRef<[u8]> + AsMut<[u8]>> CommandBuffer for T {}

#[derive(Debug)]
pub(crate) enum State {
    Created,
    Connecting,
    Handshake(Handshake),
    Negotiating,
    Transmission,
    Dead,
    Closed,
}

/// What the handshake settled.
#[derive(Debug, Default)]
pub(crate) struct Negotiated {
    pub protocol: Option<Protocol>,
    pub fixed: bool,
    pub no_zeroes: bool,
    pub structured_replies: bool,
    pub extended_headers: bool,
    pub tls: bool,
    /// SET_META_CONTEXT completed (successfully or not) for this export.
    pub meta_valid: bool,
    pub meta_contexts: Vec<MetaContext>,
    pub export: ExportInfo,
}

/// A client connection to one NBD server.
///
/// The connection owns no socket. The caller moves bytes and the
/// connection says what they mean:
///
/// 1. Create it with [`Connection::new`], then call
///    [`Connection::handle_connected`] once a transport is up (optionally
///    [`Connection::start_connect`] first, while the transport connects).
/// 2. Loop until the state you want is reached:
///    - while [`Connection::poll_transmit`] yields slices, send them and
///      report the count with [`Connection::handle_sent`];
///    - when the transport is readable, receive into
///      [`Connection::recv_buffer`] and report the count with
///      [`Connection::handle_received`] (or [`Connection::handle_eof`],
///      [`Connection::handle_transport_error`]);
///    - drain [`Connection::poll_event`];
///    - [`Connection::direction`] says which of those to wait for.
/// 3. Submit commands (`read`, `write`, ... or the `opt_*` commands in opt
///    mode) at any time the state permits; they leave on the next
///    `poll_transmit` and complete through `poll_event`.
///
/// `B` is the type of the buffers lent with READ and WRITE commands: a
/// READ payload is received straight into it, a WRITE payload sent from it,
/// and it comes back in [`Event::Complete`].
#[derive(Debug)]
pub struct Connection<B> {
    config: Config,
    state: State,
    neg: Negotiated,
    plan: OptionPlan,
    input: Input,
    output: Output,
    events: VecDeque<Event<B>>,
    cmds: InFlight<B>,
    rx: Rx,
    /// `recv_buffer` handed out the caller's READ buffer.
    direct: bool,
    next_cookie: Cookie,
    disconnect_requested: bool,
    disconnect_sent: bool,
    /// Why the connection is dead.
    error: Option<Error>,
    milestones: Vec<Milestone>,
    stats: Stats,
    /// Notes are recorded only when the caller asked for them.
    trace: bool,
    notes: VecDeque<Note>,
}

impl<B: CommandBuffer> Connection<B> {
    pub fn new(config: Config) -> Self {
        Connection {
            config,
            state: State::Created,
            neg: Negotiated::default(),
            plan: OptionPlan::default(),
            input: Input::default(),
            output: Output::default(),
            events: VecDeque::new(),
            cmds: InFlight::default(),
            rx: Rx::Header,
            direct: false,
            next_cookie: 1,
            disconnect_requested: false,
            disconnect_sent: false,
            error: None,
            milestones: Vec::new(),
            stats: Stats::default(),
            trace: false,
            notes: VecDeque::new(),
        }
    }

    // ---- getters ----------------------------------------------------------

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Settings may change before connecting and, in opt mode, while
    /// negotiating.
    pub fn config_mut(&mut self) -> Result<&mut Config, Error> {
        match self.state {
            State::Created | State::Negotiating => Ok(&mut self.config),
            _ => Err(self.wrong_state("not yet connected, or negotiating")),
        }
    }

    /// Names the export to ask for (before connecting, or while
    /// negotiating). A different name forgets what the server said about
    /// the previous one (size, flags, block sizes, names, meta contexts),
    /// as libnbd does; the same name changes nothing.
    pub fn set_export_name(&mut self, name: &str) -> Result<(), Error> {
        let config = self.config_mut()?;
        if config.export_name() == name {
            return Ok(());
        }
        config.set_export_name(name)?;
        self.neg.export = Default::default();
        self.neg.meta_valid = false;
        Ok(())
    }

    /// Strictness may change at any time; it applies to later commands.
    pub fn set_strict_mode(&mut self, strict: crate::flags::StrictMode) {
        self.config.strict = strict;
    }

    pub fn state(&self) -> PublicState {
        match self.state {
            State::Created => PublicState::Created,
            State::Connecting | State::Handshake(_) => PublicState::Connecting,
            State::Negotiating => PublicState::Negotiating,
            State::Transmission if self.is_mid_exchange() => PublicState::Processing,
            State::Transmission => PublicState::Ready,
            State::Dead => PublicState::Dead,
            State::Closed => PublicState::Closed,
        }
    }

    /// Whether part of a reply (or of a handshake message) has arrived and
    /// the rest is awaited: more bytes are probably on their way.
    pub fn is_mid_message(&self) -> bool {
        !self.input.is_empty() || !matches!(self.rx, Rx::Header)
    }

    fn is_mid_exchange(&self) -> bool {
        !self.output.is_empty() || !self.input.is_empty() || !matches!(self.rx, Rx::Header)
    }

    /// What to wait for; derived from the state and pending output.
    pub fn direction(&self) -> Direction {
        let write = !self.output.is_empty();
        let read = match &self.state {
            State::Created | State::Dead | State::Closed => return Direction::None,
            State::Connecting => return Direction::Write,
            State::Handshake(Handshake::AwaitTls) => false,
            State::Handshake(_) => !write,
            State::Negotiating => false,
            State::Transmission => true,
        };
        match (read, write) {
            (true, true) => Direction::Both,
            (true, false) => Direction::Read,
            (false, true) => Direction::Write,
            (false, false) => Direction::None,
        }
    }

    /// Why the connection died, or why the server closed it, if it did.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    pub fn export(&self) -> &ExportInfo {
        &self.neg.export
    }

    pub fn protocol(&self) -> Option<Protocol> {
        self.neg.protocol
    }

    pub fn structured_replies_negotiated(&self) -> bool {
        self.neg.structured_replies
    }

    pub fn extended_headers_negotiated(&self) -> bool {
        self.neg.extended_headers
    }

    pub fn tls_negotiated(&self) -> bool {
        self.neg.tls
    }

    /// The negotiated meta contexts; `None` before SET_META_CONTEXT ran
    /// (libnbd reports that as an error from `nbd_can_meta_context`).
    pub fn meta_contexts(&self) -> Option<&[MetaContext]> {
        self.neg.meta_valid.then_some(&self.neg.meta_contexts[..])
    }

    pub fn meta_context_name(&self, id: u32) -> Option<&str> {
        self.neg.meta_contexts.iter().find(|m| m.id == id).map(|m| m.name.as_str())
    }

    /// Bytes and chunks sent and received so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Commands accepted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.cmds.len()
    }

    // ---- transport inputs ---------------------------------------------------

    /// The caller has started connecting a transport.
    pub fn start_connect(&mut self) -> Result<(), Error> {
        match self.state {
            State::Created => {
                self.state = State::Connecting;
                Ok(())
            }
            _ => Err(self.wrong_state("newly created")),
        }
    }

    /// No transport could be established, and the caller may try again:
    /// back to created (libnbd does this when no TCP address answers).
    pub fn handle_connect_failed(&mut self) {
        if matches!(self.state, State::Connecting) {
            self.state = State::Created;
        }
    }

    /// The transport is connected: the handshake begins.
    pub fn handle_connected(&mut self) -> Result<(), Error> {
        match self.state {
            State::Created | State::Connecting => {
                self.state = State::Handshake(Handshake::Greeting);
                Ok(())
            }
            _ => Err(self.wrong_state("newly created or connecting")),
        }
    }

    /// Where the next received bytes must go. Usually internal space; in
    /// the middle of a large READ payload, the caller's own buffer. Follow
    /// with [`Self::handle_received`].
    pub fn recv_buffer(&mut self) -> &mut [u8] {
        if let Some((slot, at, len)) = self.direct_target() {
            self.direct = true;
            let cmd = self.cmds.get_mut(slot);
            if let Some(buf) = cmd.buf.as_mut() {
                if let Some(dest) = buf.as_mut().get_mut(at..at + len) {
                    return dest;
                }
            }
        }
        self.direct = false;
        self.input.spare()
    }

    /// `n` bytes were written into the slice from [`Self::recv_buffer`].
    pub fn handle_received(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.stats.bytes_received += n as u64;
        if self.is_finished() {
            self.direct = false;
            self.input.clear();
            return;
        }
        if std::mem::take(&mut self.direct) {
            if let Err(e) = self.advance_direct(n) {
                self.fail(e);
                return;
            }
        } else {
            self.input.filled(n);
        }
        self.process_input();
    }

    /// Convenience for in-memory use: copies `bytes` in through
    /// [`Self::recv_buffer`] as many times as needed.
    pub fn receive(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.is_finished() {
            let dest = self.recv_buffer();
            let n = dest.len().min(bytes.len());
            if n == 0 {
                break;
            }
            dest[..n].copy_from_slice(&bytes[..n]);
            self.handle_received(n);
            bytes = &bytes[n..];
        }
    }

    /// The peer closed its side of the transport.
    pub fn handle_eof(&mut self) {
        match self.state {
            State::Transmission if self.disconnect_sent => {
                let leftover: Vec<usize> = self.cmds.live_slots();
                for slot in leftover {
                    self.cmds.get_mut(slot).record_error(TransportError::Eof("after NBD_CMD_DISC").into());
                    self.complete(slot);
                }
                self.close();
            }
            // Like libnbd, a server that hangs up between replies closes the
            // connection rather than breaking it; commands still waiting fail.
            State::Transmission if self.input.is_empty() && matches!(self.rx, Rx::Header) => {
                let err: Error = TransportError::Eof("between replies").into();
                for slot in self.cmds.live_slots() {
                    self.cmds.get_mut(slot).record_error(err.clone());
                    self.complete(slot);
                }
                self.error = Some(err);
                self.close();
            }
            State::Transmission => self.fail(TransportError::Eof("in the middle of a reply").into()),
            State::Handshake(Handshake::ExportNameReply) => self
                .fail(TransportError::Eof("after NBD_OPT_EXPORT_NAME (the export name was probably refused)").into()),
            State::Handshake(_) | State::Connecting | State::Negotiating => {
                self.fail(TransportError::Eof("during the handshake").into())
            }
            State::Created | State::Dead | State::Closed => {}
        }
    }

    /// The transport failed with `errno`; the connection is dead.
    pub fn handle_transport_error(&mut self, errno: i32, context: &str) {
        self.fail(TransportError::Io { errno, context: context.to_owned() }.into());
    }

    /// Fills `out` with the next slices to send, in order, and returns how
    /// many it filled. Send them (vectored) and report with
    /// [`Self::handle_sent`].
    pub fn poll_transmit<'a>(&'a self, out: &mut [&'a [u8]]) -> usize {
        let mut n = 0;
        for piece in self.output.pieces().take(out.len()) {
            out[n] = match piece {
                Piece::Encoded(range) => &self.output.encoded_bytes()[range],
                // A payload buffer that shrank under us would desynchronise
                // the stream; send nothing rather than read out of bounds.
                Piece::Payload { slot, range } => {
                    self.cmds.get(slot).buf.as_ref().and_then(|b| b.as_ref().get(range)).unwrap_or(&[])
                }
            };
            n += 1;
        }
        n
    }

    /// `n` bytes from [`Self::poll_transmit`] were sent.
    pub fn handle_sent(&mut self, n: usize) {
        self.stats.bytes_sent += n as u64;
        let mut passed = std::mem::take(&mut self.milestones);
        self.output.advance(n, &mut passed);
        for m in passed.drain(..) {
            match m {
                Milestone::Request { slot } => self.cmds.get_mut(slot).sent = true,
                Milestone::Disconnect => self.disconnect_sent = true,
                Milestone::Abort => self.close(),
            }
        }
        self.milestones = passed;
        self.maybe_closed();
    }

    /// The next output event.
    pub fn poll_event(&mut self) -> Option<Event<B>> {
        self.events.pop_front()
    }

    /// Whether to record [`Note`]s from now on (off by default, so that a
    /// caller that never takes them does not accumulate them). Turning it
    /// off drops the notes not yet taken.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on;
        if !on {
            self.notes.clear();
        }
    }

    /// The next fact the handshake learned, in the order it learned them.
    pub fn poll_note(&mut self) -> Option<Note> {
        self.notes.pop_front()
    }

    // ---- internals shared by the handshake and transmission halves --------

    /// Records a note if tracing; `note` is built only then.
    pub(crate) fn note(&mut self, note: impl FnOnce() -> Note) {
        if self.trace {
            self.notes.push_back(note());
        }
    }

    fn is_finished(&self) -> bool {
        matches!(self.state, State::Dead | State::Closed)
    }

    pub(crate) fn wrong_state(&self, required: &'static str) -> Error {
        LocalError::WrongState { state: self.state().name(), required }.into()
    }

    fn process_input(&mut self) {
        loop {
            let step = match self.state {
                State::Handshake(_) => self.step_handshake(),
                State::Transmission => self.step_reply(),
                State::Negotiating if !self.input.is_empty() => {
                    Err(ProtocolError::UnsolicitedData("while negotiating").into())
                }
                _ => Ok(false),
            };
            match step {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
        }
        self.maybe_closed();
    }

    /// The connection dies: every command and pending option fails with
    /// `err`, and nothing more is sent or parsed.
    pub(crate) fn fail(&mut self, err: Error) {
        if self.is_finished() {
            return;
        }
        if self.plan.user_goal_pending() {
            self.events.push_back(Event::OptionComplete { result: Err(err.clone()) });
        }
        let stranded = match &err {
            Error::Transport(t @ TransportError::Io { .. }) => TransportError::Lost(Box::new(t.clone())).into(),
            e => e.clone(),
        };
        for slot in self.cmds.live_slots() {
            self.cmds.get_mut(slot).record_error(stranded.clone());
            self.complete(slot);
        }
        self.state = State::Dead;
        self.error = Some(err);
        self.output.clear();
        self.input.clear();
        self.rx = Rx::Header;
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.output.clear();
        self.input.clear();
        self.rx = Rx::Header;
    }

    fn maybe_closed(&mut self) {
        if matches!(self.state, State::Transmission) && self.disconnect_sent && self.cmds.is_empty() {
            self.close();
        }
    }
}
