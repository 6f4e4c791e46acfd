//! Negotiation commands of opt mode, synchronous and asynchronous.

use crate::boundary::export;
use crate::callbacks::*;
use crate::error::{CError, CResult};
use crate::handle::{nbd_handle, Inner, OptPending};
use nbd_proto::{Connection, Error, PublicState};
use std::ffi::c_int;

fn start(
    i: &mut Inner,
    pending: OptPending,
    issue: impl FnOnce(&mut Connection<crate::handle::UserBuf>) -> Result<(), Error>,
) -> CResult<()> {
    issue(&mut i.conn)?;
    i.opt = Some(pending);
    i.last_option_error = None;
    i.notify_write();
    i.dispatch();
    Ok(())
}

/// Waits for the option to finish; returns what it reported. A refusal
/// is reported in libnbd's words; the server's own goes to the debug log.
fn finish(i: &mut Inner, what: &str) -> CResult<c_int> {
    i.run_until(|i| i.opt.as_ref().is_none_or(|o| o.done.is_some()))?;
    let opt = i.opt.take().unwrap_or_default();
    match opt.done {
        Some(0) | None => Ok(opt.count),
        Some(err) => {
            let detail = i.last_option_error.take().unwrap_or_default();
            i.debug(|| format!("{what}: {detail}"));
            Err(CError::new(err, format!("server replied with error to {what} request")))
        }
    }
}

fn with_completion(cb: nbd_completion_callback) -> OptPending {
    OptPending { completion: Owned::some(cb), ..OptPending::default() }
}

#[no_mangle]
pub extern "C" fn nbd_opt_go(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_go", h, -1, |i| {
        start(i, OptPending::default(), |c| c.opt_go())?;
        finish(i, "opt_go").map(|_| 0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_info(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_info", h, -1, |i| {
        start(i, OptPending::default(), |c| c.opt_info())?;
        finish(i, "opt_info").map(|_| 0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_abort(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_abort", h, -1, |i| {
        start(i, OptPending::default(), |c| c.opt_abort())?;
        // A server without fixed newstyle cannot be told: libnbd drops the
        // connection (dead) and still reports success.
        let over = |i: &crate::handle::Inner| matches!(i.conn.state(), PublicState::Closed | PublicState::Dead);
        i.run_until(over)?;
        i.opt = None;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_list(h: *mut nbd_handle, list: nbd_list_callback) -> c_int {
    let list = Owned::some(list);
    export!("nbd_opt_list", h, -1, |i| {
        let list = Some(required(list, "list")?);
        start(i, OptPending { list, ..OptPending::default() }, |c| c.opt_list())?;
        finish(i, "opt_list")
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_list_meta_context(h: *mut nbd_handle, context: nbd_context_callback) -> c_int {
    let context = Owned::some(context);
    export!("nbd_opt_list_meta_context", h, -1, |i| {
        let context = Some(required(context, "context")?);
        start(i, OptPending { context, ..OptPending::default() }, |c| c.opt_list_meta_context())?;
        finish(i, "opt_list_meta_context")
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_go(h: *mut nbd_handle, cb: nbd_completion_callback) -> c_int {
    let p = with_completion(cb);
    export!("nbd_aio_opt_go", h, -1, |i| start(i, p, |c| c.opt_go()).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_info(h: *mut nbd_handle, cb: nbd_completion_callback) -> c_int {
    let p = with_completion(cb);
    export!("nbd_aio_opt_info", h, -1, |i| start(i, p, |c| c.opt_info()).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_abort(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_opt_abort", h, -1, |i| start(i, OptPending::default(), |c| c.opt_abort()).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_list(h: *mut nbd_handle, list: nbd_list_callback, cb: nbd_completion_callback) -> c_int {
    let mut p = OptPending { list: Owned::some(list), ..with_completion(cb) };
    export!("nbd_aio_opt_list", h, -1, |i| {
        p.list = Some(required(p.list.take(), "list")?);
        start(i, p, |c| c.opt_list()).map(|()| 0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_list_meta_context(
    h: *mut nbd_handle,
    context: nbd_context_callback,
    cb: nbd_completion_callback,
) -> c_int {
    let mut p = OptPending { context: Owned::some(context), ..with_completion(cb) };
    export!("nbd_aio_opt_list_meta_context", h, -1, |i| {
        p.context = Some(required(p.context.take(), "context")?);
        start(i, p, |c| c.opt_list_meta_context()).map(|()| 0)
    })
}
