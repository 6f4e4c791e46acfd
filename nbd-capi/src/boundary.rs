//! The one door every export goes through: panics stop here, the handle
//! is locked, the state is checked against the export table, and errors
//! become the thread's last error with the function's name in front.

use crate::error::{set_error, CError, CResult};
use crate::handle::{nbd_handle, Inner};
use crate::table::{self, Export};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f` on the locked handle for the export `row`; `fail` is what the
/// function returns on error.
pub fn enter<R: DebugValue>(h: *mut nbd_handle, row: Export, fail: R, f: impl FnOnce(&mut Inner) -> CResult<R>) -> R {
    // SAFETY: a non-NULL `h` came from `nbd_create` and is not yet closed,
    // which is the caller's side of the libnbd contract.
    let Some(handle) = (unsafe { h.as_ref() }) else {
        set_error(row.name, &CError::new(libc::EFAULT, "invalid handle: NULL"));
        return fail;
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut inner = handle.lock();
        inner.context = row.name;
        inner.debug(|| "enter:".into());
        let r = check_state(&inner, row).and_then(|()| f(&mut inner));
        match &r {
            Ok(v) => inner.debug(|| format!("leave: ret={}", v.debug_text())),
            Err(e) => inner.debug(|| format!("leave: error=\"{}: {}\"", row.name, e.msg)),
        }
        r
    }));
    match outcome {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(row.name, &e);
            fail
        }
        Err(_) => {
            handle.mark_poisoned();
            set_error(row.name, &CError::new(libc::EIO, "internal error: the handle is now dead"));
            fail
        }
    }
}

/// Runs `f` with no handle (for the few exports that take none).
pub fn enter_global<R>(row: Export, fail: R, f: impl FnOnce() -> CResult<R>) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(row.name, &e);
            fail
        }
        Err(_) => {
            set_error(row.name, &CError::new(libc::EIO, "internal error"));
            fail
        }
    }
}

/// How a return value reads in debug messages (`leave: ret=...`).
pub trait DebugValue {
    fn debug_text(&self) -> String;
}

macro_rules! debug_as_number {
    ($($t:ty),*) => {$(
        impl DebugValue for $t {
            fn debug_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
debug_as_number!(i32, u32, i64, u64, isize, usize);

impl DebugValue for *const std::ffi::c_char {
    fn debug_text(&self) -> String {
        if self.is_null() {
            return "NULL".into();
        }
        // SAFETY: a non-NULL string an export is about to return, which
        // it built NUL-terminated.
        unsafe { std::ffi::CStr::from_ptr(*self) }.to_string_lossy().into_owned()
    }
}

impl DebugValue for *mut std::ffi::c_char {
    fn debug_text(&self) -> String {
        self.cast_const().debug_text()
    }
}

fn check_state(inner: &Inner, row: Export) -> CResult<()> {
    let state = inner.public_state();
    if row.states & state != 0 {
        return Ok(());
    }
    let required = describe(row.states);
    let errno = if state == table::CREATED { libc::ENOTCONN } else { libc::EINVAL };
    Err(CError::new(errno, format!("invalid state: {}: the handle must be {required}", inner.libnbd_state_name())))
}

fn describe(states: table::States) -> String {
    let names = [
        (table::CREATED, "newly created"),
        (table::CONNECTING, "connecting"),
        (table::NEGOTIATING, "negotiating"),
        (table::CONNECTED, "connected with the server"),
        (table::CLOSED, "shut down"),
        (table::DEAD, "dead"),
    ];
    let parts: Vec<&str> = names.iter().filter(|(bit, _)| states & bit != 0).map(|(_, n)| *n).collect();
    parts.join(", or ")
}

/// Wraps an export's body: `export!("nbd_name", h, FAIL, |inner| body)`.
/// The row is looked up at compile time, so a name missing from the table
/// does not build.
macro_rules! export {
    ($name:expr, $h:expr, $fail:expr, |$inner:ident| $body:expr) => {{
        const ROW: $crate::table::Export = $crate::table::export($name);
        $crate::boundary::enter($h, ROW, $fail, |$inner| $body)
    }};
    ($name:expr, $fail:expr, || $body:expr) => {{
        const ROW: $crate::table::Export = $crate::table::export($name);
        $crate::boundary::enter_global(ROW, $fail, || $body)
    }};
}
pub(crate) use export;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::handle::nbd_close;
    use crate::api::info::nbd_get_size;
    use crate::error::{nbd_get_errno, nbd_get_error};
    use std::ffi::CStr;

    fn last_error() -> String {
        // SAFETY: nbd_get_error returns NULL or this thread's NUL-terminated message.
        unsafe { nbd_get_error().as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned()) }
            .unwrap_or_default()
    }

    #[test]
    fn a_panic_inside_an_export_is_an_error_and_the_handle_dies() {
        let h = Box::into_raw(Box::new(nbd_handle::new()));
        let r: i64 = enter(h, table::export("nbd_get_debug"), -1, |_| panic!("a bug"));
        assert_eq!((r, nbd_get_errno()), (-1, libc::EIO));
        assert!(last_error().starts_with("nbd_get_debug: internal error"), "{}", last_error());

        // The handle is dead from now on; it still closes cleanly.
        assert_eq!(nbd_get_size(h), -1);
        assert_eq!(nbd_get_errno(), libc::EINVAL);
        assert!(last_error().contains("DEAD"), "{}", last_error());
        // SAFETY: `h` came from Box::into_raw above and is closed once.
        unsafe { nbd_close(h) };
    }
}
