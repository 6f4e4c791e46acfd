//! Flag sets of the protocol and of the client's settings.

use bitflags::bitflags;

bitflags! {
    /// Handshake flags: the 16 bits a newstyle server sends after its
    /// greeting, and the 32 client flags the client answers with. The
    /// client sets only the bits the server offered and
    /// [`Config::handshake_flags`](crate::Config::handshake_flags) allows
    /// (libnbd's `nbd_set_handshake_flags`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HandshakeFlags: u32 {
        /// `NBD_FLAG_FIXED_NEWSTYLE`: the fixed newstyle handshake, in
        /// which the client may send options other than
        /// `NBD_OPT_EXPORT_NAME` and every option gets a reply. Without
        /// it the client can only name the export.
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_NO_ZEROES`: the 124 bytes of zero padding after the
        /// `NBD_OPT_EXPORT_NAME` reply are left out.
        const NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Transmission flags describing an export (`NBD_FLAG_*`), sent by the
    /// server with the export's size. [`ExportInfo::flags`] holds them as
    /// libnbd normalises them: all clear without `HAS_FLAGS`, and
    /// `SEND_DF`, `SEND_FAST_ZERO` and `BLOCK_STAT_PAYLOAD` cleared when
    /// what they depend on was not negotiated or offered. Strict mode's
    /// [`StrictMode::COMMANDS`] refuses commands the flags do not offer.
    ///
    /// [`ExportInfo::flags`]: crate::ExportInfo::flags
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TransmissionFlags: u16 {
        /// The server sent flags at all; without it every other bit is
        /// meaningless.
        const HAS_FLAGS = 1 << 0;
        /// The export is read-only: WRITE, TRIM and WRITE_ZEROES fail.
        const READ_ONLY = 1 << 1;
        /// The server supports `NBD_CMD_FLUSH`.
        const SEND_FLUSH = 1 << 2;
        /// The server supports the FUA (force unit access) command flag.
        const SEND_FUA = 1 << 3;
        /// The export behaves like a rotational medium (seeks are slow).
        const ROTATIONAL = 1 << 4;
        /// The server supports `NBD_CMD_TRIM`.
        const SEND_TRIM = 1 << 5;
        /// The server supports `NBD_CMD_WRITE_ZEROES`.
        const SEND_WRITE_ZEROES = 1 << 6;
        /// The server supports the DF (don't fragment) flag on READ;
        /// needs structured replies.
        const SEND_DF = 1 << 7;
        /// Several connections to the export see each other's writes once
        /// flushed, so a client may spread commands over them.
        const CAN_MULTI_CONN = 1 << 8;
        /// The server supports `NBD_CMD_RESIZE` (not sent by this client).
        const SEND_RESIZE = 1 << 9;
        /// The server supports `NBD_CMD_CACHE`.
        const SEND_CACHE = 1 << 10;
        /// The server supports the FAST_ZERO flag on WRITE_ZEROES; needs
        /// `SEND_WRITE_ZEROES`.
        const SEND_FAST_ZERO = 1 << 11;
        /// The server accepts a BLOCK_STATUS request with a payload that
        /// names the meta contexts wanted; needs extended headers.
        const BLOCK_STAT_PAYLOAD = 1 << 12;
    }
}

bitflags! {
    /// Command flags (`NBD_CMD_FLAG_*`); the low five match libnbd's
    /// `LIBNBD_CMD_FLAG_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CmdFlags: u16 {
        /// Force unit access: the server completes a WRITE, TRIM or
        /// WRITE_ZEROES only once the data is on stable storage.
        const FUA = 1 << 0;
        /// WRITE_ZEROES must allocate the range rather than punch a hole.
        const NO_HOLE = 1 << 1;
        /// Don't fragment: the server answers a READ with one data or
        /// hole chunk (structured replies only).
        const DF = 1 << 2;
        /// BLOCK_STATUS: one extent per meta context is enough.
        const REQ_ONE = 1 << 3;
        /// WRITE_ZEROES must fail fast rather than fall back to writing
        /// zeroes slowly.
        const FAST_ZERO = 1 << 4;
        /// The request's length field is the length of its payload
        /// (extended headers); on WRITE it is set or cleared for the
        /// caller under [`StrictMode::AUTO_FLAG`], and BLOCK_STATUS with
        /// a context filter needs it.
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

/// Whether and how to use TLS (libnbd's `LIBNBD_TLS_*`). TLS itself runs
/// outside the core: it only sends `NBD_OPT_STARTTLS` and reports
/// [`Event::StartTls`](crate::Event::StartTls) when the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never send `NBD_OPT_STARTTLS` (the default).
    #[default]
    Disable,
    /// Try STARTTLS first, and go on in plaintext if the server refuses.
    Allow,
    /// Try STARTTLS first; a server that refuses it, or cannot be asked
    /// (oldstyle or non-fixed newstyle), makes the handshake fail with
    /// [`ServerError::TlsUnavailable`](crate::ServerError::TlsUnavailable).
    Require,
}
