//! Worker threads: the backends' blocking calls run here, never on the
//! event loop. Jobs go in through one queue; each result goes back
//! through another, and a mio waker tells the loop it has results.

use crate::backend::Backend;
use nbd_proto::server::RequestId;
use nbd_proto::Extent;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Which connection a job is for: its slot and that slot's generation,
/// so a result for a connection that has gone is dropped, not delivered
/// to the slot's next owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    pub slot: usize,
    pub generation: u64,
}

/// What a worker does for a request.
pub enum Work {
    Read {
        offset: u64,
        buf: Vec<u8>,
    },
    Write {
        offset: u64,
        buf: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Zero {
        offset: u64,
        length: u64,
        may_trim: bool,
        fast: bool,
        fua: bool,
    },
    /// CACHE: nothing to prefetch in these backends; answered at once.
    Cache,
    BlockStatus {
        offset: u64,
        length: u64,
    },
}

pub struct Job {
    pub conn: ConnId,
    pub id: RequestId,
    pub backend: Arc<dyn Backend>,
    pub work: Work,
}

/// What a job gave back.
pub enum Outcome {
    /// A READ's buffer, filled.
    Data(Vec<u8>),
    /// A WRITE's buffer, given back.
    Written(Vec<u8>),
    Done,
    Extents(Vec<Extent>),
}

pub struct Finished {
    pub conn: ConnId,
    pub id: RequestId,
    pub result: JobResult,
}

/// What a job gave, or its error; the buffer of a failed READ or WRITE
/// comes back with the error, so its bytes are accounted for.
pub type JobResult = Result<Outcome, (io::Error, Option<Vec<u8>>)>;

pub struct Workers {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    /// Set when the server gives up on its requests: queued jobs are
    /// dropped, and the threads are not waited for.
    abandoned: Arc<AtomicBool>,
}

impl Workers {
    /// Starts `n` threads; results go to `done`, and `wake` is called
    /// after each.
    pub fn start(n: usize, done: Sender<Finished>, wake: Arc<dyn Fn() + Send + Sync>) -> io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let abandoned = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let (rx, done, wake, abandoned) = (rx.clone(), done.clone(), wake.clone(), abandoned.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || serve_jobs(&rx, &done, &*wake, &abandoned))?,
            );
        }
        Ok(Workers { jobs: Some(tx), threads, abandoned })
    }

    /// The requests will not be answered: jobs not yet begun are dropped,
    /// and a worker stuck in its backend (hung storage) does not hold up
    /// the exit.
    pub fn abandon(&mut self) {
        self.abandoned.store(true, Ordering::Release);
        self.jobs = None;
        self.threads.clear();
    }

    pub fn submit(&self, job: Job) {
        if let Some(tx) = &self.jobs {
            // The workers outlive the loop that submits: a send fails only
            // if every worker panicked, and then nothing can serve it.
            let _ = tx.send(job);
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// WRITEs a worker takes at once when more are queued. Buffered writes
/// to one file serialize on its inode lock: workers writing side by side
/// spin on it (13% of the server's samples at 4k), while one worker's run
/// of them does not. Reads stay one per worker, in parallel, since a
/// read from the disk waits on the device.
const WRITE_BATCH: usize = 8;

fn serve_jobs(
    rx: &Mutex<Receiver<Job>>,
    done: &Sender<Finished>,
    wake: &(dyn Fn() + Send + Sync),
    abandoned: &AtomicBool,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => batch.push(job),
                Err(_) => return,
            }
            while batch.len() < WRITE_BATCH && batch.last().is_some_and(|j: &Job| matches!(j.work, Work::Write { .. }))
            {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        for job in batch.drain(..) {
            if abandoned.load(Ordering::Acquire) {
                continue;
            }
            let result = run(&*job.backend, job.work);
            if done.send(Finished { conn: job.conn, id: job.id, result }).is_err() {
                return;
            }
        }
        wake();
    }
}

/// Does `work` on `b`, on whichever thread calls.
pub fn run(b: &dyn Backend, work: Work) -> JobResult {
    let plain = |r: io::Result<()>| r.map(|()| Outcome::Done).map_err(|e| (e, None));
    match work {
        Work::Read { offset, mut buf } => match b.read(offset, &mut buf) {
            Ok(()) => Ok(Outcome::Data(buf)),
            Err(e) => Err((e, Some(buf))),
        },
        Work::Write { offset, buf, fua } => match b.write(offset, &buf, fua) {
            Ok(()) => Ok(Outcome::Written(buf)),
            Err(e) => Err((e, Some(buf))),
        },
        Work::Flush => plain(b.flush()),
        Work::Trim { offset, length, fua } => plain(b.trim(offset, length, fua)),
        Work::Zero { offset, length, may_trim, fast, fua } => plain(b.zero(offset, length, may_trim, fast, fua)),
        Work::Cache => Ok(Outcome::Done),
        Work::BlockStatus { offset, length } => b.extents(offset, length).map(Outcome::Extents).map_err(|e| (e, None)),
    }
}
