//! TLS for the C library: nbd-tls's sans-IO session and transport, shared
//! with the server, and what only the C side knows: the local user's name
//! (getlogin_r), which PSK uses when no username was set.

use crate::error::{CError, CResult};
pub use nbd_tls::{OpensslTls, Plain, TlsError, TlsLayer, TlsSettings, TlsTransport};

impl From<TlsError> for CError {
    fn from(e: TlsError) -> Self {
        CError::new(e.errno, e.msg)
    }
}

/// A client session started (its first flight made) for `hostname`, the
/// PSK username found as libnbd finds it when none was set.
pub fn client_session(settings: &TlsSettings, hostname: Option<&str>) -> CResult<OpensslTls> {
    let mut settings = settings.clone();
    if settings.psk_file.is_some() && settings.username.is_none() {
        settings.username = Some(local_username()?);
    }
    let mut tls = OpensslTls::client(&settings, hostname)?;
    tls.handshake()?;
    Ok(tls)
}

/// The name PSK authentication uses when none is set, found as libnbd
/// finds it: `$LOGNAME`, else the login name of the terminal's session.
pub fn local_username() -> CResult<String> {
    if let Some(name) = std::env::var("LOGNAME").ok().filter(|n| !n.is_empty()) {
        return Ok(name);
    }
    let mut buf = vec![0 as libc::c_char; 256];
    loop {
        // SAFETY: getlogin_r writes a NUL-terminated name of at most
        // `buf.len()` bytes into the buffer we own.
        let r = unsafe { getlogin_r(buf.as_mut_ptr(), buf.len()) };
        match r {
            0 => {
                // SAFETY: on success the buffer holds a C string.
                return Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned());
            }
            libc::ERANGE if buf.len() < 65536 => buf.resize(buf.len() * 2, 0),
            errno => return Err(CError::new(errno, "getlogin_r")),
        }
    }
}

// POSIX; the libc crate does not declare it.
unsafe extern "C" {
    fn getlogin_r(buf: *mut libc::c_char, size: libc::size_t) -> libc::c_int;
}
