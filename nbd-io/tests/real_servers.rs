//! The core against real servers: nbdkit, qemu-nbd and nbd-server, each
//! started on a Unix socket by the test, driven through the I/O loop the
//! C library uses (`nbd_io::Driver` over `nbd_io::pump`).

// The servers are started as nbd-proto's fuzz seed recorder starts them.
#[path = "../../nbd-proto/tests/support/peers.rs"]
mod peers;

use nbd_io::Driver;
use nbd_proto::errno::{EIO, ENOENT};
use nbd_proto::*;
use peers::Peer;
use std::process::Command;

fn config(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    f(&mut c);
    c
}

fn connect(peer: &Peer, cfg: Config) -> Driver {
    let mut d = Driver::new(Connection::new(cfg), peer.connect()).expect("socket");
    d.handshake().expect("handshake I/O");
    d
}

fn ready(peer: &Peer, cfg: Config) -> Driver {
    let d = connect(peer, cfg);
    assert_eq!(d.conn.state(), PublicState::Ready, "handshake failed: {:?}", d.conn.error());
    d
}

fn with_base_allocation() -> Config {
    config(|c| c.add_meta_context("base:allocation").unwrap())
}

fn extents_of(d: &mut Driver, cookie: Cookie) -> Vec<(u32, Vec<Extent>)> {
    let mut out = Vec::new();
    d.events.retain(|e| match e {
        Event::Extents { cookie: c, context_id, extents, .. } if *c == cookie => {
            out.push((*context_id, extents.clone()));
            false
        }
        _ => true,
    });
    out
}

fn disconnect(d: &mut Driver) {
    d.conn.disconnect().unwrap();
    d.run_until(|c| c.state() == PublicState::Closed).unwrap();
    assert_eq!(d.conn.state(), PublicState::Closed);
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut at = offset - offset % 8;
    while v.len() < len + 8 {
        v.extend_from_slice(&at.to_be_bytes());
        at += 8;
    }
    let skip = (offset % 8) as usize;
    v[skip..skip + len].to_vec()
}

#[test]
fn nbdkit_memory_every_command() {
    let peer = Peer::nbdkit(&["memory", "16M"]);
    let mut d = ready(&peer, with_base_allocation());
    assert_eq!(d.conn.protocol(), Some(Protocol::NewstyleFixed));
    assert!(d.conn.structured_replies_negotiated());
    assert!(!d.conn.extended_headers_negotiated(), "nbdkit 1.32 has no extended headers");
    assert_eq!(d.conn.export().size, Some(16 << 20));
    let flags = d.conn.export().flags;
    for f in [TransmissionFlags::SEND_FLUSH, TransmissionFlags::SEND_TRIM, TransmissionFlags::CAN_MULTI_CONN] {
        assert!(flags.contains(f), "{f:?} missing from {flags:?}");
    }
    assert_eq!(d.conn.meta_contexts().unwrap().len(), 1);

    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 256) as u8).collect();
    let w = d.conn.write(1 << 20, data.clone(), CmdFlags::FUA).unwrap();
    d.wait(w).unwrap();
    let r = d.conn.read(1 << 20, vec![0; data.len()], CmdFlags::empty()).unwrap();
    assert_eq!(d.wait(r).unwrap().unwrap(), data);

    let bs = d.conn.block_status(0, 4 << 20, CmdFlags::empty()).unwrap();
    d.wait(bs).unwrap();
    let ext = extents_of(&mut d, bs);
    assert_eq!(ext.len(), 1);
    let (_, list) = &ext[0];
    assert_eq!(list[0], Extent { length: 1 << 20, flags: 3 }, "hole before the data");
    assert_eq!(list[1].flags, 0, "data is allocated");

    for cookie in [
        d.conn.trim(1 << 20, 4096, CmdFlags::empty()).unwrap(),
        d.conn.write_zeroes(2 << 20, 65536, CmdFlags::FAST_ZERO).unwrap(),
        d.conn.cache(0, 65536, CmdFlags::empty()).unwrap(),
        d.conn.flush(CmdFlags::empty()).unwrap(),
    ] {
        d.wait(cookie).unwrap();
    }
    let r = d.conn.read(1 << 20, vec![0xff; 4096], CmdFlags::empty()).unwrap();
    assert_eq!(d.wait(r).unwrap().unwrap(), vec![0; 4096], "trimmed range reads zero");
    disconnect(&mut d);
}

