//! The callback contract of libcodex (`ABI.md`), proved through the raw C ABI of `codex-sys`
//! (the vendored node): every accepted request gets zero or more `RET_PROGRESS` callbacks and
//! then exactly one terminal `RET_OK`/`RET_ERR`, on a thread of the node; a refused request
//! has already had its one `RET_ERR` callback, on the caller's thread, before the function
//! returns; a NULL callback does no work; nothing is called back once `codex_destroy` has
//! returned. Around that, the payloads of every operation and its answers to bad input.
//!
//! Each test drives its own nodes, each in a fresh data-dir with a small quota. Every
//! callback is recorded by [`record`] into a leaked [`Recorder`] (so even a wrong late
//! callback could not dangle); the test waits for terminal callbacks with a timeout and
//! never hangs. When a node is destroyed, [`TestNode::destroy`] checks the whole history
//! of each of its requests: no callback lost, none duplicated, none after the terminal one.

mod common;
use common::pseudo_random as data;

use std::ffi::{c_char, c_int, c_void, CString};
use std::fmt;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use codex_sys::{
    codex_close, codex_connect, codex_debug, codex_destroy, codex_download_cancel,
    codex_download_chunk, codex_download_init, codex_download_manifest, codex_download_stream,
    codex_log_level, codex_new, codex_peer_debug, codex_peer_id, codex_repo, codex_revision,
    codex_set_event_callback, codex_spr, codex_start, codex_stop, codex_storage_delete,
    codex_storage_exists, codex_storage_fetch, codex_storage_list, codex_storage_space,
    codex_upload_cancel, codex_upload_chunk, codex_upload_file, codex_upload_finalize,
    codex_upload_init, codex_version, CodexCallback, ABI_VERSION, RET_ERR, RET_MISSING_CALLBACK,
    RET_OK, RET_PROGRESS,
};
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long any single wait may take before the test fails (instead of hanging).
const TIMEOUT: Duration = Duration::from_secs(20);

/// The quota of every test node: small, so it fits on any disk.
const QUOTA: u64 = 64 << 20;

/// The default block size of an upload (`chunkSize` 0).
const BLOCK: usize = 65536;

/// The reference's pinned vectors (ABI.md, vectors.json).
const HELLO_CID: &str = "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM";
const SOME_FILE_CID: &str = "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy";
const SOME_FILE_TREE: &str = "zDzSvJTezk7bJNQqFq8k1iHXY84psNuUfZVusA5bBQQUSuyzDSVL";
const THREE_BLOCKS_TREE: &str = "zDzSvJTfF5HWJpRa3BxWkAj7ecnNwZ7GSbsYj8SmvS4WWv3F6aQQ";

/// The signature shared by the functions that take only a context.
type CtxFn = unsafe extern "C" fn(*mut c_void, CodexCallback, *mut c_void) -> c_int;

/// The signature shared by the functions that take a context and one string.
type StrFn = unsafe extern "C" fn(*mut c_void, *const c_char, CodexCallback, *mut c_void) -> c_int;

// ---------------------------------------------------------------------------------------
// Recording callbacks
// ---------------------------------------------------------------------------------------

/// One callback as received.
#[derive(Clone)]
struct Call {
    code: c_int,
    /// The bytes at `msg` (`len` of them), or `None` when `msg` was NULL.
    msg: Option<Vec<u8>>,
    len: usize,
    thread: ThreadId,
}

impl Call {
    fn text(&self) -> String {
        String::from_utf8_lossy(self.msg.as_deref().unwrap_or_default()).into_owned()
    }

    fn is_terminal(&self) -> bool {
        self.code == RET_OK || self.code == RET_ERR
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            RET_OK => "OK",
            RET_ERR => "ERR",
            RET_PROGRESS => "PROGRESS",
            RET_MISSING_CALLBACK => "MISSING_CALLBACK",
            _ => "?",
        };
        let msg = match &self.msg {
            None => "NULL".to_owned(),
            Some(m) if m.len() > 120 => format!("{} bytes", m.len()),
            Some(m) => format!("{:?}", String::from_utf8_lossy(m)),
        };
        write!(f, "{code}(len {}, {msg})", self.len)
    }
}

/// Code run inside the callback, before the call is recorded.
type Hook = Box<dyn Fn(&Call) + Send + Sync>;

/// Every callback of one request (or of the event callback), in order.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    changed: Condvar,
    hook: Option<Hook>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recorder {
    /// A recorder that lives for the rest of the process.
    fn leak() -> &'static Recorder {
        Box::leak(Box::default())
    }

    /// A recorder that runs `hook` inside each callback before recording it.
    fn with_hook(hook: impl Fn(&Call) + Send + Sync + 'static) -> &'static Recorder {
        Box::leak(Box::new(Recorder {
            hook: Some(Box::new(hook)),
            ..Recorder::default()
        }))
    }

    fn ud(&'static self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    fn snapshot(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    fn count(&self) -> usize {
        lock(&self.calls).len()
    }

    /// Waits until the calls satisfy `done`; fails the test after [`TIMEOUT`].
    fn wait_until(&self, what: &str, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + TIMEOUT;
        let mut calls = lock(&self.calls);
        while !done(&calls) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {TIMEOUT:?} waiting for {what}; callbacks so far: {:?}",
                *calls
            );
            calls = self
                .changed
                .wait_timeout(calls, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        calls.clone()
    }
}

/// The callback every test passes: records `(code, msg bytes, len, thread)` into the
/// [`Recorder`] that `ud` points to. Never panics (it is called from C).
unsafe extern "C" fn record(code: c_int, msg: *const c_char, len: usize, ud: *mut c_void) {
    let msg = (!msg.is_null()).then(|| {
        // SAFETY: the ABI makes a non-NULL `msg` valid for `len` bytes during the callback.
        unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) }.to_vec()
    });
    let call = Call {
        code,
        msg,
        len,
        thread: thread::current().id(),
    };
    // SAFETY: every `ud` the tests pass is a leaked `Recorder`.
    let rec = unsafe { &*ud.cast::<Recorder>() };
    if let Some(hook) = &rec.hook {
        hook(&call);
    }
    lock(&rec.calls).push(call);
    rec.changed.notify_all();
}

