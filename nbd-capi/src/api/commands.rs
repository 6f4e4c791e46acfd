//! Commands, synchronous and asynchronous, and the AIO event loop calls.

use super::{arg_str_list, cmd_flags};
use crate::boundary::export;
use crate::callbacks::*;
use crate::error::{CError, CResult};
use crate::handle::{nbd_handle, Callbacks, Command, Handle, Locked, UserBuf};
use crate::trace::{Fun, Hex, ReadBuf, WriteBuf};
use nbd_proto::{Connection, Cookie, Error};
use std::ffi::{c_char, c_int, c_uint, c_void};

/// Submits one command and returns its cookie (see `Handle::submit`).
fn submit(
    i: &mut Handle,
    what: &'static str,
    cbs: Callbacks,
    read_into: Option<(*mut u8, usize)>,
    offset: u64,
    issue: impl FnOnce(&mut Connection<UserBuf>) -> Result<Cookie, Error>,
) -> CResult<i64> {
    let mut command = Command::new(what, cbs, offset);
    if let Some((buf, len)) = read_into {
        command = command.reading_into(buf, len, i.settings().pread_initialize);
    }
    Ok(i.submit(command, issue)? as i64)
}

/// Waits for `cookie` and retires it.
fn wait(i: &mut Locked<'_>, cookie: i64) -> CResult<c_int> {
    let cookie = cookie as u64;
    Handle::wait_for(i, cookie)?;
    retire(i, cookie).map(|_| 0)
}

/// 1 and retired if `cookie` completed well; its error if it failed; 0 if
/// still in flight, and (as libnbd 1.14 does) 0 for a cookie it does not
/// know, such as one already retired.
fn retire(i: &mut Handle, cookie: u64) -> CResult<c_int> {
    match i.retire(cookie) {
        Some(outcome) => outcome.map(|()| 1),
        None => Ok(0),
    }
}

/// A read's buffer. `set_pread_initialize` is honoured when the read
/// completes: a successful read has written every byte (the core checks
/// that the reply covers the request, and zero-fills holes), so only a
/// failed one is zeroed, and no read pays for a memset it overwrites.
fn read_buf(buf: *mut c_void, count: usize) -> CResult<UserBuf> {
    if buf.is_null() && count > 0 {
        return Err(CError::new(libc::EFAULT, "buf cannot be NULL"));
    }
    Ok(UserBuf::read(buf.cast(), count))
}

/// libnbd zeroes a read's buffer "prior to checking for any other errors"
/// (`set_pread_initialize`), so a read refused before it was submitted
/// (a dead or closed handle, bad flags) leaves no stale bytes behind
/// either; a submitted read that fails was zeroed when it completed. Only
/// a failed call pays for the memset. Returns `r`.
fn initialize_refused<R: PartialEq + From<i8>>(h: *mut nbd_handle, buf: *mut c_void, count: usize, r: R) -> R {
    if r != R::from(-1) || buf.is_null() || count == 0 {
        return r;
    }
    // SAFETY: as in the export that failed: NULL or a live handle.
    let Some(handle) = (unsafe { h.as_ref() }) else { return r };
    if handle.lock().settings().pread_initialize {
        // SAFETY: the caller's buffer of `count` bytes, writable by the
        // read's contract; the call failed, so it is the caller's again.
        unsafe { std::ptr::write_bytes(buf.cast::<u8>(), 0, count) };
    }
    r
}

/// A write's buffer. (The core checks its size against the payload
/// maximum, after the bounds, in libnbd's order.)
fn write_buf(buf: *const c_void, count: usize) -> CResult<UserBuf> {
    if buf.is_null() && count > 0 {
        return Err(CError::new(libc::EFAULT, "buf cannot be NULL"));
    }
    Ok(UserBuf::write(buf.cast(), count))
}

fn completion(c: nbd_completion_callback) -> Callbacks {
    Callbacks { completion: Owned::some(c), ..Callbacks::default() }
}

fn no_callbacks() -> Callbacks {
    Callbacks::default()
}

const ZERO_FLAGS: u32 = crate::constants::LIBNBD_CMD_FLAG_FUA
    | crate::constants::LIBNBD_CMD_FLAG_NO_HOLE
    | crate::constants::LIBNBD_CMD_FLAG_FAST_ZERO;

