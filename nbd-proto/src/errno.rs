//! The errno values the core reports (Linux numbering, which is also the
//! numbering of the NBD protocol's own error values).

pub const EPERM: i32 = 1;
pub const ENOENT: i32 = 2;
pub const EIO: i32 = 5;
pub const ENOMEM: i32 = 12;
pub const EINVAL: i32 = 22;
pub const ENOSPC: i32 = 28;
pub const ERANGE: i32 = 34;
pub const ENAMETOOLONG: i32 = 36;
pub const EPROTO: i32 = 71;
pub const EOVERFLOW: i32 = 75;
pub const ENOTSUP: i32 = 95;
pub const ECONNRESET: i32 = 104;
pub const ENOTCONN: i32 = 107;
pub const ESHUTDOWN: i32 = 108;
