//! Every handshake path against the scripted server, and every way a
//! handshake can be malformed.

mod support;

use nbd_proto::errno::{ENOENT, EPROTO};
use nbd_proto::wire::{self, info, opt, rep, OptionReplyHeader, Put};
use nbd_proto::*;
use support::pair::{Pair, Split};
use support::server::{Behaviour, Style};

fn cfg(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    f(&mut c);
    c
}

fn connected(c: Config, b: Behaviour) -> Pair {
    let p = Pair::connect(c, b, 1 << 20);
    assert_eq!(p.state(), PublicState::Ready, "{:?}", p.client.error());
    assert!(p.transcript.iter().any(|e| e == "Connected"));
    p
}

#[test]
fn oldstyle() {
    let p = connected(Config::default(), Behaviour { style: Style::Oldstyle, ..Behaviour::nbdkit() });
    assert_eq!(p.client.protocol(), Some(Protocol::Oldstyle));
    assert_eq!(p.client.export().size, Some(1 << 20));
    assert!(!p.client.structured_replies_negotiated());
    assert!(p.server.options.is_empty());
    // Without structured replies DF is not usable, as libnbd reports it.
    assert!(!p.client.export().flags.contains(TransmissionFlags::SEND_DF));
    assert!(p.client.export().flags.contains(TransmissionFlags::SEND_FLUSH));
}

#[test]
fn non_fixed_newstyle_goes_straight_to_export_name() {
    let p = connected(cfg(|c| c.opt_mode = true), Behaviour { style: Style::Newstyle, ..Behaviour::nbdkit() });
    assert_eq!(p.client.protocol(), Some(Protocol::Newstyle));
    assert_eq!(p.server.options, [opt::EXPORT_NAME]);
}

#[test]
fn fixed_newstyle_with_and_without_no_zeroes() {
    for (server, client) in [(true, true), (false, true), (true, false)] {
        let c = cfg(|c| {
            if !client {
                c.handshake_flags = HandshakeFlags::FIXED_NEWSTYLE;
            }
        });
        let b = Behaviour { no_zeroes: server, go: false, ..Behaviour::nbdkit() };
        let mut p = connected(c, b);
        assert_eq!(p.client.protocol(), Some(Protocol::NewstyleFixed));
        // The EXPORT_NAME reply has 124 zeroes unless both sides agreed.
        assert_eq!(p.server.options.last(), Some(&opt::EXPORT_NAME));
        let r = p.client.read(0, vec![1; 512], CmdFlags::empty()).unwrap();
        p.drive();
        assert_eq!(p.completed(r).unwrap().unwrap(), vec![0; 512], "server {server} client {client}");
    }
}

#[test]
fn option_sequence_follows_the_settings() {
    let cases: [(Config, Behaviour, &[u32], bool, bool); 4] = [
        (Config::default(), Behaviour::nbdkit(), &[opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO], true, false),
        (Config::default(), Behaviour::qemu(), &[opt::EXTENDED_HEADERS, opt::GO], true, true),
        (
            cfg(|c| c.request_extended_headers = false),
            Behaviour::qemu(),
            &[opt::STRUCTURED_REPLY, opt::GO],
            true,
            false,
        ),
        (cfg(|c| c.request_structured_replies = false), Behaviour::qemu(), &[opt::GO], false, false),
    ];
    for (c, b, options, sr, ext) in cases {
        let p = connected(c, b);
        assert_eq!(p.server.options, options);
        assert_eq!(p.client.structured_replies_negotiated(), sr);
        assert_eq!(p.client.extended_headers_negotiated(), ext);
    }
}

#[test]
fn go_fallback_to_export_name() {
    let p = connected(Config::default(), Behaviour { go: false, ..Behaviour::nbdkit() });
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO, opt::EXPORT_NAME]);
    assert_eq!(p.client.export().size, Some(1 << 20));
    assert_eq!(p.client.export().block_size, None);
}

