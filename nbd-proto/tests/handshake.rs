//! Every good path through the handshake, as scripts against the scripted
//! server: oldstyle, newstyle, fixed newstyle (with and without NO_ZEROES),
//! structured replies and extended headers negotiated, refused and turned
//! off, STARTTLS handing over to the TLS layer, the EXPORT_NAME fallback,
//! INFO/GO details, meta contexts, opt mode with its commands in several
//! orders, and the limit on names.

mod support;

use nbd_proto::errno::{EINVAL, ENAMETOOLONG, ENOENT, ENOTSUP};
use nbd_proto::wire::{opt, rep, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC};
use nbd_proto::*;
use support::pair::Pair;
use support::server::{Behaviour, Style};

const SIZE: usize = 1 << 20;

fn cfg(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    f(&mut c);
    c
}

fn opt_mode() -> Config {
    cfg(|c| c.opt_mode = true)
}

/// Runs the handshake and insists it reached Ready.
fn ready(config: Config, b: Behaviour) -> Pair {
    let p = Pair::connect(config, b, SIZE);
    assert_eq!(p.state(), PublicState::Ready, "{:?}", p.client.error());
    assert_eq!(p.client.direction(), Direction::Read, "Ready waits for replies");
    p
}

/// Runs an opt-mode handshake and insists it rests in Negotiating.
fn negotiating(config: Config, b: Behaviour) -> Pair {
    assert!(config.opt_mode);
    let p = Pair::connect(config, b, SIZE);
    assert_eq!(p.state(), PublicState::Negotiating, "{:?}", p.client.error());
    assert_eq!(p.client.direction(), Direction::None, "Negotiating waits for the caller");
    p
}

/// The handshake flags the client echoes to the greeting: delivers the
/// greeting by hand, reads the client's first four bytes off its output,
/// then lets the rest of the handshake run.
fn connect_watching_client_flags(config: Config, b: Behaviour) -> (Pair, u32) {
    let mut p = Pair::new(config, b, SIZE);
    let greeting = std::mem::take(&mut p.server.out);
    p.deliver(&greeting);
    let flags = {
        let mut slices: [&[u8]; 8] = [&[]; 8];
        let n = p.client.poll_transmit(&mut slices);
        let bytes = slices[..n].concat();
        assert!(bytes.len() >= 4, "the client answers the greeting at once");
        u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    };
    p.drive();
    (p, flags)
}

