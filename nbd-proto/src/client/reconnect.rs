//! Keeping commands across a lost transport, and resuming them on a new
//! one ([`Config::keep_commands_on_loss`](crate::Config)).
//!
//! A transport that fails in transmission (the server hung up, a send or
//! receive failed) then does not fail the commands in flight: the
//! connection is *lost* ([`Connection::is_lost`]). It keeps them, keeps
//! accepting new ones (checked against the export it had), and reports
//! [`Event::TransportLost`]. The caller brings up a new transport and
//! calls [`Connection::restart`], then [`Connection::handle_connected`]
//! as for a first connect. The whole handshake runs again, asking for
//! what the first one negotiated. The export must be the same one: its
//! size, transmission flags, block sizes, meta contexts and reply format.
//! If it is, every command kept is sent again whole, in the order it was
//! first submitted and with the same cookie, and [`Event::Reconnected`]
//! follows; if not, every command fails with
//! [`ServerError::ExportChanged`], which names the change.
//!
//! A transport that fails during that handshake leaves the connection
//! lost again, commands still kept. Anything else (a protocol violation,
//! an option refused) kills it as on a first connect, failing everything.
//!
//! A READ whose reply was partly received before the loss is received
//! again in full: its buffer is written twice, and with
//! [`Connection::read_structured`] the chunks that arrived before the
//! loss are reported again.

use super::handshake::OptionPlan;
use super::{Connection, Event, Negotiated, State};
use crate::error::{Error, ServerError, TransportError};
use crate::flags::TlsMode;
use crate::CommandBuffer;

/// What a lost connection remembers until it is back.
#[derive(Debug)]
pub(crate) struct Resume {
    /// What the handshake before the loss settled: commands are checked
    /// against it meanwhile, and the new handshake must settle the same.
    pub neg: Negotiated,
    /// New commands are held until the connection is back; after
    /// [`Connection::give_up`], refused.
    pub holding: bool,
}

impl<B: CommandBuffer> Connection<B> {
    /// Whether the transport was lost and the connection waits to be
    /// restarted, or is re-running its handshake after a restart.
    pub fn is_lost(&self) -> bool {
        self.resume.is_some()
    }

    /// Whether a restart's handshake is under way: lost, and not waiting
    /// in [`State::Lost`].
    pub(crate) fn is_restarting(&self) -> bool {
        self.resume.is_some() && !matches!(self.state, State::Lost)
    }

