//! What this library says it is. Programs parse `nbd_get_version` and
//! `nbd_get_package_name`, so those stay libnbd's (the ABI we implement);
//! our own name and version show in the first debug line, in
//! `nbd_rs_get_version` and in the pkg-config file.

use std::ffi::CStr;

/// This library's name.
pub const NAME: &str = "nbd-rs";

/// This library's own version (the Cargo package's).
pub const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
    Ok(v) => v,
    Err(_) => panic!("the package version has a NUL byte"),
};

/// The libnbd release whose API and ABI this library implements.
pub const LIBNBD_VERSION: &CStr = c"1.22.2";

/// libnbd's package name, as `nbd_get_package_name` gives it.
pub const LIBNBD_PACKAGE: &CStr = c"libnbd";
