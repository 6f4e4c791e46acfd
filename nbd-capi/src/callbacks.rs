//! The callback structs of libnbd's ABI, passed by value, and the guard
//! that calls each one's `free` exactly once.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void};

/// Implements [`Closure`] for a callback struct.
macro_rules! impl_closure {
    ($name:ident) => {
        impl Closure for $name {
            fn is_null(&self) -> bool {
                self.callback.is_none() && self.free.is_none()
            }
            fn release(&mut self) {
                if let Some(free) = self.free.take() {
                    // SAFETY: the caller handed us `free` for `user_data`;
                    // `take` guarantees it runs once.
                    unsafe { free(self.user_data) }
                }
            }
        }
    };
}

/// What every callback struct has.
pub trait Closure {
    /// Absent, as libnbd defines it: neither a function nor a `free`. A
    /// struct with only `free` is present, and `free` runs when the
    /// command retires (Python's binding pins a buffer that way).
    fn is_null(&self) -> bool;
    fn release(&mut self);
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbd_chunk_callback {
    pub callback: Option<unsafe extern "C" fn(*mut c_void, *const c_void, usize, u64, c_uint, *mut c_int) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
}
impl_closure!(nbd_chunk_callback);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbd_completion_callback {
    pub callback: Option<unsafe extern "C" fn(*mut c_void, *mut c_int) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
}
impl_closure!(nbd_completion_callback);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbd_debug_callback {
    pub callback: Option<unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
}
impl_closure!(nbd_debug_callback);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbd_extent_callback {
    pub callback: Option<unsafe extern "C" fn(*mut c_void, *const c_char, u64, *mut u32, usize, *mut c_int) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
}
impl_closure!(nbd_extent_callback);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbd_list_callback {
    pub callback: Option<unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
}
impl_closure!(nbd_list_callback);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbd_context_callback {
    pub callback: Option<unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
}
impl_closure!(nbd_context_callback);

/// Owns a callback; its `free` runs when the guard drops, exactly once.
pub struct Owned<C: Closure>(C);

// SAFETY: libnbd lets callbacks run on whichever thread drives the
// handle; the user data is the caller's to make thread-safe.
unsafe impl<C: Closure> Send for Owned<C> {}

impl<C: Closure> Owned<C> {
    pub fn new(c: C) -> Self {
        Owned(c)
    }
    /// `None` for an absent callback.
    pub fn some(c: C) -> Option<Self> {
        let o = Owned(c);
        (!o.0.is_null()).then_some(o)
    }
    pub fn get(&self) -> &C {
        &self.0
    }
}

impl<C: Closure> Drop for Owned<C> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A callback the function cannot do without: NULL is EFAULT (its `free`
/// has already run, when the guard was made).
pub fn required<C: Closure>(c: Option<Owned<C>>, name: &str) -> crate::error::CResult<Owned<C>> {
    c.ok_or_else(|| crate::error::CError::new(libc::EFAULT, format!("{name} cannot be NULL")))
}

/// One block status extent with 64-bit fields (`nbd_extent`), as
/// `nbd_extent64_callback` receives them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct nbd_extent {
    pub length: u64,
    pub flags: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbd_extent64_callback {
    pub callback:
        Option<unsafe extern "C" fn(*mut c_void, *const c_char, u64, *mut nbd_extent, usize, *mut c_int) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
}
impl_closure!(nbd_extent64_callback);
