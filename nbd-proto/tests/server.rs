//! The server role against the client role in memory, through every
//! handshake path, every command and reply form, and the error paths; then
//! a hostile client's raw bytes; then every split of the byte streams.

mod support;

use nbd_proto::server::{self, Command, Event as SEvent, Export, Phase, TlsPolicy, BASE_ALLOCATION_ID};
use nbd_proto::wire::{self, cmd, nbd_error, opt, rep, OptionHeader, OptionReplyHeader, Put, Reader, RequestHeader};
use nbd_proto::*;
use support::pair::Split;
use support::server_pair::{Disk, ServerPair};

const SIZE: usize = 1 << 20;

fn client_config() -> Config {
    let mut c = Config::default();
    c.add_meta_context("base:allocation").unwrap();
    c.strict = StrictMode::empty();
    c
}

fn server_config() -> server::Config {
    let mut e = Export::new("", SIZE as u64);
    e.description = "memory".into();
    server::Config { exports: vec![e, Export::new("second", 4096)], ..Default::default() }
}

fn pair_with(client: Config, server: server::Config) -> ServerPair {
    let mut disk = Disk::new(SIZE);
    disk.bytes[4096..8192].fill(0x5a);
    ServerPair::connect(client, server, disk)
}

fn pair() -> ServerPair {
    pair_with(client_config(), server_config())
}

// ---- handshake ----------------------------------------------------------------

#[test]
fn go_negotiates_extended_headers_meta_context_and_block_size() {
    let mut p = pair();
    assert_eq!(p.client.state(), PublicState::Ready);
    assert_eq!(p.server.phase(), Phase::Transmission);
    assert!(p.client.extended_headers_negotiated() && p.server.extended_headers());
    assert!(p.client.structured_replies_negotiated());
    let e = p.client.export().clone();
    assert_eq!(e.size, Some(SIZE as u64));
    assert_eq!(e.block_size, Some(server::DEFAULT_BLOCK_SIZE));
    for f in [
        TransmissionFlags::SEND_FLUSH,
        TransmissionFlags::SEND_FUA,
        TransmissionFlags::SEND_TRIM,
        TransmissionFlags::SEND_WRITE_ZEROES,
        TransmissionFlags::SEND_FAST_ZERO,
        TransmissionFlags::SEND_CACHE,
        TransmissionFlags::SEND_DF,
        TransmissionFlags::BLOCK_STAT_PAYLOAD,
    ] {
        assert!(e.flags.contains(f), "{f:?}");
    }
    assert!(!e.flags.contains(TransmissionFlags::READ_ONLY));
    let ctx = p.client.meta_contexts().unwrap().to_vec();
    assert_eq!(ctx.len(), 1);
    assert_eq!((ctx[0].id, ctx[0].name.as_str()), (BASE_ALLOCATION_ID, "base:allocation"));
    assert_eq!(p.server.meta_contexts(), &ctx[..]);
    assert_eq!(p.server_events, ["ExportSelected { export: 0 }"]);
    p.client.disconnect().unwrap();
    p.drive();
    assert_eq!(p.client.state(), PublicState::Closed);
    assert_eq!(p.server.phase(), Phase::Closed);
    assert!(p.server.error().is_none());
}

#[test]
fn reply_formats_follow_what_each_side_offers() {
    // (client asks SR, client asks EH, server offers SR, server offers EH) -> (SR, EH)
    let cases = [
        ((true, true, true, true), (true, true)),
        ((true, false, true, true), (true, false)),
        ((false, false, true, true), (false, false)),
        ((true, true, true, false), (true, false)),
        ((true, true, false, false), (false, false)),
        ((true, true, false, true), (true, true)),
    ];
    for ((csr, ceh, ssr, seh), (sr, eh)) in cases {
        let mut c = client_config();
        c.request_structured_replies = csr;
        c.request_extended_headers = ceh;
        let s = server::Config { structured_replies: ssr, extended_headers: seh, ..server_config() };
        let p = pair_with(c, s);
        assert_eq!(p.client.state(), PublicState::Ready, "{csr} {ceh} {ssr} {seh}");
        assert_eq!((p.server.structured_replies(), p.server.extended_headers()), (sr, eh));
        assert_eq!(p.client.structured_replies_negotiated(), sr);
        assert_eq!(p.client.extended_headers_negotiated(), eh);
        // Meta contexts need structured replies.
        assert_eq!(p.server.meta_contexts().len(), usize::from(sr));
    }
}

