//! The errno values the core reports (Linux numbering, which is also the
//! numbering of the NBD protocol's own error values).
//!
//! The core does not link `libc`, so it names the few errno values it
//! needs here. [`Error::errno`](crate::Error::errno) returns one of them;
//! the C layer stores it in `errno` unchanged.

/// Operation not permitted: a write-type command to a read-only export,
/// or the server's `NBD_EPERM`.
pub const EPERM: i32 = 1;
/// No such file or directory: the server has no export of that name
/// (`NBD_REP_ERR_UNKNOWN`).
pub const ENOENT: i32 = 2;
/// Input/output error: the server's `NBD_EIO`.
pub const EIO: i32 = 5;
/// Broken pipe: a send to a peer that closed its end, as a transport
/// reports it.
pub const EPIPE: i32 = 32;
/// Cannot allocate memory: the server's `NBD_ENOMEM`.
pub const ENOMEM: i32 = 12;
/// Invalid argument: a refused request, a bad flag, and any error value
/// from the server that the protocol does not define.
pub const EINVAL: i32 = 22;
/// No space left on device: a write-type request beyond the end of the
/// export, or the server's `NBD_ENOSPC`.
pub const ENOSPC: i32 = 28;
/// Result too large: a request longer than the core or the server accepts.
pub const ERANGE: i32 = 34;
/// File name too long: an export or meta context name over
/// [`MAX_STRING`](crate::wire::MAX_STRING) bytes.
pub const ENAMETOOLONG: i32 = 36;
/// Protocol error: the server violated the NBD protocol
/// ([`Error::Protocol`](crate::Error::Protocol)).
pub const EPROTO: i32 = 71;
/// Value too large for defined data type: the server's `NBD_EOVERFLOW`.
pub const EOVERFLOW: i32 = 75;
/// Operation not supported: an option or command the server does not
/// offer, or the server's `NBD_ENOTSUP`.
pub const ENOTSUP: i32 = 95;
/// Connection reset by peer, as a transport reports it.
pub const ECONNRESET: i32 = 104;
/// Connection timed out, as a transport reports it (TCP keepalive or
/// retransmission gave up).
pub const ETIMEDOUT: i32 = 110;
/// Transport endpoint is not connected: the connection was lost or closed
/// under a command, or the handle was never connected.
pub const ENOTCONN: i32 = 107;
/// Cannot send after transport endpoint shutdown: the server is shutting
/// down (`NBD_ESHUTDOWN`, `NBD_REP_ERR_SHUTDOWN`).
pub const ESHUTDOWN: i32 = 108;
/// Stale file handle: after a reconnect the server offered a different
/// export ([`ServerError::ExportChanged`](crate::ServerError::ExportChanged)).
pub const ESTALE: i32 = 116;
