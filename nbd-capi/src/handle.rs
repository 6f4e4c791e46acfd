//! The handle: what the caller sees, behind one lock. Settings, debug
//! state, the callbacks of commands in flight and of the option under
//! way, completed commands awaiting retirement, and the cookies C knows
//! commands by. A handle is not a connection: its connections to the
//! export are its links (`link.rs`), today exactly one. Whatever is
//! handle-wide (state, direction, fd, polling, in-flight count,
//! disconnecting) is decided here, over every link.

#![allow(non_camel_case_types)]

use crate::callbacks::*;
use crate::error::{CError, CResult};
use crate::link::{CookieMap, Link, Plan, Redial};
use crate::lock::{PthreadGuard, PthreadMutex};
use crate::reconnect::{Due, Outage, Timer};
use crate::table;
use crate::tls::TlsSettings;
use crate::writer::ConcurrentWriter;
use nbd_proto::{ChunkStatus, Config, Connection, Cookie, Event, PublicState};
use std::collections::VecDeque;
use std::ffi::{c_int, c_uint, CStr, CString};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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

/// A command's callbacks. Fields drop in order: as in libnbd, the data
/// callbacks are freed before the completion, which stays last.
#[derive(Default)]
pub struct Callbacks {
    pub chunk: Option<Owned<nbd_chunk_callback>>,
    pub extent: Option<Owned<nbd_extent_callback>>,
    pub extent64: Option<Owned<nbd_extent64_callback>>,
    pub completion: Option<Owned<nbd_completion_callback>>,
}

/// A command as C knows it, from submission until it is retired: its
/// callbacks and buffer, then how it ended. Its callbacks are freed when
/// it is retired (or the handle closed), as in libnbd.
pub struct Command {
    callbacks: Callbacks,
    /// An errno a callback asked to fail the command with.
    callback_error: i32,
    /// The read buffer's start, for chunk callbacks.
    buf: *mut u8,
    /// Bytes of `buf` to zero if the read fails (`set_pread_initialize`).
    zero_on_error: usize,
    offset: u64,
    /// The command's name in messages ("read", "write", ...).
    what: &'static str,
    /// The link that carries it.
    link: usize,
    /// `None` in flight; once completed, its errno (0 for success).
    outcome: Option<i32>,
    /// Why it failed, where "command failed" says too little: the export
    /// changed across a reconnect.
    failure: Option<Box<str>>,
}

impl Command {
    pub fn new(what: &'static str, callbacks: Callbacks, offset: u64) -> Self {
        Command {
            callbacks,
            callback_error: 0,
            buf: std::ptr::null_mut(),
            zero_on_error: 0,
            offset,
            what,
            link: 0,
            outcome: None,
            failure: None,
        }
    }

    /// A read into the caller's `buf` of `len` bytes, zeroed if the read
    /// fails when `initialize` (`set_pread_initialize`).
    pub fn reading_into(self, buf: *mut u8, len: usize, initialize: bool) -> Self {
        Command { buf, zero_on_error: if initialize { len } else { 0 }, ..self }
    }

    /// A chunk or extent callback returned `r` with `err`: -1 fails the
    /// command with `err` (EPROTO if it left none), unless it already failed.
    fn callback_returned(&mut self, r: c_int, err: c_int) {
        if r == -1 && self.callback_error == 0 {
            self.callback_error = if err != 0 { err } else { libc::EPROTO };
        }
    }