    /// Whether the connection is lost and waits for [`Self::restart`]
    /// (not re-running its handshake): it has no transport.
    pub fn awaits_restart(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    /// Whether `err`, ending the transport now, leaves the connection lost
    /// rather than dead.
    pub(crate) fn keeps_commands_on(&self, err: &Error) -> bool {
        let transport = matches!(err, Error::Transport(TransportError::Io { .. } | TransportError::Eof(_)));
        let when = match self.state {
            State::Transmission => true,
            State::Connecting | State::Handshake(_) | State::Negotiating => self.is_restarting(),
            _ => false,
        };
        self.config.keep_commands_on_loss && transport && when && !self.disconnect_requested
    }

    /// The transport failed with `err` and [`Self::keeps_commands_on`]
    /// holds: keep every command for [`Self::restart`].
    pub(crate) fn lose(&mut self, err: Error) {
        // After a restart's failed handshake, what it had settled is dropped.
        let neg = std::mem::take(&mut self.neg);
        if self.resume.is_none() {
            self.resume = Some(Box::new(Resume { neg, holding: true }));
        }
        self.state = State::Lost;
        self.plan = OptionPlan::default();
        self.output.clear();
        self.input.clear();
        self.rx = super::transmission::Rx::Header;
        self.direct = false;
        self.milestones.clear();
        for slot in self.cmds.live_slots() {
            self.cmds.get_mut(slot).forget_reply();
        }
        self.events.push_back(Event::TransportLost { error: err.clone() });
        self.error = Some(err);
    }

    /// Starts again on a new transport: the connection is connecting, as
    /// after [`Self::start_connect`]; call [`Self::handle_connected`] once
    /// the transport is up (or [`Self::handle_connect_failed`], which
    /// leaves it lost). The handshake asks for what the first one
    /// negotiated: the same export, reply format, TLS and meta contexts,
    /// without opt mode. Fails unless the connection is lost and not
    /// already restarting.
    pub fn restart(&mut self) -> Result<(), Error> {
        let Some(r) = self.resume.as_ref().filter(|_| self.awaits_restart()) else {
            return Err(self.wrong_state("lost"));
        };
        let pinned = Self::config_for(&self.config, &r.neg);
        self.config = pinned;
        self.state = State::Connecting;
        self.error = None;
        Ok(())
    }

    /// Stops holding new commands while lost: those kept fail now with
    /// [`TransportError::Lost`] (reported as `ENOTCONN`), and new ones
    /// are refused the same way until the connection is back. A
    /// connection not lost is unchanged.
    pub fn give_up(&mut self) {
        let Some(r) = self.resume.as_mut() else { return };
        r.holding = false;
        let why = self.lost_error();
        for slot in self.cmds.live_slots() {
            self.cmds.get_mut(slot).record_error(why.clone());
            self.complete(slot);
        }
    }

    /// What a command refused or failed while lost reports.
    pub(crate) fn lost_error(&self) -> Error {
        let cause = match &self.error {
            Some(Error::Transport(t)) => t.clone(),
            _ => TransportError::Eof("while reconnecting"),
        };
        TransportError::Lost(Box::new(cause)).into()
    }

    /// Whether a new command is held now (the connection is lost and
    /// holding); `Err` if it is refused (lost, given up).
    pub(crate) fn holds_new_commands(&self) -> Result<bool, Error> {
        match &self.resume {
            None => Ok(false),
            Some(r) if r.holding => Ok(true),
            Some(_) => Err(self.lost_error()),
        }
    }

    /// The restart's handshake ended: the export must be the one the
    /// connection had; then every kept command leaves again, in cookie
    /// order.
    pub(crate) fn finish_restart(&mut self) {
        let Some(r) = self.resume.take() else { return };
        if let Some(change) = r.neg.difference(&self.neg) {
            self.fail(ServerError::ExportChanged(change).into());
            return;
        }
        self.state = State::Transmission;
        for slot in self.cmds.live_slots() {
            // A block status filter names contexts by id, and ids are the
            // new server's to choose: the same names, perhaps renumbered.
            let c = self.cmds.get_mut(slot);
            if c.kind == crate::wire::cmd::BLOCK_STATUS && c.payload.len() > 8 {
                let old = std::mem::take(&mut c.payload);
                let ids: Vec<u32> = old[8..]
                    .chunks_exact(4)
                    .filter_map(|b| {
                        let id = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        let name = &r.neg.meta_contexts.iter().find(|m| m.id == id)?.name;
                        Some(self.neg.meta_contexts.iter().find(|m| &m.name == name)?.id)
                    })
                    .collect();
                let length = self.cmds.get(slot).length;
                let c = self.cmds.get_mut(slot);
                crate::wire::payload::encode_block_status_payload(length, &ids, &mut c.payload);
            }
            self.encode_kept(slot);
        }
        self.events.push_back(Event::Reconnected);
    }

    /// The settings that reach the export `neg` describes, settled the
    /// same way: for a connection made again, or another connection to
    /// the same export.
    pub(crate) fn config_for(config: &crate::Config, neg: &Negotiated) -> crate::Config {
        let mut c = config.clone();
        c.opt_mode = false;
        c.request_structured_replies = neg.structured_replies;
        c.request_extended_headers = neg.extended_headers;
        if neg.tls {
            c.tls = TlsMode::Require;
        }
        c.clear_meta_contexts();
        if neg.meta_valid {
            for m in &neg.meta_contexts {
                // Names the server accepted fit.
                let _ = c.add_meta_context(&m.name);
            }
        }
        c.request_meta_context = neg.meta_valid && !neg.meta_contexts.is_empty();
        c
    }

    /// The settings that reach this connection's export the way it was
    /// reached, for another connection to it (multi-conn).
    pub fn follower_config(&self) -> crate::Config {
        Self::config_for(&self.config, self.negotiated())
    }

    /// How `other`'s export differs from this connection's (size,
    /// transmission flags, block sizes, meta contexts, reply format), if
    /// it does: a description of the first difference, naming both values.
    pub fn export_difference(&self, other: &Connection<B>) -> Option<String> {
        self.negotiated().difference(other.negotiated())
    }
}

impl Negotiated {
    /// The first way `now` differs from `self`, as "what now, not before".
    pub(crate) fn difference(&self, now: &Negotiated) -> Option<String> {
        let (a, b) = (&self.export, &now.export);
        let names = |n: &Negotiated| {
            let mut v: Vec<&str> = n.meta_contexts.iter().map(|m| m.name.as_str()).collect();
            v.sort_unstable();
            v.join(", ")
        };
        let block = |n: &Negotiated| match n.export.block_size {
            Some(b) => format!("{}/{}/{}", b.minimum, b.preferred, b.maximum),
            None => "none".to_owned(),
        };
        let reply = |n: &Negotiated| match (n.extended_headers, n.structured_replies) {
            (true, _) => "extended headers",
            (false, true) => "structured replies",
            (false, false) => "simple replies",
        };
        if a.size != b.size {
            Some(format!("size {}, not {}", b.size.unwrap_or(0), a.size.unwrap_or(0)))
        } else if a.flags != b.flags {
            Some(format!("transmission flags {:#x}, not {:#x}", b.flags.bits(), a.flags.bits()))
        } else if a.block_size != b.block_size {
            Some(format!("block sizes {}, not {}", block(now), block(self)))
        } else if names(self) != names(now) {
            Some(format!("meta contexts [{}], not [{}]", names(now), names(self)))
        } else if reply(self) != reply(now) {
            Some(format!("reply format {}, not {}", reply(now), reply(self)))
        } else {
            None
        }
    }
}