#[test]
fn opt_mode_lists_exports_and_contexts_and_gives_info() {
    let mut c = client_config();
    c.opt_mode = true;
    c.full_info = true;
    let mut p = pair_with(c, server_config());
    assert_eq!(p.client.state(), PublicState::Negotiating);
    p.client.opt_list().unwrap();
    p.drive();
    p.option_result().unwrap().unwrap();
    let listed: Vec<String> = p.transcript.iter().filter(|t| t.starts_with("ExportListed")).cloned().collect();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].contains("name: \"\"") && listed[0].contains("memory"));
    assert!(listed[1].contains("second"));

    p.client.opt_list_meta_context().unwrap();
    p.drive();
    p.option_result().unwrap().unwrap();
    assert!(p.transcript.iter().any(|t| t.contains("MetaContextListed { name: \"base:allocation\" }")));
    // The `base:` wildcard lists it too; an unknown namespace lists nothing.
    p.client.opt_list_meta_context_queries(Some(vec!["base:".into(), "qemu:".into()])).unwrap();
    p.drive();
    p.option_result().unwrap().unwrap();

    p.client.set_export_name("second").unwrap();
    p.client.opt_info().unwrap();
    p.drive();
    p.option_result().unwrap().unwrap();
    assert_eq!(p.client.export().size, Some(4096));
    assert_eq!(p.client.export().canonical_name.as_deref(), Some("second"));
    assert_eq!(p.client.export().description.as_deref(), Some(""));
    assert_eq!(p.server.phase(), Phase::Handshake);

    p.client.set_export_name("nonesuch").unwrap();
    p.client.opt_info().unwrap();
    p.drive();
    assert_eq!(p.option_result().unwrap().unwrap_err().errno(), errno::ENOENT);

    p.client.set_export_name("").unwrap();
    p.client.opt_go().unwrap();
    p.drive();
    p.option_result().unwrap().unwrap();
    assert_eq!(p.client.state(), PublicState::Ready);
    assert_eq!(p.client.export().description.as_deref(), Some("memory"));
    assert_eq!(p.server.export(), Some(0));
}

#[test]
fn contexts_selected_for_another_export_do_not_carry_over() {
    let mut p = Vec::new();
    wire::encode_meta_context_request("second", &["base:allocation"], &mut p);
    let mut before = option(opt::STRUCTURED_REPLY, &[]);
    before.extend(option(opt::SET_META_CONTEXT, &p));
    let r = Raw::go(server_config(), &before);
    assert!(r.s.meta_contexts().is_empty(), "GO named another export");
    let mut p = Vec::new();
    wire::encode_meta_context_request("", &["base:allocation"], &mut p);
    let mut before = option(opt::STRUCTURED_REPLY, &[]);
    before.extend(option(opt::SET_META_CONTEXT, &p));
    let r = Raw::go(server_config(), &before);
    assert_eq!(r.s.meta_contexts().len(), 1);
}

#[test]
fn abort_ends_the_session_cleanly() {
    let mut c = client_config();
    c.opt_mode = true;
    let mut p = pair_with(c, server_config());
    p.client.opt_abort().unwrap();
    p.drive();
    assert_eq!(p.client.state(), PublicState::Closed);
    assert_eq!(p.server.phase(), Phase::Closed);
    assert!(p.server_events.contains(&"Disconnect".to_string()));
}

#[test]
fn starttls_by_policy() {
    // (server policy, client mode) -> (connected, TLS on)
    let cases = [
        (TlsPolicy::Allow, TlsMode::Require, true, true),
        (TlsPolicy::Require, TlsMode::Require, true, true),
        (TlsPolicy::Allow, TlsMode::Disable, true, false),
        (TlsPolicy::Off, TlsMode::Allow, true, false),
        (TlsPolicy::Off, TlsMode::Require, false, false),
        (TlsPolicy::Require, TlsMode::Disable, false, false),
    ];
    for (policy, mode, connected, tls) in cases {
        let mut c = client_config();
        c.tls = mode;
        let p = pair_with(c, server::Config { tls: policy, ..server_config() });
        assert_eq!(p.client.state() == PublicState::Ready, connected, "{policy:?} {mode:?}: {:?}", p.client.error());
        assert_eq!(p.server.tls_active(), tls, "{policy:?} {mode:?}");
        assert_eq!(p.client.tls_negotiated(), tls);
        if tls {
            // Negotiated inside TLS, after the upgrade.
            assert!(p.server.extended_headers());
        }
    }
}