#[test]
fn full_info_and_block_size() {
    let b = Behaviour { exports: vec![("disk".into(), "a fine disk".into())], ..Behaviour::nbdkit() };
    let p = connected(
        cfg(|c| {
            c.full_info = true;
            c.set_export_name("disk").unwrap();
        }),
        b,
    );
    let e = p.client.export();
    assert_eq!(e.canonical_name.as_deref(), Some("disk"));
    assert_eq!(e.description.as_deref(), Some("a fine disk"));
    assert_eq!(e.block_size, Some(BlockSize { minimum: 1, preferred: 4096, maximum: 0xffff_ffff }));
}

#[test]
fn nonsense_block_sizes_are_ignored() {
    let p = connected(Config::default(), Behaviour { block_size: Some((3, 4096, 1 << 20)), ..Behaviour::nbdkit() });
    assert_eq!(p.client.export().block_size, None);
}

#[test]
fn meta_contexts_several_and_none() {
    let two = cfg(|c| {
        c.add_meta_context("base:allocation").unwrap();
        c.add_meta_context("qemu:allocation-depth").unwrap();
        c.add_meta_context("x-unknown:thing").unwrap();
    });
    let p = connected(two.clone(), Behaviour::qemu());
    let names: Vec<&str> = p.client.meta_contexts().unwrap().iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["base:allocation", "qemu:allocation-depth"]);
    assert_eq!(p.client.meta_context_name(2), Some("qemu:allocation-depth"));

    let p = connected(two, Behaviour { contexts: vec![], ..Behaviour::qemu() });
    assert_eq!(p.client.meta_contexts(), Some(&[][..]));
    let mut p = p;
    assert_eq!(p.client.block_status(0, 512, CmdFlags::empty()), Err(Error::Local(LocalError::NoMetaContexts)));

    // No SET_META_CONTEXT without structured replies.
    let p = connected(cfg(|c| c.add_meta_context("base:allocation").unwrap()), Behaviour::nbd_server_any());
    assert!(!p.server.options.contains(&opt::SET_META_CONTEXT));
    assert_eq!(p.client.meta_contexts(), None);
}

trait AnyExport {
    fn nbd_server_any() -> Behaviour;
}

impl AnyExport for Behaviour {
    /// nbd-server-like, also serving the default export name.
    fn nbd_server_any() -> Behaviour {
        let mut b = Behaviour::nbd_server();
        b.exports.push((String::new(), String::new()));
        b
    }
}

#[test]
fn opt_mode_in_any_order() {
    let b =
        Behaviour { exports: vec![("a".into(), "first".into()), ("b".into(), "second".into())], ..Behaviour::nbdkit() };
    let mut p = Pair::connect(
        cfg(|c| {
            c.opt_mode = true;
            c.add_meta_context("base:allocation").unwrap();
        }),
        b,
        1 << 20,
    );
    assert_eq!(p.state(), PublicState::Negotiating);
    assert_eq!(p.client.direction(), Direction::None);
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY]);

    p.client.opt_list().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    let listed: Vec<(String, String)> = p
        .events
        .drain(..)
        .filter_map(|e| match e {
            Event::ExportListed { name, description } => Some((name, description)),
            _ => None,
        })
        .collect();
    assert_eq!(listed, [("a".into(), "first".into()), ("b".into(), "second".into())]);

    // A second opt command may not start while in negotiation's rest state only.
    p.client.config_mut().unwrap().set_export_name("nope").unwrap();
    p.client.opt_info().unwrap();
    assert!(p.client.opt_list().is_err(), "one option at a time");
    p.drive();
    let e = p.option_result().unwrap().unwrap_err();
    assert_eq!(e.errno(), ENOENT);
    assert!(e.to_string().contains("no such export"), "{e}");
    assert_eq!(p.state(), PublicState::Negotiating);

    p.client.opt_list_meta_context().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert!(p.events.iter().any(|e| matches!(e, Event::MetaContextListed { name } if name == "base:allocation")));

    p.client.config_mut().unwrap().set_export_name("b").unwrap();
    p.client.opt_info().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.client.export().size, Some(1 << 20));
    assert_eq!(p.state(), PublicState::Negotiating);

    p.client.opt_go().unwrap();
    p.drive();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.state(), PublicState::Ready);
    assert_eq!(p.client.direction(), Direction::Read);
    assert_eq!(p.client.meta_contexts().unwrap().len(), 1);
    assert!(p.client.opt_go().is_err(), "opt_go only while negotiating");
}

