//! Keeping commands across a lost transport and resuming them on a new
//! one (`Config::keep_commands_on_loss`, `Connection::restart`), against
//! the scripted servers: commands in flight and submitted while lost all
//! complete after the restart, in order; a server that comes back with
//! another export fails them, naming the change; giving up fails them
//! with ENOTCONN; a protocol violation is not a loss.

mod support;

use nbd_proto::errno::{ENOTCONN, EPROTO, ESTALE};
use nbd_proto::wire::cmd;
use nbd_proto::*;
use support::pair::{Pair, Split};
use support::server::{Behaviour, Server};

const SIZE: usize = 1 << 20;

fn keeping(behaviour: &Behaviour) -> Config {
    let mut c = Config::default();
    c.keep_commands_on_loss = true;
    if let Some((name, _)) = behaviour.exports.first() {
        c.set_export_name(name).unwrap();
    }
    for name in &behaviour.contexts {
        c.add_meta_context(name).unwrap();
    }
    c
}

/// Connects, then cuts the transport with `commands` submitted and sent
/// but unanswered: the server got the requests and said nothing.
fn lost_with(
    behaviour: Behaviour,
    commands: impl FnOnce(&mut Connection<Vec<u8>>) -> Vec<Cookie>,
) -> (Pair, Vec<Cookie>) {
    let mut p = Pair::connect(keeping(&behaviour), behaviour, SIZE);
    assert!(p.events.iter().any(|e| matches!(e, Event::Connected)));
    p.events.clear();
    p.server.hold = true;
    let cookies = commands(&mut p.client);
    p.drive();
    assert_eq!(p.server.requests.len(), cookies.len());
    p.eof();
    (p, cookies)
}

/// Brings the pair up again on `server`.
fn restart_on(p: &mut Pair, server: Server) {
    p.server = server;
    p.client.restart().unwrap();
    p.client.handle_connected().unwrap();
    p.drive();
}

#[test]
fn commands_in_flight_and_submitted_while_lost_complete_after_the_restart() {
    for behaviour in [Behaviour::nbdkit(), Behaviour::qemu(), Behaviour::nbd_server()] {
        let (mut p, mut cookies) = lost_with(behaviour.clone(), |c| {
            vec![
                c.write(0, vec![1; 4096], CmdFlags::empty()).unwrap(),
                c.write(4096, vec![2; 4096], CmdFlags::empty()).unwrap(),
                c.flush(CmdFlags::empty()).unwrap(),
                c.read(0, vec![0; 8192], CmdFlags::empty()).unwrap(),
            ]
        });
        assert!(matches!(p.events.as_slice(), [Event::TransportLost { .. }]), "{:?}", p.events);
        p.events.clear();
        assert!(p.client.is_lost());
        assert_eq!(p.state(), PublicState::Processing);
        assert_eq!(p.client.direction(), Direction::None);
        assert_eq!(p.client.in_flight(), 4);
        // The export is still known, and new commands are held.
        assert_eq!(p.client.export().size, Some(SIZE as u64));
        cookies.push(p.client.write(8192, vec![3; 512], CmdFlags::empty()).unwrap());
        assert!(p.client.poll_transmit(&mut [&[][..]; 4]) == 0, "nothing leaves while lost");

        // The disk survived the restart, as a file export's does.
        let mut server = Server::new(behaviour.clone(), SIZE);
        server.disk.copy_from_slice(&p.server.disk);
        restart_on(&mut p, server);
        assert!(!p.client.is_lost());
        assert!(p.events.iter().any(|e| matches!(e, Event::Reconnected)), "{:?}", p.events);
        assert!(!p.events.iter().any(|e| matches!(e, Event::Connected)), "a restart is not a first connect");
        // Sent again in submission order, with the same cookies.
        let sent: Vec<u64> = p.server.requests.iter().map(|r| r.cookie).collect();
        assert_eq!(sent, cookies);
        assert_eq!(p.server.requests[2].kind, cmd::FLUSH);
        for &c in &cookies[..3] {
            p.completed(c).unwrap();
        }
        let data = p.completed(cookies[3]).unwrap().unwrap();
        assert!(data[..4096].iter().all(|&b| b == 1) && data[4096..].iter().all(|&b| b == 2));
        p.completed(cookies[4]).unwrap();
        assert!(p.server.disk[8192..8704].iter().all(|&b| b == 3));
        assert_eq!(p.state(), PublicState::Ready);
    }
}

