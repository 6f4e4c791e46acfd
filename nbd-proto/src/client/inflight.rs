//! The commands a connection has accepted and not yet completed.

use crate::error::Error;
use crate::flags::CmdFlags;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// One accepted command. Slots are recycled, so the vectors inside keep
/// their capacity and a steady stream of commands allocates nothing.
#[derive(Debug)]
pub(crate) struct Command<B> {
    pub cookie: u64,
    pub kind: u16,
    pub flags: CmdFlags,
    pub offset: u64,
    pub length: u64,
    pub buf: Option<B>,
    /// Where the request starts in the outgoing stream.
    pub queued_at: u64,
    /// The request (header and payload) has left in full.
    pub sent: bool,
    pub report_chunks: bool,
    /// The first error the reply carried.
    pub error: Option<Error>,
    /// Any structured chunk arrived for this command.
    pub chunked: bool,
    pub content_chunks: u32,
    pub coverage: Coverage,
    /// Meta context ids already answered in this reply.
    pub contexts_seen: Vec<u32>,
    /// The request's payload other than WRITE data (a block status
    /// filter), kept to send again after a reconnect.
    pub payload: Vec<u8>,
    /// Receive buffer bytes its reply is expected to take.
    expect: usize,
}

impl<B> Command<B> {
    fn empty() -> Self {
        Command {
            cookie: 0,
            kind: 0,
            flags: CmdFlags::empty(),
            offset: 0,
            length: 0,
            buf: None,
            queued_at: 0,
            sent: false,
            report_chunks: false,
            error: None,
            chunked: false,
            content_chunks: 0,
            coverage: Coverage::default(),
            contexts_seen: Vec::new(),
            payload: Vec::new(),
            expect: 0,
        }
    }

    /// Forgets what arrived of its reply and that it was sent: it will
    /// be sent again, on a new transport.
    pub fn forget_reply(&mut self) {
        self.sent = false;
        self.error = None;
        self.chunked = false;
        self.content_chunks = 0;
        self.coverage.clear();
        self.contexts_seen.clear();
    }

    /// Keeps the first error: it is the one the command reports.
    pub fn record_error(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

/// Byte ranges of a read already delivered, kept sorted and merged, so
/// that overlap and full coverage are checked exactly.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    ranges: Vec<(u64, u64)>,
    covered: u64,
}

impl Coverage {
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.covered = 0;
    }

    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Adds `[start, end)`; `false` if it overlaps what is already there.
    pub fn add(&mut self, start: u64, end: u64) -> bool {
        let i = self.ranges.partition_point(|&(s, _)| s < start);
        if i > 0 && self.ranges[i - 1].1 > start {
            return false;
        }
        if i < self.ranges.len() && self.ranges[i].0 < end {
            return false;
        }
        self.covered += end - start;
        let joins_prev = i > 0 && self.ranges[i - 1].1 == start;
        let joins_next = i < self.ranges.len() && self.ranges[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = start,
            (false, false) => self.ranges.insert(i, (start, end)),
        }
        true
    }
}

/// Cookies are our own sequence numbers, so a multiplicative hash spreads
/// them well without SipHash's cost on the hot path.
#[derive(Default)]
pub(crate) struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Slots an idle connection keeps: more are given back.
const IDLE_SLOTS: usize = 4;

/// Slab of commands indexed by cookie.
#[derive(Debug)]
pub(crate) struct InFlight<B> {
    slots: Vec<Command<B>>,
    free: Vec<usize>,
    by_cookie: HashMap<u64, usize, BuildHasherDefault<CookieHasher>>,
    /// Receive buffer bytes the replies of the live commands are
    /// expected to take: the sum of what [`Self::insert`] was told.
    expected: usize,
}

impl<B> Default for InFlight<B> {
    fn default() -> Self {
        InFlight { slots: Vec::new(), free: Vec::new(), by_cookie: HashMap::default(), expected: 0 }
    }
}

impl<B> InFlight<B> {
    pub fn len(&self) -> usize {
        self.by_cookie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cookie.is_empty()
    }

