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

#[test]
fn tls_with_psk_and_x509_as_qemus_client_uses_it() {
    let dir = std::env::temp_dir().join(format!("nbd-rs-server-qemu-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let psk_dir = dir.join("psk");
    std::fs::create_dir_all(&psk_dir).unwrap();
    // qemu reads DIR/keys.psk; the server reads the same file.
    let psk = psk_dir.join("keys.psk");
    std::fs::write(&psk, "alice:00112233445566778899aabbccddeeff\n").unwrap();
    let certs = dir.join("certs");
    ok("bash", &[concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tls-certs.sh"), certs.to_str().unwrap()]);
    let src = dir.join("src.img");
    random_file(&src, 8 << 20, 23);
    // What the export must hold at the end: the copy, then the pattern.
    let mut want = std::fs::read(&src).unwrap();
    want[1 << 20..(1 << 20) + 65536].fill(0x5a);
    let want_path = dir.join("want.img");
    std::fs::write(&want_path, &want).unwrap();
    let file_opts = |p: &std::path::Path| format!("driver=raw,file.driver=file,file.filename={}", p.display());

    let psk_object = format!("tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice", psk_dir.display());
    // Over a Unix socket qemu has no host name to check the certificate
    // against unless given one.
    let x509_object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", certs.join("client").display());
    let server_certs = certs.join("server");
    for (name, creds, object, hostname) in [
        ("psk", ["--tls-psk", psk.to_str().unwrap()], &psk_object, ""),
        ("x509", ["--tls-certificates", server_certs.to_str().unwrap()], &x509_object, ",tls-hostname=localhost"),
    ] {
        let s =
            Server::start(&format!("qemu-tls-{name}"), &["-v", "--tls", "require", creds[0], creds[1], "memory:8M"]);
        let nbd = format!("driver=nbd,path={},tls-creds=tls0{hostname}", s.sock.display());
        ok(
            "qemu-img",
            &with_object(object, &["convert", "-n", "--image-opts", &file_opts(&src), "--target-image-opts", &nbd]),
        );
        let io = ok(
            "qemu-io",
            &with_object(object, &["--image-opts", &nbd, "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"]),
        );
        assert!(io.contains("read 65536/65536 bytes at offset 1048576"), "{name}: {io}");
        assert!(!io.contains("Pattern verification failed"), "{name}: {io}");
        // The check above can fail: a pattern that is not there is caught.
        let wrong = run("qemu-io", &with_object(object, &["--image-opts", &nbd, "-c", "read -P 0xa5 1M 64k"]));
        let text = String::from_utf8_lossy(&wrong.stdout);
        assert!(text.contains("Pattern verification failed"), "{name}: {text}");
        let cmp = ok("qemu-img", &with_object(object, &["compare", "--image-opts", &file_opts(&want_path), &nbd]));
        assert!(cmp.contains("Images are identical"), "{name}: {cmp}");
        let differs = run("qemu-img", &with_object(object, &["compare", "--image-opts", &file_opts(&src), &nbd]));
        assert_eq!(differs.status.code(), Some(1), "{name}: compare against the file before the pattern");

        // qemu without credentials is refused, and says why.
        let plain = run("qemu-img", &["info", "--image-opts", &format!("driver=nbd,path={}", s.sock.display())]);
        let err = String::from_utf8_lossy(&plain.stderr);
        assert!(!plain.status.success(), "{name}: qemu without TLS was served");
        assert!(err.contains("TLS"), "{name}: {err}");

        let (status, log) = s.terminate();
        assert!(status.success(), "{name}: {log}");
        // Every connection that reached an export did so over TLS.
        let served: Vec<&str> = log.lines().filter(|l| l.contains("serving export")).collect();
        assert!(served.len() >= 5, "{name}: {log}");
        assert!(served.iter().all(|l| l.ends_with(", TLS)")), "{name}: {log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `args` with `--object OBJECT` after the first (qemu-img wants it after
/// its subcommand; qemu-io takes it anywhere).
fn with_object<'a>(object: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.splice(1..1, ["--object", object]);
    all
}

/// A child process killed when dropped, so a failed assertion leaves none
/// behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port nothing listens on now (the server binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn the_log_names_each_connection_and_a_client_killed_mid_write() {
    // Over TCP the log names each connection by its address, which the
    // test can match with the client's own port.
    let port = free_port().to_string();
    let s = Server::start("connlog", &["-v", "-p", &port, "--bind", "127.0.0.1", "memory:1M"]);
    let uri = format!("nbd://127.0.0.1:{port}/");
    assert!(ok("nbdinfo", &[&uri]).contains("export-size: 1048576"));

    // A client that sends a WRITE header and 1000 of its 65536 payload
    // bytes, says its port, and is then killed with SIGKILL.
    let script = r#"
import socket, struct, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def read(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("the server hung up")
        b += c
    return b
assert read(18)[:16] == b"NBDMAGICIHAVEOPT"
s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 0))
read(10)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 65536) + b"x" * 1000)
print(s.getsockname()[1], flush=True)
time.sleep(60)
"#;
    let mut writer = Killed(
        Command::new("/usr/bin/python3")
            .args(["-c", script, &port])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (make deps)"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(writer.0.stdout.take().unwrap()), &mut line).unwrap();
    let killed_port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("the writer said {line:?}"));
    drop(writer);
    // Let the server see that connection end before SIGTERM stops it
    // reading: one more client, served after the cut was pending.
    std::thread::sleep(Duration::from_millis(200));
    ok("nbdinfo", &[&uri]);
    let (status, log) = s.terminate();
    assert!(status.success(), "{log}");

    let lines: Vec<&str> = log.lines().collect();
    let at = |text: &str| lines.iter().position(|l| l.contains(text));
    // nbdinfo's connections (Server::start's probe came over the Unix
    // socket): each is named when it comes, when it gets its export and
    // when it goes, in that order.
    let peers: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("nbd-rs-server: ")?.strip_suffix(": connected"))
        .filter(|p| p.starts_with("127.0.0.1:") && *p != format!("127.0.0.1:{killed_port}"))
        .map(str::to_owned)
        .collect();
    assert!(peers.len() >= 2, "{log}");
    for p in &peers {
        let connected = at(&format!("{p}: connected")).unwrap();
        let serving = at(&format!("{p}: serving export \"\"")).unwrap_or_else(|| panic!("{p} got no export: {log}"));
        let gone = at(&format!("{p}: disconnected")).unwrap_or_else(|| panic!("{p} never left: {log}"));
        assert!(connected < serving && serving < gone, "{log}");
    }
    // The killed client: connected, then an error naming the cut.
    let killed = format!("127.0.0.1:{killed_port}");
    assert!(at(&format!("{killed}: connected")).is_some(), "{log}");
    let cut = lines.iter().rfind(|l| l.starts_with(&format!("nbd-rs-server: {killed}: "))).unwrap();
    assert!(cut.contains("client protocol error") && cut.contains("in the middle of a request"), "{log}");
    assert!(at(&format!("{killed}: disconnected")).is_none(), "a cut WRITE counted as a clean end: {log}");
}

#[test]
fn clients_that_hang_up_early_leave_no_error_in_the_log() {
    let s = Server::start("early", &["memory:1M"]);
    for i in 0..20 {
        let _c = UnixStream::connect(&s.sock).unwrap();
        match i % 4 {
            // Gone before the greeting is sent or read.
            0 => {}
            // Gone with the greeting unread: the socket resets.
            1 => std::thread::sleep(Duration::from_millis(5)),
            // Gone after the handshake, between requests.
            2 => drop(raw_client(&s.sock)),
            // Gone with a reply unread.
            _ => {
                let (mut t, _) = raw_client(&s.sock);
                t.write_all(&request(0, 1, 0, 65536)).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    ok("nbdinfo", &[&s.uri("")]);
    let (status, log) = s.terminate();
    assert!(status.success(), "{log}");
    assert!(log.is_empty(), "without -v, clients that hang up are not errors:\n{log}");
}

#[test]
fn clients_waiting_when_descriptors_ran_out_are_served_when_one_frees() {
    // Few descriptors: the server's own take some, then the clients.
    let dir = std::env::temp_dir().join(format!("nbd-rs-server-emfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n 16 && exec {} -U {} memory:1M", env!("CARGO_BIN_EXE_nbd-rs-server"), sock.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "the server did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let greeted = |c: &mut UnixStream| {
        c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).is_ok()
    };
    let mut clients: Vec<UnixStream> = (0..16).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    let served: Vec<bool> = clients.iter_mut().map(greeted).collect();
    let waiting: Vec<usize> = (0..served.len()).filter(|&i| !served[i]).collect();
    assert!(waiting.len() >= 2 && served[0] && served[1], "served: {served:?}");
    // Two leave: the first two waiting get their descriptors.
    clients.drain(..2);
    let now_served = waiting[..2].iter().filter(|&&i| greeted(&mut clients[i - 2])).count();
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(now_served, 2, "clients left in the backlog when descriptors freed:\n{log}");
    assert!(status.success(), "{log}");
    assert!(log.contains("accept: Too many open files"), "{log}");
}

/// A raw NBD client over TLS (Python's ssl module, through memory BIOs
/// so that it can half-close the socket under the TLS session): after
/// STARTTLS and GO, sends `READ_BYTES` of READ (or `WRITES` WRITEs of
/// 4 KiB), then NBD_CMD_DISC, optionally shuts its sending side, and
/// prints how many reply bytes came before the end of the stream.
const TLS_RAW_CLIENT: &str = r#"
import socket, ssl, struct, sys
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_UNIX); s.connect(path)
def recvn(k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b))
        if not c: sys.exit("the server hung up in the handshake")
        b += c
    return b
recvn(18); s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 5, 0))
assert struct.unpack(">QIII", recvn(20))[2] == 1, "STARTTLS refused"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
t = ctx.wrap_bio(inc, out)
def flush():
    d = out.read()
    if d: s.sendall(d)
