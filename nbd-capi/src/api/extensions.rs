//! This library's own functions, beyond libnbd's API: each in a version
//! node of ours (`table::EXTENSION_NODES`) and named `nbd_rs_*`, so a
//! program can tell at build time (`LIBNBD_HAVE_NBD_RS_*`) or at run time
//! (`dlsym`) that it runs on this library and not on libnbd.

use crate::boundary::export;
use crate::identity;
use std::ffi::c_char;

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
        i.settings_mut().multi_conn = n;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_rs_get_multi_conn(h: *mut crate::handle::nbd_handle) -> i64 {
    export!("nbd_rs_get_multi_conn", h, -1, [], |i| Ok(i64::from(i.multi_conn())))
}

#[no_mangle]
pub extern "C" fn nbd_rs_set_reconnect_delay(h: *mut crate::handle::nbd_handle, seconds: u32) -> std::ffi::c_int {
    export!("nbd_rs_set_reconnect_delay", h, -1, [seconds], |i| {
        i.settings_mut().reconnect_delay = seconds;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_rs_get_reconnect_delay(h: *mut crate::handle::nbd_handle) -> i64 {
    export!("nbd_rs_get_reconnect_delay", h, -1, [], |i| Ok(i64::from(i.settings().reconnect_delay)))
}

#[no_mangle]
pub extern "C" fn nbd_rs_set_open_timeout(h: *mut crate::handle::nbd_handle, seconds: u32) -> std::ffi::c_int {
    export!("nbd_rs_set_open_timeout", h, -1, [seconds], |i| {
        i.settings_mut().open_timeout = seconds;
        Ok(0)
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
