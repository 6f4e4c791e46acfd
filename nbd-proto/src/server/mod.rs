//! The NBD server role: a state machine with no I/O of its own, the
//! client role's mirror.
//!
//! Client bytes go in, requests come out as events; replies go in as
//! calls, bytes come out to send. Every value the client sends is
//! validated before use: a violation gets the error reply the protocol
//! prescribes or, where none can express it, a clean hard disconnect
//! ([`Phase::Dead`] with a [`ClientError`]); never a
//! panic or an allocation the client chose.
//!
//! # Driving a connection
//!
//! 1. **Create** a [`Connection`] with a [`Config`] naming the exports it
//!    offers, once the transport is accepted. The greeting is queued at
//!    once.
//! 2. **Loop** until [`Connection::phase`] is [`Phase::Closed`] or
//!    [`Phase::Dead`], then close the transport:
//!    - *Output*: while [`Connection::poll_transmit`] fills slices, send
//!      them and report the bytes that left with
//!      [`Connection::handle_sent`] (a partial send is fine).
//!    - *Input*: when [`Connection::direction`] wants to read and the
//!      transport is readable, receive into [`Connection::recv_buffer`]
//!      and report the count with [`Connection::handle_received`]; report
//!      end of stream with [`Connection::handle_eof`] and a failed
//!      transport with [`Connection::handle_transport_error`]. Ask for
//!      `recv_buffer` again before every receive: in the middle of a large
//!      WRITE it is the caller's own buffer.
//!    - *Events*: after any call, drain [`Connection::poll_event`].
//! 3. **Handshake**: the options are answered inside the core. With TLS
//!    allowed ([`TlsPolicy`]), [`Event::StartTls`] asks the caller to run
//!    the TLS handshake below the NBD stream (once the acknowledgement has
//!    left) and then call [`Connection::handle_tls_established`].
//!    [`Event::ExportSelected`] says that transmission begins, and with
//!    which export.
//! 4. **Requests**: each [`Event::Request`] is answered with exactly one
//!    of [`Connection::reply_ok`], [`Connection::reply_read`] /
//!    [`Connection::reply_read_chunks`], [`Connection::reply_block_status`]
//!    or [`Connection::reply_error`], in any order and at any later time
//!    (requests may be served concurrently). A WRITE first needs a buffer:
//!    [`Connection::receive_write`] lends one of the request's length, the
//!    payload is received into it, and [`Event::WriteData`] hands it back
//!    full; until then the core reads nothing more, which is also how a
//!    caller throttles a client. READ data is sent from the caller's buffers,
//!    which come back in [`Event::BufferReturned`] once sent.
//!    [`Config::max_in_flight`] bounds how many requests the core hands out
//!    before it stops reading.
//! 5. **End**: `NBD_CMD_DISC` (or `NBD_OPT_ABORT`) gives
//!    [`Event::Disconnect`] and [`Phase::Closing`]: the replies still owed
//!    go out, then the phase is [`Phase::Closed`].
//!
//! The server never speaks oldstyle: its greeting is always fixed newstyle
//! with `NO_ZEROES`, so an oldstyle-only client gives up on it by itself.

mod handshake;
mod output;
mod transmission;

use crate::client::input::Input;
pub use crate::client::{BlockSize, Direction, Extent, MetaContext};
use crate::error::{ClientError, Error, LocalError, TransportError};
use crate::flags::{CmdFlags, HandshakeFlags, TransmissionFlags};
use crate::wire::{payload, RequestHeader};
use output::{Mark, Output, Passed};
use std::collections::{HashMap, VecDeque};

/// Identifies a request from its [`Event::Request`] to its reply. Ids are
/// the core's own (from 1, increasing), so a client that reuses a cookie
/// while it is in flight cannot confuse two requests.
pub type RequestId = u64;

/// The meta context id `base:allocation` gets when a client selects it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The meta context the core offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The block size constraints of an export that states none: any
/// alignment, 4 KiB preferred, at most 32 MiB per READ or WRITE.
pub const DEFAULT_BLOCK_SIZE: BlockSize = BlockSize { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };

