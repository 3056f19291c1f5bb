//! The archive pipeline end to end with real Codex nodes (in-process, talking over
//! 127.0.0.1) and real SQLite files: owners create and publish, members download, import
//! and serve on, and bad input is rejected without touching a member's data.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use codex::{CodexConfig, CodexNode};
use codex_archive::codex_proto::{
    archive_id, CodexWakuMessageArchiveIndex, CodexWakuMessageArchiveIndexMetadata,
    CommunityMessageArchiveLink, Message, WakuMessage, WakuMessageArchive,
    WakuMessageArchiveMetadata,
};
use codex_archive::{
    ArchiveConfig, Community, CommunityCipher, CommunityKey, Database, Error, Event, LocalLinkBus,
    Member, Owner, Rejection, RoundReport, SignedLink,
};
use futures::StreamExt;
use tempfile::TempDir;

const WEEK: u64 = 7 * 24 * 3600;
const CHATS: [&str; 3] = ["general", "random", "dev"];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A node with its own data-dir, listening on loopback.
async fn node(dir: &Path, retries: u32) -> CodexNode {
    let cfg = CodexConfig::builder()
        .data_dir(dir.join("codex"))
        .listen_addrs(["/ip4/127.0.0.1/tcp/0"])
        .storage_quota(1 << 30)
        .block_ttl(None)
        .block_retries(retries)
        .build()
        .unwrap();
    let n = CodexNode::new(cfg).await.unwrap();
    n.start().await.unwrap();
    n
}

async fn connect(a: &CodexNode, b: &CodexNode) {
    let info = b.debug().await.unwrap();
    a.connect(&info.id, &info.addrs).await.unwrap();
}

fn config() -> ArchiveConfig {
    ArchiveConfig::default()
        .with_download_timeout(Duration::from_secs(20))
        .with_retry(Duration::from_millis(200), Duration::from_secs(1))
}

/// `n` messages per chat spread over `weeks` weeks before `end`, with a gap week (week 2
/// from the start has none), payloads of varied size.
fn messages(community: &Community, n: usize, weeks: u64, end: u64, seed: u8) -> Vec<WakuMessage> {
    let start = end - weeks * WEEK;
    let mut out = Vec::new();
    for (c, chat) in community.chat_ids.iter().enumerate() {
        let topic = codex_archive::codex_proto::topic(chat);
        for i in 0..n {
            let mut ts = start + (i as u64 * weeks * WEEK) / n as u64;
            if (ts - start) / WEEK == 2 {
                ts += WEEK;
            }
            let body = format!("{seed}/{chat}/{i}/").repeat(1 + i % 7);
            let hash = codex_archive::codex_proto::keccak256(body.as_bytes());
            out.push(WakuMessage {
                sig: vec![seed, c as u8, 1, 2].into(),
                timestamp: ts.min(end - 1),
                topic: topic.to_vec().into(),
                payload: body.into_bytes().into(),
                hash: hash.to_vec().into(),
                ..Default::default()
            });
        }
    }
    out
}

struct Side {
    _dir: TempDir,
    node: CodexNode,
    db: Database,
}

async fn side(retries: u32) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), retries).await;
    let db = Database::open(dir.path().join("archive.db")).unwrap();
    Side {
        _dir: dir,
        node,
        db,
    }
}

struct OwnerSide {
    side: Side,
    owner: Owner,
    key: CommunityKey,
    community: Community,
    bus: LocalLinkBus,
    /// The links this owner publishes.
    links: tokio::sync::broadcast::Receiver<SignedLink>,
}

impl OwnerSide {
    /// Stores `msgs`, all of them new.
    async fn store(&self, msgs: Vec<WakuMessage>) {
        let n = msgs.len();
        assert_eq!(self.owner.store_messages(msgs).await.unwrap(), n);
    }

    /// Runs a round up to `end` and returns its report and the link it published.
    async fn publish(&mut self, end: u64) -> (RoundReport, SignedLink) {
        let report = self
            .owner
            .archive_and_publish(&self.community, &self.key, end)
            .await
            .unwrap()
            .expect("there were messages to archive");
        (report, next_link(&mut self.links).await)
    }
}

