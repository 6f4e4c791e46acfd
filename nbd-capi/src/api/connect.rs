//! Connecting: the transport is made here, then the core handshakes.

use super::arg_str;
use crate::boundary::export;
use crate::dial::Address;
use crate::error::{CError, CResult};
use crate::handle::{nbd_handle, Handle};
use crate::link::{Redial, Subprocess};
use crate::trace::{Hex, SockAddr};
use crate::uri::{self, Transport};
use nbd_proto::PublicState;
use std::ffi::{c_char, c_int};
use std::os::fd::{FromRawFd, OwnedFd};

/// Waits for the handshake to finish, as every synchronous connect does.
/// In opt mode that includes sending what is queued (the client's
/// handshake flags), so the server is not left waiting for them.
fn finish_connect(i: &mut Handle) -> CResult<c_int> {
    i.run_until(|i| match i.state() {
        PublicState::Connecting => false,
        PublicState::Negotiating => !i.conn().direction().wants_write(),
        _ => true,
    })?;
    i.ended().map_or(Ok(0), Err)
}

/// Starts connecting the transport, recording it for `nbd_get_uri`. A
/// transport that fails leaves the handle dead, as in libnbd.
fn connect_transport(i: &mut Handle, t: Transport) -> CResult<()> {
    let (addrs, tcp) = match &t {
        Transport::Unix { socket } => (vec![Address::unix(socket)?], None),
        Transport::Tcp { host, port } => (Address::resolve(host, port)?, Some(format!("{host}:{port}"))),
        Transport::Vsock { cid, port } => (vec![Address::vsock(*cid, *port)?], None),
    };
    i.connected_via_mut().transport = Some(t);
    i.dial(addrs, tcp)
}

fn connect_unix(i: &mut Handle, path: *const c_char) -> CResult<()> {
    let socket = arg_str(path, "unixsocket")?;
    connect_transport(i, Transport::Unix { socket })
}

fn connect_tcp(i: &mut Handle, host: *const c_char, port: *const c_char) -> CResult<()> {
    let host = arg_str(host, "hostname")?;
    let port = arg_str(port, "port")?;
    connect_transport(i, Transport::Tcp { host, port })
}

fn connect_vsock(i: &mut Handle, cid: u32, port: u32) -> CResult<()> {
    connect_transport(i, Transport::Vsock { cid, port })
}

fn connect_uri(i: &mut Handle, uri: *const c_char) -> CResult<()> {
    let text = arg_str(uri, "uri")?;
    let u = uri::parse(&text)?;
    if u.transport.allow_bit() & i.settings().uri_allow_transports == 0 {
        return Err(CError::new(libc::EPERM, "URI transport is not permitted"));
    }
    match (u.tls, i.settings().uri_allow_tls) {
        (true, 0) => return Err(CError::new(libc::EPERM, "URI requests TLS, but TLS is not permitted")),
        (false, 2) => return Err(CError::new(libc::EPERM, "URI does not request TLS, but TLS is required")),
        _ => {}
    }
    if (u.tls_psk_file.is_some() || u.tls_certificates.is_some()) && !i.settings().uri_allow_local_file {
        return Err(CError::new(libc::EPERM, "local file access (tls-certificates or tls-psk-file) is not allowed"));
    }
    i.change_beside_writer(|s| {
        s.multi_conn = u.multi_conn.unwrap_or(s.multi_conn);
        s.reconnect_delay = u.reconnect_delay.unwrap_or(s.reconnect_delay);
        s.open_timeout = u.open_timeout.unwrap_or(s.open_timeout);
    })?;
    if u.tls {
        i.conn_mut().config_mut()?.tls = nbd_proto::TlsMode::Require;
    }
    let t = &mut i.settings_mut().tls;
    t.certificates = u.tls_certificates.map(Into::into).or(t.certificates.take());
    t.psk_file = u.tls_psk_file.map(Into::into).or(t.psk_file.take());
    t.username = u.username.or(t.username.take());
    t.verify_peer = u.tls_verify_peer.unwrap_or(t.verify_peer);
    if u.tls_hostname.is_some() {
        i.settings_mut().tls_hostname = u.tls_hostname;
    }
    i.conn_mut().config_mut()?.set_export_name(&u.export)?;
    connect_transport(i, u.transport)
}

