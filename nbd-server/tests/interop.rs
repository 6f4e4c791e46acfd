//! nbd-rs-server against real clients, each started by the test: Debian's
//! nbdinfo and nbdcopy, qemu-img and qemu-io, fio's nbd engine; and
//! against clients that misbehave. A missing client program fails the
//! test (make deps installs them).

mod common;

use common::{ok, random_file, raw_client, request, rss_kib, run, Server};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn nbdinfo_sees_every_export_and_its_features() {
    let s = Server::start("info", &["memory:64M", "disk=null:1G", "--ro", "ro=memory:1M"]);
    let info = ok("nbdinfo", &[&s.uri("")]);
    for want in [
        "export-size: 67108864",
        "base:allocation",
        "can_multi_conn: true",
        "can_fast_zero: true",
        "is_read_only: false",
    ] {
        assert!(info.contains(want), "nbdinfo lacks {want}:\n{info}");
    }
    let json = ok("nbdinfo", &["--json", &s.uri("disk")]);
    assert!(json.contains("\"export-size\": 1073741824"), "{json}");
    let ro = ok("nbdinfo", &[&s.uri("ro")]);
    assert!(ro.contains("is_read_only: true"), "{ro}");
    let list = ok("nbdinfo", &["--list", &s.uri("")]);
    for name in ["export=\"\"", "export=\"disk\"", "export=\"ro\""] {
        assert!(list.contains(name), "--list lacks {name}:\n{list}");
    }
    let out = run("nbdinfo", &[&s.uri("nosuch")]);
    assert!(!out.status.success(), "an unknown export is refused");
}

#[test]
fn nbdcopy_round_trips_and_map_shows_holes() {
    let s = Server::start("copy", &["memory:64M"]);
    let src = s.path("src.img");
    random_file(&src, 16 << 20, 7);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    ok("nbdcopy", &[src.to_str().unwrap(), &s.uri("")]);
    let back = s.path("back.img");
    ok("nbdcopy", &[&s.uri(""), back.to_str().unwrap()]);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(), "nbdcopy round trip differs");
    let map = ok("nbdinfo", &["--map", &s.uri("")]);
    assert!(map.contains("data") && map.contains("hole,zero"), "{map}");
}

#[test]
fn qemu_img_and_qemu_io_read_and_write_a_file_export() {
    let dir = std::env::temp_dir().join(format!("nbd-rs-server-qemu-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    let spec = format!("file:{}", disk.display());
    let s = Server::start("qemu", &["-v", &spec]);
    let src = dir.join("src.img");
    random_file(&src, 32 << 20, 11);
    ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &s.uri("")]);
    ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &s.uri("")]);
    let io = ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", &s.uri("")]);
    assert!(!io.contains("Pattern verification failed"), "{io}");
    // qemu's client negotiates extended headers (qemu 8.2 and later).
    let (status, log) = s.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("(extended headers)"), "{log}");
    // The file holds what was written, once the server is gone.
    let data = std::fs::read(&disk).unwrap();
    assert!(data[(1 << 20)..(1 << 20) + 65536].iter().all(|&b| b == 0x5a));
    assert_eq!(&data[..1 << 20], &std::fs::read(&src).unwrap()[..1 << 20]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fio_verifies_random_writes() {
    let s = Server::start("fio", &["memory:64M"]);
    let uri = s.uri("");
    let out = ok(
        "fio",
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=64",
            "--size=32m",
            "--verify=crc32c",
            "--output-format=terse",
        ],
    );
    // terse field 5 is the error code.
    let fields: Vec<&str> = out.lines().last().unwrap().split(';').collect();
    assert_eq!(fields.get(4), Some(&"0"), "fio reported an error: {out}");
}

#[test]
fn a_read_only_export_refuses_writes() {
    let s = Server::start("ro", &["--ro", "memory:1M"]);
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &s.uri("")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("ermission") || text.contains("read-only") || text.contains("read only"), "{text}");
}

#[test]
fn garbage_and_cut_connections_leave_the_server_serving() {
    let s = Server::start("hostile", &["memory:1M"]);
    // Not a client's flags: the server hangs up.
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.write_all(&[0xff; 64]).unwrap();
    let mut sink = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.read_to_end(&mut sink);
    // A client that leaves mid-request.
    let mut c = UnixStream::connect(&s.sock).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    c.write_all(&[0, 0, 0, 3]).unwrap();
    drop(c);
    let info = ok("nbdinfo", &[&s.uri("")]);
    assert!(info.contains("export-size: 1048576"), "{info}");
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_socket() {
    let s = Server::start("term", &["-v", "memory:1M"]);
    ok("nbdinfo", &[&s.uri("")]);
    let sock = s.sock.clone();
    let (status, log) = s.terminate();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(log.contains("signal 15"), "{log}");
    assert!(!sock.exists(), "the socket was left behind");
}

#[test]
fn an_oversize_request_gets_einval_and_the_connection_goes_on() {
    let s = Server::start("oversize", &["memory:128M"]);
    let (mut c, size) = raw_client(&s.sock);
    assert_eq!(size, 128 << 20);
    c.write_all(&request(0, 7, 0, 64 << 20)).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[..4].try_into().unwrap()), 0x6744_6698);
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 22, "NBD_EINVAL");
    assert_eq!(u64::from_be_bytes(reply[8..].try_into().unwrap()), 7);
    // And a READ past the end.
    c.write_all(&request(0, 8, (128 << 20) - 512, 1024)).unwrap();
    c.read_exact(&mut reply).unwrap();
    assert_ne!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0, "a READ past the end fails");
    // A good one still works.
    c.write_all(&request(0, 9, 0, 512)).unwrap();
    let mut good = [0u8; 16 + 512];
    c.read_exact(&mut good).unwrap();
    assert_eq!(u32::from_be_bytes(good[4..8].try_into().unwrap()), 0);
}