async fn owner_side(encrypted: Option<&[u8]>) -> OwnerSide {
    let side = side(3000).await;
    let key = CommunityKey::generate();
    let mut community = Community::new(key.id(), CHATS);
    if let Some(k) = encrypted {
        community = community.encrypted(k.to_vec());
    }
    let bus = LocalLinkBus::new();
    // An owner downloads only a previous index that is gone: do not wait long for it.
    let owner = Owner::new(
        side.db.clone(),
        side.node.clone(),
        Arc::new(bus.clone()),
        config().with_download_timeout(Duration::from_secs(3)),
    );
    OwnerSide {
        side,
        owner,
        key,
        community,
        links: bus.subscribe(),
        bus,
    }
}

struct MemberSide {
    side: Side,
    member: Member,
    community: Community,
}

async fn member_side(o: &OwnerSide, chats: &[&str], retries: u32) -> MemberSide {
    let side = side(retries).await;
    let mut community = Community::new(o.key.id(), chats.iter().copied());
    community.key_material = o.community.key_material.clone();
    let member = Member::new(side.db.clone(), side.node.clone(), config());
    member.join(community.clone()).await.unwrap();
    MemberSide {
        side,
        member,
        community,
    }
}

/// The owner's messages on the member's chats.
fn expected(o: &OwnerSide, m: &MemberSide) -> Vec<Vec<u8>> {
    o.side.db.message_hashes(&m.community.topics()).unwrap()
}

async fn next_link(rx: &mut tokio::sync::broadcast::Receiver<SignedLink>) -> SignedLink {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a link is published")
        .unwrap()
}

async fn settle(m: &MemberSide) {
    tokio::time::timeout(Duration::from_secs(120), m.member.idle(&m.community.id))
        .await
        .expect("the member settles");
}