/// A gate a callback can be held at: the first time [`Hold::pause`] runs it blocks until
/// the test calls [`Hold::release`] (or [`TIMEOUT`] passes: a callback must never hang).
#[derive(Default)]
struct Hold {
    /// (paused once, released)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Hold {
    fn leak() -> &'static Hold {
        Box::leak(Box::default())
    }

    fn pause(&self) {
        let mut s = lock(&self.state);
        if s.0 {
            return;
        }
        s.0 = true;
        self.changed.notify_all();
        let deadline = Instant::now() + TIMEOUT;
        while !s.1 && Instant::now() < deadline {
            s = self
                .changed
                .wait_timeout(s, deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn wait_paused(&self) {
        let deadline = Instant::now() + TIMEOUT;
        let mut s = lock(&self.state);
        while !s.0 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for a held callback");
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release(&self) {
        lock(&self.state).1 = true;
        self.changed.notify_all();
    }
}

// ---------------------------------------------------------------------------------------
// Requests and their outcomes
// ---------------------------------------------------------------------------------------

/// A request just made: what the function returned, and its recorder.
#[must_use]
struct Pending {
    what: String,
    ret: c_int,
    rec: &'static Recorder,
    caller: ThreadId,
}

/// The whole history of a finished request.
struct Outcome {
    what: String,
    calls: Vec<Call>,
}

impl Pending {
    /// Waits for the terminal callback of an accepted request and checks its history:
    /// progress callbacks, then exactly one terminal one, all on a thread of the node.
    fn wait(self) -> Outcome {
        let what = self.what;
        let calls = self.rec.snapshot();
        assert_eq!(
            self.ret, RET_OK,
            "{what}: the request was refused (returned {}); callbacks: {calls:?}",
            self.ret
        );
        let calls = self
            .rec
            .wait_until(&format!("the terminal callback of {what}"), |c| {
                c.iter().any(Call::is_terminal)
            });
        let end = calls.len() - 1;
        for (i, c) in calls.iter().enumerate() {
            if i < end {
                assert_eq!(c.code, RET_PROGRESS, "{what}: callback {i} of {calls:?}");
            } else {
                assert!(c.is_terminal(), "{what}: {calls:?}");
            }
            assert_ne!(
                c.thread, self.caller,
                "{what}: callback {i} ran on the caller's thread: {calls:?}"
            );
        }
        Outcome { what, calls }
    }

    /// Waits and asserts the request succeeded.
    fn ok(self) -> Outcome {
        let out = self.wait();
        assert_eq!(out.code(), RET_OK, "{} failed: {:?}", out.what, out.calls);
        out
    }

    /// The text of a successful answer.
    fn text(self) -> String {
        self.ok().text()
    }

    /// The JSON of a successful answer.
    fn json(self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out.text())
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", out.what, out.calls))
    }

    /// Asserts the request was refused synchronously: the function returned RET_ERR after
    /// exactly one RET_ERR callback on the caller's thread. Returns the message.
    fn refused(self) -> String {
        let calls = self.rec.snapshot();
        let what = &self.what;
        assert_eq!(self.ret, RET_ERR, "{what} was not refused: {calls:?}");
        assert_eq!(calls.len(), 1, "{what}: {calls:?}");
        assert_eq!(calls[0].code, RET_ERR, "{what}: {calls:?}");
        assert_eq!(calls[0].thread, self.caller, "{what}: {calls:?}");
        let msg = calls[0].text();
        assert!(!msg.is_empty(), "{what}: RET_ERR without a message");
        msg
    }

    /// Asserts the request failed, refused at once or answered RET_ERR later (with no data
    /// before it). Returns the message.
    fn fails(self) -> String {
        if self.ret == RET_ERR {
            return self.refused();
        }
        let out = self.wait();
        assert_eq!(
            out.code(),
            RET_ERR,
            "{} did not fail: {:?}",
            out.what,
            out.calls
        );
        assert_eq!(out.calls.len(), 1, "{}: {:?}", out.what, out.calls);
        let msg = out.text();
        assert!(!msg.is_empty(), "{}: RET_ERR without a message", out.what);
        msg
    }
}

impl Outcome {
    fn terminal(&self) -> &Call {
        self.calls
            .last()
            .expect("an outcome has a terminal callback")
    }

    fn code(&self) -> c_int {
        self.terminal().code
    }

    fn text(&self) -> String {
        self.terminal().text()
    }

    fn progress(&self) -> &[Call] {
        &self.calls[..self.calls.len() - 1]
    }

    /// The concatenated data of the progress callbacks.
    fn data(&self) -> Vec<u8> {
        self.progress()
            .iter()
            .flat_map(|c| {
                assert_eq!(
                    c.msg.as_ref().map(Vec::len),
                    Some(c.len),
                    "{}: a data callback without data",
                    self.what
                );
                c.msg.clone().unwrap_or_default()
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------

/// The configuration JSON of a test node: `dir`, the small quota, no log output, and `extra`.
fn config(dir: &Path, extra: &Value) -> String {
    let mut cfg = json!({
        "data-dir": dir.to_str().expect("temporary paths are UTF-8"),
        "storage-quota": QUOTA,
        "log-format": "none",
    });
    if let (Some(cfg), Some(extra)) = (cfg.as_object_mut(), extra.as_object()) {
        cfg.extend(extra.clone());
    }
    cfg.to_string()
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in test strings")
}

/// Calls `codex_new`; returns the context (maybe NULL) and the recorder of its callback.
fn new_node(config: &str) -> (*mut c_void, &'static Recorder) {
    let rec = Recorder::leak();
    let cfg = c(config);
    // SAFETY: a NUL-terminated config, our callback and a leaked recorder.
    let ctx = unsafe { codex_new(cfg.as_ptr(), Some(record), rec.ud()) };
    (ctx, rec)
}

/// A request made through a node, kept to check its history when the node is destroyed.
struct Tracked {
    what: String,
    rec: &'static Recorder,
    accepted: bool,
}

/// A node created through `codex_new`, destroyed (and its requests checked) at the end.
struct TestNode {
    ctx: *mut c_void,
    dir: PathBuf,
    _tmp: Option<TempDir>,
    requests: Mutex<Vec<Tracked>>,
    destroyed: bool,
}

impl TestNode {
    /// A node in a fresh data-dir.
    fn new() -> Self {
        Self::with(&json!({}))
    }

    /// A node in a fresh data-dir with `extra` configuration keys.
    fn with(extra: &Value) -> Self {
        let tmp = tempfile::tempdir().expect("a temporary data-dir");
        let mut node = Self::at(tmp.path(), extra);
        node._tmp = Some(tmp);
        node
    }

    /// A node in `dir`, which the caller keeps alive.
    fn at(dir: &Path, extra: &Value) -> Self {
        let caller = thread::current().id();
        let (ctx, rec) = new_node(&config(dir, extra));
        let calls = rec.wait_until("the callback of codex_new", |c| !c.is_empty());
        assert!(!ctx.is_null(), "codex_new failed: {calls:?}");
        assert_eq!(calls.len(), 1, "codex_new: {calls:?}");
        assert_eq!(calls[0].code, RET_OK, "codex_new: {calls:?}");
        assert_ne!(
            calls[0].thread, caller,
            "codex_new answered on the caller's thread"
        );
        Self {
            ctx,
            dir: dir.to_path_buf(),
            _tmp: None,
            requests: Mutex::new(vec![Tracked {
                what: "codex_new".into(),
                rec,
                accepted: true,
            }]),
            destroyed: false,
        }
    }

    /// Makes a request with a fresh recorder. `f` gets the context, callback and user data.
    fn call(
        &self,
        what: impl Into<String>,
        f: impl FnOnce(*mut c_void, CodexCallback, *mut c_void) -> c_int,
    ) -> Pending {
        self.call_with(what, Recorder::leak(), f)
    }

    /// Makes a request recorded by `rec`.
    fn call_with(
        &self,
        what: impl Into<String>,
        rec: &'static Recorder,
        f: impl FnOnce(*mut c_void, CodexCallback, *mut c_void) -> c_int,
    ) -> Pending {
        let what = what.into();
        let ret = f(self.ctx, Some(record), rec.ud());
        assert!(
            ret == RET_OK || ret == RET_ERR,
            "{what} returned {ret}, neither RET_OK nor RET_ERR"
        );
        lock(&self.requests).push(Tracked {
            what: what.clone(),
            rec,
            accepted: ret == RET_OK,
        });
        Pending {
            what,
            ret,
            rec,
            caller: thread::current().id(),
        }
    }

    fn simple(&self, what: &str, f: CtxFn) -> Pending {
        // SAFETY: `f` is one of the context-only functions of the header.
        self.call(what, |ctx, cb, ud| unsafe { f(ctx, cb, ud) })
    }

    fn with_str(&self, what: &str, f: StrFn, arg: &str) -> Pending {
        let arg_c = c(arg);
        // SAFETY: `f` takes a context and a NUL-terminated string, copied before it returns.
        self.call(format!("{what}({arg:?})"), |ctx, cb, ud| unsafe {
            f(ctx, arg_c.as_ptr(), cb, ud)
        })
    }

    fn start(&self) -> Pending {
        self.simple("start", codex_start)
    }

    fn stop(&self) -> Pending {
        self.simple("stop", codex_stop)
    }

    fn close(&self) -> Pending {
        self.simple("close", codex_close)
    }

    fn space(&self) -> Value {
        self.simple("storage_space", codex_storage_space).json()
    }

    fn list(&self) -> Value {
        self.simple("storage_list", codex_storage_list).json()
    }

    fn manifest(&self, cid: &str) -> Pending {
        self.with_str("download_manifest", codex_download_manifest, cid)
    }

    fn exists(&self, cid: &str) -> Pending {
        self.with_str("storage_exists", codex_storage_exists, cid)
    }

    fn delete(&self, cid: &str) -> Pending {
        self.with_str("storage_delete", codex_storage_delete, cid)
    }

    fn fetch(&self, cid: &str) -> Pending {
        self.with_str("storage_fetch", codex_storage_fetch, cid)
    }

    fn upload_init(&self, name: Option<&str>, chunk_size: usize) -> Pending {
        let name_c = name.map(c);
        let p = name_c.as_ref().map_or(ptr::null(), |n| n.as_ptr());
        // SAFETY: a NUL-terminated file name or NULL.
        self.call(
            format!("upload_init({name:?}, {chunk_size})"),
            |ctx, cb, ud| unsafe { codex_upload_init(ctx, p, chunk_size, cb, ud) },
        )
    }

    fn upload_chunk(&self, session: &str, data: &[u8]) -> Pending {
        let s = c(session);
        // SAFETY: `data` is readable for its length; the library copies it before returning.
        self.call(
            format!("upload_chunk({session:?}, {} bytes)", data.len()),
            |ctx, cb, ud| unsafe {
                codex_upload_chunk(ctx, s.as_ptr(), data.as_ptr(), data.len(), cb, ud)
            },
        )
    }

    fn upload_finalize(&self, session: &str) -> Pending {
        self.with_str("upload_finalize", codex_upload_finalize, session)
    }

    fn upload_file(&self, session: &str) -> Pending {
        self.with_str("upload_file", codex_upload_file, session)
    }

    fn upload_cancel(&self, session: &str) -> Pending {
        self.with_str("upload_cancel", codex_upload_cancel, session)
    }

    fn download_init(&self, cid: &str, chunk_size: usize) -> Pending {
        let cid_c = c(cid);
        // SAFETY: a NUL-terminated CID.
        self.call(
            format!("download_init({cid:?}, {chunk_size})"),
            |ctx, cb, ud| unsafe {
                codex_download_init(ctx, cid_c.as_ptr(), chunk_size, true, cb, ud)
            },
        )
    }

    fn download_chunk(&self, cid: &str) -> Pending {
        self.with_str("download_chunk", codex_download_chunk, cid)
    }

    fn download_cancel(&self, cid: &str) -> Pending {
        self.with_str("download_cancel", codex_download_cancel, cid)
    }

    fn download_stream_with(
        &self,
        rec: &'static Recorder,
        cid: &str,
        chunk_size: usize,
        path: Option<&Path>,
    ) -> Pending {
        let cid_c = c(cid);
        let path_c = path.map(|p| c(p.to_str().expect("temporary paths are UTF-8")));
        let p = path_c.as_ref().map_or(ptr::null(), |p| p.as_ptr());
        // SAFETY: a NUL-terminated CID and path (or NULL).
        self.call_with(
            format!("download_stream({cid:?}, {chunk_size}, {path:?})"),
            rec,
            |ctx, cb, ud| unsafe {
                codex_download_stream(ctx, cid_c.as_ptr(), chunk_size, true, p, cb, ud)
            },
        )
    }

    fn download_stream(&self, cid: &str, chunk_size: usize, path: Option<&Path>) -> Pending {
        self.download_stream_with(Recorder::leak(), cid, chunk_size, path)
    }

    /// Uploads `data` through a chunk session of `block_size` (0: 65536) in block-sized
    /// chunks; returns the dataset CID.
    fn upload(&self, name: Option<&str>, block_size: usize, data: &[u8]) -> String {
        let session = self.upload_init(name, block_size).text();
        let step = if block_size == 0 { BLOCK } else { block_size };
        for chunk in data.chunks(step) {
            assert_eq!(self.upload_chunk(&session, chunk).text(), "");
        }
        self.upload_finalize(&session).text()
    }

    /// Downloads a whole dataset with `download_stream`.
    fn download(&self, cid: &str) -> Vec<u8> {
        self.download_stream(cid, 0, None).ok().data()
    }

    /// Destroys the node and checks the history of every request it was given: a refused
    /// request had exactly its one RET_ERR; an accepted one progress callbacks, then at
    /// most one terminal callback, and nothing after it.
    fn destroy(&mut self) {
        assert!(!self.destroyed, "destroyed twice by the test");
        self.destroyed = true;
        // SAFETY: a context from codex_new, not destroyed yet.
        let rec = Recorder::leak();
        let ret = unsafe { codex_destroy(self.ctx, Some(record), rec.ud()) };
        assert_eq!(ret, RET_OK, "codex_destroy failed");
        assert_eq!(rec.count(), 0, "codex_destroy called its callback");
        for t in lock(&self.requests).iter() {
            let calls = t.rec.snapshot();
            let what = &t.what;
            if !t.accepted {
                assert_eq!(calls.len(), 1, "refused {what}: {calls:?}");
                assert_eq!(calls[0].code, RET_ERR, "refused {what}: {calls:?}");
                continue;
            }
            let terminals = calls.iter().filter(|c| c.is_terminal()).count();
            assert!(
                terminals <= 1,
                "{what}: {terminals} terminal callbacks: {calls:?}"
            );
            for (i, c) in calls.iter().enumerate() {
                assert!(
                    c.code == RET_PROGRESS || (c.is_terminal() && i == calls.len() - 1),
                    "{what}: callback {i} out of place: {calls:?}"
                );
            }
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if !self.destroyed {
            if thread::panicking() {
                // SAFETY: a context from codex_new; the result does not matter any more.
                unsafe { codex_destroy(self.ctx, None, ptr::null_mut()) };
            } else {
                self.destroy();
            }
        }
    }
}

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or_else(|| panic!("no {key:?} in {v}"))
}

fn u64_of(v: &Value, key: &str) -> u64 {
    field(v, key)
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} is not a number in {v}"))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    field(v, key)
        .as_str()
        .unwrap_or_else(|| panic!("{key:?} is not a string in {v}"))
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn a_null_callback_is_refused_and_does_no_work() {
    // codex_new: NULL, and not even the data-dir is created.
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("never-created");
    let cfg = c(&config(&dir, &json!({})));
    // SAFETY: a NUL-terminated config; a NULL callback is part of the contract.
    let ctx = unsafe { codex_new(cfg.as_ptr(), None, ptr::null_mut()) };
    assert!(ctx.is_null());
    assert!(!dir.exists(), "codex_new did work without a callback");

    let mut node = TestNode::new();
    let name = c("x.txt");
    let session = c("0");
    let bytes = b"some bytes";
    // SAFETY (all calls below): a live context, valid arguments, a NULL callback.
    unsafe {
        assert_eq!(
            codex_version(ptr::null_mut(), None, ptr::null_mut()),
            RET_MISSING_CALLBACK
        );
        assert_eq!(
            codex_revision(node.ctx, None, ptr::null_mut()),
            RET_MISSING_CALLBACK
        );
        assert_eq!(
            codex_start(node.ctx, None, ptr::null_mut()),
            RET_MISSING_CALLBACK
        );
        assert_eq!(
            codex_repo(node.ctx, None, ptr::null_mut()),
            RET_MISSING_CALLBACK
        );
        assert_eq!(
            codex_upload_init(node.ctx, name.as_ptr(), 0, None, ptr::null_mut()),
            RET_MISSING_CALLBACK
        );
        // A bogus context is not even looked at.
        assert_eq!(
            codex_storage_space(0xdead as *mut c_void, None, ptr::null_mut()),
            RET_MISSING_CALLBACK
        );
    }
    // The start did not happen: stopping says the node is not started.
    let msg = node.stop().fails();
    assert!(msg.contains("not started"), "{msg}");
    // The upload_init did not open a session: the first real one is "0".
    assert_eq!(node.upload_init(Some("x.txt"), 0).text(), "0");
    // A chunk without a callback is not written: the session stays empty.
    // SAFETY: a live context, session "0", readable bytes, a NULL callback.
    let ret = unsafe {
        codex_upload_chunk(
            node.ctx,
            session.as_ptr(),
            bytes.as_ptr(),
            bytes.len(),
            None,
            ptr::null_mut(),
        )
    };
    assert_eq!(ret, RET_MISSING_CALLBACK);
    let msg = node.upload_finalize("0").fails();
    assert!(msg.contains("empty"), "{msg}");
    node.destroy();
}

#[test]
fn version_and_revision_answer_once_before_returning_on_the_calling_thread() {
    let me = thread::current().id();
    for (name, f) in [
        ("version", codex_version as CtxFn),
        ("revision", codex_revision),
    ] {
        // With a NULL context, and with a context that is not one: both are ignored.
        for ctx in [ptr::null_mut(), 0xdead as *mut c_void] {
            let rec = Recorder::leak();
            // SAFETY: `ctx` may be anything for these two; a leaked recorder.
            let ret = unsafe { f(ctx, Some(record), rec.ud()) };
            let calls = rec.snapshot();
            assert_eq!(ret, RET_OK, "{name}: {calls:?}");
            assert_eq!(calls.len(), 1, "{name}: {calls:?}");
            assert_eq!(calls[0].code, RET_OK, "{name}: {calls:?}");
            assert_eq!(calls[0].thread, me, "{name} answered on another thread");
            assert_eq!(calls[0].msg.as_ref().map(Vec::len), Some(calls[0].len));
            assert!(!calls[0].text().is_empty(), "{name}: empty answer");
            if name == "version" {
                assert!(calls[0].text().contains(ABI_VERSION), "{calls:?}");
            }
        }
    }
}

#[test]
fn codex_new_refuses_bad_configurations_synchronously() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let me = thread::current().id();
    let cases = [
        (format!("{{\"data-dir\": \"{path}\""), "JSON"),
        ("[1, 2]".to_owned(), "object"),
        (
            config(dir.path(), &json!({"no-such-key": 1})),
            "no-such-key",
        ),
        (
            config(dir.path(), &json!({"storage-quota": "x"})),
            "storage-quota",
        ),
        (
            config(dir.path(), &json!({"log-format": "loud"})),
            "log-format",
        ),
        (config(dir.path(), &json!({"block-ttl": 5})), "block-ttl"),
        (
            config(dir.path(), &json!({"listen-addrs": "/ip4/0.0.0.0/tcp/0"})),
            "listen-addrs",
        ),
        // Valid JSON, but a quota no disk holds.
        (
            config(dir.path(), &json!({"storage-quota": u64::MAX})),
            "storage-quota",
        ),
    ];
    for (cfg, key) in &cases {
        let (ctx, rec) = new_node(cfg);
        let calls = rec.snapshot();
        assert!(ctx.is_null(), "codex_new accepted {cfg}");
        assert_eq!(calls.len(), 1, "{cfg}: {calls:?}");
        assert_eq!(calls[0].code, RET_ERR, "{cfg}: {calls:?}");
        assert_eq!(
            calls[0].thread, me,
            "{cfg}: not answered on the caller's thread"
        );
        assert!(
            calls[0].text().contains(key),
            "the error for {cfg} does not name {key:?}: {calls:?}"
        );
    }
    // A NULL configuration.
    let rec = Recorder::leak();
    // SAFETY: a NULL config is refused by the implementation; a leaked recorder.
    let ctx = unsafe { codex_new(ptr::null(), Some(record), rec.ud()) };
    assert!(ctx.is_null());
    assert_eq!(rec.snapshot().len(), 1);
    assert_eq!(rec.snapshot()[0].code, RET_ERR);

    // A valid one (with a few more keys): a context and exactly one RET_OK, on the node.
    let mut node = TestNode::at(
        dir.path(),
        &json!({"block-ttl": "1h30m", "max-peers": 10, "api-port": 8080, "nat": "none"}),
    );
    let repo = node.simple("repo", codex_repo).text();
    assert_eq!(repo, path);
    node.destroy();
}

#[test]
fn lifecycle_restart_close_destroy_and_reuse_of_the_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = TestNode::at(tmp.path(), &json!({}));
    assert_eq!(node.start().text(), "");
    let msg = node.start().fails();
    assert!(msg.contains("already started"), "{msg}");
    assert_eq!(node.stop().text(), "");
    // Restarting works in this implementation (the reference cannot).
    assert_eq!(node.start().text(), "");
    let kept = data(3000, 1);
    let cid = node.upload(Some("kept.bin"), 0, &kept);
    assert_eq!(node.stop().text(), "");
    let peer = node.simple("peer_id", codex_peer_id).text();
    assert!(peer.starts_with("16Uiu2"), "{peer}");
    let debug = node.simple("debug", codex_debug).json();
    assert_eq!(str_of(&debug, "id"), peer);
    // Sessions still open at close: an upload with data in it, a download half read.
    let open_upload = node.upload_init(Some("late.txt"), 0).text();
    assert_eq!(node.upload_chunk(&open_upload, b"before close").text(), "");
    assert_eq!(node.download_init(&cid, 1000).text(), "");
    assert_eq!(node.download_chunk(&cid).ok().data(), &kept[..1000]);
    let closing = Instant::now();
    assert_eq!(node.close().text(), "");
    assert!(
        closing.elapsed() < Duration::from_secs(4),
        "close waited for the open sessions"
    );
    // Close released the data-dir (this implementation): another node can open it now.
    let mut other = TestNode::at(tmp.path(), &json!({}));
    assert_eq!(other.exists(&cid).text(), "true");
    other.destroy();

    // After close: the sessions are over, and nothing reaches the released store.
    for p in [
        node.upload_chunk(&open_upload, b"after close"),
        node.upload_finalize(&open_upload),
        node.download_chunk(&cid),
    ] {
        let what = p.what.clone();
        let msg = p.fails();
        assert!(
            msg.contains("session") || msg.contains("closed"),
            "{what}: {msg}"
        );
    }
    // Every operation needing the node answers one RET_ERR.
    for p in [
        node.start(),
        node.stop(),
        node.close(),
        node.simple("storage_space", codex_storage_space),
        node.simple("storage_list", codex_storage_list),
        node.manifest(&cid),
        node.exists(&cid),
        node.download_stream(&cid, 0, None),
    ] {
        let what = p.what.clone();
        let msg = p.fails();
        assert!(msg.contains("closed"), "{what}: {msg}");
    }
    node.destroy();

    // After destroy, the same handle: refused synchronously, never a crash.
    for p in [
        node.simple("repo", codex_repo),
        node.simple("storage_space", codex_storage_space),
        node.start(),
        node.upload_init(Some("a.txt"), 0),
        node.download_init(&cid, 0),
        node.exists(&cid),
    ] {
        let msg = p.refused();
        assert!(msg.contains("invalid context"), "{msg}");
    }
    // SAFETY: a destroyed context is answered with an error; so is NULL.
    unsafe {
        codex_set_event_callback(node.ctx, Some(record), Recorder::leak().ud());
        assert_eq!(codex_destroy(node.ctx, None, ptr::null_mut()), RET_ERR);
        assert_eq!(
            codex_destroy(ptr::null_mut(), None, ptr::null_mut()),
            RET_ERR
        );
    }

    // The data-dir is free again for a new node, which finds the dataset.
    let mut again = TestNode::at(tmp.path(), &json!({}));
    assert_eq!(again.exists(&cid).text(), "true");
    assert_eq!(again.download(&cid), kept);
    assert_eq!(
        again.simple("peer_id", codex_peer_id).text(),
        peer,
        "the key persists"
    );
    again.destroy();
}

#[test]
fn destroy_with_requests_in_flight_calls_nothing_back_afterwards() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let mut node = TestNode::at(tmp.path(), &json!({}));
    let small = data(300_000, 2);
    let small_cid = node.upload(None, 0, &small);

    let big_path = files.path().join("big.bin");
    fs::write(&big_path, data(8 << 20, 3)).unwrap();
    let session = node.upload_init(big_path.to_str(), 0).text();
    // The upload's first progress callback is held while destroy starts: destroy must wait
    // for it, and cut off the rest.
    let hold = Hold::leak();
    let upload_rec = Recorder::with_hook(move |c| {
        if c.code == RET_PROGRESS {
            hold.pause();
        }
    });
    let s = c(&session);
    // SAFETY: a live context and a NUL-terminated session id.
    let upload = node.call_with("upload_file(big)", upload_rec, |ctx, cb, ud| unsafe {
        codex_upload_file(ctx, s.as_ptr(), cb, ud)
    });
    assert_eq!(upload.ret, RET_OK);
    // More requests in flight: a stream and a chunk session.
    let stream = node.download_stream(&small_cid, 1000, None);
    assert_eq!(stream.ret, RET_OK);
    let chunks = node.upload_init(None, 0).text();
    let chunk = node.upload_chunk(&chunks, &data(BLOCK * 4, 4));
    assert_eq!(chunk.ret, RET_OK);
    let events = Recorder::leak();
    // SAFETY: a live context; a leaked recorder.
    unsafe { codex_set_event_callback(node.ctx, Some(record), events.ud()) };

    hold.wait_paused();
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        hold.release();
    });
    let started = Instant::now();
    node.destroy();
    releaser.join().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "destroy returned while a callback was still running"
    );
    assert!(
        !upload_rec.snapshot().iter().any(Call::is_terminal),
        "the held upload finished: {:?}",
        upload_rec.snapshot()
    );
    let recs = [upload_rec, stream.rec, chunk.rec, events];
    let counts: Vec<usize> = recs.iter().map(|r| r.count()).collect();
    thread::sleep(Duration::from_millis(300));
    let later: Vec<usize> = recs.iter().map(|r| r.count()).collect();
    assert_eq!(
        counts, later,
        "callbacks arrived after codex_destroy returned"
    );

    // Everything was released: the data-dir serves a new node, with no leftovers.
    let mut again = TestNode::at(tmp.path(), &json!({}));
    let list = again.list();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(str_of(&list[0], "cid"), small_cid);
    assert_eq!(u64_of(&again.space(), "quotaReservedBytes"), 0);
    assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(again.download(&small_cid), small);
    again.destroy();
}

