//! Non-blocking connects: `nbd_aio_connect*` return at once and the
//! connection completes in the caller's poll loop, as in libnbd. A TCP
//! connect tries each address `getaddrinfo` gives until one answers.

use crate::error::{CError, CResult};
use crate::uri::Transport;
use std::collections::VecDeque;
use std::ffi::{c_int, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One socket address, in the kernel's representation.
#[derive(Clone, Copy)]
pub struct Address {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl Address {
    /// Copies a caller's sockaddr of `len` bytes.
    ///
    /// # Safety
    /// `addr` must point at `len` readable bytes.
    pub unsafe fn from_raw(addr: *const libc::sockaddr, len: libc::socklen_t) -> CResult<Self> {
        let size = std::mem::size_of::<libc::sockaddr_storage>();
        if len as usize > size || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
            return Err(CError::new(libc::EINVAL, format!("invalid address length: {len}")));
        }
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: `len` bytes are readable at `addr` (caller) and fit in
        // `storage` (checked above); the regions cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(addr.cast::<u8>(), &mut storage as *mut _ as *mut u8, len as usize) };
        Ok(Address { storage, len })
    }

    pub fn unix(path: &str) -> CResult<Self> {
        // SAFETY: all-zero is a valid sockaddr_un.
        let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        if path.len() >= sun.sun_path.len() {
            return Err(CError::new(libc::ENAMETOOLONG, "socket name too long"));
        }
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sun.sun_path.iter_mut().zip(path.bytes()) {
            *d = s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: a sockaddr_un is `len` readable bytes.
        unsafe { Self::from_raw((&sun as *const libc::sockaddr_un).cast(), len) }
    }

    pub fn vsock(cid: u32, port: u32) -> CResult<Self> {
        // SAFETY: all-zero is a valid sockaddr_vm.
        let mut svm: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        svm.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        svm.svm_cid = cid;
        svm.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: a sockaddr_vm is `len` readable bytes.
        unsafe { Self::from_raw((&svm as *const libc::sockaddr_vm).cast(), len) }
    }

    /// Every stream address of `host`:`port` (a number or a service name).
    pub fn resolve(host: &str, port: &str) -> CResult<Vec<Self>> {
        let bad = |what| CError::new(libc::EINVAL, format!("{what} contains a NUL byte"));
        let (h, p) = (CString::new(host).map_err(|_| bad("hostname"))?, CString::new(port).map_err(|_| bad("port"))?);
        // SAFETY: all-zero addrinfo is valid hints; the fields are set below.
        let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
        hints.ai_family = libc::AF_UNSPEC;
        hints.ai_socktype = libc::SOCK_STREAM;
        hints.ai_flags = libc::AI_ADDRCONFIG;
        let mut list: *mut libc::addrinfo = std::ptr::null_mut();
        // SAFETY: NUL-terminated strings, valid hints, an out pointer.
        let r = unsafe { libc::getaddrinfo(h.as_ptr(), p.as_ptr(), &hints, &mut list) };
        if r != 0 {
            // SAFETY: gai_strerror returns a static NUL-terminated string.
            let why = unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(r)) }.to_string_lossy();
            // libnbd reports no errno here, only the resolver's reason.
            return Err(CError::new(0, format!("getaddrinfo: hostname \"{host}\" port \"{port}\": {why}")));
        }
        let mut out = Vec::new();
        let mut at = list;
        while !at.is_null() {
            // SAFETY: a node of the list getaddrinfo returned, freed below.
            let ai = unsafe { &*at };
            // SAFETY: ai_addr holds ai_addrlen bytes.
            if let Ok(a) = unsafe { Self::from_raw(ai.ai_addr, ai.ai_addrlen) } {
                out.push(a);
            }
            at = ai.ai_next;
        }
        // SAFETY: the list from getaddrinfo, freed once.
        unsafe { libc::freeaddrinfo(list) };
        Ok(out)
    }

    /// The address as `nbd_get_uri` names it, as libnbd does: a numeric
    /// host and port for IP, the socket path for Unix, CID and port for
    /// vsock; an abstract Unix socket or another family has no URI.
    pub fn transport(&self) -> CResult<Transport> {
        let p: *const libc::sockaddr_storage = &self.storage;
        match self.family() {
            libc::AF_INET => {
                // SAFETY: the family says `storage` holds a sockaddr_in.
                let sin = unsafe { &*p.cast::<libc::sockaddr_in>() };
                let host = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Ok(Transport::Tcp { host: host.to_string(), port: u16::from_be(sin.sin_port).to_string() })
            }
            libc::AF_INET6 => {
                // SAFETY: the family says `storage` holds a sockaddr_in6.
                let sin6 = unsafe { &*p.cast::<libc::sockaddr_in6>() };
                let host = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Ok(Transport::Tcp { host: host.to_string(), port: u16::from_be(sin6.sin6_port).to_string() })
            }
            libc::AF_UNIX => {
                // SAFETY: the family says `storage` holds a sockaddr_un.
                let sun = unsafe { &*p.cast::<libc::sockaddr_un>() };
                let offset = std::mem::offset_of!(libc::sockaddr_un, sun_path);
                let n = (self.len as usize).saturating_sub(offset).min(sun.sun_path.len());
                let path: Vec<u8> = sun.sun_path[..n].iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                if n > 0 && sun.sun_path[0] == 0 {
                    return Err(CError::new(
                        libc::EPROTONOSUPPORT,
                        "Unix domain sockets in the abstract namespace cannot be written as an NBD URI",
                    ));
                }
                Ok(Transport::Unix { socket: String::from_utf8_lossy(&path).into_owned() })
            }
            libc::AF_VSOCK => {
                // SAFETY: the family says `storage` holds a sockaddr_vm.
                let svm = unsafe { &*p.cast::<libc::sockaddr_vm>() };
                Ok(Transport::Vsock { cid: svm.svm_cid, port: svm.svm_port })
            }
            family => Err(CError::new(libc::EAFNOSUPPORT, format!("address family {family} not supported"))),
        }
    }

    fn family(&self) -> c_int {
        c_int::from(self.storage.ss_family)
    }
}