/// A write then a read of the same bytes: proves the byte streams are in
/// step after the handshake (a stray or missing zero pad would break it).
fn round_trip(p: &mut Pair) {
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
    let w = p.client.write(4096, data.clone(), CmdFlags::empty()).unwrap();
    let r = p.client.read(4096, vec![0; data.len()], CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(w).unwrap();
    assert_eq!(p.completed(r).unwrap().unwrap(), data);
    assert_eq!(p.state(), PublicState::Ready);
}

/// The bytes the next command puts on the wire, without sending them.
fn peek_request(p: &mut Pair) -> Vec<u8> {
    p.client.flush(CmdFlags::empty()).unwrap();
    let mut slices: [&[u8]; 8] = [&[]; 8];
    let n = p.client.poll_transmit(&mut slices);
    slices[..n].concat()
}

fn nbdkit_flags() -> TransmissionFlags {
    Behaviour::nbdkit().flags
}

// ---- handshake styles --------------------------------------------------------

#[test]
fn oldstyle_server_goes_straight_to_transmission() {
    for opt_mode in [false, true] {
        let c = cfg(|c| {
            c.opt_mode = opt_mode;
            c.add_meta_context("base:allocation").unwrap();
        });
        let mut p = ready(c, Behaviour { style: Style::Oldstyle, ..Behaviour::nbdkit() });
        assert_eq!(p.client.protocol(), Some(Protocol::Oldstyle));
        assert_eq!(p.client.protocol().unwrap().name(), "oldstyle");
        assert!(p.server.options.is_empty(), "no options in the oldstyle handshake");
        assert_eq!(p.transcript, ["Connected"]);
        assert_eq!(p.client.export().size, Some(SIZE as u64));
        // DF is hidden without structured replies, as libnbd does.
        assert_eq!(p.client.export().flags, nbdkit_flags() - TransmissionFlags::SEND_DF);
        assert!(!p.client.structured_replies_negotiated());
        assert!(!p.client.extended_headers_negotiated());
        assert_eq!(p.client.meta_contexts(), None, "no SET_META_CONTEXT was possible");
        let e = p.client.block_status(0, 512, CmdFlags::empty()).unwrap_err();
        assert_eq!(e, Error::Local(LocalError::NoMetaContexts));
        assert_eq!(e.errno(), ENOTSUP);
        round_trip(&mut p);
    }
}

#[test]
fn non_fixed_newstyle_uses_export_name_even_in_opt_mode() {
    for no_zeroes in [false, true] {
        for opt_mode in [false, true] {
            let b = Behaviour { style: Style::Newstyle, no_zeroes, ..Behaviour::nbdkit() };
            let (mut p, client_flags) = connect_watching_client_flags(cfg(|c| c.opt_mode = opt_mode), b);
            let case = format!("no_zeroes {no_zeroes} opt_mode {opt_mode}");
            // Never FIXED_NEWSTYLE back to a server that did not offer it.
            assert_eq!(client_flags, if no_zeroes { 2 } else { 0 }, "{case}");
            assert_eq!(p.client.protocol(), Some(Protocol::Newstyle), "{case}");
            assert_eq!(p.client.protocol().unwrap().name(), "newstyle");
            if opt_mode {
                // As libnbd: the caller negotiates, but only opt_go (the
                // export name) and opt_abort are possible.
                assert_eq!(p.state(), PublicState::Negotiating, "{case}: {:?}", p.client.error());
                assert!(p.server.options.is_empty(), "{case}");
                for e in [p.client.opt_info().unwrap_err(), p.client.opt_list().unwrap_err()] {
                    assert_eq!(e, Error::Local(LocalError::NotFixedNewstyle), "{case}");
                    assert_eq!(e.errno(), ENOTSUP);
                }
                assert_eq!(p.state(), PublicState::Negotiating, "{case}: a refusal changes nothing");
                p.client.opt_go().unwrap();
                p.drive();
                assert_eq!(p.transcript, ["OptionComplete { result: Ok(()) }", "Connected"], "{case}");
            } else {
                assert_eq!(p.transcript, ["Connected"], "{case}: no OptionComplete without an opt_* call");
            }
            assert_eq!(p.state(), PublicState::Ready, "{case}: {:?}", p.client.error());
            assert_eq!(p.server.options, [opt::EXPORT_NAME], "{case}: no other option is possible");
            assert!(!p.client.structured_replies_negotiated());
            assert_eq!(p.client.export().size, Some(SIZE as u64));
            assert_eq!(p.client.export().flags, nbdkit_flags() - TransmissionFlags::SEND_DF);
            round_trip(&mut p);
        }
    }
}

#[test]
fn opt_abort_without_fixed_newstyle_drops_the_connection() {
    let b = Behaviour { style: Style::Newstyle, ..Behaviour::nbdkit() };
    let (mut p, _) = connect_watching_client_flags(cfg(|c| c.opt_mode = true), b);
    assert_eq!(p.state(), PublicState::Negotiating);
    p.client.opt_abort().unwrap();
    p.drive();
    // libnbd: the abort succeeds and the handle is dead, for want of any
    // way to tell such a server.
    assert_eq!(p.transcript, ["OptionComplete { result: Ok(()) }"]);
    assert_eq!(p.state(), PublicState::Dead);
    assert_eq!(p.client.error(), Some(&Error::Local(LocalError::NotFixedNewstyle)));
    assert!(p.server.options.is_empty(), "nothing was sent");
}

#[test]
fn a_client_that_refuses_fixed_newstyle_uses_export_name() {
    // The server offers fixed newstyle; the client's handshake flags leave it out.
    let c = cfg(|c| {
        c.handshake_flags = HandshakeFlags::NO_ZEROES;
        c.opt_mode = true;
    });
    let (mut p, client_flags) = connect_watching_client_flags(c, Behaviour::nbdkit());
    assert_eq!(p.state(), PublicState::Negotiating, "{:?}", p.client.error());
    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.state(), PublicState::Ready, "{:?}", p.client.error());
    assert_eq!(client_flags, HandshakeFlags::NO_ZEROES.bits());
    assert_eq!(p.server.options, [opt::EXPORT_NAME]);
    assert_eq!(p.client.protocol().map(Protocol::name), Some("newstyle"));
    round_trip(&mut p);
}

#[test]
fn fixed_newstyle_with_and_without_no_zeroes() {
    let fixed_only = HandshakeFlags::FIXED_NEWSTYLE;
    // (server offers NO_ZEROES, client allows it, flags the client echoes)
    let cases = [
        (true, HandshakeFlags::all(), 3),
        (false, HandshakeFlags::all(), 1),
        (true, fixed_only, 1),
        (false, fixed_only, 1),
    ];
    for (server_nz, client_flags, echoed) in cases {
        // GO has no zero padding; EXPORT_NAME's reply is where it matters.
        for go in [false, true] {
            let case = format!("server NO_ZEROES {server_nz}, client {client_flags:?}, go {go}");
            let b = Behaviour { no_zeroes: server_nz, go, ..Behaviour::nbdkit() };
            let (mut p, got) = connect_watching_client_flags(cfg(|c| c.handshake_flags = client_flags), b);
            assert_eq!(p.state(), PublicState::Ready, "{case}: {:?}", p.client.error());
            assert_eq!(got, echoed, "{case}");
            assert_eq!(p.client.protocol(), Some(Protocol::NewstyleFixed), "{case}");
            assert_eq!(p.client.protocol().unwrap().name(), "newstyle-fixed");
            let last = if go { opt::GO } else { opt::EXPORT_NAME };
            assert_eq!(p.server.options.last(), Some(&last), "{case}");
            assert_eq!(p.client.export().size, Some(SIZE as u64), "{case}");
            assert_eq!(p.client.export().flags, nbdkit_flags(), "{case}");
            round_trip(&mut p);
        }
    }
}

