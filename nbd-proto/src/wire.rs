//! The NBD wire format, shared by the client and server roles.
//!
//! Everything here is a constant, a fixed-size header with `encode`/`decode`,
//! or a small encoder for a variable-length payload ([`payload`] has those
//! of option replies, `NBD_INFO_*` items and reply chunks). Nothing here
//! keeps state: the client and server roles (and the scripted servers in
//! the test suite) decide what a header means in context.

pub mod payload;

/// `NBDMAGIC`, the first 8 bytes every server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle greeting.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact (32-bit length) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (64-bit length) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk with a compact header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Structured reply chunk with an extended header.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// The longest string (export name, description, context name) the
/// protocol permits.
pub const MAX_STRING: usize = 4096;

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`: names the export and ends the handshake at
    /// once. The server answers with the export's size and flags and no option
    /// reply header, or closes the connection if it refuses. The only option of
    /// a non-fixed newstyle server, and the fallback when `NBD_OPT_GO` is
    /// unsupported.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`: the client ends the session during negotiation.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`: asks for the server's exports, one
    /// [`rep::SERVER`](super::rep::SERVER) reply each.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`: upgrades the connection to TLS; negotiation starts
    /// over inside it.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`: asks about an export ([`rep::INFO`](super::rep::INFO)
    /// replies) without selecting it.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`: as `NBD_OPT_INFO`, and an ACK selects the export and ends
    /// the handshake: transmission begins.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`: turns on structured (chunked) replies, which
    /// block status, holes in READ replies and the DF flag need.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`: asks which meta contexts match the queries,
    /// one [`rep::META_CONTEXT`](super::rep::META_CONTEXT) reply each.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`: selects the meta contexts that
    /// `NBD_CMD_BLOCK_STATUS` will report, each answered with its id in a
    /// [`rep::META_CONTEXT`](super::rep::META_CONTEXT) reply.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`: turns on extended headers (64-bit lengths in
    /// requests and replies), which imply structured replies.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The option's protocol name, for messages.
    pub fn name(option: u32) -> &'static str {
        match option {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => "unknown option",
        }
    }
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// `NBD_REP_ACK`: the option succeeded; the last reply to it.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`: one export in answer to `NBD_OPT_LIST` (name length,
    /// name, description).
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`: one `NBD_INFO_*` item (see [`info`](super::info)) in
    /// answer to `NBD_OPT_INFO` or `NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`: one meta context, its 32-bit id then its name,
    /// in answer to `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31 marks every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`: the server does not know the option.
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    /// `NBD_REP_ERR_POLICY`: the server's policy forbids the option.
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    /// `NBD_REP_ERR_INVALID`: the option is malformed or makes no sense now.
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    /// `NBD_REP_ERR_PLATFORM`: the option is not available on the server's
    /// platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    /// `NBD_REP_ERR_TLS_REQD`: the server accepts this option only inside TLS.
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    /// `NBD_REP_ERR_UNKNOWN`: the server has no export of that name.
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the server serves the export only to a
    /// client that asks for `NBD_INFO_BLOCK_SIZE`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    /// `NBD_REP_ERR_TOO_BIG`: the request or its reply is too big for the
    /// server.
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    /// `NBD_REP_ERR_EXT_HEADER_REQD`: the server requires extended headers
    /// first.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;

    /// What an error reply means, in words.
    pub fn error_meaning(reply: u32) -> &'static str {
        match reply {
            ERR_UNSUP => "the server does not support this option",
            ERR_POLICY => "the server's policy forbids this option",
            ERR_INVALID => "the server found the option invalid",
            ERR_PLATFORM => "the option is not supported on the server's platform",
            ERR_TLS_REQD => "the server requires TLS first",
            ERR_UNKNOWN => "the server has no such export",
            ERR_SHUTDOWN => "the server is shutting down",
            ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
            ERR_TOO_BIG => "the request or reply is too big for the server",
            ERR_EXT_HEADER_REQD => "the server requires extended headers",
            _ => "unknown error reply",
        }
    }
}

/// Information types inside `NBD_REP_INFO` and requested by INFO/GO.
pub mod info {
    /// `NBD_INFO_EXPORT`: the export's size (u64, bytes) and transmission
    /// flags (u16). Mandatory before the ACK of `NBD_OPT_INFO` or `NBD_OPT_GO`.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: the export's canonical name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: a human-readable description of the export.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes
    /// (three u32, bytes).
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// `NBD_CMD_READ`: read a range; the reply carries the data.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`: write a range; the request carries the data.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`: disconnect. It has no reply: the server finishes the
    /// requests it already received and closes the connection.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`: make every completed write durable.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`: the client no longer needs a range (a discard hint).
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`: prefetch a range into the server's cache.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`: make a range read as zeroes, with no payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`: describe a range in each negotiated meta
    /// context (allocation, dirtiness, ...).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod chunk {
    /// `NBD_REPLY_TYPE_NONE`: an empty chunk that only ends a reply (it must
    /// carry [`FLAG_DONE`]).
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: a u64 export offset, then READ data for the
    /// range starting there.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: a u64 offset and a u32 length: that part
    /// of a READ reads as zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: a u32 meta context id, then extents as
    /// (u32 length, u32 flags) pairs.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: a u32 meta context id, a u32
    /// descriptor count, then extents as (u64 length, u64 flags) pairs; only
    /// with extended headers.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Bit 15 marks every error chunk type, known or not.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// `NBD_REPLY_TYPE_ERROR`: a u32 `NBD_E*` value, a u16 message length and
    /// the message; the error applies to the whole request.
    pub const ERROR: u16 = ERROR_BIT + 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: as [`ERROR`], followed by the u64 offset
    /// at which the error happened.
    pub const ERROR_OFFSET: u16 = ERROR_BIT + 2;
    /// `NBD_REPLY_FLAG_DONE`.
    pub const FLAG_DONE: u16 = 1;
}

