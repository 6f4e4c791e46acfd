//! Hostile servers against the C API: nothing crashes, hangs,
//! leaks or is lost.
//!
//! A scripted server (nbd-proto's test server, on the core's wire
//! encoding) runs in a thread on the far end of a socketpair and breaks
//! the protocol in every way the core knows: malformed replies of every
//! class, garbage at every phase of the handshake, a cut after any byte
//! of its output, and stalls. The client is this crate's exported C
//! functions, called as a C program calls them. Every case checks:
//!
//! - the handle ends dead (closed for a cut between replies) and the
//!   synchronous call that met the violation returns -1 with the errno
//!   (EPROTO for a protocol violation, ENOTCONN for a cut);
//! - every command in flight completed once, through its completion
//!   callback, with that errno, and `nbd_aio_command_completed` returns
//!   -1 with it (commands answered in full before the violation succeed);
//!   a failed read's buffer is zeroed;
//! - every callback (completion, chunk, extent, list) is freed exactly
//!   once by the time `nbd_close` returns, and none is called after its
//!   `free`; a call refused on the dead handle frees its callback too;
//! - nothing hangs: polling is bounded, and the server's watchdog would
//!   unblock (and fail) a client stuck in a synchronous call.
//!
//! `cargo test -p nbd-capi --test hostile_server -- --nocapture` prints
//! the number of cases of each class.

#[path = "../../nbd-proto/tests/support/craft.rs"]
mod craft;
#[path = "hostile/ffi.rs"]
mod ffi;
#[path = "hostile/peer.rs"]
mod peer;
#[path = "../../nbd-proto/tests/support/server.rs"]
mod server;

use craft::*;
use ffi::*;
use libc::{EINVAL, ENOTCONN, EPROTO};
use nbd_proto::wire::{self, chunk, cmd, nbd_error, opt, rep, ReplyHeader, RequestHeader};
use peer::*;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

/// How long a case may poll before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(5);

fn report(class: &str, n: usize, at_least: usize) {
    println!("hostile_server: {class}: {n} cases");
    assert!(n >= at_least, "{class}: only {n} cases ran, expected at least {at_least}");
}

// ---- the client side ------------------------------------------------------------

/// A handle set up for `preset`, optionally in opt mode.
/// Rust's runtime ignores SIGPIPE; a C program does not. The library
/// must never raise it, so these tests run with the default disposition,
/// under which a stray SIGPIPE ends the test binary.
fn default_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to its default.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    });
}

fn create(preset: Preset, opt_mode: bool) -> H {
    default_sigpipe();
    // SAFETY: plain calls on a fresh handle with NUL-terminated strings.
    unsafe {
        let h = nbd_create();
        assert!(!h.is_null());
        if preset == Preset::NbdServer {
            assert_eq!(nbd_set_export_name(h, c"exp".as_ptr()), 0);
        } else {
            assert_eq!(nbd_add_meta_context(h, c"base:allocation".as_ptr()), 0);
        }
        assert_eq!(nbd_set_opt_mode(h, opt_mode), 0);
        h
    }
}

/// Connects synchronously to a server playing `script`: the handle and
/// the result of `nbd_connect_socket` with its errno.
fn try_connect(script: Script, opt_mode: bool) -> (H, Peer, c_int, c_int) {
    let preset = script.preset;
    let (peer, fd) = Peer::start(script);
    let h = create(preset, opt_mode);
    // SAFETY: `h` is live; the handle takes ownership of `fd`.
    let r = unsafe { nbd_connect_socket(h, fd) };
    let errno = if r == -1 { last_error().0 } else { 0 };
    (h, peer, r, errno)
}

/// Connects synchronously to a server playing `script`; must succeed.
fn connect(script: Script, case: &str) -> (H, Peer) {
    let preset = script.preset;
    let (h, peer, r, _) = try_connect(script, false);
    assert_eq!(r, 0, "{case}: connect: {:?}", last_error());
    // SAFETY: `h` is live.
    let sr = unsafe { nbd_get_structured_replies_negotiated(h) };
    assert_eq!(sr, c_int::from(preset.structured()), "{case}");
    (h, peer)
}

/// Closes the handle, waits for the server, and checks that every probe's
/// callbacks were freed exactly once and never called after that.
fn close(h: H, peer: Peer, probes: &[&Probe], case: &str) -> Report {
    // SAFETY: `h` is live and closed once, here.
    unsafe { nbd_close(h) };
    let r = peer.finish(case);
    for (i, p) in probes.iter().enumerate() {
        assert_eq!(p.freed(), 1, "{case}: probe {i}: completion freed {} times", p.freed());
        assert!(p.aux_freed() <= 1, "{case}: probe {i}: callback freed {} times", p.aux_freed());
        assert_eq!(p.late(), 0, "{case}: probe {i}: a callback ran after its free");
    }
    r
}

/// One command submitted through the AIO API.
struct Cmd {
    role: Role,
    cookie: u64,
    probe: Box<Probe>,
    /// A read's buffer (filled with 0xee before), or a write's.
    buf: Vec<u8>,
    /// Whether it has a chunk or extent callback.
    aux: bool,
}

/// Submits one command of `role`. TRIM's completion callback auto-retires.
fn submit(h: H, role: Role) -> Cmd {
    submit_sized(h, role, if role == Role::Write { 512 } else { 4096 })
}

/// Submits one command of `role`, reading or writing `size` bytes if it
/// is a READ or WRITE.
fn submit_sized(h: H, role: Role, size: usize) -> Cmd {
    let probe = Probe::new(role == Role::Trim);
    let (len, fill) = match role {
        Role::Read | Role::Df => (size, 0xee),
        Role::Write => (size, 0x5a),
        _ => (0, 0),
    };
    let mut buf = vec![fill; len];
    let (cb, b) = (probe.completion(), buf.as_mut_ptr().cast::<c_void>());
    // SAFETY: `h` is live; `buf` and `probe` outlive the command (they are
    // kept in the returned `Cmd` until after `nbd_close`).
    let cookie = unsafe {
        match role {
            Role::Read => nbd_aio_pread(h, b, len, 0, cb, 0),
            Role::Df => nbd_aio_pread_structured(h, b, len, 8192, probe.chunk(), cb, CMD_FLAG_DF),
            Role::Bs => nbd_aio_block_status(h, 65536, 0, probe.extent(), cb, 0),
            Role::One => nbd_aio_block_status(h, 65536, 0, probe.extent(), cb, CMD_FLAG_REQ_ONE),
            Role::Flush => nbd_aio_flush(h, cb, 0),
            Role::Write => nbd_aio_pwrite(h, b, len, 0, cb, 0),
            Role::Trim => nbd_aio_trim(h, 4096, 16384, cb, 0),
            Role::Zero => nbd_aio_zero(h, 4096, 20480, cb, 0),
            Role::Cache => nbd_aio_cache(h, 4096, 0, cb, 0),
        }
    };
    assert!(cookie > 0, "{role:?}: {:?}", last_error());
    let aux = matches!(role, Role::Df | Role::Bs | Role::One);
    Cmd { role, cookie: cookie as u64, probe, buf, aux }
}

