//! The hostile server: the scripted in-memory server of nbd-proto's tests
//! (`server::Server`, on the core's wire encoding) on the far end of a
//! socketpair, in a thread, playing a script: answer like a real server,
//! hold requests back and send crafted bytes instead, replace an option's
//! reply or the greeting, cut its output after any byte, or stall.
//!
//! It never closes its read side before the client does, so the client
//! never meets EPIPE: a cut is a half-close and reads as EOF. A watchdog
//! ends every script after [`WATCHDOG`], so a client that hangs is
//! unblocked (by a full close) and the case fails instead of the suite.

#![allow(dead_code)]

use super::server::{Behaviour, Server};
use nbd_proto::wire::{cmd, opt, RequestHeader};
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const WATCHDOG: Duration = Duration::from_secs(10);
pub const DISK: usize = 128 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Structured replies, compact headers, base:allocation.
    Nbdkit,
    /// Extended headers (our client asks for them), base:allocation.
    Qemu,
    /// Simple replies only, export "exp".
    NbdServer,
}

pub const ALL: &[Preset] = &[Preset::Nbdkit, Preset::Qemu, Preset::NbdServer];
pub const SR: &[Preset] = &[Preset::Nbdkit, Preset::Qemu];
pub const NBDKIT: &[Preset] = &[Preset::Nbdkit];
pub const QEMU: &[Preset] = &[Preset::Qemu];
pub const NBD_SERVER: &[Preset] = &[Preset::NbdServer];
pub const COMPACT: &[Preset] = &[Preset::Nbdkit, Preset::NbdServer];

impl Preset {
    pub fn behaviour(self) -> Behaviour {
        match self {
            Preset::Nbdkit => Behaviour::nbdkit(),
            Preset::Qemu => Behaviour::qemu(),
            Preset::NbdServer => Behaviour::nbd_server(),
        }
    }

    pub fn structured(self) -> bool {
        self != Preset::NbdServer
    }

    /// Whether the server takes WRITE_ZEROES and CACHE.
    pub fn zero_and_cache(self) -> bool {
        self != Preset::NbdServer
    }
}

/// What a command is, as the server recognises it in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// READ of 4096 at 0.
    Read,
    /// READ of 4096 at 8192 with DF (structured replies only).
    Df,
    /// BLOCK_STATUS of 65536 at 0 (structured replies only).
    Bs,
    /// BLOCK_STATUS with REQ_ONE (structured replies only).
    One,
    Flush,
    /// WRITE of 512 at 0.
    Write,
    Trim,
    Zero,
    Cache,
}

impl Role {
    fn of(h: &RequestHeader) -> Option<Role> {
        let df = h.flags & 4 != 0;
        let one = h.flags & 8 != 0;
        Some(match h.kind {
            cmd::READ if df => Role::Df,
            cmd::READ => Role::Read,
            cmd::BLOCK_STATUS if one => Role::One,
            cmd::BLOCK_STATUS => Role::Bs,
            cmd::FLUSH => Role::Flush,
            cmd::WRITE => Role::Write,
            cmd::TRIM => Role::Trim,
            cmd::WRITE_ZEROES => Role::Zero,
            cmd::CACHE => Role::Cache,
            _ => return None,
        })
    }
}

/// The commands the server holds, by role, and how replies are encoded
/// on this connection. A role not in flight has cookie 0.
#[derive(Debug, Clone, Default)]
pub struct Flight {
    pub sr: bool,
    pub ext: bool,
    /// The id the server gave base:allocation.
    pub ctx: u32,
    pub cookies: Vec<(Role, u64)>,
}

impl Flight {
    pub fn new(preset: Preset, requests: &[RequestHeader]) -> Flight {
        Flight {
            sr: preset.structured(),
            ext: preset == Preset::Qemu,
            ctx: 1,
            cookies: requests.iter().filter_map(|h| Some((Role::of(h)?, h.cookie))).collect(),
        }
    }

