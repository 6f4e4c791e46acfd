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
}

impl Error {
    /// The errno this error is reported with (Linux numbering).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Protocol(_) => EPROTO,
            Error::Server(e) => e.errno(),
            Error::Local(e) => e.errno(),
            Error::Transport(e) => e.errno(),
        }
    }
}

/// The server broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic in {what}: {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    #[error("export size {0} is 2^63 or more")]
    SizeTooLarge(u64),
    #[error("the server replied to {} while {} was pending", opt::name(*got), opt::name(*sent))]
    OptionReplyMismatch { sent: u32, got: u32 },
    #[error("reply type {reply:#x} is not valid for {}", opt::name(*option))]
    UnexpectedOptionReply { option: u32, reply: u32 },
    #[error("reply type {reply:#x} to {} has invalid length {length}", opt::name(*option))]
    BadOptionReplyLength { option: u32, reply: u32, length: u32 },
    #[error("NBD_INFO type {info} has invalid length {length}")]
    BadInfoLength { info: u16, length: u32 },
    #[error("the server acknowledged {} without sending NBD_INFO_EXPORT", opt::name(*.0))]
    MissingExportInfo(u32),
    #[error("the server selected meta context {0:?}, which was not requested")]
    MetaContextNotRequested(String),
    #[error("the server gave meta context id {0} twice")]
    DuplicateMetaContextId(u32),
    #[error("the server sent bytes after accepting STARTTLS, before TLS began")]
    DataBeforeTls,
    #[error("the server sent bytes {0}, when no reply was due")]
    UnsolicitedData(&'static str),
    #[error("bad reply magic {0:#x}")]
    BadReplyMagic(u32),
    #[error("{0} reply, which was not negotiated")]
    ReplyNotNegotiated(&'static str),
    #[error("reply for unknown cookie {0}")]
    UnknownCookie(u64),
    #[error("reply for cookie {0} before its request was sent")]
    ReplyBeforeRequest(u64),
    #[error("chunk type {kind} is not valid for command type {command}")]
    ChunkNotForCommand { kind: u16, command: u16 },
    #[error("unknown structured reply chunk type {0}")]
    UnknownChunkType(u16),
    #[error("chunk type {kind} has invalid length {length}")]
    BadChunkLength { kind: u16, length: u64 },
    #[error("chunk at offset {offset} length {length} lies outside the request")]
    ChunkOutOfRange { offset: u64, length: u64 },
    #[error("chunk at offset {offset} length {length} overlaps an earlier chunk")]
    ChunkOverlap { offset: u64, length: u64 },
    #[error("read reply covered {covered} of {expected} bytes")]
    IncompleteRead { covered: u64, expected: u64 },
    #[error("more than one content chunk for a read with the DF flag")]
    FragmentedDf,
    #[error("error chunk with error value 0")]
    ZeroErrorInErrorChunk,
    #[error("error chunk message of {0} bytes does not fit the chunk")]
    ErrorMessageTooLong(u64),
    #[error("block status for unknown meta context id {0}")]
    UnknownContext(u32),
    #[error("block status for meta context id {0} twice in one reply")]
    DuplicateContext(u32),
    #[error("block status extent of length 0")]
    ZeroLengthExtent,
    #[error("block status extents go beyond the request")]
    ExtentsBeyondRequest,
    #[error("more than one extent for a block status with the REQ_ONE flag")]
    ReqOneViolated,
    #[error("NBD_REPLY_TYPE_NONE without the DONE flag")]
    NoneWithoutDone,
    #[error("simple reply with data to a read under structured replies")]
    SimpleReadUnderStructured,
}

/// The server reported an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// An option got an `NBD_REP_ERR_*` reply; `export` is the name a GO
    /// or INFO asked for.
    #[error("{}{}: {}{}", opt::name(*option), ExportSuffix(export.as_deref()), rep::error_meaning(*reply), MessageSuffix(message))]
    OptionRefused { option: u32, reply: u32, export: Option<String>, message: String },
    /// A command failed with the given errno.
    #[error("server reported error: {}{}", ErrnoName(*errno), MessageSuffix(message.as_deref().unwrap_or("")))]
    Command { errno: i32, message: Option<String> },
    /// TLS was required but the server cannot or will not do it.
    #[error("TLS is required but the server {0}")]
    TlsUnavailable(&'static str),
}

impl ServerError {
    pub fn errno(&self) -> i32 {
        match self {
            // As libnbd reports a failed NBD_OPT_GO / NBD_OPT_INFO.
            ServerError::OptionRefused { reply, .. } => match *reply {
                rep::ERR_INVALID | rep::ERR_TOO_BIG | rep::ERR_BLOCK_SIZE_REQD => EINVAL,
                rep::ERR_UNKNOWN => ENOENT,
                rep::ERR_SHUTDOWN => ESHUTDOWN,
                _ => ENOTSUP,
            },
            ServerError::Command { errno, .. } => *errno,
            ServerError::TlsUnavailable(_) => ENOTSUP,
        }
    }
}

/// The caller's request was refused without sending anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("invalid state: {state}: the handle must be {required}")]
    WrongState { state: &'static str, required: &'static str },
    #[error("server does not support {0}")]
    Unsupported(&'static str),
    #[error("server does not support write operations")]
    ReadOnly,
    #[error("did not negotiate any metadata contexts, either you did not call nbd_add_meta_context before connecting or the server does not support it")]
    NoMetaContexts,
    #[error("flags: invalid value for flag: {0:#x}")]
    InvalidFlags(u32),
    #[error("request out of bounds")]
    OutOfBounds,
    #[error("count cannot be 0")]
    ZeroSize,
    #[error("request is unaligned")]
    Unaligned,
    #[error("request too large: maximum request size is {max}")]
    TooLarge { max: u64 },
    #[error("cannot request more commands after NBD_CMD_DISC")]
    AfterDisconnect,
    #[error("{0} too long for NBD protocol")]
    NameTooLong(&'static str),
    #[error("server lacks structured replies, needed to list meta contexts")]
    NoStructuredReplies,
    #[error("command abandoned before it was sent")]
    Abandoned,
    #[error("{0}")]
    Invalid(&'static str),
}

impl LocalError {
    pub fn errno(&self) -> i32 {
        match self {
            LocalError::WrongState { state, .. } if *state == "created" => ENOTCONN,
            LocalError::ReadOnly => EPERM,
            LocalError::NoMetaContexts | LocalError::NoStructuredReplies => ENOTSUP,
            LocalError::TooLarge { .. } => ERANGE,
            LocalError::NameTooLong(_) => ENAMETOOLONG,
            LocalError::Abandoned => ENOTCONN,
            _ => EINVAL,
        }
    }
}

/// The transport below the protocol failed or ended early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("the server closed the connection {0}")]
    Eof(&'static str),
    #[error("{context}: {}", ErrnoName(*errno))]
    Io { errno: i32, context: String },
    /// What a command in flight fails with when the transport fails under
    /// it: ENOTCONN, as in libnbd, whatever the failure's own errno (the
    /// call that met the failure reports that one). Holds its message.
    #[error("connection lost: {0}")]
    Lost(String),
}

impl TransportError {
    pub fn errno(&self) -> i32 {
        match self {
            TransportError::Eof(_) => ENOTCONN,
            // A failure with no errno (a TLS layer's, say) must still fail
            // the commands it ends.
            TransportError::Io { errno: 0, .. } => ENOTCONN,
            TransportError::Io { errno, .. } => *errno,
            TransportError::Lost(_) => ENOTCONN,
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

/// An errno's symbolic name, for messages (no libc `strerror` here).
struct ErrnoName(i32);

impl fmt::Display for ErrnoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            EPERM => "EPERM (operation not permitted)",
            ENOENT => "ENOENT (no such file or directory)",
            EIO => "EIO (input/output error)",
            ENOMEM => "ENOMEM (cannot allocate memory)",
            EINVAL => "EINVAL (invalid argument)",
            ENOSPC => "ENOSPC (no space left on device)",
            EOVERFLOW => "EOVERFLOW (value too large)",
            ENOTSUP => "ENOTSUP (operation not supported)",
            ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
            ECONNRESET => "ECONNRESET (connection reset by peer)",
            other => return write!(f, "errno {other}"),
        };
        f.write_str(name)
    }
}
