//! The committed seed corpus: sessions with real nbdkit, qemu-nbd and
//! nbd-server, recorded as inputs of every fuzz target
//! (`fuzz/seeds-real/<target>/<server>-<what>`), with how each session
//! ended in `fuzz/seeds-real/MANIFEST`. Every `cargo test` replays them
//! through the harnesses and checks they end exactly as they did live;
//! `FUZZ_REAL_SEEDS=1` (`make fuzz-seeds-real`) records them again.

mod support;

use nbd_proto::{CmdFlags, TlsMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::fuzz_client::Cmd;
use support::fuzz_handshake::{self, Step};
use support::fuzz_record::{Target, TARGETS};
use support::fuzz_transmission::{self as tx, Op, EXPORT_EXP, IN_STREAM, STRICT};
use support::peers::Peer;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds-real")
}

/// A real server to record against.
#[derive(Clone, Copy)]
enum Real {
    /// nbdkit with these arguments, separated by spaces.
    Nbdkit(&'static str),
    /// qemu-nbd on a 1 MiB raw image, with these arguments.
    Qemu(&'static [&'static str]),
    /// nbd-server with one 1 MiB export named "exp".
    NbdServer,
}

impl Real {
    fn start(self) -> Peer {
        match self {
            Real::Nbdkit(args) => Peer::nbdkit(&args.split(' ').collect::<Vec<_>>()),
            Real::Qemu(args) => Peer::qemu_nbd(args, |dir| {
                let image = dir.join("disk.raw");
                std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
                image
            }),
            Real::NbdServer => Peer::nbd_server(1 << 20),
        }
    }
}

const MEMORY: Real = Real::Nbdkit("memory 1M");
const QEMU: Real = Real::Qemu(&["-f", "raw", "-A"]);

fn transmission_ops() -> Vec<Op> {
    let e = CmdFlags::empty();
    vec![
        Op::Cmd(Cmd::Write { offset: 0, len: 8192, flags: CmdFlags::FUA }),
        Op::Yield,
        Op::Cmd(Cmd::Read { offset: 0, len: 4096, flags: e, chunks: false }),
        Op::Cmd(Cmd::Read { offset: 4096, len: 8192, flags: CmdFlags::DF, chunks: true }),
        Op::Cmd(Cmd::BlockStatus { offset: 0, len: 65536, flags: e }),
        Op::Cmd(Cmd::BlockStatus { offset: 0, len: 65536, flags: CmdFlags::REQ_ONE }),
        Op::Yield,
        Op::Cmd(Cmd::Trim { offset: 4096, len: 4096, flags: e }),
        Op::Cmd(Cmd::Zero { offset: 16384, len: 4096, flags: CmdFlags::FAST_ZERO }),
        Op::Cmd(Cmd::Cache { offset: 0, len: 4096, flags: e }),
        Op::Cmd(Cmd::Flush(e)),
        Op::Yield,
        Op::Cmd(Cmd::Read { offset: 0, len: 20480, flags: e, chunks: true }),
    ]
}

