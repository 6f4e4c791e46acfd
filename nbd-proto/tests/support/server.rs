//! A scripted in-memory NBD server built on the core's wire encoding.
//!
//! It answers like nbdkit, qemu-nbd or nbd-server would (see the
//! `Behaviour` constructors), and tests can hold its answers back and
//! inject their own bytes instead, for every malformed reply a real server
//! will not send.

#![allow(dead_code)]

use nbd_proto::flags::{CmdFlags, TransmissionFlags as TF};
use nbd_proto::wire::payload::{self as enc, Info};
use nbd_proto::wire::{chunk, cmd, info, opt, rep, ChunkHeader, OptionHeader, Reader, ReplyHeader, RequestHeader};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Oldstyle,
    Newstyle,
    Fixed,
}

/// How the server behaves; the constructors mirror the real servers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub style: Style,
    pub no_zeroes: bool,
    pub structured: bool,
    pub extended: bool,
    /// Supports NBD_OPT_INFO / NBD_OPT_GO; otherwise answers ERR_UNSUP.
    pub go: bool,
    /// Answers NBD_OPT_ABORT with an ACK (nbdkit) rather than just closing.
    pub abort_ack: bool,
    /// Accepts NBD_OPT_STARTTLS (its TLS layer is transparent here);
    /// otherwise refuses it with ERR_POLICY.
    pub starttls: bool,
    pub contexts: Vec<String>,
    /// READ replies use HOLE chunks for runs of zeroes (qemu-nbd).
    pub sparse_reads: bool,
    /// Errors to non-READ commands as simple replies under SR (nbdkit).
    pub simple_errors: bool,
    /// End structured replies with a separate NONE chunk.
    pub none_terminator: bool,
    /// Largest DATA chunk; longer reads are split.
    pub max_data_chunk: usize,
    pub flags: TF,
    pub exports: Vec<(String, String)>,
    pub block_size: Option<(u32, u32, u32)>,
    /// Commands touching `[start, end)` fail with this NBD error.
    pub fail: Option<(u64, u64, u32)>,
}

impl Behaviour {
    pub fn nbdkit() -> Self {
        Behaviour {
            style: Style::Fixed,
            no_zeroes: true,
            structured: true,
            extended: false,
            go: true,
            abort_ack: true,
            starttls: false,
            contexts: vec!["base:allocation".into()],
            sparse_reads: false,
            simple_errors: true,
            none_terminator: false,
            max_data_chunk: usize::MAX,
            flags: TF::HAS_FLAGS
                | TF::SEND_FLUSH
                | TF::SEND_FUA
                | TF::SEND_TRIM
                | TF::SEND_WRITE_ZEROES
                | TF::SEND_DF
                | TF::CAN_MULTI_CONN
                | TF::SEND_CACHE
                | TF::SEND_FAST_ZERO,
            exports: vec![(String::new(), "nbdkit memory".into())],
            block_size: Some((1, 4096, 0xffff_ffff)),
            fail: None,
        }
    }

    pub fn qemu() -> Self {
        Behaviour {
            extended: true,
            abort_ack: true,
            contexts: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
            sparse_reads: true,
            simple_errors: false,
            none_terminator: true,
            max_data_chunk: 64 * 1024,
            flags: Behaviour::nbdkit().flags | TF::BLOCK_STAT_PAYLOAD,
            exports: vec![(String::new(), "qemu".into())],
            block_size: Some((1, 4096, 32 * 1024 * 1024)),
            ..Behaviour::nbdkit()
        }
    }