#[test]
fn the_pinned_vectors() {
    let mut node = TestNode::new();
    let session = node.upload_init(Some("hello.txt"), 0).text();
    assert_eq!(session, "0");
    assert_eq!(node.upload_chunk(&session, b"Hello World!").text(), "");
    assert_eq!(node.upload_finalize(&session).text(), HELLO_CID);
    let m = node.manifest(HELLO_CID).json();
    assert_eq!(str_of(&m, "filename"), "hello.txt");
    assert_eq!(str_of(&m, "mimetype"), "text/plain");
    assert_eq!(u64_of(&m, "datasetSize"), 12);
    assert_eq!(u64_of(&m, "blockSize"), 65536);

    // No file name: NULL and "" alike.
    for name in [None, Some("")] {
        let session = node.upload_init(name, 0).text();
        assert!(session.parse::<u64>().is_ok(), "session id {session:?}");
        assert_eq!(
            node.upload_chunk(&session, b"some file contents").text(),
            ""
        );
        assert_eq!(node.upload_finalize(&session).text(), SOME_FILE_CID);
    }
    let m = node.manifest(SOME_FILE_CID).json();
    assert_eq!(str_of(&m, "treeCid"), SOME_FILE_TREE);
    assert_eq!(field(&m, "filename"), &Value::Null);
    assert_eq!(field(&m, "mimetype"), &Value::Null);

    // 131082 bytes of 'a': three blocks.
    let cid = node.upload(None, 0, &[b'a'; 131_082]);
    let m = node.manifest(&cid).json();
    assert_eq!(str_of(&m, "treeCid"), THREE_BLOCKS_TREE);
    assert_eq!(u64_of(&m, "datasetSize"), 131_082);
    node.destroy();
}