// ---- asynchronous commands ---------------------------------------------------

#[no_mangle]
pub extern "C" fn nbd_aio_pread(
    h: *mut nbd_handle,
    buf: *mut c_void,
    count: usize,
    offset: u64,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let cbs = completion(cb);
    let r = export!("nbd_aio_pread", h, -1, [buf = ReadBuf, count, offset, completion = cb, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, 0)?;
        let b = read_buf(buf, count)?;
        submit(i, "read", cbs, Some((buf.cast(), count)), offset, |c| c.read(offset, b, f))
    });
    initialize_refused(h, buf, count, r)
}

#[no_mangle]
pub extern "C" fn nbd_aio_pread_structured(
    h: *mut nbd_handle,
    buf: *mut c_void,
    count: usize,
    offset: u64,
    chunk: nbd_chunk_callback,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let mut cbs = Callbacks { chunk: Owned::some(chunk), ..completion(cb) };
    let r = export!(
        "nbd_aio_pread_structured",
        h,
        -1,
        [buf = ReadBuf, count, offset, chunk = Fun, completion = cb, flags = Hex(flags)],
        |i| {
            required(cbs.chunk.take(), "chunk").map(|c| cbs.chunk = Some(c))?;
            let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_DF)?;
            let b = read_buf(buf, count)?;
            submit(i, "read", cbs, Some((buf.cast(), count)), offset, |c| c.read_structured(offset, b, f))
        }
    );
    initialize_refused(h, buf, count, r)
}

#[no_mangle]
pub extern "C" fn nbd_aio_pwrite(
    h: *mut nbd_handle,
    buf: *const c_void,
    count: usize,
    offset: u64,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let cbs = completion(cb);
    export!(
        "nbd_aio_pwrite",
        h,
        -1,
        [buf = WriteBuf(buf, count), count, offset, completion = cb, flags = Hex(flags)],
        |i| {
            let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_FUA)?;
            let b = write_buf(buf, count)?;
            submit(i, "write", cbs, None, offset, |c| c.write(offset, b, f))
        }
    )
}