// ---- structured replies and extended headers ----------------------------------

#[test]
fn structured_replies_on() {
    let mut p = ready(Config::default(), Behaviour::nbdkit());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO]);
    assert!(p.client.structured_replies_negotiated());
    assert!(!p.client.extended_headers_negotiated());
    assert_eq!(p.client.export().flags, nbdkit_flags(), "DF stays with structured replies");
    let r = p.client.read(0, vec![1; 4096], CmdFlags::DF).unwrap();
    p.drive();
    assert_eq!(p.completed(r).unwrap().unwrap(), vec![0; 4096]);
    round_trip(&mut p);
}

#[test]
fn structured_replies_off() {
    let c = cfg(|c| {
        c.request_structured_replies = false;
        c.add_meta_context("base:allocation").unwrap();
    });
    let mut p = ready(c, Behaviour::nbdkit());
    // Extended headers imply structured replies, so neither is asked for,
    // and meta contexts need structured replies.
    assert_eq!(p.server.options, [opt::GO]);
    assert!(!p.client.structured_replies_negotiated());
    assert!(!p.client.extended_headers_negotiated());
    assert_eq!(p.client.meta_contexts(), None);
    assert_eq!(p.client.export().flags, nbdkit_flags() - TransmissionFlags::SEND_DF);
    let e = p.client.read(0, vec![0; 512], CmdFlags::DF).unwrap_err();
    assert_eq!(e, Error::Local(LocalError::Unsupported("the DF flag")));
    assert_eq!(e.errno(), EINVAL);
    round_trip(&mut p);

    // Not even a server that has extended headers is asked.
    let p = ready(cfg(|c| c.request_structured_replies = false), Behaviour::qemu());
    assert_eq!(p.server.options, [opt::GO]);
    assert!(!p.client.extended_headers_negotiated());
}

#[test]
fn extended_headers_negotiated_with_qemu() {
    let mut p = ready(Config::default(), Behaviour::qemu());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::GO], "extended headers imply structured replies");
    assert!(p.client.extended_headers_negotiated());
    assert!(p.client.structured_replies_negotiated());
    let wire = peek_request(&mut p);
    assert_eq!(wire.len(), 32, "an extended request header");
    assert_eq!(&wire[..4], &EXTENDED_REQUEST_MAGIC.to_be_bytes());
    p.drive();
    round_trip(&mut p);
}

#[test]
fn extended_headers_refused_by_nbdkit() {
    let mut p = ready(Config::default(), Behaviour::nbdkit());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO]);
    assert!(!p.client.extended_headers_negotiated());
    assert!(p.client.structured_replies_negotiated(), "fell back to plain structured replies");
    let wire = peek_request(&mut p);
    assert_eq!(wire.len(), 28, "a compact request header");
    assert_eq!(&wire[..4], &REQUEST_MAGIC.to_be_bytes());
    p.drive();
    round_trip(&mut p);
}

#[test]
fn extended_headers_disabled_by_config() {
    let mut p = ready(cfg(|c| c.request_extended_headers = false), Behaviour::qemu());
    assert_eq!(p.server.options, [opt::STRUCTURED_REPLY, opt::GO]);
    assert!(!p.client.extended_headers_negotiated());
    assert!(p.client.structured_replies_negotiated());
    let wire = peek_request(&mut p);
    assert_eq!(&wire[..4], &REQUEST_MAGIC.to_be_bytes());
    p.drive();
    round_trip(&mut p);
}

// ---- STARTTLS ---------------------------------------------------------------------