#[test]
fn a_client_without_fixed_newstyle_gets_export_name_only() {
    let mut c = client_config();
    c.handshake_flags = HandshakeFlags::NO_ZEROES;
    let p = pair_with(c.clone(), server_config());
    assert_eq!(p.client.state(), PublicState::Ready, "{:?}", p.client.error());
    assert!(!p.server.fixed_newstyle());
    assert_eq!(p.client.export().size, Some(SIZE as u64));
    // Without NO_ZEROES as well: the 124 zeroes follow.
    c.handshake_flags = HandshakeFlags::empty();
    let p = pair_with(c.clone(), server_config());
    assert_eq!(p.client.state(), PublicState::Ready, "{:?}", p.client.error());
    // A server that requires TLS cannot serve it.
    let p = pair_with(c, server::Config { tls: TlsPolicy::Require, ..server_config() });
    assert_eq!(p.server.phase(), Phase::Dead);
    assert!(matches!(p.server.error(), Some(Error::Client(ClientError::ExportNameRefused(_)))));
}

// ---- transmission -----------------------------------------------------------------

/// Every command once, data checked; returns the client transcript.
fn every_command(p: &mut ServerPair) {
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    let w = p.client.write(65536, data.clone(), CmdFlags::FUA).unwrap();
    p.drive();
    assert_eq!(p.errno_of(w), 0);
    assert_eq!(&p.disk.bytes[65536..131072], &data[..]);

    let r = p.client.read(65536, vec![0; 65536], CmdFlags::empty()).unwrap();
    // DF is advertised only with structured replies.
    let df_flag = if p.server.structured_replies() { CmdFlags::DF } else { CmdFlags::empty() };
    let df = p.client.read(0, vec![0; 16384], df_flag).unwrap();
    let small = p.client.read_structured(4000, vec![0; 200], CmdFlags::empty()).unwrap();
    p.drive();
    assert_eq!(p.completed(r).unwrap().unwrap(), data);
    assert_eq!(p.completed(df).unwrap().unwrap(), p.disk.bytes[..16384].to_vec());
    assert_eq!(p.completed(small).unwrap().unwrap(), p.disk.bytes[4000..4200].to_vec());

    let z = p.client.write_zeroes(65536, 4096, CmdFlags::NO_HOLE).unwrap();
    let fz = p.client.write_zeroes(69632, 4096, CmdFlags::FAST_ZERO).unwrap();
    let t = p.client.trim(73728, 4096, CmdFlags::empty()).unwrap();
    let c = p.client.cache(0, 65536, CmdFlags::empty()).unwrap();
    let f = p.client.flush(CmdFlags::empty()).unwrap();
    p.drive();
    for cookie in [z, fz, t, c, f] {
        assert_eq!(p.errno_of(cookie), 0, "cookie {cookie}");
    }
    assert!(p.disk.bytes[65536..77824].iter().all(|&b| b == 0));

    if p.client.meta_contexts().is_some_and(|m| !m.is_empty()) {
        let bs = p.client.block_status(0, 65536 * 2, CmdFlags::empty()).unwrap();
        let one = p.client.block_status(0, 65536, CmdFlags::REQ_ONE).unwrap();
        p.drive();
        let extents: Vec<String> = p.transcript.iter().filter(|t| t.starts_with("Extents")).cloned().collect();
        assert_eq!(extents.len(), 2, "{extents:?}");
        assert!(extents[0].contains("Extent { length: 4096, flags: 3 }, Extent { length: 4096, flags: 0 }"));
        assert!(extents[1].contains("extents: [Extent { length: 4096, flags: 3 }]"));
        assert_eq!(p.errno_of(bs), 0);
        assert_eq!(p.errno_of(one), 0);
    }
}

#[test]
fn every_command_in_every_reply_form() {
    for (sr, eh, sparse) in [
        (false, false, false),
        (true, false, false),
        (true, true, false),
        (true, false, true),
        (false, false, true),
        (true, true, true),
    ] {
        let mut c = client_config();
        c.request_structured_replies = sr;
        c.request_extended_headers = eh;
        let mut p = pair_with(c, server_config());
        p.disk.sparse = sparse;
        assert_eq!(p.server.extended_headers(), eh);
        every_command(&mut p);
        p.client.disconnect().unwrap();
        p.drive();
        assert_eq!(p.server.phase(), Phase::Closed, "{sr} {eh}");
        assert_eq!(p.client.state(), PublicState::Closed);
        assert_eq!(p.lent, 0, "every lent buffer came back");
    }
}

#[test]
fn sparse_reads_arrive_as_holes_and_data() {
    let mut p = pair();
    p.disk.sparse = true;
    let r = p.client.read_structured(0, vec![0xff; 16384], CmdFlags::empty()).unwrap();
    p.drive();
    let chunks: Vec<String> = p.transcript.iter().filter(|t| t.starts_with("ReadChunk")).cloned().collect();
    assert_eq!(chunks.len(), 4, "{chunks:?}");
    assert_eq!(chunks.iter().filter(|c| c.contains("Hole")).count(), 3);
    assert_eq!(p.completed(r).unwrap().unwrap(), p.disk.bytes[..16384].to_vec());
}