#[test]
fn opt_abort_with_and_without_a_reply() {
    for abort_ack in [true, false] {
        let mut p = Pair::connect(cfg(|c| c.opt_mode = true), Behaviour { abort_ack, ..Behaviour::nbdkit() }, 4096);
        p.client.opt_abort().unwrap();
        p.drive();
        assert_eq!(p.option_result(), Some(Ok(())));
        assert_eq!(p.state(), PublicState::Closed);
        assert_eq!(p.client.direction(), Direction::None);
        assert_eq!(p.server.options.last(), Some(&opt::ABORT));
    }
}

#[test]
fn auto_mode_with_an_unknown_export_dies_with_enoent() {
    let p = Pair::connect(cfg(|c| c.set_export_name("missing").unwrap()), Behaviour::nbdkit(), 4096);
    assert_eq!(p.state(), PublicState::Dead);
    assert_eq!(p.client.error().unwrap().errno(), ENOENT);
    assert_eq!(p.client.direction(), Direction::None);
}

#[test]
fn export_flags_are_normalised_as_libnbd_does() {
    let weird = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FAST_ZERO | TransmissionFlags::READ_ONLY;
    let p = connected(Config::default(), Behaviour { flags: weird, ..Behaviour::nbdkit() });
    assert_eq!(p.client.export().flags, TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY);
    let p = connected(Config::default(), Behaviour { flags: TransmissionFlags::READ_ONLY, ..Behaviour::nbdkit() });
    assert_eq!(p.client.export().flags, TransmissionFlags::empty(), "no HAS_FLAGS: no flags");
}

#[test]
fn states_and_directions_from_created_to_closed() {
    let mut c: Connection<Vec<u8>> = Connection::new(Config::default());
    assert_eq!(c.state(), PublicState::Created);
    assert_eq!(c.direction(), Direction::None);
    assert_eq!(c.read(0, vec![0; 1], CmdFlags::empty()).unwrap_err().errno(), errno::ENOTCONN);
    c.start_connect().unwrap();
    assert_eq!(c.state(), PublicState::Connecting);
    assert_eq!(c.direction(), Direction::Write);
    c.handle_connected().unwrap();
    assert_eq!(c.direction(), Direction::Read);
    assert!(c.handle_connected().is_err());

    let mut p = connected(Config::default(), Behaviour::nbdkit());
    p.server.hold = true;
    p.client.flush(CmdFlags::empty()).unwrap();
    assert_eq!(p.state(), PublicState::Processing, "a request waiting to leave");
    assert_eq!(p.client.direction(), Direction::Both);
    p.drive();
    assert_eq!(p.state(), PublicState::Ready, "sent, reply pending");
    p.client.disconnect().unwrap();
    assert_eq!(p.client.disconnect().unwrap_err(), Error::Local(LocalError::AfterDisconnect));
    p.server.hold = false;
    p.inject(&{
        let mut v = Vec::new();
        wire::ReplyHeader::Simple { error: 0, cookie: 1 }.encode(&mut v);
        v
    });
    p.drive();
    assert_eq!(p.state(), PublicState::Closed);
}

// ---- malformed handshakes --------------------------------------------------

fn greeting() -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(wire::NBDMAGIC);
    v.put_u64(wire::IHAVEOPT);
    v.put_u16(3);
    v
}

fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    OptionReplyHeader { option, reply, length: payload.len() as u32 }.encode(&mut v);
    v.extend_from_slice(payload);
    v
}

