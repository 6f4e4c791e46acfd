//! `null`: every read is zeroes, every write is discarded.

use super::{Backend, STATE_HOLE, STATE_ZERO};
use nbd_proto::Extent;
use std::io;

pub struct Null {
    size: u64,
}

impl Null {
    pub fn new(size: u64) -> Self {
        Null { size }
    }
}

impl Backend for Null {
    fn size(&self) -> u64 {
        self.size
    }

    fn shared_state(&self) -> bool {
        true
    }

    fn blocks(&self) -> bool {
        false
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn write(&self, _offset: u64, _buf: &[u8], _fua: bool) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Ok(())
    }

    fn zero(&self, _offset: u64, _len: u64, _may_trim: bool, _fast: bool, _fua: bool) -> io::Result<()> {
        Ok(())
    }

    fn extents(&self, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent { length: len, flags: STATE_HOLE | STATE_ZERO }])
    }
}