#[no_mangle]
pub extern "C" fn nbd_aio_flush(h: *mut nbd_handle, cb: nbd_completion_callback, flags: u32) -> i64 {
    let cbs = completion(cb);
    export!("nbd_aio_flush", h, -1, [completion = cb, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_FUA)?;
        submit(i, "flush", cbs, None, 0, |c| c.flush(f))
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_trim(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let cbs = completion(cb);
    export!("nbd_aio_trim", h, -1, [count, offset, completion = cb, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_FUA)?;
        submit(i, "trim", cbs, None, offset, |c| c.trim(offset, count, f))
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_cache(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let cbs = completion(cb);
    export!("nbd_aio_cache", h, -1, [count, offset, completion = cb, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, 0)?;
        submit(i, "cache", cbs, None, offset, |c| c.cache(offset, count, f))
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_zero(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let cbs = completion(cb);
    export!("nbd_aio_zero", h, -1, [count, offset, completion = cb, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, ZERO_FLAGS)?;
        submit(i, "zero", cbs, None, offset, |c| c.write_zeroes(offset, count, f))
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_block_status(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    extent: nbd_extent_callback,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let mut cbs = Callbacks { extent: Owned::some(extent), ..completion(cb) };
    export!("nbd_aio_block_status", h, -1, [count, offset, extent = Fun, completion = cb, flags = Hex(flags)], |i| {
        required(cbs.extent.take(), "extent").map(|c| cbs.extent = Some(c))?;
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_REQ_ONE)?;
        submit(i, "block-status", cbs, None, offset, |c| c.block_status(offset, count, f))
    })
}

/// The ids the contexts `names` have on the link that carries the
/// command: ids are each connection's own, and every link of a handle
/// negotiated the same names. `lead` are the lead link's ids.
fn link_ids(c: &Connection<UserBuf>, names: &[String], lead: &[u32]) -> Vec<u32> {
    let Some(negotiated) = c.meta_contexts() else { return lead.to_vec() };
    names.iter().zip(lead).map(|(name, &id)| negotiated.iter().find(|m| &m.name == name).map_or(id, |m| m.id)).collect()
}

/// What `block_status_filter` sends: the flags (PAYLOAD_LEN added unless
/// the caller turned `LIBNBD_STRICT_AUTO_FLAG` off) and the ids of the
/// negotiated contexts named in `contexts`, checked in libnbd's order.
fn status_filter(i: &Handle, contexts: &[String], flags: u32) -> CResult<(nbd_proto::CmdFlags, Vec<u32>)> {
    use crate::constants::LIBNBD_CMD_FLAG_PAYLOAD_LEN as PAYLOAD_LEN;
    use nbd_proto::StrictMode;
    let mut f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_REQ_ONE | PAYLOAD_LEN)?;
    if i.conn().config().strict.contains(StrictMode::COMMANDS) {
        if !i.conn().structured_replies_negotiated() {
            return Err(CError::new(libc::ENOTSUP, "server does not support structured replies"));
        }
        if i.conn().meta_contexts().is_none_or(|m| m.is_empty()) {
            return Err(nbd_proto::LocalError::NoMetaContexts.into());
        }
    }
    if i.conn().config().strict.contains(StrictMode::AUTO_FLAG) {
        if !i.conn().extended_headers_negotiated() {
            return Err(CError::new(libc::ENOTSUP, "server does not support extended headers"));
        }
        f |= nbd_proto::CmdFlags::PAYLOAD_LEN;
    }
    if i.conn().config().strict.contains(StrictMode::COMMANDS) {
        if !i.conn().export().flags.contains(nbd_proto::TransmissionFlags::BLOCK_STAT_PAYLOAD) {
            return Err(CError::new(libc::EINVAL, "server does not support the block status payload flag"));
        }
        if !f.contains(nbd_proto::CmdFlags::PAYLOAD_LEN) {
            return Err(CError::new(libc::EINVAL, "incorrect setting for PAYLOAD_LEN flag"));
        }
    }
    let negotiated = i.conn().meta_contexts().unwrap_or_default();
    let ids = contexts
        .iter()
        .map(|name| {
            negotiated
                .iter()
                .find(|m| &m.name == name)
                .map(|m| m.id)
                .ok_or_else(|| CError::new(libc::EINVAL, format!("context {name} not negotiated")))
        })
        .collect::<CResult<Vec<u32>>>()?;
    Ok((f, ids))
}

#[no_mangle]
pub extern "C" fn nbd_aio_block_status_64(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    extent64: nbd_extent64_callback,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let mut cbs = Callbacks { extent64: Owned::some(extent64), ..completion(cb) };
    export!(
        "nbd_aio_block_status_64",
        h,
        -1,
        [count, offset, extent64 = Fun, completion = cb, flags = Hex(flags)],
        |i| {
            required(cbs.extent64.take(), "extent64").map(|c| cbs.extent64 = Some(c))?;
            let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_REQ_ONE)?;
            submit(i, "block-status", cbs, None, offset, |c| c.block_status(offset, count, f))
        }
    )
}

#[no_mangle]
pub extern "C" fn nbd_aio_block_status_filter(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    contexts: *mut *mut c_char,
    extent64: nbd_extent64_callback,
    cb: nbd_completion_callback,
    flags: u32,
) -> i64 {
    let mut cbs = Callbacks { extent64: Owned::some(extent64), ..completion(cb) };
    export!(
        "nbd_aio_block_status_filter",
        h,
        -1,
        [count, offset, contexts, extent64 = Fun, completion = cb, flags = Hex(flags)],
        |i| {
            let names = arg_str_list(contexts, "contexts")?;
            required(cbs.extent64.take(), "extent64").map(|c| cbs.extent64 = Some(c))?;
            let (f, ids) = status_filter(i, &names, flags)?;
            submit(i, "block-status", cbs, None, offset, |c| {
                c.block_status_filter(offset, count, &link_ids(c, &names, &ids), f)
            })
        }
    )
}

// ---- synchronous commands -------------------------------------------------------

#[no_mangle]
pub extern "C" fn nbd_pread(h: *mut nbd_handle, buf: *mut c_void, count: usize, offset: u64, flags: u32) -> c_int {
    let r = export!("nbd_pread", h, -1, [buf = ReadBuf, count, offset, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, 0)?;
        let b = read_buf(buf, count)?;
        let c = submit(i, "read", no_callbacks(), Some((buf.cast(), count)), offset, |c| c.read(offset, b, f))?;
        wait(i, c)
    });
    initialize_refused(h, buf, count, r)
}

#[no_mangle]
pub extern "C" fn nbd_pread_structured(
    h: *mut nbd_handle,
    buf: *mut c_void,
    count: usize,
    offset: u64,
    chunk: nbd_chunk_callback,
    flags: u32,
) -> c_int {
    let mut cbs = Callbacks { chunk: Owned::some(chunk), ..Callbacks::default() };
    let r =
        export!("nbd_pread_structured", h, -1, [buf = ReadBuf, count, offset, chunk = Fun, flags = Hex(flags)], |i| {
            required(cbs.chunk.take(), "chunk").map(|c| cbs.chunk = Some(c))?;
            let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_DF)?;
            let b = read_buf(buf, count)?;
            let c = submit(i, "read", cbs, Some((buf.cast(), count)), offset, |c| c.read_structured(offset, b, f))?;
            wait(i, c)
        });
    initialize_refused(h, buf, count, r)
}

#[no_mangle]
pub extern "C" fn nbd_pwrite(h: *mut nbd_handle, buf: *const c_void, count: usize, offset: u64, flags: u32) -> c_int {
    export!("nbd_pwrite", h, -1, [buf = WriteBuf(buf, count), count, offset, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_FUA)?;
        let b = write_buf(buf, count)?;
        let c = submit(i, "write", no_callbacks(), None, offset, |c| c.write(offset, b, f))?;
        wait(i, c)
    })
}

#[no_mangle]
pub extern "C" fn nbd_flush(h: *mut nbd_handle, flags: u32) -> c_int {
    export!("nbd_flush", h, -1, [flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_FUA)?;
        let c = submit(i, "flush", no_callbacks(), None, 0, |c| c.flush(f))?;
        wait(i, c)
    })
}

#[no_mangle]
pub extern "C" fn nbd_trim(h: *mut nbd_handle, count: u64, offset: u64, flags: u32) -> c_int {
    export!("nbd_trim", h, -1, [count, offset, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_FUA)?;
        let c = submit(i, "trim", no_callbacks(), None, offset, |c| c.trim(offset, count, f))?;
        wait(i, c)
    })
}

