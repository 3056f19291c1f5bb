//! The libcodex C ABI (`libcodex.h`) over the Rust Codex node.
//!
//! Every function of the reference header is exported with the same name and signature.
//! This layer only copies arguments out of C memory, checks them, and hands a `Request`
//! to the context's dispatcher (`context.rs`), which turns it into node calls and the
//! results into callbacks.
//!
//! Contract (see `libcodex.h`): a NULL callback gives `RET_MISSING_CALLBACK` and no work; a
//! function returning `RET_ERR` has already called the callback with `RET_ERR` on the
//! caller's thread; otherwise zero or more `RET_PROGRESS` then exactly one terminal callback
//! follow on the node's threads. No callback runs once `codex_destroy` has returned.
//! Unlike the reference, a bad configuration, an unknown or destroyed context, or a call
//! from inside a callback is answered with `RET_ERR`, never an abort or a deadlock.
//!
//! Events (`codex_set_event_callback`): `RET_OK` with a JSON object whose `type` is one of
//! `started`, `stopped`, `datasetStored` (`cid`, `datasetSize`), `datasetDeleted` (`cid`),
//! `fetchCompleted` (`cid`), `fetchFailed` (`cid`, `error`), `blocksExpired` (`count`).

#![deny(unsafe_op_in_unsafe_fn)]
#![allow(clippy::missing_safety_doc)] // the C header documents the contract

mod context;
mod logging;
mod reply;

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use codex_node::{Node, NodeConfig};
use once_cell::sync::Lazy;

use crate::context::{Context, Request};
use crate::reply::{in_callback, invoke_msg, Callback, Reply};
pub use crate::reply::{RET_ERR, RET_MISSING_CALLBACK, RET_OK, RET_PROGRESS};

/// Upload sessions open in this process across all nodes (opened by `codex_upload_init`,
/// not yet finalized, cancelled or ended by close/destroy). A diagnostic for leak tests;
/// not part of the C ABI.
#[doc(hidden)]
pub fn open_upload_sessions() -> usize {
    context::OPEN_UPLOAD_SESSIONS.load(Ordering::Relaxed)
}

/// Live contexts by handle. Handles are registry keys, never dereferenced, so a call with a
/// destroyed or bogus handle is answered with an error instead of undefined behaviour.
static CONTEXTS: Lazy<Mutex<HashMap<usize, Arc<Context>>>> = Lazy::new(Default::default);
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(1);

fn contexts() -> std::sync::MutexGuard<'static, HashMap<usize, Arc<Context>>> {
    CONTEXTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers RET_ERR synchronously.
fn fail(cb: Callback, ud: *mut c_void, msg: &str) -> c_int {
    // SAFETY: `cb` and `ud` were passed together by the caller of the current function.
    unsafe { invoke_msg(cb, ud, RET_ERR, msg.as_bytes()) };
    RET_ERR
}

/// Copies a C string argument.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string.
unsafe fn text(p: *const c_char, what: &str) -> Result<String, String> {
    if p.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(str::to_owned)
        .map_err(|_| format!("{what} is not valid UTF-8"))
}

/// Runs one call of the ABI: checks the callback and the context, and shields the caller
/// from panics. `f` builds the request; its `Err` is answered synchronously.
fn call(
    ctx: *mut c_void,
    cb: Option<Callback>,
    ud: *mut c_void,
    f: impl FnOnce() -> Result<Request, String>,
) -> c_int {
    let Some(cb) = cb else {
        return RET_MISSING_CALLBACK;
    };
    // Once a Reply exists it answers the request itself (a panic drops it, and its Drop
    // answers RET_ERR): after that, a caught panic must not answer a second time.
    let mut replied = false;
    let r = catch_unwind(AssertUnwindSafe(|| {
        if in_callback() {
            return fail(
                cb,
                ud,
                "libcodex must not be called from inside one of its callbacks",
            );
        }
        let Some(context) = contexts().get(&(ctx as usize)).cloned() else {
            return fail(
                cb,
                ud,
                "invalid context: not created by codex_new, or destroyed",
            );
        };
        match f() {
            Ok(req) => {
                replied = true;
                context.dispatch(req, Reply::new(cb, ud, Arc::clone(&context.gate)))
            }
            Err(msg) => fail(cb, ud, &msg),
        }
    }));
    r.unwrap_or_else(|_| {
        if replied {
            RET_ERR
        } else {
            fail(cb, ud, "internal error (panic) in libcodex")
        }
    })
}

/// The reference's runtime initialiser; nothing to do here.
#[no_mangle]
pub extern "C" fn libcodexNimMain() {}

