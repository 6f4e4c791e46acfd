//! The handshake: greeting, handshake flags, and option haggling, both the
//! automatic sequence and the `opt_*` commands of opt mode.

use super::config::{check_queries, query_matches};
use super::{BlockSize, Connection, Event, Negotiated, Note, OptionOutcome, Protocol, State};
use crate::error::{Error, LocalError, ProtocolError, ServerError};
use crate::flags::{HandshakeFlags, TlsMode, TransmissionFlags};
use crate::wire::{self, info, opt, rep, OptionHeader, OptionReplyHeader, Put, Reader, MAX_STRING, ZERO_PAD};

/// Option replies longer than this are a protocol error: the longest
/// legitimate one (`NBD_REP_SERVER` with name and description) is about
/// 8 KiB.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// Where the handshake is; each state names the bytes it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// `NBDMAGIC` and the style magic.
    Greeting,
    /// The rest of an oldstyle greeting.
    Oldstyle,
    /// A newstyle server's handshake flags.
    GlobalFlags,
    /// The reply (or replies) to the option in flight.
    OptionReply { option: u32 },
    /// STARTTLS was accepted; the TLS layer below is handshaking.
    AwaitTls,
    /// The size and flags that answer `NBD_OPT_EXPORT_NAME`.
    ExportNameReply,
    /// `NBD_OPT_ABORT` is leaving; nothing more will be read.
    Aborting,
}

/// What a run of options ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Goal {
    Go,
    Info,
    List,
    ListMetaContext,
    Abort,
    /// A single option sent on the caller's request (opt mode), whose
    /// reply ends the run.
    StartTls,
    StructuredReply,
    ExtendedHeaders,
    SetMetaContext,
}

/// Which options have been tried, and what the current run is for.
#[derive(Debug, Default)]
pub(crate) struct OptionPlan {
    tls_tried: bool,
    extended_tried: bool,
    structured_tried: bool,
    meta_tried: bool,
    goal: Option<Goal>,
    /// The goal came from an `opt_*` call, which expects a completion.
    pub(crate) user: bool,
    /// The meta context queries of the caller's LIST or SET option, when
    /// it gave its own rather than the configured ones.
    queries: Option<Vec<String>>,
}

impl OptionPlan {
    pub(crate) fn user_goal_pending(&self) -> bool {
        self.user && self.goal.is_some()
    }

    /// Whether the caller asked for exactly this option.
    fn user_asked(&self, goal: Goal) -> bool {
        self.user && self.goal == Some(goal)
    }
}

impl<B: super::CommandBuffer> Connection<B> {
    // ---- opt mode commands --------------------------------------------------

    /// Ends negotiation with `NBD_OPT_GO` for the configured export.
    pub fn opt_go(&mut self) -> Result<(), Error> {
        self.start_goal(Goal::Go)
    }

    /// Asks about the configured export with `NBD_OPT_INFO`, staying in
    /// negotiation.
    pub fn opt_info(&mut self) -> Result<(), Error> {
        self.start_goal(Goal::Info)
    }

    /// Lists exports; each arrives as [`Event::ExportListed`].
    pub fn opt_list(&mut self) -> Result<(), Error> {
        self.start_goal(Goal::List)
    }

    /// Lists meta contexts matching the configured ones (all, if none);
    /// each arrives as [`Event::MetaContextListed`]. Without structured
    /// replies this is refused locally, as libnbd 1.14 does;
    /// [`Self::opt_list_meta_context_queries`] asks the server regardless.
    pub fn opt_list_meta_context(&mut self) -> Result<(), Error> {
        if matches!(self.state, State::Negotiating) && !self.neg.structured_replies {
            return Err(LocalError::NoStructuredReplies.into());
        }
        self.opt_list_meta_context_queries(None)
    }

    /// As [`Self::opt_list_meta_context`], with `queries` instead of the
    /// configured contexts when given. As libnbd 1.22 does, the option is
    /// sent even without structured replies: the server decides.
    pub fn opt_list_meta_context_queries(&mut self, queries: Option<Vec<String>>) -> Result<(), Error> {
        self.start_meta_goal(Goal::ListMetaContext, queries)
    }

