//! Reconnecting after a server restart (`nbd_rs_set_reconnect_delay`, the
//! URI's `reconnect-delay=S`), as qemu's NBD client does it: only a lost
//! transport triggers it, never a protocol violation; the first attempt
//! is made at once, the next after 1, 2, 4, 8 and then every 16 seconds.
//! Commands are held while the delay runs and fail once it has passed,
//! while the attempts go on. Each attempt redoes the whole handshake, and
//! the core checks that the export is the one it had.
//!
//! [`Outage`] is the policy for one link, with time passed in; [`Timer`]
//! is the timerfd that wakes the handle's epoll instance (and with it the
//! caller's poll loop) when the next step is due.

use crate::error::{CError, CResult};
use std::ffi::c_int;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The pause before attempt `n` (1 is the first retry after a failure).
fn backoff(failed: u32) -> Duration {
    Duration::from_secs(1 << failed.saturating_sub(1).min(4))
}

/// How long one attempt may take, dial and handshake: a server that
/// accepts and never answers must not end the attempts.
pub const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);

/// What is due for a lost link now.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    Nothing,
    /// Dial again and restart the handshake.
    Attempt,
    /// The attempt under way took too long: it failed.
    AttemptTimedOut,
    /// The delay has passed: fail the held commands, refuse new ones.
    GiveUp,
}

/// One link's outage, from the loss to the reconnect.
#[derive(Debug)]
pub struct Outage {
    lost_at: Instant,
    /// Attempts that failed so far.
    failed: u32,
    next_at: Instant,
    /// When the attempt under way started; `None` between attempts.
    attempting_since: Option<Instant>,
    gave_up: bool,
    /// Why the last attempt failed, for the debug log.
    pub last_error: Option<String>,
}

impl Outage {
    pub fn new(now: Instant) -> Self {
        Outage { lost_at: now, failed: 0, next_at: now, attempting_since: None, gave_up: false, last_error: None }
    }

    pub fn attempting(&self) -> bool {
        self.attempting_since.is_some()
    }

    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Attempts so far, the one under way included.
    pub fn attempts(&self) -> u32 {
        self.failed + u32::from(self.attempting())
    }

    /// What to do at `now`, given the reconnect delay; the caller does it
    /// and says so ([`Self::attempt_started`], [`Self::gave_up_now`]).
    pub fn due(&self, now: Instant, delay: Duration) -> Due {
        if !self.gave_up && now >= self.lost_at + delay {
            Due::GiveUp
        } else if self.attempting_since.is_some_and(|t| now >= t + ATTEMPT_LIMIT) {
            Due::AttemptTimedOut
        } else if !self.attempting() && now >= self.next_at {
            Due::Attempt
        } else {
            Due::Nothing
        }
    }

    pub fn attempt_started(&mut self, now: Instant) {
        self.attempting_since = Some(now);
    }

    pub fn gave_up_now(&mut self) {
        self.gave_up = true;
    }

    /// The attempt under way failed at `now`: the next waits its turn.
    pub fn attempt_failed(&mut self, now: Instant, why: String) {
        self.attempting_since = None;
        self.failed += 1;
        self.next_at = now + backoff(self.failed);
        self.last_error = Some(why);
    }

    /// When something is next due, if anything will be without news from
    /// the link.
    pub fn deadline(&self, delay: Duration) -> Option<Instant> {
        let give_up = (!self.gave_up).then_some(self.lost_at + delay);
        let attempt = (!self.attempting()).then_some(self.next_at);
        let timeout = self.attempting_since.map(|t| t + ATTEMPT_LIMIT);
        give_up.into_iter().chain(attempt).chain(timeout).min()
    }
}

/// A monotonic timerfd, armed for the next deadline of any outage.
pub struct Timer {
    fd: OwnedFd,
    armed: Option<Instant>,
}

impl Timer {
    pub fn new() -> CResult<Self> {
        // SAFETY: timerfd_create(2), checked.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(CError::last_os("timerfd_create"));
        }
        // SAFETY: a fresh descriptor that we own from now on.
        Ok(Timer { fd: unsafe { OwnedFd::from_raw_fd(fd) }, armed: None })
    }

    pub fn fd(&self) -> c_int {
        self.fd.as_raw_fd()
    }

    /// Fires at `at` (disarmed with `None`), relative to `now`. A time
    /// already passed fires at once.
    pub fn arm(&mut self, at: Option<Instant>, now: Instant) {
        if at == self.armed {
            return;
        }
        self.armed = at;
        // A zero it_value disarms; the smallest wait is 1 ns.
        let wait = at.map_or(Duration::ZERO, |t| t.saturating_duration_since(now).max(Duration::from_nanos(1)));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos().into() },
        };
        // SAFETY: timerfd_settime(2) on our timer with a valid spec.
        unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Clears a fire that happened, so the descriptor is no longer readable.
    pub fn clear(&mut self) {
        if self.armed.is_none() {
            return;
        }
        let mut n = [0u8; 8];
        // SAFETY: reading a timerfd's 8-byte counter into a buffer we own;
        // EAGAIN (not fired) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr().cast(), 8) };
        if n != [0; 8] {
            self.armed = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(30);

    #[test]
    fn the_first_attempt_is_at_once_then_1_2_4_8_16_16_seconds_apart() {
        let t0 = Instant::now();
        let mut o = Outage::new(t0);
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..7 {
            assert_eq!(o.due(now, Duration::from_secs(3600)), Due::Attempt);
            o.attempt_started(now);
            assert_eq!(o.due(now, Duration::from_secs(3600)), Due::Nothing, "one attempt at a time");
            o.attempt_failed(now, "refused".into());
            let next = o.deadline(Duration::from_secs(3600)).unwrap();
            gaps.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 16, 16]);
        assert_eq!(o.attempts(), 7);
    }

    #[test]
    fn the_delay_gives_up_once_and_attempts_go_on() {
        let t0 = Instant::now();
        let mut o = Outage::new(t0);
        o.attempt_started(t0 + DELAY - Duration::from_secs(1));
        assert_eq!(o.deadline(DELAY), Some(t0 + DELAY));
        assert_eq!(o.due(t0 + DELAY, DELAY), Due::GiveUp);
        o.gave_up_now();
        assert_eq!(o.due(t0 + DELAY, DELAY), Due::Nothing);
        assert_eq!(o.deadline(DELAY), Some(t0 + DELAY + Duration::from_secs(9)), "the attempt's own limit");
        assert_eq!(o.due(t0 + DELAY + Duration::from_secs(9), DELAY), Due::AttemptTimedOut);
        o.attempt_failed(t0 + DELAY, "refused".into());
        assert_eq!(o.due(t0 + DELAY + Duration::from_secs(16), DELAY), Due::Attempt);
    }

    #[test]
    fn a_timer_fires_and_clears() {
        let mut t = Timer::new().unwrap();
        let now = Instant::now();
        t.arm(Some(now), now);
        let mut p = libc::pollfd { fd: t.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 1000) }, 1);
        t.clear();
        p.revents = 0;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0);
        t.arm(Some(now + Duration::from_secs(60)), now);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 20) }, 0);
    }
}
