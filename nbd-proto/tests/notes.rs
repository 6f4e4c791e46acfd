//! The handshake's notes (`set_trace` / `poll_note`): what a tracing
//! caller learns, in order, and nothing when tracing is off.

mod support;

use nbd_proto::*;
use support::pair::Pair;
use support::server::{Behaviour, Style};

const SIZE: usize = 1 << 20;

fn traced(config: Config, b: Behaviour) -> (Pair, Vec<Note>) {
    let mut p = Pair::new(config, b, SIZE);
    p.client.set_trace(true);
    p.drive();
    let mut notes = Vec::new();
    while let Some(n) = p.client.poll_note() {
        notes.push(n);
    }
    (p, notes)
}

fn with_base_allocation() -> Config {
    let mut c = Config::default();
    c.add_meta_context("base:allocation").unwrap();
    c
}

#[test]
fn nbdkit_handshake_notes_every_fact_in_order() {
    let b = Behaviour::nbdkit();
    let flags = b.flags.bits();
    let (p, notes) = traced(with_base_allocation(), b);
    assert_eq!(p.state(), PublicState::Ready);
    let id = p.client.meta_contexts().unwrap()[0].id;
    assert_eq!(
        notes,
        [
            Note::ExtendedHeaders(OptionOutcome::Unsupported),
            Note::StructuredReplies(OptionOutcome::Negotiated),
            Note::MetaContext { name: "base:allocation".into(), id },
            Note::Export { size: SIZE as u64, flags },
            Note::BlockSize { block: BlockSize { minimum: 1, preferred: 4096, maximum: u32::MAX }, accepted: true },
        ]
    );
}

#[test]
fn extended_headers_accepted_skip_structured_replies() {
    let (p, notes) = traced(Config::default(), Behaviour::qemu());
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(notes[0], Note::ExtendedHeaders(OptionOutcome::Negotiated));
    assert!(!notes.iter().any(|n| matches!(n, Note::StructuredReplies(_))), "{notes:?}");
}

#[test]
fn nonsense_block_sizes_are_noted_as_ignored() {
    let b = Behaviour { block_size: Some((3, 4096, 1 << 20)), ..Behaviour::nbdkit() };
    let (_, notes) = traced(Config::default(), b);
    assert!(notes.contains(&Note::BlockSize {
        block: BlockSize { minimum: 3, preferred: 4096, maximum: 1 << 20 },
        accepted: false
    }));
}

#[test]
fn refused_starttls_is_noted_and_the_handshake_continues() {
    let mut config = Config::default();
    config.tls = TlsMode::Allow;
    let (p, notes) = traced(config, Behaviour::nbdkit());
    assert_eq!(p.state(), PublicState::Ready);
    assert!(matches!(notes[0], Note::TlsRefused { continuing: true, .. }), "{notes:?}");
}

#[test]
fn oldstyle_notes_its_global_flags_and_export() {
    let b = Behaviour { style: Style::Oldstyle, ..Behaviour::nbd_server() };
    let flags = b.flags.bits();
    let (p, notes) = traced(Config::default(), b);
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(notes, [Note::OldstyleFlags(0), Note::Export { size: SIZE as u64, flags }]);
}

#[test]
fn without_tracing_nothing_is_kept() {
    let mut p = Pair::connect(with_base_allocation(), Behaviour::nbdkit(), SIZE);
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(p.client.poll_note(), None);

    // Turning tracing off drops what was not taken.
    let mut p2 = Pair::new(Config::default(), Behaviour::nbdkit(), SIZE);
    p2.client.set_trace(true);
    p2.drive();
    p2.client.set_trace(false);
    assert_eq!(p2.client.poll_note(), None);
    p.drive();
}
