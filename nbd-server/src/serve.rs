//! The event loop: one mio poll over the listeners, every connection's
//! socket, the workers' waker and the signals. Per connection, the
//! receive side parses the next requests while earlier ones are served,
//! and the send side writes replies as they come, in any order. A
//! connection holds at most `max_in_flight` requests and `max_bytes` of
//! buffers and unsent replies; beyond either it stops reading, so a client
//! that never reads its replies cannot make the server buffer without
//! bound.

use crate::backend::Backend;
use crate::log::Log;
use crate::stream::{Metered, Stream};
use crate::workers::{ConnId, Finished, Job, JobResult, Outcome, Work, Workers};
use mio::net::{TcpListener, UnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nbd_io::{pump, Core, Socket};

use nbd_proto::server::{self, BlockSize, Command, Event, Phase, Request, RequestId};
use nbd_proto::wire::nbd_error;
use nbd_proto::TransmissionFlags;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One export: its name and storage.
pub struct ExportSpec {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub read_only: bool,
}

/// How much one connection and the server may take on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are accepted and closed.
    pub max_connections: usize,
    /// Requests one connection may have in flight.
    pub max_in_flight: usize,
    /// Bytes one connection may hold in request buffers and unsent replies.
    pub max_bytes: usize,
    /// Worker threads.
    pub threads: usize,
    /// After SIGTERM or SIGINT, how long requests in flight may take to
    /// finish before their connections are closed anyway.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_in_flight: 64,
            max_bytes: 64 << 20,
            threads: 4,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// Listeners take the tokens from here, connections after them.
const FIRST_LISTENER: usize = 2;

struct Conn {
    generation: u64,
    stream: Stream,
    peer: String,
    core: server::Connection<Vec<u8>>,
    backend: Option<Arc<dyn Backend>>,
    /// Requests a worker has.
    jobs: usize,
    /// Bytes of request buffers held (READ buffers until sent, WRITE
    /// buffers from lending until the write is done).
    held: usize,
    /// Requests that wait for buffer room: a WRITE to lend a buffer to,
    /// a READ to fill one.
    waiting: VecDeque<Request>,
    /// WRITEs whose payload is arriving, until their data is in.
    writes: HashMap<RequestId, Request>,
    /// The meta context ids each BLOCK_STATUS with a worker reports.
    contexts: HashMap<RequestId, Vec<u32>>,
    /// Request buffers given back, reused for the next requests (no
    /// allocation, no zeroing per request).
    spare: Vec<Vec<u8>>,
    interest: Option<Interest>,
}

pub struct Server {
    poll: Poll,
    exports: Vec<ExportSpec>,
    config: server::Config,
    limits: Limits,
    log: Log,
    listeners: Vec<Option<Listener>>,
    conns: Vec<Option<Conn>>,
    generation: u64,
    workers: Workers,
    finished: Receiver<Finished>,
    stopping: bool,
    /// When connections still serving at shutdown are closed anyway.
    deadline: Option<Instant>,
    /// An accept failed (out of descriptors): retried when a connection
    /// closes.
    accept_stalled: bool,
    /// What sessions a client's STARTTLS gets, if TLS is offered.
    tls: Option<nbd_tls::ServerTls>,
    /// A worker has woken the loop and its results are not yet taken.
    woken: Arc<AtomicBool>,
}

impl Server {
    /// `tls`: the TLS context and whether clients may or must use it.
    pub fn new(
        exports: Vec<ExportSpec>,
        listeners: Vec<Listener>,
        limits: Limits,
        tls: Option<(nbd_tls::ServerTls, server::TlsPolicy)>,
        log: Log,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (done, finished) = channel();
        // One wake-up per batch of results: a worker wakes the loop only
        // if no wake-up is pending (the loop clears the flag before it
        // takes the results).
        let woken = Arc::new(AtomicBool::new(false));
        let flag = woken.clone();
        let workers = Workers::start(
            limits.threads,
            done,
            Arc::new(move || {
                if !flag.swap(true, Ordering::AcqRel) {
                    let _ = waker.wake();
                }
            }),
        )?;
        let config = server::Config {
            exports: exports.iter().map(|e| export_of(e, limits.max_bytes)).collect(),
            max_in_flight: limits.max_in_flight,
            tls: tls.as_ref().map_or(server::TlsPolicy::Off, |(_, policy)| *policy),
            ..server::Config::default()
        };
        let mut listeners: Vec<Option<Listener>> = listeners.into_iter().map(Some).collect();
        for (i, l) in listeners.iter_mut().enumerate() {
            let token = Token(FIRST_LISTENER + i);
            match l {
                Some(Listener::Unix(l)) => poll.registry().register(l, token, Interest::READABLE)?,
                Some(Listener::Tcp(l)) => poll.registry().register(l, token, Interest::READABLE)?,
                None => {}
            }
        }
        Ok(Server {
            poll,
            exports,
            config,
            limits,
            log,
            listeners,
            conns: Vec::new(),
            generation: 0,
            workers,
            finished,
            stopping: false,
            deadline: None,
            accept_stalled: false,
            tls: tls.map(|(ctx, _)| ctx),
            woken,
        })
    }

    fn first_conn_token(&self) -> usize {
        FIRST_LISTENER + self.listeners.len()
    }

    /// Serves one connection on stdin, which must be a socket; with no
    /// listener, [`Self::run`] returns when it ends.
    pub fn serve_stdin(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        let fd = io::stdin().as_fd().try_clone_to_owned()?;
        // A connected stream socket of any family (a socketpair from
        // nbd_connect_command, or TCP from inetd); anything else is said
        // now rather than at the first send.
        let kind = rustix::net::sockopt::socket_type(&fd)
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("stdin is not a socket: {e}")))?;
        if kind != rustix::net::SocketType::STREAM {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "stdin is not a stream socket"));
        }
        let sock = Socket::from(fd);
        sock.set_nonblocking(true)?;
        self.adopt(Stream::Plain(sock), "stdin".to_owned());
        Ok(())
    }

    /// Serves until SIGTERM or SIGINT, then finishes the requests in
    /// flight (and a request whose bytes are arriving) and returns, within
    /// [`Limits::shutdown_timeout`] or at a second signal; with no
    /// listener, once every connection ended.
    pub fn run(&mut self) -> io::Result<()> {
        let mut signals =
            signal_hook_mio::v1_0::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
        self.poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        loop {
            let listening = self.listeners.iter().any(Option::is_some);
            if (self.stopping || !listening) && self.conns.iter().all(Option::is_none) {
                return Ok(());
            }
            let timeout = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if timeout == Some(Duration::ZERO) {
                self.abandon("the shutdown timeout passed");
                continue;
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.collect_finished(),
                    SIGNALS => {
                        for sig in signals.pending() {
                            if self.stopping {
                                self.abandon("a second signal came");
                            } else {
                                self.log
                                    .info(|| format!("signal {sig}: finishing the requests in flight, then exiting"));
                                self.stop();
                            }
                        }
                    }
                    Token(t) if t < self.first_conn_token() => self.accept(t - FIRST_LISTENER),
                    Token(t) => self.drive(t - self.first_conn_token()),
                }
            }
        }
    }

    /// Stops listening; connections end once their requests are served.
    fn stop(&mut self) {
        self.stopping = true;
        self.deadline = Some(Instant::now() + self.limits.shutdown_timeout);
        for l in self.listeners.iter_mut() {
            *l = None;
        }
        for slot in 0..self.conns.len() {
            self.drive(slot);
        }
    }

    /// Closes every connection still serving at shutdown; requests in
    /// flight go unanswered.
    fn abandon(&mut self, why: &str) {
        for slot in 0..self.conns.len() {
            let Some(mut c) = self.conns[slot].take() else { continue };
            self.unregister(&mut c);
            let unanswered = c.core.in_flight();
            self.log.error(format!("{}: closed at shutdown ({why}), {unanswered} requests unanswered", c.peer));
        }
        self.workers.abandon();
    }

    fn accept(&mut self, index: usize) {
        loop {
            let accepted = match &self.listeners[index] {
                Some(Listener::Unix(l)) => {
                    l.accept().map(|(s, _)| (Stream::Plain(Socket::from(OwnedFd::from(s))), "a Unix client".to_owned()))
                }
                Some(Listener::Tcp(l)) => l.accept().map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    (Stream::Plain(Socket::from(OwnedFd::from(s))), a.to_string())
                }),
                None => return,
            };
            match accepted {
                Ok((stream, peer)) => self.adopt(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A client that left before it was accepted: the next one.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of descriptors or memory: the client waits in the
                    // listener's backlog until a connection closes.
                    self.log.error(format!("accept: {e}"));
                    self.accept_stalled = true;
                    return;
                }
            }
        }
    }

    fn adopt(&mut self, stream: Stream, peer: String) {
        let live = self.conns.iter().filter(|c| c.is_some()).count();
        if live >= self.limits.max_connections {
            self.log.error(format!("{peer}: refused, {live} connections already (--max-connections)"));
            return;
        }
        self.generation += 1;
        let conn = Conn {
            generation: self.generation,
            stream,
            peer,
            core: server::Connection::new(self.config.clone()),
            backend: None,
            jobs: 0,
            held: 0,
            waiting: VecDeque::new(),
            writes: HashMap::new(),
            contexts: HashMap::new(),
            spare: Vec::new(),
            interest: None,
        };
        self.log.info(|| format!("{}: connected", conn.peer));
        let slot = match self.conns.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        self.conns[slot] = Some(conn);
        self.drive(slot);
    }

    /// Moves connection `slot` on as far as it goes without blocking:
    /// sends, receives, serves events; then waits for what it needs.
    fn drive(&mut self, slot: usize) {
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else { return };
        let max_bytes = self.limits.max_bytes;
        loop {
            let mut core = Metered::new(&mut c.core, c.held, max_bytes, self.stopping);
            let t = c.stream.transport();
            pump::send(&mut core, t);
            pump::receive(&mut core, t);
            let moved = core.moved;
            let served = self.serve_events(slot, &mut c);
            let ended = matches!(c.core.phase(), Phase::Closed | Phase::Dead);
            if ended || !(moved || served) {
                break;
            }
        }
        // TLS records still to go (the end of the last reply) go before
        // the socket closes; a dead connection has nothing left to send.
        let flushed = !c.stream.transport().interest().write || c.core.phase() == Phase::Dead;
        let over = matches!(c.core.phase(), Phase::Closed | Phase::Dead) && flushed;
        let idle = c.jobs == 0 && c.core.pending_output() == 0 && !c.core.is_mid_message();
        if over || (self.stopping && idle && flushed) {
            if c.jobs > 0 {
                // A worker still has some of its requests: their results
                // find the connection over and are dropped then.
                self.park(slot, c);
                return;
            }
            self.close(c);
            return;
        }
        let want = interest(&mut c, self.stopping, self.limits.max_bytes);
        let token = Token(self.first_conn_token() + slot);
        let registry = self.poll.registry();
        let r = match (c.interest, want) {
            (None, Some(w)) => registry.register(&mut SourceFd(&c.stream.fd()), token, w),
            (Some(old), Some(w)) if old != w => registry.reregister(&mut SourceFd(&c.stream.fd()), token, w),
            (Some(_), None) => registry.deregister(&mut SourceFd(&c.stream.fd())),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.log.error(format!("{}: {e}", c.peer));
        }
        c.interest = want;
        self.conns[slot] = Some(c);
    }

    /// Keeps an ended connection until its jobs come back.
    fn park(&mut self, slot: usize, mut c: Conn) {
        self.unregister(&mut c);
        self.conns[slot] = Some(c);
    }

    /// Takes the connection's socket out of the poll registry.
    fn unregister(&self, c: &mut Conn) {
        if c.interest.take().is_some() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&c.stream.fd()));
        }
    }

    fn close(&mut self, mut c: Conn) {
        self.unregister(&mut c);
        match (c.core.phase(), c.core.error()) {
            // A client that hangs up without NBD_CMD_DISC is not the
            // server's error: a line only with --verbose.
            (Phase::Dead, Some(e)) if hung_up(e) => self.log.info(|| format!("{}: disconnected ({e})", c.peer)),
            (Phase::Dead, Some(e)) => self.log.error(format!("{}: {e}", c.peer)),
            _ => self.log.info(|| format!("{}: disconnected", c.peer)),
        }
        drop(c);
        // Clients left waiting when descriptors ran out get the one this
        // freed: the listener will not say again that they are there.
        if std::mem::take(&mut self.accept_stalled) {
            for index in 0..self.listeners.len() {
                self.accept(index);
            }
        }
    }

    /// Serves the core's events, then lends buffers to waiting requests
    /// as room allows; whether there was anything.
    fn serve_events(&mut self, slot: usize, c: &mut Conn) -> bool {
        let mut any = false;
        while let Some(ev) = c.core.poll_event() {
            any = true;
            match ev {
                Event::ExportSelected { export } => {
                    let e = &self.exports[export];
                    c.backend = Some(e.backend.clone());
                    let core = &c.core;
                    self.log.info(|| {
                        let replies = match (core.extended_headers(), core.structured_replies()) {
                            (true, _) => "extended headers",
                            (false, true) => "structured replies",
                            (false, false) => "simple replies",
                        };
                        let tls = if core.tls_active() { ", TLS" } else { "" };
                        format!("{}: serving export \"{}\" ({replies}{tls})", c.peer, e.name)
                    });
                }
                Event::Request(r) => c.waiting.push_back(r),
                Event::WriteData { id, buf } => {
                    if let Some(r) = c.writes.remove(&id) {
                        let fua = r.flags.contains(nbd_proto::CmdFlags::FUA);
                        self.submit(slot, c, id, Work::Write { offset: r.offset, buf, fua });
                    }
                }
                Event::BufferReturned { buf, .. } => {
                    c.held -= buf.len();
                    c.recycle(buf);
                }
                Event::StartTls => match self.tls.as_ref().map(nbd_tls::ServerTls::session) {
                    Some(Ok(session)) => c.stream.start_tls(session),
                    Some(Err(e)) => c.core.handle_transport_error(e.errno, &e.msg),
                    // The core offers STARTTLS only with a TLS policy.
                    None => c.core.handle_transport_error(0, "STARTTLS without TLS"),
                },
                Event::Disconnect => {}
            }
        }
        while let Some(r) = c.waiting.front() {
            let len = match r.command {
                Command::Read | Command::Write => r.length as usize,
                _ => 0,
            };
            // One request always goes, however large (the core bounds it).
            if len > 0 && c.held > 0 && c.held + len > self.limits.max_bytes {
                break;
            }
            let Some(r) = c.waiting.pop_front() else { break };
            any = true;
            c.held += len;
            let (offset, length) = (r.offset, r.length);
            let fua = r.flags.contains(nbd_proto::CmdFlags::FUA);
            let work = match r.command {
                Command::Write => {
                    let id = r.id;
                    c.writes.insert(id, r);
                    let buf = c.buffer(len);
                    if c.core.receive_write(id, buf).is_err() {
                        c.writes.remove(&id);
                    }
                    continue;
                }
                Command::Read => Work::Read { offset, buf: c.buffer(len) },
                Command::Flush => Work::Flush,
                Command::Trim => Work::Trim { offset, length, fua },
                Command::WriteZeroes => Work::Zero {
                    offset,
                    length,
                    may_trim: !r.flags.contains(nbd_proto::CmdFlags::NO_HOLE),
                    fast: r.flags.contains(nbd_proto::CmdFlags::FAST_ZERO),
                    fua,
                },
                Command::Cache => Work::Cache,
                Command::BlockStatus => {
                    c.contexts.insert(r.id, r.contexts.clone());
                    Work::BlockStatus { offset, length }
                }
            };
            self.submit(slot, c, r.id, work);
        }
        any
    }

    fn submit(&mut self, slot: usize, c: &mut Conn, id: RequestId, work: Work) {
        let Some(backend) = c.backend.clone() else { return };
        if !backend.blocks() {
            let result = crate::workers::run(&*backend, work);
            reply(c, id, result, &self.log);
            return;
        }
        c.jobs += 1;
        self.workers.submit(Job { conn: ConnId { slot, generation: c.generation }, id, backend, work });
    }

    /// Turns the workers' results into replies.
    fn collect_finished(&mut self) {
        self.woken.store(false, Ordering::Release);
        let mut touched = Vec::new();
        while let Ok(f) = self.finished.try_recv() {
            let Some(c) = self.conns.get_mut(f.conn.slot).and_then(Option::as_mut) else { continue };
            if c.generation != f.conn.generation {
                continue;
            }
            c.jobs -= 1;
            reply(c, f.id, f.result, &self.log);
            touched.push(f.conn.slot);
        }
        touched.dedup();
        for slot in touched {
            self.drive(slot);
        }
    }
}

