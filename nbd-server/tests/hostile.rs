//! nbd-rs-server against a scripted malformed client: raw bytes on a Unix
//! socket, each case checked against what the NBD protocol specification
//! (doc/proto.md of NetworkBlockDevice/nbd) prescribes, not against what
//! the server happens to do. Every case gets a fresh server; after it, a
//! fresh client must still complete a handshake and a READ, and the
//! server must exit cleanly on SIGTERM.
//!
//! The encoders and decoders are this file's own, written from the
//! specification, so that a mistake shared with nbd-proto cannot hide.

mod common;

use common::Server;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---- numbers from the specification ------------------------------------------

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_PEEK_EXPORT: u32 = 4;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_SEND_DF: u16 = 1 << 7;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_DF: u16 = 1 << 2;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// No command flag is defined this high.
const CMD_FLAG_UNDEFINED: u16 = 1 << 15;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

const NBD_EPERM: u32 = 1;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;

/// The size of every export the cases use, but `other`.
const SIZE: u64 = 1 << 20;

/// How long the server may take to answer or hang up before the case
/// counts as a hang.
const PATIENCE: Duration = Duration::from_secs(5);

// ---- encoders -------------------------------------------------------------------

fn option(opt: u32, payload: &[u8]) -> Vec<u8> {
    option_with(IHAVEOPT, opt, payload.len() as u32, payload)
}

/// An option whose magic and declared length are the caller's.
fn option_with(magic: &[u8; 8], opt: u32, declared: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = magic.to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&declared.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// An NBD_OPT_INFO / NBD_OPT_GO payload.
fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name);
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// An NBD_OPT_{LIST,SET}_META_CONTEXT payload.
fn meta_payload(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name);
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q);
    }
    b
}

