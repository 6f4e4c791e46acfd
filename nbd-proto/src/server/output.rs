//! The server's outgoing stream: encoded headers owned here, READ data
//! still in the buffers the caller lent, and runs of zeroes sent from one
//! static block, so that a hole in a simple reply costs no allocation.

use super::RequestId;
use crate::client::output::drop_sent;
use std::collections::VecDeque;

/// Zeroes for holes that must go out as data (simple replies, DF reads).
static ZEROES: [u8; 4096] = [0; 4096];

/// What happens once everything queued before it has been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    /// The acknowledgement of STARTTLS left: the TLS handshake may begin.
    StartTls,
}

#[derive(Debug)]
enum Seg<B> {
    /// The next `len` bytes of `encoded`.
    Encoded(usize),
    /// A buffer lent with a reply, sent whole and then handed back.
    Lent {
        id: RequestId,
        buf: B,
    },
    /// This many zero bytes.
    Zeroes(u64),
    Mark(Mark),
}

/// What the caller gets back as sending progresses.
#[derive(Debug)]
pub(super) enum Passed<B> {
    Buffer { id: RequestId, buf: B },
    Mark(Mark),
}

#[derive(Debug)]
pub(super) struct Output<B> {
    encoded: Vec<u8>,
    encoded_sent: usize,
    segs: VecDeque<Seg<B>>,
    /// Bytes of the front segment already sent.
    front_sent: u64,
    /// Bytes queued and not yet sent.
    pending: u64,
}

impl<B> Default for Output<B> {
    fn default() -> Self {
        Output { encoded: Vec::new(), encoded_sent: 0, segs: VecDeque::new(), front_sent: 0, pending: 0 }
    }
}

impl<B: AsRef<[u8]>> Output<B> {
    /// Whether bytes are waiting (marks alone do not count: they pass as
    /// soon as what precedes them has left).
    pub fn has_bytes(&self) -> bool {
        self.pending > 0
    }

    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Queues the bytes `encode` appends.
    pub fn encode(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let before = self.encoded.len();
        encode(&mut self.encoded);
        let added = self.encoded.len() - before;
        self.pending += added as u64;
        // Consecutive headers form one segment, so they leave as one slice.
        match self.segs.back_mut() {
            _ if added == 0 => {}
            Some(Seg::Encoded(last)) => *last += added,
            _ => self.segs.push_back(Seg::Encoded(added)),
        }
    }

    /// Queues `buf` whole; it comes back once sent (or dropped with the
    /// stream, see [`Self::clear`]).
    pub fn lend(&mut self, id: RequestId, buf: B) {
        self.pending += buf.as_ref().len() as u64;
        self.segs.push_back(Seg::Lent { id, buf });
    }

    pub fn zeroes(&mut self, len: u64) {
        if len > 0 {
            self.pending += len;
            self.segs.push_back(Seg::Zeroes(len));
        }
    }

    pub fn mark(&mut self, m: Mark) {
        self.segs.push_back(Seg::Mark(m));
    }

    /// The unsent bytes, in order, as slices into `out`.
    pub fn slices<'a>(&'a self, out: &mut [&'a [u8]]) -> usize {
        let mut n = 0;
        let mut encoded_at = self.encoded_sent;
        for (i, seg) in self.segs.iter().enumerate() {
            if n == out.len() {
                break;
            }
            let skip = if i == 0 { self.front_sent } else { 0 } as usize;
            let slice: &[u8] = match seg {
                Seg::Encoded(len) => {
                    let s = &self.encoded[encoded_at..encoded_at + len - skip];
                    encoded_at += len - skip;
                    s
                }
                // A buffer that shrank since it was lent yields what is
                // left of it rather than reading out of bounds.
                Seg::Lent { buf, .. } => buf.as_ref().get(skip..).unwrap_or(&[]),
                Seg::Zeroes(len) => &ZEROES[..(*len - skip as u64).min(ZEROES.len() as u64) as usize],
                Seg::Mark(_) => continue,
            };
            if slice.is_empty() {
                continue;
            }
            out[n] = slice;
            n += 1;
            // Zeroes longer than the static block continue in the next
            // call, once these have been sent.
            if matches!(seg, Seg::Zeroes(len) if *len - skip as u64 > ZEROES.len() as u64) {
                break;
            }
        }
        n
    }