#[test]
fn upload_file_reports_each_block_and_downloads_give_it_back() {
    let files = tempfile::tempdir().unwrap();
    let mut node = TestNode::new();
    let size = 5 * BLOCK + 12_345;
    let original = data(size, 5);
    let path = files.path().join("data.bin");
    fs::write(&path, &original).unwrap();

    let session = node.upload_init(path.to_str(), 0).text();
    let up = node.upload_file(&session).ok();
    let cid = up.text();
    assert!(cid.starts_with("zDvZRwzm"), "{cid}");
    let lens: Vec<usize> = up.progress().iter().map(|c| c.len).collect();
    assert!(
        up.progress().iter().all(|c| c.msg.is_none()),
        "{:?}",
        up.calls
    );
    assert_eq!(
        lens,
        [BLOCK, BLOCK, BLOCK, BLOCK, BLOCK, 12_345],
        "one progress callback per stored block, with its byte count"
    );
    assert_eq!(lens.iter().sum::<usize>(), size);
    // The session ended with the upload.
    assert!(node.upload_finalize(&session).fails().contains(&session));
    let m = node.manifest(&cid).json();
    assert_eq!(str_of(&m, "filename"), "data.bin");
    assert_eq!(u64_of(&m, "datasetSize"), size as u64);

    // download_stream: data in the progress callbacks, of the chunk size (the last
    // shorter), and in the file.
    let out = files.path().join("out.bin");
    let dl = node.download_stream(&cid, 0, Some(&out)).ok();
    assert_eq!(dl.text(), "");
    assert_eq!(dl.data(), original);
    assert_eq!(fs::read(&out).unwrap(), original);
    let dl = node.download_stream(&cid, 100_000, None).ok();
    let lens: Vec<usize> = dl.progress().iter().map(|c| c.len).collect();
    assert_eq!(lens, [100_000, 100_000, 100_000, size - 300_000]);
    assert_eq!(dl.data(), original);

    // download_init + download_chunk: at most one data callback per call, none at the end.
    assert_eq!(node.download_init(&cid, 100_000).text(), "");
    let mut got = Vec::new();
    let mut calls = 0;
    loop {
        let out = node.download_chunk(&cid).ok();
        calls += 1;
        assert!(out.progress().len() <= 1, "{:?}", out.calls);
        if out.progress().is_empty() {
            break;
        }
        got.extend(out.data());
        assert!(calls < 100, "download_chunk never reached the end");
    }
    assert_eq!(calls, 5, "four chunks of data, then the end");
    assert_eq!(got, original);
    // The session stays at the end until cancelled.
    assert!(node.download_chunk(&cid).ok().progress().is_empty());
    assert_eq!(node.download_cancel(&cid).text(), "");
    let msg = node.download_chunk(&cid).fails();
    assert!(msg.contains("download_init"), "{msg}");
    let msg = node.download_cancel(&cid).fails();
    assert!(msg.contains(&cid), "{msg}");
    node.destroy();
}