#[test]
fn block_status_for_named_contexts_under_extended_headers() {
    let mut p = pair();
    let r = p.client.block_status_filter(0, 8192, &[BASE_ALLOCATION_ID], CmdFlags::PAYLOAD_LEN).unwrap();
    p.drive();
    assert_eq!(p.errno_of(r), 0);
    let req = p.requests.last().unwrap();
    assert_eq!((req.command, req.length, req.contexts.clone()), (Command::BlockStatus, 8192, vec![BASE_ALLOCATION_ID]));
    assert!(!req.flags.contains(CmdFlags::PAYLOAD_LEN));
}

#[test]
fn server_errors_reach_the_client_with_their_message() {
    for sr in [false, true] {
        let mut c = client_config();
        c.request_structured_replies = sr;
        let mut p = pair_with(c, server_config());
        p.disk.fail = Some((0, 4096, nbd_error::EIO));
        let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
        let w = p.client.write(0, vec![1; 512], CmdFlags::empty()).unwrap();
        p.drive();
        for cookie in [r, w] {
            let e = p.completed(cookie).unwrap_err();
            assert_eq!(e.errno(), errno::EIO);
            assert_eq!(e.to_string().contains("injected failure"), sr, "{e}");
        }
    }
}

#[test]
fn invalid_requests_get_the_errors_the_protocol_prescribes() {
    let mut s = server_config();
    s.exports[0].block_size = Some(BlockSize { minimum: 512, preferred: 4096, maximum: 1 << 20 });
    let mut p = pair_with(client_config(), s);
    let size = SIZE as u64;
    let c = &mut p.client;
    let cases = [
        (c.read(size - 512, vec![0; 1024], CmdFlags::empty()), errno::EINVAL),
        (c.write(size, vec![0; 512], CmdFlags::empty()), errno::ENOSPC),
        (c.trim(size, 512, CmdFlags::empty()), errno::EINVAL),
        (c.read(100, vec![0; 512], CmdFlags::empty()), errno::EINVAL),
        (c.read(0, vec![0; 100], CmdFlags::empty()), errno::EINVAL),
        (c.block_status(0, 0, CmdFlags::empty()), errno::EINVAL),
        (c.read(0, vec![0; 512], CmdFlags::REQ_ONE), errno::EINVAL),
        (c.write_zeroes(0, 512, CmdFlags::DF), errno::EINVAL),
        (c.read(0, vec![0; 2 << 20], CmdFlags::empty()), errno::EINVAL),
        (c.block_status(0, 512, CmdFlags::REQ_ONE), 0),
    ];
    let cookies: Vec<(Cookie, i32)> = cases.into_iter().map(|(r, e)| (r.unwrap(), e)).collect();
    p.drive();
    for (cookie, want) in cookies {
        assert_eq!(p.errno_of(cookie), want, "cookie {cookie}");
    }
    // Only the valid one reached the caller.
    assert_eq!(p.requests.len(), 1);
    assert_eq!(p.server.phase(), Phase::Transmission);
}

#[test]
fn unadvertised_commands_flags_and_read_only_exports_are_refused() {
    let mut s = server_config();
    s.exports[0].flags = TransmissionFlags::READ_ONLY;
    s.exports[0].base_allocation = false;
    let mut p = pair_with(client_config(), s);
    let flags = p.client.export().flags;
    assert!(flags.contains(TransmissionFlags::READ_ONLY) && !flags.contains(TransmissionFlags::SEND_FLUSH));
    assert!(p.server.meta_contexts().is_empty());
    let c = &mut p.client;
    let cases = [
        (c.write(0, vec![0; 512], CmdFlags::empty()), errno::EPERM),
        (c.trim(0, 512, CmdFlags::empty()), errno::EINVAL),
        (c.flush(CmdFlags::empty()), errno::EINVAL),
        (c.cache(0, 512, CmdFlags::empty()), errno::EINVAL),
        (c.write_zeroes(0, 512, CmdFlags::empty()), errno::EINVAL),
        (c.read(0, vec![0; 512], CmdFlags::FUA), errno::EINVAL),
        (c.read(0, vec![0; 512], CmdFlags::empty()), 0),
    ];
    let cookies: Vec<(Cookie, i32)> = cases.into_iter().map(|(r, e)| (r.unwrap(), e)).collect();
    p.drive();
    for (cookie, want) in cookies {
        assert_eq!(p.errno_of(cookie), want, "cookie {cookie}");
    }
}