/// Creates a node from a JSON configuration.
#[no_mangle]
pub unsafe extern "C" fn codex_new(
    config_json: *const c_char,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> *mut c_void {
    let Some(cb) = cb else {
        return std::ptr::null_mut();
    };
    let r = catch_unwind(AssertUnwindSafe(|| {
        if in_callback() {
            fail(
                cb,
                ud,
                "libcodex must not be called from inside one of its callbacks",
            );
            return std::ptr::null_mut();
        }
        // SAFETY: the header requires a NUL-terminated string (or NULL, refused).
        let created = unsafe { text(config_json, "configJson") }
            .and_then(|json| NodeConfig::from_json(&json).map_err(|e| e.to_string()))
            .and_then(|cfg| {
                logging::init(&cfg);
                Node::new(cfg).map_err(|e| e.to_string())
            });
        let node = match created {
            Ok(node) => node,
            Err(msg) => {
                fail(cb, ud, &msg);
                return std::ptr::null_mut();
            }
        };
        let context = Context::new(node);
        let handle = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
        contexts().insert(handle, Arc::clone(&context));
        let reply = Reply::new(cb, ud, Arc::clone(&context.gate));
        context.node().handle().spawn(async move { reply.ok("") });
        handle as *mut c_void
    }));
    r.unwrap_or_else(|_| {
        fail(cb, ud, "internal error (panic) in libcodex");
        std::ptr::null_mut()
    })
}

macro_rules! simple {
    ($(#[$doc:meta] $name:ident => $req:expr;)*) => {$(
        #[$doc]
        #[no_mangle]
        pub unsafe extern "C" fn $name(ctx: *mut c_void, cb: Option<Callback>, ud: *mut c_void) -> c_int {
            call(ctx, cb, ud, || Ok($req))
        }
    )*};
}

simple! {
    /// Starts the node.
    codex_start => Request::Start;
    /// Stops the node.
    codex_stop => Request::Stop;
    /// Closes the node (releases its store).
    codex_close => Request::Close;
    /// The data directory.
    codex_repo => Request::Repo;
    /// Debug information (JSON).
    codex_debug => Request::Debug;
    /// The signed peer record.
    codex_spr => Request::Spr;
    /// The peer ID.
    codex_peer_id => Request::PeerId;
    /// All stored datasets (JSON).
    codex_storage_list => Request::List;
    /// Quota figures (JSON).
    codex_storage_space => Request::Space;
}

macro_rules! with_text {
    ($(#[$doc:meta] $name:ident($arg:ident) => $req:expr;)*) => {$(
        #[$doc]
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            ctx: *mut c_void,
            $arg: *const c_char,
            cb: Option<Callback>,
            ud: *mut c_void,
        ) -> c_int {
            // SAFETY: the header requires a NUL-terminated string (or NULL, refused).
            call(ctx, cb, ud, || unsafe { text($arg, stringify!($arg)) }.map($req))
        }
    )*};
}

with_text! {
    /// Sets the log level.
    codex_log_level(log_level) => Request::LogLevel;
    /// What the node knows of a peer (JSON).
    codex_peer_debug(peer_id) => Request::PeerDebug;
    /// Completes an upload session; answers the dataset CID.
    codex_upload_finalize(session_id) => Request::UploadFinalize;
    /// Abandons an upload session, also while a chunk or `upload_file` of it is running.
    codex_upload_cancel(session_id) => Request::UploadCancel;
    /// Uploads the file named by the session's (absolute) path.
    codex_upload_file(session_id) => Request::UploadFile;
    /// The next chunk of a download session.
    codex_download_chunk(cid) => Request::DownloadChunk;
    /// Ends a download session (and a running stream, which then ends with RET_OK).
    codex_download_cancel(cid) => Request::DownloadCancel;
    /// A dataset's manifest (JSON).
    codex_download_manifest(cid) => Request::DownloadManifest;
    /// Deletes a block, or a dataset by its manifest CID.
    codex_storage_delete(cid) => Request::Delete;
    /// Makes a dataset local; answers its manifest.
    codex_storage_fetch(cid) => Request::Fetch;
    /// Whether a CID (for a dataset: all of it) is stored.
    codex_storage_exists(cid) => Request::Exists;
}