/// Errors carried in replies (`NBD_E*`), and the errno each maps to.
pub mod nbd_error {
    /// `NBD_EPERM`: operation not permitted.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`: input/output error.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`: the server ran out of memory.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`: invalid request.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`: no space left, or a write beyond the end of the export.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`: the request is too large (a READ with DF that the
    /// server cannot send in one chunk).
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`: the command or flag is not supported.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// The local errno for an error the server sent. Unknown values become
    /// EINVAL, as the protocol asks of clients.
    pub fn to_errno(value: u32) -> i32 {
        match value {
            EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN => value as i32,
            _ => crate::errno::EINVAL,
        }
    }
}

/// Big-endian reads from a byte slice that cannot go out of bounds: every
/// read returns `None` once the slice is exhausted.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    /// How many bytes have not been read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// The next `n` bytes; `None`, consuming nothing, if fewer remain.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    /// Every byte not yet read; the reader is empty afterwards.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// The next 2 bytes as a big-endian integer.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// The next 4 bytes as a big-endian integer.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next 8 bytes as a big-endian integer.
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    }
}

/// Big-endian appends.
pub trait Put {
    /// Appends `v` as 2 big-endian bytes.
    fn put_u16(&mut self, v: u16);
    /// Appends `v` as 4 big-endian bytes.
    fn put_u32(&mut self, v: u32);
    /// Appends `v` as 8 big-endian bytes.
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

/// A client's option request header (`IHAVEOPT`, option, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code ([`opt`]).
    pub option: u32,
    /// Bytes of payload after the header.
    pub length: u32,
}

impl OptionHeader {
    /// Bytes on the wire: magic (8), option (4), length (4).
    pub const SIZE: usize = 16;

    /// Appends the header and its payload.
    pub fn encode_with(option: u32, payload: &[u8], out: &mut Vec<u8>) {
        out.put_u64(IHAVEOPT);
        out.put_u32(option);
        out.put_u32(payload.len() as u32);
        out.extend_from_slice(payload);
    }

    /// `None` if the magic is wrong or the slice is short.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        if r.u64()? != IHAVEOPT {
            return None;
        }
        Some(OptionHeader { option: r.u32()?, length: r.u32()? })
    }
}

/// A server's option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers, echoed from the request ([`opt`]).
    pub option: u32,
    /// The reply type ([`rep`]); bit 31 set means an error.
    pub reply: u32,
    /// Bytes of payload after the header.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Bytes on the wire: magic (8), option (4), reply type (4), length (4).
    pub const SIZE: usize = 20;

    /// Appends the header (with its magic) to `out`; the payload is the
    /// caller's to append.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply);
        out.put_u32(self.length);
    }

    /// Decodes the first [`Self::SIZE`] bytes; `Err(magic)` on a bad magic.
    pub fn decode(bytes: &[u8; Self::SIZE]) -> Result<Self, u64> {
        let mut r = Reader::new(bytes);
        let magic = r.u64().unwrap_or_default();
        if magic != OPTION_REPLY_MAGIC {
            return Err(magic);
        }
        Ok(OptionReplyHeader {
            option: r.u32().unwrap_or_default(),
            reply: r.u32().unwrap_or_default(),
            length: r.u32().unwrap_or_default(),
        })
    }
}

/// A transmission request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`, see [`CmdFlags`](crate::CmdFlags)).
    pub flags: u16,
    /// The command type ([`cmd`]).
    pub kind: u16,
    /// Chosen by the client and echoed in every reply to this request (the
    /// client uses its [`Cookie`](crate::Cookie)); called `handle` in older
    /// versions of the protocol.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Effect length; for WRITE the payload length. Compact headers carry
    /// only 32 bits of it.
    pub length: u64,
}

