//! The fuzz harnesses as plain tests: sessions recorded from the scripted
//! server (nbdkit-, qemu- and nbd-server-like) for every target, and many
//! mutations of them, are played against the harnesses; no input may
//! break an invariant. With `FUZZ_CORPUS_DIR` set, the recorded sessions
//! are also written to `FUZZ_CORPUS_DIR/<target>/` as seeds for `cargo fuzz`.

mod support;

use nbd_proto::{CmdFlags, TlsMode};
use support::fuzz_client::{scripted_server, Cmd, Summary, EVERY_COMMAND};
use support::fuzz_handshake::{self, Step};
use support::fuzz_record::{Target, TARGETS};
use support::fuzz_server::{self as fs, Step as SStep, EVERY_STEP};
use support::fuzz_transmission::{self as tx, Op, IN_STREAM, PRESETS, STRICT};
use support::rng::Rng;
use support::server::Behaviour;

fn servers() -> Vec<(&'static str, Behaviour)> {
    let mut v =
        vec![("nbdkit", Behaviour::nbdkit()), ("qemu", Behaviour::qemu()), ("nbd-server", Behaviour::nbd_server())];
    for (_, b) in &mut v {
        // nbd-server-like presets only know the export "exp"; the scripts
        // mostly ask for "".
        b.exports.push((String::new(), String::new()));
        b.starttls = true;
    }
    v
}

/// `client` selectors: structured/extended on and off, opt mode, full
/// info, no meta contexts, strict mode, no NO_ZEROES and TLS allowed.
const SELECTORS: [u8; 8] = [0, 1, 2, 4, 8 | 4, 16, 32, 64 | 128];

fn handshake_scripts() -> Vec<(u8, Vec<Step>)> {
    use Step::*;
    vec![
        (0, vec![List, ListMetaContext, Info, Go]),
        (16, vec![Tls(TlsMode::Require), List, MetaContexts(1), ListMetaContext, Go]),
        (8, vec![StructuredReplies(false), ExtendedHeaders(false), FullInfo(true), Info, Go]),
        (1, vec![ExportName("exp"), Info, ExportName("a"), Info, ExportName(""), MetaContexts(2), Go]),
        (0, vec![ExtendedHeaders(false), MetaContexts(3), ListMetaContext, BlockSize(false), Go]),
        (64, vec![List, Abort]),
        (32, vec![]),
        // Nothing asked for automatically; the caller asks for each option.
        (3, vec![OptExtendedHeaders, OptStructuredReply, MetaContexts(1), OptSetMetaContext, Go]),
        (3, vec![OptStartTls, OptStructuredReply, OptSetMetaContext, List, Go]),
    ]
}

fn op_lists() -> Vec<Vec<Op>> {
    let read = |offset, len, chunks| Op::Cmd(Cmd::Read { offset, len, flags: CmdFlags::empty(), chunks });
    vec![
        EVERY_COMMAND.iter().map(|&c| Op::Cmd(c)).collect(),
        vec![
            Op::Cmd(Cmd::Write { offset: 0, len: 4096, flags: CmdFlags::empty() }),
            Op::Yield,
            read(0, 4096, false),
            read(0, 65536, true),
            read(0, 131072, true),
            Op::Yield,
            Op::Cmd(Cmd::BlockStatus { offset: 0, len: 1 << 20, flags: CmdFlags::empty() }),
            Op::Cmd(Cmd::BlockStatus { offset: 4096, len: 8192, flags: CmdFlags::REQ_ONE }),
            Op::Disconnect,
            read(0, 512, false),
        ],
        vec![
            Op::Cmd(Cmd::Read { offset: 4096, len: 4096, flags: CmdFlags::DF, chunks: true }),
            Op::Cmd(Cmd::Write { offset: 512, len: 512, flags: CmdFlags::FUA }),
            Op::AbandonUnsent,
            Op::Cmd(Cmd::Flush(CmdFlags::empty())),
            Op::Yield,
            Op::Cmd(Cmd::Trim { offset: 0, len: 4096, flags: CmdFlags::FUA }),
            Op::Cmd(Cmd::Zero { offset: 8192, len: 4096, flags: CmdFlags::NO_HOLE }),
            Op::Cmd(Cmd::Cache { offset: 0, len: 4096, flags: CmdFlags::empty() }),
        ],
        (0..16).map(|i| read(i * 4096, 4096 + i as usize, i % 2 == 0)).collect(),
        // Block status for one context of those negotiated (extended headers).
        vec![
            read(0, 512, false),
            Op::Yield,
            Op::Cmd(Cmd::BlockStatusFilter { offset: 0, len: 65536, flags: CmdFlags::empty() }),
            Op::Cmd(Cmd::BlockStatusFilter { offset: 4096, len: 8192, flags: CmdFlags::REQ_ONE }),
        ],
    ]
}