    /// The command ended with `err`: a failed read's buffer is zeroed if
    /// the caller asked for that.
    fn zero_if_failed(&self, err: i32) {
        if err != 0 && self.zero_on_error > 0 {
            // SAFETY: the read's buffer, `zero_on_error` bytes the caller
            // lent until completion, which is now.
            unsafe { std::ptr::write_bytes(self.buf, 0, self.zero_on_error) };
        }
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

/// What the caller set that lives only on the C side.
pub struct Settings {
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
    pub tls: TlsSettings,
    /// The number of connections wanted (`nbd_rs_set_multi_conn`, the
    /// URI's `multi-conn=N`); 1 by default.
    pub multi_conn: u32,
    /// Seconds commands wait for a lost connection to come back
    /// (`nbd_rs_set_reconnect_delay`, the URI's `reconnect-delay=S`); 0,
    /// the default, turns reconnecting off.
    pub reconnect_delay: u32,
    /// Seconds the first connect is retried for (`nbd_rs_set_open_timeout`,
    /// the URI's `open-timeout=S`); 0, the default, tries once.
    pub open_timeout: u32,
}

impl Settings {
    /// What in these settings gives the handle more than one socket, or
    /// a descriptor that is not its socket (an epoll instance): what a
    /// concurrent writer, which writes to the one socket, cannot have.
    pub fn beyond_one_socket(&self) -> Option<String> {
        if self.multi_conn > 1 {
            Some(format!("multi-conn is {}", self.multi_conn))
        } else if self.reconnect_delay > 0 {
            Some(format!("the reconnect delay is {} s", self.reconnect_delay))
        } else if self.open_timeout > 0 {
            Some(format!("the open timeout is {} s", self.open_timeout))
        } else {
            None
        }
    }
}

/// How the handle connected, for `nbd_get_uri`.
#[derive(Default)]
pub struct ConnectedVia {
    /// The transport a URI can describe, as the caller named it.
    pub transport: Option<crate::uri::Transport>,
    /// What `nbd_get_uri` reports for a connection made to a socket
    /// address (`nbd_aio_connect`, socket activation): the address as a
    /// transport, or why a URI cannot name it. No TLS host name comes
    /// from it, as in libnbd.
    pub address: Option<CResult<crate::uri::Transport>>,
}

/// The handle behind `nbd_handle`'s lock.
pub struct Handle {
    // Dropped first (see `Drop`): sockets close and servers are reaped
    // before any callback is freed.
    links: Vec<Link>,
    debug: bool,
    debug_cb: Option<Owned<nbd_debug_callback>>,
    settings: Settings,
    /// Every command C holds a cookie of, by that cookie.
    commands: CookieMap<Command>,
    /// Cookies of the completed commands not yet retired, in completion order.
    completed: VecDeque<Cookie>,
    /// The last cookie handed out: cookies are unique across the handle's
    /// links and its life.
    last_cookie: Cookie,
    opt: Option<OptPending>,
    last_option_error: Option<String>,
    connected_via: ConnectedVia,
    /// The export being run, for debug messages.
    context: &'static str,
    /// The state last reported in a debug message.
    debug_state: PublicState,
    poisoned: bool,
    /// `aio_get_direction` told the caller to wait for writability, and
    /// no write event has come since: such an event is expected even if
    /// a read event has since sent everything (libnbd refuses only an
    /// event it never asked for).
    write_announced: bool,
    /// Where the further links of a multi-conn handle are dialed, kept
    /// from the lead link's connect until they are.
    plan: Option<Plan>,
    /// The number of links the handle settled on once the lead link's
    /// handshake ended (1 after a downgrade); `None` before.
    multi_conn_actual: Option<u32>,
    /// Why a multi-conn handle died (a link died, or a link saw another
    /// export), reported for every link.
    failure: Option<CError>,
    /// The one descriptor the caller polls when the handle has (or will
    /// have) several links: an epoll instance over their sockets.
    epoll: Option<crate::epoll::Epoll>,
    /// Commands whose synchronous caller waits with the lock released,
    /// and the eventfd that wakes it when another thread completes them.
    waiters: CookieMap<c_int>,
    /// Reconnecting lost links, when a reconnect delay is set.
    reconnect: Option<Reconnecting>,
    /// Retrying the first connect, when an open timeout is set, until the
    /// lead link's handshake ends.
    opening: Option<Opening>,
    /// What wakes the caller's poll loop (through the epoll instance)
    /// when the next attempt is due: with a reconnect delay or an open
    /// timeout.
    timer: Option<Timer>,
    /// `service_timers` is running (it dispatches events, and dispatching
    /// services the timers).
    servicing_timers: bool,
}

/// The first connect, retried until its deadline.
struct Opening {
    deadline: Instant,
    plan: Plan,
    /// The lead link's settings at the first attempt, for each new one.
    config: Config,
    /// An attempt is under way; else the next is due at `next_at`.
    attempting: bool,
    next_at: Instant,
    attempts: u32,
}

/// The pause between two attempts of the first connect.
const OPEN_RETRY: Duration = Duration::from_secs(1);

/// What reconnecting needs: how to connect again and each link's outage.
struct Reconnecting {
    delay: Duration,
    how: Redial,
    /// By link index: the outage under way, if any.
    outages: Vec<Option<Outage>>,
    /// Reconnects that succeeded (`nbd_rs_get_reconnect_count`).
    count: u64,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // In libnbd's order: sockets closed and servers reaped, the debug
        // callback freed, then the callbacks of completed commands in the
        // order they completed (those in flight were failed by close).
        self.links.clear();
        self.debug_cb = None;
        while let Some(cookie) = self.completed.pop_front() {
            self.commands.remove(&cookie);
        }
    }
}

/// The handle, locked: what every export works on. A synchronous command
/// on a multi-conn handle lets go of the lock while it waits in poll(2)
/// (see `wait_unlocked`).
pub type Locked<'a> = PthreadGuard<'a, Handle>;

/// `struct nbd_handle`, opaque to C.
pub struct nbd_handle {
    inner: PthreadMutex<Handle>,
    pub private_data: AtomicUsize,
    poisoned: AtomicBool,
    /// The concurrent writer, reached without the lock by the writer
    /// thread's `nbd_rs_concurrent_writer_error`.
    pub writer: OnceLock<Arc<ConcurrentWriter>>,
}

thread_local! {
    /// This thread's eventfd, written to wake it from a synchronous
    /// wait on a multi-conn handle; `None` if it could not be made.
    static WAKE: Option<std::os::fd::OwnedFd> = {
        // SAFETY: eventfd(2), checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        // SAFETY: a fresh descriptor this thread owns until it exits.
        (fd >= 0).then(|| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    };
}

/// Wakes the thread waiting on the eventfd `fd`.
fn wake(fd: c_int) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing an 8-byte count to an eventfd.
    unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
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
            inner: PthreadMutex::new(Handle {
                links: vec![Link::new(conn)],
                debug,
                debug_cb: None,
                settings: Settings {
                    handle_name: CString::new(format!("nbd{n}")).unwrap_or_default(),
                    pread_initialize: true,
                    tls_hostname: None,
                    socket_activation_name: String::new(),
                    uri_allow_transports: 7,
                    uri_allow_tls: 1,
                    uri_allow_local_file: false,
                    tls: TlsSettings::default(),
                    multi_conn: 1,
                    reconnect_delay: 0,
                    open_timeout: 0,
                },
                commands: CookieMap::default(),
                completed: VecDeque::new(),
                last_cookie: 0,
                opt: None,
                last_option_error: None,
                connected_via: ConnectedVia::default(),
                context: "nbd_create",
                debug_state: PublicState::Created,
                poisoned: false,
                write_announced: false,
                plan: None,
                multi_conn_actual: None,
                failure: None,
                epoll: None,
                waiters: CookieMap::default(),
                reconnect: None,
                opening: None,
                timer: None,
                servicing_timers: false,
            }),
            private_data: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            writer: OnceLock::new(),
        }
    }

    pub fn lock(&self) -> PthreadGuard<'_, Handle> {
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

impl Handle {
    // ---- settings and the links' common core ---------------------------------

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// The lead link's core: the protocol settings every link is made
    /// with, and what the server said about the export (every link sees
    /// the same export). With one link, the only one.
    pub fn conn(&self) -> &Connection<UserBuf> {
        self.links[0].conn()
    }

    /// The lead link's core, to change settings or issue an option.
    pub fn conn_mut(&mut self) -> &mut Connection<UserBuf> {
        self.links[0].conn_mut()
    }

    /// The lead link: the one that connects first, and negotiates in opt
    /// mode.
    pub fn link_mut(&mut self) -> &mut Link {
        &mut self.links[0]
    }

    // ---- multi-conn ------------------------------------------------------------

    /// `nbd_rs_get_multi_conn`: the number wanted until the lead link's
    /// handshake ends, then the number of links the handle has (1 after
    /// a downgrade).
    pub fn multi_conn(&self) -> u32 {
        self.multi_conn_actual.unwrap_or(self.settings.multi_conn)
    }

    /// Dials the lead link to `addrs`, as every link of the handle will
    /// be: with several links wanted, the others are dialed the same way
    /// once the lead link's handshake ends.
    pub fn dial(&mut self, addrs: Vec<crate::dial::Address>, tcp: Option<String>) -> CResult<()> {
        let plan = Plan { addrs, tcp };
        if self.settings.multi_conn > 1 && self.epoll.is_none() {
            self.epoll = Some(crate::epoll::Epoll::new()?);
        }
        if self.settings.open_timeout > 0 {
            self.prepare_timer()?;
        }
        if self.settings.multi_conn > 1 {
            self.plan = Some(plan.clone());
        }
        self.prepare_reconnect(Redial::Addresses(plan.clone()))?;
        if self.settings.open_timeout > 0 && self.opening.is_none() {
            let now = Instant::now();
            self.opening = Some(Opening {
                deadline: now + Duration::from_secs(self.settings.open_timeout.into()),
                plan: plan.clone(),
                config: self.links[0].conn().config().clone(),
                attempting: true,
                next_at: now,
                attempts: 1,
            });
        }
        let r = self.links[0].dial(&plan);
        if let (Err(e), Some(_)) = (&r, &self.opening) {
            // The first attempt failed at once: the next waits its turn.
            self.debug(|| format!("connect attempt 1 failed: {}", e.msg));
            self.service_timers();
            return self.ended().map_or(Ok(()), Err);
        }
        self.sync_interest();
        r
    }

