//! A blocking driver: a [`Connection`] over a [`Socket`], waiting in
//! poll(2) and moving bytes through [`pump`](crate::pump), the loop the
//! C library uses. For tests and examples, which want to write "submit,
//! wait for the reply" without an event loop of their own.

use crate::{pump, Recv, Socket, Transport, TransportError};
use nbd_proto::{Connection, Cookie, Direction, Error, Event, PublicState};
use rustix::event::{PollFd, PollFlags};
use std::io;
use std::os::fd::OwnedFd;

/// A connection driven to completion by blocking calls. Events the caller
/// did not wait for stay in `events`.
pub struct Driver {
    pub conn: Connection<Vec<u8>>,
    transport: Counted<Socket>,
    /// Events not yet claimed by `wait` or `wait_option`.
    pub events: Vec<Event<Vec<u8>>>,
}

impl Driver {
    /// A driver for `conn` over a connected socket (any stream socket).
    pub fn new(conn: Connection<Vec<u8>>, socket: impl Into<OwnedFd>) -> io::Result<Self> {
        let socket = Socket::from(socket.into());
        socket.set_nonblocking(true)?;
        Ok(Driver { conn, transport: Counted { inner: socket, sends: 0, recvs: 0 }, events: Vec::new() })
    }

    /// Send and receive system calls made so far, successful or not.
    pub fn syscalls(&self) -> (usize, usize) {
        (self.transport.sends, self.transport.recvs)
    }

    /// Runs the handshake to its end (ready, negotiating, dead or closed).
    pub fn handshake(&mut self) -> io::Result<()> {
        self.conn.handle_connected().expect("fresh connection");
        self.run_until(|c| c.state() != PublicState::Connecting)
    }

    /// Sends everything pending.
    pub fn flush(&mut self) -> io::Result<()> {
        loop {
            pump::send(&mut self.conn, &mut self.transport);
            if !self.conn.direction().wants_write() {
                return Ok(());
            }
            self.wait_for(PollFlags::OUT)?;
        }
    }

    /// Drives the connection until `done` holds or it waits for nothing.
    pub fn run_until(&mut self, done: impl Fn(&Connection<Vec<u8>>) -> bool) -> io::Result<()> {
        loop {
            pump::send(&mut self.conn, &mut self.transport);
            self.collect();
            if done(&self.conn) || self.conn.direction() == Direction::None {
                return Ok(());
            }
            self.step()?;
        }
    }

    /// Drives until the command `cookie` completes; returns its buffer.
    pub fn wait(&mut self, cookie: Cookie) -> Result<Option<Vec<u8>>, Error> {
        let is_it = |e: &Event<Vec<u8>>| matches!(e, Event::Complete { cookie: c, .. } if *c == cookie);
        let Event::Complete { result, buf, .. } = self.wait_event(is_it, "command") else { unreachable!() };
        result.map(|()| buf)
    }

    /// Drives until the pending `opt_*` command completes.
    pub fn wait_option(&mut self) -> Result<(), Error> {
        let Event::OptionComplete { result } = self.wait_event(|e| matches!(e, Event::OptionComplete { .. }), "option")
        else {
            unreachable!()
        };
        result
    }

    /// Drives until an event `is_it` arrives, and takes it.
    fn wait_event(&mut self, is_it: impl Fn(&Event<Vec<u8>>) -> bool, what: &str) -> Event<Vec<u8>> {
        loop {
            if let Some(at) = self.events.iter().position(&is_it) {
                return self.events.remove(at);
            }
            pump::send(&mut self.conn, &mut self.transport);
            self.collect();
            if self.events.iter().any(&is_it) {
                continue;
            }
            if self.conn.direction() == Direction::None {
                panic!("the {what} can never complete: state {}", self.conn.state().name());
            }
            self.step().expect("poll");
        }
    }

    /// Waits for the socket in the direction the connection wants, and
    /// services it.
    fn step(&mut self) -> io::Result<()> {
        let d = self.conn.direction();
        let mut want = PollFlags::empty();
        if d.wants_read() {
            want |= PollFlags::IN;
        }
        if d.wants_write() {
            want |= PollFlags::OUT;
        }
        let got = self.wait_for(want)?;
        if got.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            pump::receive(&mut self.conn, &mut self.transport);
        }
        if got.contains(PollFlags::OUT) {
            pump::send(&mut self.conn, &mut self.transport);
        }
        self.collect();
        Ok(())
    }

    /// Blocks until the socket is ready for `want`; returns what it is.
    fn wait_for(&self, want: PollFlags) -> io::Result<PollFlags> {
        loop {
            let mut fds = [PollFd::new(&self.transport.inner, want)];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => return Ok(fds[0].revents()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn collect(&mut self) {
        while let Some(e) = self.conn.poll_event() {
            self.events.push(e);
        }
    }
}

/// A transport that counts its system calls.
struct Counted<T> {
    inner: T,
    sends: usize,
    recvs: usize,
}

impl<T: Transport> Transport for Counted<T> {
    fn fd(&self) -> std::os::fd::RawFd {
        self.inner.fd()
    }
    fn send(&mut self, bufs: &[&[u8]]) -> Result<usize, TransportError> {
        self.sends += 1;
        self.inner.send(bufs)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<Recv, TransportError> {
        self.recvs += 1;
        self.inner.recv(buf)
    }
}
