//! Transmission: commands out, replies in.

use super::output::Milestone;
use super::{ChunkStatus, CommandBuffer, Connection, Cookie, Event, Extent, State};
use crate::error::{Error, LocalError, ProtocolError, ServerError};
use crate::flags::CmdFlags;
use crate::wire::{chunk, cmd, nbd_error, ChunkHeader, Reader, ReplyHeader, RequestHeader, MAX_STRING};

/// Receive READ payloads at least this large straight into the caller's
/// buffer; smaller ones are batched through the internal buffer (one
/// receive, many replies) and copied.
const DIRECT_MIN: usize = 32 * 1024;

/// What a reply takes in the receive buffer besides a small READ's data:
/// room for an extended reply header, an offset and a final chunk, so
/// that a receive that took one whole reply did not fill the buffer.
const REPLY_ROOM: usize = 128;

/// Receive buffer bytes a command's reply is expected to take: its
/// headers, and the data of a READ small enough to be batched.
fn reply_estimate(kind: u16, length: u64) -> usize {
    match usize::try_from(length) {
        Ok(len) if kind == cmd::READ && len < DIRECT_MIN => REPLY_ROOM + len,
        _ => REPLY_ROOM,
    }
}

/// Upper bound on a non-data chunk's payload (block status with many
/// extents is the large case), checked before anything is buffered.
const MAX_CHUNK_BODY: u64 = 64 * 1024 * 1024;

/// Where the reply parser is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rx {
    /// Waiting for a reply header.
    Header,
    /// The 8-byte offset that starts an `OFFSET_DATA` chunk.
    DataOffset { slot: usize, hdr: ChunkHeader },
    /// READ payload bytes going into the buffer of the command in `slot`.
    Data(DataRun),
    /// The whole payload of any other chunk.
    Body { slot: usize, hdr: ChunkHeader },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct DataRun {
    slot: usize,
    /// Next index in the command's buffer.
    at: usize,
    remaining: usize,
    /// The run as the server described it, for the chunk event.
    offset: u64,
    length: u64,
    /// The reply ends with this run (simple reply, or DONE flag).
    ends_reply: bool,
}

impl<B: CommandBuffer> Connection<B> {
    // ---- commands -------------------------------------------------------------

    /// Sends `NBD_CMD_READ` for `buf.len()` bytes at export offset
    /// `offset`; the data lands in `buf`, which comes back in the
    /// command's [`Event::Complete`] (filled on success). Large payloads
    /// are received straight into `buf` ([`Self::recv_buffer`] hands it
    /// out), so it must keep its length while in flight.
    ///
    /// Returns the command's cookie once the request is queued. Fails,
    /// queuing nothing, outside transmission
    /// ([`LocalError::WrongState`]), after [`Self::disconnect`], or when a
    /// check of the [`StrictMode`](crate::StrictMode) in force refuses the
    /// request (out of bounds, unaligned, zero length, flags); a READ
    /// longer than 64 MiB is always refused.
    pub fn read(&mut self, offset: u64, buf: B, flags: CmdFlags) -> Result<Cookie, Error> {
        self.issue_read(offset, buf, flags, false)
    }

    /// As [`Self::read`], also reporting every chunk with [`Event::ReadChunk`].
    pub fn read_structured(&mut self, offset: u64, buf: B, flags: CmdFlags) -> Result<Cookie, Error> {
        self.issue_read(offset, buf, flags, true)
    }

    fn issue_read(&mut self, offset: u64, mut buf: B, flags: CmdFlags, report: bool) -> Result<Cookie, Error> {
        let len = buf.as_mut().len() as u64;
        self.issue(cmd::READ, flags, offset, len, Some((buf, report)), &[])
    }