fn info_export(size: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u16(info::EXPORT);
    p.put_u64(size);
    p.put_u16(1);
    p
}

/// A raw client that asks for nothing optional, so the first option is GO.
fn bare(opt_mode: bool, tls: TlsMode) -> Connection<Vec<u8>> {
    let mut c = Connection::new(cfg(|c| {
        c.request_structured_replies = false;
        c.request_block_size = false;
        c.opt_mode = opt_mode;
        c.tls = tls;
    }));
    c.handle_connected().unwrap();
    c
}

fn drain_output(c: &mut Connection<Vec<u8>>) -> Vec<u8> {
    let mut sent = Vec::new();
    let mut slices: [&[u8]; 8] = [&[]; 8];
    let n = c.poll_transmit(&mut slices);
    slices[..n].iter().for_each(|s| sent.extend_from_slice(s));
    c.handle_sent(sent.len());
    sent
}

fn assert_handshake_killed(c: &mut Connection<Vec<u8>>, expected: Error, case: &str) {
    assert_eq!(c.state(), PublicState::Dead, "{case}");
    assert_eq!(c.error(), Some(&expected), "{case}");
    assert_eq!(c.direction(), Direction::None, "{case}");
}

#[test]
fn malformed_handshakes_kill_the_connection() {
    let go = opt::GO;
    let mut cases: Vec<(&str, Vec<u8>, ProtocolError)> = vec![
        (
            "bad NBDMAGIC",
            [b"NBDMAGIX".as_slice(), &[0; 8]].concat(),
            ProtocolError::BadMagic { what: "greeting", got: u64::from_be_bytes(*b"NBDMAGIX") },
        ),
        (
            "bad style magic",
            [b"NBDMAGIC".as_slice(), &[1; 8]].concat(),
            ProtocolError::BadMagic { what: "greeting version", got: 0x0101_0101_0101_0101 },
        ),
        (
            "bad option reply magic",
            [greeting(), vec![0; 20]].concat(),
            ProtocolError::BadMagic { what: "option reply", got: 0 },
        ),
        (
            "reply to another option",
            [greeting(), option_reply(opt::LIST, rep::ACK, &[])].concat(),
            ProtocolError::OptionReplyMismatch { sent: go, got: opt::LIST },
        ),
        (
            "SERVER reply to GO",
            [greeting(), option_reply(go, rep::SERVER, &[0; 4])].concat(),
            ProtocolError::UnexpectedOptionReply { option: go, reply: rep::SERVER },
        ),
        (
            "ACK with a payload",
            [greeting(), option_reply(go, rep::ACK, &[1])].concat(),
            ProtocolError::BadOptionReplyLength { option: go, reply: rep::ACK, length: 1 },
        ),
        (
            "INFO export of wrong length",
            [greeting(), option_reply(go, rep::INFO, &info_export(1)[..10])].concat(),
            ProtocolError::BadOptionReplyLength { option: go, reply: rep::INFO, length: 10 },
        ),
        (
            "INFO block size of wrong length",
            [greeting(), option_reply(go, rep::INFO, &[0, 3, 0, 0, 0, 1])].concat(),
            ProtocolError::BadOptionReplyLength { option: go, reply: rep::INFO, length: 6 },
        ),
        (
            "ACK without INFO_EXPORT",
            [greeting(), option_reply(go, rep::ACK, &[])].concat(),
            ProtocolError::MissingExportInfo(go),
        ),
        (
            "size of 2^63 in INFO",
            [greeting(), option_reply(go, rep::INFO, &info_export(1 << 63))].concat(),
            ProtocolError::SizeTooLarge(1 << 63),
        ),
    ];
    let mut huge = Vec::new();
    OptionReplyHeader { option: go, reply: rep::INFO, length: 1 << 20 }.encode(&mut huge);
    cases.push((
        "oversize option reply",
        [greeting(), huge].concat(),
        ProtocolError::BadOptionReplyLength { option: go, reply: rep::INFO, length: 1 << 20 },
    ));
    let mut oldstyle = Vec::new();
    oldstyle.put_u64(wire::NBDMAGIC);
    oldstyle.put_u64(wire::OLDSTYLE_MAGIC);
    oldstyle.put_u64(u64::MAX);
    oldstyle.put_u32(1);
    oldstyle.extend_from_slice(&[0; 124]);
    cases.push(("size of 2^64-1 oldstyle", oldstyle, ProtocolError::SizeTooLarge(u64::MAX)));

    for (case, bytes, expected) in cases {
        for split in [Split::Whole, Split::Bytewise] {
            let mut c = bare(false, TlsMode::Disable);
            match split {
                Split::Bytewise => bytes.chunks(1).for_each(|b| c.receive(b)),
                _ => c.receive(&bytes),
            }
            assert_handshake_killed(&mut c, expected.clone().into(), case);
            assert_eq!(c.error().unwrap().errno(), EPROTO);
        }
    }
}

