//! Progress bars from the children's events, and the figures the summary reports.
//!
//! Bars go to stderr and are hidden when it is not a terminal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use super::messages::WEEK;

/// What one child did, as its events told.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    /// Owner: messages stored.
    pub(crate) stored: u64,
    /// Owner: datasets its node stored (archives and index), and their bytes.
    pub(crate) uploaded: u64,
    /// Owner: bytes of those datasets.
    pub(crate) uploaded_bytes: u64,
    /// Member: archives downloaded.
    pub(crate) downloaded: u64,
    /// Member: their bytes.
    pub(crate) downloaded_bytes: u64,
    /// Member: archive IDs imported, in order.
    pub(crate) imported: Vec<String>,
    /// Member: messages those imports inserted.
    pub(crate) imported_messages: u64,
    /// Member: when its download started.
    pub(crate) download_started: Option<Instant>,
    /// Member: when every archive of the link was local.
    pub(crate) download_done: Option<Instant>,
    /// Member: when every archive was imported.
    pub(crate) finished: Option<Instant>,
    /// Failures reported (retried or not).
    pub(crate) failures: Vec<String>,
}

/// The progress display, shared by the reader tasks of the children.
#[derive(Clone)]
pub(crate) struct Ui {
    mp: MultiProgress,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    views: HashMap<&'static str, View>,
    bars: HashMap<(&'static str, &'static str), ProgressBar>,
}

impl Ui {
    /// An empty display.
    pub(crate) fn new() -> Self {
        Self {
            mp: MultiProgress::new(),
            state: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prints a line above the bars.
    pub(crate) fn println(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        self.mp.suspend(|| println!("{line}"));
    }

    /// What `who` did so far.
    pub(crate) fn view(&self, who: &'static str) -> View {
        self.lock().views.get(who).cloned().unwrap_or_default()
    }

    /// A new bar `who: what` of `len` steps.
    pub(crate) fn bar(&self, who: &'static str, what: &'static str, len: u64) -> ProgressBar {
        let pb = self.mp.add(ProgressBar::new(len));
        let style = ProgressStyle::with_template(
            "{prefix:<18} [{bar:30}] {pos:>7}/{len:<7} {msg} ({elapsed})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(format!("{who}: {what}"));
        self.lock().bars.insert((who, what), pb.clone());
        pb
    }

    fn existing(&self, who: &'static str, what: &'static str) -> Option<ProgressBar> {
        self.lock().bars.get(&(who, what)).cloned()
    }

    fn get_or_add(&self, who: &'static str, what: &'static str, len: u64) -> ProgressBar {
        match self.existing(who, what) {
            Some(pb) => pb,
            None => self.bar(who, what, len),
        }
    }

    /// Leaves every bar as it is, finished (a bar is finished once: finishing it again
    /// would redraw it).
    pub(crate) fn finish(&self) {
        for pb in self.lock().bars.values() {
            if !pb.is_finished() {
                pb.finish();
            }
        }
    }

    /// An `event` or `progress` line of `who`.
    pub(crate) fn note(&self, who: &'static str, kind: &str, v: &Value) {
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let now = Instant::now();
        if kind == "progress" {
            if let Some(stored) = v.get("stored").and_then(Value::as_u64) {
                self.lock().views.entry(who).or_default().stored = stored;
                if let Some(pb) = self.existing(who, "store") {
                    pb.set_position(stored);
                }
            }
            if let Some(bytes) = v.get("uploaded").and_then(Value::as_u64) {
                let (n, total) = {
                    let mut s = self.lock();
                    let view = s.views.entry(who).or_default();
                    view.uploaded += 1;
                    view.uploaded_bytes += bytes;
                    (view.uploaded, view.uploaded_bytes)
                };
                if let Some(pb) = self.existing(who, "archive") {
                    if n > pb.length().unwrap_or(0) {
                        pb.set_length(n);
                    }
                    pb.set_position(n);
                    pb.set_message(format!("datasets uploaded, {}", mb(total)));
                }
            }
            return;
        }
        match v.get("type").and_then(Value::as_str).unwrap_or_default() {
            "creating" => {
                // One archive per week of the range, at least, and the index.
                let weeks = (num("to").saturating_sub(num("from"))).div_ceil(WEEK);
                let pb = self.get_or_add(who, "archive", weeks + 1);
                pb.set_message("datasets uploaded");
            }
            "seeding" if who == "owner" => {
                if let Some(pb) = self.existing(who, "archive") {
                    pb.set_length(pb.position());
                    pb.finish();
                }
            }
            "downloadingStarted" => {
                self.lock().views.entry(who).or_default().download_started = Some(now);
                let pb = self.get_or_add(who, "download", 0);
                pb.set_message("fetching the index");
            }
            "indexDownloaded" => {
                let pb = self.get_or_add(who, "download", 0);
                pb.set_length(num("missing"));
                pb.set_message(format!("archives of {} in the index", num("archives")));
            }
            "archiveDownloaded" => {
                let total = {
                    let mut s = self.lock();
                    let view = s.views.entry(who).or_default();
                    view.downloaded += 1;
                    view.downloaded_bytes += num("bytes");
                    view.downloaded_bytes
                };
                if let Some(pb) = self.existing(who, "download") {
                    pb.inc(1);
                    pb.set_message(format!("archives, {}", mb(total)));
                }
            }
            "seeding" => {
                let downloaded = {
                    let mut s = self.lock();
                    let view = s.views.entry(who).or_default();
                    view.download_done = Some(now);
                    view.downloaded
                };
                if let Some(pb) = self.existing(who, "download") {
                    pb.finish();
                }
                let pb = self.get_or_add(who, "import", downloaded);
                pb.set_message("archives imported");
            }
            "imported" => {
                let total = {
                    let mut s = self.lock();
                    let view = s.views.entry(who).or_default();
                    view.imported.push(
                        v.get("id")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    );
                    view.imported_messages += num("messages");
                    view.imported_messages
                };
                let pb = self.get_or_add(who, "import", 0);
                if pb.position() + 1 > pb.length().unwrap_or(0) {
                    pb.set_length(pb.position() + 1);
                }
                pb.inc(1);
                pb.set_message(format!("archives, {total} messages"));
            }
            "downloadingFinished" => {
                self.lock().views.entry(who).or_default().finished = Some(now);
                if let Some(pb) = self.existing(who, "import") {
                    pb.finish();
                }
            }
            "failed" => {
                let error = v.get("error").and_then(Value::as_str).unwrap_or_default();
                let retry = match v.get("retryInSecs").and_then(Value::as_u64) {
                    Some(s) => format!("retry in {s} s"),
                    None => "not retried".to_owned(),
                };
                self.lock()
                    .views
                    .entry(who)
                    .or_default()
                    .failures
                    .push(error.to_owned());
                self.println(format!("{who}: failed: {error} ({retry})"));
            }
            "oversized" => self.println(format!(
                "{who}: a message over the archive size limit was left out: {}",
                v.get("hash").and_then(Value::as_str).unwrap_or_default()
            )),
            _ => {}
        }
    }
}

/// Bytes in MB, one decimal.
pub(crate) fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
