//! Encoders and decoders for the variable-length parts of messages: the
//! greetings, option request and reply payloads, `NBD_INFO_*` items, and
//! structured reply chunk payloads.
//!
//! The server role encodes with them what the client role decodes, and
//! decodes what the client encodes with
//! [`encode_info_request`](super::encode_info_request) and
//! [`encode_meta_context_request`](super::encode_meta_context_request). The
//! test suite's scripted servers use the encoders too. Decoders never read
//! out of bounds and allocate only in proportion to the bytes they are given.

use super::{info, OptionReplyHeader, Put, Reader, IHAVEOPT, NBDMAGIC, OLDSTYLE_MAGIC, ZERO_PAD};

// ---- handshake ------------------------------------------------------------

/// Appends a newstyle greeting: `NBDMAGIC`, `IHAVEOPT` and the 16 handshake
/// flags ([`HandshakeFlags`](crate::HandshakeFlags) bits).
pub fn encode_newstyle_greeting(handshake_flags: u16, out: &mut Vec<u8>) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(handshake_flags);
}

/// Appends a whole oldstyle greeting: magic numbers, size, 32 flag bits
/// and the 124 reserved zeroes.
pub fn encode_oldstyle_greeting(size: u64, flags: u32, out: &mut Vec<u8>) {
    out.put_u64(NBDMAGIC);
    out.put_u64(OLDSTYLE_MAGIC);
    out.put_u64(size);
    out.put_u32(flags);
    out.extend_from_slice(&[0; ZERO_PAD]);
}

/// Appends the answer to `NBD_OPT_EXPORT_NAME`: size, transmission flags,
/// and the 124 zeroes unless the client asked for `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, zeroes: bool, out: &mut Vec<u8>) {
    out.put_u64(size);
    out.put_u16(flags);
    if zeroes {
        out.extend_from_slice(&[0; ZERO_PAD]);
    }
}

/// Appends an option reply: the header (its length taken from `payload`)
/// and the payload. A payload longer than 4 GiB cannot be expressed; the
/// callers' payloads are a few KiB at most.
pub fn encode_option_reply(option: u32, reply: u32, payload: &[u8], out: &mut Vec<u8>) {
    OptionReplyHeader { option, reply, length: payload.len() as u32 }.encode(out);
    out.extend_from_slice(payload);
}

/// One `NBD_INFO_*` item, the payload of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info<'a> {
    /// `NBD_INFO_EXPORT`: size in bytes and transmission flags.
    Export {
        /// The export's size in bytes.
        size: u64,
        /// Its transmission flags ([`TransmissionFlags`](crate::TransmissionFlags) bits).
        flags: u16,
    },
    /// `NBD_INFO_NAME`: the export's canonical name.
    Name(&'a str),
    /// `NBD_INFO_DESCRIPTION`: a description for people.
    Description(&'a str),
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    BlockSize {
        /// Alignment of offsets and lengths.
        minimum: u32,
        /// The size handled best.
        preferred: u32,
        /// The largest request accepted.
        maximum: u32,
    },
}

impl Info<'_> {
    /// Appends the item: its 16-bit type, then its fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Info::Export { size, flags } => {
                out.put_u16(info::EXPORT);
                out.put_u64(size);
                out.put_u16(flags);
            }
            Info::Name(name) => {
                out.put_u16(info::NAME);
                out.extend_from_slice(name.as_bytes());
            }
            Info::Description(text) => {
                out.put_u16(info::DESCRIPTION);
                out.extend_from_slice(text.as_bytes());
            }
            Info::BlockSize { minimum, preferred, maximum } => {
                out.put_u16(info::BLOCK_SIZE);
                out.put_u32(minimum);
                out.put_u32(preferred);
                out.put_u32(maximum);
            }
        }
    }
}

/// Appends an `NBD_REP_SERVER` payload: name length, name, description.
pub fn encode_server_entry(name: &str, description: &str, out: &mut Vec<u8>) {
    out.put_u32(name.len() as u32);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
}

/// Appends an `NBD_REP_META_CONTEXT` payload: the context id, then its name.
pub fn encode_meta_context_entry(id: u32, name: &str, out: &mut Vec<u8>) {
    out.put_u32(id);
    out.extend_from_slice(name.as_bytes());
}

/// A decoded `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export name, as sent (not yet checked for UTF-8).
    pub export: &'a [u8],
    /// The `NBD_INFO_*` types asked for, in order.
    pub infos: Vec<u16>,
}

/// Decodes an `NBD_OPT_INFO` / `NBD_OPT_GO` payload; `None` if a length
/// disagrees with the payload's (the option is then invalid).
pub fn decode_info_request(payload: &[u8]) -> Option<InfoRequest<'_>> {
    let mut r = Reader::new(payload);
    let len = r.u32()? as usize;
    let export = r.take(len)?;
    let count = usize::from(r.u16()?);
    // The count is checked against the bytes present before anything is
    // allocated for it.
    if r.remaining() != count * 2 {
        return None;
    }
    let infos = (0..count).filter_map(|_| r.u16()).collect();
    Some(InfoRequest { export, infos })
}