    /// Selects meta contexts for the export with `NBD_OPT_SET_META_CONTEXT`
    /// (the configured ones, or `queries` when given), staying in
    /// negotiation. Each one the server selects arrives as
    /// [`Event::MetaContextListed`] and becomes usable for block status.
    pub fn opt_set_meta_context(&mut self, queries: Option<Vec<String>>) -> Result<(), Error> {
        self.start_meta_goal(Goal::SetMetaContext, queries)
    }

    /// Sends `NBD_OPT_STARTTLS`. Success leaves the caller to run the TLS
    /// handshake ([`Event::StartTls`]); the option completes once
    /// [`Self::handle_tls_established`] is called. A refusal completes it
    /// with the server's error, still negotiating in plaintext.
    pub fn opt_starttls(&mut self) -> Result<(), Error> {
        self.start_goal(Goal::StartTls)
    }

    /// Sends `NBD_OPT_STRUCTURED_REPLY`; a refusal completes the option
    /// with the server's error and changes nothing.
    pub fn opt_structured_reply(&mut self) -> Result<(), Error> {
        self.start_goal(Goal::StructuredReply)
    }

    /// Sends `NBD_OPT_EXTENDED_HEADERS` (which implies structured replies
    /// when accepted); a refusal completes the option with the server's
    /// error and changes nothing.
    pub fn opt_extended_headers(&mut self) -> Result<(), Error> {
        self.start_goal(Goal::ExtendedHeaders)
    }

    fn start_meta_goal(&mut self, goal: Goal, queries: Option<Vec<String>>) -> Result<(), Error> {
        if let Some(q) = &queries {
            check_queries(q)?;
        }
        self.start_goal_with(goal, queries)
    }

    /// Ends the session with `NBD_OPT_ABORT`; the connection closes once
    /// it has been sent.
    pub fn opt_abort(&mut self) -> Result<(), Error> {
        self.start_goal(Goal::Abort)
    }

    fn start_goal(&mut self, goal: Goal) -> Result<(), Error> {
        self.start_goal_with(goal, None)
    }

    fn start_goal_with(&mut self, goal: Goal, queries: Option<Vec<String>>) -> Result<(), Error> {
        if !matches!(self.state, State::Negotiating) {
            return Err(self.wrong_state("negotiating"));
        }
        if !self.neg.fixed {
            return self.start_goal_without_options(goal);
        }
        self.plan.queries = queries;
        self.plan.goal = Some(goal);
        self.plan.user = true;
        self.plan.meta_tried = false;
        self.advance_options();
        Ok(())
    }

    /// The TLS layer below finished its handshake: negotiation continues
    /// inside TLS, forgetting what was agreed in plaintext.
    pub fn handle_tls_established(&mut self) -> Result<(), Error> {
        if !matches!(self.state, State::Handshake(Handshake::AwaitTls)) {
            return Err(self.wrong_state("waiting for TLS"));
        }
        let (protocol, fixed, no_zeroes) = (self.neg.protocol, self.neg.fixed, self.neg.no_zeroes);
        self.neg = Negotiated { protocol, fixed, no_zeroes, tls: true, ..Negotiated::default() };
        if self.plan.user_asked(Goal::StartTls) {
            // The caller negotiates the rest option by option, as it chooses.
            self.complete_goal(Ok(()));
            return Ok(());
        }
        self.plan.extended_tried = false;
        self.plan.structured_tried = false;
        self.plan.meta_tried = false;
        self.advance_options();
        Ok(())
    }

    // ---- parsing --------------------------------------------------------------

