//! `file`: a regular file (or block device). pread/pwrite; FLUSH and FUA
//! are fdatasync; trims and zeroes punch holes (zeroes without NO_HOLE)
//! or zero the range in place; block status comes from SEEK_DATA and
//! SEEK_HOLE. One open file serves every connection, so writes are seen
//! by all and one fdatasync covers them all.

use super::{Backend, STATE_HOLE, STATE_ZERO};
use nbd_proto::Extent;
use rustix::fs::{FallocateFlags, SeekFrom};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub struct File {
    file: std::fs::File,
    size: u64,
    writable: bool,
}

impl File {
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(writable).open(path)?;
        // A block device's metadata says 0: its end says how large it is.
        let size = io::Seek::seek(&mut &file, io::SeekFrom::End(0))?;
        Ok(File { file, size, writable })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)?;
        Ok(())
    }

    /// The next offset at or after `at` where `what` (data or a hole)
    /// starts, or the end.
    fn seek(&self, what: fn(u64) -> SeekFrom, at: u64) -> io::Result<u64> {
        match rustix::fs::seek(&self.file, what(at)) {
            Ok(n) => Ok(n),
            // No data after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => Ok(self.size),
            Err(e) => Err(e.into()),
        }
    }
}

impl Backend for File {
    fn size(&self) -> u64 {
        self.size
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn shared_state(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // A file system that cannot punch holes cannot trim: a trim is
        // advisory, so that is not an error.
        if self.punch(offset, len).is_ok() && fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast: bool, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // A hole if allowed, else (or where holes cannot be punched) the
        // file system's own zeroing; writing zeroes is the slow way.
        let done = (may_trim && self.punch(offset, len).is_ok())
            || rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, offset, len)
                .is_ok();
        if !done && fast {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if !done {
            self.write_zeroes(offset, len)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < 256 {
            let data = self.seek(SeekFrom::Data, at)?;
            if data > at {
                let n = data.min(end) - at;
                out.push(Extent { length: n, flags: STATE_HOLE | STATE_ZERO });
                at += n;
                continue;
            }
            let hole = self.seek(SeekFrom::Hole, at)?.max(at + 1);
            let n = hole.min(end) - at;
            out.push(Extent { length: n, flags: 0 });
            at += n;
        }
        Ok(out)
    }
}
