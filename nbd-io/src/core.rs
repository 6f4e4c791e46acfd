//! What the I/O loop drives: the sans-IO connection of either role. The
//! client's and the server's connections take bytes and hand them out
//! through the same calls, so [`pump`](crate::pump) serves both.

use nbd_proto::{server, CommandBuffer, Connection, Error};

/// The calls the I/O loop makes on a sans-IO connection, in the order
/// the roles document: output through [`Self::poll_transmit`] and
/// [`Self::handle_sent`]; input, while [`Self::wants_read`], through
/// [`Self::recv_buffer`] and [`Self::handle_received`]; and the
/// transport's ends and failures.
pub trait Core {
    /// Whether the connection takes input now.
    fn wants_read(&self) -> bool;

    /// Where the next received bytes go.
    fn recv_buffer(&mut self) -> &mut [u8];

    /// `n` bytes were written into [`Self::recv_buffer`].
    fn handle_received(&mut self, n: usize);

    /// Whether part of a message has arrived and the rest is awaited.
    fn is_mid_message(&self) -> bool;

    /// The peer closed the stream.
    fn handle_eof(&mut self);

    /// The transport failed: the connection is dead.
    fn handle_transport_error(&mut self, errno: i32, context: &str);

    /// The transport's own handshake (TLS) completed.
    fn handle_tls_established(&mut self) -> Result<(), Error>;

    /// The next slices to send; see the roles' `poll_transmit`.
    fn poll_transmit<'a>(&'a self, out: &mut [&'a [u8]]) -> usize;

    /// `n` bytes from [`Self::poll_transmit`] were sent.
    fn handle_sent(&mut self, n: usize);
}

impl<B: CommandBuffer> Core for Connection<B> {
    fn wants_read(&self) -> bool {
        self.direction().wants_read()
    }
    fn recv_buffer(&mut self) -> &mut [u8] {
        Connection::recv_buffer(self)
    }
    fn handle_received(&mut self, n: usize) {
        Connection::handle_received(self, n)
    }
    fn is_mid_message(&self) -> bool {
        Connection::is_mid_message(self)
    }
    fn handle_eof(&mut self) {
        Connection::handle_eof(self)
    }
    fn handle_transport_error(&mut self, errno: i32, context: &str) {
        Connection::handle_transport_error(self, errno, context)
    }
    fn handle_tls_established(&mut self) -> Result<(), Error> {
        Connection::handle_tls_established(self)
    }
    fn poll_transmit<'a>(&'a self, out: &mut [&'a [u8]]) -> usize {
        Connection::poll_transmit(self, out)
    }
    fn handle_sent(&mut self, n: usize) {
        Connection::handle_sent(self, n)
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Core for server::Connection<B> {
    fn wants_read(&self) -> bool {
        self.direction().wants_read()
    }
    fn recv_buffer(&mut self) -> &mut [u8] {
        server::Connection::recv_buffer(self)
    }
    fn handle_received(&mut self, n: usize) {
        server::Connection::handle_received(self, n)
    }
    fn is_mid_message(&self) -> bool {
        server::Connection::is_mid_message(self)
    }
    fn handle_eof(&mut self) {
        server::Connection::handle_eof(self)
    }
    fn handle_transport_error(&mut self, errno: i32, context: &str) {
        server::Connection::handle_transport_error(self, errno, context)
    }
    fn handle_tls_established(&mut self) -> Result<(), Error> {
        server::Connection::handle_tls_established(self)
    }
    fn poll_transmit<'a>(&'a self, out: &mut [&'a [u8]]) -> usize {
        server::Connection::poll_transmit(self, out)
    }
    fn handle_sent(&mut self, n: usize) {
        server::Connection::handle_sent(self, n)
    }
}
