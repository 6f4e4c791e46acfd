//! The libnbd-compatible C ABI (`libnbd.so.0`) over [`nbd_proto`].
//!
//! Every export goes through [`boundary`]: a panic never crosses the FFI,
//! the handle lock is taken, and the handle's state is checked against
//! [`table`], the single source of truth for the exported surface.
//!
//! A [`handle`] is what the caller sees; its connections to the export
//! are [`link`]s, each a core and a transport (connected without blocking
//! by [`dial`]; a socket, then TLS over it after STARTTLS, [`tls`]), whose
//! bytes move through `nbd_io::pump`, the one I/O loop.

// Exports take raw pointers from C by contract (NULL is checked, the rest
// is the caller's promise, as in libnbd); each dereference carries its
// SAFETY note where it happens.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod api;
pub mod boundary;
pub mod callbacks;
pub mod constants;
pub mod dial;
pub mod epoll;
pub mod error;
pub mod handle;
pub mod identity;
pub mod link;
pub mod lock;
pub mod reconnect;
pub mod subprocess;
pub mod table;
pub mod tls;
pub mod trace;
pub mod uri;
pub mod writer;