#[test]
fn nbdkit_many_in_flight_reordered_by_delay_filter() {
    let peer = Peer::nbdkit(&["--filter=delay", "pattern", "64M", "rdelay=20ms"]);
    let mut d = ready(&peer, Config::default());
    let cookies: Vec<(Cookie, u64)> = (0..64u64)
        .map(|i| {
            let off = (i * 977 * 4096 + i) % (60 << 20);
            (d.conn.read(off, vec![0; 4096 + i as usize], CmdFlags::empty()).unwrap(), off)
        })
        .collect();
    assert_eq!(d.conn.in_flight(), 64);
    for (i, (cookie, off)) in cookies.into_iter().enumerate() {
        let buf = d.wait(cookie).unwrap().unwrap();
        assert_eq!(buf, pattern(off, 4096 + i), "read {i} at {off}");
    }
    assert_eq!(d.conn.in_flight(), 0);
    disconnect(&mut d);
}

#[test]
fn nbdkit_large_reads_land_in_the_buffer() {
    let peer = Peer::nbdkit(&["pattern", "64M"]);
    let mut d = ready(&peer, Config::default());
    let r = d.conn.read_structured(3 << 20, vec![0; 8 << 20], CmdFlags::empty()).unwrap();
    let buf = d.wait(r).unwrap().unwrap();
    assert_eq!(buf, pattern(3 << 20, 8 << 20));
    let chunks = d.events.iter().filter(|e| matches!(e, Event::ReadChunk { cookie, .. } if *cookie == r)).count();
    assert!(chunks >= 1);
    disconnect(&mut d);
}

#[test]
fn nbdkit_oldstyle() {
    let peer = Peer::nbdkit(&["-o", "pattern", "1M"]);
    let mut d = ready(&peer, Config::default());
    assert_eq!(d.conn.protocol(), Some(Protocol::Oldstyle));
    assert!(!d.conn.structured_replies_negotiated());
    let r = d.conn.read(8, vec![0; 16], CmdFlags::empty()).unwrap();
    assert_eq!(d.wait(r).unwrap().unwrap(), pattern(8, 16));
    disconnect(&mut d);
}

#[test]
fn nbdkit_non_fixed_newstyle() {
    let peer = Peer::nbdkit(&["--mask-handshake=0", "pattern", "1M"]);
    let mut d = ready(&peer, Config::default());
    assert_eq!(d.conn.protocol(), Some(Protocol::Newstyle));
    let r = d.conn.read(4096, vec![0; 4096], CmdFlags::empty()).unwrap();
    assert_eq!(d.wait(r).unwrap().unwrap(), pattern(4096, 4096));
    disconnect(&mut d);
}

#[test]
fn nbdkit_without_structured_replies() {
    let peer = Peer::nbdkit(&["--no-sr", "pattern", "1M"]);
    let mut d = ready(&peer, with_base_allocation());
    assert!(!d.conn.structured_replies_negotiated());
    let r = d.conn.read(100, vec![0; 5000], CmdFlags::empty()).unwrap();
    assert_eq!(d.wait(r).unwrap().unwrap(), pattern(100, 5000));
    let e = d.conn.block_status(0, 4096, CmdFlags::empty()).unwrap_err();
    assert_eq!(e, Error::Local(LocalError::NoMetaContexts));
    disconnect(&mut d);
}

#[test]
fn nbdkit_error_filter_reports_eio_and_stays_ready() {
    let peer = Peer::nbdkit(&["--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%"]);
    let mut d = ready(&peer, Config::default());
    let r = d.conn.read(0, vec![0; 4096], CmdFlags::empty()).unwrap();
    let e = d.wait(r).unwrap_err();
    assert_eq!(e.errno(), EIO);
    assert!(matches!(e, Error::Server(ServerError::Command { .. })), "{e:?}");
    let w = d.conn.write(0, vec![1; 512], CmdFlags::empty()).unwrap();
    d.wait(w).unwrap();
    assert_eq!(d.conn.state(), PublicState::Ready);
    disconnect(&mut d);
}

