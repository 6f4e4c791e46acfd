//! The main job in miniature: connect to an NBD server on a Unix socket,
//! negotiate, write, read back, map allocation and disconnect, with
//! nbd-proto driven by nbd-io's blocking driver: the I/O loop the C
//! library uses, waiting in poll(2).
//!
//! `nbdkit -U - memory 64M --run 'cargo run -p nbd-io --example demo -- "$unixsocket"'`

use nbd_io::Driver;
use nbd_proto::{CmdFlags, Config, Connection, Event};
use std::os::unix::net::UnixStream;

fn main() {
    let path = std::env::args().nth(1).expect("usage: demo SOCKET");
    let stream = UnixStream::connect(&path).expect("connect");
    let mut config = Config::default();
    config.add_meta_context("base:allocation").expect("context name");
    let mut d = Driver::new(Connection::new(config), stream).expect("socket");
    d.handshake().expect("handshake I/O");
    if let Some(e) = d.conn.error() {
        eprintln!("handshake failed: {e}");
        std::process::exit(1);
    }
    let c = &d.conn;
    let size = c.export().size.unwrap_or(0);
    println!("protocol:           {}", c.protocol().map_or("?", |p| p.name()));
    println!("size:               {size}");
    println!("flags:              {:?}", c.export().flags);
    println!("structured replies: {}", c.structured_replies_negotiated());
    println!("extended headers:   {}", c.extended_headers_negotiated());
    println!("meta contexts:      {:?}", c.meta_contexts().unwrap_or(&[]));

    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let w = d.conn.write(4096, data.clone(), CmdFlags::empty()).expect("submit write");
    d.wait(w).expect("write");
    let r = d.conn.read(4096, vec![0; data.len()], CmdFlags::empty()).expect("submit read");
    let back = d.wait(r).expect("read").expect("buffer");
    assert_eq!(back, data, "read back what was written");
    println!("wrote and read back 1 MiB: identical");

    let bs = d.conn.block_status(0, size.min(8 << 20), CmdFlags::empty()).expect("submit block status");
    d.wait(bs).expect("block status");
    for e in d.events.drain(..) {
        if let Event::Extents { context_id, offset, extents, .. } = e {
            let mut at = offset;
            for x in extents {
                println!("extent {at:>9} +{:<9} flags {} (context {context_id})", x.length, x.flags);
                at += x.length;
            }
        }
    }
    d.conn.disconnect().expect("disconnect");
    d.run_until(|c| c.state().name() == "closed").expect("disconnect I/O");
    println!("state:              {}", d.conn.state().name());
    let (sends, receives) = d.syscalls();
    println!("sends {sends} receives {receives}");
}