/// Every command the preset's server takes, one of each role.
fn flight_roles(preset: Preset) -> Vec<Role> {
    let mut roles = vec![Role::Read];
    if preset.structured() {
        roles.extend([Role::Df, Role::Bs, Role::One]);
    }
    roles.extend([Role::Flush, Role::Write, Role::Trim]);
    if preset.zero_and_cache() {
        roles.extend([Role::Zero, Role::Cache]);
    }
    roles
}

/// Polls (with a timeout, boundedly) until `done`; fails the case if it
/// never happens.
fn pump(h: H, case: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "{case}: hung: not done after {PATIENCE:?}");
        // SAFETY: `h` is live.
        let r = unsafe { nbd_poll(h, 100) };
        assert!((-1..=1).contains(&r), "{case}: nbd_poll returned {r}");
    }
}

fn all_completed(cmds: &[Cmd]) -> impl Fn() -> bool + '_ {
    || cmds.iter().all(|c| c.probe.calls() > 0)
}

/// The command completed once with `errno` (0: success), was (or is now)
/// retired with that result, and its completion callback is freed.
fn check_completed(h: H, c: &Cmd, errno: i32, case: &str) {
    let case = format!("{case}: {:?} (cookie {})", c.role, c.cookie);
    assert_eq!(c.probe.calls(), 1, "{case}: completion callback calls");
    assert_eq!(c.probe.errno(), errno, "{case}: errno given to the completion callback");
    if c.probe.retire {
        // Auto-retired: freed at completion, unknown from now on.
        assert_eq!(c.probe.freed(), 1, "{case}: an auto-retired command's callback is freed at once");
    } else {
        assert_eq!(c.probe.freed(), 0, "{case}: freed before retirement");
        // SAFETY: `h` is live.
        let r = unsafe { nbd_aio_command_completed(h, c.cookie) };
        if errno == 0 {
            assert_eq!(r, 1, "{case}: command_completed: {:?}", last_error());
        } else {
            assert_eq!((r, last_error().0), (-1, errno), "{case}: command_completed: {:?}", last_error());
        }
        assert_eq!(c.probe.freed(), 1, "{case}: retiring frees the callback");
    }
    if errno != 0 && matches!(c.role, Role::Read | Role::Df) {
        assert!(c.buf.iter().all(|&b| b == 0), "{case}: a failed read's buffer is zeroed");
    }
}

fn is_dead(h: H) -> bool {
    // SAFETY: every caller passes a live handle.
    unsafe { nbd_aio_is_dead(h) == 1 }
}

fn is_closed(h: H) -> bool {
    // SAFETY: every caller passes a live handle.
    unsafe { nbd_aio_is_closed(h) == 1 }
}

/// A command refused by the dead (or closed) handle still frees its
/// callback, once, without calling it.
fn check_refused(h: H, case: &str) {
    let p = Probe::new(false);
    // SAFETY: `h` is live; the probe outlives the call.
    let r = unsafe { nbd_aio_flush(h, p.completion(), 0) };
    assert_eq!((r, last_error().0), (-1, EINVAL), "{case}: a command on an ended handle");
    assert_eq!((p.calls(), p.freed()), (0, 1), "{case}: the refused command's callback");
    // A refused read still zeroes its buffer (libnbd initializes it before
    // any check), and frees its callbacks.
    let p = Probe::new(false);
    let mut buf = vec![0xeeu8; 512];
    // SAFETY: `h` is live; `buf` and the probe outlive the call.
    let r = unsafe { nbd_aio_pread_structured(h, buf.as_mut_ptr().cast(), 512, 0, p.chunk(), p.completion(), 0) };
    assert_eq!((r, last_error().0), (-1, EINVAL), "{case}: a read on an ended handle");
    assert!(buf.iter().all(|&b| b == 0), "{case}: a refused read's buffer is zeroed");
    assert_eq!((p.calls(), p.freed(), p.aux_freed()), (0, 1, 1), "{case}: the refused read's callbacks");
    // SAFETY: `h` is live.
    let r = unsafe { nbd_aio_in_flight(h) };
    assert_eq!(r, 0, "{case}: commands still in flight");
}

/// Runs the synchronous call for `role` (with a counted chunk or extent
/// callback where it takes one); returns its result and errno.
fn sync_call(h: H, role: Role, probe: &Probe) -> (c_int, c_int) {
    let mut buf = vec![0xeeu8; 4096];
    let b = buf.as_mut_ptr().cast::<c_void>();
    // SAFETY: `h` is live; `buf` and `probe` outlive the call.
    let r = unsafe {
        match role {
            Role::Read => nbd_pread(h, b, 4096, 0, 0),
            Role::Df => nbd_pread_structured(h, b, 4096, 8192, probe.chunk(), CMD_FLAG_DF),
            Role::Bs => nbd_block_status(h, 65536, 0, probe.extent(), 0),
            Role::One => nbd_block_status(h, 65536, 0, probe.extent(), CMD_FLAG_REQ_ONE),
            Role::Flush => nbd_flush(h, 0),
            Role::Write => nbd_pwrite(h, b, 512, 0, 0),
            Role::Trim => nbd_trim(h, 4096, 16384, 0),
            Role::Zero => nbd_zero(h, 4096, 20480, 0),
            Role::Cache => nbd_cache(h, 4096, 0, 0),
        }
    };
    let errno = if r == -1 { last_error().0 } else { 0 };
    if r == -1 && matches!(role, Role::Read | Role::Df) {
        assert!(buf.iter().all(|&b| b == 0), "{role:?}: a failed pread's buffer is zeroed");
    }
    (r, errno)
}

// ---- encoding replies ----------------------------------------------------------------