#[test]
fn nbdkit_opt_mode_list_info_go() {
    let peer = Peer::nbdkit(&[
        "--filter=exportname",
        "memory",
        "1M",
        "exportname-list=explicit",
        "exportname=a",
        "exportname=b",
    ]);
    let cfg = config(|c| {
        c.opt_mode = true;
        c.full_info = true;
        c.add_meta_context("base:allocation").unwrap();
    });
    let mut d = connect(&peer, cfg);
    assert_eq!(d.conn.state(), PublicState::Negotiating);
    d.conn.opt_list().unwrap();
    d.wait_option().unwrap();
    let names: Vec<String> = d
        .events
        .iter()
        .filter_map(|e| match e {
            Event::ExportListed { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["a", "b"]);

    d.conn.opt_list_meta_context().unwrap();
    d.wait_option().unwrap();
    assert!(d.events.iter().any(|e| matches!(e, Event::MetaContextListed { name } if name == "base:allocation")));

    d.conn.config_mut().unwrap().set_export_name("b").unwrap();
    d.conn.opt_info().unwrap();
    d.wait_option().unwrap();
    assert_eq!(d.conn.state(), PublicState::Negotiating);
    assert_eq!(d.conn.export().size, Some(1 << 20));
    assert_eq!(d.conn.export().canonical_name.as_deref(), Some("b"));

    d.conn.opt_go().unwrap();
    d.wait_option().unwrap();
    assert_eq!(d.conn.state(), PublicState::Ready);
    disconnect(&mut d);
}

#[test]
fn nbdkit_go_to_unknown_export_fails_with_enoent() {
    let peer = Peer::nbdkit(&["--filter=exportname", "memory", "1M", "exportname=a", "exportname-strict=true"]);
    let d = connect(&peer, config(|c| c.set_export_name("nope").unwrap()));
    assert_eq!(d.conn.state(), PublicState::Dead);
    assert_eq!(d.conn.error().unwrap().errno(), ENOENT, "{:?}", d.conn.error());
}

#[test]
fn nbdkit_opt_abort_closes() {
    let peer = Peer::nbdkit(&["memory", "1M"]);
    let mut d = connect(&peer, config(|c| c.opt_mode = true));
    d.conn.opt_abort().unwrap();
    d.run_until(|c| c.state() == PublicState::Closed).unwrap();
    assert_eq!(d.conn.state(), PublicState::Closed);
}

#[test]
fn nbdkit_server_killed_mid_flight_fails_every_command() {
    let peer = Peer::nbdkit(&["--filter=delay", "memory", "16M", "rdelay=1"]);
    let mut d = ready(&peer, Config::default());
    let cookies: Vec<Cookie> =
        (0..16).map(|i| d.conn.read(i * 4096, vec![0; 4096], CmdFlags::empty()).unwrap()).collect();
    d.flush().unwrap();
    drop(peer);
    for c in cookies {
        let e = d.wait(c).unwrap_err();
        assert!(matches!(e, Error::Transport(_)), "{e:?}");
    }
    assert_eq!(d.conn.state(), PublicState::Dead);
}

fn qemu_raw(dir: &std::path::Path) -> std::path::PathBuf {
    let image = dir.join("disk.raw");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(16 << 20).unwrap();
    image
}

#[test]
fn qemu_nbd_extended_headers_sparse_reads_and_two_contexts() {
    let peer = Peer::qemu_nbd(&["-f", "raw", "-A"], qemu_raw);
    let cfg = config(|c| {
        c.add_meta_context("base:allocation").unwrap();
        c.add_meta_context("qemu:allocation-depth").unwrap();
    });
    let mut d = ready(&peer, cfg);
    assert!(d.conn.extended_headers_negotiated());
    assert_eq!(d.conn.meta_contexts().unwrap().len(), 2);

    let w = d.conn.write(65536, vec![0x42; 65536], CmdFlags::empty()).unwrap();
    d.wait(w).unwrap();
    let r = d.conn.read_structured(0, vec![0xee; 4 << 20], CmdFlags::empty()).unwrap();
    let buf = d.wait(r).unwrap().unwrap();
    assert!(buf[..65536].iter().all(|&b| b == 0), "hole zero-filled");
    assert!(buf[65536..131072].iter().all(|&b| b == 0x42));
    assert!(buf[131072..].iter().all(|&b| b == 0));
    let holes = d
        .events
        .iter()
        .filter(|e| matches!(e, Event::ReadChunk { cookie, status: ChunkStatus::Hole, .. } if *cookie == r))
        .count();
    assert!(holes >= 1, "qemu-nbd sends holes as HOLE chunks");

    let bs = d.conn.block_status(0, 1 << 20, CmdFlags::empty()).unwrap();
    d.wait(bs).unwrap();
    let per_context = extents_of(&mut d, bs);
    assert_eq!(per_context.len(), 2, "one extent list per context");

    let reads: Vec<Cookie> =
        (0..64).map(|i| d.conn.read(i * 65536, vec![0; 65536], CmdFlags::empty()).unwrap()).collect();
    for (i, c) in reads.into_iter().enumerate() {
        let b = d.wait(c).unwrap().unwrap();
        assert_eq!(b[0], if i == 1 { 0x42 } else { 0 });
    }
    disconnect(&mut d);
}

#[test]
fn qemu_nbd_dirty_bitmap_context() {
    let peer = Peer::qemu_nbd(&["-f", "qcow2", "-B", "b0"], |dir| {
        let image = dir.join("disk.qcow2");
        let ok = |c: &mut Command| assert!(c.status().expect("qemu-img").success());
        ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
        ok(Command::new("qemu-img").args(["bitmap", "--add"]).arg(&image).arg("b0"));
        image
    });
    let cfg = config(|c| {
        c.add_meta_context("base:allocation").unwrap();
        c.add_meta_context("qemu:dirty-bitmap:b0").unwrap();
    });
    let mut d = ready(&peer, cfg);
    let names: Vec<&str> = d.conn.meta_contexts().unwrap().iter().map(|m| m.name.as_str()).collect();
    assert!(names.contains(&"qemu:dirty-bitmap:b0"), "{names:?}");
    let bs = d.conn.block_status(0, 16 << 20, CmdFlags::empty()).unwrap();
    d.wait(bs).unwrap();
    assert_eq!(extents_of(&mut d, bs).len(), 2);
    disconnect(&mut d);
}

#[test]
fn qemu_nbd_without_extended_headers_uses_structured_replies() {
    let peer = Peer::qemu_nbd(&["-f", "raw"], qemu_raw);
    let mut d = ready(&peer, config(|c| c.request_extended_headers = false));
    assert!(!d.conn.extended_headers_negotiated());
    assert!(d.conn.structured_replies_negotiated());
    let w = d.conn.write(0, vec![9; 4096], CmdFlags::FUA).unwrap();
    d.wait(w).unwrap();
    let r = d.conn.read(0, vec![0; 8192], CmdFlags::empty()).unwrap();
    let b = d.wait(r).unwrap().unwrap();
    assert_eq!(&b[..4096], &[9; 4096][..]);
    assert_eq!(&b[4096..], &[0; 4096][..]);
    disconnect(&mut d);
}

#[test]
fn nbd_server_simple_replies_and_abort_without_reply() {
    let peer = Peer::nbd_server(4 << 20);
    let mut d = ready(&peer, config(|c| c.set_export_name("exp").unwrap()));
    assert!(!d.conn.structured_replies_negotiated());
    assert_eq!(d.conn.export().size, Some(4 << 20));
    let w = d.conn.write(4096, vec![0x11; 8192], CmdFlags::FUA).unwrap();
    d.wait(w).unwrap();
    let r = d.conn.read(0, vec![0xff; 16384], CmdFlags::empty()).unwrap();
    let b = d.wait(r).unwrap().unwrap();
    assert_eq!(&b[..4096], &[0; 4096][..]);
    assert_eq!(&b[4096..12288], &[0x11; 8192][..]);
    let f = d.conn.flush(CmdFlags::empty()).unwrap();
    d.wait(f).unwrap();
    disconnect(&mut d);

    let mut d = connect(&peer, config(|c| c.opt_mode = true));
    d.conn.opt_abort().unwrap();
    d.run_until(|c| c.state() == PublicState::Closed).unwrap();
    assert_eq!(d.conn.state(), PublicState::Closed);
}