#[test]
fn manifest_list_space_exists_fetch_and_delete() {
    let mut node = TestNode::new();
    let empty = node.space();
    assert_eq!(
        empty,
        json!({"totalBlocks": 0, "quotaMaxBytes": QUOTA, "quotaUsedBytes": 0, "quotaReservedBytes": 0})
    );
    assert_eq!(node.list(), json!([]));

    let content = data(1000, 6);
    let cid = node.upload(Some("a.json"), 0, &content);
    let m = node.manifest(&cid).json();
    let keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "blockSize",
            "datasetSize",
            "filename",
            "mimetype",
            "protected",
            "treeCid"
        ],
        "{m}"
    );
    assert!(str_of(&m, "treeCid").starts_with('z'), "{m}");
    assert_eq!(u64_of(&m, "datasetSize"), 1000);
    assert_eq!(u64_of(&m, "blockSize"), BLOCK as u64);
    assert_eq!(str_of(&m, "filename"), "a.json");
    assert_eq!(str_of(&m, "mimetype"), "application/json");
    assert_eq!(field(&m, "protected"), &json!(false));

    // One block plus the manifest block: used is the block size plus a small manifest.
    let space = node.space();
    assert_eq!(u64_of(&space, "totalBlocks"), 2, "{space}");
    assert_eq!(u64_of(&space, "quotaMaxBytes"), QUOTA);
    let used = u64_of(&space, "quotaUsedBytes");
    assert!(used > BLOCK as u64 && used < BLOCK as u64 + 1024, "{space}");
    assert_eq!(u64_of(&space, "quotaReservedBytes"), 0);

    assert_eq!(node.list(), json!([{"cid": cid, "manifest": m}]));
    assert_eq!(node.exists(&cid).text(), "true");
    assert_eq!(node.fetch(&cid).json(), m);

    assert_eq!(node.delete(&cid).text(), "");
    assert_eq!(node.list(), json!([]));
    assert_eq!(node.exists(&cid).text(), "false");
    assert_eq!(node.space(), empty);
    for p in [
        node.manifest(&cid),
        node.fetch(&cid),
        node.download_init(&cid, 0),
    ] {
        let msg = p.fails();
        assert!(msg.contains("not found"), "{msg}");
    }
    // Deleting what is not stored succeeds.
    assert_eq!(node.delete(&cid).text(), "");
    node.destroy();
}