    /// One parse step; `Ok(false)` when more bytes are needed.
    pub(super) fn step_handshake(&mut self) -> Result<bool, Error> {
        let State::Handshake(h) = self.state else { return Ok(false) };
        let need = match h {
            Handshake::Greeting => 16,
            Handshake::Oldstyle => 8 + 4 + ZERO_PAD,
            Handshake::GlobalFlags => 2,
            Handshake::OptionReply { .. } => {
                let avail = self.input.available();
                if avail.len() < OptionReplyHeader::SIZE {
                    OptionReplyHeader::SIZE
                } else {
                    let mut hdr = [0u8; OptionReplyHeader::SIZE];
                    hdr.copy_from_slice(&avail[..OptionReplyHeader::SIZE]);
                    let h = OptionReplyHeader::decode(&hdr)
                        .map_err(|got| ProtocolError::BadMagic { what: "option reply", got })?;
                    if h.length > MAX_OPTION_REPLY {
                        return Err(ProtocolError::BadOptionReplyLength {
                            option: h.option,
                            reply: h.reply,
                            length: h.length,
                        }
                        .into());
                    }
                    OptionReplyHeader::SIZE + h.length as usize
                }
            }
            Handshake::AwaitTls => {
                return if self.input.is_empty() { Ok(false) } else { Err(ProtocolError::DataBeforeTls.into()) };
            }
            Handshake::ExportNameReply => 8 + 2 + if self.neg.no_zeroes { 0 } else { ZERO_PAD },
            // Whatever the server says after ABORT no longer matters.
            Handshake::Aborting => {
                let n = self.input.available().len();
                self.input.consume(n);
                return Ok(false);
            }
        };
        if self.input.available().len() < need {
            self.input.want(need);
            return Ok(false);
        }
        let bytes = self.input.available()[..need].to_vec();
        self.input.consume(need);
        let mut r = Reader::new(&bytes);
        match h {
            Handshake::Greeting => self.on_greeting(&mut r)?,
            Handshake::Oldstyle => {
                let size = r.u64().unwrap_or_default();
                // The low 16 bits of the 32-bit field are the transmission
                // flags, the high 16 the global flags.
                let both = r.u32().unwrap_or_default();
                self.note(|| Note::OldstyleFlags((both >> 16) as u16));
                let flags = both as u16;
                self.neg.protocol = Some(Protocol::Oldstyle);
                if self.config.tls == TlsMode::Require {
                    return Err(ServerError::TlsUnavailable("uses the oldstyle handshake").into());
                }
                self.set_export(size, flags)?;
                self.finish_handshake();
            }
            Handshake::GlobalFlags => self.on_global_flags(r.u16().unwrap_or_default())?,
            Handshake::OptionReply { option } => {
                let mut hdr = [0u8; OptionReplyHeader::SIZE];
                hdr.copy_from_slice(&bytes[..OptionReplyHeader::SIZE]);
                let h = OptionReplyHeader::decode(&hdr).unwrap_or(OptionReplyHeader { option, reply: 0, length: 0 });
                self.on_option_reply(option, h, &bytes[OptionReplyHeader::SIZE..])?;
            }
            Handshake::ExportNameReply => {
                let size = r.u64().unwrap_or_default();
                let flags = r.u16().unwrap_or_default();
                self.set_export(size, flags)?;
                self.finish_handshake();
            }
            Handshake::AwaitTls | Handshake::Aborting => {}
        }
        Ok(true)
    }

    fn on_greeting(&mut self, r: &mut Reader<'_>) -> Result<(), Error> {
        let magic = r.u64().unwrap_or_default();
        if magic != wire::NBDMAGIC {
            return Err(ProtocolError::BadMagic { what: "greeting", got: magic }.into());
        }
        self.stats.chunks_received += 1;
        self.state = match r.u64().unwrap_or_default() {
            wire::IHAVEOPT => State::Handshake(Handshake::GlobalFlags),
            wire::OLDSTYLE_MAGIC => State::Handshake(Handshake::Oldstyle),
            got => return Err(ProtocolError::BadMagic { what: "greeting version", got }.into()),
        };
        Ok(())
    }