    /// Sends `NBD_CMD_WRITE` of `buf` at export offset `offset`. The
    /// payload is sent from `buf` itself (no copy), which comes back in the
    /// command's [`Event::Complete`]. Fails as [`Self::read`] does, and
    /// also on a read-only export or, under
    /// [`StrictMode::PAYLOAD`](crate::StrictMode::PAYLOAD), beyond
    /// [`Self::payload_maximum`]. [`CmdFlags::FUA`] asks for the data to
    /// be durable before the command completes.
    pub fn write(&mut self, offset: u64, buf: B, flags: CmdFlags) -> Result<Cookie, Error> {
        let len = buf.as_ref().len() as u64;
        self.issue(cmd::WRITE, flags, offset, len, Some((buf, false)), &[])
    }

    /// Sends `NBD_CMD_FLUSH`: the server makes every write it has
    /// completed durable. Needs [`TransmissionFlags::SEND_FLUSH`] under
    /// strict mode.
    ///
    /// [`TransmissionFlags::SEND_FLUSH`]: crate::TransmissionFlags::SEND_FLUSH
    pub fn flush(&mut self, flags: CmdFlags) -> Result<Cookie, Error> {
        self.issue(cmd::FLUSH, flags, 0, 0, None, &[])
    }

    /// Sends `NBD_CMD_TRIM`: `length` bytes at `offset` are no longer
    /// needed, and may read back as anything. Needs
    /// [`TransmissionFlags::SEND_TRIM`] and a writable export under strict
    /// mode.
    ///
    /// [`TransmissionFlags::SEND_TRIM`]: crate::TransmissionFlags::SEND_TRIM
    pub fn trim(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie, Error> {
        self.issue(cmd::TRIM, flags, offset, length, None, &[])
    }

    /// Sends `NBD_CMD_CACHE`: the server prefetches `length` bytes at
    /// `offset`. Needs [`TransmissionFlags::SEND_CACHE`] under strict mode.
    ///
    /// [`TransmissionFlags::SEND_CACHE`]: crate::TransmissionFlags::SEND_CACHE
    pub fn cache(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie, Error> {
        self.issue(cmd::CACHE, flags, offset, length, None, &[])
    }

    /// Sends `NBD_CMD_WRITE_ZEROES`: `length` bytes at `offset` read as
    /// zeroes afterwards, without sending them. Needs
    /// [`TransmissionFlags::SEND_WRITE_ZEROES`] and a writable export
    /// under strict mode.
    ///
    /// [`TransmissionFlags::SEND_WRITE_ZEROES`]: crate::TransmissionFlags::SEND_WRITE_ZEROES
    pub fn write_zeroes(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie, Error> {
        self.issue(cmd::WRITE_ZEROES, flags, offset, length, None, &[])
    }

    /// Sends `NBD_CMD_BLOCK_STATUS` for `length` bytes at `offset`:
    /// extents arrive as [`Event::Extents`], one event per negotiated
    /// meta context, before the command's [`Event::Complete`]. Fails with
    /// [`LocalError::NoMetaContexts`] if no meta context was negotiated
    /// (see [`Config::add_meta_context`](crate::Config::add_meta_context)).
    /// [`CmdFlags::REQ_ONE`] asks for a single extent per context.
    pub fn block_status(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie, Error> {
        self.issue(cmd::BLOCK_STATUS, flags, offset, length, None, &[])
    }

    /// Block status for the negotiated meta contexts `ids` only: the
    /// request carries them as a payload, which extended headers permit.
    /// `flags` should hold `PAYLOAD_LEN`, which says so on the wire.
    pub fn block_status_filter(
        &mut self,
        offset: u64,
        length: u64,
        ids: &[u32],
        flags: CmdFlags,
    ) -> Result<Cookie, Error> {
        let connected = matches!(self.state, State::Transmission) || self.is_lost();
        if connected && !self.negotiated().extended_headers {
            return Err(LocalError::Unsupported("extended headers").into());
        }
        if let Some(id) = ids.iter().find(|&&id| self.meta_context_name(id).is_none()) {
            return Err(LocalError::ContextNotNegotiated(id.to_string()).into());
        }
        let mut payload = Vec::with_capacity(8 + 4 * ids.len());
        crate::wire::payload::encode_block_status_payload(length, ids, &mut payload);
        self.issue(cmd::BLOCK_STATUS, flags, offset, length, None, &payload)
    }

    /// Queues `NBD_CMD_DISC`. Commands already in flight still complete;
    /// the connection closes when it has been sent and they have.
    pub fn disconnect(&mut self) -> Result<(), Error> {
        if self.is_lost() {
            // Nothing to say to a server that is gone: the connection
            // closes on purpose (no error), and the commands it kept fail.
            self.give_up();
            self.resume = None;
            self.error = None;
            self.close();
            return Ok(());
        }
        if !matches!(self.state, State::Transmission) {
            return Err(self.wrong_state("connected with the server"));
        }
        if self.disconnect_requested {
            return Err(LocalError::AfterDisconnect.into());
        }
        self.disconnect_requested = true;
        let header = RequestHeader { flags: 0, kind: cmd::DISC, cookie: 0, offset: 0, length: 0 };
        self.encode_request(&header);
        self.output.milestone(Milestone::Disconnect);
        Ok(())
    }

    /// Fails every command none of whose request has left yet, and takes
    /// its bytes back (libnbd's `LIBNBD_SHUTDOWN_ABANDON_PENDING`); the
    /// rest carry on. Returns how many were abandoned. Nothing is
    /// abandoned once NBD_CMD_DISC is queued, which must stay last.
    pub fn abandon_unsent(&mut self) -> usize {
        if !matches!(self.state, State::Transmission) || self.disconnect_requested {
            return 0;
        }
        let sent = self.output.sent();
        let unsent: Vec<usize> =
            self.cmds.live_slots().into_iter().filter(|&s| self.cmds.get(s).queued_at >= sent).collect();
        let Some(cut) = unsent.iter().map(|&s| self.cmds.get(s).queued_at).min() else { return 0 };
        self.output.truncate(cut);
        for &slot in &unsent {
            self.cmds.get_mut(slot).record_error(LocalError::Abandoned.into());
            self.complete(slot);
        }
        unsent.len()
    }

    fn issue(
        &mut self,
        kind: u16,
        flags: CmdFlags,
        offset: u64,
        length: u64,
        buf: Option<(B, bool)>,
        payload: &[u8],
    ) -> Result<Cookie, Error> {
        // A read's buffer comes with whether to report its chunks.
        let (buf, report_chunks) = match buf {
            Some((b, report)) => (Some(b), report),
            None => (None, false),
        };
        // While lost, commands are held until the connection is back.
        let held = self.holds_new_commands()?;
        if !held && !matches!(self.state, State::Transmission) {
            return Err(self.wrong_state("connected with the server"));
        }
        if self.disconnect_requested {
            return Err(LocalError::AfterDisconnect.into());
        }
        let flags = if payload.is_empty() {
            self.check_request(kind, flags, offset, length)?
        } else {
            // A request payload is checked for what it asks, not for the
            // flag that announces it, which is sent as the caller gave it.
            let announced = flags & CmdFlags::PAYLOAD_LEN;
            self.check_request(kind, flags - CmdFlags::PAYLOAD_LEN, offset, length)? | announced
        };
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let slot = self.cmds.insert(cookie, reply_estimate(kind, length));
        let keep = self.config.keep_commands_on_loss;
        let c = self.cmds.get_mut(slot);
        c.kind = kind;
        c.flags = flags;
        c.offset = offset;
        c.length = length;
        c.buf = buf;
        c.report_chunks = report_chunks;
        c.payload.clear();
        if keep {
            c.payload.extend_from_slice(payload);
        }
        if !held {
            self.encode_request_in(slot, payload);
        }
        Ok(cookie)
    }

    /// Queues the request of the command in `slot` (with `payload`, a
    /// request payload other than WRITE data).
    fn encode_request_in(&mut self, slot: usize, payload: &[u8]) {
        let queued_at = self.output.queued();
        let c = self.cmds.get_mut(slot);
        c.queued_at = queued_at;
        let (kind, flags, cookie, offset, length) = (c.kind, c.flags, c.cookie, c.offset, c.length);
        let wire_length = if payload.is_empty() { length } else { payload.len() as u64 };
        self.encode_request(&RequestHeader { flags: flags.bits(), kind, cookie, offset, length: wire_length });
        if !payload.is_empty() {
            self.output.encode(|out| out.extend_from_slice(payload));
        }
        if kind == cmd::WRITE {
            self.output.push_payload(slot, length as usize);
        }
        self.output.milestone(Milestone::Request { slot });
    }

    /// Queues again the request of a command kept across a reconnect.
    pub(super) fn encode_kept(&mut self, slot: usize) {
        let payload = std::mem::take(&mut self.cmds.get_mut(slot).payload);
        self.encode_request_in(slot, &payload);
        self.cmds.get_mut(slot).payload = payload;
    }

    fn encode_request(&mut self, header: &RequestHeader) {
        self.stats.chunks_sent += 1;
        let extended = self.neg.extended_headers;
        self.output.encode(|out| header.encode(extended, out));
    }

    // ---- replies ----------------------------------------------------------------

    /// One parse step; `Ok(false)` when more bytes are needed.
    pub(super) fn step_reply(&mut self) -> Result<bool, Error> {
        match self.rx {
            Rx::Header => {
                let avail = self.input.available();
                if avail.len() < 4 {
                    self.input.want(4);
                    return Ok(false);
                }
                let magic = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
                let size = ReplyHeader::size_for_magic(magic).ok_or(ProtocolError::BadReplyMagic(magic))?;
                if avail.len() < size {
                    self.input.want(size);
                    return Ok(false);
                }
                let header = ReplyHeader::decode(&avail[..size]).ok_or(ProtocolError::BadReplyMagic(magic))?;
                self.input.consume(size);
                self.stats.chunks_received += 1;
                self.on_reply_header(header)?;
            }
            Rx::DataOffset { slot, hdr } => {
                let Some(bytes) = self.input.available().get(..8) else {
                    self.input.want(8);
                    return Ok(false);
                };
                let offset = Reader::new(bytes).u64().unwrap_or_default();
                self.input.consume(8);
                let length = hdr.length - 8;
                let at = self.claim_content(slot, offset, length)?;
                self.rx = Rx::Data(DataRun {
                    slot,
                    at,
                    remaining: length as usize,
                    offset,
                    length,
                    ends_reply: hdr.is_done(),
                });
            }
            Rx::Data(run) => {
                let n = run.remaining.min(self.input.available().len());
                if n == 0 && run.remaining > 0 {
                    return Ok(false);
                }
                let (src, cmd) = (&self.input.available()[..n], self.cmds.get_mut(run.slot));
                if let Some(dest) = cmd.buf.as_mut().and_then(|b| b.as_mut().get_mut(run.at..run.at + n)) {
                    dest.copy_from_slice(src);
                } else {
                    return Err(LocalError::Invalid("a read buffer changed size while in flight").into());
                }
                self.input.consume(n);
                self.advance_data(n)?;
            }
            Rx::Body { slot, hdr } => {
                let len = hdr.length as usize;
                if self.input.available().len() < len {
                    self.input.want(len);
                    return Ok(false);
                }
                let body = self.input.available()[..len].to_vec();
                self.input.consume(len);
                self.rx = Rx::Header;
                self.on_chunk_body(slot, hdr, &body)?;
            }
        }
        Ok(true)
    }

    /// Where a direct receive may go: the caller's buffer, when a large
    /// run of READ payload is next and nothing is buffered ahead of it.
    pub(super) fn direct_target(&self) -> Option<(usize, usize, usize)> {
        match self.rx {
            Rx::Data(run) if self.input.is_empty() && run.remaining >= DIRECT_MIN => {
                Some((run.slot, run.at, run.remaining))
            }
            _ => None,
        }
    }

    /// `n` bytes landed directly in the caller's buffer.
    pub(super) fn advance_direct(&mut self, n: usize) -> Result<(), Error> {
        match self.rx {
            Rx::Data(run) if n <= run.remaining => self.advance_data(n),
            _ => Err(LocalError::Invalid("more bytes reported than the receive buffer held").into()),
        }
    }

    fn advance_data(&mut self, n: usize) -> Result<(), Error> {
        let Rx::Data(mut run) = self.rx else { return Ok(()) };
        run.at += n;
        run.remaining -= n;
        if run.remaining > 0 {
            self.rx = Rx::Data(run);
            return Ok(());
        }
        self.rx = Rx::Header;
        let c = self.cmds.get(run.slot);
        if c.report_chunks {
            let (cookie, offset, length) = (c.cookie, run.offset, run.length);
            self.events.push_back(Event::ReadChunk { cookie, offset, length, status: ChunkStatus::Data });
        }
        if run.ends_reply {
            self.finish(run.slot)?;
        }
        Ok(())
    }

    fn on_reply_header(&mut self, header: ReplyHeader) -> Result<(), Error> {
        let (cookie, extended_form) = match header {
            ReplyHeader::Simple { cookie, .. } => (cookie, None),
            ReplyHeader::Chunk(h) => (h.cookie, Some(h.extended)),
        };
        match extended_form {
            None if self.neg.extended_headers => return Err(ProtocolError::ReplyNotNegotiated("a simple").into()),
            Some(false) if !self.neg.structured_replies => {
                return Err(ProtocolError::ReplyNotNegotiated("a structured").into())
            }
            Some(false) if self.neg.extended_headers => {
                return Err(ProtocolError::ReplyNotNegotiated("a compact structured").into())
            }
            Some(true) if !self.neg.extended_headers => {
                return Err(ProtocolError::ReplyNotNegotiated("an extended").into())
            }
            _ => {}
        }
        let slot = self.cmds.slot_of(cookie).ok_or(ProtocolError::UnknownCookie(cookie))?;
        let c = self.cmds.get(slot);
        if !c.sent {
            return Err(ProtocolError::ReplyBeforeRequest(cookie).into());
        }
        let h = match header {
            ReplyHeader::Simple { error, .. } => return self.on_simple_reply(slot, error),
            ReplyHeader::Chunk(h) => h,
        };
        let (kind, request_length) = (c.kind, c.length);
        let not_for = || -> Error { ProtocolError::ChunkNotForCommand { kind: h.kind, command: kind }.into() };
        let bad_length = || -> Error { ProtocolError::BadChunkLength { kind: h.kind, length: h.length }.into() };
        self.cmds.get_mut(slot).chunked = true;
        match h.kind {
            chunk::NONE => {
                if h.length != 0 {
                    return Err(bad_length());
                }
                if !h.is_done() {
                    return Err(ProtocolError::NoneWithoutDone.into());
                }
                self.finish(slot)?;
            }
            chunk::OFFSET_DATA => {
                if kind != cmd::READ {
                    return Err(not_for());
                }
                // At least one byte of data, and never more than was asked.
                if h.length < 9 || h.length - 8 > request_length {
                    return Err(bad_length());
                }
                self.rx = Rx::DataOffset { slot, hdr: h };
            }
            chunk::OFFSET_HOLE => {
                if kind != cmd::READ {
                    return Err(not_for());
                }
                if h.length != 12 {
                    return Err(bad_length());
                }
                self.rx = Rx::Body { slot, hdr: h };
            }
            chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => {
                if kind != cmd::BLOCK_STATUS {
                    return Err(not_for());
                }
                let ext = h.kind == chunk::BLOCK_STATUS_EXT;
                if ext && !self.neg.extended_headers {
                    return Err(ProtocolError::ReplyNotNegotiated("a 64-bit block status").into());
                }
                let (fixed, each) = if ext { (8, 16) } else { (4, 8) };
                if h.length < fixed + each || (h.length - fixed) % each != 0 || h.length > MAX_CHUNK_BODY {
                    return Err(bad_length());
                }
                self.rx = Rx::Body { slot, hdr: h };
            }
            k if k & chunk::ERROR_BIT != 0 => {
                // error, message length, message, and for ERROR_OFFSET an offset.
                let tail = if k == chunk::ERROR_OFFSET { 8 } else { 0 };
                if h.length < 6 + tail || h.length > (6 + MAX_STRING + 8) as u64 {
                    return Err(bad_length());
                }
                self.rx = Rx::Body { slot, hdr: h };
            }
            k => return Err(ProtocolError::UnknownChunkType(k).into()),
        }
        Ok(())
    }

    fn on_simple_reply(&mut self, slot: usize, error: u32) -> Result<(), Error> {
        let c = self.cmds.get_mut(slot);
        if c.chunked {
            return Err(ProtocolError::ReplyNotNegotiated("a simple reply after structured chunks: a").into());
        }
        if error != 0 {
            c.record_error(ServerError::Command { errno: nbd_error::to_errno(error), message: None }.into());
            return self.finish(slot);
        }
        if c.kind != cmd::READ || c.length == 0 {
            return self.finish(slot);
        }
        if self.neg.structured_replies {
            return Err(ProtocolError::SimpleReadUnderStructured.into());
        }
        let length = c.length;
        self.rx =
            Rx::Data(DataRun { slot, at: 0, remaining: length as usize, offset: c.offset, length, ends_reply: true });
        Ok(())
    }

    /// Validates that `[offset, offset+length)` of a read is new and inside
    /// the request; returns its index in the buffer.
    fn claim_content(&mut self, slot: usize, offset: u64, length: u64) -> Result<usize, Error> {
        let c = self.cmds.get_mut(slot);
        let out_of_range = || -> Error { ProtocolError::ChunkOutOfRange { offset, length }.into() };
        let start = offset.checked_sub(c.offset).ok_or_else(out_of_range)?;
        let end = start.checked_add(length).filter(|&e| e <= c.length).ok_or_else(out_of_range)?;
        if !c.coverage.add(start, end) {
            return Err(ProtocolError::ChunkOverlap { offset, length }.into());
        }
        c.content_chunks += 1;
        if c.flags.contains(CmdFlags::DF) && c.content_chunks > 1 {
            return Err(ProtocolError::FragmentedDf.into());
        }
        Ok(start as usize)
    }

    fn on_chunk_body(&mut self, slot: usize, h: ChunkHeader, body: &[u8]) -> Result<(), Error> {
        let mut r = Reader::new(body);
        let bad_length = || -> Error { ProtocolError::BadChunkLength { kind: h.kind, length: h.length }.into() };
        match h.kind {
            chunk::OFFSET_HOLE => {
                let offset = r.u64().ok_or_else(bad_length)?;
                let length = u64::from(r.u32().ok_or_else(bad_length)?);
                if length == 0 {
                    return Err(bad_length());
                }
                let at = self.claim_content(slot, offset, length)?;
                let c = self.cmds.get_mut(slot);
                match c.buf.as_mut().and_then(|b| b.as_mut().get_mut(at..at + length as usize)) {
                    Some(dest) => dest.fill(0),
                    None => return Err(LocalError::Invalid("a read buffer changed size while in flight").into()),
                }
                if c.report_chunks {
                    let cookie = c.cookie;
                    self.events.push_back(Event::ReadChunk { cookie, offset, length, status: ChunkStatus::Hole });
                }
            }
            chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => self.on_block_status(slot, h, &mut r)?,
            _ => {
                // Every error chunk, known or not, starts the same way.
                let value = r.u32().ok_or_else(bad_length)?;
                let msg_len = r.u16().ok_or_else(bad_length)?;
                let msg = r.take(usize::from(msg_len)).ok_or(ProtocolError::ErrorMessageTooLong(msg_len.into()))?;
                if value == 0 {
                    return Err(ProtocolError::ZeroErrorInErrorChunk.into());
                }
                let c = self.cmds.get(slot);
                let offset = if h.kind == chunk::ERROR_OFFSET {
                    let off = r.u64().ok_or_else(bad_length)?;
                    if off < c.offset || off - c.offset >= c.length.max(1) {
                        return Err(ProtocolError::ChunkOutOfRange { offset: off, length: 0 }.into());
                    }
                    off
                } else {
                    c.offset
                };
                // The known error types have an exact length; only unknown
                // ones may carry more after the message.
                if matches!(h.kind, chunk::ERROR | chunk::ERROR_OFFSET) && r.remaining() != 0 {
                    return Err(bad_length());
                }
                let errno = nbd_error::to_errno(value);
                let message = (!msg.is_empty()).then(|| String::from_utf8_lossy(msg).into_owned());
                // As libnbd, only an error with an offset is a read chunk.
                if c.report_chunks && h.kind == chunk::ERROR_OFFSET {
                    let (cookie, status) = (c.cookie, ChunkStatus::Error { errno });
                    self.events.push_back(Event::ReadChunk { cookie, offset, length: 0, status });
                }
                self.cmds.get_mut(slot).record_error(ServerError::Command { errno, message }.into());
            }
        }
        if h.is_done() {
            self.finish(slot)?;
        }
        Ok(())
    }

    fn on_block_status(&mut self, slot: usize, h: ChunkHeader, r: &mut Reader<'_>) -> Result<(), Error> {
        let ext = h.kind == chunk::BLOCK_STATUS_EXT;
        let bad_length = || -> Error { ProtocolError::BadChunkLength { kind: h.kind, length: h.length }.into() };
        let context_id = r.u32().ok_or_else(bad_length)?;
        let count = if ext {
            // A nonzero descriptor count must match the length.
            let declared = r.u32().ok_or_else(bad_length)? as usize;
            let count = r.remaining() / 16;
            if declared != 0 && declared != count {
                return Err(bad_length());
            }
            count
        } else {
            r.remaining() / 8
        };
        if self.meta_context_name(context_id).is_none() {
            return Err(ProtocolError::UnknownContext(context_id).into());
        }
        let c = self.cmds.get_mut(slot);
        if c.contexts_seen.contains(&context_id) {
            return Err(ProtocolError::DuplicateContext(context_id).into());
        }
        c.contexts_seen.push(context_id);
        if c.flags.contains(CmdFlags::REQ_ONE) && count > 1 {
            return Err(ProtocolError::ReqOneViolated.into());
        }
        let mut extents = Vec::with_capacity(count);
        let mut total: u64 = 0;
        for _ in 0..count {
            let (length, flags) = if ext {
                (r.u64().ok_or_else(bad_length)?, r.u64().ok_or_else(bad_length)?)
            } else {
                (u64::from(r.u32().ok_or_else(bad_length)?), u64::from(r.u32().ok_or_else(bad_length)?))
            };
            if length == 0 {
                return Err(ProtocolError::ZeroLengthExtent.into());
            }
            // Only the last extent may reach past the end of the request.
            if total >= c.length.max(1) {
                return Err(ProtocolError::ExtentsBeyondRequest.into());
            }
            total = total.saturating_add(length);
            extents.push(Extent { length, flags });
        }
        let (cookie, offset) = (c.cookie, c.offset);
        self.events.push_back(Event::Extents { cookie, context_id, offset, extents });
        Ok(())
    }

    /// The reply to the command in `slot` is complete.
    fn finish(&mut self, slot: usize) -> Result<(), Error> {
        self.rx = Rx::Header;
        let c = self.cmds.get(slot);
        if c.kind == cmd::READ && c.error.is_none() && c.chunked && c.coverage.covered() != c.length {
            return Err(ProtocolError::IncompleteRead { covered: c.coverage.covered(), expected: c.length }.into());
        }
        self.complete(slot);
        Ok(())
    }

    /// Retires the command in `slot`, reporting its first error if any.
    pub(super) fn complete(&mut self, slot: usize) {
        let (cookie, error, buf) = self.cmds.remove(slot);
        let result = match error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.events.push_back(Event::Complete { cookie, result, buf });
    }
}
