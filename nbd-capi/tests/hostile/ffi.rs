//! The C functions under test, declared as a C program sees them in
//! `libnbd.h` and resolved against the `nbd` crate's `#[no_mangle]`
//! exports (the test links the crate through its callback types), and
//! callbacks whose every call and every `free` is counted.

#![allow(dead_code)]

use nbd::callbacks::{nbd_chunk_callback, nbd_completion_callback, nbd_extent_callback, nbd_list_callback};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering::SeqCst};

/// `struct nbd_handle *`, opaque as C sees it.
#[repr(C)]
pub struct NbdHandle {
    _opaque: [u8; 0],
}
pub type H = *mut NbdHandle;

pub const CMD_FLAG_DF: u32 = 4;
pub const CMD_FLAG_REQ_ONE: u32 = 8;
pub const SHUTDOWN_ABANDON_PENDING: u32 = 0x10000;

// The declarations of libnbd.h, in short: `Cb` is the completion callback.
type Cb = nbd_completion_callback;
type ChunkCb = nbd_chunk_callback;
type ExtentCb = nbd_extent_callback;

extern "C" {
    pub fn nbd_create() -> H;
    pub fn nbd_close(h: H);
    pub fn nbd_get_errno() -> c_int;
    pub fn nbd_get_error() -> *const c_char;
    pub fn nbd_set_export_name(h: H, name: *const c_char) -> c_int;
    pub fn nbd_add_meta_context(h: H, name: *const c_char) -> c_int;
    pub fn nbd_set_opt_mode(h: H, v: bool) -> c_int;
    pub fn nbd_connect_socket(h: H, sock: c_int) -> c_int;
    pub fn nbd_aio_connect_socket(h: H, sock: c_int) -> c_int;
    pub fn nbd_get_structured_replies_negotiated(h: H) -> c_int;
    pub fn nbd_aio_opt_go(h: H, cb: Cb) -> c_int;
    pub fn nbd_aio_opt_list(h: H, list: nbd_list_callback, cb: Cb) -> c_int;
    pub fn nbd_aio_pread(h: H, buf: *mut c_void, n: usize, off: u64, cb: Cb, flags: u32) -> i64;
    pub fn nbd_aio_pread_structured(h: H, b: *mut c_void, n: usize, o: u64, c: ChunkCb, cb: Cb, f: u32) -> i64;
    pub fn nbd_aio_pwrite(h: H, buf: *const c_void, n: usize, off: u64, cb: Cb, flags: u32) -> i64;
    pub fn nbd_aio_flush(h: H, cb: Cb, flags: u32) -> i64;
    pub fn nbd_aio_trim(h: H, n: u64, off: u64, cb: Cb, flags: u32) -> i64;
    pub fn nbd_aio_zero(h: H, n: u64, off: u64, cb: Cb, flags: u32) -> i64;
    pub fn nbd_aio_cache(h: H, n: u64, off: u64, cb: Cb, flags: u32) -> i64;
    pub fn nbd_aio_block_status(h: H, n: u64, off: u64, extent: ExtentCb, cb: Cb, flags: u32) -> i64;
    pub fn nbd_pread(h: H, buf: *mut c_void, n: usize, off: u64, flags: u32) -> c_int;
    pub fn nbd_pread_structured(h: H, buf: *mut c_void, n: usize, off: u64, chunk: ChunkCb, flags: u32) -> c_int;
    pub fn nbd_pwrite(h: H, buf: *const c_void, n: usize, off: u64, flags: u32) -> c_int;
    pub fn nbd_flush(h: H, flags: u32) -> c_int;
    pub fn nbd_trim(h: H, n: u64, off: u64, flags: u32) -> c_int;
    pub fn nbd_zero(h: H, n: u64, off: u64, flags: u32) -> c_int;
    pub fn nbd_cache(h: H, n: u64, off: u64, flags: u32) -> c_int;
    pub fn nbd_block_status(h: H, n: u64, off: u64, extent: ExtentCb, flags: u32) -> c_int;
    pub fn nbd_poll(h: H, timeout: c_int) -> c_int;
    pub fn nbd_aio_command_completed(h: H, cookie: u64) -> c_int;
    pub fn nbd_aio_in_flight(h: H) -> c_int;
    pub fn nbd_aio_is_connecting(h: H) -> c_int;
    pub fn nbd_aio_is_negotiating(h: H) -> c_int;
    pub fn nbd_aio_is_ready(h: H) -> c_int;
    pub fn nbd_aio_is_processing(h: H) -> c_int;
    pub fn nbd_aio_is_closed(h: H) -> c_int;
    pub fn nbd_aio_is_dead(h: H) -> c_int;
    pub fn nbd_shutdown(h: H, flags: u32) -> c_int;
}

