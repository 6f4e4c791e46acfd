//! The constants of libnbd's header, exported to C by the generated
//! `include/libnbd.h`, and used by the exports themselves.

pub const LIBNBD_TLS_DISABLE: i32 = 0;
pub const LIBNBD_TLS_ALLOW: i32 = 1;
pub const LIBNBD_TLS_REQUIRE: i32 = 2;
pub const LIBNBD_SIZE_MINIMUM: i32 = 0;
pub const LIBNBD_SIZE_PREFERRED: i32 = 1;
pub const LIBNBD_SIZE_MAXIMUM: i32 = 2;
pub const LIBNBD_CMD_FLAG_FUA: u32 = 0x01;
pub const LIBNBD_CMD_FLAG_NO_HOLE: u32 = 0x02;
pub const LIBNBD_CMD_FLAG_DF: u32 = 0x04;
pub const LIBNBD_CMD_FLAG_REQ_ONE: u32 = 0x08;
pub const LIBNBD_CMD_FLAG_FAST_ZERO: u32 = 0x10;
pub const LIBNBD_CMD_FLAG_MASK: u32 = 0x1f;
pub const LIBNBD_HANDSHAKE_FLAG_FIXED_NEWSTYLE: u32 = 0x01;
pub const LIBNBD_HANDSHAKE_FLAG_NO_ZEROES: u32 = 0x02;
pub const LIBNBD_HANDSHAKE_FLAG_MASK: u32 = 0x03;
pub const LIBNBD_STRICT_COMMANDS: u32 = 0x01;
pub const LIBNBD_STRICT_FLAGS: u32 = 0x02;
pub const LIBNBD_STRICT_BOUNDS: u32 = 0x04;
pub const LIBNBD_STRICT_ZERO_SIZE: u32 = 0x08;
pub const LIBNBD_STRICT_ALIGN: u32 = 0x10;
pub const LIBNBD_STRICT_MASK: u32 = 0x1f;
pub const LIBNBD_ALLOW_TRANSPORT_TCP: u32 = 0x01;
pub const LIBNBD_ALLOW_TRANSPORT_UNIX: u32 = 0x02;
pub const LIBNBD_ALLOW_TRANSPORT_VSOCK: u32 = 0x04;
pub const LIBNBD_ALLOW_TRANSPORT_MASK: u32 = 0x07;
pub const LIBNBD_SHUTDOWN_ABANDON_PENDING: u32 = 0x10000;
pub const LIBNBD_SHUTDOWN_MASK: u32 = 0x10000;
pub const LIBNBD_AIO_DIRECTION_READ: u32 = 1;
pub const LIBNBD_AIO_DIRECTION_WRITE: u32 = 2;
pub const LIBNBD_AIO_DIRECTION_BOTH: u32 = 3;
pub const LIBNBD_READ_DATA: u32 = 1;
pub const LIBNBD_READ_HOLE: u32 = 2;
pub const LIBNBD_READ_ERROR: u32 = 3;
pub const LIBNBD_STATE_HOLE: u32 = 1;
pub const LIBNBD_STATE_ZERO: u32 = 2;
