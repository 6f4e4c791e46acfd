//! Records fuzz inputs: a harness's client plays against a server (the
//! scripted one in memory, or a real one over a socket) and what the
//! server sent becomes the input's stream, framed so that the harness
//! replays the session exactly (the script acts at the same points).

#![allow(dead_code)]

use super::fuzz_client::{self, drain, push_frames, ClientScript, Conn, Script, Summary, Tracker, FULL_FRAME};
use super::{fuzz_handshake, fuzz_reconnect, fuzz_server, fuzz_transmission, server::Server};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The fuzz targets of nbd-proto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Client,
    Handshake,
    Transmission,
    /// Plays the client against the server role; its seeds come from
    /// `fuzz_server::record`, not from [`Target::record`].
    Server,
    /// `transmission` with cuts and restarts; its seeds are
    /// `transmission` seeds with cuts put in.
    Reconnect,
}

pub const TARGETS: [Target; 5] =
    [Target::Client, Target::Handshake, Target::Transmission, Target::Server, Target::Reconnect];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Client => "client",
            Target::Handshake => "handshake",
            Target::Transmission => "transmission",
            Target::Server => "server",
            Target::Reconnect => "reconnect",
        }
    }

    pub fn run(self, data: &[u8]) -> Summary {
        match self {
            Target::Client => fuzz_client::run_client(data),
            Target::Handshake => fuzz_handshake::run_handshake(data),
            Target::Transmission => fuzz_transmission::run_transmission(data),
            Target::Server => fuzz_server::run_server(data),
            Target::Reconnect => fuzz_reconnect::run_reconnect(data),
        }
    }

    /// Plays the client `header` describes against `wire`; returns the
    /// whole input and the session's summary.
    pub fn record(self, header: &[u8], wire: &mut impl Wire) -> (Vec<u8>, Summary) {
        let (stream, summary) = match self {
            Target::Client => record(fuzz_client::start(header).unwrap(), wire),
            Target::Handshake => record(fuzz_handshake::start(header).unwrap(), wire),
            Target::Transmission => record(fuzz_transmission::start(header).unwrap(), wire),
            Target::Server => panic!("server seeds are recorded by fuzz_server::record"),
            Target::Reconnect => panic!("reconnect seeds are transmission seeds with cuts"),
        };
        ([header, &stream].concat(), summary)
    }
}

/// The server side of a recording.
pub trait Wire {
    /// Delivers what the client sent; returns the server's next bytes, or
    /// `None` when the session is over.
    fn exchange(&mut self, sent: &[u8], wants_read: bool) -> Option<Vec<u8>>;
}

/// The scripted server answers at once; silence on both sides ends it.
impl Wire for Server {
    fn exchange(&mut self, sent: &[u8], _wants_read: bool) -> Option<Vec<u8>> {
        self.receive(sent);
        let out = std::mem::take(&mut self.out);
        (!out.is_empty() || !sent.is_empty()).then_some(out)
    }
}

/// A real server: each receive is one frame, never a full one.
impl Wire for UnixStream {
    fn exchange(&mut self, sent: &[u8], wants_read: bool) -> Option<Vec<u8>> {
        self.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        self.write_all(sent).expect("send to the server");
        if !wants_read {
            return None;
        }
        let mut buf = vec![0; FULL_FRAME - 1];
        let n = self.read(&mut buf).expect("receive from the server (timed out?)");
        buf.truncate(n);
        (n > 0).then_some(buf)
    }
}

/// The script steps once per round, as the harness makes it step once
/// per frame.
fn record<S: Script>(
    (mut c, mut script, mut t, _): (Conn, S, Tracker, &[u8]),
    wire: &mut impl Wire,
) -> (Vec<u8>, Summary) {
    let mut stream = Vec::new();
    loop {
        script.step(&mut c, &mut t);
        let sent = ClientScript::transmit(&mut c);
        drain(&mut c, &mut script, &mut t);
        let Some(out) = wire.exchange(&sent, c.direction().wants_read()) else { break };
        push_frames(&mut stream, &out);
        c.receive(&out);
        drain(&mut c, &mut script, &mut t);
    }
    c.handle_eof();
    drain(&mut c, &mut script, &mut t);
    (stream, t.finish(&mut c))
}
