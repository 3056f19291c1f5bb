//! The owner (control node) side: archives of a community's messages, the cumulative index,
//! the link, and the periodic archiving task.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use codex::CodexNode;
use codex_proto::{
    archive_id, CodexWakuMessageArchiveIndex, CodexWakuMessageArchiveIndexMetadata,
    CommunityMessageArchiveLink, Message, WakuMessage, WakuMessageArchive,
    WakuMessageArchiveMetadata,
};
use futures::Stream;
use tokio::task::JoinHandle;

use crate::community::{Community, CommunityId, CommunityKey};
use crate::config::ArchiveConfig;
use crate::db::{ArchiveRecord, Database};
use crate::error::{task_error, Error, Result};
use crate::events::{Event, Events};
use crate::format::{self, Entries, Fetch};
use crate::link::{LinkPublisher, SignedLink};

/// How long a round looks for a previous index that is not local any more.
const PREVIOUS_INDEX_TIMEOUT: Duration = Duration::from_secs(30);

/// An archive made in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedArchive {
    /// Its archive ID.
    pub id: String,
    /// Its dataset CID.
    pub cid: String,
    /// Start of its range (Unix seconds).
    pub from: u64,
    /// End of its range (exclusive).
    pub to: u64,
    /// Messages in it.
    pub messages: usize,
    /// Bytes uploaded (after encryption).
    pub bytes: u64,
}

/// The outcome of an archiving round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Start of the range archived.
    pub from: u64,
    /// End of the range archived (exclusive); the next round starts here.
    pub to: u64,
    /// The archives made, oldest first.
    pub created: Vec<CreatedArchive>,
    /// The new index CID, when archives were made.
    pub index_cid: Option<String>,
    /// Archives the new index names, the earlier ones included.
    pub index_entries: usize,
    /// Hashes of messages left out because each alone is over the archive size limit.
    pub oversized: Vec<Vec<u8>>,
    /// Whether the previous index was read (locally or from peers) to build the new one;
    /// when it was not, its entries came from the database alone.
    pub previous_index_read: bool,
}

