//! nbd-proto driven from a `mio` event loop, with many commands in flight.
//!
//! The loop registers the socket for the readiness that
//! [`Connection::direction`] asks for, sends until the kernel pushes back
//! (`WouldBlock`, partial writes), receives until it runs dry (mio is
//! edge-triggered), and keeps up to QUEUE_DEPTH READs and WRITEs in flight.
//! It writes a region of the export with a pattern, reads it back in
//! another order, then mixes reads and writes at random, verifying every
//! byte read. Any error or wrong byte makes it exit with status 1.
//!
//! `nbdkit -U - memory 64M --run 'target/release/examples/mio_loop "$unixsocket"'`
//! (or `mio_loop HOST:PORT` for TCP; an optional second argument sets the
//! queue depth, 64 by default).

#[path = "../tests/support/rng.rs"]
mod rng;

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use nbd_proto::{CmdFlags, Config, Connection, Cookie, Direction, Event, PublicState, TransmissionFlags};
use rng::Rng;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SOCKET: Token = Token(0);
/// No readiness for this long means the server stopped answering.
const STALL: Duration = Duration::from_secs(30);
/// The part of the export the test covers, at most.
const REGION: u64 = 64 << 20;
/// Random reads and writes in the mixed phase.
const MIXED_OPS: usize = 4000;

/// A finished command: its cookie, its result and its buffer.
type Completion = (Cookie, Result<(), nbd_proto::Error>, Option<Vec<u8>>);

/// A connected (or connecting) non-blocking socket of either family.
trait Transport: Read + Write + Source {
    /// Whether a non-blocking connect has finished: `Ok(true)` connected,
    /// `Ok(false)` still in progress, `Err` failed.
    fn connect_done(&self) -> io::Result<bool>;
}

