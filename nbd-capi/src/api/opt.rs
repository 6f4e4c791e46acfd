//! Negotiation commands of opt mode, synchronous and asynchronous.

use super::arg_str_list;
use crate::boundary::export;
use crate::callbacks::*;
use crate::error::{CError, CResult};
use crate::handle::{nbd_handle, Handle, OptPending, UserBuf};
use crate::trace::Fun;
use nbd_proto::{Connection, Error, PublicState};
use std::ffi::{c_char, c_int};

fn start(
    i: &mut Handle,
    pending: OptPending,
    issue: impl FnOnce(&mut Connection<UserBuf>) -> Result<(), Error>,
) -> CResult<()> {
    issue(i.conn_mut())?;
    i.start_option(pending);
    i.notify_write();
    i.dispatch();
    Ok(())
}

/// Waits for the option to finish; returns what it reported. A refusal
/// is reported in libnbd's words; the server's own goes to the debug log.
fn finish(i: &mut Handle, what: &str) -> CResult<c_int> {
    i.run_until(Handle::option_done)?;
    let opt = i.take_option().unwrap_or_default();
    match opt.done {
        Some(0) | None => Ok(opt.count),
        Some(err) => {
            let detail = i.take_option_error().unwrap_or_default();
            i.debug(|| format!("{what}: {detail}"));
            Err(CError::new(err, format!("server replied with error to {what} request")))
        }
    }
}

fn with_completion(cb: nbd_completion_callback) -> OptPending {
    OptPending { completion: Owned::some(cb), ..OptPending::default() }
}

/// Waits for an option the server may refuse without harm: 1 if it
/// accepted, 0 if it refused (still negotiating), an error only if the
/// connection did not survive to say.
fn finish_bool(i: &mut Handle, what: &str) -> CResult<c_int> {
    i.run_until(Handle::option_done)?;
    let err = i.take_option().and_then(|o| o.done).unwrap_or(0);
    if i.state() == PublicState::Negotiating {
        if err != 0 {
            let detail = i.take_option_error().unwrap_or_default();
            i.debug(|| format!("{what}: {detail}"));
        }
        return Ok(c_int::from(err == 0));
    }
    Err(i.ended().unwrap_or_else(|| CError::new(err, format!("failed to get response to {what} request"))))
}

/// The meta context option a call sends.
#[derive(Clone, Copy)]
enum MetaOption {
    List,
    Set,
}

/// The caller's queries (`char **`, which must not be NULL) when it gave
/// any, for the `_queries` variants.
type Queries = Option<*mut *mut c_char>;

fn queries(q: Queries) -> CResult<Option<Vec<String>>> {
    q.map(|p| arg_str_list(p, "queries")).transpose()
}

fn issue_meta(c: &mut Connection<UserBuf>, which: MetaOption, queries: Option<Vec<String>>) -> Result<(), Error> {
    match which {
        // libnbd 1.22 asks even without structured replies.
        MetaOption::List => c.opt_list_meta_context_queries(queries),
        MetaOption::Set => c.opt_set_meta_context(queries),
    }
}

/// The synchronous meta context options: the contexts reported, counted.
fn meta_sync(
    i: &mut Handle,
    which: MetaOption,
    q: Queries,
    context: Option<Owned<nbd_context_callback>>,
    what: &str,
) -> CResult<c_int> {
    let q = queries(q)?;
    let context = Some(required(context, "context")?);
    start(i, OptPending { context, ..OptPending::default() }, |c| issue_meta(c, which, q))?;
    finish(i, what)
}

/// The asynchronous meta context options.
fn meta_aio(i: &mut Handle, which: MetaOption, q: Queries, mut p: OptPending) -> CResult<c_int> {
    let q = queries(q)?;
    p.context = Some(required(p.context.take(), "context")?);
    start(i, p, |c| issue_meta(c, which, q)).map(|()| 0)
}

#[no_mangle]
pub extern "C" fn nbd_opt_go(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_go", h, -1, [], |i| {
        start(i, OptPending::default(), |c| c.opt_go())?;
        finish(i, "opt_go")?;
        // A multi-conn handle's other links connect now: wait for them.
        i.run_until(|i| i.state() != PublicState::Connecting)?;
        i.ended().map_or(Ok(0), Err)
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_info(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_info", h, -1, [], |i| {
        start(i, OptPending::default(), |c| c.opt_info())?;
        finish(i, "opt_info").map(|_| 0)
    })
}

/// Ends negotiation with NBD_OPT_ABORT and waits for the close.
pub(crate) fn abort(i: &mut Handle) -> CResult<c_int> {
    start(i, OptPending::default(), |c| c.opt_abort())?;
    // A server without fixed newstyle cannot be told: libnbd drops the
    // connection (dead) and still reports success.
    i.run_until(|i| matches!(i.state(), PublicState::Closed | PublicState::Dead))?;
    i.take_option();
    Ok(0)
}

#[no_mangle]
pub extern "C" fn nbd_opt_abort(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_abort", h, -1, [], |i| abort(i))
}