#[test]
fn replies_may_come_in_any_order_and_in_flight_requests_are_bounded() {
    let s = server::Config { max_in_flight: 2, ..server_config() };
    let mut p = pair_with(client_config(), s);
    p.hold = true;
    let cookies: Vec<Cookie> =
        (0..4).map(|i| p.client.read(i * 4096, vec![0; 4096], CmdFlags::empty()).unwrap()).collect();
    p.drive();
    assert_eq!(p.held.len(), 2, "parsing stops at the limit");
    assert_eq!(p.server.in_flight(), 2);
    assert!(!p.server.direction().wants_read());
    // Answer the second first; a third request comes in.
    let second = p.held.remove(1);
    p.answer(&second, None);
    p.drive();
    assert_eq!(p.held.len(), 2);
    assert!(p.completion(cookies[1]).is_some() && p.completion(cookies[0]).is_none());
    p.hold = false;
    let held = std::mem::take(&mut p.held);
    for r in held.iter().rev() {
        p.answer(r, None);
    }
    p.drive();
    for c in [cookies[0], cookies[2], cookies[3]] {
        p.completed(c).unwrap();
    }
    // Misuse of the reply calls is refused, not fatal.
    assert!(p.server.reply_ok(999).is_err());
    assert_eq!(p.server.phase(), Phase::Transmission);
}

#[test]
fn a_write_refused_before_its_payload_is_skipped() {
    let mut p = pair();
    p.hold = true;
    let w = p.client.write(0, vec![9; 100_000], CmdFlags::empty()).unwrap();
    let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.drive();
    // The buffer was lent at once by the pair; refuse the write anyway.
    let id = p.held[0].id;
    p.server.reply_error(id, nbd_error::ENOSPC, "full").unwrap();
    p.hold = false;
    p.drive();
    let held = std::mem::take(&mut p.held);
    for r in held.iter().skip(1) {
        p.answer(r, None);
    }
    p.drive();
    assert_eq!(p.errno_of(w), errno::ENOSPC);
    assert_eq!(p.errno_of(r), 0);
    assert_eq!(p.lent, 0);
    assert!(p.disk.bytes[..512].iter().all(|&b| b == 0));
}

#[test]
fn disconnect_waits_for_the_replies_owed() {
    let mut p = pair();
    p.hold = true;
    let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.drive();
    p.client.disconnect().unwrap();
    p.drive();
    assert_eq!(p.server.phase(), Phase::Closing);
    assert_eq!(p.server.direction(), Direction::None);
    let req = p.held.remove(0);
    p.answer(&req, None);
    p.drive();
    assert_eq!(p.server.phase(), Phase::Closed);
    assert_eq!(p.errno_of(r), 0);
}

// ---- a hostile client -----------------------------------------------------------------

/// A server fed raw client bytes; returns what it sent back.
struct Raw {
    s: server::Connection<Vec<u8>>,
    sent: Vec<u8>,
    events: Vec<String>,
}

impl Raw {
    fn new(cfg: server::Config) -> Raw {
        let mut r = Raw { s: server::Connection::new(cfg), sent: Vec::new(), events: Vec::new() };
        r.flush();
        r.sent.clear();
        r
    }

