//! The callback structs of libnbd's ABI, passed by value, and the guard
//! that calls each one's `free` exactly once.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void};

macro_rules! closure {
    ($(#[$m:meta])* $name:ident, fn($($arg:ty),*)) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy)]
        pub struct $name {
            pub callback: Option<unsafe extern "C" fn(*mut c_void $(, $arg)*) -> c_int>,
            pub user_data: *mut c_void,
            pub free: Option<unsafe extern "C" fn(*mut c_void)>,
        }

        impl Closure for $name {
            fn is_null(&self) -> bool {
                self.callback.is_none()
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
    fn is_null(&self) -> bool;
    fn release(&mut self);
}

closure!(nbd_chunk_callback, fn(*const c_void, usize, u64, c_uint, *mut c_int));
closure!(nbd_completion_callback, fn(*mut c_int));
closure!(nbd_debug_callback, fn(*const c_char, *const c_char));
closure!(nbd_extent_callback, fn(*const c_char, u64, *mut u32, usize, *mut c_int));
closure!(nbd_list_callback, fn(*const c_char, *const c_char));
closure!(nbd_context_callback, fn(*const c_char));

/// Owns a callback; its `free` runs when the guard drops, exactly once.
pub struct Owned<C: Closure>(C);

// SAFETY: libnbd lets callbacks run on whichever thread drives the
// handle; the user data is the caller's to make thread-safe.
unsafe impl<C: Closure> Send for Owned<C> {}

impl<C: Closure> Owned<C> {
    pub fn new(c: C) -> Self {
        Owned(c)
    }
    /// `None` for a NULL callback (its `free` still runs).
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