impl Flight {
    fn ck(&self, role: Role, kind: u16, done: bool, payload: &[u8]) -> Vec<u8> {
        chunk(self.cookie(role), kind, done, self.ext, payload)
    }
    /// A chunk header claiming `len` bytes, followed by none of them.
    fn head(&self, role: Role, kind: u16, len: u64) -> Vec<u8> {
        chunk_header(self.cookie(role), kind, 0, self.ext, len)
    }
    fn data(&self, role: Role, done: bool, offset: u64, len: usize) -> Vec<u8> {
        self.ck(role, chunk::OFFSET_DATA, done, &data(offset, &vec![0xd7; len]))
    }
    fn hole(&self, role: Role, done: bool, offset: u64, len: u32) -> Vec<u8> {
        self.ck(role, chunk::OFFSET_HOLE, done, &hole(offset, len))
    }
    /// A payload-less success in the negotiated form, for any cookie.
    fn ok_cookie(&self, cookie: u64) -> Vec<u8> {
        let sr = self.sr.then(|| chunk(cookie, chunk::NONE, true, self.ext, &[]));
        sr.unwrap_or_else(|| simple(cookie, 0))
    }
    fn ok(&self, role: Role) -> Vec<u8> {
        self.ok_cookie(self.cookie(role))
    }
    /// A whole, valid answer to the 4096-byte read at 0.
    fn read_reply(&self) -> Vec<u8> {
        let sr = self.sr.then(|| self.data(Role::Read, true, 0, 4096));
        sr.unwrap_or_else(|| [simple(self.cookie(Role::Read), 0), vec![0xd7; 4096]].concat())
    }
    fn status_kind(&self) -> u16 {
        [chunk::BLOCK_STATUS, chunk::BLOCK_STATUS_EXT][usize::from(self.ext)]
    }
    /// Extents for context `id`, in the negotiated width.
    fn extents(&self, role: Role, done: bool, id: u32, list: &[(u32, u32)]) -> Vec<u8> {
        let payload = if self.ext {
            let wide: Vec<(u64, u64)> = list.iter().map(|&(l, f)| (l.into(), f.into())).collect();
            status_ext(id, list.len() as u32, &wide)
        } else {
            status(id, list)
        };
        self.ck(role, self.status_kind(), done, &payload)
    }
    /// A length no buffer could be made for.
    fn huge(&self) -> u64 {
        if self.ext {
            1 << 40
        } else {
            u32::MAX.into()
        }
    }
}

// ---- malformed replies in transmission -------------------------------------------------

/// One malformed reply stream: where it applies, which command it is aimed
/// at (the synchronous run issues only that one), which commands it
/// answers correctly before it breaks the protocol, and the bytes.
struct Case {
    name: &'static str,
    presets: &'static [Preset],
    target: Role,
    ok: &'static [Role],
    /// Sent as soon as the handshake is over, before any request.
    early: bool,
    bytes: fn(&Flight) -> Vec<u8>,
}

const fn bad(name: &'static str, presets: &'static [Preset], target: Role, bytes: fn(&Flight) -> Vec<u8>) -> Case {
    Case { name, presets, target, ok: &[], early: false, bytes }
}

use Role::{Bs, Df, Flush as Fl, One, Read as Rd, Write as Wr};

const CASES: &[Case] = &[
    // -- bad magic
    bad("bad reply magic", ALL, Fl, |_| [vec![0xde, 0xad, 0xbe, 0xef], vec![0; 28]].concat()),
    bad("a request echoed as a reply", ALL, Rd, |f| {
        let mut v = Vec::new();
        RequestHeader { flags: 0, kind: cmd::READ, cookie: f.cookie(Rd), offset: 0, length: 4096 }
            .encode(false, &mut v);
        v
    }),
    bad("an option reply in transmission", ALL, Fl, |f| option_reply(opt::GO, rep::ACK, &f.cookie(Fl).to_be_bytes())),
    Case { early: true, ..bad("garbage right after the handshake", ALL, Fl, |_| vec![0xab; 64]) },
    // -- unknown or duplicate cookie
    bad("unknown cookie", ALL, Fl, |f| f.ok_cookie(0x5eed)),
    bad("cookie 0", ALL, Fl, |f| f.ok_cookie(0)),
    Case { ok: &[Fl], ..bad("a second reply to a completed flush", ALL, Fl, |f| [f.ok(Fl), f.ok(Fl)].concat()) },
    Case { ok: &[Rd], ..bad("a second reply to a completed read", ALL, Rd, |f| [f.read_reply(), f.ok(Rd)].concat()) },
    // -- a reply of a kind not negotiated, or not for the command
    bad("a structured reply, none negotiated", NBD_SERVER, Fl, |f| chunk(f.cookie(Fl), chunk::NONE, true, false, &[])),
    bad("structured read data, none negotiated", NBD_SERVER, Rd, |f| {
        chunk(f.cookie(Rd), chunk::OFFSET_DATA, true, false, &data(0, &[1; 4096]))
    }),
    bad("an extended reply, none negotiated", COMPACT, Fl, |f| chunk(f.cookie(Fl), chunk::NONE, true, true, &[])),
    bad("a compact chunk under extended headers", QEMU, Fl, |f| chunk(f.cookie(Fl), chunk::NONE, true, false, &[])),
    bad("a simple reply under extended headers", QEMU, Fl, |f| simple(f.cookie(Fl), 0)),
    bad("a simple read reply under structured replies", NBDKIT, Rd, |f| {
        [simple(f.cookie(Rd), 0), vec![7; 4096]].concat()
    }),
    bad("a simple reply after structured chunks", NBDKIT, Rd, |f| {
        [f.data(Rd, false, 0, 2048), simple(f.cookie(Rd), 0)].concat()
    }),
    bad("NONE without DONE", SR, Fl, |f| f.ck(Fl, chunk::NONE, false, &[])),
    bad("NONE with a payload", SR, Fl, |f| f.ck(Fl, chunk::NONE, true, &[0; 4])),
    bad("unknown chunk type", SR, Fl, |f| f.ck(Fl, 3, true, &[])),
    bad("DATA to a FLUSH", SR, Fl, |f| f.data(Fl, true, 0, 16)),
    bad("DATA to a WRITE", SR, Wr, |f| f.data(Wr, true, 0, 512)),
    bad("HOLE to a BLOCK_STATUS", SR, Bs, |f| f.hole(Bs, true, 0, 4096)),
    bad("block status to a READ", SR, Rd, |f| f.extents(Rd, true, f.ctx, &[(4096, 0)])),
    bad("64-bit block status without extended headers", NBDKIT, Bs, |f| {
        f.ck(Bs, chunk::BLOCK_STATUS_EXT, true, &status_ext(f.ctx, 1, &[(4096, 0)]))
    }),
    // -- offsets outside the request
    bad("DATA before a read", SR, Df, |f| f.data(Df, true, 4096, 4096)),
    bad("DATA past the end of a read", SR, Rd, |f| f.data(Rd, true, 4000, 200)),
    bad("DATA whose offset wraps", SR, Rd, |f| f.data(Rd, true, u64::MAX - 2, 16)),
    bad("HOLE past the end of a read", SR, Rd, |f| f.hole(Rd, true, 4000, 200)),
    bad("HOLE whose offset wraps", SR, Rd, |f| f.hole(Rd, true, u64::MAX, 4096)),
    bad("ERROR_OFFSET outside a read", SR, Rd, |f| {
        f.ck(Rd, chunk::ERROR_OFFSET, true, &error_offset(nbd_error::EIO, b"", 1 << 19))
    }),
    // -- overlapping or missing chunks
    bad("overlapping DATA", SR, Rd, |f| [f.data(Rd, false, 0, 2048), f.data(Rd, true, 2000, 2096)].concat()),
    bad("HOLE overlapping DATA", SR, Rd, |f| [f.data(Rd, false, 0, 2048), f.hole(Rd, true, 1024, 3072)].concat()),
    bad("DONE before a read is covered", SR, Rd, |f| f.data(Rd, true, 0, 2048)),
    bad("a gap between chunks", SR, Rd, |f| [f.data(Rd, false, 0, 1024), f.hole(Rd, true, 2048, 2048)].concat()),
    bad("NONE as the whole reply to a read", SR, Rd, |f| f.ck(Rd, chunk::NONE, true, &[])),
    bad("a DF read in two chunks", SR, Df, |f| [f.data(Df, false, 8192, 2048), f.data(Df, true, 10240, 2048)].concat()),
    // -- oversize lengths (a header alone: the client must not wait for the payload)
    bad("DATA longer than the read", SR, Rd, |f| f.data(Rd, true, 0, 4097)),
    bad("huge DATA", SR, Rd, |f| f.head(Rd, chunk::OFFSET_DATA, f.huge())),
    bad("huge HOLE", SR, Rd, |f| f.head(Rd, chunk::OFFSET_HOLE, f.huge())),
    bad("huge NONE", SR, Fl, |f| f.head(Fl, chunk::NONE, f.huge())),
    bad("huge ERROR", SR, Fl, |f| f.head(Fl, chunk::ERROR, f.huge())),
    bad("huge block status", SR, Bs, |f| f.head(Bs, f.status_kind(), f.huge())),
    bad("huge DATA to a WRITE", SR, Wr, |f| f.head(Wr, chunk::OFFSET_DATA, f.huge())),
    bad("HOLE longer than the read", SR, Rd, |f| f.hole(Rd, true, 0, u32::MAX)),
    // -- error chunks
    bad("ERROR with error 0", SR, Fl, |f| f.ck(Fl, chunk::ERROR, true, &error(0, b"fine?"))),
    bad("an error message overrunning its chunk", SR, Fl, |f| {
        f.ck(Fl, chunk::ERROR, true, &error_declared(nbd_error::EIO, b"abc", 40))
    }),
    bad("ERROR shorter than its fields", SR, Fl, |f| f.ck(Fl, chunk::ERROR, true, &error(nbd_error::EIO, b"")[..5])),
    // -- block status
    bad("a context id never negotiated", SR, Bs, |f| f.extents(Bs, true, 42, &[(4096, 0)])),
    bad("context id 0", SR, Bs, |f| f.extents(Bs, true, 0, &[(4096, 0)])),
    bad("the same context twice", SR, Bs, |f| {
        [f.extents(Bs, false, f.ctx, &[(4096, 0)]), f.extents(Bs, true, f.ctx, &[(4096, 0)])].concat()
    }),
    bad("a zero-length extent", SR, Bs, |f| f.extents(Bs, true, f.ctx, &[(4096, 0), (0, 0)])),
    bad("extents beyond the request", SR, Bs, |f| f.extents(Bs, true, f.ctx, &[(65536, 0), (4096, 0)])),
    bad("REQ_ONE answered with two extents", SR, One, |f| f.extents(One, true, f.ctx, &[(4096, 0), (4096, 3)])),
    bad("block status without extents", NBDKIT, Bs, |f| f.ck(Bs, chunk::BLOCK_STATUS, true, &status(f.ctx, &[]))),
    bad("64-bit block status miscounting", QEMU, Bs, |f| {
        f.ck(Bs, chunk::BLOCK_STATUS_EXT, true, &status_ext(f.ctx, 5, &[(4096, 0)]))
    }),
];