while True:
    try:
        t.do_handshake(); flush(); break
    except ssl.SSLWantReadError:
        flush(); inc.write(s.recv(65536))
def read(k):
    b = b""
    while len(b) < k:
        try:
            b += t.read(k - len(b))
        except ssl.SSLWantReadError:
            c = s.recv(1 << 20)
            if not c: return b
            inc.write(c)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b
    return b
t.write(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0)); flush()
while True:
    _, _, typ, ln = struct.unpack(">QIII", read(20)); read(ln)
    if typ == 1: break
    assert typ < 0x80000000, "GO refused"
if mode == "read":
    msg = struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, n)
    expect = 16 + n
else:
    msg = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 1, i, i * 4096, 4096) + b"\xab" * 4096 for i in range(n))
    expect = 16 * n
t.write(msg + struct.pack(">IHHQQI", 0x25609513, 0, 2, 99, 0, 0)); flush()
if mode == "write":
    s.shutdown(socket.SHUT_WR)
got = read(expect + 1)
print(len(got), expect)
"#;

#[test]
fn over_tls_the_last_reply_is_whole_and_requests_come_before_the_end_of_stream() {
    let dir = std::env::temp_dir().join(format!("nbd-rs-server-certs-tls-end-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = dir.join("certs");
    ok("bash", &[concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tls-certs.sh"), certs.to_str().unwrap()]);
    let s = Server::start("tls-end", &["--tls-certificates", certs.join("server").to_str().unwrap(), "memory:16M"]);
    let sock = s.sock.to_str().unwrap().to_owned();
    // An 8 MiB reply, then the close that NBD_CMD_DISC asks for: every
    // TLS record of the reply leaves before the socket closes.
    let read = ok("/usr/bin/python3", &["-c", TLS_RAW_CLIENT, &sock, "read", &(8 << 20).to_string()]);
    let (got, want) = read.trim().split_once(' ').unwrap();
    assert_eq!(got, want, "reply bytes before the close, of those owed");
    // 500 WRITEs, NBD_CMD_DISC and the end of the stream in one burst:
    // more than the server takes at once (64 in flight), so most wait
    // decrypted inside the TLS session when the end arrives.
    let write = ok("/usr/bin/python3", &["-c", TLS_RAW_CLIENT, &sock, "write", "500"]);
    let (got, want) = write.trim().split_once(' ').unwrap();
    assert_eq!(got, want, "replies to the WRITEs sent before the end of the stream");
    let (status, log) = s.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("in the middle of a request"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn requests_larger_than_the_byte_limit_are_split_by_the_client_not_stuck() {
    // The export advertises a maximum block size within --max-bytes, so
    // qemu splits a 1040 KiB write; a WRITE beyond it gets EINVAL rather
    // than waiting for room it can never have.
    let s = Server::start("max-bytes", &["--max-bytes", "1M", "memory:8M"]);
    let img = format!("nbd+unix:///?socket={}", s.sock.display());
    let out = ok("qemu-io", &["-f", "raw", &img, "-c", "write -P 0x5a 0 1040K", "-c", "read -P 0x5a 0 1040K"]);
    assert!(out.contains("wrote 1064960/1064960") && out.contains("read 1064960/1064960"), "{out}");
    let info = ok("nbdinfo", &[&s.uri("")]);
    assert!(info.contains("block_size_maximum: 1048576"), "{info}");
    let (mut c, _) = raw_client(&s.sock);
    c.write_all(&request(1, 5, 0, (1 << 20) + 4096)).unwrap();
    let mut r = [0u8; 16];
    c.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 22, "NBD_EINVAL for a WRITE above the maximum");
}

#[test]
fn stdin_may_be_any_stream_socket_and_nothing_else() {
    // TCP on stdin, as inetd hands a connection over.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (accepted, _) = l.accept().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbd-rs-server"))
        .args(["-s", "memory:1M"])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(accepted)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut greeting = [0u8; 18];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    drop(c);
    assert!(child.wait().unwrap().success(), "the server ends with its one connection");
    // Not a socket: refused at once, saying why.
    let out = Command::new(env!("CARGO_BIN_EXE_nbd-rs-server"))
        .args(["-s", "memory:1M"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin is not a socket"), "{out:?}");
}