#[test]
fn malformed_and_unknown_cids_get_one_clear_error() {
    let mut node = TestNode::new();
    let cid_fns: [(&str, StrFn); 6] = [
        ("download_manifest", codex_download_manifest),
        ("storage_exists", codex_storage_exists),
        ("storage_delete", codex_storage_delete),
        ("storage_fetch", codex_storage_fetch),
        ("download_chunk", codex_download_chunk),
        ("download_cancel", codex_download_cancel),
    ];
    for bad in [
        "",
        "hello",
        "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n",
    ] {
        for (name, f) in cid_fns {
            let msg = node.with_str(name, f, bad).fails();
            assert!(!msg.is_empty(), "{name}({bad:?})");
            if !name.starts_with("download_c") {
                assert!(msg.contains("CID"), "{name}({bad:?}): {msg}");
            }
        }
        for p in [
            node.download_init(bad, 0),
            node.download_stream(bad, 0, None),
        ] {
            let what = p.what.clone();
            let msg = p.fails();
            assert!(msg.contains("CID"), "{what}: {msg}");
        }
    }
    // Not UTF-8, and NULL.
    let not_utf8 = CString::new(vec![0xff, 0xfe]).unwrap();
    // SAFETY: a NUL-terminated (if not UTF-8) string, then NULL, which the library refuses.
    let msg = node
        .call("exists(not UTF-8)", |ctx, cb, ud| unsafe {
            codex_storage_exists(ctx, not_utf8.as_ptr(), cb, ud)
        })
        .refused();
    assert!(msg.contains("UTF-8"), "{msg}");
    let msg = node
        .call("manifest(NULL)", |ctx, cb, ud| unsafe {
            codex_download_manifest(ctx, ptr::null(), cb, ud)
        })
        .refused();
    assert!(msg.contains("NULL"), "{msg}");

    // Well-formed but not stored here. One at a time: a download session is busy (and
    // refuses a second request for its CID) until its request is answered.
    let unknown = SOME_FILE_CID;
    let msg = node.manifest(unknown).fails();
    assert!(msg.contains("not found"), "{msg}");
    let msg = node.fetch(unknown).fails();
    assert!(msg.contains("not found"), "{msg}");
    let msg = node.download_init(unknown, 0).fails();
    assert!(msg.contains("not found"), "{msg}");
    let msg = node.download_stream(unknown, 0, None).fails();
    assert!(msg.contains("not found"), "{msg}");
    assert_eq!(node.exists(unknown).text(), "false");
    // A tree CID is not a dataset.
    let msg = node.manifest(SOME_FILE_TREE).fails();
    assert!(msg.contains("manifest"), "{msg}");
    // A failed download_init leaves no session behind.
    let msg = node.download_chunk(unknown).fails();
    assert!(msg.contains("download_init"), "{msg}");
    node.destroy();
}

#[test]
fn upload_sessions_refuse_misuse() {
    let files = tempfile::tempdir().unwrap();
    let mut node = TestNode::new();

    // An empty dataset cannot be uploaded.
    let s = node.upload_init(Some("empty.txt"), 0).text();
    let msg = node.upload_finalize(&s).fails();
    assert!(msg.contains("empty"), "{msg}");
    let s = node.upload_init(Some("empty.txt"), 0).text();
    assert_eq!(node.upload_chunk(&s, b"").text(), "");
    assert!(node.upload_finalize(&s).fails().contains("empty"));

    // Zero-length chunks (also with a NULL pointer) are no-ops: the pinned CID still comes.
    let s = node.upload_init(Some("hello.txt"), 0).text();
    assert_eq!(node.upload_chunk(&s, b"").text(), "");
    let sc = c(&s);
    // SAFETY: a NULL chunk of length 0 is allowed.
    let p = node.call("upload_chunk(NULL, 0)", |ctx, cb, ud| unsafe {
        codex_upload_chunk(ctx, sc.as_ptr(), ptr::null(), 0, cb, ud)
    });
    assert_eq!(p.text(), "");
    assert_eq!(node.upload_chunk(&s, b"Hello ").text(), "");
    assert_eq!(node.upload_chunk(&s, b"").text(), "");
    assert_eq!(node.upload_chunk(&s, b"World!").text(), "");
    assert_eq!(node.upload_finalize(&s).text(), HELLO_CID);
    // The session is gone.
    assert!(node.upload_finalize(&s).fails().contains(&s));
    assert!(node.upload_chunk(&s, b"x").fails().contains(&s));

    // Unknown sessions.
    for id in ["999", "abc", ""] {
        for p in [
            node.upload_chunk(id, b"x"),
            node.upload_finalize(id),
            node.upload_file(id),
            node.upload_cancel(id),
        ] {
            let what = p.what.clone();
            let msg = p.fails();
            assert!(msg.contains("session"), "{what}: {msg}");
        }
    }
    // A NULL chunk with a length.
    let s = node.upload_init(None, 0).text();
    let sc = c(&s);
    // SAFETY: NULL with a non-zero length is refused before anything is read.
    let msg = node
        .call("upload_chunk(NULL, 5)", |ctx, cb, ud| unsafe {
            codex_upload_chunk(ctx, sc.as_ptr(), ptr::null(), 5, cb, ud)
        })
        .refused();
    assert!(msg.contains("NULL"), "{msg}");
    assert_eq!(node.upload_cancel(&s).text(), "");
    // Block sizes above 100 MiB, upload_file without an absolute path or file.
    assert!(node
        .upload_init(None, 200 << 20)
        .fails()
        .contains("100 MiB"));
    let s = node.upload_init(Some("relative.txt"), 0).text();
    assert!(node.upload_file(&s).fails().contains("absolute"));
    let missing = files.path().join("missing.bin");
    let s = node.upload_init(missing.to_str(), 0).text();
    let msg = node.upload_file(&s).fails();
    assert!(msg.contains("missing.bin"), "{msg}");

    // Two chunks sent back to back on one session, the second before the first is
    // answered: each gets exactly one terminal callback, and the stored data is what was
    // accepted, in order.
    let first = data(16 * BLOCK, 7);
    let second = data(BLOCK, 8);
    let s = node.upload_init(None, 0).text();
    let a = node.upload_chunk(&s, &first);
    let b = node.upload_chunk(&s, &second);
    assert_eq!(a.ret, RET_OK, "the first chunk was refused");
    let b_refused = b.ret == RET_ERR;
    assert_eq!(a.text(), "");
    let expected = if b_refused {
        let msg = b.refused();
        assert!(msg.contains("session") && msg.contains(&s), "{msg}");
        first.clone()
    } else {
        let msg = "a chunk sent while another is running may be accepted, then it must succeed";
        assert_eq!(b.text(), "", "{msg}");
        [first.clone(), second].concat()
    };
    let cid = node.upload_finalize(&s).text();
    assert_eq!(node.download(&cid), expected);
    node.destroy();
}

#[test]
fn upload_cancel_stops_a_running_upload_file() {
    let files = tempfile::tempdir().unwrap();
    let mut node = TestNode::new();
    let path = files.path().join("big.bin");
    fs::write(&path, data(8 << 20, 9)).unwrap();
    let session = node.upload_init(path.to_str(), 0).text();
    // Hold the first progress callback so the upload is surely running when cancelled.
    let hold = Hold::leak();
    let rec = Recorder::with_hook(move |c| {
        if c.code == RET_PROGRESS {
            hold.pause();
        }
    });
    let s = c(&session);
    // SAFETY: a live context and a NUL-terminated session id.
    let upload = node.call_with("upload_file(big)", rec, |ctx, cb, ud| unsafe {
        codex_upload_file(ctx, s.as_ptr(), cb, ud)
    });
    hold.wait_paused();
    let cancel = node.upload_cancel(&session);
    hold.release();
    assert_eq!(cancel.text(), "");
    let out = upload.wait();
    assert_eq!(
        out.code(),
        RET_ERR,
        "the cancelled upload succeeded: {:?}",
        out.calls
    );
    assert!(out.text().contains("cancel"), "{}", out.text());
    assert!(out.progress().len() < 128, "the whole file was stored");
    // Nothing of it stays: no dataset, nothing reserved or used.
    assert_eq!(node.list(), json!([]));
    let space = node.space();
    assert_eq!(u64_of(&space, "quotaUsedBytes"), 0, "{space}");
    assert_eq!(u64_of(&space, "quotaReservedBytes"), 0, "{space}");
    node.destroy();
}