    pub fn cookie(&self, role: Role) -> u64 {
        self.cookies.iter().find(|(r, _)| *r == role).map_or(0, |(_, c)| *c)
    }
}

pub type Craft = Box<dyn FnOnce(&Flight) -> Vec<u8> + Send>;

/// The bytes that answer an option, given the option.
pub type OptionAnswer = fn(u32) -> Vec<u8>;

/// What the server does once it has said its scripted piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Keeps the connection open (and reads) until the client closes.
    Hold,
    /// Half-closes: the client reads EOF.
    Close,
    /// Holds for this long, then closes.
    CloseAfter(Duration),
}

pub struct Script {
    pub preset: Preset,
    /// Replaces the preset's greeting; the server then says nothing more.
    pub greeting: Option<Vec<u8>>,
    /// Replaces the answer to this option with these bytes (given the option).
    pub intercept: Option<(u32, OptionAnswer)>,
    /// Records requests without answering them.
    pub hold: bool,
    /// With `hold`: once this many requests arrived (0: as soon as the
    /// handshake is over), sends these bytes.
    pub inject: Option<(usize, Craft)>,
    /// Half-closes after this many bytes of output.
    pub budget: usize,
    /// A held NBD_CMD_DISC closes the connection.
    pub close_on_disc: bool,
    pub then: Then,
}

impl Script {
    /// The preset's server, answering everything.
    pub fn serve(preset: Preset) -> Script {
        Script {
            preset,
            greeting: None,
            intercept: None,
            hold: false,
            inject: None,
            budget: usize::MAX,
            close_on_disc: false,
            then: Then::Hold,
        }
    }

    /// Handshakes, then holds every request; after `n` requests sends `bytes`.
    pub fn inject(preset: Preset, n: usize, bytes: Craft, then: Then) -> Script {
        Script { hold: true, inject: Some((n, bytes)), then, ..Script::serve(preset) }
    }

    /// Handshakes, then never answers (but a DISC closes the connection).
    pub fn stall(preset: Preset) -> Script {
        Script { hold: true, close_on_disc: true, ..Script::serve(preset) }
    }
}

/// What the server saw and said.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Output bytes when the handshake ended (GO or EXPORT_NAME answered).
    pub hs_end: Option<usize>,
    /// Per request answered: its cookie and the output length after its reply.
    pub reply_ends: Vec<(u64, usize)>,
    /// Every byte of output generated (sent or not).
    pub output: Vec<u8>,
    pub requests: Vec<RequestHeader>,
    pub options: Vec<u32>,
    pub watchdog: bool,
}

pub struct Peer {
    thread: Option<JoinHandle<Report>>,
}

impl Peer {
    /// Starts the server on one end of a socketpair; returns the other end's
    /// descriptor, for `nbd_connect_socket` to own.
    pub fn start(script: Script) -> (Peer, RawFd) {
        let (client, server) = UnixStream::pair().expect("socketpair");
        let thread = std::thread::spawn(move || run(server, script));
        (Peer { thread: Some(thread) }, client.into_raw_fd())
    }

    /// Waits for the server (the client must have closed its end) and
    /// checks that the watchdog did not have to end the script.
    pub fn finish(mut self, case: &str) -> Report {
        let r = self.thread.take().expect("finished once").join().expect("the server thread panicked");
        assert!(!r.watchdog, "{case}: the client hung: the watchdog closed the connection");
        r
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // A failed case must not leave a thread behind.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends all of `bytes`. The test process keeps SIGPIPE's default, as a C
/// program does, so the peer, like a real server, sends with MSG_NOSIGNAL:
/// a client that hung up is an error here, not the end of the tests.
fn send_all(sock: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match nbd_io::send(sock, &[bytes]) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what is available; `None` at EOF (or a dead socket), and the
/// watchdog flag when the deadline passed.
fn read_some(sock: &mut UnixStream, deadline: Instant, report: &mut Report) -> Option<Vec<u8>> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        report.watchdog = true;
        return None;
    }
    sock.set_read_timeout(Some(left)).ok()?;
    let mut buf = vec![0; 64 * 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                buf.truncate(n);
                return Some(buf);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                report.watchdog = true;
                return None;
            }
            Err(_) => return None,
        }
    }
}

