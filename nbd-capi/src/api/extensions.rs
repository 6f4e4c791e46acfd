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