#[test]
fn a_reply_cut_in_the_middle_is_received_again_whole() {
    for split in [Split::Whole, Split::Bytewise] {
        let behaviour = Behaviour::qemu();
        let mut p = Pair::with_split(keeping(&behaviour), behaviour.clone(), SIZE, split);
        p.drive();
        p.server.disk[..65536].fill(7);
        p.events.clear();
        let cookie = p.client.read_structured(0, vec![0; 65536], CmdFlags::empty()).unwrap();
        // The request reaches the server; half its reply comes back.
        loop {
            let mut slices: [&[u8]; 8] = [&[]; 8];
            let n = p.client.poll_transmit(&mut slices);
            if n == 0 {
                break;
            }
            let bytes: Vec<u8> = slices[..n].concat();
            p.client.handle_sent(bytes.len());
            p.server.receive(&bytes);
        }
        let out = std::mem::take(&mut p.server.out);
        p.deliver(&out[..out.len() / 2]);
        let early = p.events.iter().filter(|e| matches!(e, Event::ReadChunk { .. })).count();
        p.client.handle_transport_error(104, "recv");
        p.collect();
        assert!(p.client.is_lost());
        let mut server = Server::new(behaviour.clone(), SIZE);
        server.disk[..65536].fill(7);
        restart_on(&mut p, server);
        let data = p.completed(cookie).unwrap().unwrap();
        assert!(data.iter().all(|&b| b == 7));
        // The chunks before the cut are reported again, as documented.
        let chunks = p.events.iter().filter(|e| matches!(e, Event::ReadChunk { .. })).count();
        assert!(chunks > early, "{split:?}: {early} chunks before the cut, {chunks} in all");
    }
}

#[test]
fn another_export_after_the_restart_fails_every_command_naming_the_change() {
    /// Changes the server's behaviour and returns its size.
    type Change = Box<dyn Fn(&mut Behaviour) -> usize>;
    let cases: [(&str, Change); 3] = [
        ("size 2097152, not 1048576", Box::new(|_| 2 * SIZE)),
        (
            "transmission flags",
            Box::new(|b| {
                b.flags |= TransmissionFlags::READ_ONLY;
                SIZE
            }),
        ),
        (
            "block sizes 512/4096/65536, not ",
            Box::new(|b| {
                b.block_size = Some((512, 4096, 65536));
                SIZE
            }),
        ),
    ];
    for (what, change) in cases {
        let (mut p, cookies) = lost_with(Behaviour::nbdkit(), |c| {
            vec![
                c.write(0, vec![1; 512], CmdFlags::empty()).unwrap(),
                c.read(0, vec![0; 512], CmdFlags::empty()).unwrap(),
            ]
        });
        let mut b = Behaviour::nbdkit();
        let size = change(&mut b);
        restart_on(&mut p, Server::new(b, size));
        assert_eq!(p.state(), PublicState::Dead, "{what}");
        for c in cookies {
            let e = p.completed(c).unwrap_err();
            assert_eq!(e.errno(), ESTALE);
            assert!(e.to_string().contains(what), "{e} does not name {what}");
        }
        // Nothing was sent to the other export.
        assert!(p.server.requests.is_empty());
        assert!(!p.client.is_lost());
    }
}

#[test]
fn giving_up_fails_what_was_kept_and_refuses_new_commands_until_restarted() {
    let (mut p, cookies) =
        lost_with(Behaviour::nbdkit(), |c| vec![c.read(0, vec![0; 512], CmdFlags::empty()).unwrap()]);
    p.client.give_up();
    p.collect();
    assert_eq!(p.completed(cookies[0]).unwrap_err().errno(), ENOTCONN);
    assert_eq!(p.client.in_flight(), 0);
    let refused = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap_err();
    assert_eq!(refused.errno(), ENOTCONN);
    // Retries go on after giving up: a restart that works brings it back.
    restart_on(&mut p, Server::new(Behaviour::nbdkit(), SIZE));
    assert!(p.events.iter().any(|e| matches!(e, Event::Reconnected)));
    let c = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(c).unwrap();
}