/// A compact request header.
fn req(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

/// An extended request header (NBD_OPT_EXTENDED_HEADERS).
fn ext_req(flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut b = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

/// A WRITE of `len` bytes whose payload starts with a whole READ request
/// (cookie 0xbad): a server that fails to skip a refused payload parses it
/// and answers a cookie the client never used, or hangs up on the zeroes
/// after it.
fn write_with_trap(flags: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut b = req(flags, CMD_WRITE, 1, offset, len);
    let mut payload = req(0, CMD_READ, 0xbad, 0, 512);
    payload.resize(len as usize, 0);
    b.extend_from_slice(&payload);
    b
}

// ---- a raw session ----------------------------------------------------------------

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// One reply in transmission, all its chunks gathered.
#[derive(Debug, Default)]
struct Reply {
    cookie: u64,
    /// Zero, or the error of the simple reply or of the first error chunk.
    error: u32,
    simple: bool,
    /// READ data, holes filled with zeroes.
    data: Vec<u8>,
    /// The chunk types, in order (empty for a simple reply).
    chunks: Vec<u16>,
    /// BLOCK_STATUS: per chunk, the context id and its (length, flags).
    status: Vec<(u32, Vec<(u64, u64)>)>,
}

struct Session {
    c: UnixStream,
    structured: bool,
    extended: bool,
    transmission: bool,
    /// The transmission flags the server sent.
    tflags: u16,
    /// Context ids from the last NBD_OPT_SET_META_CONTEXT.
    contexts: Vec<u32>,
}

impl Session {
    /// Connected, with the greeting read and checked.
    fn connect(sock: &Path) -> Session {
        let c = UnixStream::connect(sock).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut s =
            Session { c, structured: false, extended: false, transmission: false, tflags: 0, contexts: Vec::new() };
        let g = s.read(18);
        assert_eq!(&g[..8], NBDMAGIC);
        assert_eq!(&g[8..16], IHAVEOPT);
        // A server may set only the two defined handshake flags.
        assert_eq!(be16(&g[16..]) & !3, 0, "undefined handshake flags {:#x}", be16(&g[16..]));
        s
    }

    fn send(&mut self, b: &[u8]) {
        self.c.write_all(b).unwrap_or_else(|e| panic!("sending {} bytes: {e}", b.len()));
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        let mut at = 0;
        let start = Instant::now();
        while at < n {
            match self.c.read(&mut b[at..]) {
                Ok(0) => panic!("the server hung up {at} bytes into a {n}-byte read"),
                Ok(k) => at += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("no reply after {:?} ({at} of {n} bytes): {e}", start.elapsed()),
            }
        }
        b
    }

    /// The server closes the connection, sending nothing more first.
    fn expect_eof(&mut self) {
        let mut b = [0u8; 4096];
        loop {
            match self.c.read(&mut b) {
                Ok(0) => return,
                Ok(n) => panic!("the server sent {n} more bytes instead of hanging up: {:02x?}", &b[..n.min(64)]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A reset is a hang-up too.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the server did not hang up within {PATIENCE:?}: {e}"),
            }
        }
    }

    /// The replies to `opt`, up to and including the final one (an ACK or
    /// an error); each one's type and payload.
    fn option_replies(&mut self, opt: u32) -> Vec<(u32, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let h = self.read(20);
            assert_eq!(be64(&h), OPTION_REPLY_MAGIC, "option reply magic");
            assert_eq!(be32(&h[8..]), opt, "the reply names another option");
            let (kind, len) = (be32(&h[12..]), be32(&h[16..]));
            assert!(len <= 1 << 20, "option reply of {len} bytes");
            let payload = self.read(len as usize);
            all.push((kind, payload));
            if kind == REP_ACK || kind & REP_ERR_BIT != 0 {
                return all;
            }
            let allowed: &[u32] = match opt {
                OPT_LIST => &[REP_SERVER],
                OPT_INFO | OPT_GO => &[REP_INFO],
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => &[REP_META_CONTEXT],
                _ => &[],
            };
            assert!(allowed.contains(&kind), "reply type {kind:#x} to option {opt}");
            assert!(all.len() < 100, "endless replies to option {opt}");
        }
    }

    /// Sends `opt` and checks its final reply type; what it changes in the
    /// session is recorded.
    fn negotiate(&mut self, opt: u32, payload: &[u8], want: u32) -> Vec<(u32, Vec<u8>)> {
        self.send(&option(opt, payload));
        let replies = self.option_replies(opt);
        let last = replies.last().unwrap().0;
        assert_eq!(last, want, "final reply to option {opt}: got {last:#x}, want {want:#x}");
        if last == REP_ACK {
            match opt {
                OPT_STRUCTURED_REPLY => self.structured = true,
                OPT_EXTENDED_HEADERS => (self.structured, self.extended) = (true, true),
                OPT_SET_META_CONTEXT => {
                    self.contexts = replies.iter().filter(|r| r.0 == REP_META_CONTEXT).map(|r| be32(&r.1)).collect()
                }
                OPT_GO => {
                    let export = replies.iter().find(|r| r.0 == REP_INFO && be16(&r.1) == INFO_EXPORT);
                    let export = export.expect("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
                    assert_eq!(export.1.len(), 12, "NBD_INFO_EXPORT length");
                    self.tflags = be16(&export.1[10..]);
                    self.transmission = true;
                }
                _ => {}
            }
        }
        replies
    }

    fn go(&mut self, export: &str) {
        self.negotiate(OPT_GO, &info_payload(export.as_bytes(), &[]), REP_ACK);
        if !self.structured {
            assert_eq!(self.tflags & TFLAG_SEND_DF, 0, "NBD_FLAG_SEND_DF without structured replies");
        }
    }

    fn request(&self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        if self.extended {
            ext_req(flags, kind, cookie, offset, u64::from(length))
        } else {
            req(flags, kind, cookie, offset, length)
        }
    }

    /// One whole reply; `data_len` is what a successful simple reply to a
    /// READ carries.
    fn reply(&mut self, data_len: usize) -> Reply {
        self.reply_for(&|_| data_len)
    }

    /// One whole reply, to whichever request; a successful simple reply
    /// carries `data_len(cookie)` bytes.
    fn reply_for(&mut self, data_len: &dyn Fn(u64) -> usize) -> Reply {
        let magic = be32(&self.read(4));
        let mut r = Reply::default();
        if magic == SIMPLE_REPLY_MAGIC {
            let h = self.read(12);
            r.simple = true;
            r.error = be32(&h);
            r.cookie = be64(&h[4..]);
            if r.error == 0 {
                r.data = self.read(data_len(r.cookie));
            }
            return r;
        }
        let mut magic = magic;
        loop {
            let (flags, kind, cookie, len) = match magic {
                STRUCTURED_REPLY_MAGIC if self.structured && !self.extended => {
                    let h = self.read(16);
                    (be16(&h), be16(&h[2..]), be64(&h[4..]), u64::from(be32(&h[12..])))
                }
                EXTENDED_REPLY_MAGIC if self.extended => {
                    let h = self.read(28);
                    (be16(&h), be16(&h[2..]), be64(&h[4..]), be64(&h[20..]))
                }
                _ => panic!("reply magic {magic:#x} (structured {}, extended {})", self.structured, self.extended),
            };
            assert!(len <= 64 << 20, "chunk of {len} bytes");
            let p = self.read(len as usize);
            if r.chunks.is_empty() {
                r.cookie = cookie;
            }
            assert_eq!(cookie, r.cookie, "chunks of two replies interleaved, with one request in flight");
            r.chunks.push(kind);
            match kind {
                REPLY_TYPE_NONE => assert!(p.is_empty() && flags & REPLY_FLAG_DONE != 0, "bad NONE chunk"),
                REPLY_TYPE_OFFSET_DATA => r.data.extend_from_slice(&p[8..]),
                REPLY_TYPE_OFFSET_HOLE => r.data.resize(r.data.len() + be32(&p[8..]) as usize, 0),
                REPLY_TYPE_BLOCK_STATUS => {
                    let d = p[4..].chunks(8).map(|e| (u64::from(be32(e)), u64::from(be32(&e[4..])))).collect();
                    r.status.push((be32(&p), d));
                }
                REPLY_TYPE_BLOCK_STATUS_EXT => {
                    let d = p[8..].chunks(16).map(|e| (be64(e), be64(&e[8..]))).collect();
                    r.status.push((be32(&p), d));
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let error = be32(&p);
                    assert_ne!(error, 0, "an error chunk with error 0");
                    if r.error == 0 {
                        r.error = error;
                    }
                }
                k => panic!("unknown chunk type {k}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return r;
            }
            magic = be32(&self.read(4));
        }
    }

    /// A READ of 512 zeroes at 0 on this connection: it still parses
    /// requests where they begin (and nothing wrote there).
    fn read_still_works(&mut self) {
        self.send(&self.request(0, CMD_READ, 0xf00, 0, 512));
        let r = self.reply(512);
        assert_eq!(r.cookie, 0xf00, "the reply to the next READ names cookie {:#x}", r.cookie);
        assert_eq!(r.error, 0, "the next READ failed");
        assert_eq!(r.data.len(), 512);
        assert!(r.data.iter().all(|&b| b == 0), "offset 0 was written");
    }
}

// ---- the cases ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Srv {
    /// `memory:1M` and `other=memory:64K`.
    Rw,
    /// `--ro memory:1M`.
    Ro,
    /// `--tls require` with PSK, `memory:1M`.
    TlsRequired,
}

/// Where the scripted bytes start.
enum Setup {
    /// The greeting has been read; nothing was sent.
    Greeting,
    /// Client flags FIXED_NEWSTYLE | NO_ZEROES sent, then these options,
    /// each with the final reply it must get.
    Options(Vec<(u32, Vec<u8>, u32)>),
    /// As `Options`, then NBD_OPT_GO of this export.
    Transmission(Vec<(u32, Vec<u8>, u32)>, &'static str),
}

/// What the server must do with the scripted bytes. Transmission
/// expectations are about cookie 1.
#[derive(Debug)]
enum Expect {
    /// Hang up, sending nothing more.
    Eof,
    /// One final option reply of this type to this option (and no
    /// NBD_REP_INFO before an error, as NBD_OPT_GO and NBD_OPT_INFO ask).
    Opt(u32, u32),
    /// As `Opt`, then hang up.
    OptThenEof(u32, u32),
    /// NBD_OPT_INFO acknowledged, each NBD_INFO type at most once.
    InfoOnceEach,
    /// The NBD_OPT_EXPORT_NAME reply with its 124 zeroes.
    ExportWithZeroes,
    /// This error, in a simple reply or an error chunk.
    Error(u32),
    /// This error, in an error chunk (a READ under structured replies).
    ErrorChunk(u32),
    /// Success: `n` bytes of data (0 for commands without data).
    Ok(usize),
    /// A reply, error or not, without data.
    Answered,
    /// Success: one OFFSET_DATA chunk of `n` bytes and nothing else but
    /// an optional NONE.
    OneDataChunk(usize),
    /// Success: per selected context, one chunk of one extent no longer
    /// than this.
    OneExtentUpTo(u64),
    /// `Ok(n)`, then hang up.
    OkThenEof(usize),
    /// A reply to each (cookie, error, data length), in any order.
    Replies(Vec<(u64, u32, usize)>),
    /// Hang up, whatever comes before (a TLS alert, say).
    HangUp,
}

struct Case {
    name: &'static str,
    srv: Srv,
    setup: Setup,
    send: Vec<u8>,
    /// Shut the client's sending side after the bytes (an EOF mid-message).
    half_close: bool,
    expect: Expect,
    /// Text the server's log must hold afterwards.
    log: Option<&'static str>,
}

fn case(name: &'static str, srv: Srv, setup: Setup, send: Vec<u8>, expect: Expect) -> Case {
    Case { name, srv, setup, send, half_close: false, expect, log: None }
}

impl Case {
    fn logs(mut self, text: &'static str) -> Case {
        self.log = Some(text);
        self
    }
    fn then_eof(mut self) -> Case {
        self.half_close = true;
        self
    }
}

fn opts() -> Setup {
    Setup::Options(Vec::new())
}
fn sr() -> (u32, Vec<u8>, u32) {
    (OPT_STRUCTURED_REPLY, Vec::new(), REP_ACK)
}
fn base_allocation(export: &str) -> (u32, Vec<u8>, u32) {
    (OPT_SET_META_CONTEXT, meta_payload(export.as_bytes(), &[b"base:allocation"]), REP_ACK)
}
/// Transmission on the default export, with simple replies.
fn simple() -> Setup {
    Setup::Transmission(Vec::new(), "")
}
fn structured() -> Setup {
    Setup::Transmission(vec![sr()], "")
}
fn with_status() -> Setup {
    Setup::Transmission(vec![sr(), base_allocation("")], "")
}

/// Every case on which the specification and the server agree.
fn conforming_cases() -> Vec<Case> {
    use Expect::*;
    use Srv::*;
    let go = |name: &[u8]| option(OPT_GO, &info_payload(name, &[]));
    // A name length that claims more than the option holds.
    let mut overrun_name = 100u32.to_be_bytes().to_vec();
    overrun_name.extend_from_slice(b"abc\0\0");
    // Three info requests announced, two present.
    let mut short_list = info_payload(b"", &[INFO_NAME, INFO_DESCRIPTION]);
    short_list[5] = 3;
    let mut odd_list = info_payload(b"", &[INFO_NAME]);
    odd_list.push(0);
    // A query whose length runs past the option's end.
    let mut overrun_query = meta_payload(b"", &[b"base:allocation"]);
    overrun_query.truncate(overrun_query.len() - 3);
    // A query count no payload of this size can hold.
    let mut many_queries = meta_payload(b"", &[]);
    many_queries[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    // 1 MiB: well-formed, too large for any reasonable option buffer.
    let huge = info_payload(&vec![b'a'; (1 << 20) - 6], &[]);
    let sr_then_bad_set =
        vec![sr(), base_allocation(""), (OPT_SET_META_CONTEXT, overrun_query.clone(), REP_ERR_INVALID)];

    vec![
        // -- the greeting and client flags
        case("client flags with an unknown bit", Rw, Setup::Greeting, 7u32.to_be_bytes().to_vec(), Eof)
            .logs("unknown client flags"),
        case("client flags with only the top bit", Rw, Setup::Greeting, (1u32 << 31).to_be_bytes().to_vec(), Eof),
        case(
            "non-fixed newstyle client: EXPORT_NAME gets the 124 zeroes",
            Rw,
            Setup::Greeting,
            {
                let mut b = 0u32.to_be_bytes().to_vec();
                b.extend_from_slice(&option(OPT_EXPORT_NAME, b""));
                b
            },
            ExportWithZeroes,
        ),
        // -- option haggling
        case(
            "option with a bad IHAVEOPT magic",
            Rw,
            opts(),
            option_with(b"IHAVEOPX", OPT_GO, 6, &info_payload(b"", &[])),
            Eof,
        )
        .logs("bad magic in option request"),
        case(
            "option longer than the server takes",
            Rw,
            opts(),
            option(OPT_INFO, &huge),
            Opt(OPT_INFO, REP_ERR_TOO_BIG),
        ),
        case("unknown option", Rw, opts(), option(0x1234, b"data"), Opt(0x1234, REP_ERR_UNSUP)),
        case(
            "withdrawn NBD_OPT_PEEK_EXPORT",
            Rw,
            opts(),
            option(OPT_PEEK_EXPORT, b""),
            Opt(OPT_PEEK_EXPORT, REP_ERR_UNSUP),
        ),
        case("option number 0", Rw, opts(), option(0, b""), Opt(0, REP_ERR_UNSUP)),
        case(
            "GO whose name length overruns the option",
            Rw,
            opts(),
            option(OPT_GO, &overrun_name),
            Opt(OPT_GO, REP_ERR_INVALID),
        ),
        case(
            "INFO whose name length overruns the option",
            Rw,
            opts(),
            option(OPT_INFO, &overrun_name),
            Opt(OPT_INFO, REP_ERR_INVALID),
        ),
        case(
            "GO with no room for the request count",
            Rw,
            opts(),
            option(OPT_GO, &0u32.to_be_bytes()),
            Opt(OPT_GO, REP_ERR_INVALID),
        ),
        case("GO of an unknown export", Rw, opts(), go(b"nosuch"), Opt(OPT_GO, REP_ERR_UNKNOWN)),
        case("GO with an empty payload", Rw, opts(), option(OPT_GO, b""), Opt(OPT_GO, REP_ERR_INVALID)),
        // The ACK to NBD_OPT_GO is never followed by zero padding, whatever
        // the client flags (the READ after it would see the zeroes).
        case(
            "GO from a client that did not ask for NO_ZEROES",
            Rw,
            Setup::Greeting,
            {
                let mut b = FLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
                b.extend_from_slice(&go(b""));
                b
            },
            Opt(OPT_GO, REP_ACK),
        ),
        // Only NBD_OPT_EXPORT_NAME exists in non-fixed newstyle; anything
        // else breaks the protocol, and no reply format is agreed.
        case(
            "GO from a client that did not agree to fixed newstyle",
            Rw,
            Setup::Greeting,
            {
                let mut b = FLAG_NO_ZEROES.to_be_bytes().to_vec();
                b.extend_from_slice(&go(b""));
                b
            },
            Eof,
        ),
        case(
            "INFO of an unknown export",
            Rw,
            opts(),
            option(OPT_INFO, &info_payload(b"nosuch", &[])),
            Opt(OPT_INFO, REP_ERR_UNKNOWN),
        ),
        case("GO with a name over 4096 bytes", Rw, opts(), go(&[b'x'; 4097]), Opt(OPT_GO, REP_ERR_INVALID)),
        case(
            "INFO asking for NBD_INFO_NAME twice",
            Rw,
            opts(),
            option(OPT_INFO, &info_payload(b"", &[INFO_NAME, INFO_BLOCK_SIZE, INFO_NAME, INFO_BLOCK_SIZE, 0x7777])),
            InfoOnceEach,
        ),
        case(
            "INFO whose request list overruns the option",
            Rw,
            opts(),
            option(OPT_INFO, &short_list),
            Opt(OPT_INFO, REP_ERR_INVALID),
        ),
        case(
            "GO whose request list overruns the option",
            Rw,
            opts(),
            option(OPT_GO, &short_list),
            Opt(OPT_GO, REP_ERR_INVALID),
        ),
        case(
            "INFO with a stray byte after the request list",
            Rw,
            opts(),
            option(OPT_INFO, &odd_list),
            Opt(OPT_INFO, REP_ERR_INVALID),
        ),
        case(
            "STRUCTURED_REPLY with a payload",
            Rw,
            opts(),
            option(OPT_STRUCTURED_REPLY, b"x"),
            Opt(OPT_STRUCTURED_REPLY, REP_ERR_INVALID),
        ),
        case(
            "STRUCTURED_REPLY a second time",
            Rw,
            Setup::Options(vec![sr()]),
            option(OPT_STRUCTURED_REPLY, b""),
            Opt(OPT_STRUCTURED_REPLY, REP_ERR_INVALID),
        ),
        case(
            "EXTENDED_HEADERS with a payload",
            Rw,
            opts(),
            option(OPT_EXTENDED_HEADERS, b"x"),
            Opt(OPT_EXTENDED_HEADERS, REP_ERR_INVALID),
        ),
        case("LIST with a payload", Rw, opts(), option(OPT_LIST, b"x"), Opt(OPT_LIST, REP_ERR_INVALID)),
        case(
            "STARTTLS on a server without TLS",
            Rw,
            opts(),
            option(OPT_STARTTLS, b""),
            Opt(OPT_STARTTLS, REP_ERR_POLICY),
        ),
        case(
            "SET_META_CONTEXT before structured replies",
            Rw,
            opts(),
            option(OPT_SET_META_CONTEXT, &meta_payload(b"", &[b"base:allocation"])),
            Opt(OPT_SET_META_CONTEXT, REP_ERR_INVALID),
        ),
        case(
            "LIST_META_CONTEXT before structured replies",
            Rw,
            opts(),
            option(OPT_LIST_META_CONTEXT, &meta_payload(b"", &[])),
            Opt(OPT_LIST_META_CONTEXT, REP_ERR_INVALID),
        ),
        case(
            "SET_META_CONTEXT whose query overruns the option",
            Rw,
            Setup::Options(vec![sr()]),
            option(OPT_SET_META_CONTEXT, &overrun_query),
            Opt(OPT_SET_META_CONTEXT, REP_ERR_INVALID),
        ),
        case(
            "LIST_META_CONTEXT whose query overruns the option",
            Rw,
            Setup::Options(vec![sr()]),
            option(OPT_LIST_META_CONTEXT, &overrun_query),
            Opt(OPT_LIST_META_CONTEXT, REP_ERR_INVALID),
        ),
        case(
            "SET_META_CONTEXT with 2^32-1 queries in 8 bytes",
            Rw,
            Setup::Options(vec![sr()]),
            option(OPT_SET_META_CONTEXT, &many_queries),
            Opt(OPT_SET_META_CONTEXT, REP_ERR_INVALID),
        ),
        case(
            "SET_META_CONTEXT with trailing bytes",
            Rw,
            Setup::Options(vec![sr()]),
            option(OPT_SET_META_CONTEXT, &{
                let mut p = meta_payload(b"", &[b"base:allocation"]);
                p.extend_from_slice(b"junk");
                p
            }),
            Opt(OPT_SET_META_CONTEXT, REP_ERR_INVALID),
        ),
        case(
            "SET_META_CONTEXT of an unknown export",
            Rw,
            Setup::Options(vec![sr()]),
            option(OPT_SET_META_CONTEXT, &meta_payload(b"nosuch", &[b"base:allocation"])),
            Opt(OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN),
        ),
        case(
            "ABORT: acknowledged, then the server hangs up",
            Rw,
            opts(),
            option(OPT_ABORT, b""),
            OptThenEof(OPT_ABORT, REP_ACK),
        ),
        case(
            "ABORT with a payload, which is ignored",
            Rw,
            opts(),
            option(OPT_ABORT, b"bye"),
            OptThenEof(OPT_ABORT, REP_ACK),
        ),
        case("EXPORT_NAME of an unknown export", Rw, opts(), option(OPT_EXPORT_NAME, b"nosuch"), Eof)
            .logs("NBD_OPT_EXPORT_NAME refused: no such export"),
        case(
            "EXPORT_NAME after extended headers",
            Rw,
            Setup::Options(vec![(OPT_EXTENDED_HEADERS, Vec::new(), REP_ACK)]),
            option(OPT_EXPORT_NAME, b""),
            Eof,
        ),
        case("an option cut short, then EOF", Rw, opts(), option(OPT_GO, &info_payload(b"", &[]))[..12].to_vec(), Eof)
            .then_eof()
            .logs("in the middle of an option"),
        // -- TLS required (FORCEDTLS)
        case("LIST before STARTTLS", TlsRequired, opts(), option(OPT_LIST, b""), Opt(OPT_LIST, REP_ERR_TLS_REQD)),
        case("GO before STARTTLS", TlsRequired, opts(), go(b""), Opt(OPT_GO, REP_ERR_TLS_REQD)),
        case(
            "INFO before STARTTLS",
            TlsRequired,
            opts(),
            option(OPT_INFO, &info_payload(b"", &[])),
            Opt(OPT_INFO, REP_ERR_TLS_REQD),
        ),
        case(
            "an unknown option before STARTTLS",
            TlsRequired,
            opts(),
            option(0x1234, b""),
            Opt(0x1234, REP_ERR_TLS_REQD),
        ),
        case(
            "STRUCTURED_REPLY before STARTTLS",
            TlsRequired,
            opts(),
            option(OPT_STRUCTURED_REPLY, b""),
            Opt(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
        ),
        case(
            "STARTTLS with a payload",
            TlsRequired,
            opts(),
            option(OPT_STARTTLS, b"x"),
            Opt(OPT_STARTTLS, REP_ERR_INVALID),
        ),
        // proto.md, "FORCEDTLS mode": "If the server receives any other
        // option, including NBD_OPT_INFO and unsupported options, it MUST
        // reply with NBD_REP_ERR_TLS_REQD if TLS has not been initiated"
        // (and so before it looks at the option's size).
        case(
            "an option longer than the server takes, before STARTTLS",
            TlsRequired,
            opts(),
            option(OPT_INFO, &info_payload(&vec![b'a'; (1 << 20) - 6], &[])),
            Opt(OPT_INFO, REP_ERR_TLS_REQD),
        ),
        case("EXPORT_NAME before STARTTLS", TlsRequired, opts(), option(OPT_EXPORT_NAME, b""), Eof),
        case("ABORT before STARTTLS", TlsRequired, opts(), option(OPT_ABORT, b""), OptThenEof(OPT_ABORT, REP_ACK)),
        case(
            "GO of an unknown export before STARTTLS",
            TlsRequired,
            opts(),
            go(b"nosuch"),
            Opt(OPT_GO, REP_ERR_TLS_REQD),
        ),
        // After the ACK only TLS may follow: a plaintext option is a failed
        // TLS handshake, which ends the session.
        case(
            "a plaintext option after STARTTLS was acknowledged",
            TlsRequired,
            Setup::Options(vec![(OPT_STARTTLS, Vec::new(), REP_ACK)]),
            option(OPT_LIST, b""),
            HangUp,
        ),
        // -- transmission
        case(
            "a request with a bad magic",
            Rw,
            simple(),
            {
                let mut r = req(0, CMD_READ, 1, 0, 512);
                r[3] ^= 1;
                r
            },
            Eof,
        )
        .logs("bad magic in request"),
        case(
            "a compact request under extended headers",
            Rw,
            Setup::Transmission(vec![(OPT_EXTENDED_HEADERS, Vec::new(), REP_ACK)], ""),
            [req(0, CMD_READ, 1, 0, 512), req(0, CMD_READ, 2, 0, 512)].concat(),
            Eof,
        )
        .logs("bad magic in request"),
        case("an unknown command type", Rw, simple(), req(0, 0x42, 1, 0, 512), Error(NBD_EINVAL)),
        case(
            "an unknown command type under structured replies",
            Rw,
            structured(),
            req(0, 0x42, 1, 0, 512),
            Error(NBD_EINVAL),
        ),
        case("READ past the end", Rw, simple(), req(0, CMD_READ, 1, SIZE - 512, 1024), Error(NBD_EINVAL)),
        case(
            "READ whose end overflows 64 bits",
            Rw,
            simple(),
            req(0, CMD_READ, 1, u64::MAX - 100, 512),
            Error(NBD_EINVAL),
        ),
        case(
            "READ past the end under structured replies",
            Rw,
            structured(),
            req(0, CMD_READ, 1, SIZE, 512),
            ErrorChunk(NBD_EINVAL),
        ),
        case(
            "READ past the end under extended headers",
            Rw,
            Setup::Transmission(vec![(OPT_EXTENDED_HEADERS, Vec::new(), REP_ACK)], ""),
            ext_req(0, CMD_READ, 1, SIZE, 512),
            ErrorChunk(NBD_EINVAL),
        ),
        case("READ of length 0", Rw, simple(), req(0, CMD_READ, 1, 4096, 0), Answered),
        case("READ of length 0 under structured replies", Rw, structured(), req(0, CMD_READ, 1, 4096, 0), Answered),
        case(
            "READ with DF without structured replies",
            Rw,
            simple(),
            req(CMD_FLAG_DF, CMD_READ, 1, 0, 512),
            Error(NBD_EINVAL),
        ),
        case(
            "READ with an undefined flag",
            Rw,
            simple(),
            req(CMD_FLAG_UNDEFINED, CMD_READ, 1, 0, 512),
            Error(NBD_EINVAL),
        ),
        case(
            "READ with REQ_ONE, a BLOCK_STATUS flag",
            Rw,
            structured(),
            req(CMD_FLAG_REQ_ONE, CMD_READ, 1, 0, 512),
            ErrorChunk(NBD_EINVAL),
        ),
        case("READ with FUA, valid on every command", Rw, simple(), req(CMD_FLAG_FUA, CMD_READ, 1, 0, 512), Ok(512)),
        case(
            "READ with DF of a hole: one data chunk",
            Rw,
            structured(),
            req(CMD_FLAG_DF, CMD_READ, 1, 0, 65536),
            OneDataChunk(65536),
        ),
        case(
            "WRITE with an undefined flag: refused, payload skipped",
            Rw,
            simple(),
            write_with_trap(CMD_FLAG_UNDEFINED, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "WRITE with DF, a READ flag: refused, payload skipped",
            Rw,
            structured(),
            write_with_trap(CMD_FLAG_DF, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "WRITE past the end: refused, payload skipped",
            Rw,
            simple(),
            write_with_trap(0, SIZE - 512, 4096),
            Error(NBD_ENOSPC),
        ),
        case("WRITE of length 0", Rw, simple(), req(0, CMD_WRITE, 1, 0, 0), Answered),
        case(
            "WRITE_ZEROES past the end",
            Rw,
            simple(),
            req(0, CMD_WRITE_ZEROES, 1, SIZE - 512, 4096),
            Error(NBD_ENOSPC),
        ),
        case("TRIM past the end", Rw, simple(), req(0, CMD_TRIM, 1, SIZE - 512, 4096), Error(NBD_EINVAL)),
        case("TRIM of length 0", Rw, simple(), req(0, CMD_TRIM, 1, 4096, 0), Answered),
        case("FLUSH with an offset and length", Rw, simple(), req(0, CMD_FLUSH, 1, 4096, 4096), Error(NBD_EINVAL)),
        case("FLUSH with FUA", Rw, simple(), req(CMD_FLAG_FUA, CMD_FLUSH, 1, 0, 0), Ok(0)),
        case(
            "CACHE with an undefined flag",
            Rw,
            simple(),
            req(CMD_FLAG_UNDEFINED, CMD_CACHE, 1, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "WRITE on a read-only export: EPERM, payload skipped",
            Ro,
            simple(),
            write_with_trap(0, 0, 4096),
            Error(NBD_EPERM),
        ),
        case(
            "WRITE on a read-only export under structured replies",
            Ro,
            structured(),
            write_with_trap(CMD_FLAG_FUA, 0, 65536),
            Error(NBD_EPERM),
        ),
        case("TRIM on a read-only export", Ro, simple(), req(0, CMD_TRIM, 1, 0, 4096), Error(NBD_EPERM)),
        case(
            "WRITE_ZEROES on a read-only export",
            Ro,
            simple(),
            req(0, CMD_WRITE_ZEROES, 1, 0, 4096),
            Error(NBD_EPERM),
        ),
        case(
            "BLOCK_STATUS without structured replies",
            Rw,
            simple(),
            req(0, CMD_BLOCK_STATUS, 1, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "BLOCK_STATUS with no meta context selected",
            Rw,
            structured(),
            req(0, CMD_BLOCK_STATUS, 1, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "BLOCK_STATUS after selecting contexts of another export",
            Rw,
            Setup::Transmission(vec![sr(), base_allocation("other")], ""),
            req(0, CMD_BLOCK_STATUS, 1, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "BLOCK_STATUS after a SET_META_CONTEXT that failed",
            Rw,
            Setup::Transmission(sr_then_bad_set, ""),
            req(0, CMD_BLOCK_STATUS, 1, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "BLOCK_STATUS after SET_META_CONTEXT with no queries",
            Rw,
            Setup::Transmission(vec![sr(), (OPT_SET_META_CONTEXT, meta_payload(b"", &[]), REP_ACK)], ""),
            req(0, CMD_BLOCK_STATUS, 1, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "BLOCK_STATUS after SET_META_CONTEXT with the base: wildcard",
            Rw,
            Setup::Transmission(vec![sr(), (OPT_SET_META_CONTEXT, meta_payload(b"", &[b"base:"]), REP_ACK)], ""),
            req(0, CMD_BLOCK_STATUS, 1, 0, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "BLOCK_STATUS past the end",
            Rw,
            with_status(),
            req(0, CMD_BLOCK_STATUS, 1, SIZE - 512, 4096),
            Error(NBD_EINVAL),
        ),
        case(
            "BLOCK_STATUS with REQ_ONE",
            Rw,
            with_status(),
            req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 1, 0, 4096),
            OneExtentUpTo(4096),
        ),
        case(
            "DISC with a READ in flight: the reply, then the hang-up",
            Rw,
            simple(),
            {
                let mut b = req(0, CMD_READ, 1, 0, 4096);
                b.extend_from_slice(&req(0, CMD_DISC, 2, 0, 0));
                b
            },
            OkThenEof(4096),
        ),
        case("a request header cut in half, then EOF", Rw, simple(), req(0, CMD_READ, 1, 0, 512)[..14].to_vec(), Eof)
            .then_eof()
            .logs("in the middle of a request"),
        case(
            "a WRITE payload cut short, then EOF",
            Rw,
            simple(),
            write_with_trap(0, 0, 4096)[..28 + 100].to_vec(),
            Eof,
        )
        .then_eof()
        .logs("in the middle of a request"),
        case("CACHE on a read-only export", Ro, simple(), req(0, CMD_CACHE, 1, 0, 4096), Ok(0)),
        // proto.md, "Command flags": with NBD_FLAG_SEND_FUA "the server
        // MUST accept all commands with this bit set".
        case("TRIM with FUA", Rw, simple(), req(CMD_FLAG_FUA, CMD_TRIM, 1, 4096, 4096), Ok(0)),
        case("WRITE_ZEROES with FUA", Rw, simple(), req(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 1, 4096, 4096), Ok(0)),
        case("CACHE with FUA", Rw, simple(), req(CMD_FLAG_FUA, CMD_CACHE, 1, 0, 4096), Ok(0)),
        case(
            "BLOCK_STATUS with FUA",
            Rw,
            with_status(),
            req(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 1, 0, 4096),
            OneExtentUpTo(4096),
        ),
        case("FLUSH on a read-only export", Ro, simple(), req(0, CMD_FLUSH, 1, 0, 0), Ok(0)),
        // The payload of a refused WRITE and the next request share one
        // send, so the skip ends inside the server's receive buffer.
        case(
            "a refused WRITE and the next READ in one burst",
            Ro,
            simple(),
            {
                let mut b = write_with_trap(0, 0, 4096);
                b.extend_from_slice(&req(0, CMD_READ, 2, 0, 512));
                b
            },
            Replies(vec![(1, NBD_EPERM, 0), (2, 0, 512)]),
        ),
        case(
            "four requests in one burst, three of them refused",
            Rw,
            structured(),
            [
                write_with_trap(CMD_FLAG_UNDEFINED, 0, 8192),
                req(0, 0x42, 2, 0, 512),
                req(0, CMD_READ, 3, SIZE, 512),
                req(0, CMD_READ, 4, 0, 512),
            ]
            .concat(),
            Replies(vec![(1, NBD_EINVAL, 0), (2, NBD_EINVAL, 0), (3, NBD_EINVAL, 0), (4, 0, 512)]),
        ),
        // proto.md, "Block size constraints": a length below 2^25 "SHOULD
        // NOT be considered a denial of service attack", so the payload is
        // skipped rather than the connection dropped.
        case(
            "a refused WRITE of 2^25 - 512 bytes",
            Rw,
            simple(),
            write_with_trap(0, SIZE, (1 << 25) - 512),
            Error(NBD_ENOSPC),
        ),
    ]
}

// ---- running them ----------------------------------------------------------------

struct Keys {
    dir: PathBuf,
    psk: PathBuf,
}

impl Keys {
    /// `name` keeps apart the keys of tests that run at once.
    fn new(name: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!("nbd-rs-hostile-keys-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let psk = dir.join("keys.psk");
        std::fs::write(&psk, "alice:000102030405060708090a0b0c0d0e0f\n").unwrap();
        Keys { dir, psk }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(srv: Srv, name: &str, keys: &Keys) -> Server {
    let psk = keys.psk.to_str().unwrap();
    let args: Vec<&str> = match srv {
        Srv::Rw => vec!["-v", "memory:1M", "other=memory:64K"],
        Srv::Ro => vec!["-v", "--ro", "memory:1M"],
        Srv::TlsRequired => vec!["-v", "--tls", "require", "--tls-psk", psk, "memory:1M"],
    };
    Server::start(name, &args)
}

fn set_up(s: &Server, setup: &Setup) -> Session {
    let mut session = Session::connect(&s.sock);
    let steps = match setup {
        Setup::Greeting => return session,
        Setup::Options(steps) | Setup::Transmission(steps, _) => steps,
    };
    session.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    for (opt, payload, want) in steps {
        session.negotiate(*opt, payload, *want);
    }
    if let Setup::Transmission(_, export) = setup {
        session.go(export);
    }
    session
}

/// Checks the server's reaction; false if it hung up (as it had to).
fn check(s: &mut Session, expect: &Expect) -> bool {
    match *expect {
        Expect::Eof => {
            s.expect_eof();
            return false;
        }
        Expect::Opt(opt, want) | Expect::OptThenEof(opt, want) => {
            let replies = s.option_replies(opt);
            let kinds: Vec<u32> = replies.iter().map(|r| r.0).collect();
            assert_eq!(*kinds.last().unwrap(), want, "final reply type: got {kinds:x?}, want {want:#x}");
            if want & REP_ERR_BIT != 0 && matches!(opt, OPT_GO | OPT_INFO) {
                assert_eq!(kinds.len(), 1, "NBD_REP_INFO before the error: {kinds:#x?}");
            }
            if (opt, want) == (OPT_GO, REP_ACK) {
                s.transmission = true;
            }
            if matches!(expect, Expect::OptThenEof(..)) {
                s.expect_eof();
                return false;
            }
        }
        Expect::InfoOnceEach => {
            let replies = s.option_replies(OPT_INFO);
            assert_eq!(replies.last().unwrap().0, REP_ACK);
            let mut types: Vec<u16> = replies.iter().filter(|r| r.0 == REP_INFO).map(|r| be16(&r.1)).collect();
            assert!(types.contains(&INFO_EXPORT), "no NBD_INFO_EXPORT: {types:?}");
            assert!(types.contains(&INFO_NAME), "NBD_INFO_NAME was asked for: {types:?}");
            let n = types.len();
            types.sort_unstable();
            types.dedup();
            assert_eq!(types.len(), n, "an NBD_INFO type sent twice");
        }
        Expect::ExportWithZeroes => {
            let b = s.read(8 + 2 + 124);
            assert_eq!(be64(&b), SIZE);
            assert!(b[10..].iter().all(|&z| z == 0), "the reserved bytes are not zero");
            s.transmission = true;
        }
        Expect::Error(errno) | Expect::ErrorChunk(errno) => {
            let r = s.reply(0);
            assert_eq!(r.cookie, 1, "reply to cookie {:#x}", r.cookie);
            assert_eq!(r.error, errno, "error {} where {errno} is due", r.error);
            assert!(r.data.is_empty(), "an error reply with data");
            if matches!(expect, Expect::ErrorChunk(_)) {
                assert!(!r.simple, "a simple reply to a READ under structured replies");
            }
        }
        Expect::Ok(n) | Expect::OkThenEof(n) => {
            let r = s.reply(n);
            assert_eq!((r.cookie, r.error), (1, 0), "{r:?}");
            assert_eq!(r.data.len(), n);
            if matches!(expect, Expect::OkThenEof(_)) {
                s.expect_eof();
                return false;
            }
        }
        Expect::Replies(ref want) => {
            let len_of = |cookie| want.iter().find(|w| w.0 == cookie && w.1 == 0).map_or(0, |w| w.2);
            let mut got: Vec<(u64, u32, usize)> = (0..want.len())
                .map(|_| {
                    let r = s.reply_for(&len_of);
                    (r.cookie, r.error, r.data.len())
                })
                .collect();
            got.sort_unstable();
            assert_eq!(&got, want, "replies (cookie, error, data length)");
        }
        Expect::HangUp => {
            let mut sink = Vec::new();
            match s.c.read_to_end(&mut sink) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Err(e) => panic!("the server did not hang up within {PATIENCE:?}: {e}"),
            }
            return false;
        }
        Expect::Answered => {
            let r = s.reply(0);
            assert_eq!(r.cookie, 1);
            assert!(r.data.is_empty(), "{r:?}");
        }
        Expect::OneDataChunk(n) => {
            let r = s.reply(n);
            assert_eq!((r.cookie, r.error), (1, 0), "{r:?}");
            let content: Vec<u16> = r.chunks.iter().copied().filter(|&k| k != REPLY_TYPE_NONE).collect();
            assert_eq!(content, [REPLY_TYPE_OFFSET_DATA], "chunks {:?}", r.chunks);
            assert_eq!(r.data.len(), n);
            assert!(r.data.iter().all(|&b| b == 0));
        }
        Expect::OneExtentUpTo(max) => {
            let r = s.reply(0);
            assert_eq!((r.cookie, r.error), (1, 0), "{r:?}");
            assert!(!s.contexts.is_empty());
            let mut ids: Vec<u32> = r.status.iter().map(|c| c.0).collect();
            ids.sort_unstable();
            assert_eq!(ids, s.contexts, "one chunk per selected context");
            for (_, extents) in &r.status {
                assert_eq!(extents.len(), 1, "REQ_ONE: {extents:?}");
                assert!(extents[0].0 > 0 && extents[0].0 <= max, "{extents:?}");
            }
        }
    }
    true
}

/// After a reaction that left the connection up: the next message on it
/// is parsed where it begins.
fn next_message_works(s: &mut Session, srv: Srv) {
    if s.transmission {
        s.read_still_works();
    } else if srv == Srv::TlsRequired {
        s.negotiate(OPT_LIST, b"", REP_ERR_TLS_REQD);
    } else {
        s.go("");
        s.read_still_works();
    }
}

/// A fresh client still completes a handshake and reads.
fn still_serves(s: &Server, srv: Srv, keys: &Keys) {
    if srv == Srv::TlsRequired {
        let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", s.sock.display(), keys.psk.display());
        common::ok("nbdcopy", &[&uri, "null:"]);
        return;
    }
    let mut fresh = Session::connect(&s.sock);
    fresh.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    fresh.go("");
    fresh.read_still_works();
}

fn run_case(prefix: &str, i: usize, c: &Case, keys: &Keys) {
    let s = start(c.srv, &format!("{prefix}-{i}"), keys);
    let mut session = set_up(&s, &c.setup);
    session.send(&c.send);
    if c.half_close {
        session.c.shutdown(Shutdown::Write).unwrap();
    }
    if check(&mut session, &c.expect) {
        next_message_works(&mut session, c.srv);
    }
    drop(session);
    still_serves(&s, c.srv, keys);
    let (status, log) = s.terminate();
    assert!(status.success(), "the server exited with {status}:\n{log}");
    if let Some(text) = c.log {
        assert!(log.contains(text), "the log lacks {text:?}:\n{log}");
    }
}

/// Runs every case, each to the end; fails naming every case that failed.
/// `prefix` names the servers' directories, apart from other tests'.
fn run_all(prefix: &str, cases: &[Case]) {
    let keys = Keys::new(prefix);
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(prefix, i, c, &keys)));
        match r {
            Ok(()) => eprintln!("ok   {} ({:?})", c.name, start.elapsed()),
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("FAIL {}: {why}", c.name);
                failed.push(format!("{}: {why}", c.name));
            }
        }
    }
    assert!(failed.is_empty(), "{} of {} cases failed:\n{}", failed.len(), cases.len(), failed.join("\n"));
}

#[test]
fn hostile_clients_get_what_the_protocol_prescribes() {
    run_all("hostile", &conforming_cases());
}

#[test]
fn a_cut_and_a_violation_are_logged_even_without_verbose() {
    let s = Server::start("hostile-quiet", &["memory:1M"]);
    let mut cut = set_up(&s, &simple());
    cut.send(&req(0, CMD_READ, 1, 0, 512)[..10]);
    cut.c.shutdown(Shutdown::Write).unwrap();
    cut.expect_eof();
    let mut bad = set_up(&s, &simple());
    bad.send(&[0xde; 28]);
    bad.expect_eof();
    let mut fine = set_up(&s, &simple());
    fine.read_still_works();
    drop(fine);
    let (status, log) = s.terminate();
    assert!(status.success(), "{log}");
    let count = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    assert_eq!(count("in the middle of a request"), 1, "one line for the cut request:\n{log}");
    assert_eq!(count("bad magic in request: 0xdededede"), 1, "one line for the bad magic:\n{log}");
    // Without -v, the clients that behaved leave no line.
    assert_eq!(count("connected"), 0, "{log}");
}