    fn on_global_flags(&mut self, server: u16) -> Result<(), Error> {
        let ours = HandshakeFlags::from_bits_truncate(u32::from(server)) & self.config.handshake_flags;
        self.neg.fixed = ours.contains(HandshakeFlags::FIXED_NEWSTYLE);
        self.neg.no_zeroes = ours.contains(HandshakeFlags::NO_ZEROES);
        self.neg.protocol = Some(if self.neg.fixed { Protocol::NewstyleFixed } else { Protocol::Newstyle });
        self.output.encode(|out| out.put_u32(ours.bits()));
        if self.neg.fixed {
            self.advance_options();
        } else if self.config.tls == TlsMode::Require {
            return Err(ServerError::TlsUnavailable("does not use the fixed newstyle handshake").into());
        } else if self.config.opt_mode {
            // As in libnbd: the caller still negotiates, though the only
            // option such a server takes is the export name (opt_go).
            self.state = State::Negotiating;
        } else {
            self.send_export_name();
        }
        Ok(())
    }

    /// A server without the fixed newstyle handshake takes no option but
    /// NBD_OPT_EXPORT_NAME: opt_go sends that, opt_abort can only drop
    /// the connection (libnbd leaves it dead), the rest are ENOTSUP.
    fn start_goal_without_options(&mut self, goal: Goal) -> Result<(), Error> {
        match goal {
            Goal::Go => {
                self.plan.goal = Some(goal);
                self.plan.user = true;
                self.send_export_name();
                Ok(())
            }
            Goal::Abort => {
                // The abort itself succeeds, as libnbd reports it.
                self.plan.user = true;
                self.complete_goal(Ok(()));
                self.fail(LocalError::NotFixedNewstyle.into());
                Ok(())
            }
            _ => Err(LocalError::NotFixedNewstyle.into()),
        }
    }

    // ---- the option sequence ------------------------------------------------

    /// Sends the next option of the run, or settles in a resting state.
    pub(super) fn advance_options(&mut self) {
        let cfg = &self.config;
        if cfg.tls != TlsMode::Disable && !self.plan.tls_tried {
            self.plan.tls_tried = true;
            return self.send_option(opt::STARTTLS, &[]);
        }
        if cfg.request_structured_replies && cfg.request_extended_headers && !self.plan.extended_tried {
            self.plan.extended_tried = true;
            return self.send_option(opt::EXTENDED_HEADERS, &[]);
        }
        if cfg.request_structured_replies && !self.neg.structured_replies && !self.plan.structured_tried {
            self.plan.structured_tried = true;
            return self.send_option(opt::STRUCTURED_REPLY, &[]);
        }
        let goal = match self.plan.goal {
            Some(g) => g,
            None if self.config.opt_mode => {
                self.state = State::Negotiating;
                return;
            }
            None => {
                self.plan.user = false;
                self.plan.goal = Some(Goal::Go);
                Goal::Go
            }
        };
        let mut payload = Vec::new();
        match goal {
            Goal::Go | Goal::Info => {
                let cfg = &self.config;
                if !self.plan.meta_tried && cfg.request_meta_context {
                    // Contexts selected earlier are forgotten, whether or
                    // not they are asked for again.
                    self.plan.meta_tried = true;
                    self.neg.meta_valid = false;
                    self.neg.meta_contexts.clear();
                    if self.neg.structured_replies && !cfg.meta_contexts().is_empty() {
                        wire::encode_meta_context_request(cfg.export_name(), cfg.meta_contexts(), &mut payload);
                        return self.send_option(opt::SET_META_CONTEXT, &payload);
                    }
                }
                let mut infos = Vec::with_capacity(3);
                if cfg.request_block_size {
                    infos.push(info::BLOCK_SIZE);
                }
                if cfg.full_info {
                    infos.extend([info::NAME, info::DESCRIPTION]);
                }
                wire::encode_info_request(cfg.export_name(), &infos, &mut payload);
                self.neg.export = Default::default();
                let option = if goal == Goal::Go { opt::GO } else { opt::INFO };
                self.send_option(option, &payload);
            }
            Goal::List => self.send_option(opt::LIST, &[]),
            Goal::ListMetaContext | Goal::SetMetaContext => {
                let queries = self.plan.queries.as_deref().unwrap_or(self.config.meta_contexts());
                wire::encode_meta_context_request(self.config.export_name(), queries, &mut payload);
                if goal == Goal::ListMetaContext {
                    return self.send_option(opt::LIST_META_CONTEXT, &payload);
                }
                self.neg.meta_valid = false;
                self.neg.meta_contexts.clear();
                self.send_option(opt::SET_META_CONTEXT, &payload);
            }
            Goal::StartTls => self.send_option(opt::STARTTLS, &[]),
            Goal::StructuredReply => self.send_option(opt::STRUCTURED_REPLY, &[]),
            Goal::ExtendedHeaders => self.send_option(opt::EXTENDED_HEADERS, &[]),
            Goal::Abort => {
                self.send_option(opt::ABORT, &[]);
                self.output.milestone(super::output::Milestone::Abort);
                self.complete_goal(Ok(()));
                self.state = State::Handshake(Handshake::Aborting);
            }
        }
    }