/// Every seed: target, name, input, and the summary of the live session.
fn seeds() -> Vec<(Target, String, Vec<u8>, Summary)> {
    let mut v = Vec::new();
    for (name, b) in servers() {
        for sel in SELECTORS {
            let (input, sum) = Target::Client.record(&[sel], &mut scripted_server(b.clone()));
            v.push((Target::Client, format!("{name}-{sel:02x}"), input, sum));
        }
        for (i, (sel, steps)) in handshake_scripts().into_iter().enumerate() {
            let header = fuzz_handshake::encode_header(sel, &steps);
            let (input, sum) = Target::Handshake.record(&header, &mut scripted_server(b.clone()));
            v.push((Target::Handshake, format!("{name}-{i}"), input, sum));
        }
    }
    for preset in 0..PRESETS.len() as u8 {
        for (i, ops) in op_lists().into_iter().enumerate() {
            let header = tx::encode_header(preset, &ops);
            let (input, sum) = Target::Transmission.record(&header, &mut tx::scripted_handshake(preset).0);
            v.push((Target::Transmission, format!("{}-{i}", PRESETS[usize::from(preset)]), input, sum));
        }
        // The handshake in the stream, strict mode on.
        let header = tx::encode_header(preset | IN_STREAM | STRICT, &op_lists()[0]);
        let (input, sum) = Target::Transmission.record(&header, &mut tx::preset_server(preset));
        v.push((Target::Transmission, format!("{}-stream", PRESETS[usize::from(preset)]), input, sum));
    }
    // Reconnects: a transmission session cut once the first commands
    // are out (they are sent again and answered by the replies that
    // follow), and one cut also at the end.
    for preset in 0..PRESETS.len() as u8 {
        for (i, ops) in op_lists().into_iter().enumerate() {
            let header = tx::encode_header(preset, &ops);
            let (input, _) = Target::Transmission.record(&header, &mut tx::scripted_handshake(preset).0);
            let stream = &input[header.len()..];
            let mut cut = [&header[..], &[0, 0], stream].concat();
            if i % 2 == 1 {
                cut.extend_from_slice(&[0, 0]);
            }
            let sum = Target::Reconnect.run(&cut);
            v.push((Target::Reconnect, format!("{}-{i}", PRESETS[usize::from(preset)]), cut, sum));
        }
    }
    // The client role against the server role: every client variant, and
    // server selectors for TLS, reply formats, read-only and block sizes.
    let mixed = [
        SStep::Write(0, 4096, CmdFlags::empty()),
        SStep::Status(0, 8192, CmdFlags::REQ_ONE),
        SStep::Read(0, 100_000, CmdFlags::empty()),
    ];
    for (name, client) in fs::seed_clients() {
        for (selector, mode) in [(0u8, 1u8), (1, 0), (2, 2), (4, 5), (8, 9), (16, 1), (32, 3), (64, 0)] {
            // TLS required: only the client that does TLS gets through.
            let selector = if name != "tls" && selector & 3 == 2 { selector ^ 3 } else { selector };
            let script: &[SStep] = if selector & 2 != 0 { &mixed } else { &EVERY_STEP };
            let input = fs::record(selector, mode, client.clone(), script);
            let sum = Target::Server.run(&input);
            v.push((Target::Server, format!("{name}-{selector:02x}-{mode}"), input, sum));
        }
    }
    v
}

#[test]
fn recorded_sessions_replay_as_they_ran() {
    let seeds = seeds();
    for (target, name, input, live) in &seeds {
        let replay = target.run(input);
        assert_eq!(&replay, live, "{}/{name}: the replay differs from the live session", target.name());
        match target {
            Target::Handshake => assert!(live.options_ok > 0, "{name}: no option succeeded: {live:?}"),
            _ => assert!(live.succeeded > 0, "{}/{name}: no command succeeded: {live:?}", target.name()),
        }
    }
    for t in TARGETS {
        assert!(seeds.iter().filter(|s| s.0 == t).count() >= 20, "{}: too few seeds", t.name());
    }
    // Sessions that reach transmission through opt mode and through every preset.
    assert!(seeds.iter().filter(|s| s.0 == Target::Handshake && s.3.connected).count() >= 10);
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = 1 + rng.below(m.len().saturating_sub(1));
        let last = m.len() - 1;
        match rng.below(6) {
            0 => m[at.min(last)] ^= 1 << rng.below(8),
            1 => m.truncate(at),
            2 => {
                let v: [u8; 4] = [[0, 0, 0, 0], [0xff; 4], [0x80, 0, 0, 0], [0, 0, 0, 1]][rng.below(4)];
                for (i, b) in v.iter().enumerate() {
                    if let Some(x) = m.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            3 => {
                let end = (at + rng.below(64)).min(m.len());
                let piece = m[at..end].to_vec();
                m.splice(at..at, piece);
            }
            4 => {
                let end = (at + rng.below(64)).min(m.len());
                m.drain(at..end);
            }
            _ => m[at.min(last)] = rng.next() as u8,
        }
        if m.len() < 2 {
            break;
        }
    }
    m
}

#[test]
fn mutated_sessions_never_break_an_invariant() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut runs = 0;
    let mut died = 0;
    for (target, _, seed, _) in seeds() {
        for _ in 0..100 {
            let s = target.run(&mutate(&seed, &mut rng));
            died += usize::from(s.end == "dead");
            runs += 1;
        }
    }
    assert!(runs >= 6000, "{runs} runs");
    assert!(died > runs / 20, "mutations should often kill the connection: {died} of {runs}");
}

#[test]
fn write_seed_corpus_when_asked() {
    let Some(dir) = std::env::var_os("FUZZ_CORPUS_DIR") else { return };
    let dir = std::path::PathBuf::from(dir);
    for (target, name, input, _) in seeds() {
        let d = dir.join(target.name());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), input).unwrap();
    }
    for t in TARGETS {
        assert!(std::fs::read_dir(dir.join(t.name())).unwrap().count() >= 20);
    }
}
