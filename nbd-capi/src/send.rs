//! Sends on the connection's socket. A library must never raise SIGPIPE
//! in its caller: a peer that died mid-send is an EPIPE error for the
//! connection, not the end of the program. `write(2)` and `writev(2)`
//! cannot say so, so every send is a `sendmsg(2)` with MSG_NOSIGNAL.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// Sends as much of `bufs`, in order, as the socket takes without blocking.
pub fn send_vectored(sock: &UnixStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec (std guarantees it on Unix);
    // sendmsg only reads through the pointer.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len();
    // SAFETY: `msg` points at `bufs`, live for the call; the fd is open.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends as much of `buf` as the socket takes without blocking.
pub fn send(sock: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    send_vectored(sock, &[IoSlice::new(buf)])
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
        let err = send(&a, b"hello").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }

    #[test]
    fn vectored_sends_keep_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let n = send_vectored(&a, &[IoSlice::new(b"ab"), IoSlice::new(b""), IoSlice::new(b"cde")]).unwrap();
        assert_eq!(n, 5);
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(&got, b"abcde");
    }
}