#[test]
fn starttls_hands_over_to_the_tls_layer_then_negotiation_goes_on() {
    for tls in [TlsMode::Allow, TlsMode::Require] {
        let b = Behaviour { starttls: true, ..Behaviour::nbdkit() };
        let mut p = Pair::connect(cfg(|c| c.tls = tls), b, SIZE);
        assert_eq!(p.server.options, [opt::STARTTLS], "{tls:?}: STARTTLS comes first");
        assert_eq!(p.transcript, ["StartTls"], "{tls:?}");
        assert_eq!(p.state(), PublicState::Connecting);
        assert_eq!(p.client.direction(), Direction::None, "the TLS layer drives now");
        assert!(!p.client.tls_negotiated());

        p.client.handle_tls_established().unwrap();
        assert!(p.client.tls_negotiated());
        p.drive();
        assert_eq!(p.state(), PublicState::Ready, "{tls:?}: {:?}", p.client.error());
        assert_eq!(
            p.server.options,
            [opt::STARTTLS, opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO],
            "{tls:?}: the rest is negotiated inside TLS"
        );
        assert!(p.client.structured_replies_negotiated());
        assert!(p.client.tls_negotiated());
        round_trip(&mut p);
    }

    // Refused: ALLOW goes on in plaintext (REQUIRE does not: see malformed.rs).
    let mut p = ready(cfg(|c| c.tls = TlsMode::Allow), Behaviour::nbdkit());
    assert_eq!(p.server.options, [opt::STARTTLS, opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO]);
    assert!(!p.client.tls_negotiated());
    round_trip(&mut p);
}

// ---- GO, INFO and the EXPORT_NAME fallback -------------------------------------

#[test]
fn export_name_fallback_when_the_server_lacks_go() {
    let c = cfg(|c| c.full_info = true);
    let mut p = ready(c.clone(), Behaviour { go: false, ..Behaviour::nbdkit() });
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO, opt::EXPORT_NAME]);
    assert_eq!(p.transcript, ["Connected"]);
    let e = p.client.export();
    assert_eq!(e.size, Some(SIZE as u64));
    assert_eq!(e.flags, nbdkit_flags());
    assert_eq!((e.block_size, e.canonical_name.as_deref(), e.description.as_deref()), (None, None, None));
    assert!(p.client.structured_replies_negotiated(), "what was negotiated before GO still holds");
    round_trip(&mut p);

    // The same with extended headers in force.
    let mut p = ready(c, Behaviour { go: false, ..Behaviour::qemu() });
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::GO, opt::EXPORT_NAME]);
    assert!(p.client.extended_headers_negotiated());
    round_trip(&mut p);
}

#[test]
fn export_name_fallback_in_opt_mode() {
    let mut p = negotiating(opt_mode(), Behaviour { go: false, ..Behaviour::nbdkit() });
    // INFO has no fallback: it is refused.
    p.client.opt_info().unwrap();
    p.drive();
    let e = p.option_result().unwrap().unwrap_err();
    assert_eq!(e.errno(), ENOTSUP);
    assert!(matches!(e, Error::Server(ServerError::OptionRefused { option: opt::INFO, reply: rep::ERR_UNSUP, .. })));
    assert_eq!(p.state(), PublicState::Negotiating);
    // GO falls back to EXPORT_NAME and completes.
    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::INFO, opt::GO, opt::EXPORT_NAME]);
    assert_eq!(p.transcript.last().map(String::as_str), Some("Connected"));
    round_trip(&mut p);
}

#[test]
fn go_with_full_info_and_block_size() {
    let exports = vec![("disk".to_owned(), "a fine disk".to_owned()), (String::new(), "default".to_owned())];
    let b = Behaviour { exports, ..Behaviour::nbdkit() };
    let named = |full_info: bool, block_size: bool| {
        cfg(|c| {
            c.full_info = full_info;
            c.request_block_size = block_size;
            c.set_export_name("disk").unwrap();
        })
    };

    let p = ready(named(true, true), b.clone());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO]);
    let e = p.client.export();
    assert_eq!(e.size, Some(SIZE as u64));
    assert_eq!(e.canonical_name.as_deref(), Some("disk"));
    assert_eq!(e.description.as_deref(), Some("a fine disk"));
    assert_eq!(e.block_size, Some(BlockSize { minimum: 1, preferred: 4096, maximum: 0xffff_ffff }));

    let p = ready(named(false, true), b.clone());
    let e = p.client.export();
    assert_eq!((e.canonical_name.as_deref(), e.description.as_deref()), (None, None), "not asked for");
    assert!(e.block_size.is_some());

    let p = ready(named(true, false), b.clone());
    assert_eq!(p.client.export().block_size, None, "not asked for");
    assert_eq!(p.client.export().description.as_deref(), Some("a fine disk"));

    // The default export, and qemu's limits.
    let p = ready(cfg(|c| c.full_info = true), b);
    assert_eq!(p.client.export().description.as_deref(), Some("default"));
    let p = ready(Config::default(), Behaviour::qemu());
    assert_eq!(p.client.export().block_size, Some(BlockSize { minimum: 1, preferred: 4096, maximum: 32 << 20 }));

    // Nonsense limits are ignored rather than obeyed.
    let nonsense = [
        (3, 4096, 1 << 20),              // a minimum that is not a power of two
        (4096, 512, 1 << 20),            // preferred below the minimum
        (512, 4096, 1_000_000),          // a maximum that is not a multiple of the minimum
        (128 << 10, 128 << 10, 1 << 20), // a minimum above 64 KiB
    ];
    for block_size in nonsense {
        let p = ready(Config::default(), Behaviour { block_size: Some(block_size), ..Behaviour::nbdkit() });
        assert_eq!(p.client.export().block_size, None, "{block_size:?}");
    }
}

