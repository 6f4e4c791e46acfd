//! Creating and closing handles, and handle-wide settings.

use super::{arg_str, c_string};
use crate::boundary::export;
use crate::callbacks::{nbd_debug_callback, Owned};
use crate::handle::nbd_handle;
use crate::identity;
use crate::trace::Fun;
use std::ffi::{c_char, c_int, CString};
use std::sync::atomic::Ordering;

#[no_mangle]
pub extern "C" fn nbd_create() -> *mut nbd_handle {
    export!("nbd_create", std::ptr::null_mut(), || {
        let h = nbd_handle::new();
        // The first debug line names this library: nbd_get_version cannot.
        h.lock().debug(|| {
            format!(
                "opening handle ({} {}, libnbd {} ABI)",
                identity::NAME,
                identity::VERSION.to_string_lossy(),
                identity::LIBNBD_VERSION.to_string_lossy()
            )
        });
        Ok(Box::into_raw(Box::new(h)))
    })
}

/// # Safety
/// `h` is NULL or a handle from `nbd_create` not yet closed.
#[no_mangle]
pub unsafe extern "C" fn nbd_close(h: *mut nbd_handle) {
    if h.is_null() {
        return;
    }
    // SAFETY: per the function's contract the handle is ours to free.
    // Dropping it closes the socket and runs the `free` of every callback
    // still held.
    let handle = unsafe { Box::from_raw(h) };
    {
        let mut i = handle.lock();
        i.set_context("nbd_close");
        i.debug(|| "closing handle".into());
        i.abandon_in_flight();
    }
    drop(handle);
}

#[no_mangle]
pub extern "C" fn nbd_get_version(h: *mut nbd_handle) -> *const c_char {
    export!("nbd_get_version", h, std::ptr::null(), [], |_i| Ok(identity::LIBNBD_VERSION.as_ptr()))
}

#[no_mangle]
pub extern "C" fn nbd_get_package_name(h: *mut nbd_handle) -> *const c_char {
    export!("nbd_get_package_name", h, std::ptr::null(), [], |_i| Ok(identity::LIBNBD_PACKAGE.as_ptr()))
}

#[no_mangle]
pub extern "C" fn nbd_set_debug(h: *mut nbd_handle, debug: bool) -> c_int {
    export!("nbd_set_debug", h, -1, [debug], |i| {
        i.set_debug(debug);
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_debug(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_debug", h, -1, [], |i| Ok(c_int::from(i.debugging())))
}

#[no_mangle]
pub extern "C" fn nbd_set_debug_callback(h: *mut nbd_handle, cb: nbd_debug_callback) -> c_int {
    // libnbd 1.14 accepts a NULL debug callback; its free runs when the
    // callback is replaced, cleared or the handle closes.
    let cb = Owned::new(cb);
    export!("nbd_set_debug_callback", h, -1, [debug = Fun], |i| {
        i.set_debug_callback(Some(cb));
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_clear_debug_callback(h: *mut nbd_handle) -> c_int {
    export!("nbd_clear_debug_callback", h, -1, [], |i| {
        i.set_debug_callback(None);
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_set_handle_name(h: *mut nbd_handle, name: *const c_char) -> c_int {
    export!("nbd_set_handle_name", h, -1, [handle_name = name], |i| {
        let name = arg_str(name, "handle_name")?;
        i.settings_mut().handle_name = CString::new(name).unwrap_or_default();
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_handle_name(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_handle_name", h, std::ptr::null_mut(), [], |i| c_string(
        &i.settings().handle_name.to_string_lossy()
    ))
}

#[no_mangle]
pub extern "C" fn nbd_set_private_data(h: *mut nbd_handle, data: usize) -> usize {
    // SAFETY: NULL or a live handle (the C contract); no lock is needed
    // for the atomic, as in libnbd.
    match unsafe { h.as_ref() } {
        Some(handle) => {
            let old = handle.private_data.swap(data, Ordering::SeqCst);
            handle.debug_unlocked("nbd_set_private_data", || format!("enter: private_data={data}"), old);
            old
        }
        None => 0,
    }
}

#[no_mangle]
pub extern "C" fn nbd_get_private_data(h: *mut nbd_handle) -> usize {
    // SAFETY: as for nbd_set_private_data.
    unsafe { h.as_ref() }.map_or(0, |handle| {
        let data = handle.private_data.load(Ordering::SeqCst);
        handle.debug_unlocked("nbd_get_private_data", || "enter:".into(), data);
        data
    })
}

#[no_mangle]
pub extern "C" fn nbd_connection_state(h: *mut nbd_handle) -> *const c_char {
    export!("nbd_connection_state", h, std::ptr::null(), [], |i| {
        let s = i.libnbd_state();
        Ok(s.as_ptr())
    })
}

#[no_mangle]
pub extern "C" fn nbd_supports_tls(h: *mut nbd_handle) -> c_int {
    export!("nbd_supports_tls", h, -1, [], |_i| Ok(1))
}

#[no_mangle]
pub extern "C" fn nbd_supports_vsock(h: *mut nbd_handle) -> c_int {
    export!("nbd_supports_vsock", h, -1, [], |_i| Ok(1))
}

#[no_mangle]
pub extern "C" fn nbd_get_subprocess_pid(h: *mut nbd_handle) -> i64 {
    export!("nbd_get_subprocess_pid", h, -1, [], |i| match i.subprocess_pid() {
        Some(pid) => Ok(i64::from(pid)),
        None => Err(crate::error::CError::new(libc::ESRCH, "no subprocess exists")),
    })
}

#[no_mangle]
pub extern "C" fn nbd_stats_bytes_sent(h: *mut nbd_handle) -> u64 {
    export!("nbd_stats_bytes_sent", h, 0, [], |i| Ok(i.stats().bytes_sent))
}

#[no_mangle]
pub extern "C" fn nbd_stats_bytes_received(h: *mut nbd_handle) -> u64 {
    export!("nbd_stats_bytes_received", h, 0, [], |i| Ok(i.stats().bytes_received))
}

#[no_mangle]
pub extern "C" fn nbd_stats_chunks_sent(h: *mut nbd_handle) -> u64 {
    export!("nbd_stats_chunks_sent", h, 0, [], |i| Ok(i.stats().chunks_sent))
}

#[no_mangle]
pub extern "C" fn nbd_stats_chunks_received(h: *mut nbd_handle) -> u64 {
    export!("nbd_stats_chunks_received", h, 0, [], |i| Ok(i.stats().chunks_received))
}
