//! A member process killed with SIGKILL in the middle of importing archives, then started
//! again on the same data-dir: after `join` it resumes, and ends with exactly the expected
//! messages, none lost and none imported twice.
//!
//! The owner and the member are `codex-cli community-node` processes (the demo's node
//! program), driven over its line protocol; the checks read their SQLite files.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use codex_archive::{Community, CommunityId, Database};

mod common;

#[path = "common/node.rs"]
mod node;
use serde_json::{json, Value};

/// How long any one answer or event may take.
const STEP: Duration = Duration::from_secs(120);

/// A `community-node` process.
struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    peer_id: String,
    addr: String,
    /// Events and links received so far, in order.
    events: Vec<Value>,
    links: Vec<String>,
}

impl Node {
    fn start(role: &str, dir: &Path) -> Self {
        let mut child = node::cli(dir, &["community-node", "--role", role])
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Self {
            child,
            stdin,
            lines,
            peer_id: String::new(),
            addr: String::new(),
            events: Vec::new(),
            links: Vec::new(),
        };
        let ready = node.next_line();
        let info: Value = serde_json::from_str(ready.strip_prefix("ready ").unwrap()).unwrap();
        node.peer_id = info["peerId"].as_str().unwrap().to_owned();
        node.addr = info["addrs"][0].as_str().unwrap().to_owned();
        node
    }

    fn next_line(&mut self) -> String {
        self.lines
            .recv_timeout(STEP)
            .unwrap_or_else(|e| panic!("no line from the node within {STEP:?}: {e}"))
    }

    /// Reads one line; returns it when it answers a command, records it otherwise.
    fn read(&mut self) -> Option<Result<String, String>> {
        let line = self.next_line();
        let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match kind {
            "ok" => return Some(Ok(rest.to_owned())),
            "err" => return Some(Err(rest.to_owned())),
            "event" => self.events.push(serde_json::from_str(rest).unwrap()),
            "link" => self.links.push(rest.to_owned()),
            _ => {}
        }
        None
    }

    fn call(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        loop {
            match self.read() {
                Some(Ok(text)) => return serde_json::from_str(&text).unwrap(),
                Some(Err(e)) => panic!("{line}: {e}"),
                None => {}
            }
        }
    }

    /// Reads until the `n`-th event of `kind` since the start.
    fn wait_event(&mut self, kind: &str, n: usize) {
        while self.count(kind) < n {
            if let Some(answer) = self.read() {
                panic!("unexpected answer {answer:?} while waiting for {kind}");
            }
        }
    }

    fn count(&self, kind: &str) -> usize {
        self.events.iter().filter(|e| e["type"] == kind).count()
    }

    /// The archive IDs and message counts of the `imported` events so far.
    fn imported(&self) -> Vec<(String, u64)> {
        self.events
            .iter()
            .filter(|e| e["type"] == "imported")
            .map(|e| {
                (
                    e["id"].as_str().unwrap().to_owned(),
                    e["messages"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn sigkill(mut self) {
        // std's kill is SIGKILL on Unix: no destructor, no flush, no clean shutdown.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn quit(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failed test leaves no process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_member_killed_while_importing_resumes_and_imports_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let (owner_dir, member_dir) = (dir.path().join("owner"), dir.path().join("member"));

    // An owner with 8 weekly archives of 10 000 messages each.
    let mut owner = Node::start("owner", &owner_dir);
    let end = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let plan = json!({"messages": 80_000, "weeks": 8, "chats": 3, "seed": 42, "end": end});
    let generated = owner.call(&format!("generate {plan}"));
    let id: CommunityId = generated["community"].as_str().unwrap().parse().unwrap();
    let chats: Vec<String> = serde_json::from_value(generated["chats"].clone()).unwrap();
    let round = owner.call("archive");
    assert_eq!(round["archives"], 8);
    let link = owner.links.pop().unwrap();

    // The member has two of the three chats locally. Kill it once the first archive is
    // imported and the second is being imported.
    let local = &chats[..2];
    let join = format!("join {id} {}", local.join(" "));
    let mut member = Node::start("member", &member_dir);
    member.call(&format!("connect {} {}", owner.peer_id, owner.addr));
    member.call(&join);
    member.call(&format!("link {link}"));
    member.wait_event("importing", 2);
    member.sigkill();

    let topics = Community::new(id.clone(), local.iter()).topics();
    let before = {
        let db = Database::open(member_dir.join("archive.db")).unwrap();
        let archives = db.archives(&id).unwrap();
        let unimported: HashSet<String> = db
            .unimported(&id)
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(
            archives.len(),
            8,
            "every archive is downloaded before imports"
        );
        assert!(
            !unimported.is_empty() && unimported.len() < archives.len(),
            "killed mid-import: {} of {} archives unimported",
            unimported.len(),
            archives.len()
        );
        let partial = db.imported_hashes(&id).unwrap();
        eprintln!(
            "killed with {} of {} archives imported, {} messages",
            archives.len() - unimported.len(),
            archives.len(),
            partial.len()
        );
        (unimported, partial)
    };
    let (unimported, partial) = before;

    // Started again on the same data-dir, with no peer: the archives are local.
    let mut member = Node::start("member", &member_dir);
    member.call(&join);
    let done = member.call(&format!("wait {id}"));
    assert_eq!(done["unimported"], 0, "{done}");
    let resumed = member.imported();
    member.quit();
    owner.quit();

    let owner_db = Database::open(owner_dir.join("archive.db")).unwrap();
    let member_db = Database::open(member_dir.join("archive.db")).unwrap();
    let mut expected = owner_db.message_hashes(&topics).unwrap();
    let mut got = member_db.imported_hashes(&id).unwrap();
    expected.sort_unstable();
    got.sort_unstable();
    let expected_set: HashSet<&Vec<u8>> = expected.iter().collect();
    assert!(
        partial.iter().all(|h| expected_set.contains(h)),
        "a message imported before the kill is not one of the expected"
    );

    // The second run imported exactly the archives the first left, each once...
    let ids: Vec<&String> = resumed.iter().map(|(a, _)| a).collect();
    let once: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(once.len(), ids.len(), "an archive imported twice: {ids:?}");
    assert_eq!(once, unimported.iter().collect::<HashSet<_>>());
    // ...inserting exactly the messages missing after the kill...
    let added: u64 = resumed.iter().map(|(_, n)| n).sum();
    assert_eq!(partial.len() as u64 + added, expected.len() as u64);
    // ...and the member ends with exactly the owner's messages on its local chats.
    assert_eq!(got.len(), expected.len());
    assert!(
        got == expected,
        "the imported messages differ from the owner's"
    );
    let ids = |db: &Database| -> Vec<String> {
        db.archives(&id)
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect()
    };
    assert_eq!(ids(&member_db), ids(&owner_db));
    assert!(member_db.unimported(&id).unwrap().is_empty());
}
