//! What the server said about the export.

use super::{arg_str, c_string};
use crate::boundary::export;
use crate::error::{CError, CResult};
use crate::handle::{nbd_handle, Inner};
use nbd_proto::TransmissionFlags as TF;
use std::ffi::{c_char, c_int};

fn flags(i: &Inner) -> CResult<TF> {
    match i.conn.export().size {
        Some(_) => Ok(i.conn.export().flags),
        None => Err(CError::new(libc::EINVAL, "server has not returned export flags")),
    }
}

macro_rules! flag_getter {
    ($name:ident, $flag:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(h: *mut nbd_handle) -> c_int {
            export!(stringify!($name), h, -1, |i| Ok(c_int::from(flags(i)?.contains($flag))))
        }
    };
}

flag_getter!(nbd_is_read_only, TF::READ_ONLY);
flag_getter!(nbd_can_flush, TF::SEND_FLUSH);
flag_getter!(nbd_can_fua, TF::SEND_FUA);
flag_getter!(nbd_is_rotational, TF::ROTATIONAL);
flag_getter!(nbd_can_trim, TF::SEND_TRIM);
flag_getter!(nbd_can_zero, TF::SEND_WRITE_ZEROES);
flag_getter!(nbd_can_fast_zero, TF::SEND_FAST_ZERO);
flag_getter!(nbd_can_df, TF::SEND_DF);
flag_getter!(nbd_can_multi_conn, TF::CAN_MULTI_CONN);
flag_getter!(nbd_can_cache, TF::SEND_CACHE);

#[no_mangle]
pub extern "C" fn nbd_can_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int {
    export!("nbd_can_meta_context", h, -1, |i| {
        let name = arg_str(name, "metacontext")?;
        flags(i)?;
        let found = i.conn.meta_contexts().is_some_and(|m| m.iter().any(|c| c.name == name));
        Ok(c_int::from(found))
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_size(h: *mut nbd_handle) -> i64 {
    export!("nbd_get_size", h, -1, |i| {
        // The core refuses sizes of 2^63 and more, so this cannot go negative.
        let size =
            i.conn.export().size.ok_or_else(|| CError::new(libc::EINVAL, "server has not returned export size"))?;
        Ok(size as i64)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64 {
    export!("nbd_get_block_size", h, -1, |i| {
        flags(i)?;
        let b = i.conn.export().block_size;
        let v = match size_type {
            0 => b.map_or(0, |b| b.minimum),
            1 => b.map_or(0, |b| b.preferred),
            2 => b.map_or(0, |b| b.maximum),
            _ => return Err(CError::new(libc::EINVAL, format!("unknown size_type: {size_type}"))),
        };
        Ok(i64::from(v))
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_protocol(h: *mut nbd_handle) -> *const c_char {
    export!("nbd_get_protocol", h, std::ptr::null(), |i| {
        let p: &'static std::ffi::CStr = match i.conn.protocol() {
            Some(nbd_proto::Protocol::Oldstyle) => c"oldstyle",
            Some(nbd_proto::Protocol::Newstyle) => c"newstyle",
            Some(nbd_proto::Protocol::NewstyleFixed) => c"newstyle-fixed",
            None => return Err(CError::new(libc::EINVAL, "handshake has not completed")),
        };
        Ok(p.as_ptr())
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_structured_replies_negotiated(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_structured_replies_negotiated", h, -1, |i| Ok(c_int::from(i.conn.structured_replies_negotiated())))
}

#[no_mangle]
pub extern "C" fn nbd_get_tls_negotiated(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_tls_negotiated", h, -1, |i| Ok(c_int::from(i.conn.tls_negotiated())))
}

#[no_mangle]
pub extern "C" fn nbd_get_canonical_export_name(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_canonical_export_name", h, std::ptr::null_mut(), |i| {
        match i.conn.export().canonical_name.as_deref() {
            Some(n) => c_string(n),
            None => Err(CError::new(libc::ENOTSUP, "server did not advertise a canonical name")),
        }
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_export_description(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_export_description", h, std::ptr::null_mut(), |i| {
        match i.conn.export().description.as_deref() {
            Some(d) => c_string(d),
            None => Err(CError::new(libc::ENOTSUP, "server did not advertise a description")),
        }
    })
}
