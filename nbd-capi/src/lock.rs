//! The handle lock: a pthread mutex, as in libnbd, rather than `std`'s
//! futex-based one, so that helgrind and DRD see the lock that orders
//! every access to a handle (tests/helgrind.sh depends on this).

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};

pub struct PthreadMutex<T> {
    // Boxed: a pthread mutex must not move once used.
    raw: Box<UnsafeCell<libc::pthread_mutex_t>>,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reached through a guard, which holds the mutex.
unsafe impl<T: Send> Send for PthreadMutex<T> {}
// SAFETY: as above; one guard at a time gives exclusive access.
unsafe impl<T: Send> Sync for PthreadMutex<T> {}

impl<T> PthreadMutex<T> {
    pub fn new(data: T) -> Self {
        PthreadMutex { raw: Box::new(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER)), data: UnsafeCell::new(data) }
    }

    pub fn lock(&self) -> PthreadGuard<'_, T> {
        // SAFETY: an initialised mutex that lives as long as `self`; a
        // normal mutex can only fail here on a self-deadlock, which the
        // boundary never does (exports do not call exports).
        let r = unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        assert_eq!(r, 0, "pthread_mutex_lock");
        PthreadGuard { mutex: self }
    }
}

impl<T> PthreadMutex<T> {
    /// The lock if it is free now; `None` if anyone holds it, this thread
    /// included (a callback running under the lock).
    pub fn try_lock(&self) -> Option<PthreadGuard<'_, T>> {
        // SAFETY: an initialised mutex that lives as long as `self`.
        let r = unsafe { libc::pthread_mutex_trylock(self.raw.get()) };
        (r == 0).then_some(PthreadGuard { mutex: self })
    }
}

impl<T> Drop for PthreadMutex<T> {
    fn drop(&mut self) {
        // SAFETY: unlocked (no guard can outlive `&self`) and never used again.
        unsafe { libc::pthread_mutex_destroy(self.raw.get()) };
    }
}

pub struct PthreadGuard<'a, T> {
    mutex: &'a PthreadMutex<T>,
}

impl<T> PthreadGuard<'_, T> {
    /// Runs `f` with the mutex released, and takes it again: for a wait
    /// that must not hold up other threads. `f` cannot reach the data
    /// (the guard is borrowed for the call).
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        // SAFETY: this thread holds the mutex (the guard), and no
        // reference into the data outlives this borrow of the guard.
        unsafe { libc::pthread_mutex_unlock(self.mutex.raw.get()) };
        let r = f();
        // SAFETY: as in `lock`; taken again before the guard is usable.
        let r2 = unsafe { libc::pthread_mutex_lock(self.mutex.raw.get()) };
        assert_eq!(r2, 0, "pthread_mutex_lock");
        r
    }
}

impl<T> Deref for PthreadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the mutex.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> DerefMut for PthreadGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the mutex, and `&mut self` makes this the only reference.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for PthreadGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this thread locked the mutex when it made the guard.
        unsafe { libc::pthread_mutex_unlock(self.mutex.raw.get()) };
    }
}
