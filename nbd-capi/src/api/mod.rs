//! The exported functions, grouped by what they do. Every one goes
//! through `export!` (see `boundary`).

mod commands;
mod connect;
pub(crate) mod extensions;
pub(crate) mod handle;
pub(crate) mod info;
pub(crate) mod opt;
mod settings;

use crate::error::{CError, CResult};
use std::ffi::{c_char, CStr};

/// A required string argument; NULL is EFAULT.
pub(crate) fn arg_str(p: *const c_char, what: &str) -> CResult<String> {
    if p.is_null() {
        return Err(CError::new(libc::EFAULT, format!("{what} cannot be NULL")));
    }
    // SAFETY: non-NULL and, by the C contract, NUL-terminated.
    let s = unsafe { CStr::from_ptr(p) };
    Ok(s.to_string_lossy().into_owned())
}

/// A required NULL-terminated array of strings (`char **`); NULL is EFAULT.
pub(crate) fn arg_str_list(p: *mut *mut c_char, what: &str) -> CResult<Vec<String>> {
    if p.is_null() {
        return Err(CError::new(libc::EFAULT, format!("{what} cannot be NULL")));
    }
    let mut out = Vec::new();
    for n in 0.. {
        // SAFETY: by the C contract the array is NULL-terminated, so every
        // index up to and including the terminator is readable.
        let s = unsafe { *p.add(n) };
        if s.is_null() {
            break;
        }
        out.push(arg_str(s, what)?);
    }
    Ok(out)
}

/// A `malloc`ed copy of `s` for the caller to `free`.
pub(crate) fn c_string(s: &str) -> CResult<*mut c_char> {
    let c = std::ffi::CString::new(s.replace('\0', "")).unwrap_or_default();
    // SAFETY: `c` is NUL-terminated; strdup allocates with malloc.
    let p = unsafe { libc::strdup(c.as_ptr()) };
    if p.is_null() {
        return Err(CError::new(libc::ENOMEM, "strdup"));
    }
    Ok(p)
}

/// A command's flags, checked as libnbd checks them: bits outside the
/// function's own `mask` are refused in strict-flags mode, and bits above
/// 16 can never be sent.
pub(crate) fn cmd_flags(i: &crate::handle::Handle, flags: u32, mask: u32) -> CResult<nbd_proto::CmdFlags> {
    let strict = i.conn().config().strict.contains(nbd_proto::StrictMode::FLAGS);
    if flags & !mask != 0 && (strict || flags > u32::from(u16::MAX)) {
        return Err(CError::new(libc::EINVAL, format!("flags: invalid value for flag: {flags:#x}")));
    }
    Ok(nbd_proto::CmdFlags::from_bits_retain(flags as u16))
}
