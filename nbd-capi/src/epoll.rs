//! The one descriptor of a multi-conn handle: an epoll instance over its
//! links' sockets, each registered for the directions its link waits
//! for. The instance is readable whenever any link can make progress,
//! so a caller's poll loop needs no change: it polls one descriptor for
//! reading, and `nbd_aio_notify_read` services every ready link.

use crate::error::{CError, CResult};
use std::ffi::c_int;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What a link is registered with: its socket and the epoll events.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Registration {
    fd: c_int,
    /// The link's socket serial: a new socket may have a closed one's
    /// number, which closing removed from the instance.
    serial: u64,
    events: u32,
}

pub struct Epoll {
    fd: OwnedFd,
    /// By link index: what each link is registered with now.
    registered: Vec<Option<Registration>>,
}

/// A link that is ready: its index, and whether to read and to write.
pub struct Ready {
    pub link: usize,
    pub read: bool,
    pub write: bool,
}

impl Epoll {
    pub fn new() -> CResult<Self> {
        // SAFETY: epoll_create1(2), checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(CError::last_os("epoll_create1"));
        }
        // SAFETY: a fresh descriptor that we own from now on.
        Ok(Epoll { fd: unsafe { OwnedFd::from_raw_fd(fd) }, registered: Vec::new() })
    }

    pub fn fd(&self) -> c_int {
        self.fd.as_raw_fd()
    }

    fn ctl(&self, op: c_int, fd: c_int, events: u32, link: usize) -> c_int {
        let mut ev = libc::epoll_event { events, u64: link as u64 };
        // SAFETY: epoll_ctl(2) on our instance with a valid event struct.
        unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }
    }

    /// Link `link` has socket `fd` (-1 without one), its socket number
    /// `serial`, and waits for `direction` (`LIBNBD_AIO_DIRECTION_*`
    /// bits): registers, changes or removes it, with a system call only
    /// when something changed. Every socket is watched for reading (the
    /// read bit changes with every command; watching it always saves a
    /// system call each time); writing only when asked.
    pub fn update(&mut self, link: usize, fd: c_int, serial: u64, direction: u32) {
        if self.registered.len() <= link {
            self.registered.resize(link + 1, None);
        }
        let mut events = libc::EPOLLIN as u32;
        if direction & 2 != 0 {
            events |= libc::EPOLLOUT as u32;
        }
        let want = (fd >= 0).then_some(Registration { fd, serial, events });
        let had = self.registered[link];
        if had == want {
            return;
        }
        match (had, want) {
            (Some(old), Some(new)) if old.fd == new.fd && old.serial == new.serial => {
                if self.ctl(libc::EPOLL_CTL_MOD, new.fd, new.events, link) < 0 {
                    // Closed and reopened under the same number: add it.
                    self.ctl(libc::EPOLL_CTL_ADD, new.fd, new.events, link);
                }
            }
            (old, new) => {
                if let Some(old) = old {
                    // Fails harmlessly if the socket was closed already
                    // (closing removed it).
                    self.ctl(libc::EPOLL_CTL_DEL, old.fd, 0, link);
                }
                if let Some(new) = new {
                    if self.ctl(libc::EPOLL_CTL_ADD, new.fd, new.events, link) < 0 {
                        self.ctl(libc::EPOLL_CTL_MOD, new.fd, new.events, link);
                    }
                }
            }
        }
        self.registered[link] = want;
    }

    /// Watches `fd` (a timer) for reading; it is reported ready as link
    /// `usize::MAX`, which no link has.
    pub fn watch_timer(&mut self, fd: c_int) -> CResult<()> {
        if self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, usize::MAX) < 0 {
            return Err(CError::last_os("epoll_ctl"));
        }
        Ok(())
    }

    /// The links ready now, without waiting.
    pub fn ready(&self) -> Vec<Ready> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        // SAFETY: epoll_wait(2) into an array of `evs.len()` entries, no waiting.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), evs.len() as c_int, 0) };
        let n = usize::try_from(n).unwrap_or(0);
        evs[..n]
            .iter()
            .map(|e| {
                let bits = e.events;
                let read = bits & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                Ready { link: e.u64 as usize, read, write: bits & libc::EPOLLOUT as u32 != 0 }
            })
            .collect()
    }
}