    /// The epoll instance and the timer that wakes it, which reconnecting
    /// and the open timeout use: the descriptor stays the same whatever
    /// the links do.
    fn prepare_timer(&mut self) -> CResult<()> {
        if self.epoll.is_none() {
            self.epoll = Some(crate::epoll::Epoll::new()?);
        }
        if self.timer.is_none() {
            let timer = Timer::new()?;
            if let Some(ep) = self.epoll.as_mut() {
                ep.watch_timer(timer.fd())?;
            }
            self.timer = Some(timer);
        }
        Ok(())
    }

    /// With a reconnect delay set, prepares reconnecting lost links as
    /// `how` says; before the lead link connects.
    pub fn prepare_reconnect(&mut self, how: Redial) -> CResult<()> {
        if self.settings.reconnect_delay == 0 || self.reconnect.is_some() {
            return Ok(());
        }
        self.prepare_timer()?;
        self.links[0].conn_mut().config_mut()?.keep_commands_on_loss = true;
        self.reconnect = Some(Reconnecting {
            delay: Duration::from_secs(self.settings.reconnect_delay.into()),
            how,
            outages: Vec::new(),
            count: 0,
        });
        Ok(())
    }

    // ---- the concurrent writer ---------------------------------------------------

    /// Installs the concurrent writer, once.
    pub fn set_writer(&mut self, writer: Arc<ConcurrentWriter>) -> CResult<()> {
        if self.links[0].writer().is_some() {
            return Err(CError::new(libc::EINVAL, "a concurrent writer is already set"));
        }
        if let Some(why) = self.settings.beyond_one_socket() {
            return Err(CError::new(
                libc::EINVAL,
                format!("a concurrent writer writes to the handle's one socket, but {why}"),
            ));
        }
        self.links[0].set_writer(writer);
        // What the socket has not taken yet is the writer's now.
        self.send_to_writer();
        Ok(())
    }

    /// Applies `change` to the settings, unless a concurrent writer is
    /// set and they would then take the handle beyond its one socket.
    pub fn change_beside_writer(&mut self, change: impl FnOnce(&mut Settings)) -> CResult<()> {
        let s = &mut self.settings;
        let old = (s.multi_conn, s.reconnect_delay, s.open_timeout);
        change(s);
        if let (Some(_), Some(why)) = (self.links[0].writer(), self.settings.beyond_one_socket()) {
            let s = &mut self.settings;
            (s.multi_conn, s.reconnect_delay, s.open_timeout) = old;
            return Err(CError::new(
                libc::EINVAL,
                format!("{why}, but a concurrent writer is set, which writes to the handle's one socket"),
            ));
        }
        Ok(())
    }

    /// With a concurrent writer, hands it what waits to be sent, so that
    /// the caller never waits for writability on the library's behalf;
    /// and kills the connection if the writer reported an error.
    pub fn send_to_writer(&mut self) {
        let Some(w) = self.links[0].writer() else { return };
        if w.error().is_some() || self.links[0].conn().direction().wants_write() {
            self.link_writable(0);
        }
    }

    /// A socket the caller hands over cannot be connected again.
    pub fn refuse_redial(&self, what: &str) -> CResult<()> {
        if self.settings.reconnect_delay > 0 {
            return Err(CError::new(
                libc::EINVAL,
                format!(
                    "a reconnect delay is set, but {what} cannot be dialed again; \
                     set the delay to 0 or connect another way (an address, a command)"
                ),
            ));
        }
        Ok(())
    }

    /// A transport that carries one channel (`what`: a socket, a command)
    /// cannot have several links.
    pub fn refuse_one_channel(&self, what: &str) -> CResult<()> {
        match self.settings.multi_conn {
            1 => Ok(()),
            n => Err(CError::new(
                libc::EINVAL,
                format!(
                    "multi-conn is set to {n}, but {what} carries only one connection; \
                     set multi-conn to 1 or connect to an address (Unix socket, TCP or vsock)"
                ),
            )),
        }
    }

    /// The lead link finished its handshake: the handle settles on one
    /// link if the export does not allow several (CAN_MULTI_CONN), else
    /// dials the others with what the lead link negotiated.
    fn lead_connected(&mut self) {
        let Some(plan) = self.plan.take() else { return };
        let wanted = self.settings.multi_conn;
        let lead = self.links[0].conn();
        if !lead.export().flags.contains(nbd_proto::TransmissionFlags::CAN_MULTI_CONN) {
            self.multi_conn_actual = Some(1);
            self.debug(|| format!("multi-conn: the server does not allow {wanted} connections; using one"));
            return;
        }
        let config = lead.follower_config();
        self.multi_conn_actual = Some(wanted);
        self.debug(|| format!("multi-conn: dialing {} more connections", wanted - 1));
        for _ in 1..wanted {
            let mut conn = Connection::new(config.clone());
            conn.set_trace(self.debug);
            let mut link = Link::new(conn);
            let r = link.dial(&plan);
            self.links.push(link);
            if let Err(e) = r {
                self.fail_all(e);
                return;
            }
        }
    }

    /// Link `at` (not the lead) finished its handshake: it must see the
    /// export the lead link sees, else the handle dies (EPROTO) naming
    /// what differs.
    fn verify_link(&mut self, at: usize) {
        if let Some(what) = self.links[0].conn().export_difference(self.links[at].conn()) {
            let n = self.links.len();
            self.fail_all(CError::new(
                libc::EPROTO,
                format!("multi-conn: connection {} of {n} sees a different export than the first: {what}", at + 1),
            ));
        }
    }

    /// The handle dies with `why`: every link still alive fails, with
    /// every command it carries.
    fn fail_all(&mut self, why: CError) {
        let errno = if why.errno != 0 { why.errno } else { libc::EIO };
        let msg = why.msg.clone();
        if self.failure.is_none() {
            self.failure = Some(why);
        }
        for link in &mut self.links {
            if !matches!(link.conn().state(), PublicState::Dead | PublicState::Closed) {
                // Dead even where a loss would be kept for a reconnect.
                link.conn_mut().handle_fatal_error(errno, &msg);
            }
        }
    }

    /// Any link that died kills the handle: the others fail with its error.
    fn propagate_death(&mut self) {
        if self.links.len() < 2 {
            return;
        }
        let alive = |l: &Link| !matches!(l.conn().state(), PublicState::Dead | PublicState::Closed);
        // A link the server hung up on (closed with an error, as a lone
        // connection would be) kills the handle as a dead one does.
        let died = |l: &Link| match l.conn().state() {
            PublicState::Dead => true,
            PublicState::Closed => l.conn().error().is_some(),
            _ => false,
        };
        let Some(dead) = self.links.iter().position(died) else { return };
        if !self.links.iter().any(alive) {
            if self.failure.is_none() {
                self.failure = self.links[dead].ended();
            }
            return;
        }
        let why = self.links[dead].ended().unwrap_or_else(|| CError::new(libc::EIO, "connection is dead"));
        self.fail_all(why);
    }

    /// Brings the epoll instance (if the handle has one) in line with
    /// what each link waits for: always reading (a reply, or the server
    /// hanging up), writing while output waits. Called after the links
    /// sent what they could, so writing means a full socket or a connect
    /// under way.
    pub fn sync_interest(&mut self) {
        let Some(ep) = self.epoll.as_mut() else { return };
        for (at, link) in self.links.iter().enumerate() {
            ep.update(at, link.fd(), link.socket_serial(), link.direction());
        }
    }