    /// `n` bytes left; returns buffers and marks passed, in order.
    pub fn advance(&mut self, mut n: u64, passed: &mut Vec<Passed<B>>) {
        self.pending = self.pending.saturating_sub(n);
        loop {
            let len = match self.segs.front() {
                None => break,
                Some(Seg::Encoded(len)) => *len as u64,
                Some(Seg::Lent { buf, .. }) => buf.as_ref().len() as u64,
                Some(Seg::Zeroes(len)) => *len,
                Some(Seg::Mark(_)) => 0,
            };
            let take = n.min(len - self.front_sent);
            self.front_sent += take;
            n -= take;
            if let Some(Seg::Encoded(_)) = self.segs.front() {
                self.encoded_sent += take as usize;
            }
            if self.front_sent < len {
                break;
            }
            self.front_sent = 0;
            match self.segs.pop_front() {
                Some(Seg::Lent { id, buf }) => passed.push(Passed::Buffer { id, buf }),
                Some(Seg::Mark(m)) => passed.push(Passed::Mark(m)),
                _ => {}
            }
        }
        drop_sent(&mut self.encoded, &mut self.encoded_sent);
    }

    /// Drops everything queued; lent buffers are handed back.
    pub fn clear(&mut self, passed: &mut Vec<Passed<B>>) {
        for seg in self.segs.drain(..) {
            if let Seg::Lent { id, buf } = seg {
                passed.push(Passed::Buffer { id, buf });
            }
        }
        self.encoded.clear();
        self.encoded_sent = 0;
        self.front_sent = 0;
        self.pending = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_that_never_drains_keeps_only_what_is_unsent() {
        let mut out: Output<Vec<u8>> = Output::default();
        let mut passed = Vec::new();
        out.encode(|b| b.extend_from_slice(&[1; 16]));
        for _ in 0..100_000 {
            out.encode(|b| b.extend_from_slice(&[2; 16]));
            out.advance(16, &mut passed);
            assert_eq!(out.pending(), 16);
        }
        assert!(out.encoded.len() <= 2 * crate::client::output::COMPACT_AT + 16, "{} bytes kept", out.encoded.len());
        let mut slices = [&[][..]; 4];
        assert_eq!(out.slices(&mut slices), 1);
        assert_eq!(slices[0], &[2; 16]);
    }

    fn drain(o: &mut Output<Vec<u8>>, step: u64) -> (Vec<u8>, Vec<Passed<Vec<u8>>>) {
        let mut bytes = Vec::new();
        let mut passed = Vec::new();
        loop {
            let mut s: [&[u8]; 3] = [&[]; 3];
            let n = o.slices(&mut s);
            let all: Vec<u8> = s[..n].concat();
            if all.is_empty() {
                o.advance(0, &mut passed);
                return (bytes, passed);
            }
            let k = (step as usize).min(all.len());
            bytes.extend_from_slice(&all[..k]);
            o.advance(k as u64, &mut passed);
        }
    }

    #[test]
    fn headers_buffers_zeroes_and_marks_leave_in_order_under_any_cut() {
        for step in [1, 7, 4096, 1 << 20] {
            let mut o = Output::default();
            o.encode(|b| b.extend_from_slice(b"head"));
            o.lend(7, vec![1, 2, 3]);
            o.zeroes(5000);
            o.mark(Mark::StartTls);
            o.encode(|b| b.extend_from_slice(b"tail"));
            assert_eq!(o.pending(), 4 + 3 + 5000 + 4);
            let (bytes, passed) = drain(&mut o, step);
            let mut want = b"head".to_vec();
            want.extend_from_slice(&[1, 2, 3]);
            want.extend_from_slice(&[0; 5000]);
            want.extend_from_slice(b"tail");
            assert_eq!(bytes, want, "step {step}");
            assert!(matches!(passed[..], [Passed::Buffer { id: 7, .. }, Passed::Mark(Mark::StartTls)]));
            assert!(!o.has_bytes());
        }
    }

    #[test]
    fn clear_hands_back_lent_buffers() {
        let mut o = Output::default();
        o.lend(1, vec![0; 10]);
        o.lend(2, vec![0; 10]);
        let mut passed = Vec::new();
        o.advance(3, &mut passed);
        assert!(passed.is_empty());
        o.clear(&mut passed);
        assert_eq!(passed.len(), 2);
        assert_eq!(o.pending(), 0);
    }
}
