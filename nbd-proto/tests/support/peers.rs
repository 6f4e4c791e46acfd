//! Real NBD servers started on Unix sockets for one test and torn down
//! when dropped. A missing server binary fails the test loudly.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Peer {
    child: Option<Child>,
    pidfile: Option<PathBuf>,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

fn scratch_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nbd-proto-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn require(program: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file())).unwrap_or(false);
    assert!(found, "{program} is not installed: run `make deps` (or .ci/run), which installs the test peers");
}

/// Waits until `path` exists and, for a socket, accepts connections (the
/// file appears at bind(2), before listen(2)).
fn wait_for(path: &Path, child: &mut Option<Child>) {
    let start = Instant::now();
    let ready = |p: &Path| {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(p) {
            Ok(m) if m.file_type().is_socket() => std::os::unix::net::UnixStream::connect(p).is_ok(),
            Ok(_) => true,
            Err(_) => false,
        }
    };
    while !ready(path) {
        if let Some(c) = child.as_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("server exited before listening: {status}");
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "server did not create {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Peer {
    /// `nbdkit -f -U SOCK ARGS...`
    pub fn nbdkit(args: &[&str]) -> Peer {
        require("nbdkit");
        let dir = scratch_dir("nbdkit");
        let socket = dir.join("sock");
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        let mut child = Some(child);
        wait_for(&socket, &mut child);
        Peer { child, pidfile: None, dir, socket }
    }

    /// `qemu-nbd -k SOCK -t -e 0 ARGS... IMAGE`, `image` made by `prepare`
    /// inside the peer's directory.
    pub fn qemu_nbd(args: &[&str], prepare: impl FnOnce(&Path) -> PathBuf) -> Peer {
        require("qemu-nbd");
        let dir = scratch_dir("qemu");
        let image = prepare(&dir);
        let socket = dir.join("sock");
        let child = Command::new("qemu-nbd")
            .arg("-k")
            .arg(&socket)
            .args(["-t", "-e", "0"])
            .args(args)
            .arg(&image)
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        let mut child = Some(child);
        wait_for(&socket, &mut child);
        Peer { child, pidfile: None, dir, socket }
    }

    /// nbd-server serving one export named `exp` backed by a file of `size` bytes.
    pub fn nbd_server(size: u64) -> Peer {
        require("nbd-server");
        let dir = scratch_dir("nbdsrv");
        let socket = dir.join("sock");
        let image = dir.join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let conf = dir.join("config");
        let pidfile = dir.join("pid");
        std::fs::write(
            &conf,
            format!(
                "[generic]\nunixsock = {}\nallowlist = true\n[exp]\nexportname = {}\nflush = true\nfua = true\ntrim = true\n",
                socket.display(),
                image.display()
            ),
        )
        .unwrap();
        let status = Command::new("nbd-server")
            .arg("-C")
            .arg(&conf)
            .arg("-p")
            .arg(&pidfile)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("start nbd-server");
        assert!(status.success(), "nbd-server failed to start");
        wait_for(&socket, &mut None);
        wait_for(&pidfile, &mut None);
        Peer { child: None, pidfile: Some(pidfile), dir, socket }
    }

    pub fn connect(&self) -> std::os::unix::net::UnixStream {
        std::os::unix::net::UnixStream::connect(&self.socket).expect("connect to the server socket")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(p) = &self.pidfile {
            // nbd-server daemonizes; its pid file names the listener.
            if let Ok(pid) = std::fs::read_to_string(p) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