/// Every recorded session: target, file name, server, input header.
fn sessions() -> Vec<(Target, &'static str, Real, Vec<u8>)> {
    use Step::*;
    use Target::*;
    let hs = fuzz_handshake::encode_header;
    let exports = Real::Nbdkit(
        "--filter=exportname memory 1M exportname-list=explicit exportname=a exportname=b exportname-strict=true",
    );
    let reads: Vec<Op> = (0..12u64)
        .map(|i| Op::Cmd(Cmd::Read { offset: i * 65536, len: 512 << (i % 4), flags: CmdFlags::empty(), chunks: true }))
        .collect();
    let tx_all = |preset: u8| tx::encode_header(preset | IN_STREAM | STRICT, &transmission_ops());
    vec![
        (Client, "nbdkit-00", MEMORY, vec![0]),
        (Client, "nbdkit-0c", MEMORY, vec![12]),
        (Client, "nbdkit-oldstyle-00", Real::Nbdkit("-o memory 1M"), vec![0]),
        (Client, "nbdkit-newstyle-00", Real::Nbdkit("--mask-handshake=0 memory 1M"), vec![0]),
        (Client, "qemu-00", QEMU, vec![0]),
        (Client, "qemu-02", QEMU, vec![2]),
        (Client, "qemu-0c", QEMU, vec![12]),
        (Client, "nbd-server-04", Real::NbdServer, vec![4]),
        (Client, "nbd-server-0d", Real::NbdServer, vec![13]),
        (Handshake, "nbdkit-list-info-go", MEMORY, hs(0, &[List, ListMetaContext, Info, Go])),
        (Handshake, "nbdkit-tls-refused", MEMORY, hs(16, &[Tls(TlsMode::Allow), List, Abort])),
        (
            Handshake,
            "nbdkit-no-sr",
            MEMORY,
            hs(0, &[StructuredReplies(false), ExtendedHeaders(false), FullInfo(true), Info, Go]),
        ),
        (
            Handshake,
            "nbdkit-exports",
            exports,
            hs(0, &[List, ExportName("b"), FullInfo(true), Info, ExportName("exp"), Info, ExportName("a"), Go]),
        ),
        (Handshake, "qemu-contexts", QEMU, hs(0, &[List, MetaContexts(3), ListMetaContext, MetaContexts(1), Info, Go])),
        (Handshake, "qemu-compact", QEMU, hs(0, &[ExtendedHeaders(false), MetaContexts(2), ListMetaContext, Go])),
        (Handshake, "nbd-server-list-go", Real::NbdServer, hs(0, &[List, ExportName("exp"), Info, Go])),
        (Handshake, "nbd-server-abort", Real::NbdServer, hs(0, &[List, ListMetaContext, Abort])),
        (Handshake, "nbd-server-unknown-export", Real::NbdServer, hs(0, &[Info, Go])),
        (Transmission, "nbdkit", MEMORY, tx_all(0)),
        (
            Transmission,
            "nbdkit-error",
            Real::Nbdkit("--filter=error memory 1M error-pread=EIO error-pread-rate=100%"),
            tx_all(0),
        ),
        (
            Transmission,
            "nbdkit-delay",
            Real::Nbdkit("--filter=delay memory 1M rdelay=5ms"),
            tx::encode_header(IN_STREAM, &reads),
        ),
        (Transmission, "nbdkit-no-sr", Real::Nbdkit("--no-sr memory 1M"), tx_all(5)),
        (Transmission, "nbdkit-oldstyle", Real::Nbdkit("-o memory 1M"), tx_all(4)),
        (Transmission, "qemu-extended", QEMU, tx_all(1)),
        (Transmission, "qemu-compact", QEMU, tx_all(2)),
        (Transmission, "qemu-no-contexts", QEMU, tx_all(6)),
        (Transmission, "nbd-server", Real::NbdServer, tx_all(3 | EXPORT_EXP)),
    ]
}

/// `target/name` to the summary line each session ended with live.
fn manifest() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(corpus_dir().join("MANIFEST")).expect("fuzz/seeds-real/MANIFEST");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("`target/name: summary`");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn committed_real_sessions_replay_as_recorded() {
    let manifest = manifest();
    let mut files = 0;
    // Real sessions are recorded from real servers: the targets that play
    // the server have them; the server role's target would need real
    // clients, and reconnect's inputs are transmission sessions with cuts.
    for t in TARGETS.into_iter().filter(|&t| !matches!(t, Target::Server | Target::Reconnect)) {
        let mut servers = [0; 3];
        for entry in std::fs::read_dir(corpus_dir().join(t.name())).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let key = format!("{}/{name}", t.name());
            let want = manifest.get(&key).unwrap_or_else(|| panic!("{key} is not in the MANIFEST"));
            let got = t.run(&std::fs::read(&path).unwrap());
            assert_eq!(&got.line(), want, "{key}: the replay differs from the live session");
            match t {
                Target::Handshake => assert!(got.options_ok > 0, "{key}: {got:?}"),
                _ => assert!(got.succeeded > 0, "{key}: {got:?}"),
            }
            for (i, prefix) in ["nbdkit", "qemu", "nbd-server"].iter().enumerate() {
                servers[i] += usize::from(name.starts_with(prefix));
            }
            files += 1;
        }
        assert!(servers.iter().all(|&n| n > 0), "{}: sessions per server {servers:?}", t.name());
    }
    assert_eq!(files, manifest.len(), "MANIFEST names files that are missing");
    assert_eq!(files, sessions().len(), "the committed corpus is not what sessions() records");
}

#[test]
fn record_real_sessions_when_asked() {
    if std::env::var_os("FUZZ_REAL_SEEDS").is_none() {
        return;
    }
    let dir = corpus_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let mut manifest = String::from("# target/name: how the live session ended (written by `make fuzz-seeds-real`)\n");
    for (target, name, server, header) in sessions() {
        let peer = server.start();
        let (input, summary) = target.record(&header, &mut peer.connect());
        let d = dir.join(target.name());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), &input).unwrap();
        manifest.push_str(&format!("{}/{name}: {}\n", target.name(), summary.line()));
    }
    std::fs::write(dir.join("MANIFEST"), manifest).unwrap();
    assert_eq!(self::manifest().len(), sessions().len());
}