    // ---- reconnecting ----------------------------------------------------------

    /// Whether a link is lost and waits to be back (or for its delay), or
    /// the first connect waits for its next attempt: the timer, on the
    /// epoll instance, will move things on.
    pub fn reconnecting(&self) -> bool {
        (self.reconnect.is_some() && self.links.iter().any(|l| l.conn().is_lost()))
            || self.opening.as_ref().is_some_and(|o| !o.attempting)
    }

    /// The timers' work: the first connect's attempts, then every lost
    /// link's outage; then the timer is armed for what is due next.
    fn service_timers(&mut self) {
        // Called from every dispatch: with nothing lost and the first
        // connect done, it costs no clock read and no system call.
        let busy = self.opening.is_some()
            || self.links.iter().any(|l| l.conn().is_lost())
            || self.reconnect.as_ref().is_some_and(|r| r.outages.iter().any(Option::is_some));
        if self.timer.is_none() || !busy {
            return;
        }
        let now = Instant::now();
        let mut next = self.service_opening(now);
        next = next.into_iter().chain(self.service_reconnects(now)).min();
        if let Some(t) = self.timer.as_mut() {
            t.clear();
            t.arm(next, now);
        }
        self.dispatch();
    }

    /// Moves the first connect on: a failed attempt is followed by
    /// another 1 s later while the open timeout lasts; the last failure
    /// stands. Returns when it next needs the timer.
    fn service_opening(&mut self, now: Instant) -> Option<Instant> {
        let op = self.opening.as_mut()?;
        let lead = &self.links[0];
        let state = lead.conn().state();
        if !matches!(state, PublicState::Created | PublicState::Connecting | PublicState::Dead) {
            // The handshake ended (or the handle closed): done.
            self.opening = None;
            return None;
        }
        if op.attempting {
            let transport = matches!(lead.conn().error(), Some(nbd_proto::Error::Transport(_)));
            let failed = lead.has_dial_error()
                || (state == PublicState::Dead && transport)
                || (state == PublicState::Created && !lead.is_dialing() && lead.fd() < 0);
            if !failed {
                return None;
            }
            if now + OPEN_RETRY > op.deadline {
                // Out of time: this failure is the connect's.
                let why = lead.conn().error().map_or_else(|| "connect failed".to_owned(), ToString::to_string);
                self.opening = None;
                self.debug(|| format!("connect attempt failed ({why}); the open timeout is over"));
                if state == PublicState::Created && !self.links[0].has_dial_error() {
                    self.links[0].conn_mut().handle_transport_error(libc::ECONNREFUSED, "connect");
                }
                return None;
            }
            let core_error = lead.conn().error().map(ToString::to_string);
            let why = match (self.links[0].take_dial_error(), core_error) {
                (Err(e), _) => e.msg,
                (Ok(()), Some(e)) => e,
                (Ok(()), None) => "connect failed".to_owned(),
            };
            let op = self.opening.as_mut()?;
            let (n, left) = (op.attempts, op.deadline.saturating_duration_since(now).as_secs());
            op.attempting = false;
            op.next_at = now + OPEN_RETRY;
            let mut conn = Connection::new(op.config.clone());
            conn.set_trace(self.debug);
            self.links[0] = Link::new(conn);
            self.debug(|| format!("connect attempt {n} failed: {why}; next in 1 s ({left} s left)"));
        }
        let op = self.opening.as_mut()?;
        if now < op.next_at {
            return Some(op.next_at);
        }
        op.attempting = true;
        op.attempts += 1;
        let (n, plan) = (op.attempts, op.plan.clone());
        self.debug(|| format!("connect attempt {n}"));
        if let Err(e) = self.links[0].dial(&plan) {
            self.debug(|| format!("connect attempt {n} failed at once: {}", e.msg));
            // Looked at again at once: retried or final.
            return Some(now);
        }
        None
    }

    /// Reconnects that succeeded, on every link.
    pub fn reconnect_count(&self) -> u64 {
        self.reconnect.as_ref().map_or(0, |r| r.count)
    }

    /// Moves every lost link's outage on: notes a loss, an attempt that
    /// failed or a link that is back; gives up when the delay has passed;
    /// starts the attempts that are due; arms the timer for the next
    /// step. Called after every I/O step; cheap when nothing is lost.
    fn service_reconnects(&mut self, now: Instant) -> Option<Instant> {
        let rc = self.reconnect.as_mut()?;
        if rc.outages.iter().all(Option::is_none) && !self.links.iter().any(|l| l.conn().is_lost()) {
            return None;
        }
        rc.outages.resize_with(self.links.len(), || None);
        let mut said = Vec::new();
        for (at, link) in self.links.iter_mut().enumerate() {
            let n = at + 1;
            let slot = &mut rc.outages[at];
            let lost = link.conn().is_lost();
            let o = match (slot.as_mut(), lost) {
                (None, false) => continue,
                (None, true) => {
                    let why = link.conn().error().map_or_else(String::new, ToString::to_string);
                    said.push(format!(
                        "connection {n}: lost ({why}); commands wait up to {} s for it to be back",
                        rc.delay.as_secs()
                    ));
                    slot.insert(Outage::new(now))
                }
                (Some(o), false) => {
                    // Back; or dead, a restart whose export differed; or
                    // closed by a shutdown while lost.
                    match (link.conn().state(), link.conn().error()) {
                        (PublicState::Dead, Some(e)) => {
                            said.push(format!("connection {n}: attempt {}: {e}; the handle is dead", o.attempts()))
                        }
                        (PublicState::Dead | PublicState::Closed, _) => {}
                        _ => {
                            rc.count += 1;
                            said.push(format!(
                                "connection {n}: reconnected at attempt {}; the export is the one it had",
                                o.attempts()
                            ));
                        }
                    }
                    *slot = None;
                    continue;
                }
                (Some(o), true) => o,
            };
            if o.attempting() && link.conn().awaits_restart() {
                // The core's record names the errno; a dial that fell back
                // to the next address left only its own.
                let dialed = link.take_dial_error().err().map(|e| e.msg);
                let why = match (link.conn().error(), dialed) {
                    (Some(e), _) => e.to_string(),
                    (None, Some(msg)) => msg,
                    (None, None) => "failed".to_owned(),
                };
                said.push(format!("connection {n}: attempt {} failed: {why}", o.attempts()));
                o.attempt_failed(now, why);
            }
            loop {
                match o.due(now, rc.delay) {
                    Due::Nothing => break,
                    Due::GiveUp => {
                        o.gave_up_now();
                        link.conn_mut().give_up();
                        said.push(format!(
                            "connection {n}: not back after {} s: commands fail until it is; attempts go on",
                            rc.delay.as_secs()
                        ));
                    }
                    Due::AttemptTimedOut => {
                        let why = format!("no handshake after {} s", crate::reconnect::ATTEMPT_LIMIT.as_secs());
                        said.push(format!("connection {n}: attempt {} failed: {why}", o.attempts()));
                        link.conn_mut().handle_transport_error(libc::ETIMEDOUT, "reconnect attempt");
                        link.close_if_over();
                        o.attempt_failed(now, why);
                    }
                    Due::Attempt => {
                        o.attempt_started(now);
                        said.push(format!("connection {n}: reconnecting, attempt {}", o.attempts()));
                        if let Err(e) = link.redial(&rc.how) {
                            said.push(format!("connection {n}: attempt {} failed: {}", o.attempts(), e.msg));
                            o.attempt_failed(now, e.msg);
                        }
                    }
                }
            }
        }
        let next = rc.outages.iter().flatten().filter_map(|o| o.deadline(rc.delay)).min();
        for msg in said {
            self.debug(|| msg);
        }
        next
    }

