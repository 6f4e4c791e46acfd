//! nbd-rs-server at SIGTERM and SIGINT: requests already received are
//! answered, including those a worker has and a WRITE whose payload is
//! still arriving; a client that stalls cannot keep the server up past
//! `--shutdown-timeout`, nor past a second signal.

mod common;

use common::{raw_client, request, Disk, Server};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

const WRITE: u16 = 1;
const FLUSH: u16 = 3;

fn signal(s: &Server, sig: &str) {
    assert!(Command::new("kill").arg(sig).arg(s.child.id().to_string()).status().unwrap().success());
}

/// The simple reply to `cookie`: its error value.
fn read_reply(c: &mut UnixStream, cookie: u64) -> u32 {
    let mut r = [0u8; 16];
    c.read_exact(&mut r).expect("a reply");
    assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
    assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), cookie);
    u32::from_be_bytes(r[4..8].try_into().unwrap())
}

/// The server closes the connection within `within`, sending nothing
/// more: end of stream, or a reset when it closed with bytes of ours
/// unread (bytes sent after shutdown began).
fn assert_closed(c: &mut UnixStream, within: Duration) {
    c.set_read_timeout(Some(within)).unwrap();
    let mut rest = Vec::new();
    match c.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
    assert!(rest.is_empty(), "{} unexpected bytes", rest.len());
}

/// The server exits within `within`; its status and log.
fn wait_exit(mut s: Server, within: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    while s.child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < within, "the server did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.terminate()
}

#[test]
fn a_write_whose_payload_is_arriving_at_sigterm_is_finished_and_answered() {
    let disk = Disk::new("half-write", 8 << 20);
    let s = Server::start("half-write", &["-v", &disk.spec()]);
    let (mut c, size) = raw_client(&s.sock);
    assert_eq!(size, 8 << 20);
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    c.write_all(&request(WRITE, 7, 1 << 20, payload.len() as u32)).unwrap();
    c.write_all(&payload[..payload.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    signal(&s, "-TERM");
    std::thread::sleep(Duration::from_millis(300));
    let mut s = s;
    assert!(s.child.try_wait().unwrap().is_none(), "the server exited with a WRITE half received");
    c.write_all(&payload[payload.len() / 2..]).unwrap();
    assert_eq!(read_reply(&mut c, 7), 0, "the WRITE succeeds");
    // Nothing after that request is taken: the connection ends.
    let _ = c.write_all(&request(FLUSH, 8, 0, 0));
    assert_closed(&mut c, Duration::from_secs(5));
    let (status, log) = wait_exit(s, Duration::from_secs(5));
    assert!(status.success(), "{status}: {log}");
    let mut back = vec![0u8; payload.len()];
    std::fs::File::open(&disk.path).unwrap().read_exact_at(&mut back, 1 << 20).unwrap();
    assert!(back == payload, "the WRITE finished at shutdown is in the file");
}

#[test]
fn requests_a_worker_has_at_sigterm_are_answered() {
    let disk = Disk::new("workers", 64 << 20);
    let s = Server::start("workers", &["--threads", "2", &disk.spec()]);
    let (mut c, _) = raw_client(&s.sock);
    // 32 WRITEs of 1 MiB with a FLUSH after every 8: file requests go to
    // the workers, so most are still theirs when SIGTERM comes.
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let mut sent = Vec::new();
    for i in 0..32u64 {
        c.write_all(&request(WRITE, i, i << 20, block.len() as u32)).unwrap();
        c.write_all(&block).unwrap();
        sent.push(i);
        if i % 8 == 7 {
            c.write_all(&request(FLUSH, 100 + i, 0, 0)).unwrap();
            sent.push(100 + i);
        }
    }
    signal(&s, "-TERM");
    let mut answered = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..sent.len() {
        let mut r = [0u8; 16];
        c.read_exact(&mut r).expect("every request sent before SIGTERM is answered");
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 0, "request succeeded");
        answered.push(u64::from_be_bytes(r[8..16].try_into().unwrap()));
    }
    answered.sort();
    sent.sort();
    assert_eq!(answered, sent);
    assert_closed(&mut c, Duration::from_secs(5));
    let (status, log) = wait_exit(s, Duration::from_secs(5));
    assert!(status.success(), "{status}: {log}");
    let data = std::fs::read(&disk.path).unwrap();
    for i in 0..32usize {
        assert!(data[i << 20..(i + 1) << 20] == block[..], "block {i} is on disk");
    }
}

/// A client that sent 4 KiB of a 1 MiB WRITE and nothing more.
fn stalled_write(s: &Server) -> UnixStream {
    let (mut c, _) = raw_client(&s.sock);
    c.write_all(&request(WRITE, 1, 0, 1 << 20)).unwrap();
    c.write_all(&[0u8; 4096]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    c
}

#[test]
fn a_client_that_stalls_mid_request_cannot_hold_shutdown_past_the_timeout() {
    let s = Server::start("stall", &["--shutdown-timeout", "1", "memory:8M"]);
    let mut c = stalled_write(&s);
    let start = Instant::now();
    signal(&s, "-TERM");
    assert_closed(&mut c, Duration::from_secs(5));
    let (status, log) = wait_exit(s, Duration::from_secs(5));
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before the timeout");
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("closed at shutdown (the shutdown timeout passed), 1 requests unanswered"), "{log}");
}

#[test]
fn a_second_signal_ends_the_requests_at_once() {
    let s = Server::start("second", &["memory:8M"]);
    let mut c = stalled_write(&s);
    let start = Instant::now();
    signal(&s, "-TERM");
    std::thread::sleep(Duration::from_millis(200));
    signal(&s, "-INT");
    assert_closed(&mut c, Duration::from_secs(5));
    let (status, log) = wait_exit(s, Duration::from_secs(5));
    assert!(start.elapsed() < Duration::from_secs(5), "the default timeout is 10 s: the second signal ended it");
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("closed at shutdown (a second signal came), 1 requests unanswered"), "{log}");
}

#[test]
fn exiting_removes_its_own_socket_and_not_one_bound_since_at_that_path() {
    // (The test's server directory goes when `s` is dropped: look before.)
    let mut s = Server::start("rebound", &["memory:1M"]);
    std::fs::remove_file(&s.sock).unwrap();
    let _other = std::os::unix::net::UnixListener::bind(&s.sock).unwrap();
    signal(&s, "-TERM");
    assert!(s.child.wait().unwrap().success());
    assert!(s.sock.exists(), "the server removed a socket it had not made");

    let mut s = Server::start("own", &["memory:1M"]);
    signal(&s, "-TERM");
    assert!(s.child.wait().unwrap().success());
    assert!(!s.sock.exists(), "the server left its socket behind");
}
