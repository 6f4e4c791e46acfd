//! Local request checks, as libnbd's strict mode defines them.

use super::{CommandBuffer, Connection};
use crate::error::LocalError;
use crate::flags::{CmdFlags, StrictMode, TransmissionFlags as TF};
use crate::wire::cmd;

/// The largest READ or WRITE payload libnbd sends, whatever the strictness.
pub const MAX_REQUEST_SIZE: u64 = 64 * 1024 * 1024;
/// What a server that advertised no maximum must accept (the NBD spec).
const DEFAULT_PAYLOAD_MAXIMUM: u64 = 32 * 1024 * 1024;
/// The NBD spec lets a client send this much even to a server that
/// advertised a smaller maximum.
const MIN_PAYLOAD_MAXIMUM: u64 = 1024 * 1024;

/// The flags that belong to each command (libnbd 1.22's masks).
fn allowed_flags(kind: u16) -> CmdFlags {
    match kind {
        cmd::READ => CmdFlags::DF,
        cmd::WRITE => CmdFlags::FUA | CmdFlags::PAYLOAD_LEN,
        cmd::TRIM => CmdFlags::FUA,
        cmd::WRITE_ZEROES => CmdFlags::FUA | CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
        cmd::BLOCK_STATUS => CmdFlags::REQ_ONE,
        _ => CmdFlags::empty(),
    }
}

/// What a request beyond the end of the export is: ENOSPC for the
/// commands that would store data, EINVAL for the rest (libnbd's errnos).
fn stores_data(kind: u16) -> bool {
    matches!(kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES)
}

impl<B: CommandBuffer> Connection<B> {
    /// The largest WRITE payload strict mode lets through: what the server
    /// advertised (at least 1 MiB, at most 64 MiB), else 32 MiB.
    pub fn payload_maximum(&self) -> u64 {
        match self.negotiated().export.block_size {
            Some(b) => u64::from(b.maximum).clamp(MIN_PAYLOAD_MAXIMUM, MAX_REQUEST_SIZE),
            None => DEFAULT_PAYLOAD_MAXIMUM,
        }
    }

    /// Checks a request before it is queued, in libnbd's order (the first
    /// failing check decides the errno), and returns the flags to send.
    pub(super) fn check_request(
        &self,
        kind: u16,
        mut flags: CmdFlags,
        offset: u64,
        length: u64,
    ) -> Result<CmdFlags, LocalError> {
        let strict = self.config.strict;
        let extended = self.negotiated().extended_headers;
        if strict.contains(StrictMode::FLAGS) && !allowed_flags(kind).contains(flags) {
            return Err(LocalError::InvalidFlags(u32::from(flags.bits())));
        }
        if kind == cmd::WRITE && strict.contains(StrictMode::AUTO_FLAG) {
            flags.set(CmdFlags::PAYLOAD_LEN, extended);
        }
        if strict.contains(StrictMode::COMMANDS) {
            self.check_supported(kind, flags)?;
        }
        // FLUSH has no range to check.
        if kind != cmd::FLUSH {
            if strict.contains(StrictMode::ZERO_SIZE) && length == 0 {
                return Err(LocalError::ZeroSize);
            }
            let size = self.negotiated().export.size.unwrap_or(0);
            if strict.contains(StrictMode::BOUNDS) && offset.checked_add(length).is_none_or(|end| end > size) {
                return Err(LocalError::OutOfBounds { stores_data: stores_data(kind) });
            }
            if strict.contains(StrictMode::ALIGN) {
                if let Some(b) = self.negotiated().export.block_size {
                    let min = u64::from(b.minimum);
                    if offset % min != 0 || length % min != 0 {
                        return Err(LocalError::Unaligned);
                    }
                }
            }
            // Beyond libnbd, which sends it: no range may wrap past 2^64,
            // whatever the strictness. Every end computed later relies on it.
            if offset.checked_add(length).is_none() {
                return Err(LocalError::RangeOverflow);
            }
        }
        match kind {
            cmd::WRITE if strict.contains(StrictMode::PAYLOAD) && length > self.payload_maximum() => {
                Err(LocalError::PayloadTooLarge { max: self.payload_maximum() })
            }
            cmd::READ | cmd::WRITE if length > MAX_REQUEST_SIZE => Err(LocalError::TooLarge { max: MAX_REQUEST_SIZE }),
            // Compact headers cannot carry a longer length, whatever the mode.
            _ if !extended && length > u64::from(u32::MAX) => Err(LocalError::TooLarge { max: u64::from(u32::MAX) }),
            _ => Ok(flags),
        }
    }

    /// Strict mode's `COMMANDS` check: the server offers the command and
    /// every flag, and takes writes.
    fn check_supported(&self, kind: u16, flags: CmdFlags) -> Result<(), LocalError> {
        let ef = self.negotiated().export.flags;
        // libnbd asks whether the server offers the command before
        // whether it takes writes: TRIM on a read-only export that
        // offers no TRIM is EINVAL, not EPERM.
        let needs = match kind {
            cmd::FLUSH => Some((TF::SEND_FLUSH, "flush operations")),
            cmd::TRIM => Some((TF::SEND_TRIM, "trim operations")),
            cmd::WRITE_ZEROES => Some((TF::SEND_WRITE_ZEROES, "zero operations")),
            cmd::CACHE => Some((TF::SEND_CACHE, "cache operations")),
            _ => None,
        };
        if let Some((flag, what)) = needs {
            if !ef.contains(flag) {
                return Err(LocalError::Unsupported(what));
            }
        }
        if stores_data(kind) && ef.contains(TF::READ_ONLY) {
            return Err(LocalError::ReadOnly);
        }
        for (f, needed, what) in [
            (CmdFlags::FUA, TF::SEND_FUA, "the FUA flag"),
            (CmdFlags::DF, TF::SEND_DF, "the DF flag"),
            (CmdFlags::FAST_ZERO, TF::SEND_FAST_ZERO, "the fast zero flag"),
        ] {
            if flags.contains(f) && !ef.contains(needed) {
                return Err(LocalError::Unsupported(what));
            }
        }
        if kind == cmd::WRITE && flags.contains(CmdFlags::PAYLOAD_LEN) != self.negotiated().extended_headers {
            return Err(LocalError::Invalid("incorrect setting for PAYLOAD_LEN flag"));
        }
        if kind == cmd::BLOCK_STATUS && (!self.negotiated().meta_valid || self.negotiated().meta_contexts.is_empty()) {
            return Err(LocalError::NoMetaContexts);
        }
        Ok(())
    }
}