/// Connects to a server that sends the case's bytes after `n` requests.
/// Bytes sent right after the handshake may arrive with its last reply
/// and fail the connect itself (with EPROTO, the handle dead): then
/// `None`, the case checked.
fn connect_for(c: &Case, preset: Preset, n: usize, case: &str) -> Option<(H, Peer)> {
    let (h, peer, r, errno) = try_connect(Script::inject(preset, n, Box::new(c.bytes), Then::Hold), false);
    if r == 0 {
        return Some((h, peer));
    }
    assert!(c.early, "{case}: connect: {:?}", last_error());
    assert_eq!(errno, EPROTO, "{case}: connect: {:?}", last_error());
    assert!(is_dead(h), "{case}: the handle is not dead");
    check_refused(h, case);
    close(h, peer, &[], case);
    None
}

/// Every command of the preset in flight; the server answers with the
/// case's bytes once all arrived and holds the connection open: the client
/// must die of the bytes alone.
fn run_aio(c: &Case, preset: Preset) {
    let case = format!("{} [{preset:?}, aio]", c.name);
    let roles = flight_roles(preset);
    let n = if c.early { 0 } else { roles.len() };
    let Some((h, peer)) = connect_for(c, preset, n, &case) else { return };
    let cmds: Vec<Cmd> = roles.iter().map(|&r| submit(h, r)).collect();
    pump(h, &case, all_completed(&cmds));
    assert!(is_dead(h), "{case}: the handle is not dead: {:?}", last_error());
    for cmd in &cmds {
        let errno = if c.ok.contains(&cmd.role) { 0 } else { EPROTO };
        check_completed(h, cmd, errno, &case);
    }
    check_refused(h, &case);
    let probes: Vec<&Probe> = cmds.iter().map(|c| &*c.probe).collect();
    let r = close(h, peer, &probes, &case);
    for cmd in &cmds {
        assert_eq!(cmd.probe.aux_freed(), usize::from(cmd.aux), "{case}: {:?}: chunk/extent callback", cmd.role);
    }
    if !c.early {
        let sent: Vec<u64> = r.requests.iter().map(|h| h.cookie).collect();
        assert_eq!(sent, cmds.iter().map(|c| c.cookie).collect::<Vec<_>>(), "{case}: cookies on the wire");
    }
}

