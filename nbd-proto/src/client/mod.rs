//! The NBD client connection: a state machine with no I/O of its own.

mod checks;
mod config;
mod handshake;
mod inflight;
pub(crate) mod input;
pub(crate) mod output;
mod reconnect;
mod transmission;

pub use config::Config;

use crate::error::{Error, LocalError, ProtocolError, TransportError};
use crate::flags::TransmissionFlags;
use handshake::{Handshake, OptionPlan};
use inflight::InFlight;
use input::Input;
use output::{Milestone, Output, Piece};
use reconnect::Resume;
use std::collections::VecDeque;
use transmission::Rx;

/// Entries an idle connection keeps room for in its queues (events,
/// milestones passed).
const IDLE_QUEUE: usize = 8;

/// Identifies a command from submission to completion. Cookies start at 1
/// and increase, as libnbd's do.
pub type Cookie = u64;

/// What the caller must wait for before driving the connection again,
/// from [`Connection::direction`]: the events to ask `poll(2)`, epoll or
/// an event loop for (libnbd's `nbd_aio_get_direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Nothing: the connection is not started, is finished (dead or
    /// closed), or waits for the caller (an `opt_*` command, the TLS
    /// handshake below it).
    None,
    /// Wait until the transport is readable, then receive.
    Read,
    /// Wait until the transport is writable, then send what
    /// [`Connection::poll_transmit`] yields (or, while connecting, until
    /// the connect finished).
    Write,
    /// Wait for either: output is pending and replies may arrive.
    Both,
}

impl Direction {
    /// The direction for wanting to read and/or to write.
    pub(crate) fn from_interest(read: bool, write: bool) -> Direction {
        match (read, write) {
            (true, true) => Direction::Both,
            (true, false) => Direction::Read,
            (false, true) => Direction::Write,
            (false, false) => Direction::None,
        }
    }

    /// Whether to wait for the transport to become readable.
    pub fn wants_read(self) -> bool {
        matches!(self, Direction::Read | Direction::Both)
    }
    /// Whether to wait for the transport to become writable.
    pub fn wants_write(self) -> bool {
        matches!(self, Direction::Write | Direction::Both)
    }
}

/// The states a libnbd user can observe (`nbd_aio_is_*`), from
/// [`Connection::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicState {
    /// Nothing started yet: settings may change.
    Created,
    /// The transport is connecting, or the handshake is under way.
    Connecting,
    /// Opt mode ([`Config::opt_mode`]): the handshake waits for the
    /// caller's `opt_*` commands.
    Negotiating,
    /// Transmission, with nothing half sent or half received: commands
    /// may be submitted.
    Ready,
    /// Transmission, in the middle of sending requests or receiving
    /// replies; commands may still be submitted.
    Processing,
    /// The connection failed; [`Connection::error`] says why. Nothing
    /// more happens on it.
    Dead,
    /// The connection ended cleanly (disconnect, `NBD_OPT_ABORT`, or the
    /// server hung up between replies).
    Closed,
}

