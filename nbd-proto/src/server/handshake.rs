//! The handshake: client flags, then options, each answered here.

use super::{
    Connection, Event, MetaContext, Rx, St, TlsPolicy, BASE_ALLOCATION, BASE_ALLOCATION_ID, MAX_OPTION_LENGTH,
};
use crate::error::{ClientError, Error};
use crate::flags::{HandshakeFlags, TransmissionFlags as TF};
use crate::wire::payload::{self, Info};
use crate::wire::{opt, rep, OptionHeader, Reader, IHAVEOPT, MAX_STRING};

/// The transmission flags an export may carry; the others are the core's
/// to set (`HAS_FLAGS`, `SEND_DF`, `BLOCK_STAT_PAYLOAD`) or unsupported.
const EXPORT_FLAGS: TF = TF::READ_ONLY
    .union(TF::SEND_FLUSH)
    .union(TF::SEND_FUA)
    .union(TF::ROTATIONAL)
    .union(TF::SEND_TRIM)
    .union(TF::SEND_WRITE_ZEROES)
    .union(TF::SEND_FAST_ZERO)
    .union(TF::CAN_MULTI_CONN)
    .union(TF::SEND_CACHE);

impl<B: AsRef<[u8]> + AsMut<[u8]>> Connection<B> {
    pub(super) fn step_client_flags(&mut self) -> Result<bool, Error> {
        let Some(bytes) = self.input.available().get(..4) else {
            self.input.want(4);
            return Ok(false);
        };
        let flags = Reader::new(bytes).u32().unwrap_or_default();
        self.input.consume(4);
        // The protocol asks the server to drop a client that sets flags it
        // does not know or did not offer (it offered both known ones).
        let known = HandshakeFlags::from_bits(flags).ok_or(ClientError::UnknownFlags(flags))?;
        self.neg.fixed = known.contains(HandshakeFlags::FIXED_NEWSTYLE);
        self.neg.no_zeroes = known.contains(HandshakeFlags::NO_ZEROES);
        self.st = St::Options;
        Ok(true)
    }

    pub(super) fn step_option(&mut self) -> Result<bool, Error> {
        if !self.skip() {
            return Ok(false);
        }
        let avail = self.input.available();
        if avail.len() < OptionHeader::SIZE {
            self.input.want(OptionHeader::SIZE);
            return Ok(false);
        }
        let mut r = Reader::new(avail);
        let magic = r.u64().unwrap_or_default();
        if magic != IHAVEOPT {
            return Err(ClientError::BadMagic { what: "option request", got: magic }.into());
        }
        let option = r.u32().unwrap_or_default();
        let length = r.u32().unwrap_or_default();
        if !self.neg.fixed && option != opt::EXPORT_NAME {
            return Err(ClientError::NotFixedNewstyle(option).into());
        }
        if length > MAX_OPTION_LENGTH {
            if option == opt::EXPORT_NAME {
                return Err(ClientError::ExportNameRefused("the name is too long").into());
            }
            // Skipped as it arrives, never buffered. Without the TLS a
            // server requires, the refusal is that one, whatever the size.
            self.input.consume(OptionHeader::SIZE);
            self.rx = Rx::Skip { remaining: u64::from(length) };
            if self.tls_missing() && !matches!(option, opt::STARTTLS | opt::ABORT) {
                self.reply(option, rep::ERR_TLS_REQD, b"TLS is required");
            } else {
                self.reply(option, rep::ERR_TOO_BIG, b"option too long");
            }
            return Ok(true);
        }
        let whole = OptionHeader::SIZE + length as usize;
        if avail.len() < whole {
            self.input.want(whole);
            return Ok(false);
        }
        // Options are rare and small: a copy keeps the parse simple.
        let data = avail[OptionHeader::SIZE..whole].to_vec();
        self.input.consume(whole);
        self.on_option(option, &data)?;
        // Another look at the input even after STARTTLS: bytes there now
        // arrived before TLS began.
        Ok(true)
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        self.out.encode(|b| payload::encode_option_reply(option, reply, data, b));
    }

    fn reply_info(&mut self, option: u32, item: Info<'_>) {
        let mut d = Vec::new();
        item.encode(&mut d);
        self.reply(option, rep::INFO, &d);
    }