/// The synchronous call for the case's target meets the bytes: it returns
/// -1 with EPROTO (or, where the bytes first answer it well, succeeds and
/// the next call fails).
fn run_sync(c: &Case, preset: Preset) {
    let case = format!("{} [{preset:?}, sync {:?}]", c.name, c.target);
    let Some((h, peer)) = connect_for(c, preset, usize::from(!c.early), &case) else { return };
    let first = Probe::new(false);
    let again = Probe::new(false);
    let (r, errno) = sync_call(h, c.target, &first);
    let twice = c.ok.contains(&c.target);
    if twice {
        assert_eq!(r, 0, "{case}: the well-answered call: {:?}", last_error());
        // The violation that followed may already have killed the handle
        // (the next call is then refused) or kills it during the next call.
        let dead_before = is_dead(h);
        let (r, errno) = sync_call(h, c.target, &again);
        let want = if dead_before { EINVAL } else { EPROTO };
        assert_eq!((r, errno), (-1, want), "{case}: the call after: {:?}", last_error());
    } else {
        assert_eq!((r, errno), (-1, EPROTO), "{case}: {:?}", last_error());
    }
    assert!(is_dead(h), "{case}: the handle is not dead");
    check_refused(h, &case);
    // Sync calls take no completion callback: count the others' frees.
    // SAFETY: `h` is live and closed once, here.
    unsafe { nbd_close(h) };
    peer.finish(&case);
    let aux = usize::from(matches!(c.target, Df | Bs | One));
    for p in [&first, &again].into_iter().take(1 + usize::from(twice)) {
        assert_eq!(p.aux_freed(), aux, "{case}: chunk/extent callback frees");
        assert_eq!(p.late(), 0, "{case}: a callback ran after its free");
    }
}

#[test]
fn malformed_replies() {
    let mut names = std::collections::HashSet::new();
    let mut n = 0;
    for c in CASES {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
        for &preset in c.presets {
            run_aio(c, preset);
            run_sync(c, preset);
            n += 2;
        }
    }
    report("malformed replies (aio and sync)", n, 180);
}

// ---- garbage in the handshake -------------------------------------------------------------

/// Where the server's handshake goes wrong: its greeting (0), or its
/// answer to this option.
struct HsCase {
    name: &'static str,
    presets: &'static [Preset],
    at: u32,
    bytes: fn(u32) -> Vec<u8>,
}

const GREETING: u32 = 0;

const fn hs(name: &'static str, presets: &'static [Preset], at: u32, bytes: fn(u32) -> Vec<u8>) -> HsCase {
    HsCase { name, presets, at, bytes }
}

fn meta_reply(id: u32, name: &str) -> Vec<u8> {
    option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &meta_context(id, name))
}

fn listed(name_len: u32, name: &[u8]) -> Vec<u8> {
    [&name_len.to_be_bytes()[..], name].concat()
}

const HS_CASES: &[HsCase] = &[
    // -- the greeting
    hs("bad magic in the greeting", ALL, GREETING, |_| [b"NBDMAGIX".to_vec(), greeting(3)[8..].to_vec()].concat()),
    hs("bad version magic in the greeting", ALL, GREETING, |_| {
        [wire::NBDMAGIC.to_be_bytes().to_vec(), vec![1; 8], vec![0, 3]].concat()
    }),
    hs("NBDMAGIC twice", ALL, GREETING, |_| [wire::NBDMAGIC.to_be_bytes(), wire::NBDMAGIC.to_be_bytes()].concat()),
    hs("an oldstyle export of 2^63 bytes", ALL, GREETING, |_| oldstyle(1 << 63, 1)),
    hs("garbage as a non-fixed EXPORT_NAME reply", ALL, GREETING, |_| [greeting(0), vec![0xff; 200]].concat()),
    // -- the first option (the client asks for extended headers first)
    hs("bad option reply magic", ALL, opt::EXTENDED_HEADERS, |_| vec![0xab; 20]),
    hs("a reply to the wrong option", ALL, opt::EXTENDED_HEADERS, |_| option_reply(opt::LIST, rep::ACK, &[])),
    hs("an oversize error reply", ALL, opt::EXTENDED_HEADERS, |o| option_reply_header(o, rep::ERR_UNSUP, u32::MAX)),
    hs("an ACK with a payload", COMPACT, opt::STRUCTURED_REPLY, |o| option_reply(o, rep::ACK, &[1, 2])),
    // -- GO
    hs("bad option reply magic to GO", ALL, opt::GO, |_| vec![0xab; 20]),
    hs("a reply to the wrong option for GO", ALL, opt::GO, |_| option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[])),
    hs("an oversize INFO reply", ALL, opt::GO, |o| option_reply_header(o, rep::INFO, 64 * 1024 + 1)),
    hs("INFO_EXPORT of 10 bytes", ALL, opt::GO, |o| option_reply(o, rep::INFO, &info_export(4096, 1)[..10])),
    hs("INFO_BLOCK_SIZE of 10 bytes", ALL, opt::GO, |o| {
        [info_export(4096, 1), info_block_size(512, 4096, 1 << 20)[..10].to_vec()]
            .iter()
            .flat_map(|i| option_reply(o, rep::INFO, i))
            .collect()
    }),
    hs("INFO without a type", ALL, opt::GO, |o| option_reply(o, rep::INFO, &[0])),
    hs("ACK without INFO_EXPORT", ALL, opt::GO, |o| option_reply(o, rep::ACK, &[])),
    hs("an export of 2^63 bytes", ALL, opt::GO, |o| option_reply(o, rep::INFO, &info_export(1 << 63, 1))),
    hs("SERVER reply to GO", ALL, opt::GO, |o| option_reply(o, rep::SERVER, &listed(0, b""))),
    // -- meta contexts
    hs("more meta contexts than requested", SR, opt::SET_META_CONTEXT, |o| {
        [meta_reply(1, "base:allocation"), meta_reply(2, "qemu:allocation-depth"), option_reply(o, rep::ACK, &[])]
            .concat()
    }),
    hs("a meta context never requested", SR, opt::SET_META_CONTEXT, |o| {
        [meta_reply(1, "qemu:dirty-bitmap:x"), option_reply(o, rep::ACK, &[])].concat()
    }),
    hs("a meta context twice", SR, opt::SET_META_CONTEXT, |o| {
        [meta_reply(1, "base:allocation"), meta_reply(1, "base:allocation"), option_reply(o, rep::ACK, &[])].concat()
    }),
    hs("a META_CONTEXT shorter than its id", SR, opt::SET_META_CONTEXT, |o| {
        option_reply(o, rep::META_CONTEXT, &[0, 0, 1])
    }),
    hs("INFO reply to SET_META_CONTEXT", SR, opt::SET_META_CONTEXT, |o| {
        option_reply(o, rep::INFO, &info_export(4096, 1))
    }),
    // -- LIST (opt mode only)
    hs("a SERVER reply whose name overruns it", NBDKIT, opt::LIST, |o| {
        option_reply(o, rep::SERVER, &listed(100, b"abc"))
    }),
    hs("INFO reply to LIST", NBDKIT, opt::LIST, |o| option_reply(o, rep::INFO, &info_export(4096, 1))),
];

