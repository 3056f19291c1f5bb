//! `community-node`: one role of the demo (owner or member) in its own process, with its
//! own Codex node and SQLite file, driven one command per line on stdin.
//!
//! Output lines on stdout:
//! - `ready <json>` once started: `peerId`, `addrs`;
//! - `ok <json>` or `err <message>`, one per command, in order;
//! - `event <json>`: an archive service [`Event`] (see [`event_json`]), at any time;
//! - `progress <json>`: `{"stored": n}` while the owner stores messages, `{"uploaded": bytes}`
//!   for each dataset the owner's node stores;
//! - `link <signed link>`: an archive link the owner publishes ([`SignedLink`]'s text form).
//!
//! Events emitted before a command's work ended are written before its answer.
//!
//! Commands of both roles: `info`, `connect <peer> <addr>…`, `connected <peer>`, `quit`
//! (also on end of input). Owner: `generate <json plan>`, `archive`. Member:
//! `join <community> <chat>…`, `link <signed link>`, `wait <community>`.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use codex::{CodexConfig, CodexNode};
use codex_archive::{
    ArchiveConfig, Community, CommunityId, CommunityKey, Database, Event, LinkPublisher, Member,
    Owner, SignedLink,
};
use futures::{FutureExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use super::messages::{chat_ids, Generator, Plan};
use crate::Res;

/// The role a `community-node` process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Role {
    /// The community's control node: stores messages, makes archives, publishes links.
    Owner,
    /// A member: follows links, downloads and imports archives, serves them on.
    Member,
}

/// Messages stored per transaction while generating.
const BATCH: u64 = 10_000;

/// Runs a node of `role` on `dir` until stdin closes or `quit` arrives.
pub(crate) async fn run(role: Role, dir: &Path, quota: Option<u64>) -> Res<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let quota = match quota {
        Some(q) => q,
        None => crate::default_quota(dir)?,
    };
    let cfg = CodexConfig::builder()
        .data_dir(dir.join("codex"))
        .storage_quota(quota)
        .listen_addrs(["/ip4/127.0.0.1/tcp/0"])
        // Archives must outlive any TTL: owners and members serve them for good.
        .block_ttl(None)
        .build()?;
    let node = CodexNode::new(cfg).await?;
    node.start().await?;
    let db = Database::open(dir.join("archive.db"))?;
    let r = match role {
        Role::Owner => {
            let owner = Owner::new(
                db,
                node.clone(),
                Arc::new(StdoutLinks),
                ArchiveConfig::default(),
            );
            let notes = futures::stream::select(
                owner.events().map(|e| format!("event {}", event_json(&e))),
                uploads(&node),
            );
            let side = OwnerSide {
                owner,
                node: node.clone(),
                community: None,
            };
            serve(&node, notes, side).await
        }
        Role::Member => {
            let member = Member::new(db, node.clone(), ArchiveConfig::default());
            let notes = member.events().map(|e| format!("event {}", event_json(&e)));
            let side = MemberSide {
                member,
                node: node.clone(),
            };
            serve(&node, notes, side).await
        }
    };
    node.destroy().await?;
    r
}

/// `progress {"uploaded": bytes}` for every dataset the node stores.
fn uploads(node: &CodexNode) -> impl Stream<Item = String> + Unpin {
    node.events().filter_map(|e| {
        futures::future::ready((e.kind == "datasetStored").then(|| {
            let size = e.json.get("datasetSize").and_then(Value::as_u64);
            format!("progress {}", json!({ "uploaded": size.unwrap_or(0) }))
        }))
    })
}

/// A role's commands.
trait Side {
    /// Answers one command (split into words; never `quit`).
    async fn handle(&mut self, words: &[&str]) -> Res<Value>;
}

