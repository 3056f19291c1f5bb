//! The main job: the community history story on one machine, with an owner and two members
//! as three processes talking over 127.0.0.1.
//!
//! 1. The three nodes start ([`node`], each a `community-node` child of this program with
//!    its own data-dir: a Codex store and an SQLite file).
//! 2. The owner creates a community (a new key) and stores its generated history
//!    ([`messages`]) in batches.
//! 3. The owner makes the weekly archives and the index, uploads them to its node and
//!    publishes the signed link; this process relays the link to the members (it plays the
//!    Waku transport).
//! 4. Member 1 (every chat local) connects to the owner, downloads and imports.
//! 5. The owner's process stops.
//! 6. Member 2 (half of the chats local) connects only to member 1 and downloads everything
//!    from it.
//! 7. The databases are checked against each other and a summary is printed.

mod child;
mod messages;
pub(crate) mod node;
mod ui;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use codex_archive::{Community, CommunityId, Database};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use child::NodeChild;
use node::Role;
use ui::{mb, Ui};

use crate::Res;

/// Default size of the demo community's history.
pub(crate) const DEFAULT_MESSAGES: u64 = 300_000;
/// Default number of weeks the history spans.
pub(crate) const DEFAULT_WEEKS: u64 = 12;
/// Default number of chats.
pub(crate) const DEFAULT_CHATS: u64 = 4;

/// Settings of the community demo.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DemoArgs {
    /// Messages in the community's history.
    #[arg(long, default_value_t = DEFAULT_MESSAGES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) messages: u64,
    /// Weeks the history spans, ending now (one archive per week).
    #[arg(long, default_value_t = DEFAULT_WEEKS,
          value_parser = clap::value_parser!(u64).range(1..=520))]
    pub(crate) weeks: u64,
    /// Chats in the community: member 1 has all of them locally, member 2 the first half
    /// (rounded up).
    #[arg(long, default_value_t = DEFAULT_CHATS,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) chats: u64,
    /// Seed of the generated messages.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Seconds any one step may take before the demo gives up.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout: u64,
    /// Keep the nodes' data-dirs and logs instead of deleting them (they are always kept
    /// when something fails).
    #[arg(long)]
    pub(crate) keep: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            messages: DEFAULT_MESSAGES,
            weeks: DEFAULT_WEEKS,
            chats: DEFAULT_CHATS,
            seed: 1,
            timeout: 600,
            keep: false,
        }
    }
}

/// Runs the demo; fails when a step fails or a check does not pass.
pub(crate) async fn demo(args: DemoArgs, quota: Option<u64>) -> Res<()> {
    let tmp = tempfile::Builder::new()
        .prefix("codex-community-demo-")
        .tempdir()?;
    let ui = Ui::new();
    println!(
        "community history demo: an owner and two members, three processes on 127.0.0.1\n\
         {} messages over {} weeks in {} chats; data-dirs and logs in {}",
        args.messages,
        args.weeks,
        args.chats,
        tmp.path().display()
    );
    let run = Run {
        args: args.clone(),
        quota,
        dir: tmp.path(),
        ui: ui.clone(),
        phases: Vec::new(),
    };
    let result = run.go().await;
    ui.finish();
    let failed = match &result {
        Ok(checks) => checks.iter().filter(|c| !c.1).count(),
        Err(_) => 1,
    };
    if args.keep || failed > 0 {
        let kept = tmp.keep();
        println!("data-dirs and logs kept in {}", kept.display());
    }
    let checks = result?;
    if failed > 0 {
        return Err(format!("{failed} of {} checks failed", checks.len()).into());
    }
    Ok(())
}

/// One timed step for the summary: what, how long, and what it did.
struct Phase {
    name: String,
    took: Duration,
    what: String,
}

struct Run<'a> {
    args: DemoArgs,
    quota: Option<u64>,
    dir: &'a Path,
    ui: Ui,
    phases: Vec<Phase>,
}