fn hs_script(c: &HsCase, preset: Preset) -> Script {
    let mut s = Script::serve(preset);
    if c.at == GREETING {
        s.greeting = Some((c.bytes)(0));
    } else {
        s.intercept = Some((c.at, c.bytes));
    }
    s
}

/// `nbd_connect_socket` fails with EPROTO and the handle is dead.
fn hs_sync(c: &HsCase, preset: Preset) {
    let case = format!("{} [{preset:?}, connect]", c.name);
    let (h, peer, r, errno) = try_connect(hs_script(c, preset), false);
    assert_eq!((r, errno), (-1, EPROTO), "{case}: {:?}", last_error());
    assert!(is_dead(h), "{case}: the handle is not dead");
    check_refused(h, &case);
    close(h, peer, &[], &case);
}

/// `nbd_aio_connect_socket`, then polling until the handle dies.
fn hs_aio(c: &HsCase, preset: Preset) {
    let case = format!("{} [{preset:?}, aio connect]", c.name);
    let (peer, fd) = Peer::start(hs_script(c, preset));
    let h = create(preset, false);
    // SAFETY: `h` is live; the handle takes ownership of `fd`.
    let r = unsafe { nbd_aio_connect_socket(h, fd) };
    assert_eq!(r, 0, "{case}: {:?}", last_error());
    pump(h, &case, || is_dead(h));
    check_refused(h, &case);
    close(h, peer, &[], &case);
}

/// Opt mode: a violation before the client rests fails the connect; one
/// in answer to `opt_go` (or `opt_list`) fails that, through its
/// completion callback, with EPROTO, and frees its callbacks once.
fn hs_opt(c: &HsCase, preset: Preset) {
    let case = format!("{} [{preset:?}, opt mode]", c.name);
    let (h, peer, r, errno) = try_connect(hs_script(c, preset), true);
    let later = matches!(c.at, opt::GO | opt::SET_META_CONTEXT | opt::LIST);
    if !later {
        assert_eq!((r, errno), (-1, EPROTO), "{case}: {:?}", last_error());
        assert!(is_dead(h), "{case}: the handle is not dead");
        close(h, peer, &[], &case);
        return;
    }
    assert_eq!(r, 0, "{case}: {:?}", last_error());
    // SAFETY: `h` is live.
    assert_eq!(unsafe { nbd_aio_is_negotiating(h) }, 1, "{case}");
    let p = Probe::new(false);
    // SAFETY: `h` is live; the probe outlives the handle.
    let r = unsafe {
        if c.at == opt::LIST {
            nbd_aio_opt_list(h, p.list(), p.completion())
        } else {
            nbd_aio_opt_go(h, p.completion())
        }
    };
    assert_eq!(r, 0, "{case}: {:?}", last_error());
    pump(h, &case, || p.calls() > 0);
    assert_eq!((p.calls(), p.errno()), (1, EPROTO), "{case}: the option's completion");
    assert_eq!(p.freed(), 1, "{case}: the option's completion callback is freed once it ran");
    assert!(is_dead(h), "{case}: the handle is not dead");
    close(h, peer, &[&p], &case);
    assert_eq!(p.aux_freed(), usize::from(c.at == opt::LIST), "{case}: the list callback");
}

#[test]
fn handshake_garbage() {
    let mut n = 0;
    for c in HS_CASES {
        for &preset in c.presets {
            if c.at != opt::LIST {
                hs_sync(c, preset);
                hs_aio(c, preset);
                n += 2;
            }
            hs_opt(c, preset);
            n += 1;
        }
    }
    report("handshake garbage (connect, aio connect, opt mode)", n, 150);
}

// ---- a cut after any byte ---------------------------------------------------------------

/// Small commands, so that every byte of their replies can be a cut.
fn small_flight(h: H, preset: Preset) -> Vec<Cmd> {
    let mut roles = vec![Role::Read];
    if preset.structured() {
        roles.extend([Role::Df, Role::Bs]);
    }
    roles.extend([Role::Flush, Role::Write, Role::Trim]);
    roles.into_iter().map(|r| submit_sized(h, r, 64)).collect()
}

/// Where the server's complete output to a client ends each part: the
/// handshake, each command's reply (by cookie), and each message (a
/// simple reply with its data, or one chunk).
struct Layout {
    hs_end: usize,
    ends: HashMap<u64, usize>,
    messages: Vec<usize>,
    total: usize,
}

impl Layout {
    fn of(r: &Report) -> Layout {
        let hs_end = r.hs_end.expect("the handshake ended");
        let ends: HashMap<u64, usize> = r.reply_ends.iter().copied().collect();
        let (out, mut at, mut messages) = (&r.output, hs_end, vec![hs_end]);
        while at < out.len() {
            let magic = u32::from_be_bytes(out[at..at + 4].try_into().unwrap());
            let size = ReplyHeader::size_for_magic(magic).expect("the server's own replies are valid");
            at += size
                + match ReplyHeader::decode(&out[at..at + size]) {
                    Some(ReplyHeader::Chunk(c)) => c.length as usize,
                    Some(ReplyHeader::Simple { cookie, .. }) => {
                        let req = r.requests.iter().find(|q| q.cookie == cookie).expect("a reply to a request");
                        if req.kind == cmd::READ {
                            req.length as usize
                        } else {
                            0
                        }
                    }
                    None => unreachable!("a header of a known magic decodes"),
                };
            messages.push(at);
        }
        assert_eq!(at, out.len(), "the output is whole messages");
        assert!(ends.values().all(|e| messages.contains(e)), "replies end at message boundaries");
        Layout { hs_end, ends, messages, total: out.len() }
    }

    /// Whether a cut after `k` bytes falls between two messages: between
    /// replies, or between two chunks of one (where the core, as libnbd,
    /// sees the server hang up before a header and closes the handle).
    fn between(&self, k: usize) -> bool {
        self.messages.contains(&k)
    }
}

