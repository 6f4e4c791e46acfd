//! What libnbd 1.16-1.22 added, against the scripted server: single
//! options on request in opt mode (STARTTLS, STRUCTURED_REPLY,
//! EXTENDED_HEADERS, SET_META_CONTEXT, and meta context queries of the
//! caller's own), turning the automatic SET_META_CONTEXT off, block status
//! filtered by a payload, and the traffic counters.

mod support;

use nbd_proto::wire::{opt, rep, EXTENDED_REQUEST_MAGIC};
use nbd_proto::*;
use support::pair::Pair;
use support::server::Behaviour;

const SIZE: usize = 1 << 20;

fn negotiating(f: impl FnOnce(&mut Config), b: Behaviour) -> Pair {
    let mut c = Config::default();
    c.opt_mode = true;
    f(&mut c);
    let p = Pair::connect(c, b, SIZE);
    assert_eq!(p.state(), PublicState::Negotiating, "{:?}", p.client.error());
    p
}

/// Runs the caller's option to its completion.
fn option(p: &mut Pair, issue: impl FnOnce(&mut Connection<Vec<u8>>) -> Result<(), Error>) -> Result<(), Error> {
    issue(&mut p.client).unwrap();
    p.drive();
    p.option_result().expect("the option completed")
}

fn listed(p: &mut Pair) -> Vec<String> {
    p.events
        .drain(..)
        .filter_map(|e| match e {
            Event::MetaContextListed { name } => Some(name),
            _ => None,
        })
        .collect()
}

fn refused(r: Result<(), Error>, reply: u32) -> bool {
    matches!(r, Err(Error::Server(ServerError::OptionRefused { reply: got, .. })) if got == reply)
}

#[test]
fn structured_replies_and_extended_headers_one_option_at_a_time() {
    // nbdkit knows no extended headers: refused, and nothing changes.
    let mut p = negotiating(|c| c.request_structured_replies = false, Behaviour::nbdkit());
    assert!(p.server.options.is_empty(), "nothing asked for automatically");
    assert!(refused(option(&mut p, Connection::opt_extended_headers), rep::ERR_UNSUP));
    assert_eq!(p.state(), PublicState::Negotiating);
    assert!(!p.client.extended_headers_negotiated() && !p.client.structured_replies_negotiated());
    assert_eq!(option(&mut p, Connection::opt_structured_reply), Ok(()));
    assert!(p.client.structured_replies_negotiated());
    assert_eq!(p.server.options, [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY], "one option per call");
    assert_eq!(option(&mut p, Connection::opt_go), Ok(()));
    assert_eq!(p.state(), PublicState::Ready);

    // qemu-nbd agrees to extended headers, which imply structured replies.
    let mut p = negotiating(|c| c.request_extended_headers = false, Behaviour::qemu());
    assert_eq!(p.server.options, [opt::STRUCTURED_REPLY]);
    assert!(!p.client.extended_headers_negotiated());
    assert_eq!(option(&mut p, Connection::opt_extended_headers), Ok(()));
    assert!(p.client.extended_headers_negotiated() && p.client.structured_replies_negotiated());
    assert_eq!(option(&mut p, Connection::opt_go), Ok(()));
    // Requests use the extended header from now on.
    p.client.flush(CmdFlags::empty()).unwrap();
    let mut slices: [&[u8]; 8] = [&[]; 8];
    let n = p.client.poll_transmit(&mut slices);
    assert_eq!(slices[..n].concat()[..4], EXTENDED_REQUEST_MAGIC.to_be_bytes());

    // Only while negotiating.
    assert_eq!(p.client.opt_structured_reply().unwrap_err().errno(), errno::EINVAL);
}

