//! A sans-IO implementation of the NBD (Network Block Device) protocol.
//!
//! The core knows the protocol and nothing else: it owns no socket, file
//! descriptor, thread or clock. Bytes and commands go in through `handle_*`
//! and command methods; bytes to send and events come out through `poll_*`.
//! See [`client::Connection`] for the order to call them in.

pub mod client;
pub mod errno;
pub mod error;
pub mod flags;
pub mod wire;

pub use client::{
    BlockSize, ChunkStatus, CommandBuffer, Config, Connection, Cookie, Direction, Event, ExportInfo, Extent,
    MetaContext, Note, OptionOutcome, Protocol, PublicState, Stats,
};
pub use error::{Error, LocalError, ProtocolError, ServerError, TransportError};
pub use flags::{CmdFlags, HandshakeFlags, StrictMode, TlsMode, TransmissionFlags};
