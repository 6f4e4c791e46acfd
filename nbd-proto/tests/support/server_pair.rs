//! The client role wired to the server role in memory, through byte
//! queues cut as `Split` says, with a memory disk answering the server's
//! requests.

#![allow(dead_code)]

use super::pair::{take_completion, take_option_result, Cutter, Split};
use nbd_proto::server::{self, Command, Event as SEvent, Export, ReadChunk, Request};
use nbd_proto::wire::nbd_error;
use nbd_proto::{CmdFlags, Config, Connection, Cookie, Error, Event, Extent, PublicState};

pub type Server = server::Connection<Vec<u8>>;

/// How the disk answers.
#[derive(Debug, Clone, Default)]
pub struct Disk {
    pub bytes: Vec<u8>,
    /// READs answer with hole pieces for zero blocks of 4 KiB.
    pub sparse: bool,
    /// Requests touching `[start, end)` fail with this NBD error.
    pub fail: Option<(u64, u64, u32)>,
}

impl Disk {
    pub fn new(size: usize) -> Self {
        Disk { bytes: vec![0; size], ..Default::default() }
    }

    fn failing(&self, r: &Request) -> Option<u32> {
        let (s, e, err) = self.fail?;
        (r.offset < e && r.offset + r.length.max(1) > s).then_some(err)
    }

    /// Serves one request (a WRITE once its payload is in `data`);
    /// returns how many buffers it lent the server.
    pub fn serve(&mut self, s: &mut Server, r: &Request, data: Option<Vec<u8>>) -> i64 {
        if let Some(err) = self.failing(r) {
            s.reply_error(r.id, err, "injected failure").unwrap();
            return 0;
        }
        let (off, len) = (r.offset as usize, r.length as usize);
        match r.command {
            Command::Read if self.sparse => {
                let mut pieces = Vec::new();
                let mut at = off;
                while at < off + len {
                    let end = ((at / 4096 + 1) * 4096).min(off + len);
                    if self.bytes[at..end].iter().all(|&b| b == 0) {
                        pieces.push(ReadChunk::Hole { offset: at as u64, length: (end - at) as u64 });
                    } else {
                        pieces.push(ReadChunk::Data { offset: at as u64, buf: self.bytes[at..end].to_vec() });
                    }
                    at = end;
                }
                // Any order will do: the core sorts them.
                pieces.reverse();
                let lent = pieces.iter().filter(|p| matches!(p, ReadChunk::Data { .. })).count();
                s.reply_read_chunks(r.id, pieces).unwrap();
                return lent as i64;
            }
            Command::Read => {
                s.reply_read(r.id, self.bytes[off..off + len].to_vec()).unwrap();
                return 1;
            }
            Command::Write => {
                self.bytes[off..off + len].copy_from_slice(&data.expect("a write's payload"));
                s.reply_ok(r.id).unwrap();
            }
            Command::Trim | Command::WriteZeroes => {
                self.bytes[off..off + len].fill(0);
                s.reply_ok(r.id).unwrap();
            }
            Command::Flush | Command::Cache => s.reply_ok(r.id).unwrap(),
            Command::BlockStatus => {
                let extents = self.extents(off, len);
                let reports: Vec<(u32, &[Extent])> = r.contexts.iter().map(|&c| (c, &extents[..])).collect();
                s.reply_block_status(r.id, &reports).unwrap();
            }
        }
        0
    }

    /// `base:allocation` by 4 KiB blocks: zero blocks are holes.
    pub fn extents(&self, off: usize, len: usize) -> Vec<Extent> {
        let mut v: Vec<Extent> = Vec::new();
        let mut at = off;
        let end = (off + len).min(self.bytes.len());
        while at < end {
            let stop = ((at / 4096 + 1) * 4096).min(end);
            let flags = if self.bytes[at..stop].iter().all(|&b| b == 0) { 3 } else { 0 };
            match v.last_mut() {
                Some(x) if x.flags == flags => x.length += (stop - at) as u64,
                _ => v.push(Extent { length: (stop - at) as u64, flags }),
            }
            at = stop;
        }
        v
    }
}

pub struct ServerPair {
    pub client: Connection<Vec<u8>>,
    pub server: Server,
    pub disk: Disk,
    pub split: Split,
    cutter: Cutter,
    /// Client events no test has claimed yet, and all of them rendered.
    pub events: Vec<Event<Vec<u8>>>,
    pub transcript: Vec<String>,
    /// Every request the server handed out, in order.
    pub requests: Vec<Request>,
    /// Server events other than requests, rendered.
    pub server_events: Vec<String>,
    /// Requests are recorded but not answered (the test answers).
    pub hold: bool,
    pub held: Vec<Request>,
    /// Buffers lent to the server and not yet back.
    pub lent: i64,
}

impl ServerPair {
    pub fn new(client: Config, server: server::Config, disk: Disk, split: Split) -> Self {
        let mut c = Connection::new(client);
        c.handle_connected().unwrap();
        ServerPair {
            client: c,
            server: Server::new(server),
            disk,
            split,
            cutter: Cutter::new(split),
            events: Vec::new(),
            transcript: Vec::new(),
            requests: Vec::new(),
            server_events: Vec::new(),
            hold: false,
            held: Vec::new(),
            lent: 0,
        }
    }

    /// A pair with one export of `size` bytes named "", default settings.
    pub fn simple(client: Config, size: usize) -> Self {
        let cfg = server::Config { exports: vec![Export::new("", size as u64)], ..Default::default() };
        ServerPair::new(client, cfg, Disk::new(size), Split::Whole)
    }