    fn send_option(&mut self, option: u32, payload: &[u8]) {
        self.stats.chunks_sent += 1;
        self.output.encode(|out| OptionHeader::encode_with(option, payload, out));
        self.state = State::Handshake(Handshake::OptionReply { option });
    }

    fn send_export_name(&mut self) {
        self.stats.chunks_sent += 1;
        let name = self.config.export_name().as_bytes();
        self.output.encode(|out| OptionHeader::encode_with(opt::EXPORT_NAME, name, out));
        self.neg.export = Default::default();
        self.state = State::Handshake(Handshake::ExportNameReply);
    }

    fn on_option_reply(&mut self, sent: u32, h: OptionReplyHeader, payload: &[u8]) -> Result<(), Error> {
        if h.option != sent {
            return Err(ProtocolError::OptionReplyMismatch { sent, got: h.option }.into());
        }
        let unexpected = || -> Error { ProtocolError::UnexpectedOptionReply { option: sent, reply: h.reply }.into() };
        let bad_length = || -> Error {
            ProtocolError::BadOptionReplyLength { option: sent, reply: h.reply, length: h.length }.into()
        };
        if h.reply == rep::ACK && !payload.is_empty() {
            return Err(bad_length());
        }
        let refused = (h.reply & rep::ERR_BIT != 0).then(|| ServerError::OptionRefused {
            option: sent,
            reply: h.reply,
            export: matches!(sent, opt::GO | opt::INFO).then(|| self.config.export_name().to_owned()),
            message: String::from_utf8_lossy(payload).into_owned(),
        });
        match sent {
            opt::STARTTLS => match (h.reply, refused) {
                (rep::ACK, _) => {
                    if self.neg.tls {
                        return Err(ProtocolError::TlsTwice.into());
                    }
                    if !self.input.is_empty() {
                        return Err(ProtocolError::DataBeforeTls.into());
                    }
                    self.state = State::Handshake(Handshake::AwaitTls);
                    self.events.push_back(Event::StartTls);
                }
                (_, Some(_)) if self.config.tls == TlsMode::Require => {
                    return Err(ServerError::TlsUnavailable("refused NBD_OPT_STARTTLS").into());
                }
                (_, Some(e)) if self.plan.user_asked(Goal::StartTls) => {
                    self.note(|| Note::TlsRefused { reply: h.reply, continuing: false });
                    self.complete_goal(Err(e.into()))
                }
                (_, Some(_)) => {
                    self.note(|| Note::TlsRefused { reply: h.reply, continuing: true });
                    self.advance_options()
                }
                _ => return Err(unexpected()),
            },
            opt::EXTENDED_HEADERS | opt::STRUCTURED_REPLY => {
                let asked = self.plan.user_asked(Goal::ExtendedHeaders) || self.plan.user_asked(Goal::StructuredReply);
                let result = match (h.reply, refused) {
                    (rep::ACK, _) => {
                        self.neg.structured_replies = true;
                        self.neg.extended_headers |= sent == opt::EXTENDED_HEADERS;
                        Ok(())
                    }
                    (_, Some(e)) => Err(e.into()),
                    _ => return Err(unexpected()),
                };
                let already =
                    if sent == opt::EXTENDED_HEADERS { self.neg.extended_headers } else { self.neg.structured_replies };
                let outcome = match (&result, already) {
                    (Ok(()), _) => OptionOutcome::Negotiated,
                    (Err(_), true) => OptionOutcome::AlreadyNegotiated,
                    (Err(_), false) => OptionOutcome::Unsupported,
                };
                self.note(|| match sent {
                    opt::EXTENDED_HEADERS => Note::ExtendedHeaders(outcome),
                    _ => Note::StructuredReplies(outcome),
                });
                if asked {
                    self.complete_goal(result);
                } else {
                    self.advance_options();
                }
            }
            opt::SET_META_CONTEXT => match (h.reply, refused) {
                (rep::META_CONTEXT, _) => {
                    let (id, name) = parse_meta_context(payload).ok_or_else(bad_length)?;
                    self.note(|| Note::MetaContext { name: name.clone(), id });
                    let queries = self.plan.queries.as_deref().unwrap_or(self.config.meta_contexts());
                    if !query_matches(queries, &name) || self.neg.meta_contexts.iter().any(|m| m.name == name) {
                        return Err(ProtocolError::MetaContextNotRequested(name).into());
                    }
                    if self.neg.meta_contexts.iter().any(|m| m.id == id) {
                        return Err(ProtocolError::DuplicateMetaContextId(id).into());
                    }
                    if self.plan.user_asked(Goal::SetMetaContext) {
                        self.events.push_back(Event::MetaContextListed { name: name.clone() });
                    }
                    self.neg.meta_contexts.push(super::MetaContext { id, name });
                }
                (rep::ACK, _) if self.plan.user_asked(Goal::SetMetaContext) => {
                    self.neg.meta_valid = true;
                    self.complete_goal(Ok(()));
                }
                (_, Some(e)) if self.plan.user_asked(Goal::SetMetaContext) => self.complete_goal(Err(e.into())),
                // A refusal leaves no contexts: block status is then refused
                // locally, as libnbd does.
                (rep::ACK, _) | (_, Some(_)) => {
                    if h.reply != rep::ACK {
                        self.neg.meta_contexts.clear();
                    }
                    self.neg.meta_valid = true;
                    self.advance_options();
                }
                _ => return Err(unexpected()),
            },
            opt::GO | opt::INFO => match (h.reply, refused) {
                (rep::INFO, _) => self.on_info(payload).ok_or_else(bad_length)??,
                (rep::ACK, _) => {
                    if self.neg.export.size.is_none() {
                        return Err(ProtocolError::MissingExportInfo(sent).into());
                    }
                    if sent == opt::GO {
                        self.finish_handshake();
                    } else {
                        self.complete_goal(Ok(()));
                    }
                }
                (rep::ERR_UNSUP, _) if sent == opt::GO => self.send_export_name(),
                (_, Some(e)) => {
                    // As libnbd: a refused export leaves nothing known,
                    // not even the contexts agreed for it.
                    self.neg.export = Default::default();
                    self.neg.meta_valid = false;
                    if self.plan.user {
                        self.complete_goal(Err(e.into()));
                    } else {
                        return Err(e.into());
                    }
                }
                _ => return Err(unexpected()),
            },
            opt::LIST => match (h.reply, refused) {
                (rep::SERVER, _) => {
                    let mut r = Reader::new(payload);
                    let len = r.u32().ok_or_else(bad_length)? as usize;
                    let name = r.take(len).ok_or_else(bad_length)?;
                    let name = String::from_utf8_lossy(name).into_owned();
                    let description = String::from_utf8_lossy(r.rest()).into_owned();
                    self.events.push_back(Event::ExportListed { name, description });
                }
                (rep::ACK, _) => self.complete_goal(Ok(())),
                (_, Some(e)) => self.complete_goal(Err(e.into())),
                _ => return Err(unexpected()),
            },
            opt::LIST_META_CONTEXT => match (h.reply, refused) {
                (rep::META_CONTEXT, _) => {
                    let (id, name) = parse_meta_context(payload).ok_or_else(bad_length)?;
                    self.note(|| Note::MetaContext { name: name.clone(), id });
                    self.events.push_back(Event::MetaContextListed { name });
                }
                (rep::ACK, _) => self.complete_goal(Ok(())),
                (_, Some(e)) => self.complete_goal(Err(e.into())),
                _ => return Err(unexpected()),
            },
            _ => return Err(unexpected()),
        }
        Ok(())
    }