/// No READ or WRITE longer than this is accepted, whatever the export
/// says: the caller allocates a buffer of the requested length.
pub const MAX_PAYLOAD: u32 = 64 * 1024 * 1024;

/// Option payloads longer than this are skipped without being buffered
/// and answered with `NBD_REP_ERR_TOO_BIG`. The longest legitimate one is
/// a meta context request with a few names of at most 4 KiB.
pub const MAX_OPTION_LENGTH: u32 = 64 * 1024;

/// One export the server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The name clients ask for. The empty name asks for the default
    /// export: an export named "" if there is one, else the first.
    pub name: String,
    /// A description for people (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// What the export supports: `READ_ONLY`, `SEND_FLUSH`, `SEND_FUA`,
    /// `ROTATIONAL`, `SEND_TRIM`, `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO`,
    /// `CAN_MULTI_CONN`, `SEND_CACHE`. The core adds `HAS_FLAGS`, and
    /// `SEND_DF` and `BLOCK_STAT_PAYLOAD` when what they need was
    /// negotiated; it drops the rest.
    pub flags: TransmissionFlags,
    /// Block size constraints; [`DEFAULT_BLOCK_SIZE`] if `None`. They are
    /// advertised with every `NBD_OPT_INFO` / `NBD_OPT_GO` and enforced
    /// (unaligned requests, and READ or WRITE above the maximum, get
    /// `NBD_EINVAL`); the maximum is capped at [`MAX_PAYLOAD`].
    pub block_size: Option<BlockSize>,
    /// Whether clients may select `base:allocation` for this export
    /// (block status).
    pub base_allocation: bool,
}

impl Export {
    /// A writable export with flush, FUA, trim, write zeroes (fast zero
    /// too), cache and `base:allocation`, default block sizes.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            size,
            flags: TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_FAST_ZERO
                | TransmissionFlags::SEND_CACHE,
            block_size: None,
            base_allocation: true,
        }
    }

    /// The constraints in force: the export's, or the defaults, with the
    /// maximum capped at [`MAX_PAYLOAD`].
    pub fn effective_block_size(&self) -> BlockSize {
        let b = self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        BlockSize { maximum: b.maximum.min(MAX_PAYLOAD), ..b }
    }
}

/// Whether the server offers TLS (the TLS layer itself is the caller's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// The client may upgrade to TLS, or carry on in plaintext.
    Allow,
    /// Every option but STARTTLS and ABORT is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up; `NBD_OPT_EXPORT_NAME`
    /// without TLS ends the session.
    Require,
}

/// What a server connection offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The exports, in the order `NBD_OPT_LIST` gives them.
    pub exports: Vec<Export>,
    /// TLS policy.
    pub tls: TlsPolicy,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` is accepted (else refused with
    /// `NBD_REP_ERR_UNSUP`, and meta contexts with it).
    pub structured_replies: bool,
    /// Whether `NBD_OPT_EXTENDED_HEADERS` is accepted.
    pub extended_headers: bool,
    /// How many requests may await their replies before the core stops
    /// parsing (and [`Connection::direction`] stops asking to read).
    pub max_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            exports: Vec::new(),
            tls: TlsPolicy::Off,
            structured_replies: true,
            extended_headers: true,
            max_in_flight: 64,
        }
    }
}

/// A transmission command, as [`Request::command`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`: answer with [`Connection::reply_read`] or
    /// [`Connection::reply_read_chunks`].
    Read,
    /// `NBD_CMD_WRITE`: lend a buffer with [`Connection::receive_write`],
    /// wait for [`Event::WriteData`], then reply.
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` ([`CmdFlags::NO_HOLE`] and
    /// [`CmdFlags::FAST_ZERO`] say how; a fast zero that cannot be fast
    /// fails with `NBD_ENOTSUP`).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`: answer with
    /// [`Connection::reply_block_status`] for every id in
    /// [`Request::contexts`].
    BlockStatus,
}