    fn flush(&mut self) {
        loop {
            let mut slices: [&[u8]; 8] = [&[]; 8];
            let n = self.s.poll_transmit(&mut slices);
            let bytes = slices[..n].concat();
            if !bytes.is_empty() {
                self.sent.extend_from_slice(&bytes);
                self.s.handle_sent(bytes.len());
                continue;
            }
            let Some(e) = self.s.poll_event() else { break };
            match e {
                SEvent::Request(r) if r.command == Command::Write => {
                    self.events.push(format!("{r:?}"));
                    self.s.receive_write(r.id, vec![0; r.length as usize]).unwrap();
                }
                SEvent::Request(r) => {
                    self.events.push(format!("{r:?}"));
                    self.s.reply_error(r.id, nbd_error::EIO, "").unwrap();
                }
                SEvent::WriteData { id, .. } => {
                    self.events.push(format!("WriteData {id}"));
                    self.s.reply_ok(id).unwrap();
                }
                SEvent::StartTls => {
                    self.events.push("StartTls".into());
                }
                other => self.events.push(format!("{other:?}")),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() && self.s.direction().wants_read() {
            let dest = self.s.recv_buffer();
            let n = dest.len().min(bytes.len() - at);
            dest[..n].copy_from_slice(&bytes[at..at + n]);
            self.s.handle_received(n);
            at += n;
            self.flush();
        }
        self.flush();
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.sent)
    }

    /// Client flags, then GO for the default export after `before`.
    fn go(cfg: server::Config, before: &[u8]) -> Raw {
        let mut r = Raw::new(cfg);
        let mut b = vec![0, 0, 0, 3];
        b.extend_from_slice(before);
        let mut p = Vec::new();
        wire::encode_info_request("", &[], &mut p);
        OptionHeader::encode_with(opt::GO, &p, &mut b);
        r.send(&b);
        assert_eq!(r.s.phase(), Phase::Transmission);
        r.take();
        r
    }

    fn dead_with(&self) -> String {
        assert_eq!(self.s.phase(), Phase::Dead, "{:?}", self.events);
        self.s.error().unwrap().to_string()
    }
}

fn option(o: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    OptionHeader::encode_with(o, payload, &mut b);
    b
}

fn request(kind: u16, flags: u16, offset: u64, length: u64, extended: bool) -> Vec<u8> {
    let mut b = Vec::new();
    RequestHeader { flags, kind, cookie: 77, offset, length }.encode(extended, &mut b);
    b
}

/// The option replies in `bytes`: (option, reply type, payload).
fn option_replies(bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at + OptionReplyHeader::SIZE <= bytes.len() {
        let h = OptionReplyHeader::decode(bytes[at..at + 20].try_into().unwrap()).expect("reply magic");
        at += 20;
        v.push((h.option, h.reply, bytes[at..at + h.length as usize].to_vec()));
        at += h.length as usize;
    }
    v
}

/// The error of the simple reply or error chunk at the start of `bytes`.
fn reply_error(bytes: &[u8]) -> u32 {
    let mut r = Reader::new(bytes);
    match r.u32().unwrap() {
        wire::SIMPLE_REPLY_MAGIC => r.u32().unwrap(),
        wire::STRUCTURED_REPLY_MAGIC => u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
        wire::EXTENDED_REPLY_MAGIC => u32::from_be_bytes(bytes[32..36].try_into().unwrap()),
        m => panic!("not a reply: {m:#x}"),
    }
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let s = server::Connection::<Vec<u8>>::new(server_config());
    let mut slices: [&[u8]; 4] = [&[]; 4];
    let n = s.poll_transmit(&mut slices);
    let g = slices[..n].concat();
    let mut r = Reader::new(&g);
    assert_eq!((r.u64(), r.u64(), r.u16()), (Some(wire::NBDMAGIC), Some(wire::IHAVEOPT), Some(3)));
    assert_eq!(s.direction(), Direction::Both);
}

#[test]
fn unknown_client_flags_and_bad_option_magic_end_the_session() {
    let mut r = Raw::new(server_config());
    r.send(&[0, 0, 0, 4]);
    assert!(r.dead_with().contains("unknown client flags"));

    let mut r = Raw::new(server_config());
    let mut b = vec![0, 0, 0, 1];
    b.extend_from_slice(&[0x42; 16]);
    r.send(&b);
    assert!(r.dead_with().contains("bad magic in option request"));
}

#[test]
fn options_get_the_replies_the_protocol_prescribes() {
    let mut r = Raw::new(server_config());
    let mut b = vec![0, 0, 0, 1];
    b.extend(option(99, b"whatever"));
    b.extend(option(opt::LIST, b"x"));
    b.extend(option(opt::STARTTLS, &[]));
    b.extend(option(opt::SET_META_CONTEXT, &[0; 8]));
    b.extend(option(opt::STRUCTURED_REPLY, b"x"));
    b.extend(option(opt::STRUCTURED_REPLY, &[]));
    b.extend(option(opt::STRUCTURED_REPLY, &[]));
    b.extend(option(opt::EXTENDED_HEADERS, &[]));
    b.extend(option(opt::STRUCTURED_REPLY, &[]));
    b.extend(option(opt::GO, &[0, 0, 0, 9]));
    b.extend(option(opt::LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 50]));
    r.send(&b);
    let got: Vec<(u32, u32)> = option_replies(&r.take()).into_iter().map(|(o, t, _)| (o, t)).collect();
    assert_eq!(
        got,
        [
            (99, rep::ERR_UNSUP),
            (opt::LIST, rep::ERR_INVALID),
            (opt::STARTTLS, rep::ERR_POLICY),
            (opt::SET_META_CONTEXT, rep::ERR_INVALID),
            (opt::STRUCTURED_REPLY, rep::ERR_INVALID),
            (opt::STRUCTURED_REPLY, rep::ACK),
            (opt::STRUCTURED_REPLY, rep::ERR_INVALID),
            (opt::EXTENDED_HEADERS, rep::ACK),
            (opt::STRUCTURED_REPLY, rep::ERR_EXT_HEADER_REQD),
            (opt::GO, rep::ERR_INVALID),
            (opt::LIST_META_CONTEXT, rep::ERR_INVALID),
        ]
    );
    // EXPORT_NAME is forbidden once extended headers are on: no reply can
    // say so, the session ends.
    r.send(&option(opt::EXPORT_NAME, b""));
    assert!(r.dead_with().contains("extended headers"));
}

