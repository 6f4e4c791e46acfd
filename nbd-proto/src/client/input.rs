//! Received bytes not yet parsed, in a buffer sized to the need.
//!
//! The buffer is allocated on the first receive, at the size the replies
//! in flight are expected to take ([`Input::spare`]'s hint), at least
//! [`MIN_CAPACITY`] and, for batching, at most [`MAX_CAPACITY`]. It grows
//! (doubling, up to [`MAX_CAPACITY`]) when a receive fills it, and beyond
//! that only when one message needs more contiguous bytes. An idle
//! connection gives a buffer larger than [`IDLE_CAPACITY`] back.

/// The smallest buffer: room for any reply header and the usual
/// handshake message.
pub(crate) const MIN_CAPACITY: usize = 1024;
/// The largest buffer for batching: one receive of this size parses many
/// replies. Only a single message larger than this grows it further.
pub(crate) const MAX_CAPACITY: usize = 64 * 1024;
/// An idle connection keeps a buffer of at most this size, so that one
/// command at a time does not allocate for each reply.
pub(crate) const IDLE_CAPACITY: usize = 8 * 1024;

#[derive(Debug, Default)]
pub(crate) struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Contiguous bytes the parser needs before it can step again.
    want: usize,
    /// The last receive filled the buffer: more was probably waiting.
    filled_up: bool,
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

    /// Free space to receive into. `hint` is what the replies expected
    /// are likely to take: the buffer grows to it (within
    /// [`MIN_CAPACITY`]..=[`MAX_CAPACITY`]), doubles up to
    /// [`MAX_CAPACITY`] after a receive that filled it, compacts when
    /// full, and grows past [`MAX_CAPACITY`] only when the parser needs
    /// more contiguous bytes than fit, at most doubling each time, so a
    /// peer cannot make us allocate much more than it sent.
    pub fn spare(&mut self, hint: usize) -> &mut [u8] {
        let len = self.buf.len();
        let mut target = hint.clamp(MIN_CAPACITY, MAX_CAPACITY);
        if std::mem::take(&mut self.filled_up) {
            target = target.max(len.saturating_mul(2).min(MAX_CAPACITY));
        }
        if self.end == len && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == len && self.want > len {
            target = target.max(self.want.min(len.saturating_mul(2)));
        }
        if target > len {
            self.buf.resize(target, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written into the slice [`Self::spare`] returned.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
        self.filled_up = self.end == self.buf.len();
    }

    /// The buffer's size now.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Gives back a buffer larger than [`IDLE_CAPACITY`], if it holds
    /// nothing: the next receive allocates what it needs then.
    pub fn shrink_idle(&mut self) {
        if self.start == self.end && self.buf.len() > IDLE_CAPACITY {
            *self = Input::default();
        }
    }

    /// Drops everything received, and the buffer (the connection is gone).
    pub fn clear(&mut self) {
        *self = Input::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives `bytes` as a transport would: as much as fits each time.
    fn receive(input: &mut Input, hint: usize, mut bytes: &[u8]) -> usize {
        let mut receives = 0;
        while !bytes.is_empty() {
            let dest = input.spare(hint);
            let n = dest.len().min(bytes.len());
            dest[..n].copy_from_slice(&bytes[..n]);
            input.filled(n);
            bytes = &bytes[n..];
            receives += 1;
        }
        receives
    }

    #[test]
    fn starts_small_and_sizes_to_the_hint() {
        let mut input = Input::default();
        assert_eq!(input.capacity(), 0, "nothing allocated before the first receive");
        assert_eq!(input.spare(0).len(), MIN_CAPACITY);
        assert_eq!(input.spare(4096 + 128).len(), 4096 + 128);
        assert_eq!(input.spare(1 << 30).len(), MAX_CAPACITY, "the hint is capped");
        // A smaller hint never shrinks a buffer in use.
        assert_eq!(input.spare(0).len(), MAX_CAPACITY);
    }

    #[test]
    fn grows_by_doubling_after_a_receive_that_filled_it() {
        let mut input = Input::default();
        let stream: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let dest = input.spare(0);
            sizes.push(dest.len());
            let n = dest.len().min(stream.len() - at);
            dest[..n].copy_from_slice(&stream[at..at + n]);
            input.filled(n);
            at += n;
            // The parser takes everything each time.
            got.extend_from_slice(input.available());
            let k = input.available().len();
            input.consume(k);
        }
        assert_eq!(got, stream);
        assert_eq!(&sizes[..8], [1024, 2048, 4096, 8192, 16384, 32768, 65536, 65536]);
    }

    #[test]
    fn a_large_message_in_pieces_grows_it_past_the_batching_size() {
        let mut input = Input::default();
        let message: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
        // The parser wants the whole message before it can step; pieces
        // of 1000 bytes arrive, however much room there is.
        input.want(message.len());
        for piece in message.chunks(1000) {
            let dest = input.spare(0);
            assert!(!dest.is_empty());
            let mut rest = piece;
            while !rest.is_empty() {
                let dest = input.spare(0);
                let n = dest.len().min(rest.len());
                dest[..n].copy_from_slice(&rest[..n]);
                input.filled(n);
                rest = &rest[n..];
            }
        }
        assert_eq!(input.available(), &message[..]);
        assert!(input.capacity() >= message.len());
        assert!(input.capacity() < 2 * message.len(), "at most doubling");
        // Not idle while the bytes are unparsed.
        input.shrink_idle();
        assert_eq!(input.available(), &message[..]);
        input.consume(message.len());
        input.shrink_idle();
        assert_eq!(input.capacity(), 0, "given back once parsed");
    }

    #[test]
    fn shrink_keeps_a_small_buffer_and_never_loses_bytes() {
        let mut input = Input::default();
        receive(&mut input, 4096 + 128, &[1; 4100]);
        input.consume(4100);
        input.shrink_idle();
        assert_eq!(input.capacity(), 4096 + 128, "small enough to keep");

        // A burst grows it; bytes left over survive any number of shrink
        // attempts and the regrowth after.
        let burst: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
        let mut parsed = Vec::new();
        let mut rest = &burst[..];
        while !rest.is_empty() {
            let dest = input.spare(MAX_CAPACITY);
            let n = dest.len().min(rest.len()).min(30_000);
            dest[..n].copy_from_slice(&rest[..n]);
            input.filled(n);
            rest = &rest[n..];
            // Parse all but a partial message of 7 bytes.
            let k = input.available().len().saturating_sub(7);
            parsed.extend_from_slice(&input.available()[..k]);
            input.consume(k);
            input.shrink_idle();
            assert!(input.capacity() >= input.available().len());
        }
        assert_eq!(input.capacity(), MAX_CAPACITY);
        parsed.extend_from_slice(input.available());
        assert_eq!(parsed, burst);
        input.consume(7);
        input.shrink_idle();
        assert_eq!(input.capacity(), 0);
        assert_eq!(input.spare(0).len(), MIN_CAPACITY);
    }
}