#[test]
fn export_name_reply_with_a_size_of_2_pow_63() {
    let mut bytes = greeting();
    bytes[17] = 1; // fixed newstyle only: the reply carries zeroes
    bytes.extend(option_reply(opt::GO, rep::ERR_UNSUP, &[]));
    bytes.put_u64(1 << 63);
    bytes.put_u16(1);
    bytes.extend_from_slice(&[0; 124]);
    let mut c = bare(false, TlsMode::Disable);
    c.receive(&bytes);
    assert_handshake_killed(&mut c, ProtocolError::SizeTooLarge(1 << 63).into(), "EXPORT_NAME");
}

#[test]
fn meta_context_replies_must_answer_the_request() {
    let set = opt::SET_META_CONTEXT;
    let ctx = |id: u32, name: &str| {
        let mut p = Vec::new();
        p.put_u32(id);
        p.extend_from_slice(name.as_bytes());
        option_reply(set, rep::META_CONTEXT, &p)
    };
    let sr_ack = option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
    let cases = [
        (
            "not requested",
            ctx(1, "qemu:dirty-bitmap:x"),
            ProtocolError::MetaContextNotRequested("qemu:dirty-bitmap:x".into()),
        ),
        (
            "duplicate id",
            [ctx(1, "base:allocation"), ctx(1, "qemu:allocation-depth")].concat(),
            ProtocolError::DuplicateMetaContextId(1),
        ),
        (
            "same context twice",
            [ctx(1, "base:allocation"), ctx(2, "base:allocation")].concat(),
            ProtocolError::MetaContextNotRequested("base:allocation".into()),
        ),
    ];
    for (case, replies, expected) in cases {
        let mut c: Connection<Vec<u8>> = Connection::new(cfg(|c| {
            c.request_extended_headers = false;
            c.add_meta_context("base:allocation").unwrap();
            c.add_meta_context("qemu:allocation-depth").unwrap();
        }));
        c.handle_connected().unwrap();
        c.receive(&[greeting(), sr_ack.clone(), replies].concat());
        assert_handshake_killed(&mut c, expected.into(), case);
    }
}

