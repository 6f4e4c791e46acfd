//! The handle: one lock around the protocol core, the socket, the
//! callbacks and the settings that live only on the C side.

#![allow(non_camel_case_types)]

use crate::callbacks::*;
use crate::dial::{Address, Dialing};
use crate::error::{CError, CResult};
use crate::lock::{PthreadGuard, PthreadMutex};
use crate::table;
use crate::tls::{OpensslTls, Plain, TlsLayer, TlsSettings};
use nbd_proto::{ChunkStatus, Config, Connection, Event, PublicState};
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_uint, CStr, CString};
use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize};

/// A caller's buffer lent to one command. READ buffers are writable;
/// WRITE buffers are not, and offer no mutable view.
pub struct UserBuf {
    ptr: *mut u8,
    len: usize,
    writable: bool,
}

// SAFETY: the caller keeps the buffer alive and untouched until the
// command completes, whichever thread completes it (libnbd's contract).
unsafe impl Send for UserBuf {}

impl UserBuf {
    pub fn read(ptr: *mut u8, len: usize) -> Self {
        UserBuf { ptr, len, writable: true }
    }
    pub fn write(ptr: *const u8, len: usize) -> Self {
        UserBuf { ptr: ptr as *mut u8, len, writable: false }
    }
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl AsRef<[u8]> for UserBuf {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` points at `len` readable bytes for the command's
        // lifetime (caller's contract, NULL rejected at submission).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl AsMut<[u8]> for UserBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        if self.len == 0 || !self.writable {
            return &mut [];
        }
        // SAFETY: as for `as_ref`, and the buffer was passed as writable.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Callbacks and errors of one command in flight.
pub struct Pending {
    // Fields drop in order: as in libnbd, the data callbacks are freed
    // before the completion, which stays last of them.
    pub chunk: Option<Owned<nbd_chunk_callback>>,
    pub extent: Option<Owned<nbd_extent_callback>>,
    pub extent64: Option<Owned<nbd_extent64_callback>>,
    pub completion: Option<Owned<nbd_completion_callback>>,
    /// An errno a callback asked to fail the command with.
    pub callback_error: i32,
    /// The read buffer's start, for chunk callbacks.
    pub buf: *mut u8,
    /// Bytes of `buf` to zero if the read fails (`set_pread_initialize`).
    pub zero_on_error: usize,
    pub offset: u64,
    /// The command's name in messages ("read", "write", ...).
    pub what: &'static str,
}

impl Pending {
    /// A chunk or extent callback returned `r` with `err`: -1 fails the
    /// command with `err` (EPROTO if it left none), unless it already failed.
    fn callback_returned(&mut self, r: c_int, err: c_int) {
        if r == -1 && self.callback_error == 0 {
            self.callback_error = if err != 0 { err } else { libc::EPROTO };
        }
    }
}

/// A command that completed and awaits retirement. Its callbacks are
/// freed when it is retired (or the handle closed), as in libnbd.
pub struct Done {
    pub cookie: u64,
    /// 0 for success.
    pub errno: i32,
    pending: Pending,
}

impl Done {
    /// The command's name in messages ("read", "write", ...).
    pub fn what(&self) -> &'static str {
        self.pending.what
    }
}

/// Callbacks of the `opt_*` command in progress.
#[derive(Default)]
pub struct OptPending {
    // Fields drop in order: the list or context callback is freed before
    // the completion, as in libnbd.
    pub list: Option<Owned<nbd_list_callback>>,
    pub context: Option<Owned<nbd_context_callback>>,
    pub completion: Option<Owned<nbd_completion_callback>>,
    /// Entries reported, for the synchronous calls' return value.
    pub count: c_int,
    /// Set once the option finished: its errno (0 for success).
    pub done: Option<i32>,
}

pub struct Inner {
    pub conn: Connection<UserBuf>,
    pub sock: Option<UnixStream>,
    pub debug: bool,
    pub debug_cb: Option<Owned<nbd_debug_callback>>,
    pub handle_name: CString,
    pub pread_initialize: bool,
    /// The name the server's certificate is checked against, in
    /// preference to the host connected to (`set_tls_hostname`).
    pub tls_hostname: Option<String>,
    /// `LISTEN_FDNAMES` for a socket-activated server; empty for libnbd's
    /// default.
    pub socket_activation_name: String,
    pub uri_allow_transports: u32,
    pub uri_allow_tls: c_int,
    pub uri_allow_local_file: bool,
    pub tls_settings: TlsSettings,
    /// The TLS session below the NBD stream, once STARTTLS succeeded.
    pub tls: Option<Box<dyn TlsLayer>>,
    pub tls_established: bool,
    /// Small pieces of plaintext coalesced into one TLS record.
    tls_coalesced: Vec<u8>,
    pub pending: HashMap<u64, Pending>,
    /// Completed and not yet retired, in completion order.
    pub done: VecDeque<Done>,
    pub opt: Option<OptPending>,
    pub last_option_error: Option<String>,
    /// How the handle connected, when a URI can describe it.
    pub transport: Option<crate::uri::Transport>,
    /// What `nbd_get_uri` reports for a connection made to a socket
    /// address (`nbd_aio_connect`, socket activation): the address as a
    /// transport, or why a URI cannot name it. No TLS host name comes
    /// from it, as in libnbd.
    pub address_uri: Option<CResult<crate::uri::Transport>>,
    /// A server the handle started itself, and its scratch directory.
    pub subprocess: Option<(libc::pid_t, Option<std::path::PathBuf>)>,
    /// A non-blocking connect under way on `sock`.
    pub dialing: Option<Dialing>,
    /// How the last non-blocking connect failed, until reported.
    pub dial_error: Option<CError>,
    /// The export being run, for debug messages.
    pub context: &'static str,
    /// The state last reported in a debug message.
    pub debug_state: PublicState,
    pub poisoned: bool,
    /// `aio_get_direction` told the caller to wait for writability, and
    /// no write event has come since: such an event is expected even if
    /// a read event has since sent everything (libnbd refuses only an
    /// event it never asked for).
    pub write_announced: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing our end lets the server see EOF; then reap it.
        self.sock = None;
        if let Some((pid, dir)) = self.subprocess.take() {
            let mut status = 0;
            // A socket-activated server keeps listening after its client
            // leaves, so it is asked to stop; a connect_command server
            // exits at EOF on its stdin.
            // SAFETY: signalling and waiting for our own child.
            unsafe {
                if dir.is_some() {
                    libc::kill(pid, libc::SIGTERM);
                }
                libc::waitpid(pid, &mut status, 0);
            }
            if let Some(d) = dir {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// `struct nbd_handle`, opaque to C.
pub struct nbd_handle {
    inner: PthreadMutex<Inner>,
    pub private_data: AtomicUsize,
    poisoned: AtomicBool,
}

/// Plaintext taken per TLS write.
const TLS_CHUNK: usize = 64 * 1024;
/// A TLS record's largest plaintext: a piece this large fills records by itself.
const TLS_RECORD: usize = 16 * 1024;

/// Sends the TLS layer's ciphertext until the socket would block; `false`
/// if the transport failed (the core then knows).
fn flush_ciphertext(conn: &mut Connection<UserBuf>, sock: Option<&mut UnixStream>, tls: &mut dyn TlsLayer) -> bool {
    let Some(sock) = sock else { return false };
    while !tls.pending_ciphertext().is_empty() {
        match crate::send::send(sock, tls.pending_ciphertext()) {
            Ok(n) => tls.consume_ciphertext(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Under TLS, libnbd reports transport failures with no errno.
                conn.handle_transport_error(0, &format!("TLS send: {}", crate::error::strerror(os_errno(&e))));
                return false;
            }
        }
    }
    true
}

fn os_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The longest extent a 32-bit extent callback can carry: just below
/// 4 GiB, kept 512-aligned.
const MAX_EXTENT_32: u64 = 0xffff_fe00;

static HANDLE_SEQ: AtomicUsize = AtomicUsize::new(1);

impl nbd_handle {
    pub fn new() -> Self {
        let n = HANDLE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let debug = std::env::var("LIBNBD_DEBUG").is_ok_and(|v| v == "1");
        let mut conn = Connection::new(Config::default());
        conn.set_trace(debug);
        nbd_handle {
            inner: PthreadMutex::new(Inner {
                conn,
                sock: None,
                debug,
                debug_cb: None,
                handle_name: CString::new(format!("nbd{n}")).unwrap_or_default(),
                pread_initialize: true,
                tls_hostname: None,
                socket_activation_name: String::new(),
                uri_allow_transports: 7,
                uri_allow_tls: 1,
                uri_allow_local_file: false,
                tls_settings: TlsSettings::default(),
                tls: None,
                tls_established: false,
                tls_coalesced: Vec::new(),
                pending: HashMap::new(),
                done: VecDeque::new(),
                opt: None,
                last_option_error: None,
                transport: None,
                address_uri: None,
                subprocess: None,
                dialing: None,
                dial_error: None,
                context: "nbd_create",
                debug_state: PublicState::Created,
                poisoned: false,
                write_announced: false,
            }),
            private_data: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> PthreadGuard<'_, Inner> {
        let mut g = self.inner.lock();
        if self.poisoned.load(std::sync::atomic::Ordering::Relaxed) {
            g.poisoned = true;
        }
        g
    }

    /// Logs a call that takes no lock (`nbd_{set,get}_private_data`, which
    /// callbacks may call under the lock): when the lock is free, as the
    /// call's `enter:` and `leave:` lines; otherwise not at all.
    pub fn debug_unlocked(&self, function: &'static str, enter: impl FnOnce() -> String, ret: usize) {
        if let Some(mut i) = self.inner.try_lock() {
            if i.debug {
                i.context = function;
                i.debug(enter);
                i.debug(|| format!("leave: ret={ret}"));
            }
        }
    }

    /// A panic escaped an export: the handle is dead from now on.
    pub fn mark_poisoned(&self) {
        self.poisoned.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for nbd_handle {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    /// The state as the export table sees it.
    pub fn public_state(&self) -> table::States {
        if self.poisoned {
            return table::DEAD;
        }
        match self.conn.state() {
            PublicState::Created => table::CREATED,
            PublicState::Connecting => table::CONNECTING,
            PublicState::Negotiating => table::NEGOTIATING,
            PublicState::Ready | PublicState::Processing => table::CONNECTED,
            PublicState::Closed => table::CLOSED,
            PublicState::Dead => table::DEAD,
        }
    }

    /// The state in libnbd's words: the name of the libnbd state the
    /// handle is in, and its description, NUL-terminated as
    /// `nbd_connection_state` returns it ("READY: Connection is ...").
    pub fn libnbd_state(&self) -> &'static CStr {
        if self.poisoned {
            return c"DEAD: Connection is in an unrecoverable error state, can only be closed";
        }
        match self.conn.state() {
            PublicState::Created => c"START: Handle after being initially created",
            PublicState::Connecting if self.dialing.is_some() => c"CONNECT.CONNECTING: Connecting to the remote server",
            PublicState::Connecting => c"MAGIC.RECV_MAGIC: Receive initial magic identification from remote",
            PublicState::Negotiating => c"NEGOTIATING: Connection is ready to negotiate an NBD option",
            PublicState::Ready => c"READY: Connection is ready to process NBD commands",
            PublicState::Processing if self.conn.direction().wants_write() => {
                c"ISSUE_COMMAND.SEND_REQUEST: Sending a request to the remote server"
            }
            PublicState::Processing => c"REPLY.RECV_REPLY: Receive a reply from the remote server",
            PublicState::Closed => c"CLOSED: Connection is closed",
            PublicState::Dead => c"DEAD: Connection is in an unrecoverable error state, can only be closed",
        }
    }

    /// The libnbd state's name alone, as error messages give it.
    pub fn libnbd_state_name(&self) -> String {
        let full = self.libnbd_state().to_string_lossy();
        full.split(':').next().unwrap_or_default().to_owned()
    }

    /// Turns debug messages on or off (the core notes the handshake's
    /// facts only while they are on).
    pub fn set_debug(&mut self, on: bool) {
        if on && !self.debug {
            // Transitions are logged from the state debugging starts in.
            self.debug_state = self.conn.state();
        }
        self.debug = on;
        self.conn.set_trace(on);
    }

    /// Logs a change of the public state since the last one logged, and
    /// why the handle died if it did.
    pub fn debug_transition(&mut self) {
        if !self.debug || self.conn.state() == self.debug_state {
            return;
        }
        let (from, to) = (self.debug_state, self.conn.state());
        self.debug(|| format!("transition: {} -> {}", from.name(), to.name()));
        self.debug_state = to;
        if to == PublicState::Dead {
            let why = self.ended().unwrap_or_else(|| CError::new(0, "connection is dead"));
            self.debug(|| format!("handle dead: {}", crate::error::error_text(self.context, &why)));
        }
    }

    /// Logs what the handshake learned since last asked, in libnbd's words.
    fn debug_notes(&mut self) {
        while let Some(note) = self.conn.poll_note() {
            let (sr, eh) = (self.conn.structured_replies_negotiated(), self.conn.extended_headers_negotiated());
            for line in crate::trace::note_lines(&note, sr, eh) {
                self.debug(|| line);
            }
        }
    }

    /// A debug message from the current call, when debugging is on: to the
    /// debug callback if set, else to stderr, in libnbd's format.
    pub fn debug(&self, msg: impl FnOnce() -> String) {
        if !self.debug {
            return;
        }
        let text = msg();
        match &self.debug_cb {
            Some(cb) => {
                let ctx = CString::new(self.context).unwrap_or_default();
                let m = CString::new(text.replace('\0', " ")).unwrap_or_default();
                let c = cb.get();
                if let Some(f) = c.callback {
                    // SAFETY: a C callback with its own user data, given
                    // NUL-terminated strings that outlive the call.
                    unsafe { f(c.user_data, ctx.as_ptr(), m.as_ptr()) };
                }
            }
            None => eprintln!("libnbd: debug: {}: {}: {text}", self.handle_name.to_string_lossy(), self.context),
        }
    }

    /// Starts a non-blocking connect to the first of `addrs` that does not
    /// refuse at once (`tcp` names a TCP destination, "host:port"). Even a
    /// connect that succeeds at once is finished by the next write event,
    /// as in libnbd: until then the handle waits to write.
    pub fn dial(&mut self, addrs: Vec<Address>, tcp: Option<String>) -> CResult<()> {
        self.conn.start_connect()?;
        self.dialing = Some(Dialing::new(addrs, tcp));
        self.dial_next()
    }

    fn dial_next(&mut self) -> CResult<()> {
        let Some(d) = self.dialing.as_mut() else { return Ok(()) };
        match d.start_next() {
            Ok(fd) => {
                self.sock = Some(UnixStream::from(fd));
                Ok(())
            }
            Err(e) => {
                let fatal = d.failure_is_fatal();
                self.dialing = None;
                self.sock = None;
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
        while let (Some(d), Some(sock)) = (self.dialing.as_mut(), self.sock.as_ref()) {
            match d.check(sock) {
                None => return,
                Some(Ok(())) => {
                    self.dialing = None;
                    if let Some(sock) = self.sock.take() {
                        let _ = self.attach(OwnedFd::from(sock));
                    }
                }
                Some(Err(_)) => {
                    self.sock = None;
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
        crate::dial::tune(&fd);
        let sock = UnixStream::from(fd);
        sock.set_nonblocking(true).map_err(|e| CError::os("fcntl: set O_NONBLOCK", &e))?;
        self.sock = Some(sock);
        self.conn.handle_connected().map_err(CError::from)?;
        Ok(())
    }

    pub fn fd(&self) -> c_int {
        self.sock.as_ref().map_or(-1, |s| s.as_raw_fd())
    }

    /// `LIBNBD_AIO_DIRECTION_*` as libnbd reports it: what the core waits
    /// for, and what the TLS layer below it needs.
    pub fn direction(&self) -> c_uint {
        let d = self.conn.direction();
        let (mut read, mut write) = (d.wants_read(), d.wants_write());
        if self.sock.is_none() {
            return 0;
        }
        if let Some(tls) = &self.tls {
            write |= !tls.pending_ciphertext().is_empty();
            read |= !self.tls_established;
        }
        c_uint::from(read) | (c_uint::from(write) << 1)
    }

    /// Sends what can be sent without blocking.
    pub fn notify_write(&mut self) {
        if self.dialing.is_some() {
            self.continue_dial();
        }
        if self.tls.is_some() {
            self.tls_send();
            self.dispatch();
            return;
        }
        let Some(sock) = self.sock.as_mut() else { return };
        loop {
            let mut slices: [&[u8]; 64] = [&[]; 64];
            let n = self.conn.poll_transmit(&mut slices);
            if n == 0 {
                break;
            }
            let iov: [IoSlice<'_>; 64] = std::array::from_fn(|i| IoSlice::new(slices[i]));
            match crate::send::send_vectored(sock, &iov[..n]) {
                Ok(sent) => self.conn.handle_sent(sent),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.conn.handle_transport_error(e.raw_os_error().unwrap_or(libc::EIO), "send");
                    break;
                }
            }
        }
        self.dispatch();
    }

    /// Receives what has arrived, without blocking.
    pub fn notify_read(&mut self) {
        if self.tls.is_some() {
            self.tls_receive();
            self.dispatch();
            return;
        }
        let Some(sock) = self.sock.as_mut() else { return };
        while self.conn.direction().wants_read() {
            let buf = self.conn.recv_buffer();
            let room = buf.len();
            match sock.read(buf) {
                Ok(0) => {
                    self.conn.handle_eof();
                    break;
                }
                Ok(n) => {
                    self.conn.handle_received(n);
                    // A stream socket gives all it has: a short read at a
                    // message boundary drained it, and another read would
                    // only say EAGAIN. Mid-message (a large payload
                    // streaming in), reading on is cheaper than polling.
                    if n < room && !self.conn.is_mid_message() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.conn.handle_transport_error(e.raw_os_error().unwrap_or(libc::EIO), "recv");
                    break;
                }
            }
        }
        self.dispatch();
    }

    // ---- the same two directions through TLS ------------------------------------

    /// STARTTLS was accepted: the session starts with its first flight.
    fn start_tls(&mut self) {
        let host = match (&self.tls_hostname, &self.transport) {
            (Some(name), _) => Some(name.clone()),
            (None, Some(crate::uri::Transport::Tcp { host, .. })) => Some(host.clone()),
            _ => None,
        };
        match OpensslTls::new(&self.tls_settings, host.as_deref()) {
            Ok(mut tls) => {
                if let Err(e) = tls.handshake() {
                    self.conn.handle_transport_error(e.errno, &e.msg);
                    return;
                }
                self.tls = Some(Box::new(tls));
                self.tls_established = false;
            }
            Err(e) => self.conn.handle_transport_error(e.errno, &e.msg),
        }
    }

    /// Encrypts what the core has to send and sends the ciphertext.
    fn tls_send(&mut self) {
        self.tls_flush();
        if !self.tls_established {
            return;
        }
        let Some(tls) = self.tls.as_mut() else { return };
        loop {
            let mut slices: [&[u8]; 64] = [&[]; 64];
            let n = self.conn.poll_transmit(&mut slices);
            if n == 0 {
                break;
            }
            // A large piece (a WRITE payload) is encrypted from the caller's
            // buffer; small ones (headers) are coalesced into one record.
            let plain = if slices[0].len() >= TLS_RECORD {
                &slices[0][..slices[0].len().min(TLS_CHUNK)]
            } else {
                self.tls_coalesced.clear();
                for s in &slices[..n] {
                    let room = TLS_CHUNK - self.tls_coalesced.len();
                    self.tls_coalesced.extend_from_slice(&s[..s.len().min(room)]);
                    if self.tls_coalesced.len() == TLS_CHUNK {
                        break;
                    }
                }
                &self.tls_coalesced[..]
            };
            match tls.write_plain(plain) {
                Ok(0) => break,
                Ok(taken) => self.conn.handle_sent(taken),
                Err(e) => {
                    self.conn.handle_transport_error(e.errno, &e.msg);
                    return;
                }
            }
            if !flush_ciphertext(&mut self.conn, self.sock.as_mut(), tls.as_mut()) {
                break;
            }
        }
        self.tls_flush();
    }

    fn tls_flush(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            flush_ciphertext(&mut self.conn, self.sock.as_mut(), tls.as_mut());
        }
    }

    /// Takes in ciphertext, advances the handshake, and decrypts for the core.
    fn tls_receive(&mut self) {
        let (Some(sock), Some(tls)) = (self.sock.as_mut(), self.tls.as_mut()) else { return };
        let mut eof = false;
        loop {
            let buf = tls.recv_buffer();
            let room = buf.len();
            match sock.read(buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    tls.handle_received(n);
                    if n < room {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Under TLS, libnbd reports transport failures with no errno.
                    self.conn
                        .handle_transport_error(0, &format!("TLS receive: {}", crate::error::strerror(os_errno(&e))));
                    return;
                }
            }
        }
        self.tls_progress();
        if eof && !self.tls_established {
            // A server that rejects our credentials just hangs up.
            self.conn.handle_transport_error(0, "TLS handshake: the server closed the connection");
        } else if eof {
            self.conn.handle_eof();
        }
    }

    /// Moves the TLS session on with what it holds: the handshake, then
    /// decrypted bytes to the core while it wants them.
    fn tls_progress(&mut self) {
        let Some(tls) = self.tls.as_mut() else { return };
        let mut about = None;
        if !self.tls_established {
            match tls.handshake() {
                Ok(true) => {
                    self.tls_established = true;
                    about = self.debug.then(|| tls.describe());
                    if let Err(e) = self.conn.handle_tls_established() {
                        self.conn.handle_transport_error(e.errno(), &e.to_string());
                    }
                }
                Ok(false) => {}
                Err(e) => self.conn.handle_transport_error(e.errno, &e.msg),
            }
        }
        if self.tls_established {
            while self.conn.direction().wants_read() {
                match tls.read_plain(self.conn.recv_buffer()) {
                    Ok(Plain::Data(0) | Plain::NeedMore) => break,
                    Ok(Plain::Data(n)) => self.conn.handle_received(n),
                    Ok(Plain::Closed) => {
                        self.conn.handle_eof();
                        break;
                    }
                    Err(e) => {
                        self.conn.handle_transport_error(e.errno, &e.msg);
                        break;
                    }
                }
            }
        }
        if let Some(about) = about {
            self.debug(|| format!("connection is using TLS: {about}"));
        }
        self.tls_flush();
    }

    /// Whether the TLS layer holds input the core wants, which no socket
    /// event will announce.
    fn tls_has_input_for_core(&self) -> bool {
        self.tls_established
            && self.tls.as_ref().is_some_and(|t| t.has_buffered_input())
            && self.conn.direction().wants_read()
    }

    /// Waits once for the socket to be ready in the direction the
    /// connection wants, and services it. `Ok(false)` on timeout.
    pub fn poll_once(&mut self, timeout_ms: c_int) -> CResult<bool> {
        self.poll_once_with(timeout_ms, -1)
    }

    /// As [`Self::poll_once`], also waking when `extra_fd` (ignored if
    /// negative) is readable: `Ok(true)` then, even if the socket is not.
    pub fn poll_once_with(&mut self, timeout_ms: c_int, extra_fd: c_int) -> CResult<bool> {
        self.notify_write();
        self.take_dial_error()?;
        if self.tls_has_input_for_core() {
            self.tls_progress();
            self.dispatch();
            return Ok(true);
        }
        let dir = self.direction();
        if dir == 0 {
            // Sending changed the state (DISC or ABORT left): progress.
            return Ok(true);
        }
        let Some(sock) = self.sock.as_ref() else {
            return Err(CError::new(libc::EINVAL, "not connected"));
        };
        let mut fds = [
            libc::pollfd { fd: sock.as_raw_fd(), events: 0, revents: 0 },
            libc::pollfd { fd: extra_fd, events: libc::POLLIN, revents: 0 },
        ];
        if dir & 1 != 0 {
            fds[0].events |= libc::POLLIN;
        }
        if dir & 2 != 0 {
            fds[0].events |= libc::POLLOUT;
        }
        // Without an extra descriptor, one pollfd (poll ignores a negative
        // fd, but the count is what a syscall trace shows).
        let n: libc::nfds_t = if extra_fd < 0 { 1 } else { 2 };
        self.debug(|| format!("poll start: events={:x}", fds[0].events));
        // SAFETY: `n` valid pollfds in an array we own.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
        let pfd = fds[0];
        self.debug(|| format!("poll end: r={r} revents={:x}", pfd.revents));
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(true);
            }
            return Err(CError::os("poll", &e));
        }
        if r == 0 {
            return Ok(false);
        }
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.notify_read();
        }
        if pfd.revents & libc::POLLOUT != 0 {
            self.notify_write();
        }
        self.take_dial_error()?;
        Ok(true)
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

    /// Drives the connection until `done` holds, failing if it can no
    /// longer make progress.
    pub fn run_until(&mut self, done: impl Fn(&Inner) -> bool) -> CResult<()> {
        loop {
            if done(self) {
                return Ok(());
            }
            if let Some(e) = self.ended() {
                return Err(e);
            }
            if self.direction() == 0 {
                return Err(CError::new(libc::EINVAL, "the connection cannot make progress in this state"));
            }
            self.poll_once(-1)?;
        }
    }

    /// Turns core events into callbacks and completion records.
    pub fn dispatch(&mut self) {
        // As in libnbd, the socket closes when the connection ends.
        if matches!(self.conn.state(), PublicState::Dead | PublicState::Closed) {
            self.sock = None;
        }
        if self.debug {
            self.debug_notes();
            self.debug_transition();
        }
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::Complete { cookie, result, .. } => {
                    let Some(p) = self.pending.remove(&cookie) else { continue };
                    let mut err = match result {
                        Ok(()) => p.callback_error,
                        Err(e) => e.errno(),
                    };
                    if err != 0 && p.zero_on_error > 0 {
                        // SAFETY: the read's buffer, `zero_on_error` bytes the
                        // caller lent until completion, which is now.
                        unsafe { std::ptr::write_bytes(p.buf, 0, p.zero_on_error) };
                    }
                    let mut retire = false;
                    if let Some(c) = p.completion.as_ref().map(|c| *c.get()) {
                        if let Some(f) = c.callback {
                            // As in libnbd, the callback's `*error` counts
                            // only when it returns -1.
                            let mut said = err;
                            // SAFETY: the caller's completion callback with its user data.
                            match unsafe { f(c.user_data, &mut said) } {
                                -1 if said != 0 => err = said,
                                1 => retire = true,
                                _ => {}
                            }
                        }
                    }
                    // Auto-retired commands free their callbacks now; the
                    // rest when retired.
                    if !retire {
                        self.done.push_back(Done { cookie, errno: err, pending: p });
                    }
                }
                Event::ReadChunk { cookie, offset, length, status } => {
                    let Some(p) = self.pending.get_mut(&cookie) else { continue };
                    let Some(cb) = p.chunk.as_ref().map(|c| *c.get()) else { continue };
                    let Some(f) = cb.callback else { continue };
                    let (kind, mut err) = match status {
                        ChunkStatus::Data => (1, 0),
                        ChunkStatus::Hole => (2, 0),
                        ChunkStatus::Error { errno } => (3, errno),
                    };
                    let at = offset.saturating_sub(p.offset) as usize;
                    // SAFETY: `at + length` lies inside the read's buffer
                    // (the core validated the chunk against the request).
                    let sub = unsafe { p.buf.add(at) };
                    // SAFETY: the caller's chunk callback with its user data.
                    let r = unsafe { f(cb.user_data, sub.cast(), length as usize, offset, kind, &mut err) };
                    p.callback_returned(r, err);
                }
                Event::Extents { cookie, context_id, offset, extents } => {
                    let name = self.conn.meta_context_name(context_id).unwrap_or("").to_owned();
                    let Some(p) = self.pending.get_mut(&cookie) else { continue };
                    if let Some(cb) = p.extent64.as_ref().map(|c| *c.get()) {
                        let Some(f) = cb.callback else { continue };
                        let mut wide: Vec<nbd_extent> =
                            extents.iter().map(|e| nbd_extent { length: e.length, flags: e.flags }).collect();
                        let name = CString::new(name).unwrap_or_default();
                        let mut err = p.callback_error;
                        // SAFETY: the caller's extent64 callback, given a live
                        // array of n extents and a NUL-terminated name.
                        let r =
                            unsafe { f(cb.user_data, name.as_ptr(), offset, wide.as_mut_ptr(), wide.len(), &mut err) };
                        p.callback_returned(r, err);
                        continue;
                    }
                    let Some(cb) = p.extent.as_ref().map(|c| *c.get()) else { continue };
                    let Some(f) = cb.callback else { continue };
                    // libnbd 1.14's callback takes 32-bit pairs: longer
                    // extents are clamped to the largest 32-bit length.
                    let mut pairs: Vec<u32> =
                        extents.iter().flat_map(|e| [e.length.min(MAX_EXTENT_32) as u32, e.flags as u32]).collect();
                    let name = CString::new(name).unwrap_or_default();
                    let mut err = 0;
                    // SAFETY: the caller's extent callback, given a live
                    // array of 2*n entries and a NUL-terminated name.
                    let r =
                        unsafe { f(cb.user_data, name.as_ptr(), offset, pairs.as_mut_ptr(), pairs.len(), &mut err) };
                    p.callback_returned(r, err);
                }
                Event::ExportListed { name, description } => {
                    let Some(opt) = self.opt.as_mut() else { continue };
                    opt.count += 1;
                    if let Some(cb) = opt.list.as_ref().map(|c| *c.get()) {
                        if let Some(f) = cb.callback {
                            let n = CString::new(name).unwrap_or_default();
                            let d = CString::new(description).unwrap_or_default();
                            // SAFETY: the caller's list callback with NUL-terminated strings.
                            unsafe { f(cb.user_data, n.as_ptr(), d.as_ptr()) };
                        }
                    }
                }
                Event::MetaContextListed { name } => {
                    let Some(opt) = self.opt.as_mut() else { continue };
                    opt.count += 1;
                    if let Some(cb) = opt.context.as_ref().map(|c| *c.get()) {
                        if let Some(f) = cb.callback {
                            let n = CString::new(name).unwrap_or_default();
                            // SAFETY: the caller's context callback with a NUL-terminated string.
                            unsafe { f(cb.user_data, n.as_ptr()) };
                        }
                    }
                }
                Event::OptionComplete { result } => {
                    let Some(opt) = self.opt.as_mut() else { continue };
                    let err = result.as_ref().err().map_or(0, |e| e.errno());
                    if let Some(cb) = opt.completion.as_ref().map(|c| *c.get()) {
                        if let Some(f) = cb.callback {
                            // libnbd ignores what an option's callback
                            // returns or writes to `*error`.
                            let mut said = err;
                            // SAFETY: the caller's completion callback with its user data.
                            unsafe { f(cb.user_data, &mut said) };
                        }
                    }
                    opt.list = None;
                    opt.context = None;
                    opt.completion = None;
                    opt.done = Some(err);
                    if let Err(e) = result {
                        self.last_option_error = Some(e.to_string());
                    }
                }
                Event::StartTls => self.start_tls(),
                Event::Connected => {}
            }
        }
    }
}