/// A decoded `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// The export name, as sent.
    pub export: &'a [u8],
    /// The queries, as sent.
    pub queries: Vec<&'a [u8]>,
}

/// Decodes a meta context option payload; `None` if a length or the query
/// count disagrees with the payload's length.
pub fn decode_meta_context_request(payload: &[u8]) -> Option<MetaContextRequest<'_>> {
    let mut r = Reader::new(payload);
    let len = r.u32()? as usize;
    let export = r.take(len)?;
    let count = r.u32()? as usize;
    // Every query takes at least its 4-byte length: a count the payload
    // cannot hold is refused before any allocation.
    if count > r.remaining() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32()? as usize;
        queries.push(r.take(len)?);
    }
    (r.remaining() == 0).then_some(MetaContextRequest { export, queries })
}

// ---- transmission -------------------------------------------------------------

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
pub fn encode_offset_hole(offset: u64, length: u32, out: &mut Vec<u8>) {
    out.put_u64(offset);
    out.put_u32(length);
}

/// Appends an `NBD_REPLY_TYPE_ERROR` payload: the `NBD_E*` value, the
/// message length and the message (cut to [`MAX_STRING`](super::MAX_STRING)
/// bytes, as the protocol limits it).
pub fn encode_error_chunk(error: u32, message: &str, out: &mut Vec<u8>) {
    let message = truncate_str(message, super::MAX_STRING);
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.extend_from_slice(message.as_bytes());
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` payload: as
/// [`encode_error_chunk`], then the offset the error happened at.
pub fn encode_error_offset_chunk(error: u32, message: &str, offset: u64, out: &mut Vec<u8>) {
    encode_error_chunk(error, message, out);
    out.put_u64(offset);
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` payload: the context id, then
/// (length, flags) descriptors of 32 bits each.
pub fn encode_block_status(context_id: u32, extents: &[(u32, u32)], out: &mut Vec<u8>) {
    out.put_u32(context_id);
    for &(length, flags) in extents {
        out.put_u32(length);
        out.put_u32(flags);
    }
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` payload: the context id,
/// the descriptor count, then (length, flags) descriptors of 64 bits each.
pub fn encode_block_status_ext(context_id: u32, extents: &[(u64, u64)], out: &mut Vec<u8>) {
    out.put_u32(context_id);
    out.put_u32(extents.len() as u32);
    for &(length, flags) in extents {
        out.put_u64(length);
        out.put_u64(flags);
    }
}

/// Appends the payload of a `NBD_CMD_BLOCK_STATUS` request that names its
/// meta contexts (extended headers): the effect length, then the ids.
pub fn encode_block_status_payload(length: u64, context_ids: &[u32], out: &mut Vec<u8>) {
    out.put_u64(length);
    for &id in context_ids {
        out.put_u32(id);
    }
}

/// Decodes a block status request payload into the effect length and the
/// context ids; `None` unless it is 8 bytes plus a whole number of ids.
pub fn decode_block_status_payload(payload: &[u8]) -> Option<(u64, Vec<u32>)> {
    let mut r = Reader::new(payload);
    let length = r.u64()?;
    if r.remaining() % 4 != 0 {
        return None;
    }
    let ids = (0..r.remaining() / 4).filter_map(|_| r.u32()).collect();
    Some((length, ids))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::super::{encode_info_request, encode_meta_context_request};
    use super::*;

    #[test]
    fn requests_the_client_encodes_decode_back() {
        let mut p = Vec::new();
        encode_info_request("disk", &[info::NAME, info::BLOCK_SIZE], &mut p);
        assert_eq!(
            decode_info_request(&p),
            Some(InfoRequest { export: b"disk", infos: vec![info::NAME, info::BLOCK_SIZE] })
        );
        // A count the payload does not hold, or trailing bytes.
        assert_eq!(decode_info_request(&p[..p.len() - 1]), None);
        p.push(0);
        assert_eq!(decode_info_request(&p), None);

        let mut p = Vec::new();
        encode_meta_context_request("", &["base:allocation", "qemu:"], &mut p);
        let m = decode_meta_context_request(&p).unwrap();
        assert_eq!(m.queries, [&b"base:allocation"[..], b"qemu:"]);
        // A huge query count is refused before allocating.
        let mut p = Vec::new();
        p.put_u32(0);
        p.put_u32(u32::MAX);
        assert_eq!(decode_meta_context_request(&p), None);

        let mut p = Vec::new();
        encode_block_status_payload(1 << 40, &[1, 2], &mut p);
        assert_eq!(decode_block_status_payload(&p), Some((1 << 40, vec![1, 2])));
        assert_eq!(decode_block_status_payload(&p[..p.len() - 1]), None);
    }

    #[test]
    fn error_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(3000);
        let mut p = Vec::new();
        encode_error_chunk(5, &long, &mut p);
        let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
        assert!(len <= super::super::MAX_STRING && len % 2 == 0);
        assert_eq!(p.len(), 6 + len);
    }
}