#[test]
fn info_then_go_in_opt_mode_report_the_export() {
    let exports = vec![("a".to_owned(), "first".to_owned()), ("b".to_owned(), "second".to_owned())];
    let c = cfg(|c| {
        c.opt_mode = true;
        c.full_info = true;
        c.set_export_name("a").unwrap();
    });
    let mut p = negotiating(
        c,
        Behaviour { exports, flags: nbdkit_flags() | TransmissionFlags::READ_ONLY, ..Behaviour::nbdkit() },
    );
    assert_eq!(p.client.export().size, None, "nothing known before INFO");
    p.client.opt_info().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.state(), PublicState::Negotiating);
    assert_eq!(p.client.direction(), Direction::None);
    assert_eq!(p.client.export().size, Some(SIZE as u64));
    assert_eq!(p.client.export().description.as_deref(), Some("first"));
    assert!(p.client.export().flags.contains(TransmissionFlags::READ_ONLY));

    // The same name keeps what INFO said; another name forgets it.
    p.client.set_export_name("a").unwrap();
    assert_eq!(p.client.export().size, Some(SIZE as u64));
    p.client.set_export_name("nope").unwrap();
    assert_eq!(p.client.export().size, None, "a new name forgets the old export");
    assert_eq!(p.client.export().description, None);
    assert!(p.client.export().flags.is_empty());
    // An unknown export: INFO fails, and negotiation goes on.
    p.client.opt_info().unwrap();
    assert!(p.client.opt_list().is_err(), "one option at a time");
    p.drive();
    let e = p.option_result().unwrap().unwrap_err();
    assert_eq!(e.errno(), ENOENT);
    assert!(e.to_string().contains("no such export"), "{e}");
    assert_eq!(p.state(), PublicState::Negotiating);
    assert_eq!(p.client.meta_contexts(), None, "a refused export has no contexts");

    p.client.config_mut().unwrap().set_export_name("b").unwrap();
    p.client.opt_info().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.client.export().canonical_name.as_deref(), Some("b"));
    assert_eq!(p.client.export().description.as_deref(), Some("second"));

    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(p.client.export().canonical_name.as_deref(), Some("b"));
    assert_eq!(
        p.server.options,
        [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::INFO, opt::INFO, opt::INFO, opt::GO]
    );
    assert_eq!(p.client.opt_go().unwrap_err().errno(), EINVAL, "opt_go only while negotiating");
    // A read-only export refuses writes locally.
    assert_eq!(p.client.write(0, vec![1], CmdFlags::empty()).unwrap_err().errno(), errno::EPERM);
}

// ---- meta contexts ------------------------------------------------------------

#[test]
fn set_meta_context_with_several_contexts() {
    let c = cfg(|c| {
        c.add_meta_context("base:allocation").unwrap();
        c.add_meta_context("qemu:allocation-depth").unwrap();
    });
    let before: Connection<Vec<u8>> = Connection::new(c.clone());
    assert_eq!(before.meta_contexts(), None, "nothing negotiated yet");

    let p = ready(c, Behaviour::qemu());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::SET_META_CONTEXT, opt::GO]);
    assert_eq!(
        p.client.meta_contexts().unwrap(),
        [
            MetaContext { id: 1, name: "base:allocation".into() },
            MetaContext { id: 2, name: "qemu:allocation-depth".into() },
        ]
    );
    assert_eq!(p.client.meta_context_name(1), Some("base:allocation"));
    assert_eq!(p.client.meta_context_name(2), Some("qemu:allocation-depth"));
    assert_eq!(p.client.meta_context_name(3), None);
}

#[test]
fn set_meta_context_with_none_supported() {
    let c = cfg(|c| {
        c.add_meta_context("base:allocation").unwrap();
        c.add_meta_context("qemu:allocation-depth").unwrap();
    });
    let mut p = ready(c, Behaviour { contexts: vec![], ..Behaviour::nbdkit() });
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::SET_META_CONTEXT, opt::GO]);
    assert_eq!(p.client.meta_contexts(), Some(&[][..]), "negotiated, and empty");
    let e = p.client.block_status(0, 512, CmdFlags::empty()).unwrap_err();
    assert_eq!(e, Error::Local(LocalError::NoMetaContexts));
    assert_eq!(e.errno(), ENOTSUP);

    // Only some of the requested contexts exist: just those are selected.
    let c = cfg(|c| {
        c.add_meta_context("qemu:allocation-depth").unwrap();
        c.add_meta_context("base:allocation").unwrap();
    });
    let p = ready(c, Behaviour::nbdkit());
    assert_eq!(p.client.meta_contexts().unwrap(), [MetaContext { id: 1, name: "base:allocation".into() }]);

    // None requested: no SET_META_CONTEXT at all.
    let p = ready(Config::default(), Behaviour::qemu());
    assert!(!p.server.options.contains(&opt::SET_META_CONTEXT));
    assert_eq!(p.client.meta_contexts(), None);

    // Nor when the server refuses structured replies.
    let c = cfg(|c| {
        c.set_export_name("exp").unwrap();
        c.add_meta_context("base:allocation").unwrap();
    });
    let p = ready(c, Behaviour::nbd_server());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO]);
    assert_eq!(p.client.meta_contexts(), None);
}

