//! The libnbd-compatible C ABI (`libnbd.so.0`) over [`nbd_proto`].
//!
//! Every export goes through [`boundary`]: a panic never crosses the FFI,
//! the handle lock is taken, and the handle's state is checked against
//! [`table`], the single source of truth for the exported surface.
//!
//! Connects are non-blocking ([`dial`]); the socket is serviced by the
//! handle ([`handle`]), through a sans-IO TLS session ([`tls`]) after
//! STARTTLS.

// Exports take raw pointers from C by contract (NULL is checked, the rest
// is the caller's promise, as in libnbd); each dereference carries its
// SAFETY note where it happens.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod api;
pub mod boundary;
pub mod callbacks;
pub mod constants;
pub mod dial;
pub mod error;
pub mod handle;
pub mod identity;
pub mod link;
pub mod lock;
pub mod subprocess;
pub mod table;
pub mod tls;
pub mod trace;
pub mod uri;