    /// The export a client's name designates: the one of that name, and
    /// for the empty name, the first one.
    fn find_export(&self, name: &[u8]) -> Option<usize> {
        let exports = &self.config.exports;
        exports
            .iter()
            .position(|e| e.name.as_bytes() == name)
            .or_else(|| (name.is_empty() && !exports.is_empty()).then_some(0))
    }

    /// The server requires TLS and the client has not started it.
    fn tls_missing(&self) -> bool {
        self.config.tls == TlsPolicy::Require && !self.neg.tls
    }

    fn on_option(&mut self, option: u32, data: &[u8]) -> Result<(), Error> {
        let tls_missing = self.tls_missing();
        match option {
            opt::EXPORT_NAME => return self.on_export_name(data, tls_missing),
            opt::ABORT => {
                // Any payload is ignored, as the protocol asks.
                self.reply(option, rep::ACK, &[]);
                self.begin_closing();
            }
            opt::STARTTLS => self.on_starttls(data),
            _ if tls_missing => self.reply(option, rep::ERR_TLS_REQD, b"TLS is required"),
            opt::LIST if !data.is_empty() => self.reply(option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data"),
            opt::LIST => {
                for i in 0..self.config.exports.len() {
                    let mut d = Vec::new();
                    let e = &self.config.exports[i];
                    payload::encode_server_entry(&e.name, &e.description, &mut d);
                    self.reply(option, rep::SERVER, &d);
                }
                self.reply(option, rep::ACK, &[]);
            }
            opt::INFO | opt::GO => self.on_info(option, data),
            opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS => self.on_reply_format(option, data),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.on_meta_context(option, data),
            _ => self.reply(option, rep::ERR_UNSUP, b"unknown option"),
        }
        Ok(())
    }

    fn on_export_name(&mut self, data: &[u8], tls_missing: bool) -> Result<(), Error> {
        // This option has no error reply: refusing it ends the session.
        let refused = |why| Err(ClientError::ExportNameRefused(why).into());
        if tls_missing {
            return refused("TLS is required");
        }
        if self.neg.extended {
            return refused("extended headers were negotiated");
        }
        if data.len() > MAX_STRING {
            return refused("the name is too long");
        }
        let Some(index) = self.find_export(data) else { return refused("no such export") };
        let flags = self.advertised_flags(index);
        let size = self.config.exports[index].size;
        let zeroes = !self.neg.no_zeroes;
        self.out.encode(|b| payload::encode_export_name_reply(size, flags.bits(), zeroes, b));
        self.enter_transmission(index, flags);
        Ok(())
    }

    fn on_starttls(&mut self, data: &[u8]) {
        let option = opt::STARTTLS;
        if !data.is_empty() {
            self.reply(option, rep::ERR_INVALID, b"NBD_OPT_STARTTLS takes no data");
        } else if self.neg.tls {
            self.reply(option, rep::ERR_INVALID, b"TLS is already active");
        } else if self.config.tls == TlsPolicy::Off {
            self.reply(option, rep::ERR_POLICY, b"TLS is not configured");
        } else {
            self.reply(option, rep::ACK, &[]);
            // Nothing negotiated in plaintext survives the upgrade.
            let (fixed, no_zeroes) = (self.neg.fixed, self.neg.no_zeroes);
            self.neg = super::Negotiated { fixed, no_zeroes, ..Default::default() };
            self.out.mark(super::Mark::StartTls);
            self.st = St::AwaitTls;
        }
    }

    fn on_info(&mut self, option: u32, data: &[u8]) {
        let Some(request) = payload::decode_info_request(data) else {
            return self.reply(option, rep::ERR_INVALID, b"malformed request");
        };
        if request.export.len() > MAX_STRING {
            return self.reply(option, rep::ERR_INVALID, b"export name too long");
        }
        let Some(index) = self.find_export(request.export) else {
            return self.reply(option, rep::ERR_UNKNOWN, b"no such export");
        };
        let flags = self.advertised_flags(index);
        let e = &self.config.exports[index];
        let (size, b) = (e.size, e.effective_block_size());
        self.reply_info(option, Info::Export { size, flags: flags.bits() });
        // Block sizes go out whether asked for or not: clients that did
        // not ask may ignore them, and the limits are enforced anyway.
        self.reply_info(option, Info::BlockSize { minimum: b.minimum, preferred: b.preferred, maximum: b.maximum });
        let mut seen = Vec::new();
        for &i in &request.infos {
            if seen.contains(&i) {
                continue;
            }
            seen.push(i);
            let e = &self.config.exports[index];
            let mut d = Vec::new();
            match i {
                crate::wire::info::NAME => Info::Name(&e.name).encode(&mut d),
                crate::wire::info::DESCRIPTION => Info::Description(&e.description).encode(&mut d),
                _ => continue,
            }
            self.reply(option, rep::INFO, &d);
        }
        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            self.enter_transmission(index, flags);
        }
    }