// ---- opt mode -------------------------------------------------------------------

#[test]
fn opt_mode_rests_in_negotiating() {
    let mut p = negotiating(opt_mode(), Behaviour::nbdkit());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY], "only the automatic options");
    assert!(p.transcript.is_empty(), "no Connected while negotiating");
    assert_eq!(p.client.protocol(), Some(Protocol::NewstyleFixed));
    assert!(p.client.structured_replies_negotiated());
    assert!(p.client.config_mut().is_ok(), "settings may change while negotiating");
    // Transmission commands wait for Ready.
    let e = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap_err();
    assert!(matches!(e, Error::Local(LocalError::WrongState { state: "negotiating", .. })), "{e:?}");
    assert_eq!(e.errno(), EINVAL);
    assert_eq!(p.client.disconnect().unwrap_err().errno(), EINVAL);

    // qemu has extended headers, so no STRUCTURED_REPLY.
    let p = negotiating(opt_mode(), Behaviour::qemu());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS]);
    assert!(p.client.extended_headers_negotiated());
}

#[test]
fn opt_list_info_list_meta_context_then_go() {
    let exports = vec![("a".to_owned(), "first".to_owned()), ("b".to_owned(), String::new())];
    let c = cfg(|c| {
        c.opt_mode = true;
        c.set_export_name("b").unwrap();
        c.add_meta_context("base:allocation").unwrap();
        c.add_meta_context("qemu:allocation-depth").unwrap();
    });
    let mut p = negotiating(c, Behaviour { exports, ..Behaviour::qemu() });

    p.client.opt_list().unwrap();
    assert!(p.client.opt_list().is_err(), "one option at a time");
    assert_eq!(p.client.opt_go().unwrap_err().errno(), EINVAL);
    p.drive();
    assert_eq!(
        p.transcript,
        [
            r#"ExportListed { name: "a", description: "first" }"#,
            r#"ExportListed { name: "b", description: "" }"#,
            "OptionComplete { result: Ok(()) }",
        ]
    );
    assert_eq!(p.state(), PublicState::Negotiating);
    assert_eq!(p.client.direction(), Direction::None);
    p.transcript.clear();

    p.client.opt_info().unwrap();
    p.drive();
    assert_eq!(p.transcript, ["OptionComplete { result: Ok(()) }"]);
    assert_eq!(p.client.export().size, Some(SIZE as u64));
    assert_eq!(p.client.meta_contexts().map(|m| m.len()), Some(2), "INFO sets meta contexts first, as libnbd");
    p.transcript.clear();

    p.client.opt_list_meta_context().unwrap();
    p.drive();
    assert_eq!(
        p.transcript,
        [
            r#"MetaContextListed { name: "base:allocation" }"#,
            r#"MetaContextListed { name: "qemu:allocation-depth" }"#,
            "OptionComplete { result: Ok(()) }",
        ]
    );
    p.transcript.clear();

    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.transcript, ["OptionComplete { result: Ok(()) }", "Connected"]);
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(p.client.direction(), Direction::Read);
    assert_eq!(
        p.server.options,
        [
            opt::EXTENDED_HEADERS,
            opt::LIST,
            opt::SET_META_CONTEXT,
            opt::INFO,
            opt::LIST_META_CONTEXT,
            opt::SET_META_CONTEXT,
            opt::GO,
        ]
    );
    assert_eq!(p.client.meta_contexts().map(|m| m.len()), Some(2));
    assert_eq!(p.client.opt_list().unwrap_err().errno(), EINVAL, "opt_* only while negotiating");
    assert!(p.client.config_mut().is_err(), "settings are fixed once connected");
    round_trip(&mut p);
}