impl Run<'_> {
    fn phase(&mut self, name: impl Into<String>, took: Duration, what: impl Into<String>) {
        self.phases.push(Phase {
            name: name.into(),
            took,
            what: what.into(),
        });
    }

    /// The whole story; returns the checks (description, passed).
    async fn go(mut self) -> Res<Vec<(String, bool)>> {
        let total = Instant::now();
        let timeout = Duration::from_secs(self.args.timeout.max(1));
        let (links_tx, mut links) = mpsc::channel(16);
        let start = |name, role, sub: &str| {
            NodeChild::start(
                name,
                role,
                self.dir.join(sub),
                self.quota,
                self.ui.clone(),
                links_tx.clone(),
                timeout,
            )
        };

        // 1. Three processes.
        let t = Instant::now();
        let (mut owner, mut m1, mut m2) = tokio::try_join!(
            start("owner", Role::Owner, "owner"),
            start("member 1", Role::Member, "member-1"),
            start("member 2", Role::Member, "member-2"),
        )?;
        self.phase(
            "start three nodes",
            t.elapsed(),
            format!("owner {}", short(&owner.peer_id)),
        );

        // 2. The community and its history.
        let end = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let plan = json!({
            "messages": self.args.messages,
            "weeks": self.args.weeks,
            "chats": self.args.chats,
            "seed": self.args.seed,
            "end": end,
        });
        let t = Instant::now();
        let store = self.ui.bar("owner", "store", self.args.messages);
        store.set_message("messages stored");
        let generated = owner.json(&format!("generate {plan}")).await?;
        store.finish();
        let id: CommunityId = generated["community"]
            .as_str()
            .ok_or("the owner named no community")?
            .parse()?;
        let chats: Vec<String> = serde_json::from_value(generated["chats"].clone())?;
        let stored = generated["stored"].as_u64().unwrap_or(0);
        self.phase(
            "owner: store messages",
            t.elapsed(),
            format!(
                "{stored} messages, {} (payloads and signatures)",
                mb(generated["bytes"].as_u64().unwrap_or(0))
            ),
        );
        self.ui.println(format!("community {id}"));

        // 3. Archives, index and link.
        let t = Instant::now();
        let round = owner.json("archive").await?;
        let link = links
            .try_recv()
            .map_err(|_| "the owner published no link")?;
        let archives = round["archives"].as_u64().unwrap_or(0);
        let index = round["indexCid"].as_str().unwrap_or_default().to_owned();
        self.phase(
            "owner: archive, publish",
            t.elapsed(),
            format!(
                "{archives} archives, {}; index {} (link relayed to the members)",
                mb(round["bytes"].as_u64().unwrap_or(0)),
                short(&index)
            ),
        );

        // 4. Member 1: every chat, from the owner.
        m1.call(&format!("connect {} {}", owner.peer_id, owner.addr))
            .await?;
        let run1 = self
            .member(&mut m1, &id, &chats, &link, "the owner")
            .await?;

        // 5. The owner goes offline.
        let t = Instant::now();
        let owner_peer = owner.peer_id.clone();
        let status = owner.quit().await?;
        self.phase(
            "owner offline",
            t.elapsed(),
            format!("owner process ended ({status})"),
        );

        // 6. Member 2: half of the chats, from member 1 only.
        let half: Vec<String> = chats[..chats.len().div_ceil(2)].to_vec();
        m2.call(&format!("connect {} {}", m1.peer_id, m1.addr))
            .await?;
        let run2 = self.member(&mut m2, &id, &half, &link, "member 1").await?;
        let m2_saw_owner: bool = m2.json(&format!("connected {owner_peer}")).await? == json!(true);

        let t = Instant::now();
        m1.quit().await?;
        m2.quit().await?;
        self.phase("stop members", t.elapsed(), "");
        self.ui.finish();

        // 7. Checks, on the three databases.
        let t = Instant::now();
        let mut checks = Vec::new();
        checks.push((
            format!(
                "the owner stored all {} generated messages",
                self.args.messages
            ),
            stored == self.args.messages,
        ));
        let owner_db = Database::open(self.dir.join("owner/archive.db"))?;
        let owner_ids = archive_ids(&owner_db, &id)?;
        let owner_link = owner_db.archive_info(&id)?.last_archive_link;
        checks.push((
            format!("the owner made {} archives and an index", owner_ids.len()),
            !owner_ids.is_empty() && owner_ids.len() as u64 == archives && owner_link == index,
        ));
        for (name, sub, local, run) in [
            ("member 1", "member-1", &chats, &run1),
            ("member 2", "member-2", &half, &run2),
        ] {
            let db = Database::open(self.dir.join(sub).join("archive.db"))?;
            let topics = Community::new(id.clone(), local.iter()).topics();
            let mut expected = owner_db.message_hashes(&topics)?;
            let mut got = db.imported_hashes(&id)?;
            expected.sort_unstable();
            got.sort_unstable();
            checks.push((
                format!(
                    "{name} imported exactly the owner's {} messages on its {} local chats \
                     and the universal chat ({} imported)",
                    expected.len(),
                    local.len(),
                    got.len()
                ),
                !expected.is_empty() && got == expected,
            ));
            let ids = archive_ids(&db, &id)?;
            let unimported = db.unimported(&id)?.len();
            let info = db.archive_info(&id)?;
            checks.push((
                format!(
                    "{name} holds the owner's {} archive IDs, all imported, and its index",
                    owner_ids.len()
                ),
                ids == owner_ids
                    && unimported == 0
                    && info.last_archive_link == owner_link
                    && info.pending_archive_link.is_empty()
                    && run["unimported"] == json!(0),
            ));
        }
        let view2 = self.ui.view("member 2");
        checks.push((
            format!(
                "member 2 downloaded all {} archives from member 1 with the owner offline \
                 (owner process ended first, never connected to member 2)",
                owner_ids.len()
            ),
            status.success()
                && !m2_saw_owner
                && view2.downloaded == owner_ids.len() as u64
                && view2.finished.is_some(),
        ));
        self.phase("checks", t.elapsed(), "on the three SQLite files");
        self.phase("total", total.elapsed(), "");

        self.summary(&id, &chats, &half, &checks);
        Ok(checks)
    }

    /// A member joins with `local` chats, gets the link, and downloads and imports from
    /// whom it is connected to.
    async fn member(
        &mut self,
        m: &mut NodeChild,
        id: &CommunityId,
        local: &[String],
        link: &str,
        from: &str,
    ) -> Res<Value> {
        let name = m.name;
        m.call(&format!("join {id} {}", local.join(" "))).await?;
        let t = Instant::now();
        m.call(&format!("link {link}")).await?;
        let answer = m.json(&format!("wait {id}")).await?;
        let view = self.ui.view(name);
        let done = view.download_done.unwrap_or_else(Instant::now);
        let finished = view.finished.unwrap_or(done);
        self.phase(
            format!("{name}: download"),
            done.saturating_duration_since(t),
            format!(
                "{} archives, {}, from {from}",
                view.downloaded,
                mb(view.downloaded_bytes)
            ),
        );
        self.phase(
            format!("{name}: import"),
            finished.saturating_duration_since(done),
            format!(
                "{} messages on {} chats and the universal chat",
                answer["imported"].as_u64().unwrap_or(0),
                local.len()
            ),
        );
        Ok(answer)
    }

    fn summary(
        &self,
        id: &CommunityId,
        chats: &[String],
        half: &[String],
        checks: &[(String, bool)],
    ) {
        let name = |c: &String| c.rsplit('-').next().unwrap_or(c).to_owned();
        println!();
        println!("summary");
        println!("  community {id}");
        println!(
            "  chats     member 1: {}; member 2: {}",
            chats.iter().map(name).collect::<Vec<_>>().join(", "),
            half.iter().map(name).collect::<Vec<_>>().join(", ")
        );
        println!();
        for p in &self.phases {
            let line = format!(
                "  {:<24} {:>8.2} s  {}",
                p.name,
                p.took.as_secs_f64(),
                p.what
            );
            println!("{}", line.trim_end());
        }
        println!();
        for (what, ok) in checks {
            println!("  [{}] {what}", if *ok { "ok" } else { "FAILED" });
        }
        let failed = checks.iter().filter(|c| !c.1).count();
        if failed == 0 {
            println!("all {} checks passed", checks.len());
        } else {
            println!("{failed} of {} checks FAILED", checks.len());
        }
    }
}

/// The archive IDs a database records for `id`, in (from, ID) order.
fn archive_ids(db: &Database, id: &CommunityId) -> Res<Vec<String>> {
    Ok(db.archives(id)?.into_iter().map(|a| a.id).collect())
}

/// The start of a long identifier, for display.
fn short(s: &str) -> String {
    match s.get(..12) {
        Some(head) if s.len() > 16 => format!("{head}…"),
        _ => s.to_owned(),
    }
}
