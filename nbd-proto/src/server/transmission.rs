//! Transmission: requests in, validated; replies out, in the form the
//! handshake negotiated (simple, structured, or with extended headers).

use super::{Command, Connection, Event, Extent, Pending, ReadChunk, Request, RequestId, Rx, St};
use crate::error::{ClientError, Error, LocalError};
use crate::flags::{CmdFlags, TransmissionFlags as TF};
use crate::wire::{chunk, cmd, nbd_error, payload, ChunkHeader, ReplyHeader, RequestHeader};

/// Payloads of refused requests up to this size (or the export's maximum,
/// if larger) are skipped; longer ones end the session: the protocol lets
/// a server treat them as a denial of service, and asks it not to below
/// 32 MiB.
const SKIP_LIMIT: u64 = 32 * 1024 * 1024;

/// The longest BLOCK_STATUS payload accepted: the effect length and up to
/// 1024 context ids (the core offers one context).
const MAX_STATUS_PAYLOAD: u64 = 8 + 4 * 1024;

/// Holes in structured replies go out in pieces of at most this length
/// (a chunk carries a 32-bit hole length); a power of two keeps every
/// piece aligned to any minimum block size.
const MAX_HOLE_CHUNK: u64 = 1 << 31;

fn invalid(why: &'static str) -> Error {
    LocalError::Invalid(why).into()
}

