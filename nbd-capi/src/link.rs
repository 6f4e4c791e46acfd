//! A link: one connection to the export under a handle. It owns the
//! core (`Connection`), the transport (a socket, TLS over it after
//! STARTTLS), the dial state and the server process the handle started,
//! if any; bytes move through `nbd_io::pump`, the one I/O loop. What the
//! caller sees (settings, callbacks, cookies, completions) is the
//! handle's.

use crate::dial::{Address, Dialing};
use crate::error::{CError, CResult};
use crate::handle::UserBuf;
use crate::tls::{TlsLayer, TlsSettings, TlsTransport};
use crate::writer::{ConcurrentWriter, Wire};
use nbd_io::{pump, Socket, Transport};
use nbd_proto::{Connection, Cookie, PublicState};
use std::collections::HashMap;
use std::ffi::{c_int, c_uint};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

/// A connection's byte stream: the socket, then TLS over it.
enum Stream {
    Plain(Wire),
    Tls(TlsTransport<Wire>),
}

impl Stream {
    fn wire(&self) -> &Wire {
        match self {
            Stream::Plain(w) => w,
            Stream::Tls(t) => t.lower(),
        }
    }

    fn wire_mut(&mut self) -> &mut Wire {
        match self {
            Stream::Plain(w) => w,
            Stream::Tls(t) => t.lower_mut(),
        }
    }

    fn transport(&mut self) -> &mut dyn Transport {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t,
        }
    }

    fn transport_ref(&self) -> &dyn Transport {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t,
        }
    }
}

/// A server the handle started for this link, and the scratch directory
/// of a socket-activated one.
pub struct Subprocess {
    pub pid: libc::pid_t,
    pub scratch: Option<PathBuf>,
}

/// Cookies are small sequential integers: they are their own hash.
#[derive(Default)]
pub struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by cookie.
pub type CookieMap<V> = HashMap<Cookie, V, BuildHasherDefault<CookieHasher>>;

pub struct Link {
    conn: Connection<UserBuf>,
    stream: Option<Stream>,
    /// A non-blocking connect under way on the stream's socket.
    dialing: Option<Dialing>,
    /// How the last non-blocking connect failed, until reported.
    dial_error: Option<CError>,
    subprocess: Option<Subprocess>,
    /// The handle's cookie of each command this link carries, by the
    /// core's cookie.
    routes: CookieMap<Cookie>,
    /// Sockets this link has had: a new one may reuse a closed one's
    /// number, and the epoll instance must still register it.
    sockets: u64,
    /// The concurrent writer, which takes the stream's sends over once
    /// the connection reaches transmission.
    writer: Option<Arc<ConcurrentWriter>>,
    /// The socket of a connection that ended while a writer had its
    /// sends: kept open until the link goes, because the writer thread
    /// may still hold its number.
    parked: Option<Stream>,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Closing our end lets the server see EOF; then reap it.
        self.stream = None;
        self.parked = None;
        if let Some(s) = self.subprocess.take() {
            s.reap(false);
        }
    }
}