impl PublicState {
    /// The state's name in lower case ("ready", "dead", ...), as the C
    /// layer prints it in messages.
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

/// The handshake style the server used, from [`Connection::protocol`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The oldstyle handshake: the server sends size and flags at once;
    /// no options, one export.
    Oldstyle,
    /// Newstyle without `NBD_FLAG_FIXED_NEWSTYLE`: the only option is
    /// `NBD_OPT_EXPORT_NAME`.
    Newstyle,
    /// Fixed newstyle: every option is available (what modern servers
    /// speak).
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

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`, in bytes. Kept only
/// when they make sense: powers of two, minimum at most 64 KiB,
/// minimum ≤ preferred ≤ maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Offsets and lengths must be multiples of this
    /// ([`StrictMode::ALIGN`](crate::StrictMode::ALIGN) enforces it).
    pub minimum: u32,
    /// The size the server handles best.
    pub preferred: u32,
    /// The largest request the server accepts; `u32::MAX` for no limit.
    pub maximum: u32,
}

/// What the server said about the export during the handshake, from
/// [`Connection::export`]. Forgotten when another export is named or the
/// server refuses the one asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's size in bytes; `None` until the server sent it.
    pub size: Option<u64>,
    /// The export's transmission flags, normalised as libnbd does (see
    /// [`TransmissionFlags`]).
    pub flags: TransmissionFlags,
    /// The block size constraints, if the server sent sensible ones.
    pub block_size: Option<BlockSize>,
    /// The export's canonical name (`NBD_INFO_NAME`), if asked for with
    /// [`Config::full_info`] and sent.
    pub canonical_name: Option<String>,
    /// The export's description (`NBD_INFO_DESCRIPTION`), if asked for
    /// with [`Config::full_info`] and sent.
    pub description: Option<String>,
}

/// Traffic counters, as libnbd's `nbd_stats_*` report them: plaintext
/// bytes of the NBD stream (below any TLS layer they are counted before
/// encryption), and chunks: messages that start with a magic number (the
/// greeting, each option or command request, each reply or reply chunk
/// in transmission; option replies are not counted, as in libnbd).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes the caller reported sent ([`Connection::handle_sent`]).
    pub bytes_sent: u64,
    /// Bytes the caller reported received ([`Connection::handle_received`]).
    pub bytes_received: u64,
    /// Messages sent: option requests and command requests.
    pub chunks_sent: u64,
    /// Messages received: the greeting, and each reply or reply chunk in
    /// transmission.
    pub chunks_received: u64,
}

/// A meta context selected with `NBD_OPT_SET_META_CONTEXT`, whose block
/// status [`Connection::block_status`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The server's id for the context, which block status replies carry
    /// ([`Event::Extents`]'s `context_id`).
    pub id: u32,
    /// The context's name, such as `base:allocation`.
    pub name: String,
}

/// One block status extent: a run of bytes that share the same status in
/// one meta context. Consecutive extents of an [`Event::Extents`] follow
/// each other from its `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes the extent covers.
    pub length: u64,
    /// Status flags, whose meaning the meta context defines; for
    /// `base:allocation`, bit 0 is `NBD_STATE_HOLE` (unallocated) and bit
    /// 1 `NBD_STATE_ZERO` (reads as zeroes).
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
    Error {
        /// The local errno for the server's `NBD_E*` value.
        errno: i32,
    },
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
    /// An export named by [`Connection::opt_list`] (`NBD_REP_SERVER`).
    ExportListed {
        /// The export's name, to pass to [`Connection::set_export_name`].
        name: String,
        /// The server's description of it, possibly empty.
        description: String,
    },
    /// A meta context named by [`Connection::opt_list_meta_context`], or
    /// selected by [`Connection::opt_set_meta_context`].
    MetaContextListed {
        /// The context's name, such as `base:allocation`.
        name: String,
    },
    /// An `opt_*` command finished (once per command, after any
    /// [`Event::ExportListed`] or [`Event::MetaContextListed`] it caused).
    OptionComplete {
        /// `Ok` on success, else why it failed (typically
        /// [`ServerError::OptionRefused`](crate::ServerError::OptionRefused)).
        result: Result<(), Error>,
    },
    /// A piece of a read submitted with [`Connection::read_structured`]
    /// landed in the buffer (one per data chunk, hole chunk, or error
    /// chunk with an offset), before the read's [`Event::Complete`].
    ReadChunk {
        /// The read it belongs to.
        cookie: Cookie,
        /// Export offset of the piece, in bytes.
        offset: u64,
        /// Its length in bytes (0 for an error).
        length: u64,
        /// What the server said about it.
        status: ChunkStatus,
    },
    /// Block status for one meta context, in answer to
    /// [`Connection::block_status`]; one event per context, before the
    /// command's [`Event::Complete`].
    Extents {
        /// The block status command it answers.
        cookie: Cookie,
        /// Which meta context ([`MetaContext::id`]); see
        /// [`Connection::meta_context_name`].
        context_id: u32,
        /// Export offset where the first extent starts: the request's.
        offset: u64,
        /// Consecutive extents from `offset`; the last may reach past the
        /// end of the request.
        extents: Vec<Extent>,
    },
    /// A command finished; its buffer, if it had one, is handed back.
    /// Every accepted command gets exactly one, even when the connection
    /// dies under it.
    Complete {
        /// The command, as its submitting method returned it.
        cookie: Cookie,
        /// `Ok` on success; else the server's error, or why the
        /// connection could not carry the command.
        result: Result<(), Error>,
        /// The READ or WRITE buffer lent with the command (a READ's holds
        /// the data on success); `None` for the other commands.
        buf: Option<B>,
    },
    /// The transport failed and the connection keeps its commands
    /// ([`Config::keep_commands_on_loss`]): it is lost until
    /// [`Connection::restart`] brings it back. Also after each restart
    /// whose transport fails before the handshake ends.
    TransportLost {
        /// How the transport failed.
        error: Error,
    },
    /// A restart's handshake ended with the export the connection had:
    /// every kept command was queued again.
    Reconnected,
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
    /// How the server answered `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReplies(OptionOutcome),
    /// How the server answered `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders(OptionOutcome),
    /// The export's size and transmission flags, as the server sent them
    /// (before the flags are normalised).
    Export {
        /// Size in bytes.
        size: u64,
        /// Raw `NBD_FLAG_*` bits.
        flags: u16,
    },
    /// Block size constraints as the server sent them.
    BlockSize {
        /// The constraints, in bytes.
        block: BlockSize,
        /// False when they made no sense and are ignored.
        accepted: bool,
    },
    /// A meta context the server named (SET or LIST), with its id.
    MetaContext {
        /// The context's name.
        name: String,
        /// The server's id for it.
        id: u32,
    },
    /// The server refused STARTTLS.
    TlsRefused {
        /// The error reply ([`rep`](crate::wire::rep)`::ERR_*`).
        reply: u32,
        /// True when the automatic handshake goes on without TLS
        /// ([`TlsMode::Allow`](crate::TlsMode::Allow)).
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
    /// The transport failed; commands are kept ([`reconnect`]).
    Lost,
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
///
/// The [crate-level documentation](crate) has the calling order in more
/// detail and an example that drives a connection end to end.
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
    /// Set from a transport loss that keeps the commands until the
    /// connection is back ([`reconnect`]).
    resume: Option<Box<Resume>>,
}

impl<B: CommandBuffer> Connection<B> {
    /// A connection in the [`PublicState::Created`] state, with `config`'s
    /// settings. Nothing happens until [`Self::handle_connected`].
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
            resume: None,
        }
    }

    // ---- getters ----------------------------------------------------------

    /// The current settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The settings, to change. Settings may change before connecting and,
    /// in opt mode, while negotiating; otherwise this fails with
    /// [`LocalError::WrongState`].
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

    /// The state as libnbd's `nbd_aio_is_*` functions report it.
    pub fn state(&self) -> PublicState {
        // Lost, or re-running its handshake: to the caller it is still
        // connected, holding its commands.
        if self.resume.is_some() {
            return if self.cmds.is_empty() { PublicState::Ready } else { PublicState::Processing };
        }
        match self.state {
            State::Created => PublicState::Created,
            State::Connecting | State::Handshake(_) => PublicState::Connecting,
            State::Negotiating => PublicState::Negotiating,
            State::Transmission if self.is_mid_exchange() => PublicState::Processing,
            State::Transmission => PublicState::Ready,
            // Only with `resume` set, answered above.
            State::Lost => PublicState::Processing,
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

    /// What to wait for; derived from the state and pending output only,
    /// so it changes only through calls on the connection: ask again after
    /// each. While handshaking the connection waits to read only once its
    /// output has left; in transmission it always reads (replies and
    /// requests may cross), and writes while output is pending.
    pub fn direction(&self) -> Direction {
        let write = !self.output.is_empty();
        let read = match &self.state {
            State::Created | State::Lost | State::Dead | State::Closed => return Direction::None,
            State::Connecting => return Direction::Write,
            State::Handshake(Handshake::AwaitTls) => false,
            State::Handshake(_) => !write,
            State::Negotiating => false,
            State::Transmission => true,
        };
        Direction::from_interest(read, write)
    }

    /// Why the connection died, or why the server closed it, if it did.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// What the server said about the export (size, flags, block sizes,
    /// names); complete once [`Event::Connected`] (or, in opt mode, a
    /// successful `opt_info`) has been reported.
    pub fn export(&self) -> &ExportInfo {
        &self.negotiated().export
    }

    /// What the handshake settled; while lost, what the one before the
    /// loss settled.
    pub(crate) fn negotiated(&self) -> &Negotiated {
        self.resume.as_ref().map_or(&self.neg, |r| &r.neg)
    }

    /// The handshake style, once the greeting has arrived.
    pub fn protocol(&self) -> Option<Protocol> {
        self.neg.protocol
    }

    /// Whether the server agreed to structured replies (directly, or
    /// through extended headers).
    pub fn structured_replies_negotiated(&self) -> bool {
        self.negotiated().structured_replies
    }

    /// Whether the server agreed to extended headers (64-bit lengths).
    pub fn extended_headers_negotiated(&self) -> bool {
        self.negotiated().extended_headers
    }

    /// Whether the connection runs over TLS:
    /// [`Self::handle_tls_established`] was called after the server
    /// accepted STARTTLS.
    pub fn tls_negotiated(&self) -> bool {
        self.negotiated().tls
    }

    /// The negotiated meta contexts; `None` before SET_META_CONTEXT ran
    /// (libnbd reports that as an error from `nbd_can_meta_context`).
    pub fn meta_contexts(&self) -> Option<&[MetaContext]> {
        let neg = self.negotiated();
        neg.meta_valid.then_some(&neg.meta_contexts[..])
    }

    /// The name of the negotiated meta context with this id (as
    /// [`Event::Extents`] carries it), or `None` if there is none.
    pub fn meta_context_name(&self, id: u32) -> Option<&str> {
        self.negotiated().meta_contexts.iter().find(|m| m.id == id).map(|m| m.name.as_str())
    }

    /// Bytes and chunks sent and received so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Commands accepted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.cmds.len()
    }

    /// The receive buffer's size in bytes now. It is allocated at the
    /// first receive, sized to the replies in flight (1 KiB to 64 KiB),
    /// doubles when a receive fills it, grows further only for a single
    /// larger message, and is given back when the connection is idle (no
    /// command in flight, nothing buffered) if it grew past 8 KiB.
    pub fn recv_capacity(&self) -> usize {
        self.input.capacity()
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
        if self.is_restarting() {
            self.state = State::Lost;
            return;
        }
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
        let expected = self.cmds.expected();
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
        self.input.spare(expected)
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
        self.shrink_if_idle();
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

    /// The peer closed its side of the transport (a receive returned 0
    /// bytes). After `NBD_CMD_DISC`, or between replies, the connection
    /// closes ([`PublicState::Closed`]) and commands still waiting fail
    /// with [`TransportError::Eof`]; in the middle of a reply or of the
    /// handshake it dies ([`PublicState::Dead`]).
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
                if self.keeps_commands_on(&err) {
                    self.lose(err);
                    return;
                }
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
            State::Created | State::Lost | State::Dead | State::Closed => {}
        }
    }

    /// The transport failed with `errno` (0 if the failing layer has no
    /// errno); `context` names what failed, for the message ("recv",
    /// "send", ...). The connection is dead: [`Self::error`] reports
    /// [`TransportError::Io`], and every command in flight completes with
    /// [`TransportError::Lost`].
    pub fn handle_transport_error(&mut self, errno: i32, context: &str) {
        self.fail(TransportError::Io { errno, context: context.to_owned() }.into());
    }

    /// Fills `out` with the next slices to send, in order, and returns how
    /// many it filled (0: nothing to send). Send them (vectored) and report
    /// the bytes that left with [`Self::handle_sent`], then ask again: more
    /// may be pending than `out` has room for. The slices borrow the
    /// connection's encoded headers and the WRITE buffers lent to it.
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

    /// `n` bytes from [`Self::poll_transmit`] were sent; `n` may be less
    /// than what it offered (a partial write). A request counts as sent,
    /// and its reply as expected, once its last byte has left.
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

    /// The next output event, oldest first; `None` when there is none.
    /// Events come from the `handle_*` inputs and from a few other calls
    /// ([`Self::abandon_unsent`], [`Self::opt_abort`], ...): drain them
    /// after each.
    pub fn poll_event(&mut self) -> Option<Event<B>> {
        let event = self.events.pop_front();
        if event.is_none() && self.events.capacity() > IDLE_QUEUE && self.cmds.is_empty() {
            self.events.shrink_to(IDLE_QUEUE);
        }
        event
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
        if self.keeps_commands_on(&err) && !self.is_finished() {
            self.lose(err);
            return;
        }
        self.die(err);
    }

    /// The transport failed with `errno` and the caller wants the
    /// connection over whatever it keeps (another connection of the same
    /// handle saw another export, say): dead, every command failed, as
    /// [`Self::handle_transport_error`] without
    /// [`Config::keep_commands_on_loss`].
    pub fn handle_fatal_error(&mut self, errno: i32, context: &str) {
        self.die(TransportError::Io { errno, context: context.to_owned() }.into());
    }

    /// The sender the caller runs outside this loop (a writer on another
    /// thread, handed the bytes of [`Self::poll_transmit`]) failed with
    /// `errno`: the connection dies, and every command in flight fails
    /// with `errno` itself, since that is what lost their bytes, not
    /// with `ENOTCONN` as after [`Self::handle_transport_error`].
    pub fn handle_sender_error(&mut self, errno: i32, context: &str) {
        self.die(TransportError::SenderFailed { errno, context: context.to_owned() }.into());
    }

    /// Dead with `err`: every command fails, a lost connection's kept ones
    /// too.
    fn die(&mut self, err: Error) {
        if self.is_finished() {
            return;
        }
        self.resume = None;
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

    pub(crate) fn close(&mut self) {
        self.state = State::Closed;
        self.output.clear();
        self.input.clear();
        self.rx = Rx::Header;
    }

    /// An idle connection (no command in flight, no reply half parsed)
    /// gives back what a burst of commands made its buffers grow to.
    fn shrink_if_idle(&mut self) {
        if self.cmds.is_empty() && matches!(self.rx, Rx::Header) {
            self.input.shrink_idle();
            self.output.shrink_idle();
            self.cmds.shrink_idle();
            self.milestones.shrink_to(IDLE_QUEUE);
        }
    }

    fn maybe_closed(&mut self) {
        if matches!(self.state, State::Transmission) && self.disconnect_sent && self.cmds.is_empty() {
            self.close();
        }
    }
}