#[test]
fn starttls_on_request() {
    // Refused: still negotiating in plaintext.
    let mut p = negotiating(|_| {}, Behaviour::nbdkit());
    assert!(refused(option(&mut p, Connection::opt_starttls), rep::ERR_POLICY));
    assert_eq!(p.state(), PublicState::Negotiating);
    assert!(!p.client.tls_negotiated());

    // Accepted: the TLS layer takes over, and the option completes once
    // it is up, leaving the rest of negotiation to the caller.
    let mut p = negotiating(|_| {}, Behaviour { starttls: true, ..Behaviour::nbdkit() });
    assert!(p.client.structured_replies_negotiated());
    p.client.opt_starttls().unwrap();
    p.drive();
    assert_eq!(p.transcript.last().map(String::as_str), Some("StartTls"));
    assert_eq!(p.option_result(), None, "not complete before TLS is up");
    p.client.handle_tls_established().unwrap();
    p.collect();
    assert_eq!(p.option_result(), Some(Ok(())));
    assert_eq!(p.state(), PublicState::Negotiating);
    assert!(p.client.tls_negotiated());
    assert!(!p.client.structured_replies_negotiated(), "what plaintext agreed is forgotten");
    p.drive();
    assert_eq!(p.server.options.last(), Some(&opt::STARTTLS), "no option sent on the caller's behalf");
    assert_eq!(option(&mut p, Connection::opt_structured_reply), Ok(()));
    assert_eq!(option(&mut p, Connection::opt_go), Ok(()));

    // A server that accepts STARTTLS twice is broken.
    let mut c = Config::default();
    c.opt_mode = true;
    c.tls = TlsMode::Allow;
    let mut p = Pair::connect(c, Behaviour { starttls: true, ..Behaviour::nbdkit() }, SIZE);
    p.client.handle_tls_established().unwrap();
    p.drive();
    assert_eq!(p.state(), PublicState::Negotiating);
    assert!(p.client.tls_negotiated());
    p.client.opt_starttls().unwrap();
    p.drive();
    assert_eq!(p.state(), PublicState::Dead);
    assert_eq!(p.client.error(), Some(&Error::Protocol(ProtocolError::TlsTwice)));
}

#[test]
fn meta_contexts_selected_by_hand() {
    let depth = "qemu:allocation-depth";
    let mut p = negotiating(|c| c.add_meta_context("base:allocation").unwrap(), Behaviour::qemu());

    // The caller's own queries, for listing and for selecting.
    assert_eq!(option(&mut p, |c| c.opt_list_meta_context_queries(Some(vec![depth.into()]))), Ok(()));
    assert_eq!(listed(&mut p), [depth]);
    assert_eq!(option(&mut p, |c| c.opt_set_meta_context(Some(vec![depth.into()]))), Ok(()));
    assert_eq!(listed(&mut p), [depth], "each selected context is reported");
    assert_eq!(p.client.meta_contexts().map(|m| m.len()), Some(1));
    // The configured list, when no queries are given.
    assert_eq!(option(&mut p, |c| c.opt_set_meta_context(None)), Ok(()));
    assert_eq!(listed(&mut p), ["base:allocation"]);
    let names: Vec<&str> = p.client.meta_contexts().unwrap().iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["base:allocation"], "the earlier selection is gone");
    assert_eq!(p.client.config().meta_contexts(), ["base:allocation"], "queries leave the settings alone");

    // With the automatic request off, GO keeps the selection.
    assert_eq!(option(&mut p, |c| c.opt_set_meta_context(Some(vec![depth.into()]))), Ok(()));
    p.client.config_mut().unwrap().request_meta_context = false;
    let sets = p.server.options.iter().filter(|&&o| o == opt::SET_META_CONTEXT).count();
    assert_eq!(option(&mut p, Connection::opt_go), Ok(()));
    assert_eq!(p.server.options.iter().filter(|&&o| o == opt::SET_META_CONTEXT).count(), sets);
    assert_eq!(p.client.meta_contexts().unwrap()[0].name, depth);

    // A query too long for the protocol is refused before anything is sent.
    let mut p = negotiating(|_| {}, Behaviour::qemu());
    let e = p.client.opt_set_meta_context(Some(vec!["x".repeat(5000)])).unwrap_err();
    assert_eq!(e.errno(), errno::ENAMETOOLONG);
    assert_eq!(p.state(), PublicState::Negotiating);
}