    pub fn connected_via(&self) -> &ConnectedVia {
        &self.connected_via
    }

    pub fn connected_via_mut(&mut self) -> &mut ConnectedVia {
        &mut self.connected_via
    }

    /// The server process the handle started, if any.
    pub fn subprocess_pid(&self) -> Option<libc::pid_t> {
        self.links.iter().find_map(|l| l.subprocess()).map(|s| s.pid)
    }

    // ---- the handle's state -------------------------------------------------

    /// The handle's state, in libnbd's terms. With one link, that link's.
    /// With several, the one rule nbd-rs(3) states: dead if any link
    /// died; closed when all are closed; the lead link's state until its
    /// handshake ends; connecting until every link finished its
    /// handshake; processing if any link has work (or is closing); else
    /// ready.
    pub fn state(&self) -> PublicState {
        let lead = self.links[0].conn().state();
        if self.opening.as_ref().is_some_and(|o| !o.attempting) {
            // Between two attempts of the first connect.
            return PublicState::Connecting;
        }
        if self.links.len() == 1 && self.plan.is_none() {
            return lead;
        }
        let states = || self.links.iter().map(|l| l.conn().state());
        if states().any(|s| s == PublicState::Dead) || self.failure.is_some() {
            return PublicState::Dead;
        }
        if states().all(|s| s == PublicState::Closed) {
            return PublicState::Closed;
        }
        match lead {
            PublicState::Created | PublicState::Connecting | PublicState::Negotiating => return lead,
            _ => {}
        }
        if self.plan.is_some() || states().any(|s| matches!(s, PublicState::Created | PublicState::Connecting)) {
            return PublicState::Connecting;
        }
        if states().any(|s| matches!(s, PublicState::Processing | PublicState::Closed)) {
            return PublicState::Processing;
        }
        PublicState::Ready
    }

    /// Whether the handle is in `state` (`nbd_aio_is_*`); a handle a panic
    /// went through is dead.
    pub fn is_in(&self, state: PublicState) -> bool {
        match self.poisoned {
            true => state == PublicState::Dead,
            false => self.state() == state,
        }
    }