    fn cut(&mut self, max: usize) -> usize {
        self.cutter.next(max)
    }

    fn client_bytes(&mut self) -> bool {
        let mut moved = false;
        loop {
            let mut slices: [&[u8]; 8] = [&[]; 8];
            let n = self.client.poll_transmit(&mut slices);
            let bytes: Vec<u8> = slices[..n].concat();
            if bytes.is_empty() || !self.server.direction().wants_read() {
                return moved;
            }
            let cut = self.cut(bytes.len());
            let mut given = 0;
            while given < cut && self.server.direction().wants_read() {
                let dest = self.server.recv_buffer();
                let k = dest.len().min(cut - given);
                if k == 0 {
                    break;
                }
                dest[..k].copy_from_slice(&bytes[given..given + k]);
                self.server.handle_received(k);
                given += k;
                self.serve_events();
            }
            if given == 0 {
                return moved;
            }
            self.client.handle_sent(given);
            moved = true;
        }
    }

    fn server_bytes(&mut self) -> bool {
        let mut moved = false;
        loop {
            let mut slices: [&[u8]; 8] = [&[]; 8];
            let n = self.server.poll_transmit(&mut slices);
            let bytes: Vec<u8> = slices[..n].concat();
            if bytes.is_empty() {
                return moved;
            }
            let cut = self.cut(bytes.len());
            self.server.handle_sent(cut);
            self.serve_events();
            self.deliver(&bytes[..cut]);
            moved = true;
        }
    }

    /// Feeds bytes to the client as if the server sent them.
    pub fn deliver(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !matches!(self.client.state(), PublicState::Dead | PublicState::Closed) {
            let room = self.client.recv_buffer().len();
            let n = self.cut(bytes.len().min(room));
            let dest = self.client.recv_buffer();
            dest[..n].copy_from_slice(&bytes[..n]);
            self.client.handle_received(n);
            bytes = &bytes[n..];
        }
        self.collect();
    }

    /// Moves the client's events into `events`, playing a transparent TLS
    /// layer.
    pub fn collect(&mut self) {
        while let Some(e) = self.client.poll_event() {
            if matches!(e, Event::StartTls) {
                self.client.handle_tls_established().unwrap();
            }
            self.transcript.push(format!("{e:?}"));
            self.events.push(e);
        }
    }

    /// Answers what the server asks, unless holding.
    pub fn serve_events(&mut self) {
        while let Some(e) = self.server.poll_event() {
            match e {
                SEvent::Request(r) => {
                    self.requests.push(r.clone());
                    if r.command == Command::Write {
                        self.lent += 1;
                        self.server.receive_write(r.id, vec![0; r.length as usize]).unwrap();
                        if self.hold {
                            self.held.push(r);
                        }
                    } else if self.hold {
                        self.held.push(r);
                    } else {
                        self.answer(&r, None);
                    }
                }
                SEvent::WriteData { id, buf } => {
                    self.lent -= 1;
                    if !self.hold {
                        let r = self.requests.iter().rev().find(|r| r.id == id).cloned().expect("the write's request");
                        self.answer(&r, Some(buf));
                    }
                }
                SEvent::BufferReturned { .. } => self.lent -= 1,
                SEvent::StartTls => {
                    self.server_events.push("StartTls".into());
                    self.server.handle_tls_established().unwrap();
                }
                other => self.server_events.push(format!("{other:?}")),
            }
        }
    }

    /// Serves `r` from the disk, counting the buffers lent.
    pub fn answer(&mut self, r: &Request, data: Option<Vec<u8>>) {
        self.lent += self.disk.serve(&mut self.server, r, data);
    }

    /// Moves bytes both ways until neither side has anything to say; a
    /// side that finished makes the other see EOF.
    pub fn drive(&mut self) {
        loop {
            self.serve_events();
            let a = self.client_bytes();
            let b = self.server_bytes();
            self.collect();
            let server_done = matches!(self.server.phase(), server::Phase::Closed | server::Phase::Dead);
            if server_done && self.client.direction().wants_read() {
                self.client.handle_eof();
                self.collect();
            }
            let client_done = matches!(self.client.state(), PublicState::Closed | PublicState::Dead);
            if client_done && !server_done && !self.server.direction().wants_write() {
                self.server.handle_eof();
                self.serve_events();
            }
            if !a && !b {
                return;
            }
        }
    }

    /// Runs the handshake to the end.
    pub fn connect(client: Config, server: server::Config, disk: Disk) -> Self {
        let mut p = ServerPair::new(client, server, disk, Split::Whole);
        p.drive();
        p
    }

    pub fn completion(&mut self, cookie: Cookie) -> Option<Result<Option<Vec<u8>>, Error>> {
        take_completion(&mut self.events, cookie)
    }

    pub fn completed(&mut self, cookie: Cookie) -> Result<Option<Vec<u8>>, Error> {
        self.completion(cookie).unwrap_or_else(|| panic!("command {cookie} did not complete"))
    }

    /// The errno a command completed with (0 on success).
    pub fn errno_of(&mut self, cookie: Cookie) -> i32 {
        self.completed(cookie).err().map_or(0, |e| e.errno())
    }

    pub fn option_result(&mut self) -> Option<Result<(), Error>> {
        take_option_result(&mut self.events)
    }
}

/// The NBD error a flag combination the client may not send should get.
pub const EINVAL: u32 = nbd_error::EINVAL;

/// Flags helper for tests.
pub fn flags(bits: u16) -> CmdFlags {
    CmdFlags::from_bits_truncate(bits)
}