fn connect_socket(i: &mut Handle, sock: c_int) -> CResult<()> {
    if sock < 0 {
        return Err(CError::new(libc::EBADF, "invalid socket"));
    }
    i.refuse_one_channel("a socket the handle is given")?;
    i.refuse_redial("a socket the handle is given")?;
    i.conn_mut().start_connect()?;
    // SAFETY: the caller hands the connected socket over to the handle,
    // which owns it from now on (libnbd's contract).
    let fd = unsafe { OwnedFd::from_raw_fd(sock) };
    i.link_mut().attach(fd)
}

#[no_mangle]
pub extern "C" fn nbd_connect_unix(h: *mut nbd_handle, path: *const c_char) -> c_int {
    export!("nbd_connect_unix", h, -1, [unixsocket = path], |i| {
        connect_unix(i, path)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_unix(h: *mut nbd_handle, path: *const c_char) -> c_int {
    export!("nbd_aio_connect_unix", h, -1, [unixsocket = path], |i| connect_unix(i, path).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_connect_tcp(h: *mut nbd_handle, host: *const c_char, port: *const c_char) -> c_int {
    export!("nbd_connect_tcp", h, -1, [hostname = host, port], |i| {
        connect_tcp(i, host, port)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_tcp(h: *mut nbd_handle, host: *const c_char, port: *const c_char) -> c_int {
    export!("nbd_aio_connect_tcp", h, -1, [hostname = host, port], |i| connect_tcp(i, host, port).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_connect_socket(h: *mut nbd_handle, sock: c_int) -> c_int {
    export!("nbd_connect_socket", h, -1, [sock], |i| {
        connect_socket(i, sock)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_socket(h: *mut nbd_handle, sock: c_int) -> c_int {
    export!("nbd_aio_connect_socket", h, -1, [sock], |i| connect_socket(i, sock).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_connect_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int {
    export!("nbd_connect_uri", h, -1, [uri], |i| {
        connect_uri(i, uri)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int {
    export!("nbd_aio_connect_uri", h, -1, [uri], |i| connect_uri(i, uri).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_connect_vsock(h: *mut nbd_handle, cid: u32, port: u32) -> c_int {
    export!("nbd_connect_vsock", h, -1, [cid, port], |i| {
        connect_vsock(i, cid, port)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_vsock(h: *mut nbd_handle, cid: u32, port: u32) -> c_int {
    export!("nbd_aio_connect_vsock", h, -1, [cid, port], |i| connect_vsock(i, cid, port).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_supports_uri(h: *mut nbd_handle) -> c_int {
    export!("nbd_supports_uri", h, -1, [], |_i| Ok(1))
}

/// The URI schemes `nbd_is_uri` recognises, by prefix, in any case.
const URI_PREFIXES: [&str; 8] =
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://", "nbd+ssh://", "nbds+ssh://"];

#[no_mangle]
pub extern "C" fn nbd_is_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int {
    export!("nbd_is_uri", h, -1, [uri], |_i| {
        let uri = arg_str(uri, "uri")?;
        let is = URI_PREFIXES.iter().any(|p| uri.get(..p.len()).is_some_and(|head| head.eq_ignore_ascii_case(p)));
        Ok(c_int::from(is))
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_uri(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_uri", h, std::ptr::null_mut(), [], |i| {
        let via = i.connected_via();
        let t = match (&via.transport, &via.address) {
            (Some(t), _) => t,
            (None, Some(from_address)) => from_address.as_ref().map_err(Clone::clone)?,
            (None, None) => {
                return Err(CError::new(
                    libc::EINVAL,
                    "cannot construct a URI for this connection type (a socket or a command the handle was given)",
                ))
            }
        };
        let tls = i.conn().tls_negotiated() || i.conn().config().tls == nbd_proto::TlsMode::Require;
        let s = &i.settings().tls;
        let mut files = Vec::new();
        if let Some(d) = &s.certificates {
            files.push(("tls-certificates", d.to_string_lossy()));
        }
        if let Some(f) = &s.psk_file {
            files.push(("tls-psk-file", f.to_string_lossy()));
        }
        if let Some(h) = &i.settings().tls_hostname {
            files.push(("tls-hostname", h.into()));
        }
        // As libnbd 1.22 writes it, whether TLS is used or not.
        if !s.verify_peer {
            files.push(("tls-verify-peer", "false".into()));
        }
        let n = i.settings().multi_conn;
        if n > 1 {
            files.push(("multi-conn", n.to_string().into()));
        }
        for (name, s) in
            [("reconnect-delay", i.settings().reconnect_delay), ("open-timeout", i.settings().open_timeout)]
        {
            if s > 0 {
                files.push((name, s.to_string().into()));
            }
        }
        let files: Vec<(&str, &str)> = files.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        super::c_string(&uri::format(tls, t, i.conn().config().export_name(), s.username.as_deref(), &files))
    })
}

#[no_mangle]
pub extern "C" fn nbd_set_uri_allow_transports(h: *mut nbd_handle, mask: u32) -> c_int {
    export!("nbd_set_uri_allow_transports", h, -1, [mask = Hex(mask)], |i| {
        if mask & !crate::constants::LIBNBD_ALLOW_TRANSPORT_MASK != 0 {
            return Err(CError::new(libc::EINVAL, format!("invalid value for mask: {mask:#x}")));
        }
        i.settings_mut().uri_allow_transports = mask;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_set_uri_allow_tls(h: *mut nbd_handle, tls: c_int) -> c_int {
    export!("nbd_set_uri_allow_tls", h, -1, [tls], |i| {
        if !(0..=2).contains(&tls) {
            return Err(CError::new(libc::EINVAL, format!("invalid value for tls: {tls}")));
        }
        i.settings_mut().uri_allow_tls = tls;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_set_uri_allow_local_file(h: *mut nbd_handle, allow: bool) -> c_int {
    export!("nbd_set_uri_allow_local_file", h, -1, [allow], |i| {
        i.settings_mut().uri_allow_local_file = allow;
        Ok(0)
    })
}

fn connect_command(i: &mut Handle, argv: *mut *mut c_char) -> CResult<()> {
    // SAFETY: argv is NULL or a NULL-terminated array of C strings (the C contract).
    let argv = unsafe { crate::subprocess::argv_from_c(argv) }?;
    i.refuse_one_channel("a command's stdin and stdout")?;
    i.prepare_reconnect(Redial::Command { argv: argv.clone() })?;
    i.conn_mut().start_connect()?;
    let (fd, pid) = crate::subprocess::spawn_command(&argv).inspect_err(|e| {
        i.conn_mut().handle_transport_error(e.errno, "connect_command");
    })?;
    i.link_mut().attach_subprocess(fd, Subprocess { pid, scratch: None })
}

fn connect_activated(i: &mut Handle, argv: *mut *mut c_char) -> CResult<()> {
    // SAFETY: as for connect_command.
    let argv = unsafe { crate::subprocess::argv_from_c(argv) }?;
    i.refuse_one_channel("a socket-activated server")?;
    let fdname = i.settings().socket_activation_name.clone();
    i.prepare_reconnect(Redial::Activation { argv: argv.clone(), fdname })?;
    i.conn_mut().start_connect()?;
    let (fd, pid, dir) =
        crate::subprocess::spawn_activated(&argv, &i.settings().socket_activation_name).inspect_err(|e| {
            i.conn_mut().handle_transport_error(e.errno, "connect_systemd_socket_activation");
        })?;
    let socket = crate::subprocess::activation_socket(&dir).to_string_lossy().into_owned();
    i.connected_via_mut().address = Some(Ok(Transport::Unix { socket }));
    i.link_mut().attach_subprocess(fd, Subprocess { pid, scratch: Some(dir) })
}

fn connect_sockaddr(i: &mut Handle, addr: *const libc::sockaddr, len: libc::socklen_t) -> CResult<()> {
    if addr.is_null() {
        return Err(CError::new(libc::EFAULT, "addr cannot be NULL"));
    }
    // SAFETY: `addr` points at a sockaddr of `len` bytes (C contract).
    let a = unsafe { Address::from_raw(addr, len) }?;
    i.connected_via_mut().address = Some(a.transport());
    i.dial(vec![a], None)
}

#[no_mangle]
pub extern "C" fn nbd_connect_command(h: *mut nbd_handle, argv: *mut *mut c_char) -> c_int {
    export!("nbd_connect_command", h, -1, [argv], |i| {
        connect_command(i, argv)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_command(h: *mut nbd_handle, argv: *mut *mut c_char) -> c_int {
    export!("nbd_aio_connect_command", h, -1, [argv], |i| connect_command(i, argv).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_connect_systemd_socket_activation(h: *mut nbd_handle, argv: *mut *mut c_char) -> c_int {
    export!("nbd_connect_systemd_socket_activation", h, -1, [argv], |i| {
        connect_activated(i, argv)?;
        finish_connect(i)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect_systemd_socket_activation(h: *mut nbd_handle, argv: *mut *mut c_char) -> c_int {
    export!("nbd_aio_connect_systemd_socket_activation", h, -1, [argv], |i| connect_activated(i, argv).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_connect(h: *mut nbd_handle, addr: *const libc::sockaddr, len: libc::socklen_t) -> c_int {
    export!("nbd_aio_connect", h, -1, [addr = SockAddr, addrlen = len], |i| connect_sockaddr(i, addr, len).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_kill_subprocess(h: *mut nbd_handle, signum: c_int) -> c_int {
    export!("nbd_kill_subprocess", h, -1, [signum], |i| {
        if signum < 0 {
            return Err(CError::new(libc::EINVAL, format!("invalid signal number: {signum}")));
        }
        let Some(pid) = i.subprocess_pid() else {
            return Err(CError::new(libc::ESRCH, "no subprocess"));
        };
        let sig = if signum == 0 { libc::SIGTERM } else { signum };
        // Like libnbd, only signal: the child is reaped at nbd_close, after
        // the socket is closed, so a server that drains first cannot hang us.
        // SAFETY: signalling our own child, not yet reaped.
        if unsafe { libc::kill(pid, sig) } < 0 {
            return Err(CError::last_os("kill"));
        }
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::super::settings::nbd_set_tls_verify_peer;
    use super::*;
    use crate::api::handle::{nbd_close, nbd_create};
    use std::ffi::CStr;

    /// The URI of a handle connected with `nbd_aio_connect` to a Unix
    /// socket address, with peer verification turned off.
    #[test]
    fn get_uri_names_a_raw_address_and_peer_verification_off() {
        let dir = std::env::temp_dir().join(format!("nbd-capi-get-uri-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let text = path.to_str().unwrap();
        assert!(text.len() < 100, "the socket path must fit a sockaddr_un");
        // SAFETY: all-zero is a valid sockaddr_un.
        let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sun.sun_path.iter_mut().zip(text.bytes()) {
            *d = s as c_char;
        }

        let h = nbd_create();
        assert_eq!(nbd_set_tls_verify_peer(h, false), 0);
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(nbd_aio_connect(h, (&sun as *const libc::sockaddr_un).cast(), len), 0);
        let uri = nbd_get_uri(h);
        assert!(!uri.is_null());
        // SAFETY: a NUL-terminated string from nbd_get_uri, freed once below.
        let got = unsafe { CStr::from_ptr(uri) }.to_string_lossy().into_owned();
        // SAFETY: nbd_get_uri's result is the caller's to free.
        unsafe { libc::free(uri.cast()) };
        // SAFETY: `h` came from nbd_create and is closed once.
        unsafe { nbd_close(h) };
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got, format!("nbd+unix:///?socket={text}&tls-verify-peer=false"));
    }
}