    fn on_reply_format(&mut self, option: u32, data: &[u8]) {
        let (offered, already) = if option == opt::STRUCTURED_REPLY {
            (self.config.structured_replies, self.neg.structured)
        } else {
            (self.config.extended_headers, self.neg.extended)
        };
        if !data.is_empty() {
            self.reply(option, rep::ERR_INVALID, b"the option takes no data");
        } else if !offered {
            self.reply(option, rep::ERR_UNSUP, b"not offered");
        } else if option == opt::STRUCTURED_REPLY && self.neg.extended {
            // As qemu-nbd answers: extended headers imply structured replies.
            self.reply(option, rep::ERR_EXT_HEADER_REQD, b"extended headers already negotiated");
        } else if already {
            self.reply(option, rep::ERR_INVALID, b"already negotiated");
        } else {
            self.neg.structured = true;
            self.neg.extended |= option == opt::EXTENDED_HEADERS;
            self.reply(option, rep::ACK, &[]);
        }
    }

    fn on_meta_context(&mut self, option: u32, data: &[u8]) {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // The protocol has SET replace the selection even when it fails.
            self.neg.meta.clear();
            self.neg.meta_export = None;
        }
        if !self.neg.structured {
            return self.reply(option, rep::ERR_INVALID, b"structured replies are not negotiated");
        }
        let Some(request) = payload::decode_meta_context_request(data) else {
            return self.reply(option, rep::ERR_INVALID, b"malformed request");
        };
        if request.export.len() > MAX_STRING || request.queries.iter().any(|q| q.len() > MAX_STRING) {
            return self.reply(option, rep::ERR_INVALID, b"string too long");
        }
        let Some(index) = self.find_export(request.export) else {
            return self.reply(option, rep::ERR_UNKNOWN, b"no such export");
        };
        let offered = self.config.exports[index].base_allocation;
        // `base:allocation` is the only context: listed for no query, for
        // the `base:` wildcard (LIST only) and for its own name; unknown
        // queries are ignored, as the protocol asks.
        let matches = offered
            && if request.queries.is_empty() {
                !set
            } else {
                request.queries.iter().any(|&q| q == BASE_ALLOCATION.as_bytes() || (!set && q == b"base:"))
            };
        if matches {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut d = Vec::new();
            payload::encode_meta_context_entry(id, BASE_ALLOCATION, &mut d);
            self.reply(option, rep::META_CONTEXT, &d);
            if set {
                self.neg.meta.push(MetaContext { id, name: BASE_ALLOCATION.to_owned() });
            }
        }
        if set {
            self.neg.meta_export = Some(index);
        }
        self.reply(option, rep::ACK, &[]);
    }

    /// The flags sent for export `index` under what is negotiated now.
    fn advertised_flags(&self, index: usize) -> TF {
        let e = &self.config.exports[index];
        let mut flags = (e.flags & EXPORT_FLAGS) | TF::HAS_FLAGS;
        if !flags.contains(TF::SEND_WRITE_ZEROES) {
            flags.remove(TF::SEND_FAST_ZERO);
        }
        if self.neg.structured {
            flags |= TF::SEND_DF;
        }
        if self.neg.extended && e.base_allocation {
            flags |= TF::BLOCK_STAT_PAYLOAD;
        }
        flags
    }

    fn enter_transmission(&mut self, index: usize, flags: TF) {
        // Block status needs contexts selected for this very export.
        if self.neg.meta_export != Some(index) {
            self.neg.meta.clear();
        }
        self.neg.export = Some(index);
        self.neg.flags = flags;
        self.st = St::Transmission;
        self.events.push_back(Event::ExportSelected { export: index });
    }
}