#[test]
fn oversize_options_are_skipped_without_buffering() {
    let mut r = Raw::new(server_config());
    let mut b = vec![0, 0, 0, 1];
    let mut h = Vec::new();
    h.put_u64(wire::IHAVEOPT);
    h.put_u32(opt::LIST_META_CONTEXT);
    h.put_u32(16 << 20);
    b.extend(h);
    r.send(&b);
    // The refusal leaves at once; the payload is skipped as it comes.
    assert_eq!(option_replies(&r.take())[0].1, rep::ERR_TOO_BIG);
    for _ in 0..256 {
        r.send(&[0xaa; 65536]);
    }
    r.send(&option(opt::LIST, &[]));
    let replies = option_replies(&r.take());
    assert_eq!(replies.len(), 3, "two exports and the ACK");
    assert_eq!(r.s.phase(), Phase::Handshake);
    // An oversize export name cannot be refused politely.
    let mut h = Vec::new();
    h.put_u64(wire::IHAVEOPT);
    h.put_u32(opt::EXPORT_NAME);
    h.put_u32(1 << 30);
    r.send(&h);
    assert!(r.dead_with().contains("too long"));
}

#[test]
fn export_name_replies_with_or_without_zeroes_and_unknown_names_end_the_session() {
    for (flags, len) in [(1u8, 10 + 124), (3, 10)] {
        let mut r = Raw::new(server_config());
        let mut b = vec![0, 0, 0, flags];
        b.extend(option(opt::EXPORT_NAME, b"second"));
        r.send(&b);
        let reply = r.take();
        assert_eq!(reply.len(), len);
        assert_eq!(Reader::new(&reply).u64(), Some(4096));
        assert_eq!(r.s.phase(), Phase::Transmission);
    }
    let mut r = Raw::new(server_config());
    let mut b = vec![0, 0, 0, 1];
    b.extend(option(opt::EXPORT_NAME, b"nope"));
    r.send(&b);
    assert!(r.dead_with().contains("no such export"));
    // Non-fixed newstyle: any other option ends it.
    let mut r = Raw::new(server_config());
    let mut b = vec![0, 0, 0, 0];
    b.extend(option(opt::LIST, &[]));
    r.send(&b);
    assert!(r.dead_with().contains("without fixed newstyle"));
}

#[test]
fn tls_required_refuses_options_and_bytes_before_tls_kill() {
    let mut r = Raw::new(server::Config { tls: TlsPolicy::Require, ..server_config() });
    let mut b = vec![0, 0, 0, 1];
    b.extend(option(opt::LIST, &[]));
    b.extend(option(opt::STARTTLS, &[]));
    r.send(&b);
    let replies = option_replies(&r.take());
    assert_eq!((replies[0].1, replies[1].1), (rep::ERR_TLS_REQD, rep::ACK));
    assert_eq!(r.events, ["StartTls"]);
    assert_eq!(r.s.direction(), Direction::None, "nothing is read until TLS is up");
    // Plaintext after STARTTLS, before TLS: a possible injection.
    r.s.recv_buffer()[..4].copy_from_slice(b"evil");
    r.s.handle_received(4);
    assert!(r.dead_with().contains("before TLS began"));
}

#[test]
fn requests_with_bad_magic_or_the_wrong_header_form_end_the_session() {
    let mut r = Raw::go(server_config(), &[]);
    r.send(&[0x11; 28]);
    assert!(r.dead_with().contains("bad magic in request"));
    // Compact headers after extended headers were negotiated.
    let mut r = Raw::go(server_config(), &option(opt::EXTENDED_HEADERS, &[]));
    let mut b = request(cmd::READ, 0, 0, 512, false);
    b.extend_from_slice(&[0; 4]);
    r.send(&b);
    assert!(r.dead_with().contains("bad magic"));
}

#[test]
fn invalid_raw_requests_get_error_replies_and_the_session_goes_on() {
    for extended in [false, true] {
        let before = if extended { option(opt::EXTENDED_HEADERS, &[]) } else { Vec::new() };
        let mut r = Raw::go(server_config(), &before);
        let cases: [(Vec<u8>, u32); 7] = [
            (request(cmd::READ, 0, SIZE as u64, 1, extended), nbd_error::EINVAL),
            (request(cmd::READ, 0, u64::MAX, 2, extended), nbd_error::EINVAL),
            (request(99, 0, 0, 0, extended), nbd_error::EINVAL),
            (request(cmd::READ, 1 << 9, 0, 512, extended), nbd_error::EINVAL),
            (request(cmd::FLUSH, 0, 1, 0, extended), nbd_error::EINVAL),
            // Block status without a context selected.
            (request(cmd::BLOCK_STATUS, 0, 0, 512, extended), nbd_error::EINVAL),
            (request(cmd::READ, 0, 0, 512, extended), nbd_error::EIO),
        ];
        for (bytes, want) in cases {
            r.send(&bytes);
            assert_eq!(reply_error(&r.take()), want, "extended {extended}");
        }
        assert_eq!(r.s.phase(), Phase::Transmission);
        assert_eq!(r.events.iter().filter(|e| e.contains("Request")).count(), 1);
    }
}

