//! The bridge to the C library: one dispatcher thread per node makes every library call,
//! and callbacks are routed to the waiting futures through a registry of pending requests.
//!
//! Each request gets an id, passed to the library as its `userData`. The callback looks the
//! id up: progress goes to the request's sink without blocking, the terminal callback
//! removes the entry (so it completes exactly once) and answers the future. A call that
//! returns non-zero removes its entry if the callback did not already (so nothing is freed
//! twice and nothing leaks), and destroying a node fails all its pending requests. Dropping
//! a request's future is always sound: the entry only holds a sender.
//!
//! Anything the library may read after a call returns (strings, chunk data, the address
//! array of `codex_connect`, which the reference does not copy) is kept in the entry until
//! the terminal callback.

use std::any::Any;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Mutex, MutexGuard};

use bytes::Bytes;
use codex_sys as sys;
use once_cell::sync::Lazy;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};

/// Where a request's RET_PROGRESS callbacks go.
pub(crate) enum Progress {
    /// Ignore progress.
    None,
    /// Data chunks (downloads). Sized so the library never finds it full: one chunk per
    /// `download_chunk` request.
    Data(mpsc::Sender<Bytes>),
    /// Byte counts (upload_file reports the size of each stored block): added up.
    Count(watch::Sender<u64>),
}

struct Pending {
    node: u64,
    progress: Progress,
    done: oneshot::Sender<Result<Vec<u8>, String>>,
    /// Memory the library may still read; freed with the entry.
    _keep: Box<dyn Any + Send>,
}

/// The message of requests failed because their node is gone.
const DESTROYED: &str = "the node has been destroyed";

static PENDING: Lazy<Mutex<HashMap<u64, Pending>>> = Lazy::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn pending() -> MutexGuard<'static, HashMap<u64, Pending>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies a callback message (valid only during the callback; `len` is authoritative).
///
/// # Safety
/// `msg` must be NULL or valid for `len` bytes.
unsafe fn message(msg: *const c_char, len: usize) -> Vec<u8> {
    if msg.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: guaranteed by the caller (the library's callback contract).
    unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) }.to_vec()
}

/// The callback of every request. Never unwinds into C, never blocks, never calls the library.
unsafe extern "C" fn trampoline(code: c_int, msg: *const c_char, len: usize, ud: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let id = ud as u64;
        if code == sys::RET_PROGRESS {
            let table = pending();
            let Some(p) = table.get(&id) else { return };
            match &p.progress {
                Progress::None => {}
                Progress::Data(tx) => {
                    // SAFETY: the library's contract for `msg`/`len`.
                    let data = Bytes::from(unsafe { message(msg, len) });
                    if tx.try_send(data).is_err() {
                        tracing::error!(id, "download chunk had nowhere to go");
                    }
                }
                Progress::Count(tx) => tx.send_modify(|n| *n += len as u64),
            }
            return;
        }
        let Some(p) = pending().remove(&id) else {
            return;
        };
        // SAFETY: the library's contract for `msg`/`len`.
        let bytes = unsafe { message(msg, len) };
        let result = if code == sys::RET_OK {
            Ok(bytes)
        } else {
            Err(String::from_utf8_lossy(&bytes).into_owned())
        };
        let _ = p.done.send(result);
    }));
}

/// The event callback: forwards JSON events to the node's broadcast channel.
unsafe extern "C" fn event_trampoline(
    code: c_int,
    msg: *const c_char,
    len: usize,
    ud: *mut c_void,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if code != sys::RET_OK {
            return;
        }
        // SAFETY: the library's contract for `msg`/`len`.
        let bytes = unsafe { message(msg, len) };
        let sinks = EVENT_SINKS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = sinks.get(&(ud as u64)) {
            let _ = tx.send(bytes);
        }
    }));
}

static EVENT_SINKS: Lazy<Mutex<HashMap<u64, tokio::sync::broadcast::Sender<Vec<u8>>>>> =
    Lazy::new(Default::default);

/// The library's opaque node handle.
#[derive(Clone, Copy)]
pub(crate) struct Ctx(*mut c_void);

// SAFETY: the handle is an opaque token that is only passed back to the library, and only on
// the dispatcher thread; the library itself is thread-safe per its contract.
unsafe impl Send for Ctx {}

impl Ctx {
    pub(crate) fn ptr(self) -> *mut c_void {
        self.0
    }
}

type Job = Box<dyn FnOnce(&mut Option<Ctx>) + Send>;

/// The signature of the library's functions that take one string argument.
pub(crate) type TextFn =
    unsafe extern "C" fn(*mut c_void, *const c_char, sys::CodexCallback, *mut c_void) -> c_int;

