//! Errors, split by cause, and their one mapping to errno.

use crate::errno::*;
use crate::wire::{opt, rep};
use std::fmt;

/// Every error the core reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server violated the protocol; the connection is dead.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server reported an error (an `NBD_E*` or `NBD_REP_ERR_*`).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The caller asked for something the core refuses locally.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The byte stream under the protocol failed or ended.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The client violated the protocol (server role); the connection
    /// ends.
    #[error("client protocol error: {0}")]
    Client(#[from] ClientError),
}

impl Error {
    /// The errno this error is reported with (Linux numbering).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Protocol(_) => EPROTO,
            Error::Server(e) => e.errno(),
            Error::Local(e) => e.errno(),
            Error::Transport(e) => e.errno(),
            Error::Client(_) => EPROTO,
        }
    }
}

/// The server broke the protocol. Every one of these kills the connection
/// ([`PublicState::Dead`](crate::PublicState::Dead)); commands in flight
/// fail with it, and [`Error::errno`] reports it as `EPROTO`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A message did not start with the magic number it must have.
    #[error("bad magic in {what}: {got:#x}")]
    BadMagic {
        /// Which message: "greeting", "greeting version", "option reply".
        what: &'static str,
        /// The 64-bit value found instead.
        got: u64,
    },
    /// The export size is 2^63 bytes or more (libnbd's limit: sizes are
    /// signed 64-bit numbers in its API).
    #[error("export size {0} is 2^63 or more")]
    SizeTooLarge(u64),
    /// An option reply named another option than the one in flight.
    #[error("the server replied to {} while {} was pending", opt::name(*got), opt::name(*sent))]
    OptionReplyMismatch {
        /// The option the client sent ([`opt`]).
        sent: u32,
        /// The option the reply named.
        got: u32,
    },
    /// An option reply type that the option cannot have (for example
    /// `NBD_REP_SERVER` to `NBD_OPT_GO`).
    #[error("reply type {reply:#x} is not valid for {}", opt::name(*option))]
    UnexpectedOptionReply {
        /// The option answered ([`opt`]).
        option: u32,
        /// The reply type received ([`rep`]).
        reply: u32,
    },
    /// An option reply whose payload length is wrong for its type, or
    /// longer than any legitimate reply (64 KiB).
    #[error("reply type {reply:#x} to {} has invalid length {length}", opt::name(*option))]
    BadOptionReplyLength {
        /// The option answered ([`opt`]).
        option: u32,
        /// The reply type received ([`rep`]).
        reply: u32,
        /// The payload length the header announced, in bytes.
        length: u32,
    },
    /// An `NBD_INFO_*` item whose length is wrong for its type.
    #[error("NBD_INFO type {info} has invalid length {length}")]
    BadInfoLength {
        /// The information type ([`info`](crate::wire::info)).
        info: u16,
        /// Its length in bytes.
        length: u32,
    },
    /// The server acknowledged `NBD_OPT_GO` or `NBD_OPT_INFO` (the value)
    /// without sending the export's size and flags first.
    #[error("the server acknowledged {} without sending NBD_INFO_EXPORT", opt::name(*.0))]
    MissingExportInfo(u32),
    /// `NBD_OPT_SET_META_CONTEXT` selected a context that no query asked
    /// for, or the same name twice.
    #[error("the server selected meta context {0:?}, which was not requested")]
    MetaContextNotRequested(String),
    /// Two selected meta contexts got the same id.
    #[error("the server gave meta context id {0} twice")]
    DuplicateMetaContextId(u32),
    /// The server accepted `NBD_OPT_STARTTLS` although TLS was already on.
    #[error("the server accepted NBD_OPT_STARTTLS inside TLS")]
    TlsTwice,
    /// Bytes arrived between the STARTTLS acknowledgement and the TLS
    /// handshake (they could be an injection in plaintext).
    #[error("the server sent bytes after accepting STARTTLS, before TLS began")]
    DataBeforeTls,
    /// Bytes arrived when no reply was due; the value says when.
    #[error("the server sent bytes {0}, when no reply was due")]
    UnsolicitedData(&'static str),
    /// A transmission reply started with an unknown magic number.
    #[error("bad reply magic {0:#x}")]
    BadReplyMagic(u32),
    /// A reply in a form that was not negotiated: structured without
    /// `NBD_OPT_STRUCTURED_REPLY`, compact or simple under extended
    /// headers, extended without them. The value names the form.
    #[error("{0} reply, which was not negotiated")]
    ReplyNotNegotiated(&'static str),
    /// A reply whose cookie matches no command in flight.
    #[error("reply for unknown cookie {0}")]
    UnknownCookie(u64),
    /// A reply to a command whose request had not been sent in full.
    #[error("reply for cookie {0} before its request was sent")]
    ReplyBeforeRequest(u64),
    /// A structured chunk type that does not belong to the command (data
    /// for a WRITE, block status for a READ, ...).
    #[error("chunk type {kind} is not valid for command type {command}")]
    ChunkNotForCommand {
        /// The chunk type ([`chunk`](crate::wire::chunk)).
        kind: u16,
        /// The command's type ([`cmd`](crate::wire::cmd)).
        command: u16,
    },
    /// A chunk type the protocol does not define (and not an error type,
    /// which is understood whatever its number).
    #[error("unknown structured reply chunk type {0}")]
    UnknownChunkType(u16),
    /// A chunk whose payload length is wrong for its type or too large.
    #[error("chunk type {kind} has invalid length {length}")]
    BadChunkLength {
        /// The chunk type ([`chunk`](crate::wire::chunk)).
        kind: u16,
        /// The payload length announced, in bytes.
        length: u64,
    },
    /// A READ chunk (or an error offset) outside the range the request
    /// asked for.
    #[error("chunk at offset {offset} length {length} lies outside the request")]
    ChunkOutOfRange {
        /// The chunk's export offset, in bytes.
        offset: u64,
        /// The chunk's length, in bytes (0 for an error offset).
        length: u64,
    },
    /// A READ chunk covering bytes an earlier chunk of the reply covered.
    #[error("chunk at offset {offset} length {length} overlaps an earlier chunk")]
    ChunkOverlap {
        /// The chunk's export offset, in bytes.
        offset: u64,
        /// The chunk's length, in bytes.
        length: u64,
    },
    /// A successful structured READ reply ended before its chunks covered
    /// the whole request.
    #[error("read reply covered {covered} of {expected} bytes")]
    IncompleteRead {
        /// Bytes the chunks covered.
        covered: u64,
        /// Bytes the request asked for.
        expected: u64,
    },
    /// A READ sent with [`CmdFlags::DF`](crate::CmdFlags::DF) got more
    /// than one data or hole chunk.
    #[error("more than one content chunk for a read with the DF flag")]
    FragmentedDf,
    /// An error chunk whose error value is 0 (success).
    #[error("error chunk with error value 0")]
    ZeroErrorInErrorChunk,
    /// An error chunk whose message length (the value, in bytes) runs
    /// past the end of the chunk.
    #[error("error chunk message of {0} bytes does not fit the chunk")]
    ErrorMessageTooLong(u64),
    /// Block status for a meta context id that was never negotiated.
    #[error("block status for unknown meta context id {0}")]
    UnknownContext(u32),
    /// Two block status chunks for the same meta context in one reply.
    #[error("block status for meta context id {0} twice in one reply")]
    DuplicateContext(u32),
    /// A block status extent of length 0.
    #[error("block status extent of length 0")]
    ZeroLengthExtent,
    /// Block status extents that start past the end of the request (only
    /// the last one may reach beyond it).
    #[error("block status extents go beyond the request")]
    ExtentsBeyondRequest,
    /// More than one extent in answer to a block status request with
    /// [`CmdFlags::REQ_ONE`](crate::CmdFlags::REQ_ONE).
    #[error("more than one extent for a block status with the REQ_ONE flag")]
    ReqOneViolated,
    /// An `NBD_REPLY_TYPE_NONE` chunk that does not end its reply.
    #[error("NBD_REPLY_TYPE_NONE without the DONE flag")]
    NoneWithoutDone,
    /// A successful READ answered with a simple reply (with its data)
    /// although structured replies were negotiated.
    #[error("simple reply with data to a read under structured replies")]
    SimpleReadUnderStructured,
}

/// What a client did that ends the session, in the server role
/// ([`server::Connection`](crate::server::Connection)): violations the
/// protocol answers with a hard disconnect, because no error reply can
/// express them or the stream can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A message did not start with the magic number it must have.
    #[error("bad magic in {what}: {got:#x}")]
    BadMagic {
        /// Which message: "option request", "request".
        what: &'static str,
        /// The value found instead.
        got: u64,
    },
    /// Client flags the server does not know or did not offer.
    #[error("unknown client flags {0:#x}")]
    UnknownFlags(u32),
    /// An option other than `NBD_OPT_EXPORT_NAME` from a client that did
    /// not agree to fixed newstyle, which cannot be answered.
    #[error("{} without fixed newstyle", opt::name(*.0))]
    NotFixedNewstyle(u32),
    /// `NBD_OPT_EXPORT_NAME` that cannot be honoured (no such export,
    /// TLS required, extended headers negotiated, a name too long): the
    /// option has no error reply, so the session ends.
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    ExportNameRefused(&'static str),
    /// Bytes arrived between the STARTTLS acknowledgement and the TLS
    /// handshake (they could be a plaintext injection).
    #[error("the client sent bytes after STARTTLS was accepted, before TLS began")]
    DataBeforeTls,
    /// A WRITE payload too large to receive or to skip (a denial of
    /// service the protocol permits refusing with a hard disconnect).
    #[error("write payload of {0} bytes is too large")]
    PayloadTooLarge(u64),
    /// The client closed the connection in the middle of a message; the
    /// value says which.
    #[error("the client closed the connection in the middle of {0}")]
    Truncated(&'static str),
}

/// The server reported an error. The connection stays usable: only the
/// option or command it answered failed (unless the handshake cannot go
/// on without it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// An option got an `NBD_REP_ERR_*` reply.
    #[error("{}{}: {}{}", opt::name(*option), ExportSuffix(export.as_deref()), rep::error_meaning(*reply), MessageSuffix(message))]
    OptionRefused {
        /// The option refused ([`opt`]).
        option: u32,
        /// The error reply ([`rep`]`::ERR_*`).
        reply: u32,
        /// The export name an `NBD_OPT_GO` or `NBD_OPT_INFO` asked for;
        /// `None` for other options.
        export: Option<String>,
        /// The server's message (the reply's payload), possibly empty.
        message: String,
    },
    /// A command failed: a simple reply with a nonzero error, or an error
    /// chunk of a structured reply (the first one, if there were several).
    #[error("server reported error: {}{}", ErrnoName(*errno), MessageSuffix(message.as_deref().unwrap_or("")))]
    Command {
        /// The local errno for the server's `NBD_E*` value (see
        /// [`nbd_error::to_errno`](crate::wire::nbd_error::to_errno)).
        errno: i32,
        /// The message of an error chunk, if it had one.
        message: Option<String>,
    },
    /// TLS was required but the server cannot or will not do it.
    #[error("TLS is required but the server {0}")]
    TlsUnavailable(&'static str),
    /// After a reconnect the server offered a different export than the
    /// connection had (the value names the first difference), so the
    /// commands kept for it fail rather than reach the wrong disk.
    #[error("the export changed across the reconnect: {0}")]
    ExportChanged(String),
}

impl ServerError {
    /// The errno to report, as libnbd reports the same refusal: the
    /// command's own errno, and for options `ENOTSUP`, `EINVAL`, `ENOENT`
    /// or `ESHUTDOWN` by reply type.
    pub fn errno(&self) -> i32 {
        match self {
            // libnbd reports any refusal of a meta context option it was
            // asked for as unsupported.
            ServerError::OptionRefused { option: opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT, .. } => ENOTSUP,
            // As libnbd reports a failed NBD_OPT_GO / NBD_OPT_INFO.
            ServerError::OptionRefused { reply, .. } => match *reply {
                rep::ERR_INVALID | rep::ERR_TOO_BIG | rep::ERR_BLOCK_SIZE_REQD => EINVAL,
                rep::ERR_UNKNOWN => ENOENT,
                rep::ERR_SHUTDOWN => ESHUTDOWN,
                _ => ENOTSUP,
            },
            ServerError::Command { errno, .. } => *errno,
            ServerError::TlsUnavailable(_) => ENOTSUP,
            ServerError::ExportChanged(_) => ESTALE,
        }
    }
}

/// The caller's request was refused locally, without sending anything (or,
/// for [`LocalError::Abandoned`], taken back before it left). Most come
/// from a command method's checks, which [`StrictMode`](crate::StrictMode)
/// selects as libnbd's strict mode does; the connection is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    /// The call is not allowed in the connection's current state.
    #[error("invalid state: {state}: the handle must be {required}")]
    WrongState {
        /// The current state's name ([`PublicState::name`](crate::PublicState::name)).
        state: &'static str,
        /// The states the call needs, in words.
        required: &'static str,
    },
    /// The server did not advertise the command or flag (the value says
    /// which), or the negotiated headers cannot express the request.
    #[error("server does not support {0}")]
    Unsupported(&'static str),
    /// A write-type command (WRITE, TRIM, WRITE_ZEROES) to a read-only
    /// export.
    #[error("server does not support write operations")]
    ReadOnly,
    /// BLOCK_STATUS with no meta context negotiated.
    #[error("did not negotiate any metadata contexts, either you did not call nbd_add_meta_context before connecting or the server does not support it")]
    NoMetaContexts,
    /// A flag unknown or not valid for the command (the value is the
    /// flags given).
    #[error("flags: invalid value for flag: {0:#x}")]
    InvalidFlags(u32),
    /// The range goes beyond the end of the export.
    #[error("request out of bounds")]
    OutOfBounds {
        /// The command would store data (WRITE, TRIM, WRITE_ZEROES):
        /// reported as `ENOSPC` rather than `EINVAL`, as libnbd does.
        stores_data: bool,
    },
    /// `offset + length` overflows 64 bits; refused in every strict mode.
    #[error("request out of range: offset + count is beyond 2^64")]
    RangeOverflow,
    /// A zero-length range.
    #[error("count cannot be 0")]
    ZeroSize,
    /// Offset or length is not a multiple of the server's minimum block
    /// size.
    #[error("request is unaligned")]
    Unaligned,
    /// The request is longer than the headers or the core allow.
    #[error("request too large: maximum request size is {max}")]
    TooLarge {
        /// The largest length allowed, in bytes (64 MiB for READ and
        /// WRITE, 2^32 - 1 for other commands under compact headers).
        max: u64,
    },
    /// A WRITE payload longer than the server accepts
    /// ([`Connection::payload_maximum`](crate::Connection::payload_maximum)).
    #[error("request too large: maximum payload size is {max}")]
    PayloadTooLarge {
        /// The largest payload allowed, in bytes.
        max: u64,
    },
    /// A command submitted after [`Connection::disconnect`](crate::Connection::disconnect).
    #[error("cannot request more commands after NBD_CMD_DISC")]
    AfterDisconnect,
    /// A string longer than [`MAX_STRING`](crate::wire::MAX_STRING) bytes;
    /// the value says which one.
    #[error("{0} too long for NBD protocol")]
    NameTooLong(&'static str),
    /// [`Connection::opt_list_meta_context`](crate::Connection::opt_list_meta_context)
    /// without structured replies negotiated.
    #[error("server lacks structured replies, needed to list meta contexts")]
    NoStructuredReplies,
    /// An option other than GO or ABORT to a server without the fixed
    /// newstyle handshake.
    #[error("server is not using fixed newstyle protocol")]
    NotFixedNewstyle,
    /// A block status filter named a meta context id that is not
    /// negotiated.
    #[error("context {0} not negotiated")]
    ContextNotNegotiated(String),
    /// The command was taken back before any of it was sent
    /// ([`Connection::abandon_unsent`](crate::Connection::abandon_unsent)).
    #[error("command abandoned before it was sent")]
    Abandoned,
    /// Any other misuse, described by the value (a wrong `PAYLOAD_LEN`
    /// flag, a READ buffer that changed size while in flight, more bytes
    /// reported received than the receive buffer held).
    #[error("{0}")]
    Invalid(&'static str),
}

impl LocalError {
    /// The errno libnbd reports for the same refusal.
    pub fn errno(&self) -> i32 {
        match self {
            LocalError::WrongState { state, .. } if *state == "created" => ENOTCONN,
            LocalError::ReadOnly => EPERM,
            LocalError::NoMetaContexts | LocalError::NoStructuredReplies | LocalError::NotFixedNewstyle => ENOTSUP,
            LocalError::TooLarge { .. } | LocalError::PayloadTooLarge { .. } => ERANGE,
            LocalError::OutOfBounds { stores_data: true } => ENOSPC,
            LocalError::NameTooLong(_) => ENAMETOOLONG,
            LocalError::Abandoned => ENOTCONN,
            _ => EINVAL,
        }
    }
}

/// The transport below the protocol failed or ended early; the caller
/// reports it with [`Connection::handle_eof`](crate::Connection::handle_eof),
/// [`Connection::handle_transport_error`](crate::Connection::handle_transport_error)
/// or [`Connection::handle_sender_error`](crate::Connection::handle_sender_error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The server closed the connection; the value says when ("during the
    /// handshake", "between replies", ...).
    #[error("the server closed the connection {0}")]
    Eof(&'static str),
    /// A send or receive failed.
    #[error("{context}{}", ErrnoSuffix(*errno))]
    Io {
        /// The OS error (0 when the failing layer has none, a TLS
        /// library's say; reported as `ENOTCONN` then).
        errno: i32,
        /// What failed, as the caller named it ("recv", "send", ...).
        context: String,
    },
    /// What a command in flight is failed with when the transport under
    /// it failed: libnbd reports ENOTCONN for each, whatever the cause.
    #[error("the connection was lost ({0})")]
    Lost(Box<TransportError>),
    /// The sender the caller runs beside the connection (a writer on
    /// another thread) failed: each command in flight fails with this
    /// errno, which is what lost its bytes.
    #[error("{context}{}", ErrnoSuffix(*errno))]
    SenderFailed {
        /// The sender's errno (positive).
        errno: i32,
        /// What failed, as the caller named it.
        context: String,
    },
}

impl TransportError {
    /// The errno to report: the OS error of [`TransportError::Io`], else
    /// `ENOTCONN`.
    pub fn errno(&self) -> i32 {
        match self {
            TransportError::Eof(_) | TransportError::Lost(_) => ENOTCONN,
            // A failure with no errno (a TLS layer's, say) must still fail
            // the commands it ends.
            TransportError::Io { errno: 0, .. } | TransportError::SenderFailed { errno: 0, .. } => ENOTCONN,
            TransportError::Io { errno, .. } | TransportError::SenderFailed { errno, .. } => *errno,
        }
    }
}

struct MessageSuffix<'a>(&'a str);

impl fmt::Display for MessageSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " ({})", self.0)
        }
    }
}