/// A validated request: in bounds, aligned, with only the flags the
/// command takes and the export advertised, on a command the export
/// offers. `offset + length` never overflows and never passes the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Names the request in the reply calls.
    pub id: RequestId,
    /// The client's cookie (echoed in the reply by the core).
    pub cookie: u64,
    /// What to do.
    pub command: Command,
    /// The command flags (`FUA`, `NO_HOLE`, `DF`, `REQ_ONE`, `FAST_ZERO`;
    /// `PAYLOAD_LEN` is consumed by the core).
    pub flags: CmdFlags,
    /// Export offset in bytes.
    pub offset: u64,
    /// Length in bytes (for BLOCK_STATUS, the effect length).
    pub length: u64,
    /// For BLOCK_STATUS, the meta context ids to report, each once: those
    /// the client selected, or the subset its request named. Empty for
    /// other commands.
    pub contexts: Vec<u32>,
}

/// One piece of a READ reply given to [`Connection::reply_read_chunks`].
#[derive(Debug)]
pub enum ReadChunk<B> {
    /// `buf` holds the export's bytes from `offset`.
    Data {
        /// Export offset of the first byte.
        offset: u64,
        /// The bytes, sent from this buffer and handed back afterwards.
        buf: B,
    },
    /// `length` bytes from `offset` read as zeroes.
    Hole {
        /// Export offset.
        offset: u64,
        /// Length in bytes.
        length: u64,
    },
}

/// An output of the connection, taken with [`Connection::poll_event`].
#[derive(Debug)]
pub enum Event<B> {
    /// The client's STARTTLS was accepted and the acknowledgement has
    /// left: run the TLS handshake below the NBD stream now, then call
    /// [`Connection::handle_tls_established`].
    StartTls,
    /// The handshake is over: transmission begins on
    /// `Config::exports[export]`.
    ExportSelected {
        /// Index into [`Config::exports`].
        export: usize,
    },
    /// A request to serve.
    Request(Request),
    /// The payload of a WRITE arrived in the buffer lent with
    /// [`Connection::receive_write`]; serve the write, then reply.
    WriteData {
        /// The WRITE request.
        id: RequestId,
        /// The buffer, holding exactly the payload.
        buf: B,
    },
    /// A buffer lent with a reply (or with [`Connection::receive_write`])
    /// is no longer needed: its bytes left, or the connection ended.
    /// Every lent buffer comes back exactly once, through this event or
    /// [`Event::WriteData`].
    BufferReturned {
        /// The request it was lent for.
        id: RequestId,
        /// The buffer.
        buf: B,
    },
    /// The client asked to end the session (`NBD_CMD_DISC` or
    /// `NBD_OPT_ABORT`): reply to the requests still in flight; the phase
    /// becomes [`Phase::Closed`] once those replies have left.
    Disconnect,
}

/// Where the connection is, from [`Connection::phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Greeting and option haggling.
    Handshake,
    /// Serving requests.
    Transmission,
    /// The client asked to disconnect: replies still owed are being sent;
    /// nothing more is read.
    Closing,
    /// The session ended cleanly (or the client hung up between
    /// messages): close the transport.
    Closed,
    /// The session failed; [`Connection::error`] says why. Close the
    /// transport.
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    ClientFlags,
    Options,
    AwaitTls,
    Transmission,
    Closing,
    Closed,
    Dead,
}

/// Where the request parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Waiting for a request header (or, in the handshake, an option).
    Header,
    /// A WRITE was handed out; its payload waits for the caller's buffer.
    AwaitBuffer { id: RequestId },
    /// WRITE payload bytes going into the lent buffer, `at` of `len` done.
    Payload { id: RequestId, at: usize, len: usize },
    /// Bytes of a refused option or request still to skip.
    Skip { remaining: u64 },
}

/// A request handed out and not yet answered.
#[derive(Debug, Clone)]
struct Pending {
    cookie: u64,
    command: Command,
    flags: CmdFlags,
    offset: u64,
    length: u64,
    contexts: Vec<u32>,
}

/// What the handshake settled.
#[derive(Debug, Default)]
struct Negotiated {
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    tls: bool,
    /// Selected by the last SET_META_CONTEXT, for the export at the index.
    meta: Vec<MetaContext>,
    meta_export: Option<usize>,
    /// The export in transmission and the flags advertised for it.
    export: Option<usize>,
    flags: TransmissionFlags,
}