/// A connect in progress: the addresses left to try once the socket
/// being connected fails.
pub struct Dialing {
    pending: VecDeque<Address>,
    last_errno: i32,
    /// `host:port` for TCP, whose failure libnbd words differently and
    /// recovers from.
    tcp: Option<String>,
}

impl Dialing {
    pub fn new(addrs: Vec<Address>, tcp: Option<String>) -> Self {
        Dialing { pending: addrs.into(), last_errno: libc::ECONNREFUSED, tcp }
    }

    /// Starts connecting to the next address that does not fail at once,
    /// and returns the socket to wait on until it is writable.
    pub fn start_next(&mut self) -> CResult<OwnedFd> {
        while let Some(a) = self.pending.pop_front() {
            match start(&a) {
                Ok(d) => return Ok(d),
                Err(errno) => self.last_errno = errno,
            }
        }
        Err(self.exhausted())
    }

    /// The error once every address failed, in libnbd's words.
    fn exhausted(&self) -> CError {
        match &self.tcp {
            Some(name) => CError::new(self.last_errno, format!("connect: {name}: could not connect to remote host")),
            None => CError::new(self.last_errno, "connect"),
        }
    }

    /// Whether a failure leaves the handle dead (Unix, vsock, raw
    /// addresses) or lets it be connected again (TCP), as in libnbd.
    pub fn failure_is_fatal(&self) -> bool {
        self.tcp.is_none()
    }

    /// Whether the socket's connect has finished: `Ok` if connected, the
    /// errno it ended with otherwise (then move on with [`Self::start_next`]).
    /// `None` while it is still under way.
    pub fn check(&mut self, sock: &impl AsRawFd) -> Option<Result<(), i32>> {
        let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, no waiting.
        if unsafe { libc::poll(&mut pfd, 1, 0) } == 0 {
            return None;
        }
        let mut status: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one int into `status`.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut status as *mut c_int).cast(),
                &mut len,
            )
        };
        let status = if r < 0 { std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) } else { status };
        match status {
            0 => Some(Ok(())),
            libc::EINPROGRESS => None,
            e => {
                self.last_errno = e;
                Some(Err(e))
            }
        }
    }
}

/// socket(2) and a non-blocking connect(2); the errno if either fails.
fn start(a: &Address) -> Result<OwnedFd, i32> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    // SAFETY: socket(2), checked.
    let fd = unsafe { libc::socket(a.family(), libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `storage` holds a sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&a.storage as *const libc::sockaddr_storage).cast(), a.len) };
    if r == 0 {
        return Ok(sock);
    }
    match errno() {
        // Linux says EAGAIN when a Unix socket's backlog is full; it is
        // still connecting.
        libc::EINPROGRESS | libc::EAGAIN => Ok(sock),
        e => Err(e),
    }
}

/// Sets TCP_NODELAY on TCP sockets; small requests must not wait.
pub fn tune(sock: &impl AsRawFd) {
    // SAFETY: all-zero is a valid sockaddr_storage, filled by getsockname.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `ss`.
    let r = unsafe { libc::getsockname(sock.as_raw_fd(), (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) };
    let family = c_int::from(ss.ss_family);
    if r == 0 && (family == libc::AF_INET || family == libc::AF_INET6) {
        let one: c_int = 1;
        // SAFETY: TCP_NODELAY takes one int.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn raw<T>(sa: &T) -> Address {
        // SAFETY: `sa` is a whole sockaddr of its type's size.
        unsafe { Address::from_raw((sa as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t) }.unwrap()
    }

    fn tcp(host: &str, port: &str) -> Option<Transport> {
        Some(Transport::Tcp { host: host.into(), port: port.into() })
    }

    #[test]
    fn an_address_names_its_transport_for_a_uri() {
        let v4 = Address::resolve("127.0.0.1", "10809").unwrap();
        assert_eq!(v4[0].transport().ok(), tcp("127.0.0.1", "10809"));

        // SAFETY: all-zero is a valid sockaddr_in6.
        let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = 10810u16.to_be();
        sin6.sin6_addr.s6_addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets();
        assert_eq!(raw(&sin6).transport().ok(), tcp("fd00::1", "10810"));

        let unix = Address::unix("/tmp/nbd.sock").unwrap();
        assert_eq!(unix.transport().ok(), Some(Transport::Unix { socket: "/tmp/nbd.sock".into() }));
        assert_eq!(Address::vsock(3, 10809).unwrap().transport().ok(), Some(Transport::Vsock { cid: 3, port: 10809 }));

        // An abstract socket (leading NUL) and an unnamed one have no URI.
        // SAFETY: all-zero is a valid sockaddr_un.
        let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        sun.sun_path[1] = b'x' as libc::c_char;
        assert_eq!(raw(&sun).transport().ok(), None);
    }
}