#[test]
fn opt_go_first_then_other_orders() {
    // Straight to GO.
    let mut p = negotiating(opt_mode(), Behaviour::nbdkit());
    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.transcript, ["OptionComplete { result: Ok(()) }", "Connected"]);
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO]);
    round_trip(&mut p);

    // Meta contexts listed with no query list everything the server has;
    // then INFO, LIST, GO.
    let mut p = negotiating(opt_mode(), Behaviour::qemu());
    p.client.opt_list_meta_context().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    let listed: Vec<String> = p
        .events
        .drain(..)
        .filter_map(|e| match e {
            Event::MetaContextListed { name } => Some(name),
            _ => None,
        })
        .collect();
    assert_eq!(listed, ["base:allocation", "qemu:allocation-depth"]);
    assert_eq!(p.client.meta_contexts(), None, "listing does not select");
    type Step = fn(&mut Connection<Vec<u8>>) -> Result<(), Error>;
    let steps: [Step; 3] = [Connection::opt_info, Connection::opt_list, Connection::opt_go];
    for step in steps {
        step(&mut p.client).unwrap();
        p.drive();
        assert_eq!(p.option_result(), Some(Ok(())));
    }
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(
        p.server.options,
        [opt::EXTENDED_HEADERS, opt::LIST_META_CONTEXT, opt::INFO, opt::LIST, opt::GO],
        "no meta contexts configured: no SET_META_CONTEXT"
    );
    round_trip(&mut p);

    // Without structured replies meta contexts cannot be listed.
    let mut nbd_server = Behaviour::nbd_server();
    nbd_server.exports.push((String::new(), String::new()));
    let mut p = negotiating(opt_mode(), nbd_server);
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY], "both refused");
    let e = p.client.opt_list_meta_context().unwrap_err();
    assert_eq!((e.errno(), e), (ENOTSUP, Error::Local(LocalError::NoStructuredReplies)));
    assert_eq!(p.state(), PublicState::Negotiating);
    p.client.opt_list().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.state(), PublicState::Ready);
    round_trip(&mut p);
}

#[test]
fn opt_abort_with_and_without_an_ack() {
    for abort_ack in [true, false] {
        let mut p = negotiating(opt_mode(), Behaviour { abort_ack, ..Behaviour::nbdkit() });
        p.client.opt_list().unwrap();
        p.drive();
        assert_eq!(p.option_result(), Some(Ok(())));
        p.client.opt_abort().unwrap();
        p.drive();
        assert_eq!(p.option_result(), Some(Ok(())), "abort_ack {abort_ack}");
        assert_eq!(p.state(), PublicState::Closed, "abort_ack {abort_ack}");
        assert_eq!(p.client.direction(), Direction::None);
        assert_eq!(p.client.error(), None, "closed, not dead");
        assert_eq!(p.server.options.last(), Some(&opt::ABORT));
        assert!(!p.transcript.iter().any(|e| e == "Connected"));
        assert_eq!(p.client.opt_go().unwrap_err().errno(), EINVAL);
        assert_eq!(p.client.flush(CmdFlags::empty()).unwrap_err().errno(), EINVAL);
    }
}

#[test]
fn opt_go_with_an_unknown_export_then_the_right_one() {
    let exports = vec![("disk".to_owned(), String::new())];
    let c = cfg(|c| {
        c.opt_mode = true;
        c.set_export_name("nope").unwrap();
        c.add_meta_context("base:allocation").unwrap();
    });
    let mut p = negotiating(c, Behaviour { exports, ..Behaviour::nbdkit() });
    p.client.opt_go().unwrap();
    p.drive();
    let e = p.option_result().unwrap().unwrap_err();
    assert_eq!(
        e,
        Error::Server(ServerError::OptionRefused {
            option: opt::GO,
            reply: rep::ERR_UNKNOWN,
            export: Some("nope".into()),
            message: "no such export".into()
        })
    );
    assert_eq!(e.to_string(), "NBD_OPT_GO for export 'nope': the server has no such export (no such export)");
    assert_eq!(e.errno(), ENOENT);
    assert_eq!(p.state(), PublicState::Negotiating, "a refused GO is not fatal");
    assert_eq!(p.client.direction(), Direction::None);
    assert_eq!(p.client.error(), None);
    assert_eq!(p.client.export().size, None);
    assert!(!p.transcript.iter().any(|e| e == "Connected"));

    p.client.config_mut().unwrap().set_export_name("disk").unwrap();
    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(p.client.export().size, Some(SIZE as u64));
    assert_eq!(p.client.meta_contexts().unwrap().len(), 1);
    assert_eq!(
        p.server.options,
        [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::SET_META_CONTEXT, opt::GO, opt::SET_META_CONTEXT, opt::GO,],
        "meta contexts are set again for the new export"
    );
    round_trip(&mut p);
}

#[test]
fn auto_mode_with_an_unknown_export_dies() {
    let mut p = Pair::connect(cfg(|c| c.set_export_name("missing").unwrap()), Behaviour::nbdkit(), SIZE);
    assert_eq!(p.state(), PublicState::Dead);
    assert_eq!(p.client.direction(), Direction::None);
    let e = p.client.error().unwrap();
    assert_eq!(e.errno(), ENOENT);
    assert!(matches!(e, Error::Server(ServerError::OptionRefused { option: opt::GO, reply: rep::ERR_UNKNOWN, .. })));
    assert!(p.transcript.is_empty(), "no Connected, no OptionComplete without an opt_* call");
    assert_eq!(p.client.read(0, vec![0; 1], CmdFlags::empty()).unwrap_err().errno(), EINVAL);
}

