//! The one door every export goes through: panics stop here, the handle
//! is locked, the state is checked against the export table, and errors
//! become the thread's last error with the function's name in front.

use crate::error::{set_error, CError, CResult};
use crate::handle::{nbd_handle, Handle, Locked};
use crate::table::{self, Export};
pub use crate::trace::{DebugArg, DebugValue};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f` on the locked handle for the export `row`; `fail` is what the
/// function returns on error. `args` are the call's arguments for the
/// `enter:` debug line, formatted only when debugging is on.
pub fn enter<R: DebugValue>(
    h: *mut nbd_handle,
    row: Export,
    args: &[(&str, &dyn DebugArg)],
    fail: R,
    f: impl FnOnce(&mut Locked<'_>) -> CResult<R>,
) -> R {
    // SAFETY: a non-NULL `h` came from `nbd_create` and is not yet closed,
    // which is the caller's side of the libnbd contract.
    let Some(handle) = (unsafe { h.as_ref() }) else {
        set_error(row.name, &CError::new(libc::EFAULT, "invalid handle: NULL"));
        return fail;
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut inner = handle.lock();
        inner.set_context(row.name);
        inner.debug(|| crate::trace::enter_line(args));
        let r = check_state(&inner, row).and_then(|()| f(&mut inner));
        // A state change the call made without driving the connection.
        inner.debug_transition();
        match &r {
            Ok(v) => inner.debug(|| format!("leave: ret={}", v.debug_text())),
            Err(e) => inner.debug(|| format!("leave: error=\"{}\"", crate::error::error_text(row.name, e))),
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

/// Runs `f` on the handle without its lock, for the one export a thread
/// calls while another may hold the lock for a whole poll
/// (`nbd_rs_concurrent_writer_error`). No state check, no debug lines:
/// both need the lock.
pub fn enter_unlocked<R>(h: *mut nbd_handle, row: Export, fail: R, f: impl FnOnce(&nbd_handle) -> CResult<R>) -> R {
    // SAFETY: as in `enter`.
    let Some(handle) = (unsafe { h.as_ref() }) else {
        set_error(row.name, &CError::new(libc::EFAULT, "invalid handle: NULL"));
        return fail;
    };
    enter_global(row, fail, || f(handle))
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

fn check_state(inner: &Handle, row: Export) -> CResult<()> {
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

/// Wraps an export's body:
/// `export!("nbd_name", h, FAIL, [arg, name = value, ...], |inner| body)`.
/// The row is looked up at compile time, so a name missing from the table
/// does not build. The list, which every export must give (`[]` for none),
/// names the arguments as libnbd's header does, each with a value whose
/// type says how the `enter:` debug line shows it (see `trace`): `arg`
/// alone is the variable of that name, `name = value` anything else
/// (`flags = Hex(flags)`, `buf = ReadBuf`).
macro_rules! export {
    ($name:expr, $h:expr, $fail:expr, [$($arg:ident $(= $val:expr)?),* $(,)?], |$inner:ident| $body:expr) => {{
        const ROW: $crate::table::Export = $crate::table::export($name);
        $crate::boundary::enter(
            $h,
            ROW,
            &[$((stringify!($arg), &$crate::boundary::debug_arg!($arg $(, $val)?) as &dyn $crate::boundary::DebugArg)),*],
            $fail,
            |$inner| $body,
        )
    }};
    (unlocked $name:expr, $h:expr, $fail:expr, |$handle:ident| $body:expr) => {{
        const ROW: $crate::table::Export = $crate::table::export($name);
        $crate::boundary::enter_unlocked($h, ROW, $fail, |$handle| $body)
    }};
    ($name:expr, $fail:expr, || $body:expr) => {{
        const ROW: $crate::table::Export = $crate::table::export($name);
        $crate::boundary::enter_global(ROW, $fail, || $body)
    }};
}
pub(crate) use export;

/// An `export!` argument's value: the variable named, or the value given.
macro_rules! debug_arg {
    ($arg:ident) => {
        $arg
    };
    ($arg:ident, $val:expr) => {
        $val
    };
}
pub(crate) use debug_arg;

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
        let r: i64 = enter(h, table::export("nbd_get_debug"), &[], -1, |_| panic!("a bug"));
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
