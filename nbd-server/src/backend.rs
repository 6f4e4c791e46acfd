//! What an export serves from, behind one trait: the event loop never
//! blocks on it; worker threads call it.

mod file;
mod memory;
mod null;

pub use file::File;
pub use memory::Memory;
pub use null::Null;

use nbd_proto::Extent;
use std::io;

/// `base:allocation` flags of an extent.
pub const STATE_HOLE: u64 = 1;
/// Reads as zeroes.
pub const STATE_ZERO: u64 = 2;

/// An export's storage. Every call may block (a disk); offsets and
/// lengths are already checked against [`Backend::size`] by the protocol
/// core. Shared by every connection to the export, so `&self`.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Whether its calls may block (a disk): then they run on worker
    /// threads; a backend that never blocks is served on the event loop
    /// itself, without the hop to a worker and back.
    fn blocks(&self) -> bool {
        true
    }

    /// Whether writes, trims and zeroes are possible at all.
    fn writable(&self) -> bool {
        true
    }

    /// Whether every connection sees every other's writes at once and a
    /// FLUSH on one covers them all (CAN_MULTI_CONN).
    fn shared_state(&self) -> bool;

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `buf` at `offset`; with `fua`, durably before returning.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Discards `len` bytes at `offset` (they may read back as anything;
    /// this server's backends make them read as zeroes).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes; `may_trim`: by
    /// deallocating them (no NO_HOLE flag). With `fast` (FAST_ZERO), a
    /// zero that would have to write the zeroes fails with
    /// [`io::ErrorKind::Unsupported`] instead.
    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast: bool, fua: bool) -> io::Result<()>;

    /// The allocation of `len` bytes at `offset`, as extents that cover
    /// at least the first byte and never pass `offset + len`.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
}