// ---- names ------------------------------------------------------------------------

#[test]
fn names_longer_than_4096_bytes_are_refused() {
    let long = "x".repeat(4097);
    let mut c = Config::default();
    let e = c.set_export_name(&long).unwrap_err();
    assert_eq!((e.clone(), e.errno()), (LocalError::NameTooLong("export name"), ENAMETOOLONG));
    let e = c.add_meta_context(&long).unwrap_err();
    assert_eq!((e.clone(), e.errno()), (LocalError::NameTooLong("meta context name"), ENAMETOOLONG));
    assert_eq!(c, Config::default(), "nothing was kept");

    c.set_export_name(&long[..4096]).unwrap();
    c.add_meta_context(&long[..4096]).unwrap();
    assert_eq!((c.export_name().len(), c.meta_contexts().len()), (4096, 1));
}

// ---- export flags ---------------------------------------------------------------

#[test]
fn export_flags_are_normalised_as_libnbd_does() {
    use TransmissionFlags as TF;
    // DF is cleared without structured replies, kept with them.
    let p = ready(cfg(|c| c.request_structured_replies = false), Behaviour::nbdkit());
    assert_eq!(p.client.export().flags, nbdkit_flags() - TF::SEND_DF);
    let p = ready(Config::default(), Behaviour::nbdkit());
    assert!(p.client.export().flags.contains(TF::SEND_DF));

    // FAST_ZERO means nothing without WRITE_ZEROES.
    let b = Behaviour { flags: nbdkit_flags() - TF::SEND_WRITE_ZEROES, ..Behaviour::nbdkit() };
    let mut p = ready(Config::default(), b);
    assert_eq!(p.client.export().flags, nbdkit_flags() - TF::SEND_WRITE_ZEROES - TF::SEND_FAST_ZERO);
    assert_eq!(p.client.write_zeroes(0, 512, CmdFlags::empty()).unwrap_err().errno(), EINVAL);

    // Without HAS_FLAGS no flag counts, on every handshake path.
    let styles = [
        Behaviour { style: Style::Oldstyle, ..Behaviour::nbdkit() },
        Behaviour { style: Style::Newstyle, ..Behaviour::nbdkit() },
        Behaviour { go: false, ..Behaviour::nbdkit() },
        Behaviour::nbdkit(),
        Behaviour::qemu(),
    ];
    for b in styles {
        let style = b.style;
        let p = ready(Config::default(), Behaviour { flags: b.flags - TF::HAS_FLAGS, ..b.clone() });
        assert_eq!(p.client.export().flags, TF::empty(), "{style:?} without HAS_FLAGS");
        let p = ready(Config::default(), Behaviour { flags: TF::HAS_FLAGS | TF::READ_ONLY, ..b });
        assert_eq!(p.client.export().flags, TF::HAS_FLAGS | TF::READ_ONLY, "{style:?}");
    }
}

// ---- states and directions --------------------------------------------------------

#[test]
fn direction_in_every_resting_state() {
    let mut c: Connection<Vec<u8>> = Connection::new(Config::default());
    assert_eq!((c.state(), c.direction()), (PublicState::Created, Direction::None));
    c.start_connect().unwrap();
    assert_eq!((c.state(), c.direction()), (PublicState::Connecting, Direction::Write));
    c.handle_connected().unwrap();
    assert_eq!((c.state(), c.direction()), (PublicState::Connecting, Direction::Read), "awaiting the greeting");
    assert_eq!(c.handle_connected().unwrap_err().errno(), EINVAL, "connected once only");

    // Negotiating -> None; Ready -> Read; Processing -> Both; Closed -> None.
    let mut p = negotiating(opt_mode(), Behaviour::nbdkit());
    p.client.opt_go().unwrap();
    assert_eq!(p.client.direction(), Direction::Write, "GO waiting to leave");
    p.drive();
    assert_eq!((p.state(), p.client.direction()), (PublicState::Ready, Direction::Read));
    p.client.flush(CmdFlags::empty()).unwrap();
    assert_eq!((p.state(), p.client.direction()), (PublicState::Processing, Direction::Both));
    p.drive();
    assert_eq!((p.state(), p.client.direction()), (PublicState::Ready, Direction::Read));
    p.client.disconnect().unwrap();
    p.drive();
    assert_eq!((p.state(), p.client.direction()), (PublicState::Closed, Direction::None));

    // Dead -> None.
    let p = Pair::connect(cfg(|c| c.set_export_name("missing").unwrap()), Behaviour::nbdkit(), SIZE);
    assert_eq!((p.state(), p.client.direction()), (PublicState::Dead, Direction::None));
}