/// Receive WRITE payloads at least this large straight into the caller's
/// buffer; smaller ones are batched through the internal buffer (one
/// receive, many requests) and copied.
const DIRECT_MIN: usize = 32 * 1024;

/// A server connection to one NBD client. See the [module
/// documentation](self) for the calling order.
///
/// `B` is the type of the buffers the caller lends: WRITE payloads are
/// received into them and READ replies sent from them.
#[derive(Debug)]
pub struct Connection<B> {
    config: Config,
    st: St,
    rx: Rx,
    neg: Negotiated,
    input: Input,
    out: Output<B>,
    events: VecDeque<Event<B>>,
    pending: HashMap<RequestId, Pending>,
    next_id: RequestId,
    /// The buffer a WRITE payload is being received into.
    write_buf: Option<B>,
    /// `recv_buffer` handed out `write_buf`.
    direct: bool,
    error: Option<Error>,
    passed: Vec<Passed<B>>,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Connection<B> {
    /// A connection whose greeting (fixed newstyle, `NO_ZEROES`) is queued
    /// to send.
    pub fn new(config: Config) -> Self {
        let mut out = Output::default();
        let flags = (HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES).bits() as u16;
        out.encode(|b| payload::encode_newstyle_greeting(flags, b));
        Connection {
            config,
            st: St::ClientFlags,
            rx: Rx::Header,
            neg: Negotiated::default(),
            input: Input::default(),
            out,
            events: VecDeque::new(),
            pending: HashMap::new(),
            next_id: 1,
            write_buf: None,
            direct: false,
            error: None,
            passed: Vec::new(),
        }
    }

    // ---- getters ----------------------------------------------------------

    /// The settings it was created with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the connection is.
    pub fn phase(&self) -> Phase {
        match self.st {
            St::ClientFlags | St::Options | St::AwaitTls => Phase::Handshake,
            St::Transmission => Phase::Transmission,
            St::Closing => Phase::Closing,
            St::Closed => Phase::Closed,
            St::Dead => Phase::Dead,
        }
    }

    /// Why the connection died, if it did.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// The index in [`Config::exports`] of the export in transmission.
    pub fn export(&self) -> Option<usize> {
        self.neg.export
    }

    /// The transmission flags sent to the client for the export in
    /// transmission (empty before).
    pub fn transmission_flags(&self) -> TransmissionFlags {
        self.neg.flags
    }

    /// Whether structured replies were negotiated (directly or through
    /// extended headers).
    pub fn structured_replies(&self) -> bool {
        self.neg.structured
    }

    /// Whether extended headers were negotiated.
    pub fn extended_headers(&self) -> bool {
        self.neg.extended
    }

    /// Whether TLS is up ([`Self::handle_tls_established`] was called).
    pub fn tls_active(&self) -> bool {
        self.neg.tls
    }

    /// Whether the client agreed to fixed newstyle.
    pub fn fixed_newstyle(&self) -> bool {
        self.neg.fixed
    }

    /// The meta contexts the client selected (for the export in
    /// transmission once there is one).
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.neg.meta
    }

    /// Requests handed out and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Bytes queued to send, including lent buffers: what a caller that
    /// bounds its memory per connection watches.
    pub fn pending_output(&self) -> u64 {
        self.out.pending()
    }

    /// Whether part of a message (an option, a request or its payload)
    /// has arrived and the rest is awaited.
    pub fn is_mid_message(&self) -> bool {
        !self.input.is_empty() || matches!(self.rx, Rx::Payload { .. } | Rx::Skip { .. })
    }

    /// What to wait for: writable while output is pending; readable while
    /// the core can take more input (not while it waits for TLS, for a
    /// WRITE buffer, or at [`Config::max_in_flight`]; never once the client
    /// asked to disconnect). It changes only through calls on the
    /// connection: ask again after each.
    pub fn direction(&self) -> Direction {
        let read = match self.st {
            St::ClientFlags | St::Options => true,
            St::Transmission => self.accepting_requests(),
            St::AwaitTls | St::Closing => false,
            St::Closed | St::Dead => return Direction::None,
        };
        Direction::from_interest(read, self.out.has_bytes())
    }