impl RequestHeader {
    /// Bytes of a compact header (`REQUEST_MAGIC`, 32-bit length).
    pub const COMPACT_SIZE: usize = 28;
    /// Bytes of an extended header (`EXTENDED_REQUEST_MAGIC`, 64-bit length).
    pub const EXTENDED_SIZE: usize = 32;

    /// The header size in the form chosen by `extended` (whether extended
    /// headers were negotiated).
    pub fn size(extended: bool) -> usize {
        if extended {
            Self::EXTENDED_SIZE
        } else {
            Self::COMPACT_SIZE
        }
    }

    /// Appends the header in extended form, or in compact form (which keeps
    /// only the low 32 bits of `length`). A WRITE's payload is the caller's to
    /// append.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        out.put_u32(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC });
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        if extended {
            out.put_u64(self.length);
        } else {
            out.put_u32(self.length as u32);
        }
    }

    /// Decodes a request of either form; `None` if short or the magic is unknown.
    pub fn decode(bytes: &[u8]) -> Option<(Self, bool)> {
        let mut r = Reader::new(bytes);
        let extended = match r.u32()? {
            REQUEST_MAGIC => false,
            EXTENDED_REQUEST_MAGIC => true,
            _ => return None,
        };
        let flags = r.u16()?;
        let kind = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = if extended { r.u64()? } else { u64::from(r.u32()?) };
        Some((RequestHeader { flags, kind, cookie, offset, length }, extended))
    }
}

/// The header of one reply from the server in transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (`SIMPLE_REPLY_MAGIC`). The data of a successful
    /// READ follows it, with no length of its own.
    Simple {
        /// An `NBD_E*` value (see [`nbd_error`]); 0 on success.
        error: u32,
        /// The request this reply answers.
        cookie: u64,
    },
    /// One chunk of a structured reply, compact or extended.
    Chunk(ChunkHeader),
}

/// A structured reply chunk header; `extended` says which form arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags; [`chunk::FLAG_DONE`] marks the last chunk of a reply.
    pub flags: u16,
    /// The chunk type ([`chunk`]).
    pub kind: u16,
    /// The request this chunk answers.
    pub cookie: u64,
    /// Only extended headers carry an offset; zero otherwise.
    pub offset: u64,
    /// Bytes of payload after the header.
    pub length: u64,
    /// Whether the chunk came with an extended header (`EXTENDED_REPLY_MAGIC`)
    /// rather than a compact one (`STRUCTURED_REPLY_MAGIC`).
    pub extended: bool,
}

impl ChunkHeader {
    /// Whether this is the last chunk of its reply (`NBD_REPLY_FLAG_DONE`).
    pub fn is_done(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }
}

impl ReplyHeader {
    /// Bytes of a simple reply header.
    pub const SIMPLE_SIZE: usize = 16;
    /// Bytes of a compact structured reply chunk header.
    pub const STRUCTURED_SIZE: usize = 20;
    /// Bytes of an extended reply chunk header.
    pub const EXTENDED_SIZE: usize = 32;

