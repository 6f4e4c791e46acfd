//! The concurrent writer (`nbd_rs_set_concurrent_writer`): once a
//! connection reaches transmission, every byte the handle would send on
//! its socket is handed to a callback instead, whose thread writes it to
//! the socket while the handle's thread receives replies. `send(2)` and
//! `recv(2)` then run at once on one socket, as libnbd's 2019 design of
//! the same name described.
//!
//! The writer thread reports a failed send with
//! `nbd_rs_concurrent_writer_error`, which takes no handle lock (the
//! handle's thread may hold it for a whole poll): the error is an atomic,
//! and the socket is shut down so that a poll waiting for replies wakes.
//! The handle's thread then kills the connection with that errno.

use crate::error::{CError, CResult};
use nbd_io::{Recv, Socket, Transport, TransportError};
use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

/// `void writer (void *data, const void *buf, size_t len)`.
pub type WriterFn = Option<unsafe extern "C" fn(data: *mut c_void, buf: *const c_void, len: usize)>;

/// The writer a handle was given, shared between the handle (which calls
/// it under its lock) and whichever thread reports its errors.
pub struct ConcurrentWriter {
    callback: unsafe extern "C" fn(*mut c_void, *const c_void, usize),
    data: *mut c_void,
    /// The first errno the writer thread reported; 0 while none.
    error: AtomicI32,
    /// The socket the writer writes to, -1 while none: what a reported
    /// error shuts down. The socket is forgotten here before it closes,
    /// under this lock, so a shutdown never reaches a reused number.
    socket: Mutex<RawFd>,
}

// SAFETY: `data` is the caller's, passed back only to `callback`, which is
// called only with the handle locked; the other fields are thread-safe.
unsafe impl Send for ConcurrentWriter {}
// SAFETY: as for Send; from other threads only `fail` is reached, which
// touches the atomic and the mutex.
unsafe impl Sync for ConcurrentWriter {}

impl ConcurrentWriter {
    pub fn new(callback: WriterFn, data: *mut c_void) -> CResult<Self> {
        let callback = callback.ok_or_else(|| CError::new(libc::EFAULT, "writer cannot be NULL"))?;
        Ok(ConcurrentWriter { callback, data, error: AtomicI32::new(0), socket: Mutex::new(-1) })
    }

    /// Hands `bytes` to the writer, which copies them before it returns.
    fn hand(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // SAFETY: the caller's writer, with its data, and a buffer valid
        // for the call (the documented lifetime of `buf`).
        unsafe { (self.callback)(self.data, bytes.as_ptr().cast(), bytes.len()) }
    }

    /// The errno the writer thread reported, if any.
    pub fn error(&self) -> Option<i32> {
        match self.error.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    /// The writer thread failed to send with `err`: the first error is
    /// kept, and the socket is shut down so the handle's thread, which
    /// may be waiting for replies that will never come, wakes to see it.
    pub fn fail(&self, err: c_int) -> CResult<()> {
        if err <= 0 {
            return Err(CError::new(libc::EINVAL, format!("invalid error: {err} (an errno must be positive)")));
        }
        let _ = self.error.compare_exchange(0, err, Ordering::AcqRel, Ordering::Acquire);
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        if *socket >= 0 {
            // SAFETY: the open socket: it is forgotten under this lock,
            // held here, before it closes. shutdown(2) leaves the
            // descriptor open.
            unsafe { libc::shutdown(*socket, libc::SHUT_RDWR) };
        }
        Ok(())
    }

    fn set_socket(&self, fd: RawFd) {
        *self.socket.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }
}

/// The bottom of a link's byte stream: its socket, whose sends go to the
/// concurrent writer once it has taken over.
pub struct Wire {
    sock: Socket,
    writer: Option<Arc<ConcurrentWriter>>,
    /// Small pieces (headers, small payloads) gathered into one hand-over.
    staged: Vec<u8>,
}

/// Pieces shorter than this are gathered, so that a burst of small
/// requests reaches the writer, and the socket, in one piece.
const GATHER_BELOW: usize = 16 * 1024;

impl From<Socket> for Wire {
    fn from(sock: Socket) -> Self {
        Wire { sock, writer: None, staged: Vec::new() }
    }
}

impl Wire {
    pub fn socket(&self) -> &Socket {
        &self.sock
    }

    /// Sends go to `writer` from now on. Whatever the socket took before
    /// is ahead of anything the writer will write.
    pub fn hand_over(&mut self, writer: Arc<ConcurrentWriter>) {
        writer.set_socket(self.sock.as_raw_fd());
        self.writer = Some(writer);
    }

    pub fn writes_elsewhere(&self) -> bool {
        self.writer.is_some()
    }

    fn forget_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.set_socket(-1);
        }
    }

    /// Ends the connection's traffic but keeps the descriptor: the writer
    /// thread may still hold its number, which must not be reused.
    pub fn shut_down(&self) {
        // SAFETY: shutdown(2) on the socket this wire owns.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.forget_writer();
    }
}

impl Transport for Wire {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn send(&mut self, bufs: &[&[u8]]) -> Result<usize, TransportError> {
        let Some(w) = &self.writer else { return self.sock.send(bufs) };
        if w.error().is_some() {
            return Ok(0);
        }
        self.staged.clear();
        for b in bufs {
            if b.len() < GATHER_BELOW {
                self.staged.extend_from_slice(b);
                continue;
            }
            w.hand(&self.staged);
            self.staged.clear();
            w.hand(b);
        }
        w.hand(&self.staged);
        Ok(bufs.iter().map(|b| b.len()).sum())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Recv, TransportError> {
        let r = self.sock.recv(buf);
        // The writer's error shut the socket down: what the receive saw of
        // that is not the connection's end, the error is (see
        // `Link::writer_failed`).
        match (&self.writer, &r) {
            (Some(w), Ok(Recv::Eof) | Err(_)) if w.error().is_some() => Ok(Recv::WouldBlock),
            _ => r,
        }
    }
}
