//! This library's own functions, beyond libnbd's API: each in a version
//! node of ours (`table::EXTENSION_NODES`) and named `nbd_rs_*`, so a
//! program can tell at build time (`LIBNBD_HAVE_NBD_RS_*`) or at run time
//! (`dlsym`) that it runs on this library and not on libnbd.

use crate::boundary::export;
use crate::error::CError;
use crate::identity;
use crate::writer::{ConcurrentWriter, WriterFn};
use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

#[no_mangle]
pub extern "C" fn nbd_rs_get_version() -> *const c_char {
    export!("nbd_rs_get_version", std::ptr::null(), || Ok(identity::VERSION.as_ptr()))
}

#[no_mangle]
pub extern "C" fn nbd_rs_set_multi_conn(h: *mut crate::handle::nbd_handle, n: u32) -> std::ffi::c_int {
    export!("nbd_rs_set_multi_conn", h, -1, [n], |i| {
        if !(1..=crate::uri::MAX_MULTI_CONN).contains(&n) {
            return Err(crate::error::CError::new(
                libc::EINVAL,
                format!("invalid number of connections: {n} (from 1 to {})", crate::uri::MAX_MULTI_CONN),
            ));
        }
        i.change_beside_writer(|s| s.multi_conn = n).map(|()| 0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_rs_get_multi_conn(h: *mut crate::handle::nbd_handle) -> i64 {
    export!("nbd_rs_get_multi_conn", h, -1, [], |i| Ok(i64::from(i.multi_conn())))
}

#[no_mangle]
pub extern "C" fn nbd_rs_set_reconnect_delay(h: *mut crate::handle::nbd_handle, seconds: u32) -> std::ffi::c_int {
    export!("nbd_rs_set_reconnect_delay", h, -1, [seconds], |i| {
        i.change_beside_writer(|s| s.reconnect_delay = seconds).map(|()| 0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_rs_get_reconnect_delay(h: *mut crate::handle::nbd_handle) -> i64 {
    export!("nbd_rs_get_reconnect_delay", h, -1, [], |i| Ok(i64::from(i.settings().reconnect_delay)))
}

#[no_mangle]
pub extern "C" fn nbd_rs_set_open_timeout(h: *mut crate::handle::nbd_handle, seconds: u32) -> std::ffi::c_int {
    export!("nbd_rs_set_open_timeout", h, -1, [seconds], |i| {
        i.change_beside_writer(|s| s.open_timeout = seconds).map(|()| 0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_rs_get_open_timeout(h: *mut crate::handle::nbd_handle) -> i64 {
    export!("nbd_rs_get_open_timeout", h, -1, [], |i| Ok(i64::from(i.settings().open_timeout)))
}

#[no_mangle]
pub extern "C" fn nbd_rs_get_reconnect_count(h: *mut crate::handle::nbd_handle) -> i64 {
    export!("nbd_rs_get_reconnect_count", h, -1, [], |i| Ok(i.reconnect_count() as i64))
}

#[no_mangle]
pub extern "C" fn nbd_rs_set_concurrent_writer(
    h: *mut crate::handle::nbd_handle,
    data: *mut c_void,
    writer: Option<unsafe extern "C" fn(data: *mut c_void, buf: *const c_void, len: usize)>,
) -> c_int {
    let writer: WriterFn = writer;
    export!("nbd_rs_set_concurrent_writer", h, -1, [data = data as usize, writer = crate::trace::Fun], |i| {
        let writer = Arc::new(ConcurrentWriter::new(writer, data)?);
        i.set_writer(writer.clone())?;
        // SAFETY: `enter` checked that `h` is a live handle.
        let _ = unsafe { &*h }.writer.set(writer);
        Ok(0)
    })
}

/// Takes no lock: the writer thread calls it while the handle's thread
/// may hold the lock for a whole poll.
#[no_mangle]
pub extern "C" fn nbd_rs_concurrent_writer_error(h: *mut crate::handle::nbd_handle, err: c_int) -> c_int {
    export!(unlocked "nbd_rs_concurrent_writer_error", h, -1, |handle| {
        match handle.writer.get() {
            Some(w) => w.fail(err).map(|()| 0),
            None => Err(CError::new(libc::EINVAL, "no concurrent writer is set")),
        }
    })
}
