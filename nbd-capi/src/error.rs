//! The per-thread last error that `nbd_get_error` / `nbd_get_errno` report.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};

/// An error on its way to the caller: errno and a message without the
/// function name (the boundary adds it).
#[derive(Debug, Clone)]
pub struct CError {
    pub errno: i32,
    pub msg: String,
}

impl CError {
    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        CError { errno, msg: msg.into() }
    }
}

impl From<nbd_proto::Error> for CError {
    fn from(e: nbd_proto::Error) -> Self {
        match e {
            // The errno's text is appended when the error is set; the
            // context alone says what failed.
            nbd_proto::Error::Transport(
                nbd_proto::TransportError::Io { errno, context }
                | nbd_proto::TransportError::SenderFailed { errno, context },
            ) => CError { errno, msg: context },
            // libnbd reports a server that hangs up mid-handshake with no errno.
            e @ nbd_proto::Error::Transport(nbd_proto::TransportError::Eof(_)) => {
                CError { errno: 0, msg: e.to_string() }
            }
            e => CError { errno: e.errno(), msg: e.to_string() },
        }
    }
}

impl From<nbd_proto::LocalError> for CError {
    fn from(e: nbd_proto::LocalError) -> Self {
        CError { errno: e.errno(), msg: e.to_string() }
    }
}

impl CError {
    /// A failed system call, `what` in libnbd's words ("socketpair",
    /// "bind: PATH"). The errno's text is appended when the error is set,
    /// as strerror words it; std's own text ("... (os error N)") is never
    /// used. An error std made up itself (no errno) keeps its words.
    pub fn os(what: impl std::fmt::Display, e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => CError { errno, msg: what.to_string() },
            None => {
                let errno = if e.kind() == std::io::ErrorKind::InvalidInput { libc::EINVAL } else { libc::EIO };
                CError { errno, msg: format!("{what}: {}", io_text(e)) }
            }
        }
    }

    /// The system call `what` just failed with errno.
    pub fn last_os(what: impl std::fmt::Display) -> Self {
        Self::os(what, &std::io::Error::last_os_error())
    }
}

pub type CResult<T> = Result<T, CError>;

thread_local! {
    static LAST: RefCell<Option<(CString, i32)>> = const { RefCell::new(None) };
}

/// Records `function: message: strerror(errno)` with `errno` for this
/// thread, in libnbd's format.
pub fn set_error(function: &str, e: &CError) {
    let text = CString::new(error_text(function, e).replace('\0', " ")).unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = Some((text, e.errno)));
}

/// `function: message: strerror(errno)`, as `nbd_get_error` words it.
pub fn error_text(function: &str, e: &CError) -> String {
    match e.errno {
        0 => format!("{function}: {}", e.msg),
        n => format!("{function}: {}: {}", e.msg, strerror(n)),
    }
}

/// The last error message on this thread, or NULL.
#[no_mangle]
pub extern "C" fn nbd_get_error() -> *const c_char {
    LAST.with(|l| l.borrow().as_ref().map_or(std::ptr::null(), |(s, _)| s.as_ptr()))
}

/// The errno of the last error on this thread, or 0.
#[no_mangle]
pub extern "C" fn nbd_get_errno() -> c_int {
    LAST.with(|l| l.borrow().as_ref().map_or(0, |(_, e)| *e))
}

/// An I/O error in words: strerror's for an OS error, never std's
/// "... (os error N)".
pub fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => strerror(errno),
        None => e.to_string(),
    }
}

/// The C library's text for `errno`.
pub fn strerror(errno: i32) -> String {
    let mut buf = [0 as c_char; 256];
    // SAFETY: the XSI strerror_r writes a NUL-terminated string into the
    // buffer we own, of the size we pass.
    let r = unsafe { libc::strerror_r(errno, buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return format!("errno {errno}");
    }
    // SAFETY: strerror_r succeeded, so `buf` holds a C string.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}