/// Spare buffers a connection keeps.
const SPARE_BUFFERS: usize = 128;

impl Conn {
    /// A buffer of `len` bytes, reused if one is spare. Its contents are
    /// whatever they were: the backend or the client's payload fills it
    /// whole.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.spare.pop() {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0; len],
        }
    }

    /// Keeps `buf` for reuse; large ones are let go, so a burst of large
    /// requests does not pin its memory.
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS && buf.capacity() <= 1 << 20 {
            self.spare.push(buf);
        }
    }
}

/// The export as the protocol core offers it.
/// What clients are told of export `e`. Its largest request fits the
/// connection's byte limit, so a conforming client never waits on it.
fn export_of(e: &ExportSpec, max_bytes: usize) -> server::Export {
    let b = &e.backend;
    let mut x = server::Export::new(e.name.clone(), b.size());
    let d = server::DEFAULT_BLOCK_SIZE;
    let maximum = d.maximum.min(u32::try_from(max_bytes).unwrap_or(u32::MAX)).max(d.preferred);
    x.block_size = Some(BlockSize { maximum, ..d });
    if e.read_only || !b.writable() {
        x.flags |= TransmissionFlags::READ_ONLY;
    }
    if b.shared_state() {
        x.flags |= TransmissionFlags::CAN_MULTI_CONN;
    }
    x
}