    fn accepting_requests(&self) -> bool {
        match self.rx {
            Rx::AwaitBuffer { .. } => false,
            Rx::Header => self.pending.len() < self.config.max_in_flight.max(1),
            Rx::Payload { .. } | Rx::Skip { .. } => true,
        }
    }

    // ---- transport inputs ---------------------------------------------------

    /// Where the next received bytes must go: internal space, or in the
    /// middle of a large WRITE payload, the buffer lent for it. Follow
    /// with [`Self::handle_received`]. Receive only while
    /// [`Self::direction`] wants to read: otherwise the slice may be empty.
    pub fn recv_buffer(&mut self) -> &mut [u8] {
        self.direct = false;
        if let Rx::Payload { at, len, .. } = self.rx {
            if self.input.is_empty() && len - at >= DIRECT_MIN {
                if let Some(buf) = self.write_buf.as_mut() {
                    self.direct = true;
                    return &mut buf.as_mut()[at..len];
                }
            }
        }
        // No size to predict from: requests arrive as the client pleases.
        // The buffer starts small and doubles after each receive that
        // fills it, so an idle connection stays cheap and a pipelining
        // client soon gets room for many headers at once.
        self.input.spare(0)
    }

    /// `n` bytes were written into the slice from [`Self::recv_buffer`].
    pub fn handle_received(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if matches!(self.st, St::Closed | St::Dead | St::Closing) {
            // Nothing more is parsed; what the client sends is dropped.
            self.direct = false;
            self.input.clear();
            return;
        }
        if std::mem::take(&mut self.direct) {
            if let Rx::Payload { id, at, len } = self.rx {
                self.rx = Rx::Payload { id, at: (at + n).min(len), len };
            }
        } else {
            self.input.filled(n);
        }
        self.process_input();
    }