/// The AIO client against a server cut after `budget` bytes: the
/// handshake fails with the handle dead, or the small flight runs, and the
/// commands whose replies were whole succeed while the rest fail with
/// ENOTCONN; the handle is closed if the cut fell between replies, dead
/// if inside one. `None` gives the layout of the uncut conversation.
fn cut_aio(preset: Preset, budget: Option<usize>, layout: Option<&Layout>) -> Report {
    let k = budget.unwrap_or(usize::MAX);
    let case = format!("AIO flight, output cut after {k} bytes [{preset:?}]");
    let (h, peer, r, errno) = try_connect(Script { budget: k, ..Script::serve(preset) }, false);
    if r == -1 {
        let l = layout.expect("the uncut conversation connects");
        assert!(k < l.hs_end, "{case}: connect failed after the handshake ended at {}: {:?}", l.hs_end, last_error());
        // libnbd reports a server that hangs up mid-handshake with no errno.
        assert_eq!(errno, 0, "{case}: {:?}", last_error());
        assert!(is_dead(h), "{case}: the handle is not dead");
        check_refused(h, &case);
        return close(h, peer, &[], &case);
    }
    let cmds = small_flight(h, preset);
    pump(h, &case, all_completed(&cmds));
    if let Some(l) = layout {
        assert!(k >= l.hs_end, "{case}: connected although the handshake was cut at {}", l.hs_end);
        for c in &cmds {
            let whole = l.ends[&c.cookie] <= k;
            check_completed(h, c, if whole { 0 } else { ENOTCONN }, &case);
        }
        if k >= l.total {
            assert!(!is_dead(h), "{case}: dead after a whole conversation");
        } else if l.between(k) {
            assert!(is_closed(h), "{case}: a cut between replies closes the handle");
            check_refused(h, &case);
        } else {
            assert!(is_dead(h), "{case}: a cut inside a reply kills the handle");
            check_refused(h, &case);
        }
    } else {
        cmds.iter().for_each(|c| check_completed(h, c, 0, &case));
    }
    let probes: Vec<&Probe> = cmds.iter().map(|c| &*c.probe).collect();
    let r = close(h, peer, &probes, &case);
    for c in &cmds {
        assert_eq!(c.probe.aux_freed(), usize::from(c.aux), "{case}: {:?}: chunk/extent callback", c.role);
    }
    r
}

/// The synchronous client: `nbd_pread` of 64 bytes, then `nbd_flush`,
/// each returning 0 if its reply was whole and -1 with ENOTCONN if not;
/// a call after the handle ended is refused (EINVAL).
fn cut_sync(preset: Preset, budget: Option<usize>, layout: Option<&Layout>) -> Report {
    let k = budget.unwrap_or(usize::MAX);
    let case = format!("pread and flush, output cut after {k} bytes [{preset:?}]");
    let (h, peer, r, errno) = try_connect(Script { budget: k, ..Script::serve(preset) }, false);
    if r == -1 {
        assert!(layout.is_some_and(|l| k < l.hs_end), "{case}: connect: {:?}", last_error());
        assert_eq!(errno, 0, "{case}: {:?}", last_error());
        assert!(is_dead(h), "{case}: the handle is not dead");
        return close(h, peer, &[], &case);
    }
    let mut buf = vec![0xeeu8; 64];
    // SAFETY: `h` is live; `buf` outlives the call.
    let read = unsafe { nbd_pread(h, buf.as_mut_ptr().cast(), 64, 0, 0) };
    let read = (read, if read == -1 { last_error().0 } else { 0 });
    let ended = is_dead(h) || is_closed(h);
    // SAFETY: `h` is live.
    let flush = unsafe { nbd_flush(h, 0) };
    let flush = (flush, if flush == -1 { last_error().0 } else { 0 });
    let Some(l) = layout else {
        assert_eq!((read, flush), ((0, 0), (0, 0)), "{case}: uncut");
        assert_eq!(buf, [0x42; 64], "{case}: the data read");
        return close(h, peer, &[], &case);
    };
    let mut ends: Vec<usize> = l.ends.values().copied().collect();
    ends.sort_unstable();
    let whole = |i: usize| ends[i] <= k;
    assert_eq!(read, if whole(0) { (0, 0) } else { (-1, ENOTCONN) }, "{case}: pread");
    if whole(0) {
        assert_eq!(buf, [0x42; 64], "{case}: the data read");
    } else {
        assert_eq!(buf, [0; 64], "{case}: a failed pread's buffer is zeroed");
    }
    let want = match (whole(1), ended) {
        (true, _) => (0, 0),
        (false, true) => (-1, EINVAL),
        (false, false) => (-1, ENOTCONN),
    };
    assert_eq!(flush, want, "{case}: flush: {:?}", last_error());
    if k < l.total {
        assert!(is_dead(h) || is_closed(h), "{case}: the handle is still connected");
        assert_eq!(is_closed(h), l.between(k), "{case}: closed (between replies) or dead (inside one)");
    }
    close(h, peer, &[], &case)
}

#[test]
fn a_cut_after_every_byte() {
    let mut n = 0;
    for preset in ALL.iter().copied() {
        for run in [cut_aio, cut_sync] {
            let layout = Layout::of(&run(preset, None, None));
            assert!(layout.hs_end > 0 && layout.total > layout.hs_end, "{preset:?}");
            for k in 0..=layout.total {
                run(preset, Some(k), Some(&layout));
                n += 1;
            }
        }
    }
    report("a cut after every byte of the output (aio and sync)", n, 1000);
}

// ---- stalls -------------------------------------------------------------------------------

/// The first 100 bytes of a valid answer to the 4096-byte read at 0.
fn half_a_read(f: &Flight) -> Vec<u8> {
    f.read_reply()[..100].to_vec()
}

/// Polls until a poll times out; the handle must still be waiting.
fn poll_until_quiet(h: H, case: &str) {
    let start = Instant::now();
    // SAFETY: `h` is live.
    while unsafe { nbd_poll(h, 50) } != 0 {
        assert!(start.elapsed() < PATIENCE, "{case}: nbd_poll never timed out");
    }
    // SAFETY: `h` is live.
    assert_eq!(unsafe { nbd_poll(h, 20) }, 0, "{case}: a stalled server, yet something happened");
    assert!(!is_dead(h) && !is_closed(h), "{case}: a stall is not an error");
}

/// `nbd_close` must not wait for a stalled server.
fn close_quickly(h: H, peer: Peer, probes: &[&Probe], case: &str) {
    let start = Instant::now();
    close(h, peer, probes, case);
    assert!(start.elapsed() < Duration::from_secs(2), "{case}: nbd_close took {:?}", start.elapsed());
}

