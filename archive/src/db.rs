//! The SQLite database of the archive service: raw Waku messages of owned communities,
//! per-community archive state, archive IDs, and the messages a member imported.
//!
//! The schema is versioned with `PRAGMA user_version`; [`Database::open`] applies the
//! migrations a file lacks, each in its own transaction. Every change that must be atomic
//! (an archiving round's outcome, one archive's import) is one transaction, so a crash
//! leaves either the state before it or the state after it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use codex_proto::{Message, WakuMessage};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use crate::community::{CommunityId, Topic};
use crate::error::{Error, Result};

/// The schema migrations, in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: the tables of PIPELINE.md, plus what resuming needs (the link being downloaded, and
    // each archive's CID, range and encoded index entry so an index can be rebuilt).
    "CREATE TABLE waku_messages (
        sig BLOB NOT NULL,
        timestamp INTEGER NOT NULL,
        topic BLOB NOT NULL,
        payload BLOB NOT NULL,
        padding BLOB NOT NULL,
        hash BLOB PRIMARY KEY,
        third_party_id TEXT NOT NULL
     );
     CREATE INDEX waku_messages_timestamp_topic ON waku_messages (timestamp, topic);
     CREATE TABLE communities_archive_info (
        community_id TEXT PRIMARY KEY,
        archive_link_clock INTEGER NOT NULL DEFAULT 0,
        last_message_archive_end_date INTEGER NOT NULL DEFAULT 0,
        last_archive_link TEXT NOT NULL DEFAULT '',
        pending_archive_link TEXT NOT NULL DEFAULT ''
     );
     CREATE TABLE community_message_archive_hashes (
        community_id TEXT NOT NULL,
        hash TEXT PRIMARY KEY,
        imported INTEGER NOT NULL DEFAULT 0,
        cid TEXT NOT NULL,
        from_ts INTEGER NOT NULL,
        to_ts INTEGER NOT NULL,
        entry BLOB NOT NULL,
        error TEXT
     );
     CREATE INDEX community_message_archive_hashes_community
        ON community_message_archive_hashes (community_id, imported);
     CREATE TABLE imported_messages (
        hash BLOB PRIMARY KEY,
        community_id TEXT NOT NULL,
        sig BLOB NOT NULL,
        timestamp INTEGER NOT NULL,
        topic BLOB NOT NULL,
        payload BLOB NOT NULL,
        padding BLOB NOT NULL,
        third_party_id TEXT NOT NULL
     );
     CREATE INDEX imported_messages_community_timestamp
        ON imported_messages (community_id, timestamp);",
];

/// A community's archive state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// Highest link clock seen (milliseconds).
    pub archive_link_clock: u64,
    /// End (Unix seconds, exclusive) of the last archived range; 0 when nothing was archived.
    pub last_message_archive_end_date: u64,
    /// CID of the current index; empty when there is none.
    pub last_archive_link: String,
    /// Member: the index CID being downloaded, to resume after a restart; empty when idle.
    pub pending_archive_link: String,
}

/// An archive known to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRecord {
    /// Its archive ID (`0x` + Keccak-256 of `entry`).
    pub id: String,
    /// Its dataset CID.
    pub cid: String,
    /// Start of its range, Unix seconds.
    pub from: u64,
    /// End of its range (exclusive), Unix seconds.
    pub to: u64,
    /// The protobuf encoding of its index entry.
    pub entry: Vec<u8>,
}

/// A run of a window's messages, read in timestamp order.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The messages, at most the size limit in all (payload + signature).
    pub messages: Vec<WakuMessage>,
    /// Their total size (payload + signature).
    pub bytes: u64,
    /// Hashes of messages skipped because each alone is over the limit.
    pub oversized: Vec<Vec<u8>>,
    /// Where the next chunk starts; `None` when the window is exhausted.
    pub next: Option<Cursor>,
}

/// A position in the message order (timestamp, hash): the last message read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    timestamp: u64,
    hash: Vec<u8>,
}

/// The archive service's database. Cheap to clone; all clones share one connection.
/// Calls block: from async code, run them on a blocking thread.
#[derive(Clone)]
pub struct Database {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Database(..)")
    }
}