/// `nbd_get_errno()` and `nbd_get_error()` of this thread.
pub fn last_error() -> (c_int, String) {
    // SAFETY: both read this thread's last error; the message is NULL or
    // NUL-terminated and lives until the next call on this thread.
    unsafe {
        let msg = nbd_get_error();
        let text = if msg.is_null() { String::new() } else { CStr::from_ptr(msg).to_string_lossy().into_owned() };
        (nbd_get_errno(), text)
    }
}

/// What happened to the callbacks of one command (or one `opt_*` call).
/// The completion callback and the other callback (chunk, extent or
/// list) are counted apart; a call after the matching `free` is counted
/// as `late`.
#[derive(Default)]
pub struct Probe {
    pub calls: AtomicUsize,
    pub errno: AtomicI32,
    pub freed: AtomicUsize,
    pub aux_calls: AtomicUsize,
    pub aux_freed: AtomicUsize,
    pub late: AtomicUsize,
    /// The completion callback returns 1 (auto-retire) instead of 0.
    pub retire: bool,
}

impl Probe {
    pub fn new(retire: bool) -> Box<Probe> {
        Box::new(Probe { retire, ..Probe::default() })
    }

    fn user_data(&self) -> *mut c_void {
        self as *const Probe as *mut c_void
    }

    pub fn completion(&self) -> nbd_completion_callback {
        nbd_completion_callback { callback: Some(on_complete), user_data: self.user_data(), free: Some(on_free) }
    }

    pub fn chunk(&self) -> nbd_chunk_callback {
        nbd_chunk_callback { callback: Some(on_chunk), user_data: self.user_data(), free: Some(on_aux_free) }
    }

    pub fn extent(&self) -> nbd_extent_callback {
        nbd_extent_callback { callback: Some(on_extent), user_data: self.user_data(), free: Some(on_aux_free) }
    }

    pub fn list(&self) -> nbd_list_callback {
        nbd_list_callback { callback: Some(on_list), user_data: self.user_data(), free: Some(on_aux_free) }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
    pub fn errno(&self) -> i32 {
        self.errno.load(SeqCst)
    }
    pub fn freed(&self) -> usize {
        self.freed.load(SeqCst)
    }
    pub fn aux_freed(&self) -> usize {
        self.aux_freed.load(SeqCst)
    }
    pub fn late(&self) -> usize {
        self.late.load(SeqCst)
    }
}

/// # Safety
/// `ud` is a live `Probe` (the tests keep every probe until after `nbd_close`).
unsafe fn probe<'a>(ud: *mut c_void) -> &'a Probe {
    // SAFETY: per the function's contract.
    unsafe { &*(ud as *const Probe) }
}

/// # Safety
/// `ud` is the user data of a probe's callback: a live [`Probe`].
unsafe extern "C" fn on_complete(ud: *mut c_void, error: *mut c_int) -> c_int {
    // SAFETY: the user data of a probe's callback is the probe; `error`
    // points at the command's errno for the duration of the call.
    let (p, e) = unsafe { (probe(ud), *error) };
    if p.freed.load(SeqCst) > 0 {
        p.late.fetch_add(1, SeqCst);
    }
    p.calls.fetch_add(1, SeqCst);
    p.errno.store(e, SeqCst);
    c_int::from(p.retire)
}

/// # Safety
/// `ud` is the user data of a probe's callback: a live [`Probe`].
unsafe extern "C" fn on_free(ud: *mut c_void) {
    // SAFETY: as for `on_complete`.
    unsafe { probe(ud) }.freed.fetch_add(1, SeqCst);
}

/// # Safety
/// `ud` is the user data of a probe's callback: a live [`Probe`].
unsafe extern "C" fn on_aux_free(ud: *mut c_void) {
    // SAFETY: as for `on_complete`.
    unsafe { probe(ud) }.aux_freed.fetch_add(1, SeqCst);
}

fn aux_call(ud: *mut c_void) -> c_int {
    // SAFETY: called only by the callbacks above, with their user data.
    let p = unsafe { probe(ud) };
    if p.aux_freed.load(SeqCst) > 0 {
        p.late.fetch_add(1, SeqCst);
    }
    p.aux_calls.fetch_add(1, SeqCst);
    0
}

/// # Safety
/// `ud` is the user data of a probe's callback: a live [`Probe`].
unsafe extern "C" fn on_chunk(
    ud: *mut c_void,
    _buf: *const c_void,
    _count: usize,
    _offset: u64,
    _status: c_uint,
    _error: *mut c_int,
) -> c_int {
    aux_call(ud)
}

/// # Safety
/// `ud` is the user data of a probe's callback: a live [`Probe`].
unsafe extern "C" fn on_extent(
    ud: *mut c_void,
    _context: *const c_char,
    _offset: u64,
    _entries: *mut u32,
    _n: usize,
    _error: *mut c_int,
) -> c_int {
    aux_call(ud)
}

/// # Safety
/// `ud` is the user data of a probe's callback: a live [`Probe`].
unsafe extern "C" fn on_list(ud: *mut c_void, _name: *const c_char, _description: *const c_char) -> c_int {
    aux_call(ud)
}