    /// The header size a reply starting with `magic` has.
    pub fn size_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(Self::SIMPLE_SIZE),
            STRUCTURED_REPLY_MAGIC => Some(Self::STRUCTURED_SIZE),
            EXTENDED_REPLY_MAGIC => Some(Self::EXTENDED_SIZE),
            _ => None,
        }
    }

    /// Decodes a whole header whose size came from [`Self::size_for_magic`].
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        match r.u32()? {
            SIMPLE_REPLY_MAGIC => Some(ReplyHeader::Simple { error: r.u32()?, cookie: r.u64()? }),
            STRUCTURED_REPLY_MAGIC => Some(ReplyHeader::Chunk(ChunkHeader {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
                offset: 0,
                length: u64::from(r.u32()?),
                extended: false,
            })),
            EXTENDED_REPLY_MAGIC => Some(ReplyHeader::Chunk(ChunkHeader {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
                offset: r.u64()?,
                length: r.u64()?,
                extended: true,
            })),
            _ => None,
        }
    }

    /// Appends the header in the form it describes: simple, compact chunk
    /// (`offset` dropped, only the low 32 bits of `length` kept) or extended
    /// chunk. For the server role and the test suite's scripted servers.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ReplyHeader::Simple { error, cookie } => {
                out.put_u32(SIMPLE_REPLY_MAGIC);
                out.put_u32(error);
                out.put_u64(cookie);
            }
            ReplyHeader::Chunk(h) if h.extended => {
                out.put_u32(EXTENDED_REPLY_MAGIC);
                out.put_u16(h.flags);
                out.put_u16(h.kind);
                out.put_u64(h.cookie);
                out.put_u64(h.offset);
                out.put_u64(h.length);
            }
            ReplyHeader::Chunk(h) => {
                out.put_u32(STRUCTURED_REPLY_MAGIC);
                out.put_u16(h.flags);
                out.put_u16(h.kind);
                out.put_u64(h.cookie);
                out.put_u32(h.length as u32);
            }
        }
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn encode_info_request(export: &str, infos: &[u16], out: &mut Vec<u8>) {
    out.put_u32(export.len() as u32);
    out.extend_from_slice(export.as_bytes());
    out.put_u16(infos.len() as u16);
    for &i in infos {
        out.put_u16(i);
    }
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn encode_meta_context_request<S: AsRef<str>>(export: &str, queries: &[S], out: &mut Vec<u8>) {
    out.put_u32(export.len() as u32);
    out.extend_from_slice(export.as_bytes());
    out.put_u32(queries.len() as u32);
    for q in queries {
        out.put_u32(q.as_ref().len() as u32);
        out.extend_from_slice(q.as_ref().as_bytes());
    }
}

/// The 124 zero bytes that end an oldstyle greeting and (without
/// `NO_ZEROES`) the `NBD_OPT_EXPORT_NAME` reply.
pub const ZERO_PAD: usize = 124;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_round_trip_in_both_forms() {
        let h =
            RequestHeader { flags: 5, kind: cmd::WRITE, cookie: 0x0102_0304_0506_0708, offset: 1 << 40, length: 4096 };
        for extended in [false, true] {
            let mut out = Vec::new();
            h.encode(extended, &mut out);
            assert_eq!(out.len(), RequestHeader::size(extended));
            assert_eq!(RequestHeader::decode(&out), Some((h, extended)));
        }
        // A compact header keeps only 32 bits of length.
        let big = RequestHeader { length: (1 << 32) + 7, ..h };
        let mut out = Vec::new();
        big.encode(false, &mut out);
        assert_eq!(RequestHeader::decode(&out).unwrap().0.length, 7);
    }

    #[test]
    fn reply_headers_round_trip_and_sizes_follow_magic() {
        let chunk = ChunkHeader {
            flags: chunk::FLAG_DONE,
            kind: chunk::OFFSET_DATA,
            cookie: 9,
            offset: 0,
            length: 20,
            extended: false,
        };
        let cases = [
            ReplyHeader::Simple { error: nbd_error::EIO, cookie: 3 },
            ReplyHeader::Chunk(chunk),
            ReplyHeader::Chunk(ChunkHeader { offset: 512, length: 1 << 33, extended: true, ..chunk }),
        ];
        for h in cases {
            let mut out = Vec::new();
            h.encode(&mut out);
            let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
            assert_eq!(ReplyHeader::size_for_magic(magic), Some(out.len()));
            assert_eq!(ReplyHeader::decode(&out), Some(h));
        }
        assert_eq!(ReplyHeader::size_for_magic(0xdead_beef), None);
    }

    #[test]
    fn option_reply_header_rejects_bad_magic() {
        let mut out = Vec::new();
        OptionReplyHeader { option: opt::GO, reply: rep::ERR_UNKNOWN, length: 3 }.encode(&mut out);
        let mut bytes = [0u8; OptionReplyHeader::SIZE];
        bytes.copy_from_slice(&out);
        assert_eq!(OptionReplyHeader::decode(&bytes).unwrap().reply, rep::ERR_UNKNOWN);
        bytes[0] ^= 1;
        assert!(OptionReplyHeader::decode(&bytes).is_err());
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u16(), None);
        assert_eq!(r.take(2), None);
        assert_eq!(r.rest(), &[3]);
        assert_eq!(r.u64(), None);
    }

    #[test]
    fn unknown_server_errors_map_to_einval() {
        assert_eq!(nbd_error::to_errno(nbd_error::ENOSPC), crate::errno::ENOSPC);
        assert_eq!(nbd_error::to_errno(4242), crate::errno::EINVAL);
        assert_eq!(rep::error_meaning(rep::ERR_TLS_REQD), "the server requires TLS first");
    }
}