/// The server stalls with every command in flight (before any reply, or
/// inside the first): polls time out, nothing completes, and `nbd_close`
/// fails every command, as libnbd 1.22 does: its completion callback runs
/// once with ENOTCONN, then every callback is freed once.
fn stall_in_flight(preset: Preset, mid_reply: bool, n: &mut usize) {
    let case = format!("stall with commands in flight, mid-reply {mid_reply} [{preset:?}]");
    let roles = flight_roles(preset);
    let script = if mid_reply {
        Script::inject(preset, roles.len(), Box::new(half_a_read), Then::Hold)
    } else {
        Script::stall(preset)
    };
    let (h, peer) = connect(script, &case);
    let cmds: Vec<Cmd> = roles.iter().map(|&r| submit(h, r)).collect();
    poll_until_quiet(h, &case);
    // SAFETY: `h` is live.
    assert_eq!(unsafe { nbd_aio_in_flight(h) }, cmds.len() as c_int, "{case}");
    // Waiting for a reply to start is READY in libnbd's terms (commands in
    // flight at the server); inside a reply it is processing.
    // SAFETY: `h` is live.
    let (ready, processing) = unsafe { (nbd_aio_is_ready(h), nbd_aio_is_processing(h)) };
    assert_eq!((ready, processing), (c_int::from(!mid_reply), c_int::from(mid_reply)), "{case}: ready, processing");
    for c in &cmds {
        // SAFETY: `h` is live.
        assert_eq!(unsafe { nbd_aio_command_completed(h, c.cookie) }, 0, "{case}: {:?} in flight", c.role);
        assert_eq!((c.probe.calls(), c.probe.freed()), (0, 0), "{case}: {:?}", c.role);
    }
    let probes: Vec<&Probe> = cmds.iter().map(|c| &*c.probe).collect();
    close_quickly(h, peer, &probes, &case);
    for c in &cmds {
        let completion = (c.probe.calls(), c.probe.errno());
        assert_eq!(completion, (1, ENOTCONN), "{case}: {:?}: completion at nbd_close", c.role);
        assert_eq!(c.probe.aux_freed(), usize::from(c.aux), "{case}: {:?}", c.role);
    }
    *n += 1;
}

/// The server stalls; `nbd_shutdown` sends NBD_CMD_DISC, which the server
/// takes as its cue to hang up: the call returns, the handle is closed,
/// and every command failed with ENOTCONN.
fn stall_then_shutdown(preset: Preset, flags: u32, n: &mut usize) {
    let case = format!("stall, then nbd_shutdown({flags:#x}) [{preset:?}]");
    let (h, peer) = connect(Script::stall(preset), &case);
    let cmds: Vec<Cmd> = flight_roles(preset).into_iter().map(|r| submit(h, r)).collect();
    poll_until_quiet(h, &case);
    // SAFETY: `h` is live.
    let r = unsafe { nbd_shutdown(h, flags) };
    assert_eq!(r, 0, "{case}: {:?}", last_error());
    assert!(is_closed(h), "{case}: the handle is not closed");
    cmds.iter().for_each(|c| check_completed(h, c, ENOTCONN, &case));
    check_refused(h, &case);
    let probes: Vec<&Probe> = cmds.iter().map(|c| &*c.probe).collect();
    let report = close(h, peer, &probes, &case);
    assert_eq!(report.requests.last().map(|q| q.kind), Some(cmd::DISC), "{case}: DISC was sent last");
    *n += 1;
}

/// A synchronous call meets a server that stalls, before or inside its
/// reply, then hangs up: it returns -1 with ENOTCONN once the server is
/// gone (not before), and the handle is closed, or dead inside a reply.
fn stall_then_cut_sync(preset: Preset, mid_reply: bool, n: &mut usize) {
    let case = format!("nbd_pread against a stall, then a cut, mid-reply {mid_reply} [{preset:?}]");
    let pause = Duration::from_millis(150);
    let bytes: Craft = if mid_reply { Box::new(half_a_read) } else { Box::new(|_| Vec::new()) };
    let (h, peer) = connect(Script::inject(preset, 1, bytes, Then::CloseAfter(pause)), &case);
    let start = Instant::now();
    let (r, errno) = sync_call(h, Role::Read, &Probe::default());
    assert!(start.elapsed() >= pause, "{case}: returned before the server hung up");
    assert_eq!((r, errno), (-1, ENOTCONN), "{case}: {:?}", last_error());
    assert_eq!(is_dead(h), mid_reply, "{case}: dead inside a reply");
    assert_eq!(is_closed(h), !mid_reply, "{case}: closed between replies");
    check_refused(h, &case);
    close(h, peer, &[], &case);
    *n += 1;
}

/// The server stalls in the handshake: `nbd_aio_connect_socket` polls time
/// out and `nbd_close` is immediate; `nbd_connect_socket` returns -1 (no
/// errno, as libnbd) once the server hangs up; in opt mode a stalled
/// `opt_go` has its callback freed, uncalled, by `nbd_close`.
fn stall_in_handshake(preset: Preset, n: &mut usize) {
    let case = format!("stall after the greeting, aio connect [{preset:?}]");
    let (peer, fd) = Peer::start(Script { greeting: Some(greeting(3)), ..Script::serve(preset) });
    let h = create(preset, false);
    // SAFETY: `h` is live; the handle takes ownership of `fd`.
    assert_eq!(unsafe { nbd_aio_connect_socket(h, fd) }, 0, "{case}");
    poll_until_quiet(h, &case);
    // SAFETY: `h` is live.
    assert_eq!(unsafe { nbd_aio_is_connecting(h) }, 1, "{case}");
    close_quickly(h, peer, &[], &case);

    let case = format!("stall after the greeting, then a cut, connect [{preset:?}]");
    let pause = Duration::from_millis(100);
    let script = Script { greeting: Some(greeting(3)), then: Then::CloseAfter(pause), ..Script::serve(preset) };
    let start = Instant::now();
    let (h, peer, r, errno) = try_connect(script, false);
    assert!(start.elapsed() >= pause, "{case}: returned before the server hung up");
    assert_eq!((r, errno), (-1, 0), "{case}: {:?}", last_error());
    assert!(is_dead(h), "{case}: the handle is not dead");
    close(h, peer, &[], &case);

    let case = format!("stall in answer to opt_go [{preset:?}]");
    let script = Script { intercept: Some((opt::GO, |_| Vec::new())), ..Script::serve(preset) };
    let (h, peer, r, _) = try_connect(script, true);
    assert_eq!(r, 0, "{case}: {:?}", last_error());
    let p = Probe::new(false);
    // SAFETY: `h` is live; the probe outlives the handle.
    assert_eq!(unsafe { nbd_aio_opt_go(h, p.completion()) }, 0, "{case}");
    poll_until_quiet(h, &case);
    assert_eq!(p.calls(), 0, "{case}");
    close_quickly(h, peer, &[&p], &case);
    assert_eq!(p.calls(), 0, "{case}: completion called by nbd_close");
    *n += 3;
}

#[test]
fn stalls() {
    let mut n = 0;
    for &preset in ALL {
        stall_in_flight(preset, false, &mut n);
        stall_in_flight(preset, true, &mut n);
        stall_then_shutdown(preset, 0, &mut n);
        stall_then_shutdown(preset, SHUTDOWN_ABANDON_PENDING, &mut n);
        stall_then_cut_sync(preset, false, &mut n);
        stall_then_cut_sync(preset, true, &mut n);
        stall_in_handshake(preset, &mut n);
    }
    report("stalls", n, 27);
}
