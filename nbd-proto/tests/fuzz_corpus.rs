//! The fuzz harness as a plain test: sessions recorded from the scripted
//! server (nbdkit-, qemu- and nbd-server-like) and many mutations of them
//! are played against the client script; no input may break an invariant.
//! With `FUZZ_CORPUS_DIR` set, the recorded sessions are also written there
//! as a seed corpus for `cargo fuzz`.

mod support;

use nbd_proto::Connection;
use support::fuzz_client::{config_for, run_client, ClientScript};
use support::server::{Behaviour, Server};

/// Plays the client script against a scripted server and returns the
/// fuzz input that replays it: selector byte, then what the server sent,
/// framed by burst.
fn record(selector: u8, behaviour: Behaviour) -> Vec<u8> {
    let mut c: Connection<Vec<u8>> = Connection::new(config_for(selector));
    c.handle_connected().unwrap();
    let mut server = Server::new(behaviour, 1 << 20);
    server.disk[4096..8192].fill(0x5a);
    let mut script = ClientScript::default();
    let mut input = vec![selector];
    loop {
        // An opt_* call refused locally sends nothing; the script moves on.
        let mut sent = Vec::new();
        for _ in 0..4 {
            script.step(&mut c);
            sent = ClientScript::transmit(&mut c);
            if !sent.is_empty() {
                break;
            }
        }
        server.receive(&sent);
        let out = std::mem::take(&mut server.out);
        if out.is_empty() && sent.is_empty() {
            return input;
        }
        for frame in out.chunks(u16::MAX as usize) {
            input.extend_from_slice(&(frame.len() as u16).to_be_bytes());
            input.extend_from_slice(frame);
        }
        c.receive(&out);
        script.drain(&mut c);
    }
}

fn presets() -> Vec<(&'static str, Behaviour)> {
    vec![("nbdkit", Behaviour::nbdkit()), ("qemu", Behaviour::qemu()), ("nbd-server", Behaviour::nbd_server())]
}

/// Selectors covering structured/extended on and off, opt mode, full info,
/// no meta contexts, strict mode, no NO_ZEROES and TLS allowed.
const SELECTORS: [u8; 8] = [0, 1, 2, 4, 8 | 4, 16, 32, 64 | 128];

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for (name, b) in presets() {
        for sel in SELECTORS {
            let mut b = b.clone();
            // nbd-server-like presets only know the export "exp"; the
            // client script asks for "".
            b.exports.push((String::new(), String::new()));
            v.push((format!("{name}-{sel:02x}"), record(sel, b)));
        }
    }
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
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
fn recorded_sessions_complete_every_command() {
    for (name, input) in seeds() {
        let (accepted, succeeded) = run_client(&input);
        assert!(accepted > 0, "{name}: the client never reached transmission");
        assert!(succeeded > 0, "{name}: no command succeeded on a valid session");
    }
}

#[test]
fn mutated_sessions_never_break_an_invariant() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut runs = 0;
    for (_, seed) in seeds() {
        for _ in 0..300 {
            run_client(&mutate(&seed, &mut rng));
            runs += 1;
        }
    }
    assert_eq!(runs, 3 * SELECTORS.len() * 300);
}

#[test]
fn write_seed_corpus_when_asked() {
    let Some(dir) = std::env::var_os("FUZZ_CORPUS_DIR") else { return };
    std::fs::create_dir_all(&dir).unwrap();
    for (name, input) in seeds() {
        std::fs::write(std::path::Path::new(&dir).join(name), input).unwrap();
    }
    assert!(std::fs::read_dir(&dir).unwrap().count() >= 3 * SELECTORS.len());
}