struct ExportSuffix<'a>(Option<&'a str>);

impl fmt::Display for ExportSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, " for export '{name}'"),
            None => Ok(()),
        }
    }
}

/// ": " and an errno's name after a failure's context; nothing for 0,
/// a failure with no errno (a TLS layer's: its context says it all).
struct ErrnoSuffix(i32);

impl fmt::Display for ErrnoSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            errno => write!(f, ": {}", ErrnoName(errno)),
        }
    }
}

/// An errno's symbolic name, for messages (no libc `strerror` here).
struct ErrnoName(i32);

impl fmt::Display for ErrnoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            EPERM => "EPERM (operation not permitted)",
            ENOENT => "ENOENT (no such file or directory)",
            EIO => "EIO (input/output error)",
            EPIPE => "EPIPE (broken pipe)",
            ENOMEM => "ENOMEM (cannot allocate memory)",
            EINVAL => "EINVAL (invalid argument)",
            ENOSPC => "ENOSPC (no space left on device)",
            EOVERFLOW => "EOVERFLOW (value too large)",
            ENOTSUP => "ENOTSUP (operation not supported)",
            ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
            ERANGE => "ERANGE (result too large)",
            ENAMETOOLONG => "ENAMETOOLONG (file name too long)",
            EPROTO => "EPROTO (protocol error)",
            ECONNRESET => "ECONNRESET (connection reset by peer)",
            ENOTCONN => "ENOTCONN (transport endpoint is not connected)",
            ETIMEDOUT => "ETIMEDOUT (connection timed out)",
            ESTALE => "ESTALE (stale file handle)",
            other => return write!(f, "errno {other}"),
        };
        f.write_str(name)
    }
}
