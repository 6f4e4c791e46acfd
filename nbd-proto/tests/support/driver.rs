//! A blocking driver for a [`Connection`] over any `Read + Write` stream:
//! the smallest I/O layer there can be, for tests and the demo.

#![allow(dead_code)]

use nbd_proto::{Connection, Cookie, Error, Event};
use std::io::{self, IoSlice, Read, Write};

pub struct Driver<S> {
    pub conn: Connection<Vec<u8>>,
    pub stream: S,
    /// Events not yet claimed by `wait`.
    pub events: Vec<Event<Vec<u8>>>,
    pub sends: usize,
    pub recvs: usize,
}

impl<S: Read + Write> Driver<S> {
    pub fn new(conn: Connection<Vec<u8>>, stream: S) -> Self {
        Driver { conn, stream, events: Vec::new(), sends: 0, recvs: 0 }
    }

    /// Runs the handshake to its end (ready, negotiating, dead or closed).
    pub fn handshake(&mut self) -> io::Result<()> {
        self.conn.handle_connected().expect("fresh connection");
        self.run_until(|c| !c.state().name().eq("connecting"))
    }

    /// Sends everything pending, in vectored writes.
    pub fn flush(&mut self) -> io::Result<()> {
        loop {
            let mut slices: [&[u8]; 64] = [&[]; 64];
            let n = self.conn.poll_transmit(&mut slices);
            if n == 0 {
                return Ok(());
            }
            let iov: Vec<IoSlice<'_>> = slices[..n].iter().map(|s| IoSlice::new(s)).collect();
            let sent = self.stream.write_vectored(&iov)?;
            self.sends += 1;
            self.conn.handle_sent(sent);
        }
    }

    /// One blocking receive.
    pub fn receive_once(&mut self) -> io::Result<()> {
        let buf = self.conn.recv_buffer();
        match self.stream.read(buf) {
            Ok(0) => self.conn.handle_eof(),
            Ok(n) => self.conn.handle_received(n),
            Err(e) => self.conn.handle_transport_error(e.raw_os_error().unwrap_or(5), "recv"),
        }
        self.recvs += 1;
        Ok(())
    }

    fn collect(&mut self) {
        while let Some(e) = self.conn.poll_event() {
            self.events.push(e);
        }
    }

    /// Drives the connection until `done` holds or nothing more can happen.
    pub fn run_until(&mut self, done: impl Fn(&Connection<Vec<u8>>) -> bool) -> io::Result<()> {
        loop {
            self.flush()?;
            self.collect();
            if done(&self.conn) || !self.conn.direction().wants_read() {
                return Ok(());
            }
            self.receive_once()?;
        }
    }

    /// Drives until the command `cookie` completes; returns its buffer.
    pub fn wait(&mut self, cookie: Cookie) -> Result<Option<Vec<u8>>, Error> {
        loop {
            let found = self.events.iter().position(|e| matches!(e, Event::Complete { cookie: c, .. } if *c == cookie));
            if let Some(i) = found {
                let Event::Complete { result, buf, .. } = self.events.remove(i) else { unreachable!() };
                return result.map(|()| buf);
            }
            self.flush().expect("send");
            self.collect();
            if self.events.iter().any(|e| matches!(e, Event::Complete { cookie: c, .. } if *c == cookie)) {
                continue;
            }
            if !self.conn.direction().wants_read() {
                panic!("command {cookie} can never complete: state {}", self.conn.state().name());
            }
            self.receive_once().expect("receive");
        }
    }

    /// Drives until the pending `opt_*` command completes.
    pub fn wait_option(&mut self) -> Result<(), Error> {
        loop {
            let found = self.events.iter().position(|e| matches!(e, Event::OptionComplete { .. }));
            if let Some(i) = found {
                let Event::OptionComplete { result } = self.events.remove(i) else { unreachable!() };
                return result;
            }
            self.flush().expect("send");
            self.collect();
            if self.events.iter().any(|e| matches!(e, Event::OptionComplete { .. })) {
                continue;
            }
            if !self.conn.direction().wants_read() {
                panic!("option can never complete: state {}", self.conn.state().name());
            }
            self.receive_once().expect("receive");
        }
    }
}