    /// Convenience for in-memory use: copies `bytes` in through
    /// [`Self::recv_buffer`] while the connection takes input; returns how
    /// many it took.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let mut done = 0;
        while done < bytes.len() && self.direction().wants_read() {
            let dest = self.recv_buffer();
            let n = dest.len().min(bytes.len() - done);
            if n == 0 {
                break;
            }
            dest[..n].copy_from_slice(&bytes[done..done + n]);
            self.handle_received(n);
            done += n;
        }
        done
    }

    /// The client closed its side. Between messages the session is over
    /// ([`Phase::Closed`]: requests in flight can no longer be answered,
    /// and replies to them are dropped); after `NBD_CMD_DISC` the replies
    /// still owed go out first; in the middle of a message the connection
    /// dies with [`ClientError::Truncated`].
    pub fn handle_eof(&mut self) {
        let mid = !self.input.is_empty() || !matches!(self.rx, Rx::Header | Rx::AwaitBuffer { .. });
        match self.st {
            St::Closing | St::Closed | St::Dead => {}
            St::Transmission if mid => self.fail(ClientError::Truncated("a request").into()),
            St::ClientFlags | St::Options if mid => self.fail(ClientError::Truncated("an option").into()),
            _ => self.close(),
        }
    }

    /// The transport failed; `context` names what failed ("recv",
    /// "send", ...). The connection is dead.
    pub fn handle_transport_error(&mut self, errno: i32, context: &str) {
        self.fail(TransportError::Io { errno, context: context.to_owned() }.into());
    }

    /// TLS is up below the NBD stream, after [`Event::StartTls`]: option
    /// haggling goes on inside it, with nothing negotiated before kept.
    pub fn handle_tls_established(&mut self) -> Result<(), Error> {
        if self.st != St::AwaitTls || self.out.has_bytes() {
            return Err(self.wrong_state("waiting for the TLS handshake"));
        }
        self.neg.tls = true;
        self.st = St::Options;
        self.process_input();
        Ok(())
    }

    /// Fills `out` with the next slices to send, in order, and returns how
    /// many it filled (0: nothing to send). Report what left with
    /// [`Self::handle_sent`], then ask again.
    pub fn poll_transmit<'a>(&'a self, out: &mut [&'a [u8]]) -> usize {
        self.out.slices(out)
    }

    /// `n` bytes from [`Self::poll_transmit`] were sent.
    pub fn handle_sent(&mut self, n: usize) {
        let mut passed = std::mem::take(&mut self.passed);
        self.out.advance(n as u64, &mut passed);
        self.hand_back(&mut passed);
        self.passed = passed;
        self.maybe_closed();
    }

    /// The next output event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event<B>> {
        self.events.pop_front()
    }

    // ---- internals --------------------------------------------------------------

    fn hand_back(&mut self, passed: &mut Vec<Passed<B>>) {
        for p in passed.drain(..) {
            match p {
                Passed::Buffer { id, buf } => self.events.push_back(Event::BufferReturned { id, buf }),
                Passed::Mark(Mark::StartTls) => self.events.push_back(Event::StartTls),
            }
        }
    }

    fn wrong_state(&self, required: &'static str) -> Error {
        let state = match self.phase() {
            Phase::Handshake => "handshake",
            Phase::Transmission => "transmission",
            Phase::Closing => "closing",
            Phase::Closed => "closed",
            Phase::Dead => "dead",
        };
        LocalError::WrongState { state, required }.into()
    }

    fn finished(&self) -> bool {
        matches!(self.st, St::Closed | St::Dead)
    }

    fn process_input(&mut self) {
        // Each step parses one message; it says whether another may follow.
        let outcome = loop {
            match self.step() {
                Ok(true) => {}
                other => break other,
            }
        };
        if let Err(e) = outcome {
            self.fail(e);
        }
        self.maybe_closed();
    }

    fn step(&mut self) -> Result<bool, Error> {
        match self.st {
            St::ClientFlags => self.step_client_flags(),
            St::Options => self.step_option(),
            St::AwaitTls if !self.input.is_empty() => Err(ClientError::DataBeforeTls.into()),
            St::Transmission => self.step_request(),
            _ => Ok(false),
        }
    }

    /// Consumes bytes of a refused message; true once it is all gone.
    fn skip(&mut self) -> bool {
        let Rx::Skip { remaining } = self.rx else { return true };
        let n = (self.input.available().len() as u64).min(remaining);
        self.input.consume(n as usize);
        if n == remaining {
            self.rx = Rx::Header;
            true
        } else {
            self.rx = Rx::Skip { remaining: remaining - n };
            false
        }
    }

    /// The session failed: nothing more is parsed or sent, requests in
    /// flight are forgotten and lent buffers come back.
    fn fail(&mut self, err: Error) {
        if self.finished() {
            return;
        }
        self.error = Some(err);
        self.end(St::Dead);
    }

    fn close(&mut self) {
        if !self.finished() {
            self.end(St::Closed);
        }
    }

    fn end(&mut self, st: St) {
        self.st = st;
        let mut passed = std::mem::take(&mut self.passed);
        self.out.clear(&mut passed);
        self.hand_back(&mut passed);
        self.passed = passed;
        if let (Some(buf), Rx::Payload { id, .. }) = (self.write_buf.take(), self.rx) {
            self.events.push_back(Event::BufferReturned { id, buf });
        }
        self.pending.clear();
        self.input.clear();
        self.rx = Rx::Header;
        self.direct = false;
    }

    fn maybe_closed(&mut self) {
        if self.st == St::Closing && self.pending.is_empty() && !self.out.has_bytes() {
            self.close();
        }
    }

    /// The client asked to end the session.
    fn begin_closing(&mut self) {
        self.st = St::Closing;
        self.events.push_back(Event::Disconnect);
        self.input.clear();
        self.rx = Rx::Header;
    }

    /// The header of the next request, if it has arrived whole; it stays
    /// in the input until the caller consumes it.
    fn peek_header(&mut self) -> Option<Result<RequestHeader, Error>> {
        let size = RequestHeader::size(self.neg.extended);
        let avail = self.input.available();
        if avail.len() < size {
            self.input.want(size);
            return None;
        }
        let magic = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        let expected = if self.neg.extended { crate::wire::EXTENDED_REQUEST_MAGIC } else { crate::wire::REQUEST_MAGIC };
        if magic != expected {
            return Some(Err(ClientError::BadMagic { what: "request", got: u64::from(magic) }.into()));
        }
        RequestHeader::decode(&avail[..size]).map(|(h, _)| Ok(h))
    }
}
