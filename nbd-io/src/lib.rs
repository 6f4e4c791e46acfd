//! The one I/O loop of nbd-rs: moves bytes between a sans-IO [`Core`]
//! (a client's [`nbd_proto::Connection`] or a server's
//! [`nbd_proto::server::Connection`]) and a [`Transport`].
//!
//! The C library (`nbd-capi`), the server (`nbd-server`), the tests and
//! the demo all drive their core through [`pump`]: [`pump::send`] when the transport can take bytes,
//! [`pump::receive`] when it has some. A transport is a plain socket
//! ([`Socket`], sends with `MSG_NOSIGNAL`), TLS over a socket (in
//! `nbd-capi`, which owns the TLS library), or anything else that moves
//! bytes: the trait's optional methods are the seams a layer below the
//! NBD stream needs (a handshake, bytes of its own to flush, input it
//! buffers).
//!
//! [`Driver`] is a small blocking event loop over a socket for tests and
//! examples.

#![forbid(unsafe_code)]

mod core;
mod driver;
pub mod pump;
mod socket;

pub use crate::core::Core;
pub use driver::Driver;
pub use socket::{send, Socket};
use std::os::fd::RawFd;

/// A transport failure, as the core is told it
/// ([`nbd_proto::Connection::handle_transport_error`]): the errno (0 where
/// the failure has none, as libnbd reports TLS failures) and the context
/// the message starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    pub errno: i32,
    pub context: String,
}

impl TransportError {
    pub fn new(errno: i32, context: impl Into<String>) -> Self {
        TransportError { errno, context: context.into() }
    }

    /// A failed system call: its errno (EIO if the error has none).
    pub fn os(e: &std::io::Error, context: &str) -> Self {
        TransportError::new(e.raw_os_error().unwrap_or(EIO), context)
    }
}

const EIO: i32 = 5;

/// What a receive gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// `n` bytes, at the start of the buffer.
    Data(usize),
    /// Nothing now; the descriptor will say when.
    WouldBlock,
    /// The peer closed the stream.
    Eof,
}

/// What a transport waits for on its own account, beyond what the core
/// wants (a handshake to read, bytes of its own to flush).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

/// A byte stream between a core and the server. Sends and receives
/// never block on a transport the C library uses: "would block" is
/// `Ok(0)` from [`Self::send`] and [`Recv::WouldBlock`] from
/// [`Self::recv`], and the caller waits on [`Self::fd`].
///
/// The optional methods are for a layer between the NBD stream and the
/// socket, such as TLS: it takes plaintext in [`Self::send`] and puts
/// its own bytes out in [`Self::flush`]; it takes its own bytes in with
/// [`Self::fill`], advances a [`Self::handshake`], and hands plaintext
/// out in [`Self::recv`]. A transport whose sends happen elsewhere (on
/// another thread) takes the bytes in `send` and reports
/// [`Interest::write`] while it still holds them.
pub trait Transport {
    /// The descriptor to poll for this transport.
    fn fd(&self) -> RawFd;

    /// Takes bytes from the start of `bufs`, in order; returns how many.
    /// `Ok(0)`: it cannot take any now.
    fn send(&mut self, bufs: &[&[u8]]) -> Result<usize, TransportError>;

    /// Receives into `buf`.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Recv, TransportError>;

    /// Whether a receive shorter than its buffer means nothing more is
    /// waiting (true of a stream socket: it gives all it has). A layer
    /// that hands out what it decrypted, record by record, says no.
    fn short_read_drains(&self) -> bool {
        true
    }

    /// Sends what the transport holds of its own, until it would block.
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Takes in what the peer sent below the stream, until it would
    /// block; `Ok(true)` if the peer closed the connection (and again at
    /// each call after that: the I/O loop acts on the end only once the
    /// core has taken the input before it).
    fn fill(&mut self) -> Result<bool, TransportError> {
        Ok(false)
    }

    /// Whether the stream carries the core's bytes yet: false while a
    /// handshake below it is under way.
    fn is_established(&self) -> bool {
        true
    }

    /// Advances the handshake below the stream: `Ok(Some(description))`
    /// from the call that completes it.
    fn handshake(&mut self) -> Result<Option<String>, TransportError> {
        Ok(None)
    }

    /// The peer closed the connection below the stream: the failure that
    /// is (a handshake cut short), or `None` for an ordinary end of stream.
    fn eof_error(&self) -> Option<TransportError> {
        None
    }

    /// What the transport waits for on its own account.
    fn interest(&self) -> Interest {
        Interest::default()
    }

    /// Whether input waits inside the transport that no descriptor event
    /// will announce.
    fn has_buffered_input(&self) -> bool {
        false
    }
}