#[test]
fn a_client_that_never_reads_its_replies_cannot_grow_the_server() {
    let s = Server::start("unread", &["--max-bytes", "4M", "memory:64M"]);
    let pid = s.child.id();
    let before = rss_kib(pid);
    let (c, _) = raw_client(&s.sock);
    c.set_nonblocking(true).unwrap();
    let mut c = c;
    // 2 GiB of READ replies asked for; the client reads none of them.
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    'send: for i in 0..2048u64 {
        let r = request(0, i, (i % 64) << 20, 1 << 20);
        let mut at = 0;
        while at < r.len() {
            match c.write(&r[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        break 'send;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
        sent += 1;
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(sent < 2048, "the server kept reading requests whose replies nobody read ({sent} sent)");
    // 4 MiB of buffers and replies, plus the socket's own, plus slack.
    assert!(grown < 32 * 1024, "the server grew by {grown} KiB");
    drop(c);
    let info = ok("nbdinfo", &[&s.uri("")]);
    assert!(info.contains("export-size: 67108864"), "{info}");
}

#[test]
fn five_hundred_idle_connections_and_the_server_still_serves() {
    let s = Server::start("idle", &["memory:1M"]);
    let pid = s.child.id();
    let before = rss_kib(pid);
    let idle: Vec<UnixStream> = (0..500)
        .map(|_| {
            let mut c = UnixStream::connect(&s.sock).unwrap();
            let mut greeting = [0u8; 18];
            c.read_exact(&mut greeting).unwrap();
            c
        })
        .collect();
    let info = ok("nbdinfo", &[&s.uri("")]);
    assert!(info.contains("export-size: 1048576"), "{info}");
    let per = (rss_kib(pid).saturating_sub(before) as f64) / 500.0;
    assert!(per < 64.0, "{per:.1} KiB per idle connection");
    drop(idle);
}

#[test]
fn nbdkits_nbd_plugin_proxies_to_it() {
    let s = Server::start("proxy", &["memory:16M"]);
    let sock = format!("socket={}", s.sock.display());
    let out = ok("nbdkit", &["-U", "-", "nbd", &sock, "--run", "nbdinfo $uri && nbdcopy $uri null:"]);
    assert!(out.contains("export-size: 16777216"), "{out}");
}

#[test]
fn writes_whose_flush_was_answered_survive_a_kill() {
    let dir = std::env::temp_dir().join(format!("nbd-rs-server-killed-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let mut s = Server::start("kill", &[&format!("file:{}", disk.display())]);
    let (mut c, _) = raw_client(&s.sock);
    // Rounds of 16 writes of 64 KiB (each block tagged with its round),
    // then a FLUSH; the server is killed while a round is in flight.
    let mut flushed_rounds = 0u64;
    let killer = {
        let pid = s.child.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            Command::new("kill").arg("-KILL").arg(pid.to_string()).status().unwrap();
        })
    };
    'rounds: for round in 1..u64::MAX {
        let block = vec![round as u8; 65536];
        for i in 0..16u64 {
            let mut r = request(1, i, i * 65536, 65536);
            r.extend_from_slice(&block);
            if c.write_all(&r).is_err() {
                break 'rounds;
            }
        }
        // A FLUSH covers the writes answered before it: all 16 first.
        let mut reply = [0u8; 16];
        for _ in 0..16 {
            if c.read_exact(&mut reply).is_err() {
                break 'rounds;
            }
            assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0, "a write failed");
        }
        if c.write_all(&request(3, 99, 0, 0)).is_err() || c.read_exact(&mut reply).is_err() {
            break;
        }
        assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0, "the flush failed");
        assert_eq!(u64::from_be_bytes(reply[8..].try_into().unwrap()), 99);
        flushed_rounds = round;
        if round == 250 {
            break;
        }
    }
    killer.join().unwrap();
    let _ = s.child.wait();
    assert!(flushed_rounds >= 1, "no round was flushed before the kill");
    let data = std::fs::read(&disk).unwrap();
    for i in 0..16 {
        let b = &data[i * 65536..(i + 1) * 65536];
        // Each block holds the last flushed round or a later one.
        assert!(b.iter().all(|&x| x == b[0]), "block {i} is torn");
        assert!(
            u64::from(b[0]) >= flushed_rounds,
            "block {i} holds round {}, round {flushed_rounds} was flushed",
            b[0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn libnbd_starts_it_with_connect_command_and_socket_activation() {
    let server = env!("CARGO_BIN_EXE_nbd-rs-server");
    // nbdinfo [ CMD ] uses systemd socket activation.
    let info = ok("nbdinfo", &["--", "[", server, "memory:9M", "]"]);
    assert!(info.contains("export-size: 9437184"), "{info}");
    // connect_command hands the server a socket as stdin (-s).
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_command([{server:?}, '-s', 'memory:8M'])\n\
         h.pwrite(b'x' * 512, 4096)\nprint(h.get_size(), bytes(h.pread(3, 4096)))\nh.shutdown()\n"
    );
    let out = ok("/usr/bin/python3", &["-c", &script]);
    assert_eq!(out.trim(), "8388608 b'xxx'");
    // stdin that is not a socket is refused with a reason.
    let out = Command::new(server).args(["-s", "memory:1M"]).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin is not a socket"), "{out:?}");
}

#[test]
fn tls_with_psk_and_x509_as_libnbd_clients_use_it() {
    // PSK: a copy there and back, byte-identical; a client without TLS
    // and an unknown user are refused.
    let dir = std::env::temp_dir().join(format!("nbd-rs-server-tls-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("keys.psk");
    std::fs::write(&psk, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let s = Server::start("tls-psk", &["--tls-psk", psk.to_str().unwrap(), "--tls", "require", "memory:8M"]);
    let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", s.sock.display(), psk.display());
    let info = ok("nbdinfo", &[&uri]);
    assert!(info.contains("with TLS"), "{info}");
    let src = dir.join("src.img");
    random_file(&src, 8 << 20, 3);
    ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
    let back = dir.join("back.img");
    ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(), "the copy over TLS differs");
    assert!(!run("nbdinfo", &[&s.uri("")]).status.success(), "plaintext is refused with --tls require");
    let bob = uri.replace("alice@", "bob@");
    std::fs::write(&psk, "alice:0123456789abcdef0123456789abcdef\nbob:00112233445566778899aabbccddeeff\n").unwrap();
    assert!(!run("nbdinfo", &[&bob]).status.success(), "a user the server does not know is refused");
    drop(s);

    // X.509, with the certificates tests/tls-certs.sh makes.
    let certs = dir.join("certs");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tls-certs.sh");
    ok("bash", &[script, certs.to_str().unwrap()]);
    let server_dir = certs.join("server");
    let s = Server::start("tls-x509", &["--tls-certificates", server_dir.to_str().unwrap(), "memory:8M"]);
    let uri = format!("nbds+unix:///?socket={}&tls-certificates={}", s.sock.display(), certs.join("client").display());
    let info = ok("nbdinfo", &[&uri]);
    assert!(info.contains("with TLS") && info.contains("export-size: 8388608"), "{info}");
    // TLS is offered, not required: plaintext still works.
    assert!(ok("nbdinfo", &[&s.uri("")]).contains("without TLS"));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_connection_limit_turns_clients_away_until_one_leaves() {
    let s = Server::start("limit", &["--max-connections", "2", "memory:1M"]);
    let (a, _) = raw_client(&s.sock);
    let (_b, _) = raw_client(&s.sock);
    // A third is accepted and closed at once: no greeting.
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = Vec::new();
    let _ = c.read_to_end(&mut greeting);
    assert!(greeting.is_empty(), "a third client got {} bytes", greeting.len());
    drop(a);
    // Once one has left, a new client is served (the server may take a
    // moment to see the first one go).
    let start = Instant::now();
    loop {
        let out = run("nbdinfo", &[&s.uri("")]);
        if out.status.success() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no room after a client left");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_delivers_the_replies_of_requests_already_received() {
    let s = Server::start("drain", &["memory:64M"]);
    let (mut c, _) = raw_client(&s.sock);
    // 16 READs of 1 MiB: more reply than the socket holds, so most of it
    // is still the server's when SIGTERM comes.
    for i in 0..16u64 {
        c.write_all(&request(0, i, i << 20, 1 << 20)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    Command::new("kill").arg("-TERM").arg(s.child.id().to_string()).status().unwrap();
    let mut reply = vec![0u8; 16 + (1 << 20)];
    for _ in 0..16 {
        c.read_exact(&mut reply).expect("every reply arrives after SIGTERM");
        assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
    }
    // Then the server ends the connection and exits.
    let mut rest = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.read_to_end(&mut rest);
    let (status, log) = s.terminate();
    assert!(status.success(), "{log}");
}