fn ids(db: &Database, c: &Community) -> BTreeSet<String> {
    db.archives(&c.id)
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_downloads_imports_and_serves_a_public_community() {
    let mut o = owner_side(None).await;
    let end = now();
    let msgs = messages(&o.community, 400, 6, end, 1);
    let total = msgs.len();
    o.store(msgs).await;
    let (report, link) = o.publish(end).await;
    // Six weeks with one empty: five archives, no entry for the empty week.
    assert_eq!(report.created.len(), 5, "{report:?}");
    assert_eq!(report.index_entries, 5);
    for w in report.created.windows(2) {
        assert!(w[0].to <= w[1].from);
    }

    let m1 = member_side(&o, &CHATS, 3000).await;
    connect(&m1.side.node, &o.side.node).await;
    let mut events = m1.member.events();
    assert_eq!(
        m1.member.handle_link(&link).await.unwrap(),
        report.index_cid.clone().unwrap()
    );
    settle(&m1).await;
    assert_eq!(
        m1.side.db.imported_hashes(&o.key.id()).unwrap(),
        expected(&o, &m1)
    );
    assert_eq!(
        ids(&m1.side.db, &m1.community),
        ids(&o.side.db, &o.community)
    );
    assert_eq!(
        m1.side
            .db
            .archive_info(&o.key.id())
            .unwrap()
            .last_archive_link,
        report.index_cid.clone().unwrap()
    );
    // Events in order: started, index, archives newest first, seeding, imports, finished.
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await {
        seen.push(e);
    }
    assert!(
        matches!(seen[0], Event::DownloadingStarted { .. }),
        "{seen:?}"
    );
    assert!(matches!(
        seen[1],
        Event::IndexDownloaded {
            archives: 5,
            missing: 5,
            ..
        }
    ));
    let froms: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            Event::ArchiveDownloaded { from, .. } => Some(*from),
            _ => None,
        })
        .collect();
    assert_eq!(froms.len(), 5);
    assert!(matches!(
        seen.last(),
        Some(Event::DownloadingFinished { .. })
    ));

    // The owner goes offline; a second member with fewer chats gets everything from the
    // first, and imports only its chats.
    o.side.node.stop().await.unwrap();
    let m2 = member_side(&o, &CHATS[..1], 3000).await;
    connect(&m2.side.node, &m1.side.node).await;
    m2.member.handle_link(&link).await.unwrap();
    settle(&m2).await;
    let got = m2.side.db.imported_hashes(&o.key.id()).unwrap();
    assert_eq!(got, expected(&o, &m2));
    assert!(got.len() < total && !got.is_empty());
    assert_eq!(
        ids(&m2.side.db, &m2.community),
        ids(&o.side.db, &o.community)
    );

    // The same link again is a duplicate.
    assert!(matches!(
        m2.member.handle_link(&link).await,
        Err(Error::Rejected(Rejection::Duplicate))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_community_round_trips_and_a_wrong_key_touches_nothing() {
    let mut o = owner_side(Some(b"secret key material")).await;
    let end = now();
    o.store(messages(&o.community, 200, 3, end, 2)).await;
    let (report, link) = o.publish(end).await;
    // What is stored is ciphertext: it does not decode as a plain index.
    let index_cid: codex::Cid = report.index_cid.unwrap().parse().unwrap();
    let stored = o
        .side
        .node
        .download(&index_cid)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(CodexWakuMessageArchiveIndex::decode(&stored[..])
        .map(|i| i.archives.is_empty())
        .unwrap_or(true));

    let m = member_side(&o, &CHATS, 3000).await;
    connect(&m.side.node, &o.side.node).await;
    m.member.handle_link(&link).await.unwrap();
    settle(&m).await;
    assert_eq!(
        m.side.db.imported_hashes(&o.key.id()).unwrap(),
        expected(&o, &m)
    );

    // A member with the wrong key: a clear error, nothing recorded, nothing imported.
    let mut bad = member_side(&o, &CHATS, 3000).await;
    bad.community = bad.community.encrypted(b"wrong".to_vec());
    bad.member.join(bad.community.clone()).await.unwrap();
    connect(&bad.side.node, &o.side.node).await;
    let mut events = bad.member.events();
    bad.member.handle_link(&link).await.unwrap();
    settle(&bad).await;
    let failed = failure(&mut events).await;
    assert!(failed.0.contains("does not decrypt"), "{failed:?}");
    assert_eq!(failed.1, None, "a wrong key is not retried");
    untouched(&bad.side.db, &bad.community);
}

/// The first `Failed` event: its error and retry delay.
async fn failure(
    events: &mut (impl futures::Stream<Item = Event> + Unpin),
) -> (String, Option<u64>) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("an event")
            .unwrap();
        if let Event::Failed {
            error,
            retry_in_secs,
            ..
        } = e
        {
            return (error, retry_in_secs);
        }
    }
}

