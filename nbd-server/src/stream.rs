//! A connection's byte stream and the loop that moves its bytes: the
//! accepted socket (nbd-io's `Socket`, as the client's: vectored sends
//! with MSG_NOSIGNAL), then TLS over it after STARTTLS (nbd-tls, the
//! layer the client uses too); [`Metered`] is the core as nbd-io's
//! I/O loop, the client's, drives it.

use nbd_io::{Core, Socket, Transport};
use nbd_proto::server::Connection;
use nbd_tls::{OpensslTls, TlsLayer, TlsTransport};
use std::os::fd::RawFd;

/// The socket, then TLS over it.
pub enum Stream {
    Plain(Socket),
    Tls(TlsTransport<Socket>),
    /// Only while switching to TLS.
    Switching,
}

impl Stream {
    pub fn transport(&mut self) -> &mut dyn Transport {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t,
            Stream::Switching => unreachable!("a stream is never left switching"),
        }
    }

    /// The socket's descriptor, for the poll registry (as a
    /// `mio::unix::SourceFd`).
    pub fn fd(&self) -> RawFd {
        match self {
            Stream::Plain(s) => s.fd(),
            Stream::Tls(t) => t.fd(),
            Stream::Switching => unreachable!("a stream is never left switching"),
        }
    }

    /// STARTTLS was acknowledged: TLS goes below the NBD stream.
    pub fn start_tls(&mut self, session: OpensslTls) {
        if let Stream::Plain(socket) = std::mem::replace(self, Stream::Switching) {
            let session: Box<dyn TlsLayer> = Box::new(session);
            *self = Stream::Tls(TlsTransport::new(socket, session));
        }
    }
}

/// The server's core as the I/O loop ([`nbd_io::pump`]) drives it: it
/// takes no input while its connection holds more than the byte limit
/// (request buffers plus replies not yet sent), nor, at shutdown, beyond
/// the end of the request arriving; and it notes whether anything moved.
pub struct Metered<'a> {
    core: &'a mut Connection<Vec<u8>>,
    /// Bytes of request buffers the connection holds.
    held: usize,
    max_bytes: usize,
    /// The server is shutting down: a request whose bytes are arriving is
    /// finished, no other is taken.
    finishing: bool,
    /// Whether bytes moved or the connection ended.
    pub moved: bool,
}

impl<'a> Metered<'a> {
    pub fn new(core: &'a mut Connection<Vec<u8>>, held: usize, max_bytes: usize, finishing: bool) -> Self {
        Metered { core, held, max_bytes, finishing, moved: false }
    }
}

impl Core for Metered<'_> {
    fn wants_read(&self) -> bool {
        // The rest of a message always comes in: a WRITE's payload goes
        // into a buffer already counted, and stopping mid-request would
        // leave it waiting for room only its own completion makes.
        let mid = self.core.is_mid_message();
        let room = self.held + self.core.pending_output() as usize <= self.max_bytes;
        self.core.direction().wants_read() && (mid || (room && !self.finishing))
    }
    fn recv_buffer(&mut self) -> &mut [u8] {
        self.core.recv_buffer()
    }
    fn handle_received(&mut self, n: usize) {
        self.moved |= n > 0;
        self.core.handle_received(n)
    }
    fn is_mid_message(&self) -> bool {
        self.core.is_mid_message()
    }
    fn handle_eof(&mut self) {
        self.moved = true;
        self.core.handle_eof()
    }
    fn handle_transport_error(&mut self, errno: i32, context: &str) {
        self.moved = true;
        self.core.handle_transport_error(errno, context)
    }
    fn handle_tls_established(&mut self) -> Result<(), nbd_proto::Error> {
        self.moved = true;
        self.core.handle_tls_established()
    }
    fn poll_transmit<'b>(&'b self, out: &mut [&'b [u8]]) -> usize {
        self.core.poll_transmit(out)
    }
    fn handle_sent(&mut self, n: usize) {
        self.moved |= n > 0;
        self.core.handle_sent(n)
    }
}