#[test]
fn exceeding_the_quota_fails_and_keeps_the_store_consistent() {
    let files = tempfile::tempdir().unwrap();
    let mut node = TestNode::with(&json!({"storage-quota": 1 << 20}));
    let small = data(100_000, 10);
    let small_cid = node.upload(Some("small.bin"), 0, &small);
    let before = node.space();

    // Through chunks: one chunk fails, naming the quota; the session cannot be finished.
    let big = data(2 << 20, 11);
    let s = node.upload_init(None, 0).text();
    let mut failure = None;
    for chunk in big.chunks(BLOCK) {
        let out = node.upload_chunk(&s, chunk).wait();
        if out.code() == RET_ERR {
            failure = Some(out.text());
            break;
        }
    }
    let msg = failure.expect("2 MiB were stored under a 1 MiB quota");
    assert!(msg.contains("quota"), "{msg}");
    let msg = node.upload_finalize(&s).fails();
    assert!(!msg.is_empty());
    assert_eq!(node.space(), before);

    // Through upload_file.
    let path = files.path().join("big.bin");
    fs::write(&path, &big).unwrap();
    let s = node.upload_init(path.to_str(), 0).text();
    // Progress for the blocks that fit, then the error.
    let out = node.upload_file(&s).wait();
    assert_eq!(out.code(), RET_ERR, "{:?}", out.calls);
    assert!(out.text().contains("quota"), "{}", out.text());
    assert!(out.progress().len() < 16, "{:?}", out.calls);
    assert_eq!(node.space(), before);

    // The earlier dataset is intact.
    let list = node.list();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(node.download(&small_cid), small);
    assert_eq!(fs::read_dir(node.dir.join("tmp")).unwrap().count(), 0);
    node.destroy();
}

#[test]
fn a_corrupt_block_is_reported_and_never_returned() {
    let mut node = TestNode::new();
    let original = data(4 * BLOCK, 12);
    let cid = node.upload(None, 0, &original);
    let dats: Vec<PathBuf> = fs::read_dir(node.dir.join("blocks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .collect();
    assert_eq!(dats.len(), 1, "{dats:?}");
    // Flip 16 bytes inside block 2.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dats[0])
        .unwrap();
    let at = (2 * BLOCK + 100) as u64;
    let mut bytes = [0u8; 16];
    file.read_exact_at(&mut bytes, at).unwrap();
    for b in &mut bytes {
        *b ^= 0xff;
    }
    file.write_all_at(&bytes, at).unwrap();
    drop(file);
    let corrupt_block = &original[2 * BLOCK..3 * BLOCK];

    let out = node.download_stream(&cid, 0, None).wait();
    assert_eq!(out.code(), RET_ERR, "{:?}", out.calls);
    assert!(out.text().contains("corrupt"), "{}", out.text());
    let got = out.data();
    assert!(
        got.len() <= 2 * BLOCK,
        "data past the corrupt block: {:?}",
        out.calls
    );
    assert_eq!(got, original[..got.len()], "the data before it is intact");
    // So nothing at or after the corrupt block's offset came out, in whatever form.
    let mut flipped = corrupt_block.to_vec();
    for b in &mut flipped[100..116] {
        *b ^= 0xff;
    }
    for c in out.progress() {
        let m = c.msg.as_deref().unwrap_or_default();
        assert!(
            m != corrupt_block && m != flipped.as_slice(),
            "the corrupt block was returned"
        );
    }

    // The chunk API: two good chunks, then the error, then the session is failed.
    assert_eq!(node.download_init(&cid, 0).text(), "");
    assert_eq!(node.download_chunk(&cid).ok().data(), &original[..BLOCK]);
    assert_eq!(
        node.download_chunk(&cid).ok().data(),
        &original[BLOCK..2 * BLOCK]
    );
    let msg = node.download_chunk(&cid).fails();
    assert!(msg.contains("corrupt"), "{msg}");
    assert!(node.download_chunk(&cid).fails().contains("failed"));
    assert_eq!(node.download_cancel(&cid).text(), "");
    // The manifest itself is fine.
    assert_eq!(
        u64_of(&node.manifest(&cid).json(), "datasetSize"),
        4 * BLOCK as u64
    );
    node.destroy();
}

#[test]
fn a_stream_cancelled_midway_ends_with_ok_and_truncated_data() {
    let mut node = TestNode::new();
    let original = data(4 << 20, 13);
    let cid = node.upload(None, 0, &original);
    let size = u64_of(&node.manifest(&cid).json(), "datasetSize") as usize;
    assert_eq!(size, original.len());

    let hold = Hold::leak();
    let rec = Recorder::with_hook(move |c| {
        if c.code == RET_PROGRESS {
            hold.pause();
        }
    });
    let stream = node.download_stream_with(rec, &cid, 0, None);
    // The stream is inside its first data callback, on a node thread; cancel from here.
    hold.wait_paused();
    let cancel = node.download_cancel(&cid);
    hold.release();
    assert_eq!(cancel.text(), "");
    let out = stream.ok();
    let got = out.data();
    assert!(
        !got.is_empty() && got.len() < size,
        "{} of {size} bytes",
        got.len()
    );
    assert_eq!(got, original[..got.len()]);

    // The node still works, and the session is gone.
    assert!(node.download_chunk(&cid).fails().contains("download_init"));
    assert_eq!(node.download(&cid), original);
    assert_eq!(node.download_init(&cid, 0).text(), "");
    assert_eq!(node.download_chunk(&cid).ok().data(), &original[..BLOCK]);
    assert_eq!(node.download_cancel(&cid).text(), "");
    node.destroy();
}

#[test]
fn events_arrive_as_json_objects() {
    let mut node = TestNode::new();
    let me = thread::current().id();
    let events = Recorder::leak();
    // SAFETY: a live context; a leaked recorder.
    unsafe { codex_set_event_callback(node.ctx, Some(record), events.ud()) };
    let of_type = |rec: &Recorder, ty: &'static str| {
        rec.wait_until(&format!("a {ty:?} event"), |calls| {
            calls
                .iter()
                .any(|c| c.text().contains(&format!("\"type\":\"{ty}\"")))
        })
    };
    assert_eq!(node.start().text(), "");
    of_type(events, "started");
    let cid = node.upload(Some("e.txt"), 0, b"an event");
    of_type(events, "datasetStored");
    assert!(!node.fetch(&cid).text().is_empty());
    of_type(events, "fetchCompleted");
    assert_eq!(node.delete(&cid).text(), "");
    let calls = of_type(events, "datasetDeleted");
    let parsed: Vec<Value> = calls
        .iter()
        .map(|c| {
            assert_eq!(c.code, RET_OK, "{calls:?}");
            assert_ne!(c.thread, me, "an event on the caller's thread");
            serde_json::from_str(&c.text()).unwrap_or_else(|e| panic!("{e}: {c:?}"))
        })
        .collect();
    let types: Vec<&str> = parsed.iter().map(|v| str_of(v, "type")).collect();
    assert_eq!(
        types,
        [
            "started",
            "datasetStored",
            "fetchCompleted",
            "datasetDeleted"
        ]
    );
    let stored = &parsed[1];
    assert_eq!(str_of(stored, "cid"), cid);
    assert_eq!(u64_of(stored, "datasetSize"), 8);
    assert_eq!(str_of(&parsed[3], "cid"), cid);

    // Unregistered: no more events for it.
    // SAFETY: a live context; NULL unregisters.
    unsafe { codex_set_event_callback(node.ctx, None, ptr::null_mut()) };
    assert_eq!(node.stop().text(), "");
    let second = Recorder::leak();
    // SAFETY: a live context; a leaked recorder.
    unsafe { codex_set_event_callback(node.ctx, Some(record), second.ud()) };
    assert_eq!(node.start().text(), "");
    of_type(second, "started");
    // Events are delivered in order, so "stopped" was handled before "started" was.
    assert_eq!(events.count(), 4, "{:?}", events.snapshot());
    node.destroy();
}

/// What the callback of [`calls_from_inside_a_callback_are_refused`] saw.
#[derive(Default, Debug)]
struct Inner {
    version: Option<(c_int, usize)>,
    space: Option<(c_int, Vec<Call>)>,
    destroy: Option<c_int>,
    new_node: Option<(bool, Vec<Call>)>,
    thread: Option<ThreadId>,
}

#[test]
fn calls_from_inside_a_callback_are_refused() {
    let mut node = TestNode::new();
    let ctx = node.ctx as usize;
    let seen: &'static Mutex<Inner> = Box::leak(Box::default());
    let cfg = c(&config(&node.dir.join("nested"), &json!({})));
    let cfg_ptr = cfg.as_ptr() as usize;
    let rec = Recorder::with_hook(move |c| {
        if !c.is_terminal() {
            return;
        }
        let ctx = ctx as *mut c_void;
        let mut seen = lock(seen);
        seen.thread = Some(thread::current().id());
        // The stateless version query is allowed anywhere.
        let version = Recorder::leak();
        // SAFETY: `ctx` is live (the test destroys it after this callback); leaked recorders.
        let ret = unsafe { codex_version(ctx, Some(record), version.ud()) };
        seen.version = Some((ret, version.count()));
        // Calls that need the node are refused, synchronously, instead of deadlocking.
        let space = Recorder::leak();
        // SAFETY: as above.
        let ret = unsafe { codex_storage_space(ctx, Some(record), space.ud()) };
        seen.space = Some((ret, space.snapshot()));
        // SAFETY: as above; destroy from a callback must be refused, not deadlock.
        seen.destroy = Some(unsafe { codex_destroy(ctx, None, ptr::null_mut()) });
        let created = Recorder::leak();
        // SAFETY: `cfg_ptr` points to a CString the test keeps alive until this has run.
        let new_ctx = unsafe { codex_new(cfg_ptr as *const c_char, Some(record), created.ud()) };
        seen.new_node = Some((new_ctx.is_null(), created.snapshot()));
    });
    // SAFETY: a live context; a leaked recorder.
    let out = node
        .call_with("repo (re-entering)", rec, |ctx, cb, ud| unsafe {
            codex_repo(ctx, cb, ud)
        })
        .ok();
    assert_eq!(out.text(), node.dir.to_str().unwrap());
    drop(cfg);
    let seen = lock(seen);
    let cb_thread = seen.thread.expect("the hook ran");
    assert_eq!(seen.version, Some((RET_OK, 1)), "{seen:?}");
    let (ret, calls) = seen.space.clone().expect("the hook ran");
    assert_eq!(ret, RET_ERR, "{seen:?}");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].code, RET_ERR);
    assert_eq!(
        calls[0].thread, cb_thread,
        "the inner error was not synchronous"
    );
    assert!(calls[0].text().contains("inside"), "{calls:?}");
    assert_eq!(seen.destroy, Some(RET_ERR), "{seen:?}");
    let (null, calls) = seen.new_node.clone().expect("the hook ran");
    assert!(null, "codex_new succeeded inside a callback");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].code, RET_ERR);
    drop(seen);
    // The same from inside an event callback.
    let inner: &'static Mutex<Option<(c_int, Vec<Call>)>> = Box::leak(Box::default());
    let events = Recorder::with_hook(move |_| {
        let rec = Recorder::leak();
        // SAFETY: `ctx` is live until the test destroys it, after this has run.
        let ret = unsafe { codex_storage_space(ctx as *mut c_void, Some(record), rec.ud()) };
        lock(inner).get_or_insert((ret, rec.snapshot()));
    });
    // SAFETY: a live context; a leaked recorder.
    unsafe { codex_set_event_callback(node.ctx, Some(record), events.ud()) };
    assert_eq!(node.start().text(), "");
    events.wait_until("an event", |c| !c.is_empty());
    let (ret, calls) = lock(inner).clone().expect("the event hook ran");
    assert_eq!(ret, RET_ERR, "{calls:?}");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].text().contains("inside"), "{calls:?}");

    // The node is unharmed.
    assert_eq!(u64_of(&node.space(), "totalBlocks"), 0);
    node.destroy();
}

