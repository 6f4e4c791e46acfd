//! The plain socket transport: a connected stream socket (Unix, TCP or
//! vsock), non-blocking in the C library.

use crate::{Recv, Transport, TransportError};
use rustix::net::{SendAncillaryBuffer, SendFlags};
use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// A connected stream socket. Sends use `MSG_NOSIGNAL`: a library never
/// raises SIGPIPE in its caller, whose disposition it does not own; a
/// peer that went away is EPIPE.
#[derive(Debug)]
pub struct Socket {
    // std's UnixStream is only the owner of the descriptor and its
    // read(2): it works for any stream socket family.
    stream: UnixStream,
}

impl Socket {
    /// Sets or clears `O_NONBLOCK`.
    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        self.stream.set_nonblocking(on)
    }
}

impl From<OwnedFd> for Socket {
    fn from(fd: OwnedFd) -> Self {
        Socket { stream: UnixStream::from(fd) }
    }
}

impl From<UnixStream> for Socket {
    fn from(stream: UnixStream) -> Self {
        Socket { stream }
    }
}

impl From<Socket> for OwnedFd {
    fn from(s: Socket) -> Self {
        OwnedFd::from(s.stream)
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// One vectored `sendmsg(2)` with `MSG_NOSIGNAL` of as much of `bufs`
/// (the first 64) as the socket takes.
pub fn send(sock: impl AsFd, bufs: &[&[u8]]) -> std::io::Result<usize> {
    let mut iov: [IoSlice<'_>; 64] = [IoSlice::new(&[]); 64];
    let n = bufs.len().min(iov.len());
    for (slot, buf) in iov.iter_mut().zip(bufs) {
        *slot = IoSlice::new(buf);
    }
    let mut no_control = SendAncillaryBuffer::default();
    Ok(rustix::net::sendmsg(sock, &iov[..n], &mut no_control, SendFlags::NOSIGNAL)?)
}

impl Transport for Socket {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn send(&mut self, bufs: &[&[u8]]) -> Result<usize, TransportError> {
        loop {
            match send(&self.stream, bufs) {
                Ok(sent) => return Ok(sent),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(TransportError::os(&e, "send")),
            }
        }
    }

    /// One `read(2)`.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Recv, TransportError> {
        loop {
            return match self.stream.read(buf) {
                Ok(0) => Ok(Recv::Eof),
                Ok(n) => Ok(Recv::Data(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Recv::WouldBlock),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(TransportError::os(&e, "recv")),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A send to a closed peer is EPIPE. (Rust's runtime ignores SIGPIPE
    /// in this process; tests/c/compat-test.c, a C program with the
    /// default disposition, shows that no signal is raised.)
    #[test]
    fn a_send_to_a_closed_peer_is_epipe_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = Socket::from(a).send(&[b"hello"]).unwrap_err();
        assert_eq!(err, TransportError::new(rustix::io::Errno::PIPE.raw_os_error(), "send"));
    }

    #[test]
    fn vectored_sends_keep_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let n = Socket::from(a).send(&[b"ab", b"", b"cde"]).unwrap();
        assert_eq!(n, 5);
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcde");
    }

    #[test]
    fn a_full_socket_takes_nothing_and_an_empty_one_would_block() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Socket::from(a), Socket::from(b));
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        assert_eq!(b.recv(&mut [0; 8]), Ok(Recv::WouldBlock));
        let big = vec![0u8; 1 << 16];
        while a.send(&[&big]).unwrap() > 0 {}
        assert_eq!(a.send(&[b"x"]), Ok(0));
        drop(a);
        while b.recv(&mut [0; 1 << 16]).unwrap() != Recv::Eof {}
    }
}
