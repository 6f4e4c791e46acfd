//! What the server said about the export.

use super::{arg_str, c_string};
use crate::boundary::export;
use crate::error::{CError, CResult};
use crate::handle::{nbd_handle, Handle};
use nbd_proto::TransmissionFlags as TF;
use std::ffi::{c_char, c_int};

fn flags(i: &Handle) -> CResult<TF> {
    match i.conn().export().size {
        Some(_) => Ok(i.conn().export().flags),
        None => Err(CError::new(libc::EINVAL, "server has not returned export flags")),
    }
}

#[no_mangle]
pub extern "C" fn nbd_is_read_only(h: *mut nbd_handle) -> c_int {
    export!("nbd_is_read_only", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::READ_ONLY))))
}

#[no_mangle]
pub extern "C" fn nbd_can_flush(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_flush", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::SEND_FLUSH))))
}

#[no_mangle]
pub extern "C" fn nbd_can_fua(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_fua", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::SEND_FUA))))
}

#[no_mangle]
pub extern "C" fn nbd_is_rotational(h: *mut nbd_handle) -> c_int {
    export!("nbd_is_rotational", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::ROTATIONAL))))
}

#[no_mangle]
pub extern "C" fn nbd_can_trim(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_trim", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::SEND_TRIM))))
}

#[no_mangle]
pub extern "C" fn nbd_can_zero(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_zero", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::SEND_WRITE_ZEROES))))
}

#[no_mangle]
pub extern "C" fn nbd_can_fast_zero(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_fast_zero", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::SEND_FAST_ZERO))))
}

#[no_mangle]
pub extern "C" fn nbd_can_df(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_df", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::SEND_DF))))
}

#[no_mangle]
pub extern "C" fn nbd_can_block_status_payload(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_block_status_payload", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::BLOCK_STAT_PAYLOAD))))
}

#[no_mangle]
pub extern "C" fn nbd_can_multi_conn(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_multi_conn", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::CAN_MULTI_CONN))))
}

#[no_mangle]
pub extern "C" fn nbd_can_cache(h: *mut nbd_handle) -> c_int {
    export!("nbd_can_cache", h, -1, [], |i| Ok(c_int::from(flags(i)?.contains(TF::SEND_CACHE))))
}

#[no_mangle]
pub extern "C" fn nbd_can_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int {
    export!("nbd_can_meta_context", h, -1, [metacontext = name], |i| {
        let name = arg_str(name, "metacontext")?;
        // As libnbd 1.22: what SET_META_CONTEXT selected, also before GO;
        // an error only while contexts are configured and no request has
        // settled them (the automatic one settles trivially when there is
        // nothing it could ask).
        let cfg = i.conn().config();
        let settled = i.conn().export().size.is_some()
            && cfg.request_meta_context
            && (!i.conn().structured_replies_negotiated() || cfg.meta_contexts().is_empty());
        match i.conn().meta_contexts() {
            Some(m) => Ok(c_int::from(m.iter().any(|c| c.name == name))),
            None if cfg.meta_contexts().is_empty() || settled => Ok(0),
            None => Err(CError::new(libc::EINVAL, "need a successful server meta context request first")),
        }
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_size(h: *mut nbd_handle) -> i64 {
    export!("nbd_get_size", h, -1, [], |i| {
        // The core refuses sizes of 2^63 and more, so this cannot go negative.
        let size =
            i.conn().export().size.ok_or_else(|| CError::new(libc::EINVAL, "server has not returned export size"))?;
        Ok(size as i64)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64 {
    export!("nbd_get_block_size", h, -1, [size_type], |i| {
        flags(i)?;
        let b = i.conn().export().block_size;
        let v = match size_type {
            0 => b.map_or(0, |b| b.minimum),
            1 => b.map_or(0, |b| b.preferred),
            2 => b.map_or(0, |b| b.maximum),
            3 => i.conn().payload_maximum() as u32,
            _ => return Err(CError::new(libc::EINVAL, format!("unknown size_type: {size_type}"))),
        };
        Ok(i64::from(v))
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_protocol(h: *mut nbd_handle) -> *const c_char {
    export!("nbd_get_protocol", h, std::ptr::null(), [], |i| {
        let p: &'static std::ffi::CStr = match i.conn().protocol() {
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
    export!("nbd_get_structured_replies_negotiated", h, -1, [], |i| Ok(c_int::from(
        i.conn().structured_replies_negotiated()
    )))
}

#[no_mangle]
pub extern "C" fn nbd_get_extended_headers_negotiated(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_extended_headers_negotiated", h, -1, [], |i| Ok(c_int::from(
        i.conn().extended_headers_negotiated()
    )))
}

#[no_mangle]
pub extern "C" fn nbd_get_tls_negotiated(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_tls_negotiated", h, -1, [], |i| Ok(c_int::from(i.conn().tls_negotiated())))
}

#[no_mangle]
pub extern "C" fn nbd_get_canonical_export_name(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_canonical_export_name", h, std::ptr::null_mut(), [], |i| {
        match i.conn().export().canonical_name.as_deref() {
            Some(n) => c_string(n),
            None => Err(CError::new(libc::ENOTSUP, "server did not advertise a canonical name")),
        }
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_export_description(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_export_description", h, std::ptr::null_mut(), [], |i| {
        match i.conn().export().description.as_deref() {
            Some(d) => c_string(d),
            None => Err(CError::new(libc::ENOTSUP, "server did not advertise a description")),
        }
    })
}