impl Subprocess {
    /// Waits for the server to end, once our end of its socket is closed,
    /// and removes its scratch directory. A socket-activated server keeps
    /// listening after its client leaves, so it is asked to stop; a
    /// connect_command server exits at EOF on its stdin, and is asked to
    /// stop too if `lost` (its connection was lost: whatever is left of it
    /// must not hold the handle up).
    fn reap(self, lost: bool) {
        let Subprocess { pid, scratch } = self;
        let mut status = 0;
        // SAFETY: signalling and waiting for our own child.
        unsafe {
            let running = !lost || libc::waitpid(pid, &mut status, libc::WNOHANG) == 0;
            if running {
                if scratch.is_some() || lost {
                    libc::kill(pid, libc::SIGTERM);
                }
                libc::waitpid(pid, &mut status, 0);
            }
        }
        if let Some(d) = scratch {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Where a link is dialed: the addresses in order, and `host:port` for a
/// TCP destination.
#[derive(Clone)]
pub struct Plan {
    pub addrs: Vec<Address>,
    pub tcp: Option<String>,
}

/// How a lost link is connected again: the addresses it was dialed to,
/// or the server it started, started again.
#[derive(Clone)]
pub enum Redial {
    Addresses(Plan),
    Command { argv: Vec<std::ffi::CString> },
    Activation { argv: Vec<std::ffi::CString>, fdname: String },
}

impl Link {
    pub fn new(conn: Connection<UserBuf>) -> Self {
        Link {
            conn,
            stream: None,
            dialing: None,
            dial_error: None,
            subprocess: None,
            routes: CookieMap::default(),
            sockets: 0,
            writer: None,
            parked: None,
        }
    }

    pub fn conn(&self) -> &Connection<UserBuf> {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection<UserBuf> {
        &mut self.conn
    }

    /// Which of the link's sockets [`Self::fd`] is: it changes with every
    /// new socket, even one that reuses a number.
    pub fn socket_serial(&self) -> u64 {
        self.sockets
    }

    /// The descriptor to poll, -1 without one.
    pub fn fd(&self) -> c_int {
        self.stream.as_ref().map_or(-1, |s| s.transport_ref().fd())
    }

    pub fn has_dial_error(&self) -> bool {
        self.dial_error.is_some()
    }

    pub fn is_dialing(&self) -> bool {
        self.dialing.is_some()
    }

    /// `LIBNBD_AIO_DIRECTION_*` bits: what the core waits for, and what
    /// the transport needs on its own account (a TLS handshake, ciphertext
    /// to flush).
    pub fn direction(&self) -> c_uint {
        let Some(stream) = &self.stream else { return 0 };
        let d = self.conn.direction();
        let own = stream.transport_ref().interest();
        let (read, mut write) = (d.wants_read() || own.read, d.wants_write() || own.write);
        if stream.wire().writes_elsewhere() {
            // What is left to send goes to the writer at the next send,
            // which a wait for replies never needs a write event for.
            write = false;
        }
        c_uint::from(read) | (c_uint::from(write) << 1)
    }

    // ---- connecting ----------------------------------------------------------

    /// Starts a non-blocking connect to the first of `addrs` that does not
    /// refuse at once (`tcp` names a TCP destination, "host:port"). Even a
    /// connect that succeeds at once is finished by the next write event,
    /// as in libnbd: until then the link waits to write.
    pub fn dial(&mut self, plan: &Plan) -> CResult<()> {
        self.conn.start_connect()?;
        self.dialing = Some(Dialing::new(plan.addrs.clone(), plan.tcp.clone()));
        self.dial_next()
    }

    /// Connects a lost link again as `how` says, and restarts its core's
    /// handshake (which keeps its commands). A server the link started is
    /// reaped first and started again.
    pub fn redial(&mut self, how: &Redial) -> CResult<()> {
        self.stream = None;
        self.dial_error = None;
        if let Some(old) = self.subprocess.take() {
            old.reap(true);
        }
        self.conn.restart()?;
        let spawned = match how {
            Redial::Addresses(plan) => {
                self.dialing = Some(Dialing::new(plan.addrs.clone(), plan.tcp.clone()));
                return self.dial_next();
            }
            Redial::Command { argv } => {
                crate::subprocess::spawn_command(argv).map(|(fd, pid)| (fd, Subprocess { pid, scratch: None }))
            }
            Redial::Activation { argv, fdname } => crate::subprocess::spawn_activated(argv, fdname)
                .map(|(fd, pid, dir)| (fd, Subprocess { pid, scratch: Some(dir) })),
        };
        match spawned {
            Ok((fd, sub)) => self.attach_subprocess(fd, sub),
            Err(e) => {
                self.conn.handle_connect_failed();
                Err(e)
            }
        }
    }

    fn dial_next(&mut self) -> CResult<()> {
        let Some(d) = self.dialing.as_mut() else { return Ok(()) };
        match d.start_next() {
            Ok(fd) => {
                self.stream = Some(Stream::Plain(Wire::from(Socket::from(fd))));
                self.sockets += 1;
                Ok(())
            }
            Err(e) => {
                let fatal = d.failure_is_fatal();
                self.dialing = None;
                self.stream = None;
                if fatal {
                    self.conn.handle_transport_error(e.errno, "connect");
                } else {
                    self.conn.handle_connect_failed();
                }
                Err(e)
            }
        }
    }

    /// The connecting socket may have become writable: finish the
    /// connect, or move on to the next address. A failure is kept in
    /// `dial_error` for the call that drives the connection to report.
    fn continue_dial(&mut self) {
        while let (Some(d), Some(Stream::Plain(sock))) = (self.dialing.as_mut(), self.stream.as_ref()) {
            match d.check(sock.socket()) {
                None => return,
                Some(Ok(())) => {
                    self.dialing = None;
                    let _ = self.connected();
                }
                Some(Err(_)) => {
                    self.stream = None;
                    if let Err(e) = self.dial_next() {
                        self.dial_error = Some(e);
                    }
                }
            }
        }
    }

    /// Takes the error a non-blocking connect ended with, if any.
    pub fn take_dial_error(&mut self) -> CResult<()> {
        self.dial_error.take().map_or(Ok(()), Err)
    }

    /// Adopts a connected socket and starts the handshake.
    pub fn attach(&mut self, fd: OwnedFd) -> CResult<()> {
        self.stream = Some(Stream::Plain(Wire::from(Socket::from(fd))));
        self.connected()
    }

    /// The stream's socket is connected: the handshake starts.
    fn connected(&mut self) -> CResult<()> {
        let Some(stream) = &self.stream else { return Ok(()) };
        let sock = stream.wire().socket();
        crate::dial::tune(sock);
        sock.set_nonblocking(true).map_err(|e| CError::os("fcntl: set O_NONBLOCK", &e))?;
        self.sockets += 1;
        self.conn.handle_connected().map_err(CError::from)?;
        Ok(())
    }

    /// Adopts the socket of a server the handle started, which is reaped
    /// when the link goes.
    pub fn attach_subprocess(&mut self, fd: OwnedFd, subprocess: Subprocess) -> CResult<()> {
        self.subprocess = Some(subprocess);
        self.attach(fd)
    }

    pub fn subprocess(&self) -> Option<&Subprocess> {
        self.subprocess.as_ref()
    }

    /// STARTTLS was accepted: the session starts with its first flight,
    /// over the socket.
    pub fn start_tls(&mut self, settings: &TlsSettings, hostname: Option<&str>) {
        match crate::tls::client_session(settings, hostname) {
            Ok(tls) => {
                if let Some(Stream::Plain(wire)) = self.stream.take() {
                    let session: Box<dyn TlsLayer> = Box::new(tls);
                    self.stream = Some(Stream::Tls(TlsTransport::new(wire, session)));
                }
            }
            Err(e) => self.conn.handle_transport_error(e.errno, &e.msg),
        }
    }

    // ---- moving bytes ------------------------------------------------------

    /// Sends what can be sent without blocking (finishing a connect
    /// first); `false` if the link has no stream to service.
    pub fn send(&mut self) -> bool {
        if self.dialing.is_some() {
            self.continue_dial();
        }
        self.hand_over_if_due();
        let Some(stream) = self.stream.as_mut() else { return false };
        pump::send(&mut self.conn, stream.transport());
        self.writer_failed();
        true
    }

    /// Receives what has arrived, without blocking: `None` if the link
    /// has no stream to service, else what the transport's handshake said
    /// if it completed.
    pub fn receive(&mut self) -> Option<Option<String>> {
        if self.writer_failed() {
            return Some(None);
        }
        let stream = self.stream.as_mut()?;
        let established = pump::receive(&mut self.conn, stream.transport());
        // The handshake may have just ended: the writer has the socket
        // from now on, and keeps it open until the handle closes.
        self.hand_over_if_due();
        self.writer_failed();
        Some(established)
    }

    // ---- the concurrent writer ---------------------------------------------------

    /// The concurrent writer, if the handle has one (a writer's handle has
    /// this one link).
    pub fn writer(&self) -> Option<&Arc<ConcurrentWriter>> {
        self.writer.as_ref()
    }

    /// Gives the link its concurrent writer, which takes the sends over
    /// at once if the connection is in transmission.
    pub fn set_writer(&mut self, writer: Arc<ConcurrentWriter>) {
        self.writer = Some(writer);
        self.hand_over_if_due();
    }

    /// The writer takes the sends over once the handshake is done (the
    /// handshake is the library's own: the writer thread can only learn
    /// the socket once it is connected). The bytes the socket took are
    /// ahead of every byte the writer will be given.
    fn hand_over_if_due(&mut self) {
        let (Some(writer), Some(stream)) = (&self.writer, self.stream.as_mut()) else { return };
        let transmitting = matches!(self.conn.state(), PublicState::Ready | PublicState::Processing);
        if transmitting && !stream.wire().writes_elsewhere() {
            stream.wire_mut().hand_over(writer.clone());
        }
    }

    /// Whether the writer thread reported an error: the connection then
    /// dies with its errno, failing every command with it.
    fn writer_failed(&mut self) -> bool {
        let Some(err) = self.writer.as_ref().and_then(|w| w.error()) else { return false };
        let failed = self.stream.as_ref().is_some_and(|s| s.wire().writes_elsewhere());
        if failed && !matches!(self.conn.state(), PublicState::Dead | PublicState::Closed) {
            self.conn.handle_sender_error(err, "concurrent writer");
        }
        failed
    }

    /// Whether the transport holds input the core wants, which no socket
    /// event will announce: then [`Self::progress`] without waiting.
    pub fn has_input_for_core(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| pump::has_input_for_core(&self.conn, s.transport_ref()))
    }

    /// Moves the transport on with what it holds; returns what its
    /// handshake said if it completed.
    pub fn progress(&mut self) -> Option<String> {
        let stream = self.stream.as_mut()?;
        let established = pump::progress(&mut self.conn, stream.transport());
        self.hand_over_if_due();
        established
    }

    /// As in libnbd, the socket closes when the connection ends; and when
    /// it is lost, until it is dialed again.
    pub fn close_if_over(&mut self) {
        if matches!(self.conn.state(), PublicState::Dead | PublicState::Closed) || self.conn.awaits_restart() {
            match self.stream.take() {
                // With a writer set, the writer thread may know the
                // socket (from aio_get_fd) even before it has sends.
                Some(s) if self.writer.is_some() => {
                    if self.conn.state() == PublicState::Dead {
                        s.wire().shut_down();
                    }
                    self.parked = Some(s);
                }
                _ => {}
            }
        }
    }

    // ---- the commands it carries ---------------------------------------------

    /// The core's command `core` is the handle's `cookie`.
    pub fn route(&mut self, core: Cookie, cookie: Cookie) {
        self.routes.insert(core, cookie);
    }

    /// The handle's cookie of the core's command `core`.
    pub fn routed(&self, core: Cookie) -> Option<Cookie> {
        self.routes.get(&core).copied()
    }

    /// The core's command `core` completed: its handle cookie.
    pub fn unroute(&mut self, core: Cookie) -> Option<Cookie> {
        self.routes.remove(&core)
    }

    /// Why the connection is over, if it is dead or closed.
    pub fn ended(&self) -> Option<CError> {
        match self.conn.state() {
            PublicState::Dead => Some(
                self.conn
                    .error()
                    .cloned()
                    .map_or_else(|| CError::new(libc::ENOTCONN, "connection is dead"), CError::from),
            ),
            PublicState::Closed => Some(CError::new(libc::ENOTCONN, "connection is closed")),
            _ => None,
        }
    }
}