#[test]
fn block_status_filtered_by_a_payload() {
    let mut c = Config::default();
    c.add_meta_context("base:allocation").unwrap();
    c.add_meta_context("qemu:allocation-depth").unwrap();
    let mut p = Pair::connect(c, Behaviour::qemu(), SIZE);
    assert_eq!(p.state(), PublicState::Ready);
    assert!(p.client.export().flags.contains(TransmissionFlags::BLOCK_STAT_PAYLOAD));
    let depth = p.client.meta_contexts().unwrap().iter().find(|m| m.name == "qemu:allocation-depth").unwrap().id;

    let cookie = p.client.block_status_filter(0, 65536, &[depth], CmdFlags::PAYLOAD_LEN).unwrap();
    p.drive();
    let ids: Vec<u32> = p
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Extents { context_id, .. } => Some(*context_id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [depth], "only the filtered context");
    p.completed(cookie).unwrap();
    let req = p.server.requests.last().unwrap();
    assert_eq!((req.flags, req.length), (CmdFlags::PAYLOAD_LEN.bits(), 8 + 4), "the payload's length on the wire");

    // Only negotiated contexts can be named.
    let e = p.client.block_status_filter(0, 512, &[99], CmdFlags::PAYLOAD_LEN).unwrap_err();
    assert_eq!((e.errno(), e), (errno::EINVAL, Error::Local(LocalError::ContextNotNegotiated("99".into()))));
    // The flag announces the payload; on a plain block status it is an unknown flag.
    let e = p.client.block_status(0, 512, CmdFlags::PAYLOAD_LEN).unwrap_err();
    assert_eq!(e.errno(), errno::EINVAL);

    // Without extended headers there is no payload, and no flag to say so.
    let mut c = Config::default();
    c.request_extended_headers = false;
    c.add_meta_context("base:allocation").unwrap();
    let mut p = Pair::connect(c, Behaviour::qemu(), SIZE);
    assert!(!p.client.export().flags.contains(TransmissionFlags::BLOCK_STAT_PAYLOAD), "hidden, as libnbd does");
    let e = p.client.block_status_filter(0, 512, &[0], CmdFlags::PAYLOAD_LEN).unwrap_err();
    assert_eq!(e, Error::Local(LocalError::Unsupported("extended headers")));
}

#[test]
fn traffic_counters() {
    let mut c = Config::default();
    c.opt_mode = true;
    c.request_structured_replies = false;
    let mut p = Pair::new(c, Behaviour::nbdkit(), SIZE);
    assert_eq!(p.client.stats(), Stats::default());
    p.drive();
    let s = p.client.stats();
    // The greeting in (18 bytes with NO_ZEROES' server flags), our flags out.
    assert_eq!(s, Stats { bytes_sent: 4, bytes_received: 18, chunks_sent: 0, chunks_received: 1 });
    assert_eq!(option(&mut p, Connection::opt_structured_reply), Ok(()));
    let s = p.client.stats();
    assert_eq!((s.chunks_sent, s.chunks_received), (1, 1), "an option counts, its reply does not");
    assert_eq!((s.bytes_sent, s.bytes_received), (4 + 16, 18 + 20));
    assert_eq!(option(&mut p, Connection::opt_go), Ok(()));
    let before = p.client.stats();
    let r = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(r).unwrap();
    let after = p.client.stats();
    assert_eq!(after.chunks_sent - before.chunks_sent, 1);
    assert_eq!(after.bytes_sent - before.bytes_sent, 28, "one compact request");
    assert_eq!(after.chunks_received - before.chunks_received, 1, "one data chunk");
    assert_eq!(after.bytes_received - before.bytes_received, 20 + 8 + 512);
}

#[test]
fn meta_contexts_listed_without_structured_replies() {
    // The server is asked all the same (as libnbd 1.22 does), and a
    // refusal of a meta context option is ENOTSUP whatever the reply.
    let mut b = Behaviour::nbd_server();
    b.exports.push((String::new(), String::new()));
    let mut p = negotiating(|_| {}, b);
    assert!(!p.client.structured_replies_negotiated());
    let e = option(&mut p, |c| c.opt_list_meta_context_queries(None)).unwrap_err();
    assert_eq!(e.errno(), errno::ENOTSUP);
    assert_eq!(p.server.options.last(), Some(&opt::LIST_META_CONTEXT));
    let e = option(&mut p, |c| c.opt_set_meta_context(None)).unwrap_err();
    assert_eq!(e.errno(), errno::ENOTSUP);
    assert_eq!(p.state(), PublicState::Negotiating);
}