impl Database {
    /// Opens (creating if needed) the database file at `path` and brings its schema up to
    /// date.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let conn = Connection::open(path)?;
        // WAL: readers do not block the writer; NORMAL sync keeps every commit atomic and
        // the file consistent across crashes.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let db = Self {
            conn: Arc::new(Mutex::new(conn)),
        };
        db.migrate()?;
        Ok(db)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.lock();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(Error::SchemaTooNew {
                found: version,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version of the file.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .lock()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    // ---- owner: raw messages ----

    /// Stores raw Waku messages of owned communities as they arrive; a message already
    /// stored (same hash) is ignored. Returns how many were new.
    pub fn store_messages(&self, messages: &[WakuMessage]) -> Result<usize> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut added = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO waku_messages
                 (sig, timestamp, topic, payload, padding, hash, third_party_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for m in messages {
                added += insert.execute(params![
                    &m.sig[..],
                    to_sql_u64(m.timestamp)?,
                    &m.topic[..],
                    &m.payload[..],
                    &m.padding[..],
                    message_hash(m),
                    m.third_party_id,
                ])?;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// The oldest timestamp among the messages on `topics`.
    pub fn oldest_timestamp(&self, topics: &[Topic]) -> Result<Option<u64>> {
        if topics.is_empty() {
            return Ok(None);
        }
        let sql = format!(
            "SELECT MIN(timestamp) FROM waku_messages WHERE topic IN ({})",
            placeholders(topics.len(), 1)
        );
        let conn = self.lock();
        let v: Option<i64> =
            conn.query_row(&sql, params_from_iter(topics.iter().map(|t| &t[..])), |r| {
                r.get(0)
            })?;
        Ok(v.map(|t| t as u64))
    }

    /// The next chunk of the messages on `topics` with `from <= timestamp < to`, starting
    /// after `after`, in (timestamp, hash) order, of at most `max_bytes` (payload +
    /// signature). A message alone over `max_bytes` is not included but reported.
    pub fn read_chunk(
        &self,
        topics: &[Topic],
        from: u64,
        to: u64,
        after: Option<&Cursor>,
        max_bytes: u64,
    ) -> Result<Chunk> {
        let mut chunk = Chunk::default();
        if topics.is_empty() || from >= to {
            return Ok(chunk);
        }
        let (ts, hash) = match after {
            Some(c) => (to_sql_u64(c.timestamp)?, c.hash.clone()),
            None => (-1, Vec::new()),
        };
        let sql = format!(
            "SELECT sig, timestamp, topic, payload, padding, hash, third_party_id
             FROM waku_messages
             WHERE timestamp >= ?1 AND timestamp < ?2 AND (timestamp, hash) > (?3, ?4)
               AND topic IN ({})
             ORDER BY timestamp, hash",
            placeholders(topics.len(), 5)
        );
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut args: Vec<rusqlite::types::Value> = vec![
            to_sql_u64(from)?.into(),
            to_sql_u64(to)?.into(),
            ts.into(),
            hash.into(),
        ];
        args.extend(topics.iter().map(|t| t.to_vec().into()));
        let mut rows = stmt.query(params_from_iter(args))?;
        let mut last: Option<Cursor> = None;
        while let Some(row) = rows.next()? {
            let m = WakuMessage {
                sig: row.get::<_, Vec<u8>>(0)?.into(),
                timestamp: row.get::<_, i64>(1)? as u64,
                topic: row.get::<_, Vec<u8>>(2)?.into(),
                payload: row.get::<_, Vec<u8>>(3)?.into(),
                padding: row.get::<_, Vec<u8>>(4)?.into(),
                hash: row.get::<_, Vec<u8>>(5)?.into(),
                third_party_id: row.get(6)?,
            };
            let size = (m.payload.len() + m.sig.len()) as u64;
            if size > max_bytes {
                chunk.oversized.push(m.hash.to_vec());
                last = Some(Cursor {
                    timestamp: m.timestamp,
                    hash: m.hash.to_vec(),
                });
                continue;
            }
            if chunk.bytes + size > max_bytes {
                // Full: the next chunk starts with this message.
                chunk.next = last;
                return Ok(chunk);
            }
            chunk.bytes += size;
            last = Some(Cursor {
                timestamp: m.timestamp,
                hash: m.hash.to_vec(),
            });
            chunk.messages.push(m);
        }
        Ok(chunk)
    }

    // ---- archive state ----

    /// The archive state of `community` (all zero and empty when unknown).
    pub fn archive_info(&self, community: &CommunityId) -> Result<ArchiveInfo> {
        let conn = self.lock();
        let info = conn
            .query_row(
                "SELECT archive_link_clock, last_message_archive_end_date, last_archive_link,
                        pending_archive_link
                 FROM communities_archive_info WHERE community_id = ?1",
                [community.to_hex()],
                |r| {
                    Ok(ArchiveInfo {
                        archive_link_clock: r.get::<_, i64>(0)? as u64,
                        last_message_archive_end_date: r.get::<_, i64>(1)? as u64,
                        last_archive_link: r.get(2)?,
                        pending_archive_link: r.get(3)?,
                    })
                },
            )
            .optional()?;
        Ok(info.unwrap_or_default())
    }

    fn ensure_info(tx: &rusqlite::Transaction<'_>, community: &CommunityId) -> Result<()> {
        tx.execute(
            "INSERT OR IGNORE INTO communities_archive_info (community_id) VALUES (?1)",
            [community.to_hex()],
        )?;
        Ok(())
    }

    /// Owner: records the outcome of an archiving round in one transaction: the archives
    /// created (marked imported: the owner has their messages), the new index CID (when
    /// archives were created), and the end of the archived range.
    pub fn record_round(
        &self,
        community: &CommunityId,
        created: &[ArchiveRecord],
        index_cid: Option<&str>,
        end: u64,
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        Self::ensure_info(&tx, community)?;
        for a in created {
            insert_archive(&tx, community, a, true, None)?;
        }
        if let Some(cid) = index_cid {
            tx.execute(
                "UPDATE communities_archive_info SET last_archive_link = ?2
                 WHERE community_id = ?1",
                params![community.to_hex(), cid],
            )?;
        }
        tx.execute(
            "UPDATE communities_archive_info
             SET last_message_archive_end_date = MAX(last_message_archive_end_date, ?2)
             WHERE community_id = ?1",
            params![community.to_hex(), to_sql_u64(end)?],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Raises the link clock of `community` to `clock` (never lowers it).
    pub fn raise_clock(&self, community: &CommunityId, clock: u64) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        Self::ensure_info(&tx, community)?;
        tx.execute(
            "UPDATE communities_archive_info
             SET archive_link_clock = MAX(archive_link_clock, ?2) WHERE community_id = ?1",
            params![community.to_hex(), to_sql_u64(clock)?],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Member: an accepted link, to be downloaded: raises the clock and sets the pending
    /// link, in one transaction.
    pub fn accept_link(&self, community: &CommunityId, clock: u64, link: &str) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        Self::ensure_info(&tx, community)?;
        tx.execute(
            "UPDATE communities_archive_info
             SET archive_link_clock = MAX(archive_link_clock, ?2), pending_archive_link = ?3
             WHERE community_id = ?1",
            params![community.to_hex(), to_sql_u64(clock)?, link],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Member: the pending link's index and archives are all local: it becomes the current
    /// link (unless a newer link became pending meanwhile).
    pub fn finish_link(&self, community: &CommunityId, link: &str) -> Result<()> {
        let conn = self.lock();
        conn.execute(
            "UPDATE communities_archive_info
             SET last_archive_link = ?2,
                 pending_archive_link = CASE WHEN pending_archive_link = ?2 THEN ''
                                             ELSE pending_archive_link END
             WHERE community_id = ?1",
            params![community.to_hex(), link],
        )?;
        Ok(())
    }

    /// Member: a pending link that will never download (its index is invalid) is dropped,
    /// so a restart does not try it again. Its clock stays.
    pub fn abandon_link(&self, community: &CommunityId, link: &str) -> Result<()> {
        let conn = self.lock();
        conn.execute(
            "UPDATE communities_archive_info SET pending_archive_link = ''
             WHERE community_id = ?1 AND pending_archive_link = ?2",
            params![community.to_hex(), link],
        )?;
        Ok(())
    }

    // ---- archives ----

    /// The archives recorded for `community` (created, downloaded or found unusable).
    pub fn archives(&self, community: &CommunityId) -> Result<Vec<ArchiveRecord>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT hash, cid, from_ts, to_ts, entry FROM community_message_archive_hashes
             WHERE community_id = ?1 AND error IS NULL ORDER BY from_ts, hash",
        )?;
        let rows = stmt.query_map([community.to_hex()], record_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The archive IDs recorded for `community`, usable or not.
    pub fn archive_ids(&self, community: &CommunityId) -> Result<HashSet<String>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT hash FROM community_message_archive_hashes WHERE community_id = ?1",
        )?;
        let rows = stmt.query_map([community.to_hex()], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Member: an archive fully and verifiably local, not yet imported.
    pub fn record_downloaded(&self, community: &CommunityId, a: &ArchiveRecord) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        insert_archive(&tx, community, a, false, None)?;
        tx.commit()?;
        Ok(())
    }

    /// Member: an archive that can never be used (it does not decrypt or decode; its bytes
    /// will not change). Recorded so it is not fetched again.
    pub fn record_unusable(
        &self,
        community: &CommunityId,
        a: &ArchiveRecord,
        error: &str,
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        insert_archive(&tx, community, a, false, Some(error))?;
        tx.commit()?;
        Ok(())
    }

    /// Member: usable archives not yet imported, oldest first.
    pub fn unimported(&self, community: &CommunityId) -> Result<Vec<ArchiveRecord>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT hash, cid, from_ts, to_ts, entry FROM community_message_archive_hashes
             WHERE community_id = ?1 AND imported = 0 AND error IS NULL
             ORDER BY from_ts, hash",
        )?;
        let rows = stmt.query_map([community.to_hex()], record_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Member: imports one archive's messages and marks it imported, in one transaction.
    /// Only messages on `topics` are kept; a message already imported (same hash) is not
    /// inserted again. Returns how many were inserted.
    pub fn import_archive(
        &self,
        community: &CommunityId,
        archive_id: &str,
        messages: &[WakuMessage],
        topics: &[Topic],
    ) -> Result<usize> {
        let topics: HashSet<&[u8]> = topics.iter().map(|t| &t[..]).collect();
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut added = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO imported_messages
                 (hash, community_id, sig, timestamp, topic, payload, padding, third_party_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let community_hex = community.to_hex();
            for m in messages.iter().filter(|m| topics.contains(&m.topic[..])) {
                added += insert.execute(params![
                    message_hash(m),
                    community_hex,
                    &m.sig[..],
                    to_sql_u64(m.timestamp)?,
                    &m.topic[..],
                    &m.payload[..],
                    &m.padding[..],
                    m.third_party_id,
                ])?;
            }
        }
        let marked = tx.execute(
            "UPDATE community_message_archive_hashes SET imported = 1
             WHERE community_id = ?1 AND hash = ?2",
            params![community.to_hex(), archive_id],
        )?;
        if marked != 1 {
            return Err(Error::Invalid(format!(
                "archive {archive_id} is not recorded for {community}"
            )));
        }
        tx.commit()?;
        Ok(added)
    }

    /// Member: how many messages were imported for `community`.
    pub fn imported_count(&self, community: &CommunityId) -> Result<u64> {
        let conn = self.lock();
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM imported_messages WHERE community_id = ?1",
            [community.to_hex()],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Member: the imported messages of `community` in (timestamp, hash) order; for checks.
    pub fn imported_hashes(&self, community: &CommunityId) -> Result<Vec<Vec<u8>>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT hash FROM imported_messages WHERE community_id = ?1
             ORDER BY timestamp, hash",
        )?;
        let rows = stmt.query_map([community.to_hex()], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Owner: the hashes of the stored messages on `topics`, in (timestamp, hash) order.
    pub fn message_hashes(&self, topics: &[Topic]) -> Result<Vec<Vec<u8>>> {
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT hash FROM waku_messages WHERE topic IN ({}) ORDER BY timestamp, hash",
            placeholders(topics.len(), 1)
        );
        let conn = self.lock();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(topics.iter().map(|t| &t[..])), |r| {
            r.get(0)
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

fn insert_archive(
    tx: &rusqlite::Transaction<'_>,
    community: &CommunityId,
    a: &ArchiveRecord,
    imported: bool,
    error: Option<&str>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO community_message_archive_hashes
         (community_id, hash, imported, cid, from_ts, to_ts, entry, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (hash) DO NOTHING",
        params![
            community.to_hex(),
            a.id,
            imported,
            a.cid,
            to_sql_u64(a.from)?,
            to_sql_u64(a.to)?,
            a.entry,
            error,
        ],
    )?;
    Ok(())
}

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ArchiveRecord> {
    Ok(ArchiveRecord {
        id: r.get(0)?,
        cid: r.get(1)?,
        from: r.get::<_, i64>(2)? as u64,
        to: r.get::<_, i64>(3)? as u64,
        entry: r.get(4)?,
    })
}

/// The de-duplication key of a message: its `hash` field, or, when a sender left it empty,
/// the Keccak-256 of its encoding.
pub fn message_hash(m: &WakuMessage) -> Vec<u8> {
    if m.hash.is_empty() {
        codex_proto::keccak256(&m.encode_to_vec()).to_vec()
    } else {
        m.hash.to_vec()
    }
}

fn placeholders(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn to_sql_u64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{v} does not fit the database")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::community::CommunityKey;

    fn msg(ts: u64, topic: Topic, size: usize, n: u8) -> WakuMessage {
        WakuMessage {
            sig: vec![n; 4].into(),
            timestamp: ts,
            topic: topic.to_vec().into(),
            payload: vec![n; size].into(),
            hash: vec![n, (ts % 256) as u8, 1].into(),
            ..Default::default()
        }
    }

    #[test]
    fn migrations_apply_once_and_a_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let db = Database::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(db);
        let db = Database::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        db.lock().pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        assert!(matches!(
            Database::open(&path),
            Err(Error::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn chunks_follow_the_size_limit_and_report_oversized_messages() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("a.db")).unwrap();
        let t = codex_proto::topic("general");
        let other = codex_proto::topic("elsewhere");
        let mut all = Vec::new();
        for i in 0..10u8 {
            all.push(msg(100 + u64::from(i), t, 96, i)); // 100 bytes each with the sig
        }
        all.push(msg(105, t, 500, 50)); // alone over the limit
        all.push(msg(106, other, 10, 60)); // another topic
        all.push(msg(300, t, 10, 70)); // outside the window
        assert_eq!(db.store_messages(&all).unwrap(), 13);
        assert_eq!(db.store_messages(&all).unwrap(), 0, "stored twice");
        assert_eq!(db.oldest_timestamp(&[t]).unwrap(), Some(100));
        assert_eq!(db.oldest_timestamp(&[other]).unwrap(), Some(106));
        assert_eq!(db.oldest_timestamp(&[[9; 4]]).unwrap(), None);

        let mut sizes = Vec::new();
        let mut oversized = Vec::new();
        let mut after = None;
        loop {
            let c = db.read_chunk(&[t], 100, 200, after.as_ref(), 350).unwrap();
            assert!(c.bytes <= 350);
            sizes.push(c.messages.len());
            oversized.extend(c.oversized);
            after = c.next;
            if after.is_none() {
                break;
            }
        }
        assert_eq!(sizes, vec![3, 3, 3, 1]);
        assert_eq!(oversized, vec![vec![50, 105, 1]]);
        assert!(db
            .read_chunk(&[t], 200, 300, None, 350)
            .unwrap()
            .messages
            .is_empty());
    }

    #[test]
    fn an_import_is_filtered_deduplicated_and_marks_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("a.db")).unwrap();
        let c = CommunityKey::generate().id();
        let t = codex_proto::topic("general");
        let a = ArchiveRecord {
            id: "0x01".into(),
            cid: "z1".into(),
            from: 0,
            to: 10,
            entry: vec![1],
        };
        let b = ArchiveRecord {
            id: "0x02".into(),
            ..a.clone()
        };
        db.record_downloaded(&c, &a).unwrap();
        db.record_downloaded(&c, &b).unwrap();
        assert_eq!(db.unimported(&c).unwrap().len(), 2);
        let msgs = vec![msg(1, t, 1, 1), msg(2, [0; 4], 1, 2), msg(3, t, 1, 3)];
        assert_eq!(db.import_archive(&c, "0x01", &msgs, &[t]).unwrap(), 2);
        // The same messages in another archive are not imported again.
        assert_eq!(db.import_archive(&c, "0x02", &msgs, &[t]).unwrap(), 0);
        assert_eq!(db.imported_count(&c).unwrap(), 2);
        assert!(db.unimported(&c).unwrap().is_empty());
        assert!(db.import_archive(&c, "0x03", &msgs, &[t]).is_err());
    }

    #[test]
    fn link_state_moves_forward_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("a.db")).unwrap();
        let c = CommunityKey::generate().id();
        assert_eq!(db.archive_info(&c).unwrap(), ArchiveInfo::default());
        db.accept_link(&c, 10, "zA").unwrap();
        db.raise_clock(&c, 5).unwrap();
        let info = db.archive_info(&c).unwrap();
        assert_eq!(info.archive_link_clock, 10);
        assert_eq!(info.pending_archive_link, "zA");
        db.accept_link(&c, 20, "zB").unwrap();
        db.finish_link(&c, "zA").unwrap();
        let info = db.archive_info(&c).unwrap();
        assert_eq!(info.last_archive_link, "zA");
        assert_eq!(
            info.pending_archive_link, "zB",
            "a newer pending link stays"
        );
        db.finish_link(&c, "zB").unwrap();
        assert_eq!(db.archive_info(&c).unwrap().pending_archive_link, "");
        db.record_round(&c, &[], None, 50).unwrap();
        db.record_round(&c, &[], None, 40).unwrap();
        assert_eq!(
            db.archive_info(&c).unwrap().last_message_archive_end_date,
            50
        );
    }
}
