//! The I/O loop: the only code that moves bytes between a core (a
//! client's or a server's connection) and a transport. Failures go to the
//! core (`handle_transport_error`), which then completes every command
//! with an errno; nothing here returns one.

use crate::{Core, Recv, Transport};

/// Pieces of output taken from the core per send (one vectored send).
const PIECES: usize = 64;

/// Sends what the core has to send until the transport can take no more.
pub fn send<C: Core + ?Sized, T: Transport + ?Sized>(conn: &mut C, t: &mut T) {
    if !flush(conn, t) || !t.is_established() {
        return;
    }
    loop {
        let mut pieces: [&[u8]; PIECES] = [&[]; PIECES];
        let n = conn.poll_transmit(&mut pieces);
        if n == 0 {
            break;
        }
        match t.send(&pieces[..n]) {
            Ok(0) => break,
            Ok(sent) => conn.handle_sent(sent),
            Err(e) => {
                conn.handle_transport_error(e.errno, &e.context);
                return;
            }
        }
        if !flush(conn, t) {
            return;
        }
    }
    flush(conn, t);
}

/// Receives what has arrived, without blocking: takes in the transport's
/// own bytes, then [`progress`]. Returns the handshake's description if
/// the transport's handshake completed.
pub fn receive<C: Core + ?Sized, T: Transport + ?Sized>(conn: &mut C, t: &mut T) -> Option<String> {
    let closed = match t.fill() {
        Ok(closed) => closed,
        Err(e) => {
            conn.handle_transport_error(e.errno, &e.context);
            return None;
        }
    };
    let established = progress(conn, t);
    // As on a plain socket, where the end is read only when the core
    // reads: input the core has not taken yet (requests beyond its
    // limits, in the transport or in its own buffer) comes first. The
    // transport reports the end again at the next receive. A handshake
    // cut short below the stream fails at once.
    if closed && (conn.wants_read() || !t.is_established()) {
        match t.eof_error() {
            Some(e) => conn.handle_transport_error(e.errno, &e.context),
            None => conn.handle_eof(),
        }
    }
    established
}

/// Moves the transport on with what it holds: its handshake, then bytes
/// to the core while the core wants them. Returns the handshake's
/// description if this completed it.
pub fn progress<C: Core + ?Sized, T: Transport + ?Sized>(conn: &mut C, t: &mut T) -> Option<String> {
    let mut established = None;
    if !t.is_established() {
        match t.handshake() {
            Ok(Some(about)) => {
                established = Some(about);
                if let Err(e) = conn.handle_tls_established() {
                    conn.handle_transport_error(e.errno(), &e.to_string());
                }
            }
            Ok(None) => {}
            Err(e) => conn.handle_transport_error(e.errno, &e.context),
        }
    }
    if t.is_established() {
        deliver(conn, t);
    }
    flush(conn, t);
    established
}

/// Whether input the core wants waits inside the transport, where no
/// descriptor event will announce it: call [`progress`] without waiting.
pub fn has_input_for_core<C: Core + ?Sized, T: Transport + ?Sized>(conn: &C, t: &T) -> bool {
    t.is_established() && t.has_buffered_input() && conn.wants_read()
}

/// Receives into the core while it wants bytes.
fn deliver<C: Core + ?Sized, T: Transport + ?Sized>(conn: &mut C, t: &mut T) {
    while conn.wants_read() {
        let buf = conn.recv_buffer();
        let room = buf.len();
        if room == 0 {
            // A receive into nothing would read as end of stream.
            break;
        }
        match t.recv(buf) {
            Ok(Recv::Data(n)) => {
                conn.handle_received(n);
                // A stream socket gives all it has: a short read at a
                // message boundary drained it, and another read would
                // only say EAGAIN. Mid-message (a large payload streaming
                // in), reading on is cheaper than polling.
                if n < room && t.short_read_drains() && !conn.is_mid_message() {
                    break;
                }
            }
            Ok(Recv::WouldBlock) => break,
            Ok(Recv::Eof) => {
                conn.handle_eof();
                break;
            }
            Err(e) => {
                conn.handle_transport_error(e.errno, &e.context);
                break;
            }
        }
    }
}

/// Flushes the transport's own bytes; `false` if that failed (the core
/// then knows).
fn flush<C: Core + ?Sized, T: Transport + ?Sized>(conn: &mut C, t: &mut T) -> bool {
    match t.flush() {
        Ok(()) => true,
        Err(e) => {
            conn.handle_transport_error(e.errno, &e.context);
            false
        }
    }
}