#[no_mangle]
pub extern "C" fn nbd_cache(h: *mut nbd_handle, count: u64, offset: u64, flags: u32) -> c_int {
    export!("nbd_cache", h, -1, [count, offset, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, 0)?;
        let c = submit(i, "cache", no_callbacks(), None, offset, |c| c.cache(offset, count, f))?;
        wait(i, c)
    })
}

#[no_mangle]
pub extern "C" fn nbd_zero(h: *mut nbd_handle, count: u64, offset: u64, flags: u32) -> c_int {
    export!("nbd_zero", h, -1, [count, offset, flags = Hex(flags)], |i| {
        let f = cmd_flags(i, flags, ZERO_FLAGS)?;
        let c = submit(i, "zero", no_callbacks(), None, offset, |c| c.write_zeroes(offset, count, f))?;
        wait(i, c)
    })
}

#[no_mangle]
pub extern "C" fn nbd_block_status(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    extent: nbd_extent_callback,
    flags: u32,
) -> c_int {
    let mut cbs = Callbacks { extent: Owned::some(extent), ..Callbacks::default() };
    export!("nbd_block_status", h, -1, [count, offset, extent = Fun, flags = Hex(flags)], |i| {
        required(cbs.extent.take(), "extent").map(|c| cbs.extent = Some(c))?;
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_REQ_ONE)?;
        let c = submit(i, "block-status", cbs, None, offset, |c| c.block_status(offset, count, f))?;
        wait(i, c)
    })
}

#[no_mangle]
pub extern "C" fn nbd_block_status_64(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    extent64: nbd_extent64_callback,
    flags: u32,
) -> c_int {
    let mut cbs = Callbacks { extent64: Owned::some(extent64), ..Callbacks::default() };
    export!("nbd_block_status_64", h, -1, [count, offset, extent64 = Fun, flags = Hex(flags)], |i| {
        required(cbs.extent64.take(), "extent64").map(|c| cbs.extent64 = Some(c))?;
        let f = cmd_flags(i, flags, crate::constants::LIBNBD_CMD_FLAG_REQ_ONE)?;
        let c = submit(i, "block-status", cbs, None, offset, |c| c.block_status(offset, count, f))?;
        wait(i, c)
    })
}

