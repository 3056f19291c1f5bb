//! The linked libcodex reports a version compatible with the ABI these bindings match, the
//! way the ABI says: through the callback, exactly once, before `codex_version` returns.
//!
//! Only built with the `vendored` feature, where a library to link is always available.
#![cfg(feature = "vendored")]

use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::sync::Mutex;

use codex_sys::{codex_version, ABI_VERSION, RET_MISSING_CALLBACK, RET_OK};

/// Every callback received: `(callerRet, msg bytes)`.
type Calls = Mutex<Vec<(c_int, Vec<u8>)>>;

/// Records one callback into the [`Calls`] that `user_data` points to.
unsafe extern "C" fn record(ret: c_int, msg: *const c_char, len: usize, user_data: *mut c_void) {
    let msg = if msg.is_null() || len == 0 {
        Vec::new()
    } else {
        // SAFETY: the ABI makes `msg` valid for `len` bytes during the callback.
        unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) }.to_vec()
    };
    // SAFETY: `user_data` is the leaked, never freed `Calls` passed by the test.
    let calls = unsafe { &*user_data.cast::<Calls>() };
    if let Ok(mut calls) = calls.lock() {
        calls.push((ret, msg));
    }
}

#[test]
fn version_is_compatible_and_reported_before_return() {
    // Leaked, so even a callback that (wrongly) came after the return could not dangle.
    let calls: &'static Calls = Box::leak(Box::default());

    // SAFETY: `ctx` may be NULL for `codex_version`; `record` has the `CodexCallback`
    // signature and `user_data` points to a `Calls` that lives forever.
    let ret = unsafe {
        codex_version(
            ptr::null_mut(),
            Some(record),
            ptr::from_ref(calls).cast_mut().cast(),
        )
    };

    // Taken right after the return: what the library reported before returning.
    let calls = calls.lock().expect("callback panicked").clone();
    assert_eq!(ret, RET_OK, "codex_version returned {ret}");
    assert_eq!(
        calls.len(),
        1,
        "expected exactly one callback before return, got {calls:?}"
    );
    let (code, msg) = &calls[0];
    let version = String::from_utf8_lossy(msg);
    assert_eq!(*code, RET_OK, "callback reported {code}: {version}");
    assert!(
        version.contains(ABI_VERSION),
        "linked libcodex reports version {version:?}, not compatible with {ABI_VERSION} \
         (vendored: {})",
        codex_sys::vendored()
    );
}

#[test]
fn version_without_callback_is_rejected() {
    // SAFETY: a NULL callback is part of the contract: RET_MISSING_CALLBACK and no work.
    let ret = unsafe { codex_version(ptr::null_mut(), None, ptr::null_mut()) };
    assert_eq!(ret, RET_MISSING_CALLBACK);
}
