//! The libnbd-compatible C ABI (`libnbd.so.0`) over [`nbd_proto`].
//!
//! Not built yet: this crate is the home of issue 3 (the C face). It exists
//! so the workspace has the layout of DESIGN.md from the start.