fn untouched(db: &Database, c: &Community) {
    assert_eq!(db.imported_count(&c.id).unwrap(), 0);
    assert!(db.archives(&c.id).unwrap().is_empty());
    let info = db.archive_info(&c.id).unwrap();
    assert_eq!(info.last_archive_link, "");
    assert_eq!(info.pending_archive_link, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_round_makes_a_cumulative_index_even_when_the_previous_one_is_gone() {
    let mut o = owner_side(None).await;
    let end = now() - 2 * WEEK;
    o.store(messages(&o.community, 100, 3, end, 3)).await;
    let (first, link1) = o.publish(end).await;
    let m = member_side(&o, &CHATS, 3000).await;
    connect(&m.side.node, &o.side.node).await;
    m.member.handle_link(&link1).await.unwrap();
    settle(&m).await;

    // Two more weeks of messages; the first index is deleted from the owner's store (the
    // member still has it, but the database alone must do).
    o.store(messages(&o.community, 50, 2, end + 2 * WEEK, 4))
        .await;
    let old: codex::Cid = first.index_cid.clone().unwrap().parse().unwrap();
    o.side.node.delete(&old).await.unwrap();
    m.side.node.delete(&old).await.unwrap();
    assert_eq!(
        o.owner.check_stored(&o.community).await.unwrap(),
        vec![old.to_string()],
        "the lost index is reported"
    );
    let (second, link2) = o.publish(end + 2 * WEEK).await;
    assert_eq!(second.from, end, "the round starts where the last ended");
    assert!(!second.previous_index_read);
    assert_eq!(
        second.index_entries,
        first.created.len() + second.created.len(),
        "the index is cumulative"
    );
    assert!(link2.verify().unwrap().clock >= link1.verify().unwrap().clock);

    // The member fetches only the new archives.
    let mut events = m.member.events();
    m.member.handle_link(&link2).await.unwrap();
    settle(&m).await;
    let mut downloaded = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await {
        match e {
            Event::IndexDownloaded {
                archives, missing, ..
            } => {
                assert_eq!(archives, second.index_entries);
                assert_eq!(missing, second.created.len());
            }
            Event::ArchiveDownloaded { .. } => downloaded += 1,
            _ => {}
        }
    }
    assert_eq!(downloaded, second.created.len());
    assert_eq!(
        m.side.db.imported_hashes(&o.key.id()).unwrap(),
        expected(&o, &m)
    );

    // A round with nothing new publishes the same index again, never an empty link.
    let (third, link3) = o.publish(end + 2 * WEEK + 60).await;
    assert!(third.created.is_empty() && third.index_cid.is_none());
    assert_eq!(
        link3.verify().unwrap().archive_link,
        second.index_cid.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_link_replaces_the_download_in_progress() {
    let mut o = owner_side(None).await;
    let end = now() - 3 * WEEK;
    o.store(messages(&o.community, 300, 4, end, 5)).await;
    let (_, link1) = o.publish(end).await;
    o.store(messages(&o.community, 100, 3, end + 3 * WEEK, 6))
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (second, link2) = o.publish(end + 3 * WEEK).await;

    let m = member_side(&o, &CHATS, 3000).await;
    connect(&m.side.node, &o.side.node).await;
    m.member.handle_link(&link1).await.unwrap();
    // At once: the first download is cancelled, the second covers everything.
    m.member.handle_link(&link2).await.unwrap();
    settle(&m).await;
    let info = m.side.db.archive_info(&o.key.id()).unwrap();
    assert_eq!(info.last_archive_link, second.index_cid.unwrap());
    assert_eq!(info.pending_archive_link, "");
    assert_eq!(
        m.side.db.imported_hashes(&o.key.id()).unwrap(),
        expected(&o, &m)
    );
    // The older link is now stale.
    assert!(matches!(
        m.member.handle_link(&link1).await,
        Err(Error::Rejected(Rejection::Stale { .. }))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_mid_import_resumes_without_losing_or_repeating() {
    let mut o = owner_side(None).await;
    let end = now();
    o.store(messages(&o.community, 3000, 8, end, 7)).await;
    let (_, link) = o.publish(end).await;

    let dir = tempfile::tempdir().unwrap();
    let (community, imported_before) = {
        let n = node(dir.path(), 3000).await;
        let db = Database::open(dir.path().join("archive.db")).unwrap();
        let member = Member::new(db.clone(), n.clone(), config());
        let community = Community::new(o.key.id(), CHATS);
        member.join(community.clone()).await.unwrap();
        connect(&n, &o.side.node).await;
        let mut events = member.events();
        member.handle_link(&link).await.unwrap();
        // Stop at the first import: the task is dropped with the member and the node.
        loop {
            let e = tokio::time::timeout(Duration::from_secs(60), events.next())
                .await
                .unwrap()
                .unwrap();
            if matches!(e, Event::Imported { .. }) {
                break;
            }
        }
        drop(member);
        n.destroy().await.unwrap();
        let before = db.imported_count(&o.key.id()).unwrap();
        (community, before)
    };
    assert!(imported_before > 0);

    // A new run on the same files: joining resumes the imports (the owner is offline, so
    // what is imported comes from the member's own store).
    o.side.node.stop().await.unwrap();
    let n = node(dir.path(), 3000).await;
    let db = Database::open(dir.path().join("archive.db")).unwrap();
    assert!(
        !db.unimported(&o.key.id()).unwrap().is_empty(),
        "stopped mid-import"
    );
    let member = Member::new(db.clone(), n.clone(), config());
    member.join(community.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), member.idle(&community.id))
        .await
        .unwrap();
    let want = o.side.db.message_hashes(&community.topics()).unwrap();
    assert_eq!(db.imported_hashes(&o.key.id()).unwrap(), want);
    assert!(db.unimported(&o.key.id()).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_rules_reject_what_must_not_be_followed() {
    let mut o = owner_side(None).await;
    let end = now();
    o.store(messages(&o.community, 20, 1, end, 8)).await;
    let (_, link) = o.publish(end).await;
    let cid = link.verify().unwrap().archive_link;
    let m = member_side(&o, &CHATS, 3000).await;
    let rejected = |r: Result<String, Error>| match r {
        Err(Error::Rejected(why)) => why,
        other => panic!("accepted: {other:?}"),
    };

    // Signed by someone else.
    let intruder = CommunityKey::generate();
    let forged = SignedLink::sign(&intruder, &o.key.id(), &link.verify().unwrap());
    assert!(matches!(
        rejected(m.member.handle_link(&forged).await),
        Rejection::NotCommunityKey { .. }
    ));
    // A community not joined.
    let other = CommunityKey::generate();
    let stranger = SignedLink::sign(&other, &other.id(), &link.verify().unwrap());
    assert!(matches!(
        rejected(m.member.handle_link(&stranger).await),
        Rejection::NotJoined(_)
    ));
    // A clock below the checkpoint of the community description.
    m.member
        .observe_clock(&o.key.id(), link.verify().unwrap().clock + 1)
        .await
        .unwrap();
    assert!(matches!(
        rejected(m.member.handle_link(&link).await),
        Rejection::Stale { .. }
    ));
    // Archive support off; and the control node ignores its own links.
    let off = Member::new(
        m.side.db.clone(),
        m.side.node.clone(),
        config().with_enabled(false),
    );
    off.join(m.community.clone()).await.unwrap();
    assert_eq!(rejected(off.handle_link(&link).await), Rejection::Disabled);
    let ctl = Member::new(o.side.db.clone(), o.side.node.clone(), config());
    ctl.set_control_node(&o.key.id());
    ctl.join(o.community.clone()).await.unwrap();
    assert_eq!(
        rejected(ctl.handle_link(&link).await),
        Rejection::ControlNode
    );
    untouched(&m.side.db, &m.community);
    assert!(!cid.is_empty());
}

/// Signs a link to `cid` with the owner's key, clock now.
fn signed(o: &OwnerSide, cid: &str) -> SignedLink {
    let link = CommunityMessageArchiveLink {
        clock: u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap(),
        archive_link: cid.into(),
    };
    SignedLink::sign(&o.key, &o.key.id(), &link)
}

/// Uploads to the owner's node an index of one entry, for `archive` over `metadata`,
/// encrypted with `key`; returns its CID.
async fn upload_index(
    o: &OwnerSide,
    key: &[u8],
    metadata: Option<WakuMessageArchiveMetadata>,
    archive: &codex::Cid,
) -> codex::Cid {
    let entry = CodexWakuMessageArchiveIndexMetadata {
        version: 0,
        metadata,
        cid: archive.to_string(),
    };
    let index = CodexWakuMessageArchiveIndex {
        archives: [(archive_id(&entry), entry)].into_iter().collect(),
    };
    let sealed = CommunityCipher::new(key)
        .encrypt(&index.encode_to_vec())
        .unwrap();
    o.side.node.upload().bytes(sealed).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_indexes_and_archives_leave_the_member_untouched() {
    let o = owner_side(Some(b"k1")).await;
    let m = member_side(&o, &CHATS, 2).await;
    connect(&m.side.node, &o.side.node).await;
    let mut events = m.member.events();

    // An index that is not protobuf (nor encrypted with the key).
    let garbage = o
        .side
        .node
        .upload()
        .bytes(vec![0xffu8; 1000])
        .await
        .unwrap();
    m.member
        .handle_link(&signed(&o, garbage.as_str()))
        .await
        .unwrap();
    settle(&m).await;
    let (error, retry) = failure(&mut events).await;
    assert!(error.contains("index"), "{error}");
    assert_eq!(retry, None);
    untouched(&m.side.db, &m.community);

    // A valid index naming an archive that was encrypted with another key.
    let alien = WakuMessageArchive {
        version: 0,
        metadata: Some(WakuMessageArchiveMetadata {
            from: 0,
            to: WEEK,
            ..Default::default()
        }),
        messages: messages(&o.community, 5, 1, WEEK + 1, 9),
    };
    let sealed = CommunityCipher::new(b"k2")
        .encrypt(&alien.encode_to_vec())
        .unwrap();
    let acid = o.side.node.upload().bytes(sealed).await.unwrap();
    let icid = upload_index(&o, b"k1", alien.metadata.clone(), &acid).await;
    m.member
        .handle_link(&signed(&o, icid.as_str()))
        .await
        .unwrap();
    settle(&m).await;
    let (error, retry) = failure(&mut events).await;
    assert!(error.contains("does not decrypt"), "{error}");
    assert_eq!(retry, None);
    assert_eq!(m.side.db.imported_count(&o.key.id()).unwrap(), 0);
    assert!(m.side.db.unimported(&o.key.id()).unwrap().is_empty());

    // An index naming a CID nobody has: retried with backoff, nothing recorded meanwhile.
    let missing = {
        let other = side(3000).await;
        other.node.upload().bytes(vec![7u8; 5000]).await.unwrap()
    };
    let icid = upload_index(&o, b"k1", alien.metadata.clone(), &missing).await;
    m.member
        .handle_link(&signed(&o, icid.as_str()))
        .await
        .unwrap();
    let (error, retry) = failure(&mut events).await;
    assert!(error.contains(missing.as_str()), "{error}");
    assert!(retry.is_some(), "a missing archive may appear later");
    assert_eq!(m.side.db.imported_count(&o.key.id()).unwrap(), 0);
    assert_eq!(
        m.side
            .db
            .archive_info(&o.key.id())
            .unwrap()
            .pending_archive_link,
        icid.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_reported_and_chunks_respect_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), 3000).await;
    let db = Database::open(dir.path().join("archive.db")).unwrap();
    let key = CommunityKey::generate();
    let community = Community::new(key.id(), ["general"]);
    let owner = Owner::new(
        db.clone(),
        n.clone(),
        Arc::new(LocalLinkBus::new()),
        config().with_max_archive_bytes(3_000),
    );
    let end = now();
    let mut msgs = messages(&community, 100, 1, end, 10);
    let mut big = msgs[0].clone();
    big.payload = vec![1u8; 5_000].into();
    big.hash = vec![9u8; 32].into();
    msgs.push(big);
    owner.store_messages(msgs).await.unwrap();
    let report = owner
        .create_archives(&community, end - WEEK, end)
        .await
        .unwrap();
    assert_eq!(report.oversized, vec![vec![9u8; 32]]);
    assert!(report.created.len() > 1, "split into chunks: {report:?}");
    let mut total = 0;
    for a in &report.created {
        let cid: codex::Cid = a.cid.parse().unwrap();
        let data = n.download(&cid).await.unwrap().bytes().await.unwrap();
        let archive = WakuMessageArchive::decode(&data[..]).unwrap();
        let size: usize = archive
            .messages
            .iter()
            .map(|m| m.payload.len() + m.sig.len())
            .sum();
        assert!(size <= 3_000);
        total += archive.messages.len();
        let meta = archive.metadata.unwrap();
        assert_eq!((meta.from, meta.to), (end - WEEK, end));
        assert_eq!(
            meta.content_topic.len(),
            2,
            "the chat and the universal chat"
        );
    }
    assert_eq!(total, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_archives_at_start_up_and_then_every_interval() {
    let o = owner_side(None).await;
    let owner = Owner::new(
        o.side.db.clone(),
        o.side.node.clone(),
        Arc::new(o.bus.clone()),
        config().with_interval(Duration::from_secs(2)),
    );
    let mut links = o.bus.subscribe();
    // Nothing to archive: nothing is published.
    owner.start(o.community.clone(), o.key.clone());
    assert!(
        tokio::time::timeout(Duration::from_secs(3), links.recv())
            .await
            .is_err(),
        "no empty link"
    );
    // Messages arrive: the next round archives them and publishes; later rounds repeat
    // the link without new archives.
    let end = now() - 1;
    o.store(messages(&o.community, 50, 3, end, 11)).await;
    let first = next_link(&mut links).await.verify().unwrap();
    let again = next_link(&mut links).await.verify().unwrap();
    assert_eq!(first.archive_link, again.archive_link);
    assert!(again.clock > first.clock);
    owner.stop(&o.community.id);

    // Restarted with a recent round: it waits for the interval, then runs.
    let t = std::time::Instant::now();
    owner.start(o.community.clone(), o.key.clone());
    next_link(&mut links).await;
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    owner.stop(&o.community.id);
    let info = o.side.db.archive_info(&o.community.id).unwrap();
    assert!(info.last_message_archive_end_date >= end);
    assert_eq!(info.last_archive_link, first.archive_link);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_fails_midway_records_nothing_and_the_next_one_completes() {
    let dir = tempfile::tempdir().unwrap();
    let start_node = |quota: u64| {
        let cfg = CodexConfig::builder()
            .data_dir(dir.path().join("codex"))
            .listen_addrs(["/ip4/127.0.0.1/tcp/0"])
            .storage_quota(quota)
            .block_ttl(None)
            .build()
            .unwrap();
        async move {
            let n = CodexNode::new(cfg).await.unwrap();
            n.start().await.unwrap();
            n
        }
    };
    let db = Database::open(dir.path().join("archive.db")).unwrap();
    let key = CommunityKey::generate();
    let community = Community::new(key.id(), CHATS).encrypted(b"k".to_vec());
    let end = now();

    // A store too small for every archive: the round fails part way.
    let small = start_node(256 << 10).await;
    let owner = Owner::new(
        db.clone(),
        small.clone(),
        Arc::new(LocalLinkBus::new()),
        config(),
    );
    owner
        .store_messages(messages(&community, 400, 6, end, 12))
        .await
        .unwrap();
    let err = owner.create_archives(&community, end - 6 * WEEK, end).await;
    assert!(err.is_err(), "the quota must be hit: {err:?}");
    // Nothing recorded, and what the round stored is removed again.
    assert_eq!(db.archive_info(&community.id).unwrap(), Default::default());
    assert!(db.archives(&community.id).unwrap().is_empty());
    assert!(small.list().await.unwrap().is_empty(), "orphaned uploads");
    small.destroy().await.unwrap();

    // The next run, with room, does the whole job once.
    let big = start_node(1 << 30).await;
    let owner = Owner::new(
        db.clone(),
        big.clone(),
        Arc::new(LocalLinkBus::new()),
        config(),
    );
    let report = owner
        .create_archives(&community, end - 6 * WEEK, end)
        .await
        .unwrap();
    assert_eq!(report.created.len(), 5);
    assert_eq!(db.archives(&community.id).unwrap().len(), 5);
    assert_eq!(
        big.list().await.unwrap().len(),
        6,
        "five archives and the index"
    );
    let info = db.archive_info(&community.id).unwrap();
    assert_eq!(info.last_message_archive_end_date, end);
    assert_eq!(Some(info.last_archive_link), report.index_cid);
}