/// The library version; `ctx` may be NULL and the callback fires before return.
#[no_mangle]
pub unsafe extern "C" fn codex_version(
    _ctx: *mut c_void,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> c_int {
    let Some(cb) = cb else {
        return RET_MISSING_CALLBACK;
    };
    // SAFETY: `cb`/`ud` come together from the caller.
    unsafe { invoke_msg(cb, ud, RET_OK, codex_node::node::VERSION.as_bytes()) };
    RET_OK
}

/// The source revision; `ctx` may be NULL and the callback fires before return.
#[no_mangle]
pub unsafe extern "C" fn codex_revision(
    _ctx: *mut c_void,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> c_int {
    let Some(cb) = cb else {
        return RET_MISSING_CALLBACK;
    };
    // SAFETY: `cb`/`ud` come together from the caller.
    unsafe { invoke_msg(cb, ud, RET_OK, codex_node::node::REVISION.as_bytes()) };
    RET_OK
}

/// Connects to a peer by ID and addresses.
#[no_mangle]
pub unsafe extern "C" fn codex_connect(
    ctx: *mut c_void,
    peer_id: *const c_char,
    addrs: *const *const c_char,
    n: usize,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> c_int {
    call(ctx, cb, ud, || {
        // SAFETY: the header requires NUL-terminated strings.
        let peer = unsafe { text(peer_id, "peerId") }?;
        if n > 0 && addrs.is_null() {
            return Err("peerAddresses is NULL".into());
        }
        let addrs = (0..n)
            // SAFETY: `addrs` holds `n` string pointers per the header.
            .map(|i| unsafe { text(*addrs.add(i), "peer address") })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Request::Connect { peer, addrs })
    })
}

/// Opens an upload session; answers its id.
#[no_mangle]
pub unsafe extern "C" fn codex_upload_init(
    ctx: *mut c_void,
    filepath: *const c_char,
    chunk_size: usize,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> c_int {
    call(ctx, cb, ud, || {
        // SAFETY: NUL-terminated per the header; NULL means no file name.
        let name = if filepath.is_null() {
            String::new()
        } else {
            unsafe { text(filepath, "filepath") }?
        };
        Ok(Request::UploadInit { name, chunk_size })
    })
}

/// Sends the next chunk of an upload session (copied before this returns).
#[no_mangle]
pub unsafe extern "C" fn codex_upload_chunk(
    ctx: *mut c_void,
    session_id: *const c_char,
    chunk: *const u8,
    len: usize,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> c_int {
    call(ctx, cb, ud, || {
        // SAFETY: NUL-terminated per the header.
        let session = unsafe { text(session_id, "sessionId") }?;
        let data = match (chunk.is_null(), len) {
            (_, 0) => Bytes::new(),
            (true, _) => return Err("chunk is NULL".into()),
            // SAFETY: the caller passes `len` readable bytes at `chunk`.
            (false, len) => {
                Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(chunk, len) })
            }
        };
        Ok(Request::UploadChunk { session, data })
    })
}

/// Opens a download session for a CID.
#[no_mangle]
pub unsafe extern "C" fn codex_download_init(
    ctx: *mut c_void,
    cid: *const c_char,
    chunk_size: usize,
    local: bool,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> c_int {
    call(ctx, cb, ud, || {
        // SAFETY: NUL-terminated per the header.
        let cid = unsafe { text(cid, "cid") }?;
        Ok(Request::DownloadInit {
            cid,
            chunk_size,
            local,
        })
    })
}

/// Streams a dataset: RET_PROGRESS per chunk, and to `filepath` when non-empty.
#[no_mangle]
pub unsafe extern "C" fn codex_download_stream(
    ctx: *mut c_void,
    cid: *const c_char,
    chunk_size: usize,
    local: bool,
    filepath: *const c_char,
    cb: Option<Callback>,
    ud: *mut c_void,
) -> c_int {
    call(ctx, cb, ud, || {
        // SAFETY: NUL-terminated per the header; a NULL path means no file.
        let cid = unsafe { text(cid, "cid") }?;
        let path = if filepath.is_null() {
            String::new()
        } else {
            unsafe { text(filepath, "filepath") }?
        };
        Ok(Request::DownloadStream {
            cid,
            chunk_size,
            local,
            path,
        })
    })
}

/// Destroys a node: synchronous, never calls the callback. No callback of any request of
/// this node runs after it returns.
#[no_mangle]
pub unsafe extern "C" fn codex_destroy(
    ctx: *mut c_void,
    _cb: Option<Callback>,
    _ud: *mut c_void,
) -> c_int {
    let r = catch_unwind(AssertUnwindSafe(|| {
        if in_callback() {
            return RET_ERR;
        }
        let Some(context) = contexts().remove(&(ctx as usize)) else {
            return RET_ERR;
        };
        context.destroy();
        RET_OK
    }));
    r.unwrap_or(RET_ERR)
}

/// Registers the event callback (NULL unregisters).
#[no_mangle]
pub unsafe extern "C" fn codex_set_event_callback(
    ctx: *mut c_void,
    cb: Option<Callback>,
    ud: *mut c_void,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if let Some(context) = contexts().get(&(ctx as usize)) {
            context.set_event_callback(cb, ud);
        }
    }));
}
