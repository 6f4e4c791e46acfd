//! A client connection wired to a scripted server in memory.

#![allow(dead_code)]

use super::server::{Behaviour, Server};
use nbd_proto::{Config, Connection, Cookie, Error, Event, PublicState};

/// How bytes are cut on their way between the peers.
#[derive(Debug, Clone, Copy)]
pub enum Split {
    /// Everything available at once.
    Whole,
    /// One byte per call.
    Bytewise,
    /// Random cut points from this seed.
    Random(u64),
}

/// Cuts byte runs as a `Split` says.
#[derive(Debug, Clone, Copy)]
pub struct Cutter {
    pub split: Split,
    rng: u64,
}

impl Cutter {
    pub fn new(split: Split) -> Self {
        let rng = match split {
            Split::Random(seed) => seed | 1,
            _ => 1,
        };
        Cutter { split, rng }
    }

    /// How many of the next `max` bytes to move.
    pub fn next(&mut self, max: usize) -> usize {
        match self.split {
            Split::Whole => max,
            Split::Bytewise => 1.min(max),
            Split::Random(_) => {
                // xorshift64
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                1 + (self.rng as usize) % max.clamp(1, 97)
            }
        }
    }
}

/// Takes the completion of `cookie` out of `events`, if it happened.
pub fn take_completion(events: &mut Vec<Event<Vec<u8>>>, cookie: Cookie) -> Option<Result<Option<Vec<u8>>, Error>> {
    let i = events.iter().position(|e| matches!(e, Event::Complete { cookie: c, .. } if *c == cookie))?;
    let Event::Complete { result, buf, .. } = events.remove(i) else { unreachable!() };
    Some(result.map(|()| buf))
}

/// Takes the first option completion out of `events`.
pub fn take_option_result(events: &mut Vec<Event<Vec<u8>>>) -> Option<Result<(), Error>> {
    let i = events.iter().position(|e| matches!(e, Event::OptionComplete { .. }))?;
    let Event::OptionComplete { result } = events.remove(i) else { unreachable!() };
    Some(result)
}

pub struct Pair {
    pub client: Connection<Vec<u8>>,
    pub server: Server,
    pub split: Split,
    cutter: Cutter,
    /// Events the client produced and no test has claimed yet.
    pub events: Vec<Event<Vec<u8>>>,
    /// Every event, rendered, in order: the transcript compared across splits.
    pub transcript: Vec<String>,
}

impl Pair {
    pub fn new(config: Config, behaviour: Behaviour, size: usize) -> Self {
        Pair::with_split(config, behaviour, size, Split::Whole)
    }

    pub fn with_split(config: Config, behaviour: Behaviour, size: usize, split: Split) -> Self {
        let mut client = Connection::new(config);
        client.handle_connected().unwrap();
        let cutter = Cutter::new(split);
        Pair { client, server: Server::new(behaviour, size), split, cutter, events: Vec::new(), transcript: Vec::new() }
    }

    fn next_cut(&mut self, max: usize) -> usize {
        self.cutter.next(max)
    }

    /// Moves what the client reported into `events`.
    pub fn collect(&mut self) {
        while let Some(e) = self.client.poll_event() {
            self.transcript.push(format!("{e:?}"));
            self.events.push(e);
        }
    }

    /// Moves bytes both ways until neither side has anything to say.
    pub fn drive(&mut self) {
        loop {
            let mut moved = false;
            // Client to server, in possibly partial sends.
            loop {
                let mut slices: [&[u8]; 8] = [&[]; 8];
                let n = self.client.poll_transmit(&mut slices);
                let bytes: Vec<u8> = slices[..n].concat();
                if bytes.is_empty() {
                    break;
                }
                let cut = self.next_cut(bytes.len());
                self.client.handle_sent(cut);
                self.server.receive(&bytes[..cut]);
                moved = true;
            }
            // Server to client.
            if !self.server.out.is_empty() {
                let out = std::mem::take(&mut self.server.out);
                self.deliver(&out);
                moved = true;
            }
            self.collect();
            if self.server.closed && self.server.out.is_empty() && self.client.direction().wants_read() {
                self.client.handle_eof();
                self.collect();
            }
            if !moved {
                return;
            }
        }
    }

    /// Feeds raw bytes to the client as if the server sent them.
    pub fn deliver(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if matches!(self.client.state(), PublicState::Dead | PublicState::Closed) {
                break;
            }
            let room = self.client.recv_buffer().len();
            let n = self.next_cut(bytes.len().min(room));
            let dest = self.client.recv_buffer();
            dest[..n].copy_from_slice(&bytes[..n]);
            self.client.handle_received(n);
            bytes = &bytes[n..];
        }
        self.collect();
    }

    /// The server closes the connection.
    pub fn eof(&mut self) {
        self.client.handle_eof();
        self.collect();
    }

    /// Injects bytes and collects what the client made of them.
    pub fn inject(&mut self, bytes: &[u8]) {
        self.deliver(bytes);
    }

    /// Runs the handshake to the end.
    pub fn connect(config: Config, behaviour: Behaviour, size: usize) -> Self {
        let mut p = Pair::new(config, behaviour, size);
        p.drive();
        p
    }

    /// Takes the completion of `cookie`, if it happened.
    pub fn completion(&mut self, cookie: Cookie) -> Option<Result<Option<Vec<u8>>, Error>> {
        take_completion(&mut self.events, cookie)
    }

    /// The completion of `cookie`, which must have happened.
    pub fn completed(&mut self, cookie: Cookie) -> Result<Option<Vec<u8>>, Error> {
        self.completion(cookie).unwrap_or_else(|| panic!("command {cookie} did not complete"))
    }

    pub fn option_result(&mut self) -> Option<Result<(), Error>> {
        take_option_result(&mut self.events)
    }

    pub fn state(&self) -> PublicState {
        self.client.state()
    }
}