#[test]
fn write_payloads_are_bounded_before_anything_is_allocated() {
    // Above the maximum but below the skip limit: refused, payload skipped.
    let mut s = server_config();
    s.exports[0].block_size = Some(BlockSize { minimum: 1, preferred: 4096, maximum: 256 << 10 });
    let mut r = Raw::go(s, &[]);
    let len = 512 << 10;
    let mut b = request(cmd::WRITE, 0, 0, len, false);
    b.resize(b.len() + len as usize, 0);
    b.extend(request(cmd::FLUSH, 0, 0, 0, false));
    r.send(&b);
    let out = r.take();
    assert_eq!(reply_error(&out), nbd_error::EINVAL);
    assert_eq!(reply_error(&out[16..]), nbd_error::EIO, "the FLUSH after it was read in sync");
    // Far beyond: a hard disconnect, before any buffer exists.
    let mut r = Raw::go(server_config(), &option(opt::EXTENDED_HEADERS, &[]));
    r.send(&request(cmd::WRITE, 0, 0, 1 << 40, true));
    assert!(r.dead_with().contains("too large"));
    assert!(r.events.iter().all(|e| !e.contains("Request")));
}

#[test]
fn a_client_that_hangs_up_mid_request_kills_the_connection_and_buffers_come_back() {
    let mut r = Raw::go(server_config(), &[]);
    r.send(&request(cmd::READ, 0, 0, 512, false)[..10]);
    r.s.handle_eof();
    assert!(r.dead_with().contains("in the middle of a request"));

    let mut r = Raw::go(server_config(), &[]);
    let mut b = request(cmd::WRITE, 0, 0, 65536, false);
    b.extend_from_slice(&[1; 40000]);
    r.send(&b);
    r.s.handle_eof();
    r.flush();
    assert!(r.dead_with().contains("middle"));
    assert!(r.events.iter().any(|e| e.starts_with("BufferReturned")));

    // Between requests: a clean end.
    let mut r = Raw::go(server_config(), &[]);
    r.s.handle_eof();
    assert_eq!(r.s.phase(), Phase::Closed);
    assert!(r.s.error().is_none());
}

#[test]
fn a_large_write_is_received_straight_into_the_lent_buffer() {
    let mut r = Raw::go(server_config(), &[]);
    let mut b = request(cmd::WRITE, 0, 0, 1 << 20, false);
    r.send(&b);
    b.clear();
    // The header alone arrived: the buffer is lent, and the next receive
    // goes into it.
    let room = r.s.recv_buffer().len();
    assert_eq!(room, 1 << 20);
    let dest = r.s.recv_buffer();
    dest.fill(7);
    r.s.handle_received(1 << 20);
    r.flush();
    assert!(r.events.iter().any(|e| e == "WriteData 1"));
    assert_eq!(reply_error(&r.take()), 0);
}

// ---- split streams ----------------------------------------------------------------------

fn split_session(split: Split) -> (Vec<String>, Vec<String>, Vec<u8>) {
    let mut disk = Disk::new(SIZE);
    disk.bytes[4096..8192].fill(0x5a);
    disk.sparse = matches!(split, Split::Random(s) if s % 2 == 0);
    let mut c = client_config();
    c.full_info = true;
    c.tls = TlsMode::Allow;
    let mut p = ServerPair::new(c, server::Config { tls: TlsPolicy::Allow, ..server_config() }, disk, split);
    p.drive();
    assert_eq!(p.client.state(), PublicState::Ready, "{:?}", p.client.error());
    every_command(&mut p);
    p.client.disconnect().unwrap();
    p.drive();
    assert_eq!(p.server.phase(), Phase::Closed);
    let requests = p.requests.iter().map(|r| format!("{r:?}")).collect();
    // Sparse and dense reads differ in chunk events only.
    let transcript = p.transcript.into_iter().filter(|t| !t.starts_with("ReadChunk")).collect();
    (transcript, requests, p.disk.bytes)
}

#[test]
fn every_split_of_both_streams_gives_the_same_session() {
    let reference = split_session(Split::Whole);
    assert_eq!(split_session(Split::Bytewise), reference);
    for seed in 0..24 {
        assert_eq!(split_session(Split::Random(seed * 7919 + 1)), reference, "seed {seed}");
    }
}
