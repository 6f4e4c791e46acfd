//! A connection's byte stream and the loop that moves its bytes: the
//! accepted socket (nbd-io's `Socket`, as the client's: vectored sends
//! with MSG_NOSIGNAL), then TLS over it after STARTTLS (nbd-tls, the
//! layer the client uses too); `send` and `receive` move bytes between
//! the transport and the server role's core.

use nbd_io::{Recv, Socket, Transport};
use nbd_proto::server::{Connection, Phase};
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

/// Sends what the core has until the transport takes no more; whether
/// anything moved.
pub fn send(core: &mut Connection<Vec<u8>>, t: &mut dyn Transport) -> bool {
    let mut any = flush(core, t);
    if !t.is_established() {
        return any;
    }
    loop {
        let mut pieces: [&[u8]; 64] = [&[]; 64];
        let n = core.poll_transmit(&mut pieces);
        if n == 0 {
            break;
        }
        match t.send(&pieces[..n]) {
            Ok(0) => break,
            Ok(sent) => {
                core.handle_sent(sent);
                any = true;
            }
            Err(e) => {
                core.handle_transport_error(e.errno, &e.context);
                return true;
            }
        }
        any |= flush(core, t);
    }
    any | flush(core, t)
}

/// Receives while the core wants bytes and `room` says the connection is
/// under its limits; whether anything moved.
pub fn receive(
    core: &mut Connection<Vec<u8>>,
    t: &mut dyn Transport,
    room: impl Fn(&Connection<Vec<u8>>) -> bool,
) -> bool {
    if matches!(core.phase(), Phase::Closed | Phase::Dead) {
        return false;
    }
    let closed = match t.fill() {
        Ok(closed) => closed,
        Err(e) => {
            core.handle_transport_error(e.errno, &e.context);
            return true;
        }
    };
    let mut any = closed;
    if !t.is_established() {
        match t.handshake() {
            Ok(Some(_)) => {
                any = true;
                if let Err(e) = core.handle_tls_established() {
                    core.handle_transport_error(e.errno(), &e.to_string());
                }
            }
            Ok(None) => {}
            Err(e) => {
                core.handle_transport_error(e.errno, &e.context);
                return true;
            }
        }
    }
    while t.is_established() && core.direction().wants_read() && room(core) {
        let buf = core.recv_buffer();
        if buf.is_empty() {
            break;
        }
        match t.recv(buf) {
            Ok(Recv::Data(n)) => {
                core.handle_received(n);
                any = true;
            }
            Ok(Recv::WouldBlock) => break,
            Ok(Recv::Eof) => {
                core.handle_eof();
                return true;
            }
            Err(e) => {
                core.handle_transport_error(e.errno, &e.context);
                return true;
            }
        }
    }
    if closed {
        match t.eof_error() {
            Some(e) => core.handle_transport_error(e.errno, &e.context),
            None => core.handle_eof(),
        }
    }
    any | flush(core, t)
}

/// Sends the transport's own bytes (TLS records, a handshake flight).
fn flush(core: &mut Connection<Vec<u8>>, t: &mut dyn Transport) -> bool {
    match t.flush() {
        Ok(()) => false,
        Err(e) => {
            core.handle_transport_error(e.errno, &e.context);
            true
        }
    }
}
