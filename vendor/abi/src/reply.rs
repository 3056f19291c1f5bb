//! Delivering results to the caller's callback: one terminal callback per request, none
//! after the context is destroyed, and never a panic across the boundary.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};

/// `RET_OK`: success (terminal).
pub const RET_OK: c_int = 0;
/// `RET_ERR`: failure (terminal).
pub const RET_ERR: c_int = 1;
/// `RET_MISSING_CALLBACK`: the callback was NULL.
pub const RET_MISSING_CALLBACK: c_int = 2;
/// `RET_PROGRESS`: progress or data, more callbacks follow.
pub const RET_PROGRESS: c_int = 3;

/// The C callback type.
pub(crate) type Callback = unsafe extern "C" fn(c_int, *const c_char, usize, *mut c_void);

thread_local! {
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside one of our callbacks (re-entry is refused: the reference
/// deadlocks on it, we answer RET_ERR).
pub(crate) fn in_callback() -> bool {
    IN_CALLBACK.with(Cell::get)
}

/// Calls `cb` with `code` and the message `ptr`/`len`, shielding us from a panicking
/// callback and marking the thread as inside a callback meanwhile.
///
/// # Safety
/// `cb` must be a valid function pointer and `ud` whatever the caller passed with it; `ptr`
/// must be NULL or valid for `len` bytes during the call.
pub(crate) unsafe fn invoke(
    cb: Callback,
    ud: *mut c_void,
    code: c_int,
    ptr: *const c_char,
    len: usize,
) {
    // Restored, not cleared, afterwards: a callback may be invoked from inside another
    // (`codex_version`, or a refused call from inside a callback answering RET_ERR), and
    // the outer one must stay marked.
    let outer = IN_CALLBACK.with(|f| f.replace(true));
    // SAFETY: guaranteed by the caller, as documented above.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe { cb(code, ptr, len, ud) }));
    IN_CALLBACK.with(|f| f.set(outer));
    if r.is_err() {
        tracing::error!("a libcodex callback panicked; ignored");
    }
}

/// Calls `cb` with a byte message (NULL when empty).
///
/// # Safety
/// As [`invoke`].
pub(crate) unsafe fn invoke_msg(cb: Callback, ud: *mut c_void, code: c_int, msg: &[u8]) {
    let ptr = if msg.is_empty() {
        std::ptr::null()
    } else {
        msg.as_ptr().cast::<c_char>()
    };
    // SAFETY: `ptr` is NULL or valid for `msg.len()` bytes; the rest is the caller's.
    unsafe { invoke(cb, ud, code, ptr, msg.len()) }
}

/// Closed when the context is destroyed: callbacks run under its read lock, destruction
/// takes the write lock, so once `codex_destroy` returns no callback runs or will run.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    closed: RwLock<bool>,
}

impl Gate {
    /// Runs `f` unless the gate is closed.
    pub(crate) fn pass(&self, f: impl FnOnce()) {
        let closed = self.closed.read().unwrap_or_else(|p| p.into_inner());
        if !*closed {
            f();
        }
    }

    /// Closes the gate, waiting for callbacks in progress.
    pub(crate) fn close(&self) {
        *self.closed.write().unwrap_or_else(|p| p.into_inner()) = true;
    }
}

/// The callback of one request. Consumed by its terminal result; dropped unanswered (a
/// task that panicked or was torn down) it answers RET_ERR, unless the gate is closed.
pub(crate) struct Reply {
    cb: Callback,
    ud: *mut c_void,
    gate: Arc<Gate>,
    done: bool,
}

// SAFETY: the C contract lets the library call the callback with its user data from any of
// its threads; the pointer is only handed back to the callback, never dereferenced here.
unsafe impl Send for Reply {}

// SAFETY: a shared `&Reply` can only invoke the callback (progress reports), which the same
// contract allows from any of the library's threads; the terminal result needs ownership.
unsafe impl Sync for Reply {}

impl Reply {
    /// A reply for `cb`/`ud` behind `gate`.
    pub(crate) fn new(cb: Callback, ud: *mut c_void, gate: Arc<Gate>) -> Self {
        Self {
            cb,
            ud,
            gate,
            done: false,
        }
    }

    fn send(&self, code: c_int, msg: &[u8]) {
        // SAFETY: `cb` and `ud` came together from the caller of the request.
        self.gate
            .pass(|| unsafe { invoke_msg(self.cb, self.ud, code, msg) });
    }

    /// A RET_PROGRESS callback carrying `msg`.
    pub(crate) fn progress(&self, msg: &[u8]) {
        self.send(RET_PROGRESS, msg);
    }

    /// A RET_PROGRESS callback with a NULL message and `len` = `n`, as the reference reports
    /// the bytes of each stored block of `upload_file`.
    pub(crate) fn progress_len(&self, n: usize) {
        // SAFETY: `cb`/`ud` as in `send`; a NULL message is allowed whatever `len` says.
        self.gate
            .pass(|| unsafe { invoke(self.cb, self.ud, RET_PROGRESS, std::ptr::null(), n) });
    }

    /// The terminal RET_OK.
    pub(crate) fn ok(mut self, msg: impl AsRef<[u8]>) {
        self.done = true;
        self.send(RET_OK, msg.as_ref());
    }

    /// The terminal RET_ERR.
    pub(crate) fn err(mut self, msg: impl std::fmt::Display) {
        self.done = true;
        self.send(RET_ERR, msg.to_string().as_bytes());
    }

    /// The terminal callback of a result.
    pub(crate) fn finish<T: AsRef<[u8]>, E: std::fmt::Display>(self, r: Result<T, E>) {
        match r {
            Ok(v) => self.ok(v),
            Err(e) => self.err(e),
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.done {
            self.send(
                RET_ERR,
                b"request abandoned: the node shut down or failed internally",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn ignore(_: c_int, _: *const c_char, _: usize, _: *mut c_void) {}

    /// Invokes a nested callback, then records whether it is still marked as inside one.
    unsafe extern "C" fn nest(_: c_int, _: *const c_char, _: usize, ud: *mut c_void) {
        // SAFETY: `ignore` accepts anything.
        unsafe { invoke_msg(ignore, std::ptr::null_mut(), RET_OK, b"inner") };
        // SAFETY: the test passes a `Cell<Option<bool>>` that outlives the call.
        let seen = unsafe { &*ud.cast::<Cell<Option<bool>>>() };
        seen.set(Some(in_callback()));
    }

    #[test]
    fn a_nested_callback_leaves_the_outer_one_marked() {
        let seen = Cell::new(None);
        assert!(!in_callback());
        // SAFETY: `nest` gets a pointer to `seen`, alive for the whole call.
        unsafe {
            invoke_msg(
                nest,
                std::ptr::from_ref(&seen).cast_mut().cast(),
                RET_OK,
                b"x",
            )
        };
        assert_eq!(seen.get(), Some(true), "re-entry would go undetected");
        assert!(!in_callback());
    }
}
