//! Flag sets of the protocol and of the client's settings.

use bitflags::bitflags;

bitflags! {
    /// Handshake flags: sent by a newstyle server, echoed (masked) by the client.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HandshakeFlags: u32 {
        const FIXED_NEWSTYLE = 1 << 0;
        const NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Transmission flags describing an export (`NBD_FLAG_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TransmissionFlags: u16 {
        const HAS_FLAGS = 1 << 0;
        const READ_ONLY = 1 << 1;
        const SEND_FLUSH = 1 << 2;
        const SEND_FUA = 1 << 3;
        const ROTATIONAL = 1 << 4;
        const SEND_TRIM = 1 << 5;
        const SEND_WRITE_ZEROES = 1 << 6;
        const SEND_DF = 1 << 7;
        const CAN_MULTI_CONN = 1 << 8;
        const SEND_RESIZE = 1 << 9;
        const SEND_CACHE = 1 << 10;
        const SEND_FAST_ZERO = 1 << 11;
        const BLOCK_STAT_PAYLOAD = 1 << 12;
    }
}

bitflags! {
    /// Command flags (`NBD_CMD_FLAG_*`); the low five match libnbd's
    /// `LIBNBD_CMD_FLAG_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CmdFlags: u16 {
        const FUA = 1 << 0;
        const NO_HOLE = 1 << 1;
        const DF = 1 << 2;
        const REQ_ONE = 1 << 3;
        const FAST_ZERO = 1 << 4;
        const PAYLOAD_LEN = 1 << 5;
    }
}

bitflags! {
    /// Which local request checks run before a command is sent; the bits
    /// are libnbd's `LIBNBD_STRICT_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct StrictMode: u32 {
        /// Refuse commands and flags the server did not advertise.
        const COMMANDS = 1 << 0;
        /// Refuse unknown flags and flags that do not belong to the command.
        const FLAGS = 1 << 1;
        /// Refuse requests beyond the end of the export.
        const BOUNDS = 1 << 2;
        /// Refuse zero-length requests.
        const ZERO_SIZE = 1 << 3;
        /// Refuse requests not aligned to the server's minimum block size.
        const ALIGN = 1 << 4;
        /// Refuse WRITE payloads above what the server advertised (32 MiB
        /// if it did not say), as libnbd's `LIBNBD_STRICT_PAYLOAD`.
        const PAYLOAD = 1 << 5;
        /// Set or clear `NBD_CMD_FLAG_PAYLOAD_LEN` on WRITE to match the
        /// headers negotiated, as libnbd's `LIBNBD_STRICT_AUTO_FLAG`.
        const AUTO_FLAG = 1 << 6;
    }
}

impl Default for StrictMode {
    fn default() -> Self {
        StrictMode::all()
    }
}

/// Whether and how to use TLS (libnbd's `LIBNBD_TLS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Disable,
    Allow,
    Require,
}
