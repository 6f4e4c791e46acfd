//! Settings made before connecting (and some while negotiating).

use super::{arg_str, c_string};
use crate::boundary::export;
use crate::error::CError;
use crate::handle::nbd_handle;
use crate::trace::Hex;
use nbd_proto::{HandshakeFlags, StrictMode};
use std::ffi::{c_char, c_int};

#[no_mangle]
pub extern "C" fn nbd_set_export_name(h: *mut nbd_handle, name: *const c_char) -> c_int {
    export!("nbd_set_export_name", h, -1, [export_name = name], |i| {
        let name = arg_str(name, "export_name")?;
        i.conn_mut().set_export_name(&name)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_export_name(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_export_name", h, std::ptr::null_mut(), [], |i| c_string(i.conn().config().export_name()))
}

#[no_mangle]
pub extern "C" fn nbd_set_request_block_size(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_request_block_size", h, -1, [request = v], |i| {
        i.conn_mut().config_mut()?.request_block_size = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_request_block_size(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_request_block_size", h, -1, [], |i| Ok(c_int::from(i.conn().config().request_block_size)))
}

#[no_mangle]
pub extern "C" fn nbd_set_full_info(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_full_info", h, -1, [request = v], |i| {
        i.conn_mut().config_mut()?.full_info = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_full_info(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_full_info", h, -1, [], |i| Ok(c_int::from(i.conn().config().full_info)))
}

#[no_mangle]
pub extern "C" fn nbd_set_request_structured_replies(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_request_structured_replies", h, -1, [request = v], |i| {
        i.conn_mut().config_mut()?.request_structured_replies = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_request_structured_replies(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_request_structured_replies", h, -1, [], |i| Ok(c_int::from(
        i.conn().config().request_structured_replies
    )))
}

#[no_mangle]
pub extern "C" fn nbd_set_request_extended_headers(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_request_extended_headers", h, -1, [request = v], |i| {
        i.conn_mut().config_mut()?.request_extended_headers = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_request_extended_headers(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_request_extended_headers", h, -1, [], |i| Ok(c_int::from(
        i.conn().config().request_extended_headers
    )))
}

#[no_mangle]
pub extern "C" fn nbd_set_request_meta_context(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_request_meta_context", h, -1, [request = v], |i| {
        i.conn_mut().config_mut()?.request_meta_context = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_request_meta_context(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_request_meta_context", h, -1, [], |i| Ok(c_int::from(i.conn().config().request_meta_context)))
}

#[no_mangle]
pub extern "C" fn nbd_set_opt_mode(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_opt_mode", h, -1, [enable = v], |i| {
        i.conn_mut().config_mut()?.opt_mode = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_opt_mode(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_opt_mode", h, -1, [], |i| Ok(c_int::from(i.conn().config().opt_mode)))
}

#[no_mangle]
pub extern "C" fn nbd_set_handshake_flags(h: *mut nbd_handle, flags: u32) -> c_int {
    export!("nbd_set_handshake_flags", h, -1, [flags = Hex(flags)], |i| {
        let f = HandshakeFlags::from_bits(flags)
            .ok_or_else(|| CError::new(libc::EINVAL, format!("flags: invalid value for flag: {flags:#x}")))?;
        i.conn_mut().config_mut()?.handshake_flags = f;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_handshake_flags(h: *mut nbd_handle) -> u32 {
    export!("nbd_get_handshake_flags", h, 0, [], |i| Ok(i.conn().config().handshake_flags.bits()))
}

#[no_mangle]
pub extern "C" fn nbd_set_strict_mode(h: *mut nbd_handle, flags: u32) -> c_int {
    export!("nbd_set_strict_mode", h, -1, [flags = Hex(flags)], |i| {
        if flags & !crate::constants::LIBNBD_STRICT_MASK != 0 {
            return Err(CError::new(libc::EINVAL, format!("flags: invalid value for flag: {flags:#x}")));
        }
        i.conn_mut().set_strict_mode(StrictMode::from_bits_truncate(flags));
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_strict_mode(h: *mut nbd_handle) -> u32 {
    export!("nbd_get_strict_mode", h, 0, [], |i| Ok(i.conn().config().strict.bits()))
}

#[no_mangle]
pub extern "C" fn nbd_set_pread_initialize(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_pread_initialize", h, -1, [request = v], |i| {
        i.settings_mut().pread_initialize = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_pread_initialize(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_pread_initialize", h, -1, [], |i| Ok(c_int::from(i.settings().pread_initialize)))
}

#[no_mangle]
pub extern "C" fn nbd_add_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int {
    export!("nbd_add_meta_context", h, -1, [name], |i| {
        let name = arg_str(name, "name")?;
        i.conn_mut().config_mut()?.add_meta_context(&name)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_clear_meta_contexts(h: *mut nbd_handle) -> c_int {
    export!("nbd_clear_meta_contexts", h, -1, [], |i| {
        i.conn_mut().config_mut()?.clear_meta_contexts();
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_nr_meta_contexts(h: *mut nbd_handle) -> isize {
    export!("nbd_get_nr_meta_contexts", h, -1, [], |i| Ok(i.conn().config().meta_contexts().len() as isize))
}

#[no_mangle]
pub extern "C" fn nbd_get_meta_context(h: *mut nbd_handle, n: usize) -> *mut c_char {
    export!("nbd_get_meta_context", h, std::ptr::null_mut(), [i = n], |i| {
        let names = i.conn().config().meta_contexts();
        let name =
            names.get(n).ok_or_else(|| CError::new(libc::EINVAL, format!("meta context request out of range: {n}")))?;
        c_string(name)
    })
}

// ---- TLS settings ---------------------------------------------------------------

#[no_mangle]
pub extern "C" fn nbd_set_tls(h: *mut nbd_handle, tls: c_int) -> c_int {
    export!("nbd_set_tls", h, -1, [tls], |i| {
        let mode = match tls {
            0 => nbd_proto::TlsMode::Disable,
            1 => nbd_proto::TlsMode::Allow,
            2 => nbd_proto::TlsMode::Require,
            _ => return Err(CError::new(libc::EINVAL, format!("invalid value for tls: {tls}"))),
        };
        i.conn_mut().config_mut()?.tls = mode;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_tls(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_tls", h, -1, [], |i| Ok(i.conn().config().tls as c_int))
}

#[no_mangle]
pub extern "C" fn nbd_set_tls_verify_peer(h: *mut nbd_handle, v: bool) -> c_int {
    export!("nbd_set_tls_verify_peer", h, -1, [verify = v], |i| {
        i.settings_mut().tls.verify_peer = v;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_tls_verify_peer(h: *mut nbd_handle) -> c_int {
    export!("nbd_get_tls_verify_peer", h, -1, [], |i| Ok(c_int::from(i.settings().tls.verify_peer)))
}

#[no_mangle]
pub extern "C" fn nbd_set_tls_username(h: *mut nbd_handle, user: *const c_char) -> c_int {
    export!("nbd_set_tls_username", h, -1, [username = user], |i| {
        i.settings_mut().tls.username = Some(arg_str(user, "username")?);
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_tls_username(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_tls_username", h, std::ptr::null_mut(), [], |i| {
        let name = match &i.settings().tls.username {
            Some(u) => u.clone(),
            None => crate::tls::local_username()?,
        };
        c_string(&name)
    })
}

#[no_mangle]
pub extern "C" fn nbd_set_tls_hostname(h: *mut nbd_handle, hostname: *const c_char) -> c_int {
    export!("nbd_set_tls_hostname", h, -1, [hostname], |i| {
        i.settings_mut().tls_hostname = Some(arg_str(hostname, "hostname")?);
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_tls_hostname(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_tls_hostname", h, std::ptr::null_mut(), [], |i| c_string(
        i.settings().tls_hostname.as_deref().unwrap_or("")
    ))
}

#[no_mangle]
pub extern "C" fn nbd_set_socket_activation_name(h: *mut nbd_handle, name: *const c_char) -> c_int {
    export!("nbd_set_socket_activation_name", h, -1, [socket_name = name], |i| {
        let name = arg_str(name, "socket_name")?;
        if name.len() > 32 {
            return Err(CError::new(libc::ENAMETOOLONG, "socket activation name should be <= 32 characters"));
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(CError::new(
                libc::EINVAL,
                "socket activation name should contain only alphanumeric ASCII characters",
            ));
        }
        i.settings_mut().socket_activation_name = name;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_get_socket_activation_name(h: *mut nbd_handle) -> *mut c_char {
    export!("nbd_get_socket_activation_name", h, std::ptr::null_mut(), [], |i| c_string(
        &i.settings().socket_activation_name
    ))
}

#[no_mangle]
pub extern "C" fn nbd_set_tls_certificates(h: *mut nbd_handle, dir: *const c_char) -> c_int {
    export!("nbd_set_tls_certificates", h, -1, [dir], |i| {
        i.settings_mut().tls.certificates = Some(arg_str(dir, "dir")?.into());
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn nbd_set_tls_psk_file(h: *mut nbd_handle, file: *const c_char) -> c_int {
    export!("nbd_set_tls_psk_file", h, -1, [filename = file], |i| {
        i.settings_mut().tls.psk_file = Some(arg_str(file, "filename")?.into());
        Ok(0)
    })
}