#[no_mangle]
pub extern "C" fn nbd_block_status_filter(
    h: *mut nbd_handle,
    count: u64,
    offset: u64,
    contexts: *mut *mut c_char,
    extent64: nbd_extent64_callback,
    flags: u32,
) -> c_int {
    let mut cbs = Callbacks { extent64: Owned::some(extent64), ..Callbacks::default() };
    export!("nbd_block_status_filter", h, -1, [count, offset, contexts, extent64 = Fun, flags = Hex(flags)], |i| {
        let names = arg_str_list(contexts, "contexts")?;
        required(cbs.extent64.take(), "extent64").map(|c| cbs.extent64 = Some(c))?;
        let (f, ids) = status_filter(i, &names, flags)?;
        let c = submit(i, "block-status", cbs, None, offset, |c| {
            c.block_status_filter(offset, count, &link_ids(c, &names, &ids), f)
        })?;
        wait(i, c)
    })
}

// ---- disconnecting -----------------------------------------------------------------

#[no_mangle]
pub extern "C" fn nbd_aio_disconnect(h: *mut nbd_handle, flags: u32) -> c_int {
    export!("nbd_aio_disconnect", h, -1, [flags = Hex(flags)], |i| {
        if flags != 0 {
            return Err(CError::new(libc::EINVAL, format!("flags: invalid value for flag: {flags:#x}")));
        }
        i.disconnect()?;
        i.notify_write();
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_shutdown(h: *mut nbd_handle, flags: u32) -> c_int {
    export!("nbd_shutdown", h, -1, [flags = Hex(flags)], |i| {
        if flags & !crate::constants::LIBNBD_SHUTDOWN_ABANDON_PENDING != 0 {
            return Err(CError::new(libc::EINVAL, format!("flags: invalid value for flag: {flags:#x}")));
        }
        // Still negotiating (libnbd 1.22): end it as opt_abort does.
        if i.state() == nbd_proto::PublicState::Negotiating {
            return super::opt::abort(i);
        }
        if flags & crate::constants::LIBNBD_SHUTDOWN_ABANDON_PENDING != 0 {
            // Requests not yet sent fail (ENOTCONN); those sent are answered.
            i.abandon_unsent();
        }
        match i.disconnect() {
            Ok(()) => {}
            Err(nbd_proto::Error::Local(nbd_proto::LocalError::AfterDisconnect)) => {}
            Err(e) => return Err(e.into()),
        }
        i.run_until(|i| matches!(i.state(), nbd_proto::PublicState::Closed | nbd_proto::PublicState::Dead))
            .or_else(|e| if e.errno == libc::ENOTCONN { Ok(()) } else { Err(e) })?;
        Ok(0)
    })
}

// ---- the AIO loop ---------------------------------------------------------------------

/// libnbd refuses socket events (0 = readable, 1 = writable) where no
/// socket is being serviced: before connecting and once the connection is
/// over. While connected they are accepted in any direction: with sends
/// batched, a caller may see both directions ready and service both.
fn no_socket_event(i: &Handle, event: u32) -> CResult<()> {
    use crate::table::{CLOSED, CREATED, DEAD};
    let state = i.public_state();
    // libnbd refuses a write event where nothing waits to be sent (READY,
    // say): its state machine takes it only in the states that send. One
    // announced by aio_get_direction is still welcome after a read event
    // sent everything (a loop that serves POLLIN, then POLLOUT).
    // A multi-conn handle's epoll instance takes either event: each
    // services whichever links are ready.
    let unwanted_write = event == 1
        && !i.has_epoll()
        && !i.write_was_announced()
        && i.direction() & crate::constants::LIBNBD_AIO_DIRECTION_WRITE == 0;
    if state == DEAD || state == CLOSED || (state == CREATED && i.fd() < 0) || unwanted_write {
        let state = i.libnbd_state_name();
        return Err(CError::new(libc::EINVAL, format!("external event {event} is invalid in state {state}")));
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn nbd_aio_get_fd(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_get_fd", h, -1, [], |i| {
        i.sync_interest();
        let fd = i.fd();
        if fd < 0 {
            return Err(CError::new(libc::EINVAL, "connection is not in a connected state"));
        }
        Ok(fd)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_get_direction(h: *mut nbd_handle) -> c_uint {
    export!("nbd_aio_get_direction", h, 0, [], |i| {
        i.send_to_writer();
        let d = i.direction();
        i.announce(d);
        Ok(d)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_notify_read(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_notify_read", h, -1, [], |i| {
        no_socket_event(i, 0)?;
        i.notify_read();
        i.notify_write();
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_notify_write(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_notify_write", h, -1, [], |i| {
        no_socket_event(i, 1)?;
        i.write_event_came();
        i.notify_write();
        i.take_dial_error()?;
        Ok(0)
    })
}

/// One wait for the socket (and `extra_fd`, if not negative) and its
/// servicing, as `nbd_poll` and `nbd_poll2` do.
fn poll(i: &mut Handle, extra_fd: c_int, timeout: c_int) -> CResult<c_int> {
    if i.direction() == 0 {
        let state = i.libnbd_state_name();
        return Err(CError::new(libc::EINVAL, format!("nothing to poll for in state {state}")));
    }
    Ok(c_int::from(i.poll_once_with(timeout, extra_fd)?))
}

#[no_mangle]
pub extern "C" fn nbd_poll(h: *mut nbd_handle, timeout: c_int) -> c_int {
    export!("nbd_poll", h, -1, [timeout], |i| poll(i, -1, timeout))
}

#[no_mangle]
pub extern "C" fn nbd_poll2(h: *mut nbd_handle, fd: c_int, timeout: c_int) -> c_int {
    export!("nbd_poll2", h, -1, [fd, timeout], |i| poll(i, fd, timeout))
}

#[no_mangle]
pub extern "C" fn nbd_aio_command_completed(h: *mut nbd_handle, cookie: u64) -> c_int {
    export!("nbd_aio_command_completed", h, -1, [cookie], |i| {
        if cookie == 0 {
            return Err(CError::new(libc::EINVAL, "invalid aio cookie 0"));
        }
        retire(i, cookie)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_peek_command_completed(h: *mut nbd_handle) -> i64 {
    export!("nbd_aio_peek_command_completed", h, -1, [], |i| {
        if let Some(c) = i.first_completed() {
            return Ok(c as i64);
        }
        if i.commands_in_flight() == 0 {
            return Err(CError::new(libc::EINVAL, "no commands are in flight"));
        }
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_in_flight(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_in_flight", h, -1, [], |i| Ok(i.in_flight() as c_int))
}

#[no_mangle]
pub extern "C" fn nbd_aio_is_created(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_is_created", h, -1, [], |i| Ok(c_int::from(i.is_in(nbd_proto::PublicState::Created))))
}

#[no_mangle]
pub extern "C" fn nbd_aio_is_connecting(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_is_connecting", h, -1, [], |i| Ok(c_int::from(i.is_in(nbd_proto::PublicState::Connecting))))
}

#[no_mangle]
pub extern "C" fn nbd_aio_is_negotiating(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_is_negotiating", h, -1, [], |i| Ok(c_int::from(i.is_in(nbd_proto::PublicState::Negotiating))))
}

#[no_mangle]
pub extern "C" fn nbd_aio_is_ready(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_is_ready", h, -1, [], |i| Ok(c_int::from(i.is_in(nbd_proto::PublicState::Ready))))
}

#[no_mangle]
pub extern "C" fn nbd_aio_is_processing(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_is_processing", h, -1, [], |i| Ok(c_int::from(i.is_in(nbd_proto::PublicState::Processing))))
}

#[no_mangle]
pub extern "C" fn nbd_aio_is_closed(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_is_closed", h, -1, [], |i| Ok(c_int::from(i.is_in(nbd_proto::PublicState::Closed))))
}

#[no_mangle]
pub extern "C" fn nbd_aio_is_dead(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_is_dead", h, -1, [], |i| Ok(c_int::from(i.is_in(nbd_proto::PublicState::Dead))))
}