/// The line loop: commands from stdin answered in order, notes written as they come.
async fn serve(
    node: &CodexNode,
    mut notes: impl Stream<Item = String> + Unpin,
    mut side: impl Side,
) -> Res<()> {
    println!("ready {}", crate::info(node).await?);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::select! {
            Some(note) = notes.next() => {
                println!("{note}");
                continue;
            }
            line = lines.next_line() => line?,
        };
        let Some(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        if words == ["quit"] {
            break;
        }
        let answer = {
            let work = side.handle(&words);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    biased;
                    r = &mut work => break r,
                    Some(note) = notes.next() => println!("{note}"),
                }
            }
        };
        // What the work emitted is already queued: write it before the answer.
        while let Some(Some(note)) = notes.next().now_or_never() {
            println!("{note}");
        }
        match answer {
            Ok(v) => println!("ok {v}"),
            Err(e) => println!("err {}", e.to_string().replace('\n', " ")),
        }
    }
    Ok(())
}

/// Commands both roles answer.
async fn common(node: &CodexNode, words: &[&str]) -> Res<Value> {
    Ok(match words {
        ["info"] => serde_json::from_str(&crate::info(node).await?)?,
        ["connect", peer, addrs @ ..] => {
            let addrs: Vec<String> = addrs.iter().map(|a| (*a).to_owned()).collect();
            node.connect(peer, &addrs).await?;
            Value::Null
        }
        ["connected", peer] => json!(node.peer_debug(peer).await.is_ok()),
        _ => return Err(format!("unknown command: {}", words.join(" ")).into()),
    })
}

/// Publishes links by writing them to stdout, for the parent to relay (it plays Waku).
struct StdoutLinks;

impl LinkPublisher for StdoutLinks {
    fn publish(
        &self,
        link: SignedLink,
    ) -> Pin<Box<dyn Future<Output = codex_archive::Result<()>> + Send + '_>> {
        println!("link {link}");
        Box::pin(async { Ok(()) })
    }
}

struct OwnerSide {
    owner: Owner,
    node: CodexNode,
    community: Option<(Community, CommunityKey)>,
}

impl Side for OwnerSide {
    async fn handle(&mut self, words: &[&str]) -> Res<Value> {
        match words {
            ["generate", plan] => self.generate(plan).await,
            ["archive"] => self.archive().await,
            words => common(&self.node, words).await,
        }
    }
}

impl OwnerSide {
    /// A new community (a new key) with the plan's chats and messages, stored in batches.
    async fn generate(&mut self, plan: &str) -> Res<Value> {
        let p: Value = serde_json::from_str(plan)?;
        let field = |k: &str| {
            p.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("the plan lacks {k:?}"))
        };
        let plan = Plan {
            messages: field("messages")?,
            weeks: field("weeks")?,
            end: field("end")?,
            seed: field("seed")?,
        };
        let chats = usize::try_from(field("chats")?)?;
        let key = CommunityKey::generate();
        let community = Community::new(key.id(), chat_ids(&key.id(), chats));
        let mut generator = Generator::new(plan, &community);
        let (mut stored, mut bytes) = (0u64, 0u64);
        while !generator.done() {
            let (batch, g) = tokio::task::spawn_blocking(move || {
                let batch = generator.batch(BATCH);
                (batch, generator)
            })
            .await?;
            generator = g;
            bytes += batch
                .iter()
                .map(|m| (m.payload.len() + m.sig.len()) as u64)
                .sum::<u64>();
            stored += self.owner.store_messages(batch).await? as u64;
            println!("progress {}", json!({ "stored": stored }));
        }
        let answer = json!({
            "community": community.id.to_hex(),
            "chats": community.chat_ids,
            "generated": generator.generated(),
            "stored": stored,
            "bytes": bytes,
        });
        self.community = Some((community, key));
        Ok(answer)
    }

    /// One archiving round up to now, and the link of the index it leaves.
    async fn archive(&mut self) -> Res<Value> {
        let (community, key) = self
            .community
            .as_ref()
            .ok_or("no community yet: generate one first")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let report = self
            .owner
            .archive_and_publish(community, key, now)
            .await?
            .ok_or("nothing to archive")?;
        Ok(json!({
            "from": report.from,
            "to": report.to,
            "archives": report.created.len(),
            "messages": report.created.iter().map(|c| c.messages as u64).sum::<u64>(),
            "bytes": report.created.iter().map(|c| c.bytes).sum::<u64>(),
            "indexCid": report.index_cid,
            "indexEntries": report.index_entries,
            "oversized": report.oversized.len(),
        }))
    }
}

