//! A sans-IO implementation of the NBD (Network Block Device) protocol.
//!
//! The core knows the protocol and nothing else: it owns no socket, file
//! descriptor, thread or clock. Bytes and commands go in through `handle_*`
//! and command methods; bytes to send and events come out through `poll_*`;
//! [`Connection::direction`] says what to wait for in between. The caller
//! owns the transport (a socket, TLS, a pipe, a test's memory) and decides
//! when to block, so the same core runs under a blocking loop, `poll(2)`,
//! an event loop such as `mio`, or a fuzzer.
//!
//! # Modules
//!
//! - [`client`]: [`Connection`], the client state machine, and the types
//!   it reports ([`Event`], [`ExportInfo`], [`PublicState`], ...).
//! - [`wire`]: the wire format (magic numbers, option, command and reply
//!   codes, header encoders and decoders), shared by the client and the
//!   server role.
//! - [`error`]: [`Error`], split by cause, with one errno mapping;
//!   [`errno`] names the errno values.
//! - [`flags`]: the protocol's flag sets and the client's TLS and strict
//!   mode settings.
//! - [`server`]: the server role, the client's mirror
//!   ([`ServerConnection`]): client bytes in, requests out as events,
//!   replies in as calls, bytes out. Its module documentation has its
//!   calling order.
//!
//! # Driving a connection
//!
//! 1. **Create**: [`Connection::new`] with a [`Config`]. Settings (export
//!    name, meta contexts, TLS, opt mode, strictness) are chosen here.
//! 2. **Connect** the transport yourself. Optionally call
//!    [`Connection::start_connect`] while it connects (the state is then
//!    `connecting` and [`Connection::handle_connect_failed`] goes back to
//!    `created`); once it is up, call [`Connection::handle_connected`]: the
//!    handshake begins.
//! 3. **Loop**, until the state you want ([`Connection::state`]) is
//!    reached:
//!    - *Output*: while [`Connection::poll_transmit`] fills slices, send
//!      them (one vectored write) and report how many bytes left with
//!      [`Connection::handle_sent`]; a partial send is fine, the rest comes
//!      back from the next `poll_transmit`.
//!    - *Input*: when the transport is readable, receive into
//!      [`Connection::recv_buffer`] and report the count with
//!      [`Connection::handle_received`]; report end of stream with
//!      [`Connection::handle_eof`] and a failed receive or send with
//!      [`Connection::handle_transport_error`]. `recv_buffer` may be the
//!      caller's own READ buffer (large payloads land there directly), so
//!      ask for it again before every receive. The internal buffer is
//!      sized to the replies in flight and given back when the connection
//!      is idle ([`Connection::recv_capacity`]): a receive that filled it
//!      may have left bytes behind, one that did not drained the transport.
//!      ([`Connection::receive`] does both steps for bytes already in
//!      memory.)
//!    - *Events*: after any input, and after submitting commands, drain
//!      [`Connection::poll_event`]: [`Event::Connected`] when transmission
//!      begins, [`Event::Complete`] once per command, and the rest.
//!    - *Waiting*: [`Connection::direction`] says whether to wait for the
//!      transport to become readable, writable, either, or for nothing
//!      ([`Direction::None`]: finished, or waiting for the caller). It
//!      depends only on the state and on pending output, so ask again after
//!      every call that may change them.
//! 4. **Commands**: in transmission, [`Connection::read`],
//!    [`Connection::write`], [`Connection::flush`],
//!    [`Connection::block_status`], ... queue a request and return its
//!    [`Cookie`], or refuse it locally with an [`Error`] and send nothing.
//!    Any number may be in flight; they leave on the next `poll_transmit`
//!    (many in one vectored send) and each completes with exactly one
//!    [`Event::Complete`] carrying its result and its buffer. Replies may
//!    come in any order.
//! 5. **End**: [`Connection::disconnect`] queues `NBD_CMD_DISC`; once it is
//!    sent and the commands in flight have completed the state is
//!    [`PublicState::Closed`]. A protocol violation or transport failure
//!    makes it [`PublicState::Dead`] instead, failing every command in
//!    flight; [`Connection::error`] says why.
//!
//! In opt mode ([`Config::opt_mode`]) the handshake stops in
//! [`PublicState::Negotiating`] and waits for `opt_*` commands
//! ([`Connection::opt_go`], [`Connection::opt_list`], ...), each ending
//! with [`Event::OptionComplete`]. With TLS ([`Config::tls`]),
//! [`Event::StartTls`] asks the caller to run the TLS handshake below the
//! NBD stream and then call [`Connection::handle_tls_established`].
//!
//! The core reads no clock: timeouts, reconnecting and retry policies
//! belong to the caller.
//!
//! # Example
//!
//! A client against a server played by hand in memory: the fixed newstyle
//! handshake, `NBD_OPT_GO` answered with the export's size and flags, then
//! one READ and its reply. The server side is built from the [`wire`]
//! module's encoders. `examples/demo.rs` drives the same calls over a Unix
//! socket, and `examples/mio_loop.rs` from a `mio` event loop with many
//! commands in flight.
//!
//! ```
//! use nbd_proto::wire::{self, info, opt, rep, OptionHeader, OptionReplyHeader, Put, ReplyHeader, RequestHeader};
//! use nbd_proto::{CmdFlags, Config, Connection, Direction, Event, HandshakeFlags, PublicState, TransmissionFlags};
//!
//! /// Sends everything pending, as a socket loop would: `poll_transmit`
//! /// yields slices, `handle_sent` says how many bytes left.
//! fn transmit(conn: &mut Connection<Vec<u8>>, wire_to_server: &mut Vec<u8>) {
//!     loop {
//!         let mut slices: [&[u8]; 16] = [&[]; 16];
//!         let n = conn.poll_transmit(&mut slices);
//!         if n == 0 {
//!             return;
//!         }
//!         let before = wire_to_server.len();
//!         for s in &slices[..n] {
//!             wire_to_server.extend_from_slice(s);
//!         }
//!         let sent = wire_to_server.len() - before;
//!         conn.handle_sent(sent);
//!     }
//! }
//!
//! /// Delivers the server's bytes, as a socket loop would: receive into
//! /// `recv_buffer`, report the count with `handle_received`.
//! fn deliver(conn: &mut Connection<Vec<u8>>, mut bytes: &[u8]) {
//!     while !bytes.is_empty() {
//!         let dest = conn.recv_buffer();
//!         let n = dest.len().min(bytes.len());
//!         dest[..n].copy_from_slice(&bytes[..n]);
//!         conn.handle_received(n);
//!         bytes = &bytes[n..];
//!     }
//! }
//!
//! # fn main() -> Result<(), nbd_proto::Error> {
//! // Keep the exchange short: no structured replies (and so no extended
//! // headers), no block size request.
//! let mut config = Config::default();
//! config.request_structured_replies = false;
//! config.request_block_size = false;
//! let mut conn: Connection<Vec<u8>> = Connection::new(config);
//! let mut to_server = Vec::new();
//!
//! // The transport is up: the client waits for the server's greeting.
//! conn.handle_connected()?;
//! assert_eq!(conn.state(), PublicState::Connecting);
//! assert_eq!(conn.direction(), Direction::Read);
//!
//! // Server: NBDMAGIC, IHAVEOPT, handshake flags (fixed newstyle, no zeroes).
//! let mut greeting = Vec::new();
//! greeting.put_u64(wire::NBDMAGIC);
//! greeting.put_u64(wire::IHAVEOPT);
//! greeting.put_u16((HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES).bits() as u16);
//! deliver(&mut conn, &greeting);
//!
//! // The client answers with its flags and NBD_OPT_GO, and has to send them
//! // before it reads again.
//! assert_eq!(conn.direction(), Direction::Write);
//! transmit(&mut conn, &mut to_server);
//! assert_eq!(conn.direction(), Direction::Read);
//! let go = OptionHeader::decode(&to_server[4..]).expect("an option request");
//! assert_eq!(go.option, opt::GO);
//! to_server.clear();
//!
//! // Server: NBD_REP_INFO with NBD_INFO_EXPORT (1 MiB, read-write, flush),
//! // then NBD_REP_ACK.
//! let size: u64 = 1 << 20;
//! let flags = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH;
//! let mut reply = Vec::new();
//! OptionReplyHeader { option: opt::GO, reply: rep::INFO, length: 12 }.encode(&mut reply);
//! reply.put_u16(info::EXPORT);
//! reply.put_u64(size);
//! reply.put_u16(flags.bits());
//! OptionReplyHeader { option: opt::GO, reply: rep::ACK, length: 0 }.encode(&mut reply);
//! deliver(&mut conn, &reply);
//!
//! assert!(matches!(conn.poll_event(), Some(Event::Connected)));
//! assert_eq!(conn.state(), PublicState::Ready);
//! assert_eq!(conn.export().size, Some(size));
//!
//! // A READ of 8 bytes at offset 512: the request leaves on the next send.
//! let cookie = conn.read(512, vec![0; 8], CmdFlags::empty())?;
//! assert_eq!(conn.direction(), Direction::Both);
//! transmit(&mut conn, &mut to_server);
//! let (request, extended) = RequestHeader::decode(&to_server).expect("a request");
//! assert!(!extended);
//! assert_eq!((request.kind, request.offset, request.length), (wire::cmd::READ, 512, 8));
//!
//! // Server: a simple reply for that cookie, followed by the data.
//! let mut reply = Vec::new();
//! ReplyHeader::Simple { error: 0, cookie: request.cookie }.encode(&mut reply);
//! reply.extend_from_slice(b"NBD data");
//! deliver(&mut conn, &reply);
//!
//! // The command completes once, handing its buffer back.
//! match conn.poll_event() {
//!     Some(Event::Complete { cookie: c, result, buf }) => {
//!         assert_eq!(c, cookie);
//!         result?;
//!         assert_eq!(buf.as_deref(), Some(&b"NBD data"[..]));
//!     }
//!     other => panic!("expected the read's completion, got {other:?}"),
//! }
//! assert_eq!(conn.in_flight(), 0);
//!
//! // Disconnect: once NBD_CMD_DISC has left, the connection is closed.
//! conn.disconnect()?;
//! transmit(&mut conn, &mut to_server);
//! assert_eq!(conn.state(), PublicState::Closed);
//! assert_eq!(conn.direction(), Direction::None);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod errno;
pub mod error;
pub mod flags;
pub mod server;
pub mod wire;

pub use client::{
    BlockSize, ChunkStatus, CommandBuffer, Config, Connection, Cookie, Direction, Event, ExportInfo, Extent,
    MetaContext, Note, OptionOutcome, Protocol, PublicState, Stats,
};
pub use error::{ClientError, Error, LocalError, ProtocolError, ServerError, TransportError};
pub use flags::{CmdFlags, HandshakeFlags, StrictMode, TlsMode, TransmissionFlags};
pub use server::Connection as ServerConnection;