#[no_mangle]
pub extern "C" fn nbd_opt_list(h: *mut nbd_handle, list: nbd_list_callback) -> c_int {
    let list = Owned::some(list);
    export!("nbd_opt_list", h, -1, [list = Fun], |i| {
        let list = Some(required(list, "list")?);
        start(i, OptPending { list, ..OptPending::default() }, |c| c.opt_list())?;
        finish(i, "opt_list")
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_list_meta_context(h: *mut nbd_handle, context: nbd_context_callback) -> c_int {
    let context = Owned::some(context);
    export!("nbd_opt_list_meta_context", h, -1, [context = Fun], |i| meta_sync(
        i,
        MetaOption::List,
        None,
        context,
        "opt_list_meta_context"
    ))
}

#[no_mangle]
pub extern "C" fn nbd_opt_list_meta_context_queries(
    h: *mut nbd_handle,
    queries: *mut *mut c_char,
    context: nbd_context_callback,
) -> c_int {
    let context = Owned::some(context);
    export!("nbd_opt_list_meta_context_queries", h, -1, [queries, context = Fun], |i| meta_sync(
        i,
        MetaOption::List,
        Some(queries),
        context,
        "opt_list_meta_context_queries"
    ))
}

#[no_mangle]
pub extern "C" fn nbd_opt_set_meta_context(h: *mut nbd_handle, context: nbd_context_callback) -> c_int {
    let context = Owned::some(context);
    export!("nbd_opt_set_meta_context", h, -1, [context = Fun], |i| meta_sync(
        i,
        MetaOption::Set,
        None,
        context,
        "opt_set_meta_context"
    ))
}

#[no_mangle]
pub extern "C" fn nbd_opt_set_meta_context_queries(
    h: *mut nbd_handle,
    queries: *mut *mut c_char,
    context: nbd_context_callback,
) -> c_int {
    let context = Owned::some(context);
    export!("nbd_opt_set_meta_context_queries", h, -1, [queries, context = Fun], |i| meta_sync(
        i,
        MetaOption::Set,
        Some(queries),
        context,
        "opt_set_meta_context_queries"
    ))
}

#[no_mangle]
pub extern "C" fn nbd_opt_starttls(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_starttls", h, -1, [], |i| {
        start(i, OptPending::default(), |c| c.opt_starttls())?;
        finish_bool(i, "opt_starttls")
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_structured_reply(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_structured_reply", h, -1, [], |i| {
        start(i, OptPending::default(), |c| c.opt_structured_reply())?;
        finish_bool(i, "opt_structured_reply")
    })
}

#[no_mangle]
pub extern "C" fn nbd_opt_extended_headers(h: *mut nbd_handle) -> c_int {
    export!("nbd_opt_extended_headers", h, -1, [], |i| {
        start(i, OptPending::default(), |c| c.opt_extended_headers())?;
        finish_bool(i, "opt_extended_headers")
    })
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_go(h: *mut nbd_handle, cb: nbd_completion_callback) -> c_int {
    let p = with_completion(cb);
    export!("nbd_aio_opt_go", h, -1, [completion = cb], |i| start(i, p, |c| c.opt_go()).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_info(h: *mut nbd_handle, cb: nbd_completion_callback) -> c_int {
    let p = with_completion(cb);
    export!("nbd_aio_opt_info", h, -1, [completion = cb], |i| start(i, p, |c| c.opt_info()).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_abort(h: *mut nbd_handle) -> c_int {
    export!("nbd_aio_opt_abort", h, -1, [], |i| start(i, OptPending::default(), |c| c.opt_abort()).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_list(h: *mut nbd_handle, list: nbd_list_callback, cb: nbd_completion_callback) -> c_int {
    let mut p = OptPending { list: Owned::some(list), ..with_completion(cb) };
    export!("nbd_aio_opt_list", h, -1, [list = Fun, completion = cb], |i| {
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
    let p = OptPending { context: Owned::some(context), ..with_completion(cb) };
    export!("nbd_aio_opt_list_meta_context", h, -1, [context = Fun, completion = cb], |i| meta_aio(
        i,
        MetaOption::List,
        None,
        p
    ))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_list_meta_context_queries(
    h: *mut nbd_handle,
    queries: *mut *mut c_char,
    context: nbd_context_callback,
    cb: nbd_completion_callback,
) -> c_int {
    let p = OptPending { context: Owned::some(context), ..with_completion(cb) };
    export!("nbd_aio_opt_list_meta_context_queries", h, -1, [queries, context = Fun, completion = cb], |i| meta_aio(
        i,
        MetaOption::List,
        Some(queries),
        p
    ))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_set_meta_context(
    h: *mut nbd_handle,
    context: nbd_context_callback,
    cb: nbd_completion_callback,
) -> c_int {
    let p = OptPending { context: Owned::some(context), ..with_completion(cb) };
    export!("nbd_aio_opt_set_meta_context", h, -1, [context = Fun, completion = cb], |i| meta_aio(
        i,
        MetaOption::Set,
        None,
        p
    ))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_set_meta_context_queries(
    h: *mut nbd_handle,
    queries: *mut *mut c_char,
    context: nbd_context_callback,
    cb: nbd_completion_callback,
) -> c_int {
    let p = OptPending { context: Owned::some(context), ..with_completion(cb) };
    export!("nbd_aio_opt_set_meta_context_queries", h, -1, [queries, context = Fun, completion = cb], |i| meta_aio(
        i,
        MetaOption::Set,
        Some(queries),
        p
    ))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_starttls(h: *mut nbd_handle, cb: nbd_completion_callback) -> c_int {
    let p = with_completion(cb);
    export!("nbd_aio_opt_starttls", h, -1, [completion = cb], |i| start(i, p, |c| c.opt_starttls()).map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_structured_reply(h: *mut nbd_handle, cb: nbd_completion_callback) -> c_int {
    let p = with_completion(cb);
    export!("nbd_aio_opt_structured_reply", h, -1, [completion = cb], |i| start(i, p, |c| c.opt_structured_reply())
        .map(|()| 0))
}

#[no_mangle]
pub extern "C" fn nbd_aio_opt_extended_headers(h: *mut nbd_handle, cb: nbd_completion_callback) -> c_int {
    let p = with_completion(cb);
    export!("nbd_aio_opt_extended_headers", h, -1, [completion = cb], |i| start(i, p, |c| c.opt_extended_headers())
        .map(|()| 0))
}