    /// The state as the export table sees it.
    pub fn public_state(&self) -> table::States {
        if self.poisoned {
            return table::DEAD;
        }
        match self.state() {
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
        match self.state() {
            PublicState::Created => c"START: Handle after being initially created",
            PublicState::Connecting if self.links.iter().any(Link::is_dialing) => {
                c"CONNECT.CONNECTING: Connecting to the remote server"
            }
            PublicState::Connecting => c"MAGIC.RECV_MAGIC: Receive initial magic identification from remote",
            PublicState::Negotiating => c"NEGOTIATING: Connection is ready to negotiate an NBD option",
            PublicState::Ready => c"READY: Connection is ready to process NBD commands",
            PublicState::Processing if self.conn().direction().wants_write() => {
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

    /// Why the handle's connection is over, if it is dead or closed.
    pub fn ended(&self) -> Option<CError> {
        if self.links.len() == 1 {
            return self.links[0].ended();
        }
        if let Some(f) = &self.failure {
            return Some(f.clone());
        }
        if let Some(dead) = self.links.iter().find(|l| l.conn().state() == PublicState::Dead) {
            return dead.ended();
        }
        match self.state() {
            PublicState::Closed => self.links[0].ended(),
            _ => None,
        }
    }

    /// The descriptor the caller polls, -1 without one: with one link,
    /// its socket; on a multi-conn handle, the epoll instance over every
    /// link's socket, the same for the handle's life.
    pub fn fd(&self) -> c_int {
        if let Some(ep) = &self.epoll {
            return match self.links.iter().any(|l| l.fd() >= 0) || self.reconnecting() {
                true => ep.fd(),
                false => -1,
            };
        }
        match self.links.as_slice() {
            [link] => link.fd(),
            _ => -1,
        }
    }

    /// `LIBNBD_AIO_DIRECTION_*` as libnbd reports it: what any link waits
    /// for; on a multi-conn handle, READ (the epoll instance becomes
    /// readable) whenever any link waits for anything.
    pub fn direction(&self) -> c_uint {
        let d = self.links.iter().fold(0, |d, l| d | l.direction());
        match (&self.epoll, d) {
            // A lost link waits for its timer, on the epoll instance.
            (Some(_), 0) if self.reconnecting() => crate::constants::LIBNBD_AIO_DIRECTION_READ,
            (Some(_), 0) => 0,
            (Some(_), _) => crate::constants::LIBNBD_AIO_DIRECTION_READ,
            (None, d) => d,
        }
    }

    /// Whether the handle's descriptor is an epoll instance over several
    /// links.
    pub fn has_epoll(&self) -> bool {
        self.epoll.is_some()
    }

    /// Traffic counters (`nbd_stats_*`), summed over every link.
    pub fn stats(&self) -> nbd_proto::Stats {
        self.links.iter().map(|l| l.conn().stats()).fold(nbd_proto::Stats::default(), |a, b| nbd_proto::Stats {
            bytes_sent: a.bytes_sent + b.bytes_sent,
            bytes_received: a.bytes_received + b.bytes_received,
            chunks_sent: a.chunks_sent + b.chunks_sent,
            chunks_received: a.chunks_received + b.chunks_received,
        })
    }

    /// Commands submitted and not yet answered, on every link.
    pub fn in_flight(&self) -> usize {
        self.links.iter().map(|l| l.conn().in_flight()).sum()
    }

    /// `aio_get_direction` said `direction`: a write event is now expected.
    pub fn announce(&mut self, direction: c_uint) {
        if self.epoll.is_some() {
            // Before the caller sleeps on the epoll instance, what waits
            // to be sent goes (a burst of submissions in one send per
            // link); a link waits for writability only if its socket
            // would not take it all.
            for at in 0..self.links.len() {
                if self.links[at].direction() & crate::constants::LIBNBD_AIO_DIRECTION_WRITE != 0 {
                    self.link_writable(at);
                }
            }
            self.sync_interest();
        }
        self.write_announced = direction & crate::constants::LIBNBD_AIO_DIRECTION_WRITE != 0;
    }

    /// Whether `aio_get_direction` announced a write event that has not
    /// come yet.
    pub fn write_was_announced(&self) -> bool {
        self.write_announced
    }

    /// The caller reported a write event.
    pub fn write_event_came(&mut self) {
        self.write_announced = false;
    }

    // ---- debugging --------------------------------------------------------------

    pub fn debugging(&self) -> bool {
        self.debug
    }

    /// Turns debug messages on or off (the cores note the handshake's
    /// facts only while they are on).
    pub fn set_debug(&mut self, on: bool) {
        if on && !self.debug {
            // Transitions are logged from the state debugging starts in.
            self.debug_state = self.state();
        }
        self.debug = on;
        for link in &mut self.links {
            link.conn_mut().set_trace(on);
        }
    }

    /// Replaces the debug callback (the old one's `free` runs now).
    pub fn set_debug_callback(&mut self, cb: Option<Owned<nbd_debug_callback>>) {
        self.debug_cb = cb;
    }

    /// The export being run, named in debug messages.
    pub fn set_context(&mut self, function: &'static str) {
        self.context = function;
    }

    pub fn context(&self) -> &'static str {
        self.context
    }

    /// Logs a change of the public state since the last one logged, and
    /// why the handle died if it did.
    pub fn debug_transition(&mut self) {
        if !self.debug || self.state() == self.debug_state {
            return;
        }
        let (from, to) = (self.debug_state, self.state());
        self.debug(|| format!("transition: {} -> {}", from.name(), to.name()));
        self.debug_state = to;
        if to == PublicState::Dead {
            let why = self.ended().unwrap_or_else(|| CError::new(0, "connection is dead"));
            self.debug(|| format!("handle dead: {}", crate::error::error_text(self.context, &why)));
        }
    }

    /// Logs what the handshakes learned since last asked, in libnbd's words.
    fn debug_notes(&mut self) {
        for at in 0..self.links.len() {
            while let Some(note) = self.links[at].conn_mut().poll_note() {
                let conn = self.links[at].conn();
                let (sr, eh) = (conn.structured_replies_negotiated(), conn.extended_headers_negotiated());
                for line in crate::trace::note_lines(&note, sr, eh) {
                    self.debug(|| line);
                }
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
            None => {
                eprintln!("libnbd: debug: {}: {}: {text}", self.settings.handle_name.to_string_lossy(), self.context)
            }
        }
    }

    /// A transport finished its handshake (TLS): say so, as libnbd does.
    fn debug_established(&self, about: Option<String>) {
        if let Some(about) = about {
            self.debug(|| format!("connection is using TLS: {about}"));
        }
    }

    // ---- commands --------------------------------------------------------------

    /// Submits `command` (`issue` hands it to a link's core) and returns
    /// the cookie C knows it by. It leaves at once if its link is idle;
    /// behind commands still awaiting replies it waits for the next poll
    /// or notify call, so that a burst of submissions leaves in one send.
    /// Like Nagle's algorithm, this never delays a lone command, and a
    /// reply is always due to wake even a caller that ignores the write
    /// direction (notify_read sends too).
    pub fn submit(
        &mut self,
        command: Command,
        issue: impl FnOnce(&mut Connection<UserBuf>) -> Result<Cookie, nbd_proto::Error>,
    ) -> CResult<Cookie> {
        // The link that carries it: the one with the fewest commands in
        // flight, among those in transmission; a lost link (which holds
        // its commands) only if every link is lost.
        let at = match self.links.len() {
            1 => 0,
            _ => (0..self.links.len())
                .filter(|&at| matches!(self.links[at].conn().state(), PublicState::Ready | PublicState::Processing))
                .min_by_key(|&at| (self.links[at].conn().is_lost(), self.links[at].conn().in_flight()))
                .unwrap_or(0),
        };
        let link = &mut self.links[at];
        let idle = link.conn().in_flight() == 0;
        let core = issue(link.conn_mut())?;
        self.last_cookie += 1;
        let cookie = self.last_cookie;
        link.route(core, cookie);
        self.commands.insert(cookie, Command { link: at, ..command });
        if idle {
            self.link_writable(at);
        }
        Ok(cookie)
    }

    /// Whether the command `cookie` completed and awaits retirement.
    pub fn is_completed(&self, cookie: Cookie) -> bool {
        self.commands.get(&cookie).is_some_and(|c| c.outcome.is_some())
    }

    /// The first completed command not yet retired.
    pub fn first_completed(&self) -> Option<Cookie> {
        self.completed.front().copied()
    }

    /// Commands submitted and not yet completed, as C counts them.
    pub fn commands_in_flight(&self) -> usize {
        self.commands.len() - self.completed.len()
    }

    /// Retires the command `cookie` if it completed: `Some(Ok(()))` if it
    /// succeeded, its error if it failed; `None` if it is in flight or
    /// unknown. Its callbacks are freed now, once.
    pub fn retire(&mut self, cookie: Cookie) -> Option<CResult<()>> {
        let errno = self.commands.get(&cookie)?.outcome?;
        let at = self.completed.iter().position(|&c| c == cookie)?;
        self.completed.remove(at);
        let command = self.commands.remove(&cookie)?;
        Some(match (errno, command.failure) {
            (0, _) => Ok(()),
            (e, Some(why)) => Err(CError::new(e, format!("{}: {why}", command.what))),
            (e, None) => Err(CError::new(e, format!("{}: command failed", command.what))),
        })
    }

    /// Commands still in flight when the handle closes are told they
    /// failed, as libnbd 1.22 does: the completion callback runs with the
    /// command's error, ENOTCONN if it has none; then the chunk or extent
    /// callback's `free` runs, and the completion's last.
    pub fn abandon_in_flight(&mut self) {
        let mut cookies: Vec<Cookie> =
            self.commands.iter().filter(|(_, c)| c.outcome.is_none()).map(|(&cookie, _)| cookie).collect();
        cookies.sort_unstable();
        for cookie in cookies {
            let Some(mut c) = self.commands.remove(&cookie) else { continue };
            c.zero_if_failed(libc::ENOTCONN);
            let mut err = if c.callback_error != 0 { c.callback_error } else { libc::ENOTCONN };
            if let Some(cb) = c.callbacks.completion.as_ref().map(|c| *c.get()) {
                if let Some(f) = cb.callback {
                    // SAFETY: the caller's completion callback with its user data.
                    unsafe { f(cb.user_data, &mut err) };
                }
            }
            drop(c.callbacks.chunk.take());
            drop(c.callbacks.extent.take());
            drop(c.callbacks.completion.take());
        }
    }

    // ---- options -------------------------------------------------------------------

    /// An `opt_*` command was issued: its callbacks wait for its end.
    pub fn start_option(&mut self, pending: OptPending) {
        self.opt = Some(pending);
        self.last_option_error = None;
    }

    /// Whether the option under way (if any) finished.
    pub fn option_done(&self) -> bool {
        self.opt.as_ref().is_none_or(|o| o.done.is_some())
    }

    pub fn take_option(&mut self) -> Option<OptPending> {
        self.opt.take()
    }

    /// How the server refused the last option, in its own words.
    pub fn take_option_error(&mut self) -> Option<String> {
        self.last_option_error.take()
    }

    // ---- the I/O loop, for every link ----------------------------------------------

    /// Sends what can be sent without blocking, on every link.
    pub fn notify_write(&mut self) {
        for at in 0..self.links.len() {
            self.link_writable(at);
        }
        self.service_timers();
        self.sync_interest();
    }

    /// Receives what has arrived, without blocking, on every link: on a
    /// multi-conn handle, on every link the epoll instance says is ready.
    pub fn notify_read(&mut self) {
        if let Some(ep) = &self.epoll {
            for r in ep.ready() {
                if r.link >= self.links.len() {
                    continue;
                }
                if r.read {
                    self.link_readable(r.link);
                }
                if r.write {
                    self.link_writable(r.link);
                }
            }
            self.service_timers();
            self.sync_interest();
            return;
        }
        for at in 0..self.links.len() {
            self.link_readable(at);
        }
    }

    /// Services link `at` for a write event, then its events.
    fn link_writable(&mut self, at: usize) {
        if self.links[at].send() {
            self.dispatch();
        }
    }

    /// Services link `at` for a read event, then its events.
    fn link_readable(&mut self, at: usize) {
        if let Some(established) = self.links[at].receive() {
            self.debug_established(established);
            self.dispatch();
        }
    }

    /// Takes the error a non-blocking connect ended with, if any.
    pub fn take_dial_error(&mut self) -> CResult<()> {
        // A lost link's failed attempts are its outage's business.
        if !self.links[0].conn().is_lost() {
            self.links[0].take_dial_error()?;
        }
        for at in 1..self.links.len() {
            if self.links[at].conn().is_lost() {
                continue;
            }
            if let Err(e) = self.links[at].take_dial_error() {
                // A further link that cannot connect fails the handle; the
                // lead link's failure is handled as on a lone connection.
                self.fail_all(e.clone());
                self.dispatch();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits once for the links to be ready in the direction each wants,
    /// and services them. `Ok(false)` on timeout.
    pub fn poll_once(&mut self, timeout_ms: c_int) -> CResult<bool> {
        self.poll_once_with(timeout_ms, -1)
    }

    /// As [`Self::poll_once`], also waking when `extra_fd` (ignored if
    /// negative) is readable: `Ok(true)` then, even if no link is.
    pub fn poll_once_with(&mut self, timeout_ms: c_int, extra_fd: c_int) -> CResult<bool> {
        self.notify_write();
        let timer = self.timer.as_ref().map(Timer::fd);
        self.take_dial_error()?;
        if let Some(at) = self.links.iter().position(Link::has_input_for_core) {
            let established = self.links[at].progress();
            self.debug_established(established);
            self.dispatch();
            return Ok(true);
        }
        if self.direction() == 0 {
            // Sending changed the state (DISC or ABORT left): progress.
            return Ok(true);
        }
        if self.links.iter().all(|l| l.fd() < 0) && !self.reconnecting() {
            return Err(CError::new(libc::EINVAL, "not connected"));
        }
        let mut fds: Vec<libc::pollfd> = self
            .links
            .iter()
            .map(|l| {
                let dir = l.direction();
                let mut events = 0;
                if dir & 1 != 0 {
                    events |= libc::POLLIN;
                }
                if dir & 2 != 0 {
                    events |= libc::POLLOUT;
                }
                libc::pollfd { fd: l.fd(), events, revents: 0 }
            })
            .collect();
        // Without an extra descriptor, none in the array (poll ignores a
        // negative fd, but the count is what a syscall trace shows).
        for fd in [timer.unwrap_or(-1), extra_fd] {
            if fd >= 0 {
                fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            }
        }
        self.debug(|| format!("poll start: events={:x}", fds[0].events));
        // SAFETY: `fds.len()` valid pollfds in a vector we own.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        self.debug(|| format!("poll end: r={r} revents={:x}", fds[0].revents));
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
        for (at, pfd) in fds.iter().take(self.links.len()).enumerate() {
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.link_readable(at);
            }
            if pfd.revents & libc::POLLOUT != 0 {
                self.link_writable(at);
            }
        }
        self.service_timers();
        self.take_dial_error()?;
        self.sync_interest();
        Ok(true)
    }

    /// Waits for the command `cookie` to complete. On a multi-conn handle
    /// the lock is released while waiting in poll(2), so that threads
    /// making synchronous calls run at once, each on its command's link:
    /// each waits for its link's socket and for its own eventfd, which a
    /// thread that completes the command on its behalf writes to.
    pub fn wait_for(g: &mut Locked<'_>, cookie: Cookie) -> CResult<()> {
        if g.links.len() < 2 {
            return g.run_until(|i| i.is_completed(cookie));
        }
        let wake_fd = WAKE.with(|w| w.as_ref().map(|fd| fd.as_raw_fd())).ok_or_else(|| CError::last_os("eventfd"))?;
        loop {
            if g.is_completed(cookie) {
                return Ok(());
            }
            if let Some(e) = g.ended() {
                return Err(e);
            }
            let Some(at) = g.commands.get(&cookie).map(|c| c.link) else {
                return Err(CError::new(libc::EINVAL, "the command is not in flight"));
            };
            g.link_writable(at);
            if g.links[at].has_input_for_core() {
                let established = g.links[at].progress();
                g.debug_established(established);
                g.dispatch();
                continue;
            }
            let lost = g.links[at].conn().is_lost();
            let (fd, dir, serial) = (g.links[at].fd(), g.links[at].direction(), g.links[at].socket_serial());
            if !lost && (fd < 0 || dir == 0) {
                // The link is over: its end is reported above.
                g.dispatch();
                if g.ended().is_none() && !g.is_completed(cookie) {
                    return Err(CError::new(libc::ENOTCONN, "the connection cannot make progress"));
                }
                continue;
            }
            let mut events = 0;
            if dir & 1 != 0 {
                events |= libc::POLLIN;
            }
            if dir & 2 != 0 {
                events |= libc::POLLOUT;
            }
            // A lost link also waits for the timer of its next attempt or
            // of its delay (poll skips a negative descriptor).
            let timer = if lost { g.timer.as_ref().map_or(-1, Timer::fd) } else { -1 };
            let mut fds = [
                libc::pollfd { fd: if dir == 0 { -1 } else { fd }, events, revents: 0 },
                libc::pollfd { fd: wake_fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: timer, events: libc::POLLIN, revents: 0 },
            ];
            g.waiters.insert(cookie, wake_fd);
            // SAFETY: three valid pollfds in an array we own; the handle's
            // lock is released meanwhile, and nothing of it is touched.
            let r = g.unlocked(|| unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) });
            g.waiters.remove(&cookie);
            if fds[1].revents != 0 {
                let mut n = [0u8; 8];
                // SAFETY: reading an eventfd's 8-byte counter into a buffer we own.
                unsafe { libc::read(wake_fd, n.as_mut_ptr().cast(), 8) };
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(CError::os("poll", &e));
            }
            if fds[2].revents != 0 {
                g.service_timers();
                g.sync_interest();
            }
            // Another thread may have closed or replaced the socket.
            if g.links[at].fd() != fd || g.links[at].socket_serial() != serial {
                continue;
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                g.link_readable(at);
            }
            if fds[0].revents & libc::POLLOUT != 0 {
                g.link_writable(at);
            }
            g.sync_interest();
        }
    }

    /// Drives the links until `done` holds, failing if the handle can no
    /// longer make progress.
    pub fn run_until(&mut self, done: impl Fn(&Handle) -> bool) -> CResult<()> {
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

    // ---- connecting and disconnecting ------------------------------------------------

    /// STARTTLS was accepted on `link`: TLS goes below its NBD stream,
    /// checking the certificate against the TLS host name, else the host
    /// connected to.
    fn start_tls(&mut self, link: usize) {
        let host = match (&self.settings.tls_hostname, &self.connected_via.transport) {
            (Some(name), _) => Some(name.clone()),
            (None, Some(crate::uri::Transport::Tcp { host, .. })) => Some(host.clone()),
            _ => None,
        };
        self.links[link].start_tls(&self.settings.tls, host.as_deref());
    }

    /// Asks every link to disconnect (NBD_CMD_DISC after what is queued).
    pub fn disconnect(&mut self) -> Result<(), nbd_proto::Error> {
        let r = self.links.iter_mut().try_for_each(|l| l.conn_mut().disconnect());
        // A lost link closed at once, failing what it held.
        self.dispatch();
        r
    }

    /// Fails every request not yet sent, on every link (ENOTCONN).
    pub fn abandon_unsent(&mut self) {
        for link in &mut self.links {
            link.conn_mut().abandon_unsent();
        }
        self.dispatch();
    }

    // ---- events -------------------------------------------------------------------------

    /// Turns the links' events into callbacks and completion records.
    pub fn dispatch(&mut self) {
        loop {
            self.propagate_death();
            for link in &mut self.links {
                link.close_if_over();
            }
            if self.debug {
                self.debug_notes();
                self.debug_transition();
            }
            let mut any = false;
            for at in 0..self.links.len() {
                while let Some(ev) = self.links[at].conn_mut().poll_event() {
                    any = true;
                    self.on_event(at, ev);
                }
            }
            if !any || self.links.len() == 1 {
                break;
            }
        }
        // A link lost by whatever just happened (a send from a submit,
        // say) must have its first attempt made and the timer armed
        // before the caller sleeps on the descriptor.
        if self.timer.is_some() && !self.servicing_timers {
            self.servicing_timers = true;
            self.service_timers();
            self.servicing_timers = false;
        }
    }

    fn on_event(&mut self, link: usize, ev: Event<UserBuf>) {
        match ev {
            Event::Complete { cookie: core, result, .. } => {
                let Some(cookie) = self.links[link].unroute(core) else { return };
                if let Some(&fd) = self.waiters.get(&cookie) {
                    wake(fd);
                }
                let Some(c) = self.commands.get_mut(&cookie) else { return };
                let mut err = match &result {
                    Ok(()) => c.callback_error,
                    Err(e) => e.errno(),
                };
                if let Err(e @ nbd_proto::Error::Server(nbd_proto::ServerError::ExportChanged(_))) = &result {
                    c.failure = Some(e.to_string().into());
                }
                c.zero_if_failed(err);
                let mut retire = false;
                if let Some(cb) = c.callbacks.completion.as_ref().map(|c| *c.get()) {
                    if let Some(f) = cb.callback {
                        // As in libnbd, the callback's `*error` counts
                        // only when it returns -1.
                        let mut said = err;
                        // SAFETY: the caller's completion callback with its user data.
                        match unsafe { f(cb.user_data, &mut said) } {
                            -1 if said != 0 => err = said,
                            1 => retire = true,
                            _ => {}
                        }
                    }
                }
                if retire {
                    // Auto-retired: its callbacks are freed now.
                    self.commands.remove(&cookie);
                } else {
                    c.outcome = Some(err);
                    self.completed.push_back(cookie);
                }
            }
            Event::ReadChunk { cookie: core, offset, length, status } => {
                let Some(c) = self.links[link].routed(core).and_then(|k| self.commands.get_mut(&k)) else { return };
                let Some(cb) = c.callbacks.chunk.as_ref().map(|c| *c.get()) else { return };
                let Some(f) = cb.callback else { return };
                let (kind, mut err) = match status {
                    ChunkStatus::Data => (1, 0),
                    ChunkStatus::Hole => (2, 0),
                    ChunkStatus::Error { errno } => (3, errno),
                };
                let at = offset.saturating_sub(c.offset) as usize;
                // SAFETY: `at + length` lies inside the read's buffer
                // (the core validated the chunk against the request).
                let sub = unsafe { c.buf.add(at) };
                // SAFETY: the caller's chunk callback with its user data.
                let r = unsafe { f(cb.user_data, sub.cast(), length as usize, offset, kind, &mut err) };
                c.callback_returned(r, err);
            }
            Event::Extents { cookie: core, context_id, offset, extents } => {
                let name = self.links[link].conn().meta_context_name(context_id).unwrap_or("").to_owned();
                let Some(c) = self.links[link].routed(core).and_then(|k| self.commands.get_mut(&k)) else { return };
                if let Some(cb) = c.callbacks.extent64.as_ref().map(|c| *c.get()) {
                    let Some(f) = cb.callback else { return };
                    let mut wide: Vec<nbd_extent> =
                        extents.iter().map(|e| nbd_extent { length: e.length, flags: e.flags }).collect();
                    let name = CString::new(name).unwrap_or_default();
                    let mut err = c.callback_error;
                    // SAFETY: the caller's extent64 callback, given a live
                    // array of n extents and a NUL-terminated name.
                    let r = unsafe { f(cb.user_data, name.as_ptr(), offset, wide.as_mut_ptr(), wide.len(), &mut err) };
                    c.callback_returned(r, err);
                    return;
                }
                let Some(cb) = c.callbacks.extent.as_ref().map(|c| *c.get()) else { return };
                let Some(f) = cb.callback else { return };
                // libnbd 1.14's callback takes 32-bit pairs: longer
                // extents are clamped to the largest 32-bit length.
                let mut pairs: Vec<u32> =
                    extents.iter().flat_map(|e| [e.length.min(MAX_EXTENT_32) as u32, e.flags as u32]).collect();
                let name = CString::new(name).unwrap_or_default();
                let mut err = 0;
                // SAFETY: the caller's extent callback, given a live
                // array of 2*n entries and a NUL-terminated name.
                let r = unsafe { f(cb.user_data, name.as_ptr(), offset, pairs.as_mut_ptr(), pairs.len(), &mut err) };
                c.callback_returned(r, err);
            }
            Event::ExportListed { name, description } => {
                let Some(opt) = self.opt.as_mut() else { return };
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
                let Some(opt) = self.opt.as_mut() else { return };
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
                let Some(opt) = self.opt.as_mut() else { return };
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
            Event::StartTls => self.start_tls(link),
            Event::Connected if link == 0 => self.lead_connected(),
            Event::Connected => self.verify_link(link),
            // The outage of a lost link is followed, and logged, by
            // `service_reconnects`.
            Event::TransportLost { .. } | Event::Reconnected => {}
        }
    }
}
