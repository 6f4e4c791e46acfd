//! Received bytes not yet parsed.

/// The receive buffer starts at this size and grows only when one parse
/// step needs more contiguous bytes than it holds.
const INITIAL_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Default)]
pub(crate) struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Contiguous bytes the parser needs before it can step again.
    want: usize,
}

impl Input {
    pub fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Records that parsing cannot continue before `n` bytes are available.
    pub fn want(&mut self, n: usize) {
        self.want = n;
    }

    /// Free space to receive into: compacts, and grows the buffer (at most
    /// doubling, so a peer cannot make us allocate much more than it sent)
    /// when the parser needs more than fits.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0; INITIAL_CAPACITY];
        }
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() && self.want > self.buf.len() {
            let grown = self.want.min(self.buf.len() * 2);
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written into the slice [`Self::spare`] returned.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.want = 0;
    }
}