#[test]
fn a_restart_whose_transport_fails_is_lost_again_with_its_commands() {
    let (mut p, cookies) =
        lost_with(Behaviour::nbdkit(), |c| vec![c.write(0, vec![9; 512], CmdFlags::empty()).unwrap()]);
    p.events.clear();
    // The dial fails: back to lost, no event (the caller knows).
    p.client.restart().unwrap();
    assert!(p.client.restart().is_err(), "restarting twice at once");
    p.client.handle_connect_failed();
    assert!(p.client.is_lost());
    // The server hangs up during the handshake.
    p.client.restart().unwrap();
    p.client.handle_connected().unwrap();
    p.client.handle_eof();
    p.collect();
    assert!(matches!(p.events.as_slice(), [Event::TransportLost { .. }]), "{:?}", p.events);
    assert_eq!(p.client.in_flight(), 1);
    restart_on(&mut p, Server::new(Behaviour::nbdkit(), SIZE));
    p.completed(cookies[0]).unwrap();
    assert!(p.server.disk[..512].iter().all(|&b| b == 9));
}

#[test]
fn a_protocol_violation_is_not_a_loss() {
    let mut p = Pair::connect(keeping(&Behaviour::nbdkit()), Behaviour::nbdkit(), SIZE);
    p.server.hold = true;
    let c = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.drive();
    p.inject(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(p.state(), PublicState::Dead);
    assert!(!p.client.is_lost());
    assert_eq!(p.completed(c).unwrap_err().errno(), EPROTO);
    assert!(p.client.restart().is_err());
}

#[test]
fn disconnecting_while_lost_closes_and_fails_what_was_kept() {
    let (mut p, cookies) = lost_with(Behaviour::nbdkit(), |c| vec![c.flush(CmdFlags::empty()).unwrap()]);
    p.client.disconnect().unwrap();
    p.collect();
    assert_eq!(p.completed(cookies[0]).unwrap_err().errno(), ENOTCONN);
    assert_eq!(p.state(), PublicState::Closed);
    assert!(!p.client.is_lost());
    assert!(p.client.restart().is_err());
}

#[test]
fn a_disconnect_is_not_a_loss() {
    let mut p = Pair::connect(keeping(&Behaviour::nbdkit()), Behaviour::nbdkit(), SIZE);
    p.client.disconnect().unwrap();
    p.drive();
    p.eof();
    assert_eq!(p.state(), PublicState::Closed);
    assert!(!p.client.is_lost());
}

#[test]
fn without_the_setting_a_loss_fails_commands_as_before() {
    let mut p = Pair::connect(Config::default(), Behaviour::nbdkit(), SIZE);
    p.server.hold = true;
    let c = p.client.read(0, vec![0; 512], CmdFlags::empty()).unwrap();
    p.drive();
    p.eof();
    assert_eq!(p.completed(c).unwrap_err().errno(), ENOTCONN);
    assert!(!p.client.is_lost());
    assert!(!p.events.iter().any(|e| matches!(e, Event::TransportLost { .. })));
}

#[test]
fn a_follower_config_reaches_the_same_export_the_same_way() {
    let b = Behaviour::qemu();
    let lead = Pair::connect(keeping(&b), b.clone(), SIZE);
    let mut cfg = lead.client.follower_config();
    assert!(!cfg.opt_mode);
    assert_eq!(cfg.meta_contexts(), lead.client.config().meta_contexts());
    cfg.keep_commands_on_loss = false;
    let other = Pair::connect(cfg, b, SIZE);
    assert_eq!(lead.client.export_difference(&other.client), None);
    let bigger = Pair::connect(Config::default(), Behaviour::qemu(), 2 * SIZE);
    assert!(lead.client.export_difference(&bigger.client).unwrap().starts_with("size "));
}
