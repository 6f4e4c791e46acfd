//! `memory`: a sparse RAM disk. Pages are allocated on first write and
//! dropped by trims and zeroes, so block status tells data from holes.
//! The pages are spread over shards, each behind its own lock, so that
//! workers serving different ranges do not wait for each other. Each
//! shard keeps its pages in order, so that trims, zeroes and block status
//! over a huge range step over its holes rather than through them (these
//! requests run on the event loop).

use super::{Backend, STATE_HOLE, STATE_ZERO};
use nbd_proto::Extent;
use std::collections::BTreeMap;
use std::io;
use std::sync::RwLock;

const PAGE: u64 = 32 * 1024;
const SHARDS: usize = 64;
/// A block status answer stops after this many extents (the client asks
/// again from where it ends).
const MAX_EXTENTS: usize = 1024;

type Page = Box<[u8]>;

pub struct Memory {
    size: u64,
    shards: Vec<RwLock<BTreeMap<u64, Page>>>,
}

impl Memory {
    pub fn new(size: u64) -> Self {
        Memory { size, shards: (0..SHARDS).map(|_| RwLock::new(BTreeMap::new())).collect() }
    }

    fn shard(&self, page: u64) -> &RwLock<BTreeMap<u64, Page>> {
        &self.shards[(page % SHARDS as u64) as usize]
    }

    /// Calls `f(page, offset in page, range of the caller's bytes)` for
    /// each page `[offset, offset + len)` touches.
    fn each_page(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let (page, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE - within as u64).min(len - done);
            f(page, within, done as usize..(done + n) as usize);
            done += n;
        }
    }

    fn is_allocated(&self, page: u64) -> bool {
        self.shard(page).read().unwrap_or_else(|e| e.into_inner()).contains_key(&page)
    }

    /// The first allocated page at or after `page`, if any.
    fn next_allocated(&self, page: u64) -> Option<u64> {
        let first = |s: &RwLock<BTreeMap<u64, Page>>| {
            s.read().unwrap_or_else(|e| e.into_inner()).range(page..).next().map(|(&p, _)| p)
        };
        self.shards.iter().filter_map(first).min()
    }

    /// Zeroes the range: whole pages are dropped, partial ones zeroed.
    fn clear(&self, offset: u64, len: u64) {
        let end = offset + len;
        let (first_whole, end_whole) = (offset.div_ceil(PAGE), end / PAGE);
        if first_whole >= end_whole {
            return self.zero_within(offset, len);
        }
        self.zero_within(offset, first_whole * PAGE - offset);
        for s in &self.shards {
            let mut shard = s.write().unwrap_or_else(|e| e.into_inner());
            let doomed: Vec<u64> = shard.range(first_whole..end_whole).map(|(&p, _)| p).collect();
            for p in doomed {
                shard.remove(&p);
            }
        }
        self.zero_within(end_whole * PAGE, end - end_whole * PAGE);
    }

    /// Zeroes bytes of allocated pages in a range of at most a page or two.
    fn zero_within(&self, offset: u64, len: u64) {
        Self::each_page(offset, len, |page, within, range| {
            let mut shard = self.shard(page).write().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = shard.get_mut(&page) {
                p[within..within + range.len()].fill(0);
            }
        });
    }
}

impl Backend for Memory {
    fn size(&self) -> u64 {
        self.size
    }

    fn shared_state(&self) -> bool {
        true
    }

    fn blocks(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Self::each_page(offset, buf.len() as u64, |page, within, range| {
            let shard = self.shard(page).read().unwrap_or_else(|e| e.into_inner());
            match shard.get(&page) {
                Some(p) => buf[range.clone()].copy_from_slice(&p[within..within + range.len()]),
                None => buf[range].fill(0),
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        Self::each_page(offset, buf.len() as u64, |page, within, range| {
            let mut shard = self.shard(page).write().unwrap_or_else(|e| e.into_inner());
            let p = shard.entry(page).or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            p[within..within + range.len()].copy_from_slice(&buf[range]);
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.clear(offset, len);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, _may_trim: bool, _fast: bool, _fua: bool) -> io::Result<()> {
        // Memory holds no holes that differ from zeroes: a zero is a trim.
        self.clear(offset, len);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end && out.len() < MAX_EXTENTS {
            let page = at / PAGE;
            let (n, flags) = if self.is_allocated(page) {
                (((page + 1) * PAGE).min(end) - at, 0)
            } else {
                // The hole runs to the next allocated page.
                let next = self.next_allocated(page).map_or(end, |p| (p * PAGE).min(end));
                (next - at, STATE_HOLE | STATE_ZERO)
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += n,
                _ => out.push(Extent { length: n, flags }),
            }
            at += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_across_pages_and_holes_read_as_zeroes() {
        let m = Memory::new(1 << 20);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        m.write(30_000, &data, false).unwrap();
        let mut back = vec![1u8; 100_000];
        m.read(30_000, &mut back).unwrap();
        assert_eq!(back, data);
        let mut hole = vec![1u8; 1000];
        m.read(500_000, &mut hole).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_huge_sparse_range_is_stepped_over_not_through() {
        // 16 TiB is 2^29 pages: walking them one by one takes seconds.
        let m = Memory::new(16 << 40);
        m.write(1 << 40, &[1; 10], false).unwrap();
        m.write((10 << 40) + PAGE - 5, &[2; 10], false).unwrap();
        let start = std::time::Instant::now();
        let e = m.extents(0, 16 << 40).unwrap();
        assert_eq!(e.len(), 5, "{e:?}");
        assert_eq!(e[0], Extent { length: 1 << 40, flags: STATE_HOLE | STATE_ZERO });
        assert_eq!(e[1], Extent { length: PAGE, flags: 0 });
        assert_eq!(e[3], Extent { length: 2 * PAGE, flags: 0 });
        assert_eq!(e.iter().map(|x| x.length).sum::<u64>(), 16 << 40);
        m.zero(0, 16 << 40, true, false, false).unwrap();
        m.trim(0, 16 << 40, false).unwrap();
        assert_eq!(m.extents(0, 16 << 40).unwrap(), vec![Extent { length: 16 << 40, flags: STATE_HOLE | STATE_ZERO }]);
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "took {:?}", start.elapsed());
    }

    #[test]
    fn extents_follow_allocation_and_trims_make_holes() {
        let m = Memory::new(1 << 20);
        m.write(PAGE, &[1; 10], false).unwrap();
        let e = m.extents(0, 4 * PAGE).unwrap();
        assert_eq!(
            e,
            vec![
                Extent { length: PAGE, flags: STATE_HOLE | STATE_ZERO },
                Extent { length: PAGE, flags: 0 },
                Extent { length: 2 * PAGE, flags: STATE_HOLE | STATE_ZERO },
            ]
        );
        m.trim(PAGE, PAGE, false).unwrap();
        assert_eq!(m.extents(0, 4 * PAGE).unwrap(), vec![Extent { length: 4 * PAGE, flags: STATE_HOLE | STATE_ZERO }]);
        // A partial zero leaves the page allocated, its bytes zero.
        m.write(0, &[7; 100], false).unwrap();
        m.zero(10, 20, true, false, false).unwrap();
        let mut b = [9u8; 40];
        m.read(0, &mut b).unwrap();
        assert_eq!(&b[..10], &[7; 10]);
        assert_eq!(&b[10..30], &[0; 20]);
        assert_eq!(&b[30..], &[7; 10]);
    }
}
