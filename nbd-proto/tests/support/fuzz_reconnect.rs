//! The `reconnect` harness: a `transmission` input whose stream may be cut.
//!
//! The client keeps its commands across a lost transport
//! (`Config::keep_commands_on_loss`). Input layout: as `transmission`
//! (preset, operations, frames), where an empty frame cuts the transport:
//! alternately the server hangs up and a receive fails. The client is
//! then restarted at once. Without the preset's `IN_STREAM` bit the
//! preset's scripted server answers the new handshake, which must bring
//! every kept command back (the export is the same); with it, the frames
//! that follow carry the new handshake, which may offer another export.
//! Only the first [`MAX_CUTS`] empty frames cut.
//! Further frames are the new server's replies. At the end of the input
//! the server hangs up; a connection still lost gives up, and every
//! command must have completed exactly once.

#![allow(dead_code)]

use super::fuzz_client::{drain, feed, frames, ClientScript, Conn, Summary, Tracker};
use super::fuzz_transmission::{self as tx, TransmissionScript, IN_STREAM};
use super::server::Server;
use nbd_proto::{Error, PublicState};

/// Cuts after the first this many are ignored.
const MAX_CUTS: usize = 8;

/// Cuts the transport (the `cuts`-th time) and restarts the client; with
/// `server`, it answers the new handshake.
fn cut(c: &mut Conn, script: &mut TransmissionScript, t: &mut Tracker, cuts: usize, server: Option<Server>) {
    let lost_before = t.lost;
    let was_transmitting = matches!(c.state(), PublicState::Ready | PublicState::Processing) && !c.is_lost();
    if cuts % 2 == 0 {
        c.handle_eof();
    } else {
        c.handle_transport_error(104, "recv");
    }
    drain(c, script, t);
    if !c.awaits_restart() {
        // Not in transmission, or after a disconnect: no loss.
        assert_eq!(t.lost, lost_before, "a loss reported without the connection being lost");
        return;
    }
    if was_transmitting {
        assert_eq!(t.lost, lost_before + 1, "a loss in transmission is reported once");
    }
    let in_flight = c.in_flight();
    assert_eq!(in_flight, t.in_flight(), "every command in flight is kept");
    c.restart().expect("a lost connection restarts");
    assert!(c.restart().is_err(), "a connection restarting cannot restart again");
    c.handle_connected().expect("connected");
    if let Some(mut server) = server {
        let back = t.reconnected;
        // The handshake only: the requests sent again after it are
        // answered by the frames that follow.
        while c.is_lost() {
            server.receive(&ClientScript::transmit(c));
            let out = std::mem::take(&mut server.out);
            if out.is_empty() {
                break;
            }
            c.receive(&out);
            drain(c, script, t);
        }
        assert!(!c.is_lost(), "the same export again must bring the connection back");
        assert!(c.error().is_none(), "the same export again must bring the connection back: {:?}", c.error());
        assert_eq!(t.reconnected, back + 1, "the reconnect is reported");
        assert_eq!(c.in_flight(), in_flight, "the kept commands are in flight again");
    }
}

/// Runs one `reconnect` input; panics if an invariant breaks.
pub fn run_reconnect(data: &[u8]) -> Summary {
    let Some(&preset) = data.first() else { return Summary::empty() };
    let Some((mut c, mut script, mut t, stream)) = tx::start_with(data, |cfg| cfg.keep_commands_on_loss = true) else {
        return Summary::empty();
    };
    let mut i = 0;
    let mut cuts = 0;
    let mut act = true;
    for (frame, acts_after) in frames(stream) {
        if act {
            script_step(&mut c, &mut script, &mut t);
        }
        act = acts_after;
        if frame.is_empty() {
            // A few cuts explore as much as many, and each costs a server.
            if cuts == MAX_CUTS {
                continue;
            }
            let server = (preset & IN_STREAM == 0).then(|| {
                // It serves the preset's export by either name it may have.
                let mut s = tx::preset_server(preset);
                s.b.exports.push(("exp".into(), String::new()));
                s
            });
            cut(&mut c, &mut script, &mut t, cuts, server);
            cuts += 1;
            continue;
        }
        feed(&mut c, &mut script, &mut t, frame, &mut i);
    }
    script_step(&mut c, &mut script, &mut t);
    c.handle_eof();
    drain(&mut c, &mut script, &mut t);
    if c.is_lost() {
        c.give_up();
        drain(&mut c, &mut script, &mut t);
        let refused = c.read(0, vec![0; 512], nbd_proto::CmdFlags::empty());
        assert!(matches!(refused, Err(Error::Transport(_))), "after giving up, commands are refused: {refused:?}");
    }
    assert!(t.in_flight() == 0 && c.in_flight() == 0, "commands never completed");
    assert!(ClientScript::transmit(&mut c).is_empty(), "bytes to send after the end");
    let mut s = Summary::empty();
    s.accepted = t.accepted;
    s.succeeded = t.succeeded;
    s.connected = true;
    s.end = if c.is_lost() { "lost" } else { c.state().name() };
    s
}

fn script_step(c: &mut Conn, script: &mut TransmissionScript, t: &mut Tracker) {
    use super::fuzz_client::Script;
    script.step(c, t);
    ClientScript::transmit(c);
    drain(c, script, t);
}