/// Reads and discards until the client closes (or `until`).
fn drain(sock: &mut UnixStream, until: Instant, report: &mut Report) {
    while read_some(sock, until, report).is_some() {}
}

fn run(mut sock: UnixStream, mut script: Script) -> Report {
    let deadline = Instant::now() + WATCHDOG;
    let mut report = Report::default();
    let mut srv = Server::new(script.preset.behaviour(), DISK);
    // Some data, so that reads answer with DATA chunks as well as holes.
    srv.disk[..2048].fill(0x42);
    srv.hold = script.hold;
    // Everything said, and how much of it went out.
    let mut stream = std::mem::take(&mut srv.out);
    let mut sent = 0;
    // The scripted piece is said: only the ending remains.
    let mut said = false;
    if let Some(g) = script.greeting.take() {
        stream = g;
        said = true;
    }
    let mut closed = false;
    loop {
        let upto = stream.len().min(script.budget);
        if send_all(&sock, &stream[sent..upto]).is_err() {
            break;
        }
        sent = upto;
        if sent == script.budget {
            let _ = sock.shutdown(Shutdown::Write);
            drain(&mut sock, deadline, &mut report);
            break;
        }
        if closed {
            let _ = sock.shutdown(Shutdown::Both);
            break;
        }
        if said {
            finish(&mut sock, script.then, deadline, &mut report);
            break;
        }
        let Some(bytes) = read_some(&mut sock, deadline, &mut report) else { break };
        // One byte at a time: each call completes at most one option or
        // request, so every answer can be attributed (or replaced).
        for b in bytes {
            let (options, requests, before) = (srv.options.len(), srv.requests.len(), srv.out.len());
            srv.receive(&[b]);
            if srv.options.len() > options {
                let o = srv.options[options];
                if let Some((_, craft)) = script.intercept.filter(|(at, _)| *at == o) {
                    srv.out.truncate(before);
                    srv.out.extend_from_slice(&craft(o));
                    said = true;
                } else if o == opt::GO || o == opt::EXPORT_NAME {
                    report.hs_end = Some(stream.len() + srv.out.len());
                    if matches!(script.inject, Some((0, _))) {
                        let (_, craft) = script.inject.take().unwrap_or_else(|| unreachable!());
                        srv.out.extend_from_slice(&craft(&Flight::new(script.preset, &[])));
                        said = true;
                    }
                }
            }
            if srv.requests.len() > requests {
                let h = srv.requests[requests];
                if h.kind == cmd::DISC {
                    closed |= script.close_on_disc || !script.hold;
                } else if !script.hold {
                    report.reply_ends.push((h.cookie, stream.len() + srv.out.len()));
                } else if script.inject.as_ref().is_some_and(|(n, _)| *n == srv.requests.len()) {
                    let (_, craft) = script.inject.take().unwrap_or_else(|| unreachable!());
                    srv.out.extend_from_slice(&craft(&Flight::new(script.preset, &srv.requests)));
                    said = true;
                }
            }
            closed |= srv.closed;
            if said || closed {
                break;
            }
        }
        stream.append(&mut srv.out);
    }
    report.output = stream;
    report.requests = srv.requests;
    report.options = srv.options;
    report
}

fn finish(sock: &mut UnixStream, then: Then, deadline: Instant, report: &mut Report) {
    match then {
        Then::Hold => drain(sock, deadline, report),
        Then::Close => {
            let _ = sock.shutdown(Shutdown::Write);
            drain(sock, deadline, report);
        }
        Then::CloseAfter(d) => {
            // Reading until `d` passes is not a hang.
            let until = Instant::now() + d;
            let mut quiet = Report::default();
            drain(sock, until.min(deadline), &mut quiet);
            let _ = sock.shutdown(Shutdown::Write);
            drain(sock, deadline, report);
        }
    }
}