    /// One `NBD_REP_INFO`; `None` if its length is wrong for its type.
    fn on_info(&mut self, payload: &[u8]) -> Option<Result<(), Error>> {
        let mut r = Reader::new(payload);
        let kind = r.u16()?;
        let string = |r: &mut Reader<'_>| {
            let s = r.rest();
            (s.len() <= MAX_STRING).then(|| String::from_utf8_lossy(s).into_owned())
        };
        match kind {
            info::EXPORT => {
                if r.remaining() != 10 {
                    return None;
                }
                let size = r.u64()?;
                let flags = r.u16()?;
                return Some(self.set_export(size, flags));
            }
            info::BLOCK_SIZE => {
                if r.remaining() != 12 {
                    return None;
                }
                let b = BlockSize { minimum: r.u32()?, preferred: r.u32()?, maximum: r.u32()? };
                // Nonsense constraints are ignored rather than obeyed.
                let accepted = valid_block_size(b);
                self.note(|| Note::BlockSize { block: b, accepted });
                self.neg.export.block_size = accepted.then_some(b);
            }
            info::NAME => self.neg.export.canonical_name = Some(string(&mut r)?),
            info::DESCRIPTION => self.neg.export.description = Some(string(&mut r)?),
            _ => {}
        }
        Some(Ok(()))
    }

    /// Records the export's size and flags, as libnbd normalises them.
    pub(super) fn set_export(&mut self, size: u64, flags: u16) -> Result<(), Error> {
        self.note(|| Note::Export { size, flags });
        if size > i64::MAX as u64 {
            return Err(ProtocolError::SizeTooLarge(size).into());
        }
        let mut flags = TransmissionFlags::from_bits_retain(flags);
        if !flags.contains(TransmissionFlags::HAS_FLAGS) {
            flags = TransmissionFlags::empty();
        }
        if !self.neg.structured_replies {
            flags.remove(TransmissionFlags::SEND_DF);
        }
        if !flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
            flags.remove(TransmissionFlags::SEND_FAST_ZERO);
        }
        if !self.neg.extended_headers {
            flags.remove(TransmissionFlags::BLOCK_STAT_PAYLOAD);
        }
        self.neg.export.size = Some(size);
        self.neg.export.flags = flags;
        Ok(())
    }

    fn finish_handshake(&mut self) {
        self.complete_goal(Ok(()));
        if self.is_restarting() {
            self.finish_restart();
            return;
        }
        self.state = State::Transmission;
        self.events.push_back(Event::Connected);
    }

    /// Ends the current run of options: reports to an `opt_*` caller and
    /// rests in negotiation (callers that leave negotiation set the state
    /// after this).
    fn complete_goal(&mut self, result: Result<(), Error>) {
        if self.plan.user {
            self.events.push_back(Event::OptionComplete { result });
        }
        self.plan.goal = None;
        self.plan.user = false;
        self.plan.meta_tried = false;
        self.plan.queries = None;
        self.state = State::Negotiating;
    }
}

fn parse_meta_context(payload: &[u8]) -> Option<(u32, String)> {
    let mut r = Reader::new(payload);
    let id = r.u32()?;
    let name = r.rest();
    if name.len() > MAX_STRING {
        return None;
    }
    Some((id, String::from_utf8_lossy(name).into_owned()))
}

fn valid_block_size(b: BlockSize) -> bool {
    let pow2 = |v: u32| v != 0 && v & (v - 1) == 0;
    pow2(b.minimum)
        && b.minimum <= 64 * 1024
        && pow2(b.preferred)
        && b.preferred >= b.minimum
        && b.maximum >= b.preferred
        && (b.maximum == u32::MAX || b.maximum % b.minimum == 0)
}