/// Answers request `id` of `c` with what its job gave.
fn reply(c: &mut Conn, id: RequestId, result: JobResult, log: &Log) {
    let r = match result {
        Ok(Outcome::Data(buf)) => c.core.reply_read(id, buf),
        Ok(Outcome::Written(buf)) => {
            c.held -= buf.len();
            c.recycle(buf);
            c.core.reply_ok(id)
        }
        Ok(Outcome::Done) => c.core.reply_ok(id),
        Ok(Outcome::Extents(extents)) => {
            let contexts = c.contexts.remove(&id).unwrap_or_default();
            let reports: Vec<(u32, &[nbd_proto::Extent])> = contexts.iter().map(|&ctx| (ctx, &extents[..])).collect();
            c.core.reply_block_status(id, &reports)
        }
        Err((e, buf)) => {
            if let Some(buf) = buf {
                c.held -= buf.len();
                c.recycle(buf);
            }
            c.contexts.remove(&id);
            // The backend failed: the storage may be losing data, so it
            // is always said. A zero that cannot be fast is no failure:
            // the client asked whether it could be.
            if e.kind() == io::ErrorKind::Unsupported {
                log.info(|| format!("{}: request refused: {e}", c.peer));
            } else {
                log.error(format!("{}: request failed: {e}", c.peer));
            }
            c.core.reply_error(id, nbd_errno(&e), &e.to_string())
        }
    };
    if let Err(e) = r {
        // The connection ended meanwhile: nothing to answer.
        log.info(|| format!("{}: reply dropped: {e}", c.peer));
    }
}

