//! The member side: accepting archive links, downloading the index and the missing archives,
//! importing their messages, and serving them on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use codex::CodexNode;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::community::{Community, CommunityId};
use crate::config::ArchiveConfig;
use crate::db::{ArchiveRecord, Database};
use crate::error::{Error, Rejection, Result};
use crate::events::{Event, Events};
use crate::format;
use crate::link::SignedLink;
use crate::owner::blocking;

/// The member side of the archive service. Cheap to clone.
#[derive(Clone)]
pub struct Member {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

struct Inner {
    db: Database,
    node: CodexNode,
    cfg: ArchiveConfig,
    events: Events,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    joined: HashMap<CommunityId, Community>,
    controlled: HashSet<CommunityId>,
    tasks: HashMap<CommunityId, Task>,
}

/// The work running for a community: the link it is for, and whether it ended.
struct Task {
    link: String,
    handle: JoinHandle<()>,
    done: watch::Receiver<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, t) in state.tasks.drain() {
            t.handle.abort();
        }
    }
}

impl Member {
    /// The member side on `db` and `node`.
    pub fn new(db: Database, node: CodexNode, cfg: ArchiveConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                node,
                cfg,
                events: Events::new(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The events of this member from now on.
    pub fn events(&self) -> impl Stream<Item = Event> + Send + Unpin + 'static {
        self.inner.events.subscribe()
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a joined community (its local chats and key material) and resumes what a
    /// previous run left: the download of an accepted link, or archives not yet imported.
    /// Joining again replaces the description (new chats, a rotated key).
    pub async fn join(&self, community: Community) -> Result<()> {
        let id = community.id.clone();
        self.state().joined.insert(id.clone(), community);
        if !self.inner.cfg.enabled || self.state().controlled.contains(&id) {
            return Ok(());
        }
        let (info, unimported) = {
            let id = id.clone();
            blocking(&self.inner.db, move |db| {
                Ok((db.archive_info(&id)?, db.unimported(&id)?.len()))
            })
            .await?
        };
        if !info.pending_archive_link.is_empty() {
            self.spawn(&id, info.pending_archive_link);
        } else if unimported > 0 {
            self.spawn(&id, String::new());
        }
        Ok(())
    }

    /// Marks `community` as controlled by this node: its links are never acted on here.
    pub fn set_control_node(&self, community: &CommunityId) {
        let mut state = self.state();
        state.controlled.insert(community.clone());
        if let Some(t) = state.tasks.remove(community) {
            t.handle.abort();
        }
    }

    /// Forgets a community and stops its work (its data stays).
    pub fn leave(&self, community: &CommunityId) {
        let mut state = self.state();
        state.joined.remove(community);
        if let Some(t) = state.tasks.remove(community) {
            t.handle.abort();
        }
    }

    /// A link clock seen elsewhere (the checkpoint in the community description): links
    /// older than the highest clock are not accepted.
    pub async fn observe_clock(&self, community: &CommunityId, clock: u64) -> Result<()> {
        let id = community.clone();
        blocking(&self.inner.db, move |db| db.raise_clock(&id, clock)).await
    }

    /// Handles a received archive link (PIPELINE.md, member steps 1–2): checks it and, when
    /// accepted, cancels the download in progress for the community and starts fetching the
    /// new index and its archives in the background. Returns the index CID.
    ///
    /// # Cancel safety
    /// The link is recorded as accepted in one transaction; dropping the future before that
    /// leaves nothing changed.
    pub async fn handle_link(&self, link: &SignedLink) -> Result<String> {
        let msg = link.verify()?;
        let id = link.community_id.clone();
        if !self.inner.cfg.enabled {
            return Err(Rejection::Disabled.into());
        }
        {
            let state = self.state();
            if state.controlled.contains(&id) {
                return Err(Rejection::ControlNode.into());
            }
            if !state.joined.contains_key(&id) {
                return Err(Rejection::NotJoined(id.to_hex()).into());
            }
            if state
                .tasks
                .get(&id)
                .is_some_and(|t| t.link == msg.archive_link)
            {
                return Err(Rejection::Duplicate.into());
            }
        }
        let info = {
            let id = id.clone();
            blocking(&self.inner.db, move |db| db.archive_info(&id)).await?
        };
        if msg.clock < info.archive_link_clock {
            return Err(Rejection::Stale {
                clock: msg.clock,
                last: info.archive_link_clock,
            }
            .into());
        }
        if msg.archive_link == info.last_archive_link
            || msg.archive_link == info.pending_archive_link
        {
            return Err(Rejection::Duplicate.into());
        }
        {
            let id = id.clone();
            let cid = msg.archive_link.clone();
            blocking(&self.inner.db, move |db| {
                db.accept_link(&id, msg.clock, &cid)
            })
            .await?;
        }
        self.spawn(&id, msg.archive_link.clone());
        Ok(msg.archive_link)
    }

    /// Waits until no work runs for `community` (its last link is downloaded and imported,
    /// or failed for good).
    ///
    /// # Cancel safety
    /// Only waits.
    pub async fn idle(&self, community: &CommunityId) {
        loop {
            let done = self.state().tasks.get(community).map(|t| t.done.clone());
            let Some(mut done) = done else { return };
            // Returns when the task ends, or is aborted (its sender dropped).
            let _ = done.wait_for(|d| *d).await;
            // A newer task may have replaced it meanwhile: then wait for that one.
            let running = self
                .state()
                .tasks
                .get(community)
                .is_some_and(|t| !*t.done.borrow());
            if !running {
                return;
            }
        }
    }

    /// Starts the work for `link` (empty: only import what is downloaded), cancelling the
    /// work in progress for the community.
    fn spawn(&self, community: &CommunityId, link: String) {
        let (tx, done) = watch::channel(false);
        let member = self.clone();
        let id = community.clone();
        let l = link.clone();
        let mut state = self.state();
        let handle = tokio::spawn(async move {
            member.run(&id, &l).await;
            let _ = tx.send(true);
        });
        if let Some(old) = state
            .tasks
            .insert(community.clone(), Task { link, handle, done })
        {
            // Aborting drops the old downloads, which cancels them in the node.
            old.handle.abort();
        }
    }

    /// Downloads and imports until done, retrying transient failures with backoff.
    async fn run(&self, id: &CommunityId, link: &str) {
        let mut failures = 0u32;
        loop {
            let Some(community) = self.state().joined.get(id).cloned() else {
                return;
            };
            match self.attempt(&community, link).await {
                Ok(()) => return,
                Err(e) if e.is_transient() => {
                    failures += 1;
                    let wait = self.inner.cfg.backoff(failures);
                    tracing::warn!(community = %id, error = %e, "archive download failed");
                    self.inner.events.failed(id, &e, Some(wait));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::warn!(community = %id, error = %e, "archive link abandoned");
                    self.inner.events.failed(id, &e, None);
                    if !link.is_empty() {
                        let (id, link) = (id.clone(), link.to_owned());
                        let _ =
                            blocking(&self.inner.db, move |db| db.abandon_link(&id, &link)).await;
                    }
                    return;
                }
            }
        }
    }

    async fn attempt(&self, community: &Community, link: &str) -> Result<()> {
        if !link.is_empty() {
            self.download(community, link).await?;
        }
        self.import(community).await?;
        if !link.is_empty() {
            self.inner.events.emit(Event::DownloadingFinished {
                community: community.id.clone(),
                index_cid: link.into(),
            });
        }
        Ok(())
    }

    /// PIPELINE.md, member step 3: the index, then the missing archives, newest first.
    async fn download(&self, community: &Community, link: &str) -> Result<()> {
        let cfg = &self.inner.cfg;
        let id = &community.id;
        self.inner.events.emit(Event::DownloadingStarted {
            community: id.clone(),
            index_cid: link.into(),
        });
        let limits = cfg.fetch(cfg.max_index_download);
        let data = format::download(&self.inner.node, link, "index", limits).await?;
        let cipher = community.cipher();
        let index = format::open_index(&data, cipher.as_ref(), link)?;
        let known = {
            let id = id.clone();
            blocking(&self.inner.db, move |db| db.archive_ids(&id)).await?
        };
        let mut missing: Vec<ArchiveRecord> = index
            .archives
            .iter()
            .filter(|(aid, _)| !known.contains(*aid))
            .map(|(aid, e)| format::record(aid, e))
            .collect();
        missing.sort_by(|a, b| b.from.cmp(&a.from).then_with(|| a.id.cmp(&b.id)));
        self.inner.events.emit(Event::IndexDownloaded {
            community: id.clone(),
            archives: index.archives.len(),
            missing: missing.len(),
        });
        let results: Vec<Result<()>> = futures::stream::iter(missing)
            .map(|a| self.fetch_archive(community, a))
            .buffer_unordered(cfg.concurrency.max(1))
            .collect()
            .await;
        // Every archive was tried; those that arrived are recorded. The first failure
        // (all are transient here) sends the link round again.
        results.into_iter().collect::<Result<()>>()?;
        {
            let (id, link) = (id.clone(), link.to_owned());
            blocking(&self.inner.db, move |db| db.finish_link(&id, &link)).await?;
        }
        self.inner.events.emit(Event::Seeding {
            community: id.clone(),
            index_cid: link.into(),
        });
        Ok(())
    }

    /// Downloads one archive, checks it opens, and records it. An archive that will never
    /// open is recorded as unusable (not fetched again) and reported; only transient
    /// failures are returned.
    async fn fetch_archive(&self, community: &Community, a: ArchiveRecord) -> Result<()> {
        let cfg = &self.inner.cfg;
        let limits = cfg.fetch(cfg.max_archive_download);
        let what = format!("archive {}", a.id);
        let id = community.id.clone();
        let original = a.clone();
        let checked = match format::download(&self.inner.node, &a.cid, &what, limits).await {
            Ok(data) => {
                let cipher = community.cipher();
                let bytes = data.len() as u64;
                let aid = a.id.clone();
                tokio::task::spawn_blocking(move || {
                    let archive = format::open_archive(&data, cipher.as_ref(), &aid)?;
                    let m = archive.metadata.unwrap_or_default();
                    if (m.from, m.to) != (a.from, a.to) {
                        return Err(Error::InvalidIndex {
                            cid: a.cid.clone(),
                            reason: format!(
                                "archive {aid} covers [{}, {}), its entry [{}, {})",
                                m.from, m.to, a.from, a.to
                            ),
                        });
                    }
                    Ok((a, bytes))
                })
                .await
                .map_err(crate::error::task_error)?
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok((a, bytes)) => {
                // Recorded only when the whole dataset is local, so it is served on.
                let cid: codex::Cid = a.cid.parse()?;
                if !self.inner.node.exists(&cid).await? {
                    return Err(Error::Incomplete { cid: a.cid });
                }
                let rec = a.clone();
                blocking(&self.inner.db, move |db| db.record_downloaded(&id, &rec)).await?;
                self.inner.events.emit(Event::ArchiveDownloaded {
                    community: community.id.clone(),
                    id: a.id,
                    from: a.from,
                    to: a.to,
                    bytes,
                });
                Ok(())
            }
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                tracing::warn!(community = %community.id, error = %e, "unusable archive");
                self.inner.events.failed(&community.id, &e, None);
                let error = e.to_string();
                blocking(&self.inner.db, move |db| {
                    db.record_unusable(&id, &original, &error)
                })
                .await
            }
        }
    }

    /// PIPELINE.md, member step 4: imports every downloaded archive not yet imported, each
    /// in one transaction.
    async fn import(&self, community: &Community) -> Result<()> {
        let id = community.id.clone();
        let pending = {
            let id = id.clone();
            blocking(&self.inner.db, move |db| db.unimported(&id)).await?
        };
        let cfg = &self.inner.cfg;
        let limits = cfg.fetch(cfg.max_archive_download);
        let topics = community.topics();
        for a in pending {
            self.inner.events.emit(Event::Importing {
                community: id.clone(),
                id: a.id.clone(),
            });
            let what = format!("archive {}", a.id);
            let data = format::download(&self.inner.node, &a.cid, &what, limits).await?;
            let cipher = community.cipher();
            let (cid, aid, topics) = (id.clone(), a.id.clone(), topics.clone());
            let db = self.inner.db.clone();
            let messages = tokio::task::spawn_blocking(move || {
                let archive = format::open_archive(&data, cipher.as_ref(), &aid)?;
                db.import_archive(&cid, &aid, &archive.messages, &topics)
            })
            .await
            .map_err(crate::error::task_error)??;
            self.inner.events.emit(Event::Imported {
                community: id.clone(),
                id: a.id,
                messages,
            });
        }
        Ok(())
    }
}