struct MemberSide {
    member: Member,
    node: CodexNode,
}

impl Side for MemberSide {
    async fn handle(&mut self, words: &[&str]) -> Res<Value> {
        match words {
            ["join", community, chats @ ..] => {
                let id: CommunityId = community.parse()?;
                self.member
                    .join(Community::new(id, chats.iter().copied()))
                    .await?;
                Ok(Value::Null)
            }
            ["link", link] => {
                let link: SignedLink = link.parse()?;
                Ok(json!(self.member.handle_link(&link).await?))
            }
            ["wait", community] => {
                let id: CommunityId = community.parse()?;
                self.member.idle(&id).await;
                let db = self.member.database().clone();
                let (imported, archives, unimported) = tokio::task::spawn_blocking(move || {
                    Ok::<_, codex_archive::Error>((
                        db.imported_count(&id)?,
                        db.archives(&id)?.len(),
                        db.unimported(&id)?.len(),
                    ))
                })
                .await??;
                Ok(json!({
                    "imported": imported,
                    "archives": archives,
                    "unimported": unimported,
                }))
            }
            words => common(&self.node, words).await,
        }
    }
}

/// An event as one JSON object with a `type` field (camelCase, like the node's events).
pub(crate) fn event_json(e: &Event) -> Value {
    match e {
        Event::Creating {
            community,
            from,
            to,
        } => json!({"type": "creating", "community": community.to_hex(), "from": from, "to": to}),
        Event::Created {
            community,
            id,
            from,
            to,
            messages,
            bytes,
        } => json!({
            "type": "created", "community": community.to_hex(), "id": id, "from": from,
            "to": to, "messages": messages, "bytes": bytes,
        }),
        Event::NoneCreated { community } => {
            json!({"type": "noneCreated", "community": community.to_hex()})
        }
        Event::Oversized { community, hash } => json!({
            "type": "oversized", "community": community.to_hex(),
            "hash": hash.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        }),
        Event::Seeding {
            community,
            index_cid,
        } => json!({"type": "seeding", "community": community.to_hex(), "indexCid": index_cid}),
        Event::Unseeded { community } => {
            json!({"type": "unseeded", "community": community.to_hex()})
        }
        Event::DownloadingStarted {
            community,
            index_cid,
        } => json!({
            "type": "downloadingStarted", "community": community.to_hex(), "indexCid": index_cid,
        }),
        Event::IndexDownloaded {
            community,
            archives,
            missing,
        } => json!({
            "type": "indexDownloaded", "community": community.to_hex(), "archives": archives,
            "missing": missing,
        }),
        Event::ArchiveDownloaded {
            community,
            id,
            from,
            to,
            bytes,
        } => json!({
            "type": "archiveDownloaded", "community": community.to_hex(), "id": id,
            "from": from, "to": to, "bytes": bytes,
        }),
        Event::Importing { community, id } => {
            json!({"type": "importing", "community": community.to_hex(), "id": id})
        }
        Event::Imported {
            community,
            id,
            messages,
        } => json!({
            "type": "imported", "community": community.to_hex(), "id": id, "messages": messages,
        }),
        Event::DownloadingFinished {
            community,
            index_cid,
        } => json!({
            "type": "downloadingFinished", "community": community.to_hex(),
            "indexCid": index_cid,
        }),
        Event::Failed {
            community,
            error,
            retry_in_secs,
        } => json!({
            "type": "failed", "community": community.to_hex(), "error": error,
            "retryInSecs": retry_in_secs,
        }),
        other => json!({"type": "other", "debug": format!("{other:?}")}),
    }
}