/// The `NBD_E*` value for a backend's error.
fn nbd_errno(e: &io::Error) -> u32 {
    if e.kind() == io::ErrorKind::Unsupported {
        return nbd_error::ENOTSUP;
    }
    match e.raw_os_error() {
        Some(libc_errno::EPERM | libc_errno::EROFS) => nbd_error::EPERM,
        Some(libc_errno::ENOSPC | libc_errno::EFBIG) => nbd_error::ENOSPC,
        Some(libc_errno::ENOMEM) => nbd_error::ENOMEM,
        Some(libc_errno::EINVAL) => nbd_error::EINVAL,
        Some(libc_errno::EOPNOTSUPP) => nbd_error::ENOTSUP,
        _ => nbd_error::EIO,
    }
}

/// The Linux errno values `nbd_errno` maps.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOPNOTSUPP: i32 = 95;
}

/// Whether a connection died because the client went away (its socket
/// reset, or closed under the server's sends).
fn hung_up(e: &nbd_proto::Error) -> bool {
    matches!(
        e,
        nbd_proto::Error::Transport(nbd_proto::TransportError::Io {
            errno: nbd_proto::errno::EPIPE | nbd_proto::errno::ECONNRESET,
            ..
        })
    )
}

/// What connection `c` waits for: to read while the core wants requests
/// and the connection is under its limits (while stopping, only the rest
/// of a request), to write while replies wait.
fn interest(c: &mut Conn, stopping: bool, max_bytes: usize) -> Option<Interest> {
    let own = c.stream.transport().interest();
    let read = own.read || Metered::new(&mut c.core, c.held, max_bytes, stopping).wants_read();
    let write = own.write || c.core.pending_output() > 0;
    match (read, write) {
        (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
        (true, false) => Some(Interest::READABLE),
        (false, true) => Some(Interest::WRITABLE),
        (false, false) => None,
    }
}