    pub fn nbd_server() -> Self {
        Behaviour {
            structured: false,
            extended: false,
            abort_ack: false,
            contexts: vec![],
            flags: TF::HAS_FLAGS | TF::SEND_FLUSH | TF::SEND_FUA | TF::SEND_TRIM | TF::CAN_MULTI_CONN,
            exports: vec![("exp".into(), String::new())],
            block_size: None,
            ..Behaviour::nbdkit()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Transmission,
    Closed,
}

pub struct Server {
    pub b: Behaviour,
    pub disk: Vec<u8>,
    inbuf: Vec<u8>,
    /// Bytes waiting to go to the client.
    pub out: Vec<u8>,
    phase: Phase,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    active: Vec<(u32, String)>,
    /// Every option and request received, in order.
    pub options: Vec<u32>,
    pub requests: Vec<RequestHeader>,
    /// Record requests but do not answer them (the test injects replies).
    pub hold: bool,
    pub closed: bool,
}

impl Server {
    pub fn new(b: Behaviour, size: usize) -> Self {
        let mut s = Server {
            b,
            disk: vec![0; size],
            inbuf: Vec::new(),
            out: Vec::new(),
            phase: Phase::ClientFlags,
            no_zeroes: false,
            structured: false,
            extended: false,
            active: Vec::new(),
            options: Vec::new(),
            requests: Vec::new(),
            hold: false,
            closed: false,
        };
        s.greet();
        s
    }

    fn greet(&mut self) {
        match self.b.style {
            Style::Oldstyle => {
                enc::encode_oldstyle_greeting(self.disk.len() as u64, u32::from(self.b.flags.bits()), &mut self.out);
                self.phase = Phase::Transmission;
            }
            Style::Newstyle | Style::Fixed => {
                let mut f = 0u16;
                if self.b.style == Style::Fixed {
                    f |= 1;
                }
                if self.b.no_zeroes {
                    f |= 2;
                }
                enc::encode_newstyle_greeting(f, &mut self.out);
            }
        }
    }

    pub fn receive(&mut self, bytes: &[u8]) {
        self.inbuf.extend_from_slice(bytes);
        while !self.closed && self.step() {}
    }

    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        (self.inbuf.len() >= n).then(|| self.inbuf.drain(..n).collect())
    }

    fn step(&mut self) -> bool {
        match self.phase {
            Phase::ClientFlags => {
                let Some(b) = self.take(4) else { return false };
                let f = Reader::new(&b).u32().unwrap();
                self.no_zeroes = f & 2 != 0 && self.b.no_zeroes;
                self.phase = Phase::Options;
                true
            }
            Phase::Options => {
                let Some(h) = self.inbuf.get(..16).and_then(OptionHeader::decode) else { return false };
                if self.inbuf.len() < 16 + h.length as usize {
                    return false;
                }
                self.inbuf.drain(..16);
                let data: Vec<u8> = self.inbuf.drain(..h.length as usize).collect();
                self.options.push(h.option);
                self.on_option(h.option, &data);
                true
            }
            Phase::Transmission => {
                let size = if self.extended { RequestHeader::EXTENDED_SIZE } else { RequestHeader::COMPACT_SIZE };
                let Some((h, _)) = self.inbuf.get(..size).and_then(RequestHeader::decode) else { return false };
                // WRITE carries its data; BLOCK_STATUS with PAYLOAD_LEN its
                // effect length and the context ids to report.
                let filtered = h.kind == cmd::BLOCK_STATUS && h.flags & CmdFlags::PAYLOAD_LEN.bits() != 0;
                let payload = if h.kind == cmd::WRITE || filtered { h.length as usize } else { 0 };
                if self.inbuf.len() < size + payload {
                    return false;
                }
                self.inbuf.drain(..size);
                let data: Vec<u8> = self.inbuf.drain(..payload).collect();
                self.requests.push(h);
                if self.hold {
                    // The test answers (or closes) by hand.
                } else if h.kind == cmd::DISC {
                    self.closed = true;
                } else {
                    self.on_request(h, &data);
                }
                true
            }
            Phase::Closed => false,
        }
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        enc::encode_option_reply(option, reply, data, &mut self.out);
    }

    fn export_info(&mut self, option: u32, name: &str, infos: &[u16]) -> bool {
        let Some((name, desc)) = self.b.exports.iter().find(|(n, _)| n == name).cloned() else {
            self.reply(option, rep::ERR_UNKNOWN, b"no such export");
            return false;
        };
        let mut d = Vec::new();
        Info::Export { size: self.disk.len() as u64, flags: self.b.flags.bits() }.encode(&mut d);
        self.reply(option, rep::INFO, &d);
        for &i in infos {
            let item = match i {
                info::NAME => Info::Name(&name),
                info::DESCRIPTION => Info::Description(&desc),
                info::BLOCK_SIZE => match self.b.block_size {
                    Some((minimum, preferred, maximum)) => Info::BlockSize { minimum, preferred, maximum },
                    None => continue,
                },
                _ => continue,
            };
            let mut d = Vec::new();
            item.encode(&mut d);
            self.reply(option, rep::INFO, &d);
        }
        self.reply(option, rep::ACK, &[]);
        true
    }

    fn on_option(&mut self, option: u32, data: &[u8]) {
        let fixed = self.b.style == Style::Fixed;
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                if !self.b.exports.iter().any(|(n, _)| *n == name) {
                    self.closed = true;
                    return;
                }
                enc::encode_export_name_reply(
                    self.disk.len() as u64,
                    self.b.flags.bits(),
                    !self.no_zeroes,
                    &mut self.out,
                );
                self.phase = Phase::Transmission;
            }
            _ if !fixed => self.closed = true,
            opt::ABORT => {
                if self.b.abort_ack {
                    self.reply(option, rep::ACK, &[]);
                }
                self.closed = true;
            }
            opt::LIST => {
                for (n, d) in self.b.exports.clone() {
                    let mut p = Vec::new();
                    enc::encode_server_entry(&n, &d, &mut p);
                    self.reply(option, rep::SERVER, &p);
                }
                self.reply(option, rep::ACK, &[]);
            }
            opt::STARTTLS if self.b.starttls => self.reply(option, rep::ACK, &[]),
            opt::STARTTLS => self.reply(option, rep::ERR_POLICY, b"TLS not configured"),
            opt::STRUCTURED_REPLY if self.b.structured => {
                self.structured = true;
                self.reply(option, rep::ACK, &[]);
            }
            opt::EXTENDED_HEADERS if self.b.extended => {
                self.structured = true;
                self.extended = true;
                self.reply(option, rep::ACK, &[]);
            }
            opt::INFO | opt::GO if self.b.go => {
                let request = enc::decode_info_request(data);
                let name = request.as_ref().map(|q| String::from_utf8_lossy(q.export).into_owned()).unwrap_or_default();
                let infos = request.map(|q| q.infos).unwrap_or_default();
                if self.export_info(option, &name, &infos) && option == opt::GO {
                    self.phase = Phase::Transmission;
                }
            }
            opt::SET_META_CONTEXT | opt::LIST_META_CONTEXT if self.structured => {
                let queries: Vec<String> = enc::decode_meta_context_request(data)
                    .map(|m| m.queries.iter().map(|q| String::from_utf8_lossy(q).into_owned()).collect())
                    .unwrap_or_default();
                let set = option == opt::SET_META_CONTEXT;
                if set {
                    self.active.clear();
                }
                let known = self.b.contexts.clone();
                for (i, c) in known.iter().enumerate() {
                    let wanted = (queries.is_empty() && !set) || queries.iter().any(|q| q == c);
                    if wanted {
                        let id = if set { i as u32 + 1 } else { 0 };
                        if set {
                            self.active.push((id, c.clone()));
                        }
                        let mut p = Vec::new();
                        enc::encode_meta_context_entry(id, c, &mut p);
                        self.reply(option, rep::META_CONTEXT, &p);
                    }
                }
                self.reply(option, rep::ACK, &[]);
            }
            _ => self.reply(option, rep::ERR_UNSUP, &[]),
        }
    }

    // ---- transmission ---------------------------------------------------------

    fn chunk(&mut self, cookie: u64, kind: u16, done: bool, offset: u64, payload: &[u8]) {
        let h = ChunkHeader {
            flags: if done { chunk::FLAG_DONE } else { 0 },
            kind,
            cookie,
            offset,
            length: payload.len() as u64,
            extended: self.extended,
        };
        ReplyHeader::Chunk(h).encode(&mut self.out);
        self.out.extend_from_slice(payload);
    }

    fn simple(&mut self, cookie: u64, error: u32) {
        if self.extended {
            if error == 0 {
                self.chunk(cookie, chunk::NONE, true, 0, &[]);
            } else {
                self.error_chunk(cookie, error, true);
            }
        } else {
            ReplyHeader::Simple { error, cookie }.encode(&mut self.out);
        }
    }

    fn error_chunk(&mut self, cookie: u64, error: u32, done: bool) {
        let mut p = Vec::new();
        enc::encode_error_chunk(error, "injected failure", &mut p);
        self.chunk(cookie, chunk::ERROR, done, 0, &p);
    }

    fn failing(&self, h: &RequestHeader) -> Option<u32> {
        let (s, e, err) = self.b.fail?;
        (h.offset < e && h.offset + h.length.max(1) > s).then_some(err)
    }

    fn on_request(&mut self, mut h: RequestHeader, data: &[u8]) {
        let mut only: Option<Vec<u32>> = None;
        if h.kind == cmd::BLOCK_STATUS && h.flags & CmdFlags::PAYLOAD_LEN.bits() != 0 {
            let (length, ids) = enc::decode_block_status_payload(data).unwrap_or_default();
            h.length = length;
            only = Some(ids);
        }
        let (off, len) = (h.offset as usize, h.length as usize);
        let in_bounds = off.checked_add(len).is_some_and(|e| e <= self.disk.len());
        if !in_bounds && h.kind != cmd::FLUSH {
            return self.fail_request(h, nbd_proto::wire::nbd_error::EINVAL);
        }
        if let Some(err) = self.failing(&h) {
            return self.fail_request(h, err);
        }
        match h.kind {
            cmd::READ if !self.structured => {
                self.simple(h.cookie, 0);
                let bytes = self.disk[off..off + len].to_vec();
                self.out.extend_from_slice(&bytes);
            }
            cmd::READ => self.structured_read(h),
            cmd::WRITE => {
                self.disk[off..off + len].copy_from_slice(data);
                self.simple(h.cookie, 0);
            }
            cmd::TRIM | cmd::WRITE_ZEROES => {
                self.disk[off..off + len].fill(0);
                self.simple(h.cookie, 0);
            }
            cmd::BLOCK_STATUS => self.block_status(h, only.as_deref()),
            _ => self.simple(h.cookie, 0),
        }
    }

    fn fail_request(&mut self, h: RequestHeader, err: u32) {
        let chunked = self.structured && (h.kind == cmd::READ || h.kind == cmd::BLOCK_STATUS || !self.b.simple_errors);
        if chunked || self.extended {
            self.error_chunk(h.cookie, err, true);
        } else {
            self.simple(h.cookie, err);
        }
    }

    /// DATA chunks (and HOLE chunks for zero runs when sparse), in order.
    fn structured_read(&mut self, h: RequestHeader) {
        let (off, len) = (h.offset as usize, h.length as usize);
        let mut pieces: Vec<(usize, usize, bool)> = Vec::new();
        // With DF the whole read is one DATA chunk, as real servers send it.
        let df = h.flags & nbd_proto::CmdFlags::DF.bits() != 0;
        let mut at = off;
        while at < off + len {
            let end = (at + self.b.max_data_chunk.min(4096)).min(off + len);
            let hole = !df && self.b.sparse_reads && self.disk[at..end].iter().all(|&b| b == 0);
            match pieces.last_mut() {
                Some((_, l, was_hole))
                    if *was_hole == hole && (df || hole || *l + (end - at) <= self.b.max_data_chunk) =>
                {
                    *l += end - at
                }
                _ => pieces.push((at, end - at, hole)),
            }
            at = end;
        }
        let n = pieces.len();
        for (i, (start, l, hole)) in pieces.into_iter().enumerate() {
            let done = i + 1 == n && !self.b.none_terminator;
            let mut p = Vec::new();
            if hole {
                enc::encode_offset_hole(start as u64, l as u32, &mut p);
                self.chunk(h.cookie, chunk::OFFSET_HOLE, done, h.offset, &p);
            } else {
                p.extend_from_slice(&(start as u64).to_be_bytes());
                p.extend_from_slice(&self.disk[start..start + l]);
                self.chunk(h.cookie, chunk::OFFSET_DATA, done, h.offset, &p);
            }
        }
        if self.b.none_terminator || n == 0 {
            self.chunk(h.cookie, chunk::NONE, true, h.offset, &[]);
        }
    }

    /// One status chunk per active context (those in `only`, if the
    /// request named some); `base:allocation` maps zero blocks of 4 KiB
    /// to HOLE|ZERO.
    fn block_status(&mut self, h: RequestHeader, only: Option<&[u32]>) {
        let (off, len) = (h.offset as usize, h.length as usize);
        let req_one = h.flags & 8 != 0;
        let active: Vec<(u32, String)> =
            self.active.iter().filter(|(id, _)| only.is_none_or(|ids| ids.contains(id))).cloned().collect();
        for (i, (id, name)) in active.iter().enumerate() {
            let mut extents: Vec<(u64, u32)> = Vec::new();
            if name == "base:allocation" {
                let mut at = off;
                while at < off + len {
                    let end = ((at / 4096 + 1) * 4096).min(off + len);
                    let flags = if self.disk[at..end].iter().all(|&b| b == 0) { 3 } else { 0 };
                    match extents.last_mut() {
                        Some((l, f)) if *f == flags => *l += (end - at) as u64,
                        _ => extents.push(((end - at) as u64, flags)),
                    }
                    at = end;
                }
            } else {
                extents.push((len as u64, 1));
            }
            if req_one {
                extents.truncate(1);
            }
            let mut p = Vec::new();
            if self.extended {
                let wide: Vec<(u64, u64)> = extents.iter().map(|&(l, f)| (l, u64::from(f))).collect();
                enc::encode_block_status_ext(*id, &wide, &mut p);
            } else {
                let narrow: Vec<(u32, u32)> = extents.iter().map(|&(l, f)| (l as u32, f)).collect();
                enc::encode_block_status(*id, &narrow, &mut p);
            }
            let kind = if self.extended { chunk::BLOCK_STATUS_EXT } else { chunk::BLOCK_STATUS };
            let done = i + 1 == active.len() && !self.b.none_terminator;
            self.chunk(h.cookie, kind, done, h.offset, &p);
        }
        if self.b.none_terminator || active.is_empty() {
            self.chunk(h.cookie, chunk::NONE, true, h.offset, &[]);
        }
    }
}