#[test]
fn information_and_peer_requests_answer_once() {
    let mut node = TestNode::new();
    let repo = node.simple("repo", codex_repo).text();
    assert_eq!(Path::new(&repo), node.dir);
    let peer = node.simple("peer_id", codex_peer_id).text();
    assert!(peer.starts_with("16Uiu2"), "{peer}");
    let debug = node.simple("debug", codex_debug).json();
    assert_eq!(str_of(&debug, "id"), peer);
    assert!(field(&debug, "addrs").is_array(), "{debug}");
    assert!(field(&debug, "spr").is_string(), "{debug}");
    assert!(field(&debug, "announceAddresses").is_array(), "{debug}");
    let table = field(&debug, "table");
    assert!(field(table, "localNode").is_object(), "{debug}");
    assert!(field(table, "nodes").is_array(), "{debug}");

    let msg = node.simple("spr", codex_spr).fails();
    assert!(msg.contains("not started"), "{msg}");
    assert_eq!(node.start().text(), "");
    // Started: a signed record, and listening addresses in debug.
    let spr = node.simple("spr", codex_spr).text();
    assert!(spr.starts_with("spr:"), "{spr}");
    let debug = node.simple("debug", codex_debug).json();
    assert_eq!(str_of(&debug, "spr"), spr);
    let addrs = field(&debug, "addrs").as_array().unwrap();
    assert!(
        addrs.iter().any(|a| a.as_str().unwrap().contains("/tcp/")),
        "{debug}"
    );

    let level = |l: &str| {
        let l_c = c(l);
        // SAFETY: a NUL-terminated level.
        node.call(format!("log_level({l:?})"), |ctx, cb, ud| unsafe {
            codex_log_level(ctx, l_c.as_ptr(), cb, ud)
        })
    };
    assert_eq!(level("debug").text(), "");
    assert_eq!(level("info").text(), "");
    assert!(!level("loud").fails().is_empty());

    let connect = |peer: &str, addrs: Option<&[&str]>, n: usize| {
        let peer_c = c(peer);
        let addrs_c: Vec<CString> = addrs.unwrap_or_default().iter().map(|a| c(a)).collect();
        let mut ptrs: Vec<*const c_char> = addrs_c.iter().map(|a| a.as_ptr()).collect();
        let p = if addrs.is_some() {
            ptrs.as_mut_ptr()
        } else {
            ptr::null_mut()
        };
        // SAFETY: `n` strings at `p` (or NULL, refused), kept alive until the terminal
        // callback, as the reference needs (it does not copy them).
        let pending = node.call(
            format!("connect({peer:?}, {addrs:?}, {n})"),
            |ctx, cb, ud| unsafe { codex_connect(ctx, peer_c.as_ptr(), p, n, cb, ud) },
        );
        let out = if pending.ret == RET_ERR {
            (pending.refused(), true)
        } else {
            (pending.fails(), false)
        };
        drop(addrs_c);
        out
    };
    let addr = ["/ip4/127.0.0.1/tcp/1"];
    let (msg, refused) = connect(&peer, Some(&addr), 1);
    assert!(!refused && msg.contains("itself"), "{msg}");
    // Nobody listens on port 1: a clear failure, one callback.
    let other = "16Uiu2HAmJ3TSfPnrJNedHy2DMsjTqwBiVAQQqPo579DuMgGxmG99";
    let (msg, refused) = connect(other, Some(&addr), 1);
    assert!(!refused && msg.contains("connect"), "{msg}");
    let (msg, _) = connect(other, None, 0);
    assert!(msg.contains("discovery"), "{msg}");
    let (msg, refused) = connect(other, Some(&["not an address"]), 1);
    assert!(refused && msg.contains("address"), "{msg}");
    let (msg, refused) = connect(&peer, None, 1);
    assert!(refused && msg.contains("NULL"), "{msg}");
    let (msg, refused) = connect("not-a-peer", Some(&addr), 1);
    assert!(refused && msg.contains("peer id"), "{msg}");

    let msg = node.with_str("peer_debug", codex_peer_debug, &peer).fails();
    assert!(msg.contains(&peer), "{msg}");
    let msg = node
        .with_str("peer_debug", codex_peer_debug, "xyz")
        .refused();
    assert!(msg.contains("peer id"), "{msg}");
    node.destroy();
}
