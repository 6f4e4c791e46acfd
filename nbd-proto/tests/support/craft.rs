//! Hand-crafted server bytes, valid or not, for tests that play a hostile
//! peer: greetings, option replies, and transmission replies and chunks.
//! Valid pieces come from the library's encoders (`wire::payload`); the
//! raw writers left here exist to lie (a declared length or count that
//! disagrees with the bytes).

#![allow(dead_code)]

use nbd_proto::wire::{self, chunk, info, ChunkHeader, OptionReplyHeader, Put, ReplyHeader};

// ---- handshake ----------------------------------------------------------------

/// A newstyle greeting with these handshake flags (1 = fixed, 2 = no zeroes).
pub fn greeting(flags: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(wire::NBDMAGIC);
    v.put_u64(wire::IHAVEOPT);
    v.put_u16(flags);
    v
}

/// A complete oldstyle greeting.
pub fn oldstyle(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(wire::NBDMAGIC);
    v.put_u64(wire::OLDSTYLE_MAGIC);
    v.put_u64(size);
    v.put_u32(u32::from(flags));
    v.extend_from_slice(&[0; wire::ZERO_PAD]);
    v
}

/// The reply to `NBD_OPT_EXPORT_NAME`, with or without the 124 zeroes.
pub fn export_name_reply(size: u64, flags: u16, zeroes: bool) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(size);
    v.put_u16(flags);
    if zeroes {
        v.extend_from_slice(&[0; wire::ZERO_PAD]);
    }
    v
}

/// An option reply header claiming `length` payload bytes, without them.
pub fn option_reply_header(option: u32, reply: u32, length: u32) -> Vec<u8> {
    let mut v = Vec::new();
    OptionReplyHeader { option, reply, length }.encode(&mut v);
    v
}

/// An option reply with its payload.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = option_reply_header(option, reply, payload.len() as u32);
    v.extend_from_slice(payload);
    v
}

/// `NBD_INFO_EXPORT` payload (12 bytes).
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u16(info::EXPORT);
    p.put_u64(size);
    p.put_u16(flags);
    p
}

/// `NBD_INFO_BLOCK_SIZE` payload (14 bytes).
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u16(info::BLOCK_SIZE);
    p.put_u32(minimum);
    p.put_u32(preferred);
    p.put_u32(maximum);
    p
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u32(id);
    p.extend_from_slice(name.as_bytes());
    p
}

// ---- transmission ---------------------------------------------------------------

/// A simple reply header.
pub fn simple(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = Vec::new();
    ReplyHeader::Simple { error, cookie }.encode(&mut v);
    v
}

/// A chunk header claiming `length` payload bytes, without them. A compact
/// header keeps only 32 bits of the length.
pub fn chunk_header(cookie: u64, kind: u16, flags: u16, extended: bool, length: u64) -> Vec<u8> {
    let h = ChunkHeader { flags, kind, cookie, offset: 0, length, extended };
    let mut v = Vec::new();
    ReplyHeader::Chunk(h).encode(&mut v);
    v
}

/// A structured reply chunk with its payload.
pub fn chunk(cookie: u64, kind: u16, done: bool, extended: bool, payload: &[u8]) -> Vec<u8> {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    let mut v = chunk_header(cookie, kind, flags, extended, payload.len() as u64);
    v.extend_from_slice(payload);
    v
}

/// `NBD_REPLY_TYPE_OFFSET_DATA` payload.
pub fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u64(offset);
    p.extend_from_slice(bytes);
    p
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
pub fn hole(offset: u64, length: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u64(offset);
    p.put_u32(length);
    p
}

/// An error chunk payload whose message length field says `declared`.
pub fn error_declared(value: u32, message: &[u8], declared: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u32(value);
    p.put_u16(declared);
    p.extend_from_slice(message);
    p
}

/// `NBD_REPLY_TYPE_ERROR` payload.
pub fn error(value: u32, message: &[u8]) -> Vec<u8> {
    error_declared(value, message, message.len() as u16)
}

/// `NBD_REPLY_TYPE_ERROR_OFFSET` payload.
pub fn error_offset(value: u32, message: &[u8], offset: u64) -> Vec<u8> {
    let mut p = error(value, message);
    p.put_u64(offset);
    p
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` payload (32-bit extents).
pub fn status(context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u32(context_id);
    for &(length, flags) in extents {
        p.put_u32(length);
        p.put_u32(flags);
    }
    p
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` payload with a stated descriptor count.
pub fn status_ext(context_id: u32, count: u32, extents: &[(u64, u64)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u32(context_id);
    p.put_u32(count);
    for &(length, flags) in extents {
        p.put_u64(length);
        p.put_u64(flags);
    }
    p
}