    /// A fresh slot for `cookie`, reset but with its old capacity; its
    /// reply is expected to take `expect` bytes of the receive buffer.
    pub fn insert(&mut self, cookie: u64, expect: usize) -> usize {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Command::empty());
                self.slots.len() - 1
            }
        };
        let c = &mut self.slots[slot];
        c.cookie = cookie;
        c.buf = None;
        c.sent = false;
        c.report_chunks = false;
        c.error = None;
        c.chunked = false;
        c.content_chunks = 0;
        c.coverage.clear();
        c.contexts_seen.clear();
        c.expect = expect;
        self.expected = self.expected.saturating_add(expect);
        self.by_cookie.insert(cookie, slot);
        slot
    }

    /// What the replies of the live commands are expected to take.
    pub fn expected(&self) -> usize {
        self.expected
    }

    pub fn slot_of(&self, cookie: u64) -> Option<usize> {
        self.by_cookie.get(&cookie).copied()
    }

    pub fn get(&self, slot: usize) -> &Command<B> {
        &self.slots[slot]
    }

    pub fn get_mut(&mut self, slot: usize) -> &mut Command<B> {
        &mut self.slots[slot]
    }

    /// Retires a command, handing back what the caller lent it.
    pub fn remove(&mut self, slot: usize) -> (u64, Option<Error>, Option<B>) {
        let c = &mut self.slots[slot];
        self.by_cookie.remove(&c.cookie);
        self.expected = self.expected.saturating_sub(c.expect);
        self.free.push(slot);
        (c.cookie, c.error.take(), c.buf.take())
    }

    /// With no command live, gives back the slots (and what their
    /// vectors hold) beyond the few that one command at a time reuses.
    pub fn shrink_idle(&mut self) {
        if !self.by_cookie.is_empty() || self.slots.len() <= IDLE_SLOTS {
            return;
        }
        self.slots.truncate(IDLE_SLOTS);
        self.slots.shrink_to(IDLE_SLOTS);
        self.free.clear();
        self.free.extend(0..IDLE_SLOTS);
        self.free.shrink_to(IDLE_SLOTS);
        self.by_cookie.shrink_to(IDLE_SLOTS);
        self.expected = 0;
    }

    /// Slots allocated, live or free.
    #[cfg(test)]
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Every live slot, in no particular order.
    pub fn live_slots(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.by_cookie.values().copied().collect();
        v.sort_unstable_by_key(|&s| self.slots[s].cookie);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::{Coverage, InFlight, IDLE_SLOTS};

    #[test]
    fn an_idle_slab_gives_back_what_a_burst_grew() {
        let mut f: InFlight<Vec<u8>> = InFlight::default();
        let slots: Vec<usize> = (1..=64).map(|cookie| f.insert(cookie, 100 + cookie as usize)).collect();
        assert_eq!(f.expected(), 64 * 100 + 64 * 65 / 2);
        f.shrink_idle();
        assert_eq!(f.slot_count(), 64, "nothing given back while commands are live");
        for &s in &slots[..63] {
            f.remove(s);
        }
        assert_eq!(f.expected(), 164);
        f.shrink_idle();
        assert_eq!(f.slot_count(), 64);
        f.remove(slots[63]);
        assert_eq!(f.expected(), 0);
        f.shrink_idle();
        assert_eq!(f.slot_count(), IDLE_SLOTS);
        // The slots kept are reused, then new ones added.
        let again: Vec<usize> = (100..110).map(|cookie| f.insert(cookie, 1)).collect();
        assert_eq!(f.slot_count(), 10);
        let mut sorted = again.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        for (i, &s) in again.iter().enumerate() {
            assert_eq!(f.slot_of(100 + i as u64), Some(s));
            assert_eq!(f.get(s).cookie, 100 + i as u64);
        }
        assert_eq!(f.expected(), 10);
    }

    #[test]
    fn coverage_merges_and_rejects_overlap() {
        let mut c = Coverage::default();
        assert!(c.add(10, 20));
        assert!(c.add(0, 10));
        assert!(c.add(30, 40));
        assert!(!c.add(15, 25));
        assert!(!c.add(35, 36));
        assert!(!c.add(0, 1));
        assert!(c.add(20, 30));
        assert_eq!(c.covered(), 40);
        assert_eq!(c.ranges, vec![(0, 40)]);
    }
}
