//! Bytes waiting to be sent: encoded headers owned here, and WRITE
//! payloads that stay in the caller's buffers until they leave.

use std::collections::VecDeque;

/// Encoded bytes an idle connection keeps room for: a few requests'
/// headers. A burst grows the buffer; idle, it is given back.
const IDLE_ENCODED: usize = 1024;
/// Segments and milestones an idle connection keeps room for.
const IDLE_SEGMENTS: usize = 8;

/// One contiguous piece of the outgoing stream.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Segment {
    /// The next `len` bytes of the encoded header buffer.
    Encoded { len: usize },
    /// `len` bytes of the buffer lent with the command in `slot`.
    Payload { slot: usize, len: usize },
}

/// The unsent part of a segment.
#[derive(Debug, Clone)]
pub(crate) enum Piece {
    Encoded(std::ops::Range<usize>),
    Payload { slot: usize, range: std::ops::Range<usize> },
}

/// What has been sent in full once the stream position passes a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Milestone {
    Request { slot: usize },
    Disconnect,
    Abort,
}

/// Sent bytes an encoding buffer keeps at its front before they are
/// dropped (once they are also at least half of it, so each byte moves
/// at most once).
pub(crate) const COMPACT_AT: usize = 64 * 1024;

/// Drops the sent bytes, `encoded[..*sent]`: all of them (no copy) once
/// everything has been sent, else when they have piled up. A stream that
/// never drains (requests or replies always queued behind a slow peer)
/// would otherwise keep every header it ever sent.
pub(crate) fn drop_sent(encoded: &mut Vec<u8>, sent: &mut usize) {
    if *sent == encoded.len() {
        encoded.clear();
        *sent = 0;
    } else if *sent >= COMPACT_AT && *sent >= encoded.len() / 2 {
        encoded.drain(..*sent);
        *sent = 0;
    }
}

#[derive(Debug, Default)]
pub(crate) struct Output {
    encoded: Vec<u8>,
    /// Bytes of `encoded` already sent.
    encoded_sent: usize,
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already sent.
    front_sent: usize,
    /// Stream positions: bytes ever queued and ever sent.
    queued: u64,
    sent: u64,
    milestones: VecDeque<(u64, Milestone)>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Queues the bytes `encode` appends.
    pub fn encode(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let mark = self.encoded.len();
        encode(&mut self.encoded);
        let len = self.encoded.len() - mark;
        if len == 0 {
            return;
        }
        self.queued += len as u64;
        if let Some(Segment::Encoded { len: last }) = self.segments.back_mut() {
            *last += len;
        } else {
            self.segments.push_back(Segment::Encoded { len });
        }
    }

    pub fn push_payload(&mut self, slot: usize, len: usize) {
        if len > 0 {
            self.queued += len as u64;
            self.segments.push_back(Segment::Payload { slot, len });
        }
    }

    /// Fires `m` once everything queued so far has been sent.
    pub fn milestone(&mut self, m: Milestone) {
        self.milestones.push_back((self.queued, m));
    }

