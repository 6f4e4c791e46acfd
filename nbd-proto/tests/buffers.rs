//! The receive buffer is sized to the need: small while idle, grown for a
//! burst of replies or one large message, given back once idle, and
//! never a byte lost on the way, however the byte stream is cut.

mod support;

use nbd_proto::*;
use support::pair::Pair;
use support::server::Behaviour;

/// Largest buffer an idle connection keeps.
const IDLE: usize = 8 * 1024;
/// The batching size a burst of small replies reaches.
const BATCH: usize = 64 * 1024;

/// How the server's bytes are cut on their way to the client.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// As much as the client has room for.
    Whole,
    /// One byte at a time.
    Bytewise,
    /// Pieces of 1 to 5000 bytes, from this seed.
    Random(u64),
}

struct Run {
    p: Pair,
    cut: Cut,
    rng: u64,
    /// The largest receive buffer seen.
    peak: usize,
    /// Every event, rendered.
    log: Vec<String>,
}

impl Run {
    fn new(b: Behaviour, size: usize, cut: Cut) -> Self {
        let mut cfg = Config::default();
        cfg.add_meta_context("base:allocation").unwrap();
        let p = Pair::new(cfg, b, size);
        let rng = if let Cut::Random(seed) = cut { seed | 1 } else { 1 };
        let mut r = Run { p, cut, rng, peak: 0, log: Vec::new() };
        r.drive();
        assert_eq!(r.p.state(), PublicState::Ready);
        r
    }

    fn piece(&mut self, room: usize, left: usize) -> usize {
        let max = room.min(left);
        match self.cut {
            Cut::Whole => max,
            Cut::Bytewise => 1,
            Cut::Random(_) => {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                1 + (self.rng as usize % 5000).min(max - 1)
            }
        }
    }

    /// Moves bytes both ways until both sides are quiet, recording the
    /// largest receive buffer.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            loop {
                let mut slices: [&[u8]; 8] = [&[]; 8];
                let n = self.p.client.poll_transmit(&mut slices);
                let bytes: Vec<u8> = slices[..n].concat();
                if bytes.is_empty() {
                    break;
                }
                self.p.client.handle_sent(bytes.len());
                self.p.server.receive(&bytes);
                moved = true;
            }
            let out = std::mem::take(&mut self.p.server.out);
            let mut bytes = &out[..];
            while !bytes.is_empty() {
                moved = true;
                let room = self.p.client.recv_buffer().len();
                assert!(room > 0);
                self.peak = self.peak.max(self.p.client.recv_capacity());
                let n = self.piece(room, bytes.len());
                self.p.client.recv_buffer()[..n].copy_from_slice(&bytes[..n]);
                self.p.client.handle_received(n);
                bytes = &bytes[n..];
            }
            while let Some(e) = self.p.client.poll_event() {
                self.log.push(format!("{e:?}"));
            }
            if !moved {
                return;
            }
        }
    }
}

/// What every byte of 4 KiB block `i` of a striped disk holds: every
/// other block is zero.
fn block_value(i: usize) -> u8 {
    if i % 2 == 0 {
        (i / 2 % 255) as u8 + 1
    } else {
        0
    }
}

fn striped_disk(size: usize) -> Vec<u8> {
    let mut disk = vec![0u8; size];
    for (i, block) in disk.chunks_mut(4096).enumerate() {
        block.fill(block_value(i));
    }
    disk
}

/// One 4 KiB read, a burst of 64, then idle again: the buffer follows.
fn reads(cut: Cut) -> Vec<String> {
    const SIZE: usize = 1 << 20;
    let mut r = Run::new(Behaviour::nbdkit(), SIZE, cut);
    r.p.server.disk = striped_disk(SIZE);
    assert!(r.p.client.recv_capacity() <= IDLE, "{cut:?}: small after the handshake");

    // One read at a time never needs more than the idle size.
    r.peak = 0;
    let c = r.p.client.read(8192, vec![0; 4096], CmdFlags::empty()).unwrap();
    r.drive();
    assert!(r.peak <= IDLE, "{cut:?}: one 4 KiB read took a {} byte buffer", r.peak);
    let want = format!("Complete {{ cookie: {c}, result: Ok(()), buf: Some([2, 2,");
    assert!(r.log.iter().any(|e| e.starts_with(&want)), "{cut:?}");
    assert!(r.p.client.recv_capacity() <= IDLE);

    // 64 in flight: the buffer grows to the batching size for them.
    r.peak = 0;
    let cookies: Vec<Cookie> = (0..64u64)
        .map(|i| r.p.client.read(i * 12288 % SIZE as u64, vec![0; 4096], CmdFlags::empty()).unwrap())
        .collect();
    r.drive();
    assert_eq!(r.peak, BATCH, "{cut:?}");
    assert_eq!(r.p.client.in_flight(), 0);
    assert_eq!(r.p.client.recv_capacity(), 0, "{cut:?}: given back once idle");
    let done = r.log.iter().filter(|e| e.contains("result: Ok(())")).count();
    assert_eq!(done, 65, "{cut:?}");
    for (i, c) in cookies.iter().enumerate() {
        let want = block_value(i * 3 % 256);
        let e = r.log.iter().find(|e| e.starts_with(&format!("Complete {{ cookie: {c},"))).unwrap();
        assert!(e.contains(&format!("buf: Some([{want}, {want},")), "{cut:?}: read {i}: {e:.80}");
    }

    // And it grows again for the next burst.
    r.peak = 0;
    for i in 0..16u64 {
        r.p.client.read(i * 4096, vec![0; 4096], CmdFlags::empty()).unwrap();
    }
    r.drive();
    assert!(r.peak > IDLE, "{cut:?}");
    assert_eq!(r.p.client.recv_capacity(), 0);
    r.log
}

#[test]
fn the_buffer_grows_for_a_burst_and_is_given_back_when_idle() {
    let reference = reads(Cut::Whole);
    assert_eq!(reads(Cut::Bytewise), reference, "one byte at a time");
    for seed in 0..20 {
        assert_eq!(reads(Cut::Random(seed * 7919 + 3)), reference, "seed {seed}");
    }
}

/// Block status over a striped disk: one chunk far larger than the
/// batching size, arriving in pieces.
fn large_reply(b: Behaviour, cut: Cut) -> Vec<String> {
    const SIZE: usize = 32 << 20;
    let mut r = Run::new(b, SIZE, cut);
    r.p.server.disk = striped_disk(SIZE);
    r.peak = 0;
    r.p.client.block_status(0, SIZE as u64, CmdFlags::empty()).unwrap();
    r.drive();
    let extents = SIZE / 4096;
    let e = r.log.iter().find(|e| e.starts_with("Extents")).expect("extents");
    assert_eq!(e.matches("Extent {").count(), extents, "{cut:?}");
    assert!(r.log.last().unwrap().contains("result: Ok(())"));
    // 8 or 16 bytes per extent, in one message.
    assert!(r.peak >= extents * 8, "{cut:?}: {} bytes", r.peak);
    assert!(r.peak <= 4 * extents * 16, "{cut:?}: at most doubling");
    assert_eq!(r.p.client.recv_capacity(), 0, "{cut:?}: given back once idle");
    r.log
}

#[test]
fn a_large_message_in_pieces_grows_the_buffer_past_the_batching_size() {
    for b in [Behaviour::nbdkit(), Behaviour::qemu()] {
        let reference = large_reply(b.clone(), Cut::Whole);
        for seed in 0..3 {
            assert_eq!(large_reply(b.clone(), Cut::Random(seed * 104_729 + 17)), reference, "seed {seed}");
        }
    }
}