/// What a request needs to make its call: the node handle, the callback and its user data.
pub(crate) struct Call {
    pub(crate) ctx: *mut c_void,
    pub(crate) cb: sys::CodexCallback,
    pub(crate) ud: *mut c_void,
}

/// The thread that makes every library call of one node.
pub(crate) struct Dispatcher {
    node: u64,
    /// `None` after teardown: the thread ends once its last job has run.
    jobs: Mutex<Option<std_mpsc::SyncSender<Job>>>,
    events: tokio::sync::broadcast::Sender<Vec<u8>>,
}

/// How many calls may wait for the dispatcher before callers wait in turn.
const QUEUE: usize = 1024;

impl Dispatcher {
    pub(crate) fn spawn() -> Result<Self> {
        static NODES: AtomicU64 = AtomicU64::new(1);
        let node = NODES.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = std_mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name(format!("codex-dispatch-{node}"))
            .spawn(move || {
                let mut ctx = None;
                while let Ok(job) = rx.recv() {
                    job(&mut ctx);
                }
            })
            .map_err(|e| Error::io("starting the libcodex dispatcher thread", e))?;
        let (events, _) = tokio::sync::broadcast::channel(1024);
        EVENT_SINKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, events.clone());
        Ok(Self {
            node,
            jobs: Mutex::new(Some(tx)),
            events,
        })
    }

    /// Events as raw JSON.
    pub(crate) fn events(&self) -> tokio::sync::broadcast::Receiver<Vec<u8>> {
        self.events.subscribe()
    }

    fn run(&self, job: Job) -> Result<()> {
        let tx = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let tx = tx.ok_or(Error::Destroyed)?;
        tx.send(job).map_err(|_| Error::Destroyed)
    }

    /// Makes one call. `call` runs on the dispatcher thread with the node handle (None until
    /// the node exists, and after it is destroyed, in which case the request fails);
    /// `keep` is memory the library may read until the terminal callback.
    pub(crate) fn request(
        &self,
        progress: Progress,
        keep: Box<dyn Any + Send>,
        call: impl FnOnce(Call) -> c_int + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<Vec<u8>, String>>> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        pending().insert(
            id,
            Pending {
                node: self.node,
                progress,
                done,
                _keep: keep,
            },
        );
        let job: Job = Box::new(move |ctx| {
            let failure = match ctx {
                None => DESTROYED,
                Some(ctx) => {
                    let c = Call {
                        ctx: ctx.ptr(),
                        cb: Some(trampoline),
                        ud: id as *mut c_void,
                    };
                    match catch_unwind(AssertUnwindSafe(|| call(c))) {
                        Ok(rc) if rc == sys::RET_OK => return,
                        Ok(rc) if rc == sys::RET_MISSING_CALLBACK => "libcodex saw no callback",
                        Ok(_) => "libcodex refused the request",
                        Err(_) => "panic while calling libcodex",
                    }
                }
            };
            // A synchronous RET_ERR already answered through the callback; otherwise answer.
            if let Some(p) = pending().remove(&id) {
                let _ = p.done.send(Err(failure.to_owned()));
            }
        });
        if let Err(e) = self.run(job) {
            pending().remove(&id);
            return Err(e);
        }
        Ok(rx)
    }

    /// Calls a `(ctx, text, cb, ud)` function of the library with `arg`, which (with `keep`)
    /// stays alive until the terminal callback.
    pub(crate) fn request_text(
        &self,
        f: TextFn,
        arg: CString,
        progress: Progress,
        keep: Box<dyn Any + Send>,
    ) -> Result<oneshot::Receiver<Result<Vec<u8>, String>>> {
        let p = arg.as_ptr() as usize;
        self.request(progress, Box::new((arg, keep)), move |c| {
            // SAFETY: `f` is a libcodex function of this signature; the string lives in the
            // request's keep-alive; handle, callback and user data come from `request`.
            unsafe { f(c.ctx, p as *const c_char, c.cb, c.ud) }
        })
    }

    /// Creates the node on the dispatcher thread.
    pub(crate) fn create(
        &self,
        config: CString,
    ) -> Result<oneshot::Receiver<Result<Vec<u8>, String>>> {
        let node = self.node;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        pending().insert(
            id,
            Pending {
                node,
                progress: Progress::None,
                done,
                _keep: Box::new(()),
            },
        );
        let job: Job = Box::new(move |slot| {
            // SAFETY: `config` is a valid C string for the call; the callback and its id follow
            // the registry protocol above.
            let ptr =
                unsafe { sys::codex_new(config.as_ptr(), Some(trampoline), id as *mut c_void) };
            if ptr.is_null() {
                if let Some(p) = pending().remove(&id) {
                    let _ = p.done.send(Err("codex_new failed".to_owned()));
                }
                return;
            }
            // SAFETY: a live handle; the event user data is this node's id in EVENT_SINKS.
            unsafe {
                sys::codex_set_event_callback(ptr, Some(event_trampoline), node as *mut c_void)
            };
            *slot = Some(Ctx(ptr));
        });
        if let Err(e) = self.run(job) {
            pending().remove(&id);
            return Err(e);
        }
        Ok(rx)
    }

    /// Tears the node down on the dispatcher thread: unregisters events, stops and closes
    /// the node (waiting up to `wait` for each), destroys it, fails every request still
    /// pending, and ends the thread. `done` fires when all that is over.
    pub(crate) fn teardown(&self, wait: std::time::Duration, done: Option<oneshot::Sender<()>>) {
        let node = self.node;
        let job: Job = Box::new(move |slot| {
            let mut destroyed = true;
            if let Some(ctx) = slot.take() {
                let p = ctx.ptr();
                // SAFETY: `p` is the live handle; NULL callback unregisters.
                unsafe { sys::codex_set_event_callback(p, None, std::ptr::null_mut()) };
                let sync_call = |f: &dyn Fn(Call) -> c_int| {
                    let (tx, rx) = oneshot::channel();
                    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                    pending().insert(
                        id,
                        Pending {
                            node,
                            progress: Progress::None,
                            done: tx,
                            _keep: Box::new(()),
                        },
                    );
                    let rc = f(Call {
                        ctx: p,
                        cb: Some(trampoline),
                        ud: id as *mut c_void,
                    });
                    if rc != sys::RET_OK {
                        pending().remove(&id);
                        return;
                    }
                    let deadline = std::time::Instant::now() + wait;
                    let mut rx = rx;
                    while std::time::Instant::now() < deadline {
                        match rx.try_recv() {
                            Err(oneshot::error::TryRecvError::Empty) => {
                                std::thread::sleep(std::time::Duration::from_millis(2));
                            }
                            _ => return,
                        }
                    }
                    tracing::warn!("libcodex did not answer during teardown; going on");
                };
                // Always try to stop (a start may have been requested by a dropped future);
                // a node that is not started just answers an error.
                // SAFETY: live handle, registered callback and id.
                sync_call(&|c| unsafe { sys::codex_stop(c.ctx, c.cb, c.ud) });
                // SAFETY: as above.
                sync_call(&|c| unsafe { sys::codex_close(c.ctx, c.cb, c.ud) });
                // The reference refuses a NULL callback (RET_MISSING_CALLBACK) even here,
                // where it never calls it: pass the trampoline with user data 0, which no
                // request uses (ids start at 1), so a stray call would be ignored.
                // SAFETY: live handle; the trampoline ignores unknown ids.
                let rc = unsafe { sys::codex_destroy(p, Some(trampoline), std::ptr::null_mut()) };
                destroyed = rc == sys::RET_OK;
                if !destroyed {
                    tracing::warn!(rc, "codex_destroy failed; the library may still run");
                }
            }
            // Nothing will answer the requests still pending now: fail them. What they kept
            // alive is freed only if the library is really gone; otherwise it may still read
            // it, so it is leaked on purpose.
            let orphans: Vec<Pending> = {
                let mut table = pending();
                let ids: Vec<u64> = table
                    .iter()
                    .filter(|(_, p)| p.node == node)
                    .map(|(id, _)| *id)
                    .collect();
                ids.into_iter().filter_map(|id| table.remove(&id)).collect()
            };
            for p in orphans {
                let Pending {
                    done, _keep: keep, ..
                } = p;
                let _ = done.send(Err(DESTROYED.to_owned()));
                if !destroyed {
                    std::mem::forget(keep);
                }
            }
            EVENT_SINKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&node);
            if let Some(done) = done {
                let _ = done.send(());
            }
        });
        let _ = self.run(job);
        // No more jobs: the thread ends after the teardown job.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Whether teardown has been requested.
    pub(crate) fn is_closed(&self) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }
}

/// A C string from Rust text; an interior NUL is a clear error.
pub(crate) fn cstring(what: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Config {
        key: what,
        message: "contains a NUL byte".into(),
    })
}

/// Awaits a request's terminal answer.
pub(crate) async fn answer(mut rx: oneshot::Receiver<Result<Vec<u8>, String>>) -> Result<Vec<u8>> {
    answer_ref(&mut rx).await
}

/// [`answer`] without taking the receiver: if the future is dropped, the receiver still
/// gets the answer later.
pub(crate) async fn answer_ref(
    rx: &mut oneshot::Receiver<Result<Vec<u8>, String>>,
) -> Result<Vec<u8>> {
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(msg)) if msg == DESTROYED => Err(Error::Destroyed),
        Ok(Err(msg)) => Err(Error::Library(msg)),
        Err(_) => Err(Error::Destroyed),
    }
}
