//! Local request checks, as libnbd's strict mode defines them.

use super::{CommandBuffer, Connection};
use crate::error::LocalError;
use crate::flags::{CmdFlags, StrictMode, TransmissionFlags as TF};
use crate::wire::cmd;

/// The largest READ or WRITE payload libnbd (and nbdkit) accept.
pub const MAX_REQUEST_SIZE: u64 = 64 * 1024 * 1024;

/// The flags that belong to each command.
fn allowed_flags(kind: u16) -> CmdFlags {
    match kind {
        cmd::READ => CmdFlags::DF,
        cmd::WRITE | cmd::FLUSH | cmd::TRIM => CmdFlags::FUA,
        cmd::WRITE_ZEROES => CmdFlags::FUA | CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
        cmd::BLOCK_STATUS => CmdFlags::REQ_ONE,
        _ => CmdFlags::empty(),
    }
}

impl<B: CommandBuffer> Connection<B> {
    pub(super) fn check_request(&self, kind: u16, flags: CmdFlags, offset: u64, length: u64) -> Result<(), LocalError> {
        let strict = self.config.strict;
        let ef = self.neg.export.flags;
        if strict.contains(StrictMode::FLAGS) && !allowed_flags(kind).contains(flags) {
            return Err(LocalError::InvalidFlags(u32::from(flags.bits())));
        }
        if strict.contains(StrictMode::COMMANDS) {
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
            let writes = matches!(kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
            if writes && ef.contains(TF::READ_ONLY) {
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
            if kind == cmd::BLOCK_STATUS && (!self.neg.meta_valid || self.neg.meta_contexts.is_empty()) {
                return Err(LocalError::NoMetaContexts);
            }
        }
        let has_payload = matches!(kind, cmd::READ | cmd::WRITE);
        if strict.contains(StrictMode::PAYLOAD) && has_payload && length > MAX_REQUEST_SIZE {
            return Err(LocalError::TooLarge { max: MAX_REQUEST_SIZE });
        }
        // Compact headers cannot carry a longer length, whatever the mode.
        if !self.neg.extended_headers && length > u64::from(u32::MAX) {
            return Err(LocalError::TooLarge { max: u64::from(u32::MAX) });
        }
        if kind == cmd::FLUSH {
            return Ok(());
        }
        if strict.contains(StrictMode::ZERO_SIZE) && length == 0 {
            return Err(LocalError::ZeroSize);
        }
        if strict.contains(StrictMode::BOUNDS) {
            let size = self.neg.export.size.unwrap_or(0);
            if offset.checked_add(length).is_none_or(|end| end > size) {
                return Err(LocalError::OutOfBounds);
            }
        }
        if strict.contains(StrictMode::ALIGN) {
            if let Some(b) = self.neg.export.block_size {
                let min = u64::from(b.minimum);
                if offset % min != 0 || length % min != 0 {
                    return Err(LocalError::Unaligned);
                }
            }
        }
        Ok(())
    }
}
