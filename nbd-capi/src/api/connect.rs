//! Connecting: the transport is made here, then the core handshakes.

use super::arg_str;
use crate::boundary::export;
use crate::error::{CError, CResult};
use crate::handle::{nbd_handle, Inner};
use nbd_proto::PublicState;
use std::ffi::{c_char, c_int};
use std::net::TcpStream;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Waits for the handshake to finish, as every synchronous connect does.
fn finish_connect(i: &mut Inner) -> CResult<c_int> {
    i.run_until(|i| !matches!(i.conn.state(), PublicState::Connecting))?;
    Ok(0)
}

fn connect_unix(i: &mut Inner, path: *const c_char) -> CResult<()> {
    let path = arg_str(path, "unixsocket")?;
    i.conn.start_connect()?;
    let s = UnixStream::connect(&path)
        .map_err(|e| CError::new(e.raw_os_error().unwrap_or(libc::EIO), format!("connect: {path}: {e}")))?;
    i.attach(OwnedFd::from(s))
}

fn connect_tcp(i: &mut Inner, host: *const c_char, port: *const c_char) -> CResult<()> {
    let host = arg_str(host, "hostname")?;
    let port = arg_str(port, "port")?;
    let port: u16 = port
        .parse()
        .or_else(|_| service_port(&port))
        .map_err(|()| CError::new(libc::EINVAL, format!("getaddrinfo: {host}:{port}: unknown service")))?;
    i.conn.start_connect()?;
    let s = TcpStream::connect((host.as_str(), port))
        .map_err(|e| CError::new(e.raw_os_error().unwrap_or(libc::EIO), format!("connect: {host}:{port}: {e}")))?;
    s.set_nodelay(true)?;
    i.attach(OwnedFd::from(s))
}

/// Resolves a service name ("nbd") through the system's services database.
fn service_port(name: &str) -> Result<u16, ()> {
    let name = std::ffi::CString::new(name).map_err(|_| ())?;
    // SAFETY: NUL-terminated strings; getservbyname returns NULL or a
    // pointer to static storage, read at once.
    let ent = unsafe { libc::getservbyname(name.as_ptr(), c"tcp".as_ptr()) };
    if ent.is_null() {
        return Err(());
    }
    // SAFETY: non-NULL servent from the C library.
    Ok(u16::from_be(unsafe { (*ent).s_port } as u16))
}

fn connect_socket(i: &mut Inner, sock: c_int) -> CResult<()> {
    if sock < 0 {
        return Err(CError::new(libc::EBADF, "invalid socket"));
    }
    i.conn.start_connect()?;
    // SAFETY: the caller hands the connected socket over to the handle,
    // which owns it from now on (libnbd's contract).
    let fd = unsafe { OwnedFd::from_raw_fd(sock) };
    i.attach(fd)
}

#[no_mangle]
pub extern "C" fn nbd_connect_unix(h: *mut nbd_handle, path: *const c_char) -> c_int {
    export!("nbd_connect_unix", h, -1, |i| {
        connect_unix(i, path)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_unix(h: *mut nbd_handle, path: *const c_char) -> c_int {
    export!("nbd_aio_connect_unix", h, -1, |i| connect_unix(i, path).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_connect_tcp(h: *mut nbd_handle, host: *const c_char, port: *const c_char) -> c_int {
    export!("nbd_connect_tcp", h, -1, |i| {
        connect_tcp(i, host, port)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_tcp(h: *mut nbd_handle, host: *const c_char, port: *const c_char) -> c_int {
    export!("nbd_aio_connect_tcp", h, -1, |i| connect_tcp(i, host, port).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_connect_socket(h: *mut nbd_handle, sock: c_int) -> c_int {
    export!("nbd_connect_socket", h, -1, |i| {
        connect_socket(i, sock)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_socket(h: *mut nbd_handle, sock: c_int) -> c_int {
    export!("nbd_aio_connect_socket", h, -1, |i| connect_socket(i, sock).map(|()| 0))
}