    /// What remains to send, in order: for each segment, which bytes.
    pub fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        let mut encoded_at = self.encoded_sent;
        self.segments.iter().enumerate().map(move |(i, &seg)| {
            let skip = if i == 0 { self.front_sent } else { 0 };
            match seg {
                Segment::Encoded { len } => {
                    let start = encoded_at;
                    encoded_at += len - skip;
                    Piece::Encoded(start..start + len - skip)
                }
                Segment::Payload { slot, len } => Piece::Payload { slot, range: skip..len },
            }
        })
    }

    pub fn encoded_bytes(&self) -> &[u8] {
        &self.encoded
    }

    /// Consumes `n` sent bytes and returns the milestones passed.
    pub fn advance(&mut self, mut n: usize, passed: &mut Vec<Milestone>) {
        self.sent += n as u64;
        while n > 0 {
            let Some(front) = self.segments.front().copied() else { break };
            let (seg_len, encoded) = match front {
                Segment::Encoded { len } => (len, true),
                Segment::Payload { len, .. } => (len, false),
            };
            let take = n.min(seg_len - self.front_sent);
            if encoded {
                self.encoded_sent += take;
            }
            self.front_sent += take;
            n -= take;
            if self.front_sent == seg_len {
                self.segments.pop_front();
                self.front_sent = 0;
            }
        }
        drop_sent(&mut self.encoded, &mut self.encoded_sent);
        while let Some(&(at, m)) = self.milestones.front() {
            if at > self.sent {
                break;
            }
            self.milestones.pop_front();
            passed.push(m);
        }
    }

    /// Stream positions: bytes ever queued, and ever sent.
    pub fn queued(&self) -> u64 {
        self.queued
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Takes back everything queued after stream position `pos`, which
    /// must not be before what was already sent.
    pub fn truncate(&mut self, pos: u64) {
        let pos = pos.clamp(self.sent, self.queued);
        let mut excess = (self.queued - pos) as usize;
        self.queued = pos;
        while excess > 0 {
            let only_front = self.segments.len() == 1;
            let Some(back) = self.segments.back_mut() else { break };
            let kept = if only_front { self.front_sent } else { 0 };
            let (len, encoded) = match back {
                Segment::Encoded { len } => (len, true),
                Segment::Payload { len, .. } => (len, false),
            };
            let take = excess.min(*len - kept);
            *len -= take;
            if encoded {
                self.encoded.truncate(self.encoded.len() - take);
            }
            if *len == kept {
                self.segments.pop_back();
                if only_front {
                    self.front_sent = 0;
                }
            }
            excess -= take;
        }
        self.milestones.retain(|&(at, _)| at <= pos);
    }

    /// With nothing queued, gives back what a burst of requests made
    /// the queues grow to.
    pub fn shrink_idle(&mut self) {
        if self.segments.is_empty() {
            self.encoded.shrink_to(IDLE_ENCODED);
            self.segments.shrink_to(IDLE_SEGMENTS);
            self.milestones.shrink_to(IDLE_SEGMENTS);
        }
    }

    /// Drops everything queued, and the memory (the connection is gone).
    pub fn clear(&mut self) {
        self.encoded = Vec::new();
        self.encoded_sent = 0;
        self.segments = VecDeque::new();
        self.front_sent = 0;
        self.milestones = VecDeque::new();
        self.queued = self.sent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remaining(o: &Output) -> Vec<(bool, usize)> {
        o.pieces()
            .map(|p| match p {
                Piece::Encoded(r) => (true, r.len()),
                Piece::Payload { range, .. } => (false, range.len()),
            })
            .collect()
    }

    #[test]
    fn requests_always_queued_keep_only_the_unsent_headers() {
        let mut o = Output::default();
        let mut passed = Vec::new();
        o.encode(|b| b.extend_from_slice(&[1; 28]));
        for _ in 0..100_000 {
            o.encode(|b| b.extend_from_slice(&[2; 28]));
            o.advance(28, &mut passed);
        }
        assert!(o.encoded.len() <= 2 * COMPACT_AT + 28, "{} bytes kept", o.encoded.len());
        assert_eq!(remaining(&o), [(true, 28)]);
        let Some(Piece::Encoded(r)) = o.pieces().next() else { panic!("a header") };
        assert_eq!(&o.encoded_bytes()[r], &[2; 28]);
    }

    #[test]
    fn truncate_takes_back_whole_requests_and_keeps_what_left() {
        let mut o = Output::default();
        let mut passed = Vec::new();
        for slot in 0..3 {
            o.encode(|b| b.extend_from_slice(&[slot as u8; 28]));
            o.push_payload(slot, 100);
            o.milestone(Milestone::Request { slot });
        }
        o.advance(30, &mut passed);
        assert_eq!(remaining(&o), [(false, 98), (true, 28), (false, 100), (true, 28), (false, 100)]);

        // The second request has not started: it and the third go.
        o.truncate(128);
        assert_eq!(remaining(&o), [(false, 98)]);
        assert_eq!(o.queued(), 128);
        o.advance(98, &mut passed);
        assert_eq!(passed, [Milestone::Request { slot: 0 }]);
        assert!(o.is_empty());

        // A cut before what was sent stops there; what follows queues
        // after the sent part.
        o.encode(|b| b.extend_from_slice(&[9; 28]));
        o.advance(10, &mut passed);
        o.truncate(0);
        assert!(o.is_empty());
        assert_eq!(o.queued(), o.sent());
        o.encode(|b| b.extend_from_slice(&[7; 4]));
        let bytes: Vec<u8> = o
            .pieces()
            .flat_map(|p| match p {
                Piece::Encoded(r) => o.encoded_bytes()[r].to_vec(),
                Piece::Payload { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(bytes, [7; 4]);
    }
}