macro_rules! transport {
    ($t:ty) => {
        impl Transport for $t {
            fn connect_done(&self) -> io::Result<bool> {
                if let Some(e) = self.take_error()? {
                    return Err(e);
                }
                match self.peer_addr() {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    };
}
transport!(UnixStream);
transport!(TcpStream);

/// The I/O half: one socket, one `Poll`, one connection.
struct EventLoop<S> {
    conn: Connection<Vec<u8>>,
    stream: S,
    poll: Poll,
    events: Events,
    /// What the socket is registered for; `None` when not registered.
    interest: Option<Interest>,
    /// The transport connect finished and the core was told.
    connected: bool,
    /// Completed commands, for the workload.
    done: Vec<Completion>,
    sends: u64,
    recvs: u64,
    waits: u64,
}

impl<S: Transport> EventLoop<S> {
    fn new(stream: S) -> io::Result<Self> {
        let mut conn = Connection::new(Config::default());
        conn.start_connect().expect("a new connection can start connecting");
        Ok(EventLoop {
            conn,
            stream,
            poll: Poll::new()?,
            events: Events::with_capacity(16),
            interest: None,
            connected: false,
            done: Vec::new(),
            sends: 0,
            recvs: 0,
            waits: 0,
        })
    }

    /// Registers the socket for what `direction()` asks, when that changed.
    fn sync_interest(&mut self) -> io::Result<()> {
        let want = match self.conn.direction() {
            Direction::None => None,
            Direction::Read => Some(Interest::READABLE),
            Direction::Write => Some(Interest::WRITABLE),
            Direction::Both => Some(Interest::READABLE | Interest::WRITABLE),
        };
        if want == self.interest {
            return Ok(());
        }
        let registry = self.poll.registry();
        match (self.interest, want) {
            (None, Some(i)) => registry.register(&mut self.stream, SOCKET, i)?,
            (Some(_), Some(i)) => registry.reregister(&mut self.stream, SOCKET, i)?,
            (Some(_), None) => registry.deregister(&mut self.stream)?,
            (None, None) => {}
        }
        self.interest = want;
        Ok(())
    }

    /// Sends until nothing is pending or the socket would block. A partial
    /// write is normal: `handle_sent` takes what left and `poll_transmit`
    /// yields the rest next time round.
    fn send(&mut self) {
        if !self.connected {
            return;
        }
        loop {
            let mut slices: [&[u8]; 128] = [&[]; 128];
            let n = self.conn.poll_transmit(&mut slices);
            if n == 0 {
                return;
            }
            let iov: Vec<IoSlice<'_>> = slices[..n].iter().map(|s| IoSlice::new(s)).collect();
            let result = self.stream.write_vectored(&iov);
            drop(iov);
            self.sends += 1;
            match result {
                Ok(sent) => self.conn.handle_sent(sent),
                // Writable again will be reported once there is room.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.conn.handle_transport_error(e.raw_os_error().unwrap_or(0), "send");
                    return;
                }
            }
        }
    }

    /// Receives until the socket runs dry (readiness is edge-triggered: no
    /// new event comes for bytes already waiting).
    fn receive(&mut self) {
        while self.conn.direction().wants_read() {
            // Asked anew each time: in the middle of a large READ payload it
            // is the command's own buffer.
            let buf = self.conn.recv_buffer();
            assert!(!buf.is_empty(), "recv_buffer is never empty while a read is wanted");
            let result = self.stream.read(buf);
            self.recvs += 1;
            match result {
                Ok(0) => self.conn.handle_eof(),
                Ok(n) => self.conn.handle_received(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.conn.handle_transport_error(e.raw_os_error().unwrap_or(0), "recv"),
            }
        }
    }

    /// Moves completions out of the core; any other event is kept only
    /// as far as the workload needs it.
    fn collect(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Complete { cookie, result, buf } => self.done.push((cookie, result, buf)),
                Event::Connected => println!("connected"),
                other => println!("event: {other:?}"),
            }
        }
    }

    /// One turn of the loop: send what is pending, wait for the readiness
    /// the core asks for, act on it. Fails if the server goes quiet.
    fn turn(&mut self) -> Result<(), String> {
        self.send();
        self.collect();
        self.sync_interest().map_err(|e| format!("registering the socket: {e}"))?;
        if self.interest.is_none() {
            return Ok(());
        }
        self.poll.poll(&mut self.events, Some(STALL)).map_err(|e| format!("poll: {e}"))?;
        self.waits += 1;
        if self.events.is_empty() {
            return Err(format!("no progress for {STALL:?} in state {}", self.conn.state().name()));
        }
        let (mut readable, mut writable) = (false, false);
        for e in self.events.iter() {
            readable |= e.is_readable() || e.is_read_closed() || e.is_error();
            writable |= e.is_writable() || e.is_error();
        }
        if !self.connected && writable {
            match self.stream.connect_done() {
                Ok(false) => return Ok(()),
                Ok(true) => {
                    self.connected = true;
                    self.conn.handle_connected().map_err(|e| e.to_string())?;
                }
                Err(e) => {
                    self.conn.handle_connect_failed();
                    return Err(format!("connect: {e}"));
                }
            }
        }
        if writable {
            self.send();
        }
        if readable && self.connected {
            self.receive();
        }
        self.collect();
        Ok(())
    }
}

/// The bytes a block holds after a write with `seed`: a function of the
/// absolute offset, so a misplaced byte cannot match.
fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut word = offset / 8;
    while out.len() < len {
        let mut x = (word ^ seed.rotate_left(40)).wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        out.extend_from_slice(&x.to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

struct Block {
    offset: u64,
    len: usize,
    /// The seed of the last completed write; 0 before any.
    seed: u64,
    /// A command on this block is in flight: NBD does not order
    /// overlapping commands, so no other is issued until it completes.
    busy: bool,
}

#[derive(Clone, Copy)]
enum Op {
    Write { block: usize, seed: u64 },
    Read { block: usize },
}

#[derive(PartialEq, Eq)]
enum Phase {
    /// Write every block in order.
    Fill,
    /// Read every block back, in a shuffled order.
    Verify,
    /// Random reads and writes on idle blocks.
    Mixed,
    Finished,
}

/// What to submit next and what to expect back.
struct Workload {
    blocks: Vec<Block>,
    phase: Phase,
    /// Position in the current phase's sequence.
    next: usize,
    order: Vec<usize>,
    pending: HashMap<Cookie, Op>,
    rng: Rng,
    reads: u64,
    writes: u64,
    bytes: u64,
}

impl Workload {
    fn new(region: u64) -> Self {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut blocks = Vec::new();
        let mut offset = 0;
        // 4 KiB to 256 KiB: small replies batch in the core's buffer, large
        // ones are received straight into the command's buffer.
        while offset < region {
            let len = (4096u64 << rng.below(7)).min(region - offset);
            blocks.push(Block { offset, len: len as usize, seed: 0, busy: false });
            offset += len;
        }
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        Workload {
            blocks,
            phase: Phase::Fill,
            next: 0,
            order,
            pending: HashMap::new(),
            rng,
            reads: 0,
            writes: 0,
            bytes: 0,
        }
    }

    /// The next command to submit, or `None` to wait for completions
    /// (a phase starts only when the previous one has fully completed).
    fn next_op(&mut self) -> Option<Op> {
        loop {
            let total = match self.phase {
                Phase::Fill | Phase::Verify => self.blocks.len(),
                Phase::Mixed => MIXED_OPS,
                Phase::Finished => return None,
            };
            if self.next < total {
                break;
            }
            if !self.pending.is_empty() {
                return None;
            }
            self.phase = match self.phase {
                Phase::Fill => Phase::Verify,
                Phase::Verify => Phase::Mixed,
                _ => Phase::Finished,
            };
            self.next = 0;
        }
        let op = match self.phase {
            Phase::Fill => Op::Write { block: self.next, seed: 1 },
            Phase::Verify => Op::Read { block: self.order[self.next] },
            _ => {
                // An idle block; with far more blocks than commands in
                // flight a few tries find one.
                let block = (0..8).map(|_| self.rng.below(self.blocks.len())).find(|&b| !self.blocks[b].busy)?;
                if self.rng.next() & 1 == 0 {
                    Op::Write { block, seed: 2 + self.next as u64 }
                } else {
                    Op::Read { block }
                }
            }
        };
        self.next += 1;
        Some(op)
    }

    fn submit(&mut self, conn: &mut Connection<Vec<u8>>, op: Op) -> Result<(), String> {
        let (block, cookie) = match op {
            Op::Write { block, seed } => {
                let b = &self.blocks[block];
                let data = pattern(b.offset, b.len, seed);
                (block, conn.write(b.offset, data, CmdFlags::empty()))
            }
            Op::Read { block } => {
                let b = &self.blocks[block];
                (block, conn.read(b.offset, vec![0; b.len], CmdFlags::empty()))
            }
        };
        let cookie = cookie.map_err(|e| format!("submitting a command: {e}"))?;
        self.blocks[block].busy = true;
        self.pending.insert(cookie, op);
        Ok(())
    }

    fn complete(&mut self, (cookie, result, buf): Completion) -> Result<(), String> {
        let op = self.pending.remove(&cookie).ok_or_else(|| format!("completion for unknown cookie {cookie}"))?;
        let (block, what) = match op {
            Op::Write { block, .. } => (block, "write"),
            Op::Read { block } => (block, "read"),
        };
        let b = &mut self.blocks[block];
        b.busy = false;
        result.map_err(|e| format!("{what} of {} bytes at {}: {e}", b.len, b.offset))?;
        let buf = buf.ok_or_else(|| format!("{what} at {} came back without its buffer", b.offset))?;
        self.bytes += b.len as u64;
        match op {
            Op::Write { seed, .. } => {
                b.seed = seed;
                self.writes += 1;
            }
            Op::Read { .. } => {
                self.reads += 1;
                let expected = pattern(b.offset, b.len, b.seed);
                if let Some(i) = buf.iter().zip(&expected).position(|(got, want)| got != want) {
                    return Err(format!(
                        "wrong data at offset {} (block at {} written with seed {}): got {:#04x}, expected {:#04x}",
                        b.offset + i as u64,
                        b.offset,
                        b.seed,
                        buf[i],
                        expected[i]
                    ));
                }
                if buf.len() != b.len {
                    return Err(format!("read at {} returned {} bytes, not {}", b.offset, buf.len(), b.len));
                }
            }
        }
        Ok(())
    }
}

fn run<S: Transport>(stream: S, queue_depth: usize) -> Result<(), String> {
    let mut el = EventLoop::new(stream).map_err(|e| format!("poll: {e}"))?;
    // The transport connect, then the handshake.
    while matches!(el.conn.state(), PublicState::Connecting) {
        el.turn()?;
    }
    if el.conn.state() != PublicState::Ready {
        let why = el.conn.error().map_or_else(|| "no error recorded".to_owned(), |e| e.to_string());
        return Err(format!("handshake ended in state {}: {why}", el.conn.state().name()));
    }
    let export = el.conn.export().clone();
    let size = export.size.unwrap_or(0);
    println!(
        "export: {size} bytes, flags {:?}, structured replies {}, extended headers {}",
        export.flags,
        el.conn.structured_replies_negotiated(),
        el.conn.extended_headers_negotiated()
    );
    if export.flags.contains(TransmissionFlags::READ_ONLY) || size < 1 << 20 {
        return Err("need a writable export of at least 1 MiB".into());
    }

    let mut work = Workload::new(size.min(REGION));
    let started = Instant::now();
    let mut max_in_flight = 0;
    while work.phase != Phase::Finished {
        while el.conn.in_flight() < queue_depth {
            let Some(op) = work.next_op() else { break };
            work.submit(&mut el.conn, op)?;
        }
        max_in_flight = max_in_flight.max(el.conn.in_flight());
        if work.phase == Phase::Finished {
            break;
        }
        el.turn()?;
        if matches!(el.conn.state(), PublicState::Dead | PublicState::Closed) {
            let why = el.conn.error().map_or_else(|| "no error recorded".to_owned(), |e| e.to_string());
            return Err(format!("connection {} with commands to run: {why}", el.conn.state().name()));
        }
        for done in std::mem::take(&mut el.done) {
            work.complete(done)?;
        }
    }
    let elapsed = started.elapsed();
    if max_in_flight < queue_depth.min(work.blocks.len()) {
        return Err(format!("only {max_in_flight} commands were ever in flight, not {queue_depth}"));
    }

    el.conn.disconnect().map_err(|e| format!("disconnect: {e}"))?;
    while !matches!(el.conn.state(), PublicState::Closed | PublicState::Dead) {
        el.turn()?;
    }
    if el.conn.state() != PublicState::Closed {
        return Err(format!("disconnect ended dead: {}", el.conn.error().map_or(String::new(), |e| e.to_string())));
    }
    let stats = el.conn.stats();
    println!(
        "{} writes and {} reads verified ({} MiB over {} blocks) in {:.2?}, up to {max_in_flight} in flight",
        work.writes,
        work.reads,
        work.bytes >> 20,
        work.blocks.len(),
        elapsed
    );
    println!(
        "{} sends, {} receives, {} waits; {} bytes sent, {} received",
        el.sends, el.recvs, el.waits, stats.bytes_sent, stats.bytes_received
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(target) = args.next() else {
        eprintln!("usage: mio_loop SOCKET|HOST:PORT [QUEUE_DEPTH]");
        return ExitCode::from(2);
    };
    let queue_depth = match args.next().map(|q| q.parse::<usize>()) {
        None => 64,
        Some(Ok(q)) if q > 0 => q,
        Some(_) => {
            eprintln!("mio_loop: QUEUE_DEPTH must be a positive number");
            return ExitCode::from(2);
        }
    };
    let result = if target.starts_with('/') || !target.contains(':') {
        UnixStream::connect(&target).map_err(|e| format!("{target}: {e}")).and_then(|s| run(s, queue_depth))
    } else {
        target
            .to_socket_addrs()
            .map_err(|e| format!("{target}: {e}"))
            .and_then(|mut a| a.next().ok_or_else(|| format!("{target}: no address")))
            .and_then(|addr| TcpStream::connect(addr).map_err(|e| format!("{target}: {e}")))
            .and_then(|s| run(s, queue_depth))
    };
    match result {
        Ok(()) => {
            println!("mio_loop: all data verified");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mio_loop: {e}");
            ExitCode::FAILURE
        }
    }
}