/// The flags each command takes.
fn allowed_flags(command: Command) -> CmdFlags {
    match command {
        Command::Read => CmdFlags::FUA | CmdFlags::DF,
        Command::Write => CmdFlags::FUA | CmdFlags::PAYLOAD_LEN,
        Command::Flush | Command::Trim | Command::Cache => CmdFlags::FUA,
        Command::WriteZeroes => CmdFlags::FUA | CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
        Command::BlockStatus => CmdFlags::FUA | CmdFlags::REQ_ONE | CmdFlags::PAYLOAD_LEN,
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Connection<B> {
    pub(super) fn step_request(&mut self) -> Result<bool, Error> {
        match self.rx {
            Rx::Skip { .. } => return Ok(self.skip()),
            Rx::AwaitBuffer { .. } => return Ok(false),
            Rx::Payload { id, at, len } => return Ok(self.fill_payload(id, at, len)),
            Rx::Header if self.pending.len() >= self.config.max_in_flight.max(1) => return Ok(false),
            Rx::Header => {}
        }
        let h = match self.peek_header() {
            None => return Ok(false),
            Some(h) => h?,
        };
        let size = RequestHeader::size(self.neg.extended);
        if h.kind == cmd::DISC {
            self.begin_closing();
            return Ok(false);
        }
        let has_payload = h.kind == cmd::WRITE || (self.neg.extended && h.flags & CmdFlags::PAYLOAD_LEN.bits() != 0);
        let mut payload_len = if has_payload { h.length } else { 0 };
        if payload_len > SKIP_LIMIT.max(u64::from(self.block_size().maximum)) {
            return Err(ClientError::PayloadTooLarge(payload_len).into());
        }
        // A BLOCK_STATUS payload is small: it is parsed here, whole.
        let mut length = h.length;
        let mut filter: Result<Option<Vec<u32>>, ()> = Ok(None);
        let mut consumed = size;
        if h.kind == cmd::BLOCK_STATUS && payload_len > 0 && payload_len <= MAX_STATUS_PAYLOAD {
            let whole = size + payload_len as usize;
            let avail = self.input.available();
            if avail.len() < whole {
                self.input.want(whole);
                return Ok(false);
            }
            filter = match payload::decode_block_status_payload(&avail[size..whole]) {
                Some((effect, ids)) => {
                    length = effect;
                    Ok(Some(ids))
                }
                None => Err(()),
            };
            consumed = whole;
            payload_len = 0;
        }
        self.input.consume(consumed);
        match self.check(&h, length, filter) {
            Err(error) => {
                let (cookie, offset) = (h.cookie, h.offset);
                self.encode_error(cookie, offset, error, "invalid request");
                if payload_len > 0 {
                    self.rx = Rx::Skip { remaining: payload_len };
                }
                Ok(true)
            }
            Ok((command, flags, contexts)) => {
                let id = self.next_id;
                self.next_id += 1;
                let p = Pending { cookie: h.cookie, command, flags, offset: h.offset, length, contexts };
                let request = Request {
                    id,
                    cookie: p.cookie,
                    command,
                    flags,
                    offset: p.offset,
                    length,
                    contexts: p.contexts.clone(),
                };
                self.pending.insert(id, p);
                self.events.push_back(Event::Request(request));
                if command == Command::Write {
                    // Nothing more is parsed until the caller lends a buffer.
                    self.rx = Rx::AwaitBuffer { id };
                    return Ok(false);
                }
                Ok(true)
            }
        }
    }

    fn block_size(&self) -> super::BlockSize {
        let index = self.neg.export.unwrap_or_default();
        self.config.exports.get(index).map(|e| e.effective_block_size()).unwrap_or(super::DEFAULT_BLOCK_SIZE)
    }

    /// Validates a request against what was advertised and negotiated;
    /// `Err` carries the `NBD_E*` value to answer with.
    fn check(
        &self,
        h: &RequestHeader,
        length: u64,
        filter: Result<Option<Vec<u32>>, ()>,
    ) -> Result<(Command, CmdFlags, Vec<u32>), u32> {
        use nbd_error::{EINVAL, ENOSPC, EPERM};
        let flags = CmdFlags::from_bits(h.flags).ok_or(EINVAL)?;
        let command = match h.kind {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            cmd::BLOCK_STATUS => Command::BlockStatus,
            _ => return Err(EINVAL),
        };
        // The protocol asks for EINVAL (not ENOTSUP, which it keeps for a
        // fast zero that cannot be fast) for flags and commands that do
        // not apply or were not advertised.
        let adv = self.neg.flags;
        let bad_flag = !allowed_flags(command).contains(flags)
            || (flags.contains(CmdFlags::PAYLOAD_LEN)
                && (!self.neg.extended || (command == Command::BlockStatus && !adv.contains(TF::BLOCK_STAT_PAYLOAD))))
            || (flags.contains(CmdFlags::FUA) && !adv.contains(TF::SEND_FUA))
            || (flags.contains(CmdFlags::DF) && !adv.contains(TF::SEND_DF))
            || (flags.contains(CmdFlags::FAST_ZERO) && !adv.contains(TF::SEND_FAST_ZERO));
        let offered = match command {
            Command::Flush => adv.contains(TF::SEND_FLUSH),
            Command::Trim => adv.contains(TF::SEND_TRIM),
            Command::WriteZeroes => adv.contains(TF::SEND_WRITE_ZEROES),
            Command::Cache => adv.contains(TF::SEND_CACHE),
            Command::BlockStatus => !self.neg.meta.is_empty(),
            Command::Read | Command::Write => true,
        };
        if bad_flag || !offered {
            return Err(EINVAL);
        }
        let mut contexts = Vec::new();
        if command == Command::BlockStatus {
            let selected: Vec<u32> = self.neg.meta.iter().map(|m| m.id).collect();
            match filter.map_err(|()| EINVAL)? {
                None => contexts = selected,
                Some(ids) => {
                    for id in ids {
                        if !selected.contains(&id) {
                            return Err(EINVAL);
                        }
                        if !contexts.contains(&id) {
                            contexts.push(id);
                        }
                    }
                    if contexts.is_empty() {
                        return Err(EINVAL);
                    }
                }
            }
        }
        let stores = matches!(command, Command::Write | Command::Trim | Command::WriteZeroes);
        if stores && adv.contains(TF::READ_ONLY) {
            return Err(EPERM);
        }
        if command == Command::Flush {
            return if h.offset == 0 && length == 0 { Ok((command, flags, contexts)) } else { Err(EINVAL) };
        }
        let size = self.neg.export.and_then(|i| self.config.exports.get(i)).map_or(0, |e| e.size);
        if h.offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(if matches!(command, Command::Write | Command::WriteZeroes) { ENOSPC } else { EINVAL });
        }
        let b = self.block_size();
        let min = u64::from(b.minimum.max(1));
        if h.offset % min != 0 || length % min != 0 {
            return Err(EINVAL);
        }
        if matches!(command, Command::Read | Command::Write) && length > u64::from(b.maximum) {
            return Err(EINVAL);
        }
        if command == Command::BlockStatus && length == 0 {
            return Err(EINVAL);
        }
        Ok((command, flags.difference(CmdFlags::PAYLOAD_LEN), contexts))
    }

    /// Copies buffered payload bytes into the WRITE's buffer; true once
    /// the payload is complete (and handed to the caller).
    fn fill_payload(&mut self, id: RequestId, at: usize, len: usize) -> bool {
        let Some(buf) = self.write_buf.as_mut() else { return false };
        let avail = self.input.available();
        let n = avail.len().min(len - at);
        if let Some(dest) = buf.as_mut().get_mut(at..at + n) {
            dest.copy_from_slice(&avail[..n]);
        }
        self.input.consume(n);
        if at + n < len {
            self.rx = Rx::Payload { id, at: at + n, len };
            return false;
        }
        self.rx = Rx::Header;
        if let Some(buf) = self.write_buf.take() {
            self.events.push_back(Event::WriteData { id, buf });
        }
        true
    }

    // ---- the caller's side --------------------------------------------------

    /// Lends `buf` to receive the payload of WRITE `id` (its length must be
    /// the request's). The payload lands in it, straight from the
    /// transport when large, and it comes back in [`Event::WriteData`].
    /// Until this call the core reads nothing more. On a finished
    /// connection, or when refused, the buffer comes back in
    /// [`Event::BufferReturned`].
    pub fn receive_write(&mut self, id: RequestId, buf: B) -> Result<(), Error> {
        if self.finished() {
            self.events.push_back(Event::BufferReturned { id, buf });
            return Ok(());
        }
        let fits = self.pending.get(&id).is_some_and(|p| p.length == buf.as_ref().len() as u64);
        if self.rx != (Rx::AwaitBuffer { id }) || !fits {
            self.events.push_back(Event::BufferReturned { id, buf });
            return Err(invalid("no WRITE with this id awaits a buffer of this length"));
        }
        let len = buf.as_ref().len();
        self.write_buf = Some(buf);
        self.rx = Rx::Payload { id, at: 0, len };
        self.process_input();
        Ok(())
    }

    /// Answers request `id` with success: WRITE (after its payload
    /// arrived), FLUSH, TRIM, CACHE and WRITE_ZEROES. READ and
    /// BLOCK_STATUS need their data. Replies to a finished connection are
    /// dropped.
    pub fn reply_ok(&mut self, id: RequestId) -> Result<(), Error> {
        let Some(p) = self.replying(id)? else { return Ok(()) };
        if matches!(p.command, Command::Read | Command::BlockStatus) {
            return Err(invalid("READ and BLOCK_STATUS succeed only with their data"));
        }
        if self.awaiting_payload(id) {
            return Err(invalid("the WRITE's payload has not arrived"));
        }
        if self.neg.extended {
            self.encode_chunk(&p, chunk::NONE, true, 0);
        } else {
            self.out.encode(|b| ReplyHeader::Simple { error: 0, cookie: p.cookie }.encode(b));
        }
        self.finish(id);
        Ok(())
    }

    /// Answers request `id` with an error: `error` is an `NBD_E*` value
    /// ([`nbd_error`]), `message` goes to the client under structured
    /// replies. A WRITE may be refused before its payload arrived (the
    /// payload is then skipped, and a buffer lent for it comes back).
    pub fn reply_error(&mut self, id: RequestId, error: u32, message: &str) -> Result<(), Error> {
        if error == 0 {
            return Err(invalid("an error reply needs a nonzero error"));
        }
        let Some(p) = self.replying(id)? else { return Ok(()) };
        match self.rx {
            Rx::AwaitBuffer { id: w } if w == id => self.rx = Rx::Skip { remaining: p.length },
            Rx::Payload { id: w, at, len } if w == id => {
                self.rx = Rx::Skip { remaining: (len - at) as u64 };
                if let Some(buf) = self.write_buf.take() {
                    self.events.push_back(Event::BufferReturned { id, buf });
                }
            }
            _ => {}
        }
        self.encode_error(p.cookie, p.offset, error, message);
        self.finish(id);
        Ok(())
    }

    /// Answers READ `id` with `buf`, which must hold exactly the requested
    /// bytes; they are sent from it (no copy) and it comes back in
    /// [`Event::BufferReturned`] once sent (also when this fails).
    pub fn reply_read(&mut self, id: RequestId, buf: B) -> Result<(), Error> {
        let offset = self.pending.get(&id).map_or(0, |p| p.offset);
        let chunks = if buf.as_ref().is_empty() {
            // A zero-length READ has no piece to send.
            self.events.push_back(Event::BufferReturned { id, buf });
            Vec::new()
        } else {
            vec![ReadChunk::Data { offset, buf }]
        };
        self.reply_read_chunks(id, chunks)
    }

    /// Answers READ `id` with pieces of data and holes that together cover
    /// the request exactly, in any order. Under structured replies each
    /// piece is a chunk (holes cost no data); with simple replies, or when
    /// the client set `DF`, the pieces go out as one run, holes as zeroes.
    /// Every buffer comes back in [`Event::BufferReturned`] once sent, or
    /// at once if the pieces do not tile the request.
    pub fn reply_read_chunks(&mut self, id: RequestId, mut chunks: Vec<ReadChunk<B>>) -> Result<(), Error> {
        let p = match self.replying(id) {
            Ok(Some(p)) if p.command == Command::Read => p,
            other => {
                self.return_chunks(id, chunks);
                return match other {
                    Ok(None) => Ok(()),
                    Ok(Some(_)) => Err(invalid("not a READ")),
                    Err(e) => Err(e),
                };
            }
        };
        chunks.sort_by_key(|c| match c {
            ReadChunk::Data { offset, .. } | ReadChunk::Hole { offset, .. } => *offset,
        });
        let mut at = p.offset;
        let mut tiles = true;
        for c in &chunks {
            let (offset, len) = match c {
                ReadChunk::Data { offset, buf } => (*offset, buf.as_ref().len() as u64),
                ReadChunk::Hole { offset, length } => (*offset, *length),
            };
            tiles &= offset == at && len > 0;
            at = at.saturating_add(len);
        }
        if !tiles || at != p.offset + p.length {
            self.return_chunks(id, chunks);
            return Err(invalid("the pieces must cover the READ exactly, without overlap or gaps"));
        }
        if !self.neg.structured {
            self.out.encode(|b| ReplyHeader::Simple { error: 0, cookie: p.cookie }.encode(b));
            self.lend_run(id, chunks);
        } else if chunks.is_empty() {
            // A zero-length READ: a data chunk must carry at least a byte.
            self.encode_chunk(&p, chunk::NONE, true, 0);
        } else if p.flags.contains(CmdFlags::DF) {
            self.encode_chunk(&p, chunk::OFFSET_DATA, true, 8 + p.length);
            self.out.encode(|b| b.extend_from_slice(&p.offset.to_be_bytes()));
            self.lend_run(id, chunks);
        } else {
            let last = chunks.len() - 1;
            for (i, c) in chunks.into_iter().enumerate() {
                match c {
                    ReadChunk::Data { offset, buf } => {
                        self.encode_chunk(&p, chunk::OFFSET_DATA, i == last, 8 + buf.as_ref().len() as u64);
                        self.out.encode(|b| b.extend_from_slice(&offset.to_be_bytes()));
                        self.out.lend(id, buf);
                    }
                    ReadChunk::Hole { offset, length } => {
                        let mut done = 0;
                        while done < length {
                            let piece = (length - done).min(MAX_HOLE_CHUNK);
                            let end = i == last && done + piece == length;
                            self.encode_chunk(&p, chunk::OFFSET_HOLE, end, 12);
                            self.out.encode(|b| payload::encode_offset_hole(offset + done, piece as u32, b));
                            done += piece;
                        }
                    }
                }
            }
        }
        self.finish(id);
        Ok(())
    }

    /// Answers BLOCK_STATUS `id`: one entry per id in the request's
    /// [`Request::contexts`], each with the extents from the request's
    /// offset (non-empty, no zero length). The core trims them to what the
    /// protocol allows: one extent with `REQ_ONE`, none starting past the
    /// end of the request, lengths split to fit compact descriptors.
    pub fn reply_block_status(&mut self, id: RequestId, reports: &[(u32, &[Extent])]) -> Result<(), Error> {
        let Some(p) = self.replying(id)? else { return Ok(()) };
        if p.command != Command::BlockStatus {
            return Err(invalid("not a BLOCK_STATUS"));
        }
        let answered = |ctx: &u32| reports.iter().filter(|(c, _)| c == ctx).count() == 1;
        if reports.len() != p.contexts.len() || !p.contexts.iter().all(answered) {
            return Err(invalid("answer every requested meta context once"));
        }
        let min = u64::from(self.block_size().minimum.max(1));
        let mut encoded = Vec::with_capacity(reports.len());
        for &(ctx, extents) in reports {
            let wanted = descriptors(&p, extents)?;
            let mut body = Vec::new();
            if self.neg.extended {
                payload::encode_block_status_ext(ctx, &wanted, &mut body);
            } else {
                // Compact descriptors hold 32 bits: long extents are split
                // into aligned pieces.
                let cap = u64::from(u32::MAX) / min * min;
                let mut narrow = Vec::new();
                for &(len, flags) in &wanted {
                    let flags = u32::try_from(flags).map_err(|_| invalid("status flags beyond 32 bits"))?;
                    let mut left = len;
                    while left > 0 {
                        let piece = left.min(cap);
                        narrow.push((piece as u32, flags));
                        left -= piece;
                    }
                }
                if p.flags.contains(CmdFlags::REQ_ONE) {
                    narrow.truncate(1);
                }
                payload::encode_block_status(ctx, &narrow, &mut body);
            }
            encoded.push(body);
        }
        let kind = if self.neg.extended { chunk::BLOCK_STATUS_EXT } else { chunk::BLOCK_STATUS };
        let last = encoded.len() - 1;
        for (i, body) in encoded.into_iter().enumerate() {
            self.encode_chunk(&p, kind, i == last, body.len() as u64);
            self.out.encode(|b| b.extend_from_slice(&body));
        }
        self.finish(id);
        Ok(())
    }

    // ---- reply internals --------------------------------------------------------

    /// The request `id` about to be answered; `None` if the connection has
    /// finished (the reply is dropped).
    fn replying(&self, id: RequestId) -> Result<Option<Pending>, Error> {
        if self.finished() {
            return Ok(None);
        }
        match self.pending.get(&id) {
            Some(p) => Ok(Some(p.clone())),
            None => Err(invalid("no request in flight has this id")),
        }
    }

    fn awaiting_payload(&self, id: RequestId) -> bool {
        matches!(self.rx, Rx::AwaitBuffer { id: w } | Rx::Payload { id: w, .. } if w == id)
    }

    fn return_chunks(&mut self, id: RequestId, chunks: Vec<ReadChunk<B>>) {
        for c in chunks {
            if let ReadChunk::Data { buf, .. } = c {
                self.events.push_back(Event::BufferReturned { id, buf });
            }
        }
    }

    /// Queues sorted, tiling pieces as one run of bytes.
    fn lend_run(&mut self, id: RequestId, chunks: Vec<ReadChunk<B>>) {
        for c in chunks {
            match c {
                ReadChunk::Data { buf, .. } => self.out.lend(id, buf),
                ReadChunk::Hole { length, .. } => self.out.zeroes(length),
            }
        }
    }

    fn encode_chunk(&mut self, p: &Pending, kind: u16, done: bool, length: u64) {
        let h = ChunkHeader {
            flags: if done { chunk::FLAG_DONE } else { 0 },
            kind,
            cookie: p.cookie,
            offset: p.offset,
            length,
            extended: self.neg.extended,
        };
        self.out.encode(|b| ReplyHeader::Chunk(h).encode(b));
    }

    /// An error reply: an error chunk with the message under structured
    /// replies (the protocol forbids a simple reply to READ there, and
    /// prefers chunks for the message), else a simple reply.
    pub(super) fn encode_error(&mut self, cookie: u64, offset: u64, error: u32, message: &str) {
        if self.neg.structured {
            let mut body = Vec::new();
            payload::encode_error_chunk(error, message, &mut body);
            let p = Pending {
                cookie,
                command: Command::Read,
                flags: CmdFlags::empty(),
                offset,
                length: 0,
                contexts: Vec::new(),
            };
            self.encode_chunk(&p, chunk::ERROR, true, body.len() as u64);
            self.out.encode(|b| b.extend_from_slice(&body));
        } else {
            self.out.encode(|b| ReplyHeader::Simple { error, cookie }.encode(b));
        }
    }

    /// Request `id` is answered: forget it, and take more input if the
    /// limit on requests in flight held it back.
    fn finish(&mut self, id: RequestId) {
        self.pending.remove(&id);
        match self.st {
            St::Transmission => self.process_input(),
            _ => self.maybe_closed(),
        }
    }
}

/// The extents to send for one context, as the protocol allows them.
fn descriptors(p: &Pending, extents: &[Extent]) -> Result<Vec<(u64, u64)>, Error> {
    if extents.is_empty() || extents.iter().any(|e| e.length == 0) {
        return Err(invalid("block status needs extents of nonzero length"));
    }
    if p.flags.contains(CmdFlags::REQ_ONE) {
        let e = extents[0];
        return Ok(vec![(e.length.min(p.length), e.flags)]);
    }
    let mut out = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        out.push((e.length, e.flags));
        covered = covered.saturating_add(e.length);
        if covered >= p.length {
            break;
        }
    }
    Ok(out)
}
