//! What the server's integration tests share: a server started and torn
//! down by the test, client programs that must exist, raw clients.

#![allow(dead_code)] // each test file uses its own part

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A server started by a test, killed when dropped.
pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub sock: PathBuf,
}

impl Server {
    pub fn start(name: &str, args: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!("nbd-rs-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_nbd-rs-server"))
            .arg("-U")
            .arg(&sock)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("nbd-rs-server");
        let s = Server { child, dir, sock };
        let start = Instant::now();
        while UnixStream::connect(&s.sock).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "the server did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// SIGTERM; returns the exit status and what the server logged.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        let status = self.child.wait().unwrap();
        let mut log = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
        (status, log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a client program, which must exist.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e} (is it installed? make deps)"))
}

pub fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

/// A raw client in transmission on the default export: fixed newstyle,
/// NO_ZEROES, NBD_OPT_EXPORT_NAME "". Returns the socket and the size.
pub fn raw_client(sock: &Path) -> (UnixStream, u64) {
    let mut c = UnixStream::connect(sock).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    c.read_exact(&mut export).unwrap();
    (c, u64::from_be_bytes(export[..8].try_into().unwrap()))
}

pub fn request(kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&length.to_be_bytes());
    r
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A file of zeroes for a file export, outside the server's directory
/// (which is made afresh when the server starts); removed when dropped.
pub struct Disk {
    pub path: PathBuf,
}

impl Disk {
    pub fn new(name: &str, len: u64) -> Disk {
        let dir = std::env::temp_dir().join(format!("nbd-rs-server-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        Disk { path }
    }

    /// The export's argument: `file:PATH`.
    pub fn spec(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