/// The owner side of the archive service. Cheap to clone.
#[derive(Clone)]
pub struct Owner {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    node: CodexNode,
    publisher: Arc<dyn LinkPublisher>,
    cfg: ArchiveConfig,
    events: Events,
    tasks: Mutex<HashMap<CommunityId, JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, t) in self.tasks.get_mut().map(std::mem::take).unwrap_or_default() {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Owner {
    /// The owner side on `db` and `node`, publishing links through `publisher`.
    pub fn new(
        db: Database,
        node: CodexNode,
        publisher: Arc<dyn LinkPublisher>,
        cfg: ArchiveConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                node,
                publisher,
                cfg,
                events: Events::new(),
                tasks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The events of this owner from now on.
    pub fn events(&self) -> impl Stream<Item = Event> + Send + Unpin + 'static {
        self.inner.events.subscribe()
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// Stores raw Waku messages of the owned communities' chats as they arrive; returns how
    /// many were new.
    ///
    /// # Cancel safety
    /// The messages are stored in one transaction, all or none, even if the future is
    /// dropped.
    pub async fn store_messages(&self, messages: Vec<WakuMessage>) -> Result<usize> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || db.store_messages(&messages))
            .await
            .map_err(task_error)?
    }

    /// Creates the archives of `community` for `[from, to)`, uploads them and the
    /// cumulative index, and records the round (PIPELINE.md, owner step 4). Nothing is
    /// recorded unless everything succeeded; on failure the datasets uploaded by this round
    /// are deleted again, and the next round starts over from the same point.
    ///
    /// # Cancel safety
    /// Dropping the future stops the round; the database stays as before it (datasets
    /// already uploaded stay in the store until the next round's uploads name them).
    pub async fn create_archives(
        &self,
        community: &Community,
        from: u64,
        to: u64,
    ) -> Result<RoundReport> {
        Round {
            owner: &self.inner,
            community,
        }
        .run(from, to)
        .await
    }

    /// One archiving round as the scheduler runs it: archives from where the last round
    /// ended (or the oldest message) up to `now`, then the link of the current index is
    /// published. Returns `None` when there was nothing to archive yet.
    ///
    /// # Cancel safety
    /// As [`Owner::create_archives`]; the link may or may not have been published.
    pub async fn archive_and_publish(
        &self,
        community: &Community,
        key: &CommunityKey,
        now: u64,
    ) -> Result<Option<RoundReport>> {
        let Some(start) = self.next_start(community).await? else {
            self.inner.events.emit(Event::NoneCreated {
                community: community.id.clone(),
            });
            return Ok(None);
        };
        let report = if start < now {
            self.create_archives(community, start, now).await?
        } else {
            RoundReport {
                from: start,
                to: start,
                ..Default::default()
            }
        };
        self.publish_link(community, key).await?;
        self.check_stored(community).await?;
        Ok(Some(report))
    }

    /// Reports every archive (and the current index) the database records that the node no
    /// longer stores whole, as [`Event::Failed`]; returns their CIDs. The reference loses
    /// archives silently when their blocks expire: give the node no block TTL
    /// (`CodexConfigBuilder::block_ttl(None)`) so an owner keeps what it made.
    ///
    /// # Cancel safety
    /// Only reads.
    pub async fn check_stored(&self, community: &Community) -> Result<Vec<String>> {
        let id = community.id.clone();
        let (info, archives) = self
            .blocking(move |db| Ok((db.archive_info(&id)?, db.archives(&id)?)))
            .await?;
        let mut cids: Vec<(String, String)> = archives
            .into_iter()
            .map(|a| (format!("archive {}", a.id), a.cid))
            .collect();
        if !info.last_archive_link.is_empty() {
            cids.push(("the current index".into(), info.last_archive_link));
        }
        let mut lost = Vec::new();
        for (what, cid) in cids {
            let parsed: codex::Cid = cid.parse()?;
            if !self.inner.node.exists(&parsed).await? {
                let error = format!("{what} ({cid}) is no longer stored whole by this node");
                self.inner.events.failed(&community.id, error, None);
                lost.push(cid);
            }
        }
        Ok(lost)
    }

    /// Publishes the link of the current index, with the current time as its clock. Does
    /// nothing when there is no index yet: an empty link is never sent.
    ///
    /// # Cancel safety
    /// The link may or may not have been sent.
    pub async fn publish_link(&self, community: &Community, key: &CommunityKey) -> Result<()> {
        let info = self
            .blocking({
                let id = community.id.clone();
                move |db| db.archive_info(&id)
            })
            .await?;
        if info.last_archive_link.is_empty() {
            return Ok(());
        }
        if key.id() != community.id {
            return Err(Error::Invalid(format!(
                "the key given is not the key of community {}",
                community.id
            )));
        }
        let clock = now_millis().max(info.archive_link_clock);
        let link = CommunityMessageArchiveLink {
            clock,
            archive_link: info.last_archive_link.clone(),
        };
        let signed = SignedLink::sign(key, &community.id, &link);
        self.inner.publisher.publish(signed).await?;
        self.blocking({
            let id = community.id.clone();
            move |db| db.raise_clock(&id, clock)
        })
        .await?;
        self.inner.events.emit(Event::Seeding {
            community: community.id.clone(),
            index_cid: info.last_archive_link,
        });
        Ok(())
    }

    /// Starts the periodic archiving of `community` (PIPELINE.md, owner step 5), replacing
    /// a task already running for it:
    /// - nothing archived and nothing to archive: the first round runs one interval later;
    /// - the last round ended less than an interval ago: the current index keeps being
    ///   served and the next round runs when the interval has passed;
    /// - otherwise a round runs now.
    ///
    /// Then a round runs every interval. A failed round is retried with backoff, not an
    /// interval later.
    pub fn start(&self, community: Community, key: CommunityKey) {
        let owner = self.clone();
        let id = community.id.clone();
        let task = tokio::spawn(async move { owner.schedule(community, key).await });
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = tasks.insert(id, task) {
            old.abort();
        }
    }

    /// Stops the periodic archiving of `community`. Its datasets stay in the node's store
    /// (and are served) until deleted.
    pub fn stop(&self, community: &CommunityId) {
        let task = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(community);
        if let Some(t) = task {
            t.abort();
            self.inner.events.emit(Event::Unseeded {
                community: community.clone(),
            });
        }
    }

    async fn schedule(&self, community: Community, key: CommunityKey) {
        let interval = self.inner.cfg.interval.as_secs().max(1);
        let mut failures = 0u32;
        let mut announced = false;
        loop {
            let due = match self.due(&community, interval).await {
                Ok(d) => d,
                Err(e) => {
                    failures += 1;
                    self.failed(&community, &e, failures).await;
                    continue;
                }
            };
            let now = now_secs();
            if due > now {
                if !announced {
                    // Start-up with a recent index: it is served as it is.
                    announced = true;
                    self.announce_current(&community).await;
                }
                tokio::time::sleep(Duration::from_secs(due - now)).await;
                continue;
            }
            match self.archive_and_publish(&community, &key, now).await {
                Ok(_) => {
                    failures = 0;
                    announced = true;
                }
                Err(e) => {
                    failures += 1;
                    self.failed(&community, &e, failures).await;
                }
            }
        }
    }

    /// When the next round is due (Unix seconds).
    async fn due(&self, community: &Community, interval: u64) -> Result<u64> {
        let id = community.id.clone();
        let topics = community.topics();
        let (info, oldest) = self
            .blocking(move |db| Ok((db.archive_info(&id)?, db.oldest_timestamp(&topics)?)))
            .await?;
        let now = now_secs();
        Ok(match (info.last_message_archive_end_date, oldest) {
            (0, None) => now + interval,
            (0, Some(_)) => now,
            (end, _) => end.saturating_add(interval),
        })
    }

    async fn announce_current(&self, community: &Community) {
        let id = community.id.clone();
        if let Ok(info) = self.blocking(move |db| db.archive_info(&id)).await {
            if !info.last_archive_link.is_empty() {
                self.inner.events.emit(Event::Seeding {
                    community: community.id.clone(),
                    index_cid: info.last_archive_link,
                });
            }
        }
    }

    async fn failed(&self, community: &Community, e: &Error, failures: u32) {
        let wait = self.inner.cfg.backoff(failures);
        tracing::warn!(community = %community.id, error = %e, "archiving round failed");
        self.inner.events.failed(&community.id, e, Some(wait));
        tokio::time::sleep(wait).await;
    }

    /// Where the next round starts: the end of the last one, else the oldest message.
    async fn next_start(&self, community: &Community) -> Result<Option<u64>> {
        let id = community.id.clone();
        let topics = community.topics();
        self.blocking(move |db| {
            let end = db.archive_info(&id)?.last_message_archive_end_date;
            if end != 0 {
                return Ok(Some(end));
            }
            db.oldest_timestamp(&topics)
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        blocking(&self.inner.db, f).await
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    db: &Database,
    f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
) -> Result<T> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(task_error)?
}

/// One archiving round.
struct Round<'a> {
    owner: &'a Inner,
    community: &'a Community,
}

impl Round<'_> {
    async fn run(&self, from: u64, to: u64) -> Result<RoundReport> {
        if from >= to {
            return Err(Error::Invalid(format!("empty range [{from}, {to})")));
        }
        let id = self.community.id.clone();
        self.owner.events.emit(Event::Creating {
            community: id.clone(),
            from,
            to,
        });
        let (mut entries, previous_index_read) = self.previous_entries().await?;
        let mut uploaded: Vec<String> = Vec::new();
        let mut report = RoundReport {
            from,
            to,
            previous_index_read,
            ..Default::default()
        };
        let earlier: HashSet<String> = entries.values().map(|e| e.cid.clone()).collect();
        let result = self
            .create(from, to, &mut entries, &mut uploaded, &mut report)
            .await;
        if let Err(e) = result {
            // Nothing was recorded: remove what this round stored that no earlier archive
            // names (a plain archive made again has the CID it had).
            for cid in uploaded {
                if !earlier.contains(&cid) {
                    if let Ok(c) = cid.parse() {
                        let _ = self.owner.node.delete(&c).await;
                    }
                }
            }
            return Err(e);
        }
        let created: Vec<ArchiveRecord> = report
            .created
            .iter()
            .filter_map(|c| entries.get(&c.id).map(|e| format::record(&c.id, e)))
            .collect();
        let index_cid = report.index_cid.clone();
        blocking(&self.owner.db, move |db| {
            db.record_round(&id, &created, index_cid.as_deref(), to)
        })
        .await?;
        for c in &report.created {
            self.owner.events.emit(Event::Created {
                community: self.community.id.clone(),
                id: c.id.clone(),
                from: c.from,
                to: c.to,
                messages: c.messages,
                bytes: c.bytes,
            });
        }
        for hash in &report.oversized {
            self.owner.events.emit(Event::Oversized {
                community: self.community.id.clone(),
                hash: hash.clone(),
            });
        }
        if report.created.is_empty() {
            self.owner.events.emit(Event::NoneCreated {
                community: self.community.id.clone(),
            });
        }
        Ok(report)
    }

    async fn create(
        &self,
        from: u64,
        to: u64,
        entries: &mut Entries,
        uploaded: &mut Vec<String>,
        report: &mut RoundReport,
    ) -> Result<()> {
        let cfg = &self.owner.cfg;
        let partition = cfg.partition.as_secs().max(1);
        let topics = self.community.topics();
        let cipher = self.community.cipher();
        let content_topic: Vec<codex_proto::Bytes> =
            topics.iter().map(|t| t.to_vec().into()).collect();
        let mut start = from;
        while start < to {
            let end = start.saturating_add(partition).min(to);
            let mut after = None;
            loop {
                let topics = topics.clone();
                let max = cfg.max_archive_bytes;
                let cursor = after.take();
                let chunk = blocking(&self.owner.db, move |db| {
                    db.read_chunk(&topics, start, end, cursor.as_ref(), max)
                })
                .await?;
                report.oversized.extend(chunk.oversized);
                if !chunk.messages.is_empty() {
                    let metadata = WakuMessageArchiveMetadata {
                        version: 0,
                        from: start,
                        to: end,
                        content_topic: content_topic.clone(),
                    };
                    let messages = chunk.messages.len();
                    let archive = WakuMessageArchive {
                        version: 0,
                        metadata: Some(metadata.clone()),
                        messages: chunk.messages,
                    };
                    let sealed = {
                        let cipher = cipher.clone();
                        tokio::task::spawn_blocking(move || {
                            format::seal(archive.encode_to_vec(), cipher.as_ref())
                        })
                        .await
                        .map_err(task_error)??
                    };
                    let bytes = sealed.len() as u64;
                    let name = format!("archive-{start}-{end}");
                    let cid = format::upload(&self.owner.node, sealed, &name).await?;
                    uploaded.push(cid.clone());
                    let entry = CodexWakuMessageArchiveIndexMetadata {
                        version: 0,
                        metadata: Some(metadata),
                        cid: cid.clone(),
                    };
                    let id = archive_id(&entry);
                    entries.insert(id.clone(), entry);
                    report.created.push(CreatedArchive {
                        id,
                        cid,
                        from: start,
                        to: end,
                        messages,
                        bytes,
                    });
                }
                match chunk.next {
                    Some(c) => after = Some(c),
                    None => break,
                }
            }
            start = end;
        }
        if !report.created.is_empty() {
            let index = CodexWakuMessageArchiveIndex {
                archives: entries.clone(),
            };
            report.index_entries = index.archives.len();
            let sealed = format::seal(index.encode_to_vec(), cipher.as_ref())?;
            let cid = format::upload(&self.owner.node, sealed, "index").await?;
            uploaded.push(cid.clone());
            report.index_cid = Some(cid);
        }
        Ok(())
    }

    /// The entries of the previous index: read from the index itself when it can be had
    /// (locally, else from peers), merged with every archive the database records, so an
    /// index that is gone loses nothing the database knows.
    async fn previous_entries(&self) -> Result<(Entries, bool)> {
        let id = self.community.id.clone();
        let (info, records) = blocking(&self.owner.db, move |db| {
            Ok((db.archive_info(&id)?, db.archives(&id)?))
        })
        .await?;
        let mut entries = format::entries_of(&records);
        let link = info.last_archive_link;
        if link.is_empty() {
            return Ok((entries, false));
        }
        let cfg = &self.owner.cfg;
        let mut limits = Fetch {
            local: true,
            ..cfg.fetch(cfg.max_index_download)
        };
        let node = &self.owner.node;
        let mut data = format::download(node, &link, "previous index", limits).await;
        if data.is_err() {
            // Not local any more: members may still serve it. Not for long, though: the
            // database has every entry this node made, and the round should not stall.
            limits.local = false;
            limits.timeout = cfg.download_timeout.min(PREVIOUS_INDEX_TIMEOUT);
            data = format::download(node, &link, "previous index", limits).await;
        }
        let read = match data {
            Ok(data) => {
                let cipher = self.community.cipher();
                format::open_index(&data, cipher.as_ref(), &link)
            }
            Err(e) => Err(e),
        };
        match read {
            Ok(index) => {
                entries.extend(index.archives);
                Ok((entries, true))
            }
            Err(e) => {
                tracing::warn!(
                    community = %self.community.id, index = %link, error = %e,
                    "previous index unavailable; rebuilding it from the database"
                );
                Ok((entries, false))
            }
        }
    }
}

/// Now, Unix seconds.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Now, Unix milliseconds (the link clock).
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
