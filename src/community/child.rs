//! The parent's handle on a `community-node` process: it starts the process, sends
//! commands, and reads its stdout in a background task that hands answers back, events and
//! progress to the [`Ui`], and links to whoever relays them.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::node::Role;
use super::ui::Ui;
use crate::Res;

/// A running `community-node` process.
pub(crate) struct NodeChild {
    /// Its name in messages (`owner`, `member 1`).
    pub(crate) name: &'static str,
    /// Its peer ID.
    pub(crate) peer_id: String,
    /// Its first listen address.
    pub(crate) addr: String,
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<Result<String, String>>,
    log: PathBuf,
    timeout: Duration,
}

impl NodeChild {
    /// Starts this program as `community-node --role <role>` on `dir`, its stderr in
    /// `<dir>.log`. Links it publishes go to `links`.
    pub(crate) async fn start(
        name: &'static str,
        role: Role,
        dir: PathBuf,
        quota: Option<u64>,
        ui: Ui,
        links: mpsc::Sender<String>,
        timeout: Duration,
    ) -> Res<Self> {
        let log = dir.with_extension("log");
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("--data-dir").arg(&dir);
        if let Some(q) = quota {
            cmd.args(["--quota", &q.to_string()]);
        }
        let role = match role {
            Role::Owner => "owner",
            Role::Member => "member",
        };
        let mut child = cmd
            .args(["community-node", "--role", role])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, answers) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                let answer = match kind {
                    "ready" | "ok" => Ok(rest.to_owned()),
                    "err" => Err(rest.to_owned()),
                    "event" | "progress" => {
                        if let Ok(v) = serde_json::from_str::<Value>(rest) {
                            ui.note(name, kind, &v);
                        }
                        continue;
                    }
                    "link" => {
                        let _ = links.send(rest.to_owned()).await;
                        continue;
                    }
                    _ => continue,
                };
                if tx.send(answer).await.is_err() {
                    break;
                }
            }
        });
        let mut me = Self {
            name,
            peer_id: String::new(),
            addr: String::new(),
            child,
            stdin,
            answers,
            log,
            timeout,
        };
        let ready: Value = serde_json::from_str(&me.answer("start").await?)?;
        me.peer_id = ready["peerId"].as_str().unwrap_or_default().to_owned();
        me.addr = ready["addrs"][0].as_str().unwrap_or_default().to_owned();
        if me.peer_id.is_empty() || me.addr.is_empty() {
            return Err(format!("{name} reported no peer ID or address: {ready}").into());
        }
        Ok(me)
    }

    /// Sends one command; returns its answer (`ok` text) or an error (`err` text, a
    /// process that died, or the time limit).
    pub(crate) async fn call(&mut self, line: &str) -> Res<String> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let what = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        self.answer(&what).await
    }

    /// [`NodeChild::call`], the answer parsed as JSON.
    pub(crate) async fn json(&mut self, line: &str) -> Res<Value> {
        Ok(serde_json::from_str(&self.call(line).await?)?)
    }

    async fn answer(&mut self, what: &str) -> Res<String> {
        match tokio::time::timeout(self.timeout, self.answers.recv()).await {
            Ok(Some(Ok(text))) => Ok(text),
            Ok(Some(Err(e))) => Err(format!("{} {what}: {e}", self.name).into()),
            Ok(None) => Err(format!(
                "{} exited during {what}; its log is {}{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            )
            .into()),
            Err(_) => Err(format!(
                "{} did not finish {what} within {} s",
                self.name,
                self.timeout.as_secs()
            )
            .into()),
        }
    }

    /// Asks the process to stop and waits for it (killing it after 30 s).
    pub(crate) async fn quit(mut self) -> Res<ExitStatus> {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = self.stdin.flush().await;
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                Err(format!("{} did not stop within 30 s; killed", self.name).into())
            }
        }
    }
}

/// The last lines of a log, to show with an error.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let last = &lines[lines.len().saturating_sub(10)..];
    if last.is_empty() {
        String::new()
    } else {
        format!(", which ends:\n{}", last.join("\n"))
    }
}