#[test]
fn starttls_seam_and_no_downgrade() {
    // ALLOW: an accepted STARTTLS hands over to the TLS layer, then options
    // are negotiated again inside TLS.
    let mut c = bare(false, TlsMode::Allow);
    c.receive(&[greeting(), option_reply(opt::STARTTLS, rep::ACK, &[])].concat());
    let plaintext = drain_output(&mut c);
    assert!(plaintext.windows(4).any(|w| w == opt::STARTTLS.to_be_bytes()));
    assert!(matches!(c.poll_event(), Some(Event::StartTls)));
    assert_eq!(c.direction(), Direction::None, "the TLS layer drives now");
    c.handle_tls_established().unwrap();
    assert!(c.tls_negotiated());
    let inside = drain_output(&mut c);
    assert!(inside.windows(4).any(|w| w == opt::GO.to_be_bytes()), "GO follows inside TLS");

    // Bytes after the STARTTLS ACK, before TLS: plaintext injection.
    let mut c = bare(false, TlsMode::Allow);
    c.receive(&[greeting(), option_reply(opt::STARTTLS, rep::ACK, &[]), vec![1, 2, 3]].concat());
    assert_handshake_killed(&mut c, ProtocolError::DataBeforeTls.into(), "injection");

    // ALLOW falls back to plaintext when refused; REQUIRE does not.
    let refused = [greeting(), option_reply(opt::STARTTLS, rep::ERR_POLICY, b"no")].concat();
    let mut c = bare(false, TlsMode::Allow);
    c.receive(&refused);
    assert_eq!(c.state(), PublicState::Connecting);
    assert!(!c.tls_negotiated());
    let mut c = bare(false, TlsMode::Require);
    c.receive(&refused);
    assert_handshake_killed(&mut c, ServerError::TlsUnavailable("refused NBD_OPT_STARTTLS").into(), "require");

    // REQUIRE against an oldstyle or non-fixed server.
    for (style, why) in [
        (Style::Oldstyle, "uses the oldstyle handshake"),
        (Style::Newstyle, "does not use the fixed newstyle handshake"),
    ] {
        let mut p = Pair::connect(cfg(|c| c.tls = TlsMode::Require), Behaviour { style, ..Behaviour::nbdkit() }, 4096);
        assert_eq!(p.state(), PublicState::Dead);
        assert_eq!(p.client.error(), Some(&ServerError::TlsUnavailable(why).into()));
        assert!(p.server.requests.is_empty());
        p.drive();
    }
}

#[test]
fn eof_at_every_byte_of_a_handshake() {
    // Record a full valid handshake stream from the scripted server.
    let mut full = Pair::new(cfg(|c| c.add_meta_context("base:allocation").unwrap()), Behaviour::nbdkit(), 4096);
    let mut stream = Vec::new();
    loop {
        let mut slices: [&[u8]; 8] = [&[]; 8];
        let n = full.client.poll_transmit(&mut slices);
        let bytes: Vec<u8> = slices[..n].concat();
        full.client.handle_sent(bytes.len());
        full.server.receive(&bytes);
        let out = std::mem::take(&mut full.server.out);
        if out.is_empty() && bytes.is_empty() {
            break;
        }
        stream.extend_from_slice(&out);
        full.client.receive(&out);
    }
    assert_eq!(full.state(), PublicState::Ready);
    for cut in 0..stream.len() {
        let mut c: Connection<Vec<u8>> = Connection::new(cfg(|c| c.add_meta_context("base:allocation").unwrap()));
        c.handle_connected().unwrap();
        c.receive(&stream[..cut]);
        c.handle_eof();
        assert_eq!(c.state(), PublicState::Dead, "cut at {cut}");
        assert!(matches!(c.error(), Some(Error::Transport(TransportError::Eof(_)))), "cut at {cut}: {:?}", c.error());
    }
}

#[test]
fn unsolicited_bytes_while_negotiating_are_refused() {
    let mut p = Pair::connect(cfg(|c| c.opt_mode = true), Behaviour::nbdkit(), 4096);
    assert_eq!(p.state(), PublicState::Negotiating);
    p.inject(&[0; 8]);
    assert_eq!(p.state(), PublicState::Dead);
    assert_eq!(p.client.error(), Some(&ProtocolError::UnsolicitedData("while negotiating").into()));
}

#[test]
fn names_longer_than_4096_bytes_are_refused() {
    let mut c = Config::default();
    let long = "x".repeat(4097);
    assert_eq!(c.set_export_name(&long).unwrap_err().errno(), errno::ENAMETOOLONG);
    assert_eq!(c.add_meta_context(&long).unwrap_err().errno(), errno::ENAMETOOLONG);
    assert!(c.set_export_name(&long[..4096]).is_ok());
}
