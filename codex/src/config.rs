//! Typed node configuration, validated in Rust and turned into the library's config JSON in
//! exactly one place ([`CodexConfig::to_json`]).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// Log output of the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogFormat {
    /// Colours on a terminal.
    Auto,
    /// Always colours.
    Colors,
    /// No colours.
    NoColors,
    /// JSON lines.
    Json,
    /// No output from the library itself. With the vendored node, its `tracing` events still
    /// reach the host's subscriber.
    None,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Colors => "colors",
            Self::NoColors => "nocolors",
            Self::Json => "json",
            Self::None => "none",
        }
    }
}

/// NAT handling.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Nat {
    /// UPnP, then NAT-PMP.
    Any,
    /// None.
    None,
    /// UPnP.
    Upnp,
    /// NAT-PMP.
    Pmp,
    /// A known external IP.
    ExtIp(std::net::IpAddr),
}

/// Relaying through other nodes, to reach and be reached behind a NAT (`relay`).
///
/// A key of the vendored node only: a Nim-built libcodex refuses configs that carry it, so
/// it is sent only when set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Relay {
    /// A node reachable directly relays for others (bounded); one that is not reserves a
    /// slot on its bootstrap nodes and announces the relayed address. The default.
    Auto,
    /// Always reserve a slot on the bootstrap nodes (for a firewalled public address);
    /// never relay for others.
    Always,
    /// Neither relay for others nor use a relay.
    Never,
}

/// The configuration of a node; build it with [`CodexConfig::builder`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct CodexConfig {
    data_dir: Option<PathBuf>,
    listen_addrs: Option<Vec<String>>,
    nat: Option<Nat>,
    relay: Option<Relay>,
    disc_port: Option<u16>,
    net_privkey: Option<PathBuf>,
    bootstrap_nodes: Vec<String>,
    max_peers: Option<u32>,
    num_threads: Option<usize>,
    agent_string: Option<String>,
    storage_quota: Option<u64>,
    block_ttl: Option<Option<Duration>>,
    block_maintenance_interval: Option<Duration>,
    block_maintenance_blocks: Option<u64>,
    block_retries: Option<u32>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    log_file: Option<PathBuf>,
}

/// Builds a [`CodexConfig`]. Unset options keep the library's defaults, except the log
/// format, which defaults to [`LogFormat::None`] (an embedding program owns its output).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct CodexConfigBuilder {
    cfg: CodexConfig,
}

impl CodexConfig {
    /// A builder with every option unset.
    pub fn builder() -> CodexConfigBuilder {
        CodexConfigBuilder::default()
    }

    /// The configured data directory, if any.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.data_dir.as_deref()
    }

    /// The config JSON the library receives.
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        if let Some(d) = &self.data_dir {
            put("data-dir", json!(d.to_string_lossy()));
        }
        if let Some(a) = &self.listen_addrs {
            put("listen-addrs", json!(a));
        }
        if let Some(n) = &self.nat {
            let s = match n {
                Nat::Any => "any".to_owned(),
                Nat::None => "none".to_owned(),
                Nat::Upnp => "upnp".to_owned(),
                Nat::Pmp => "pmp".to_owned(),
                Nat::ExtIp(ip) => format!("extip:{ip}"),
            };
            put("nat", json!(s));
        }
        if let Some(r) = self.relay {
            let s = match r {
                Relay::Auto => "auto",
                Relay::Always => "always",
                Relay::Never => "never",
            };
            put("relay", json!(s));
        }
        if let Some(p) = self.disc_port {
            put("disc-port", json!(p));
        }
        if let Some(k) = &self.net_privkey {
            put("net-privkey", json!(k.to_string_lossy()));
        }
        if !self.bootstrap_nodes.is_empty() {
            put("bootstrap-node", json!(self.bootstrap_nodes));
        }
        if let Some(n) = self.max_peers {
            put("max-peers", json!(n));
        }
        if let Some(n) = self.num_threads {
            put("num-threads", json!(n));
        }
        if let Some(a) = &self.agent_string {
            put("agent-string", json!(a));
        }
        if let Some(q) = self.storage_quota {
            put("storage-quota", json!(q));
        }
        if let Some(ttl) = self.block_ttl {
            put(
                "block-ttl",
                json!(ttl.map_or_else(|| "0".to_owned(), duration)),
            );
        }
        if let Some(d) = self.block_maintenance_interval {
            put("block-mi", json!(duration(d)));
        }
        if let Some(n) = self.block_maintenance_blocks {
            put("block-mn", json!(n));
        }
        if let Some(n) = self.block_retries {
            put("block-retries", json!(n));
        }
        if let Some(l) = &self.log_level {
            put("log-level", json!(l));
        }
        put(
            "log-format",
            json!(self.log_format.unwrap_or(LogFormat::None).as_str()),
        );
        if let Some(f) = &self.log_file {
            put("log-file", json!(f.to_string_lossy()));
        }
        Value::Object(m).to_string()
    }
}

/// A duration in the library's syntax: whole milliseconds, or seconds when exact.
fn duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn bad(key: &'static str, message: impl Into<String>) -> Error {
    Error::Config {
        key,
        message: message.into(),
    }
}

impl CodexConfigBuilder {
    /// Where the node keeps its data (`data-dir`).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cfg.data_dir = Some(dir.into());
        self
    }

    /// Addresses to listen on, such as `/ip4/127.0.0.1/tcp/0` (`listen-addrs`).
    pub fn listen_addrs<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cfg.listen_addrs = Some(addrs.into_iter().map(Into::into).collect());
        self
    }

    /// NAT handling (`nat`).
    pub fn nat(mut self, nat: Nat) -> Self {
        self.cfg.nat = Some(nat);
        self
    }

    /// Relaying behind NATs (`relay`; the vendored node only, see [`Relay`]).
    pub fn relay(mut self, relay: Relay) -> Self {
        self.cfg.relay = Some(relay);
        self
    }

    /// UDP port of discovery (`disc-port`).
    pub fn disc_port(mut self, port: u16) -> Self {
        self.cfg.disc_port = Some(port);
        self
    }

    /// Key file, relative to the data dir unless absolute (`net-privkey`).
    pub fn net_privkey(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.net_privkey = Some(path.into());
        self
    }

    /// Adds a bootstrap node by its `spr:` record (`bootstrap-node`).
    pub fn bootstrap_node(mut self, spr: impl Into<String>) -> Self {
        self.cfg.bootstrap_nodes.push(spr.into());
        self
    }

    /// Maximum connected peers (`max-peers`).
    pub fn max_peers(mut self, n: u32) -> Self {
        self.cfg.max_peers = Some(n);
        self
    }

    /// Worker threads of the node, 0 = automatic (`num-threads`).
    pub fn num_threads(mut self, n: usize) -> Self {
        self.cfg.num_threads = Some(n);
        self
    }

    /// Agent string announced to peers (`agent-string`).
    pub fn agent_string(mut self, s: impl Into<String>) -> Self {
        self.cfg.agent_string = Some(s.into());
        self
    }

    /// Bytes the node may store (`storage-quota`).
    pub fn storage_quota(mut self, bytes: u64) -> Self {
        self.cfg.storage_quota = Some(bytes);
        self
    }

    /// Lifetime of stored blocks; `None` keeps them forever (`block-ttl`).
    pub fn block_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.cfg.block_ttl = Some(ttl);
        self
    }

    /// How often expired blocks are deleted (`block-mi`).
    pub fn block_maintenance_interval(mut self, every: Duration) -> Self {
        self.cfg.block_maintenance_interval = Some(every);
        self
    }

    /// How many expired blocks one maintenance pass deletes at most (`block-mn`).
    pub fn block_maintenance_blocks(mut self, n: u64) -> Self {
        self.cfg.block_maintenance_blocks = Some(n);
        self
    }

    /// How many times a block is requested before a download fails (`block-retries`).
    pub fn block_retries(mut self, n: u32) -> Self {
        self.cfg.block_retries = Some(n);
        self
    }

    /// Log level: `trace`, `debug`, `info`, `notice`, `warn`, `error`, `fatal`, optionally
    /// with per-topic levels `info;blockexc:trace` (`log-level`).
    pub fn log_level(mut self, level: impl Into<String>) -> Self {
        self.cfg.log_level = Some(level.into());
        self
    }

    /// Log output format (`log-format`).
    pub fn log_format(mut self, format: LogFormat) -> Self {
        self.cfg.log_format = Some(format);
        self
    }

    /// Log to this file (`log-file`).
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.log_file = Some(path.into());
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<CodexConfig> {
        let c = &self.cfg;
        if c.data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(bad("data-dir", "must not be empty"));
        }
        for a in c.listen_addrs.iter().flatten() {
            if !a.starts_with('/') || !a.contains("/tcp/") {
                return Err(bad("listen-addrs", format!("{a:?} is not a TCP multiaddr")));
            }
        }
        for s in &c.bootstrap_nodes {
            if !s.starts_with("spr:") {
                return Err(bad(
                    "bootstrap-node",
                    format!("{s:?} is not an `spr:` record"),
                ));
            }
        }
        if c.storage_quota == Some(0) {
            return Err(bad("storage-quota", "must be positive"));
        }
        if c.max_peers == Some(0) {
            return Err(bad("max-peers", "must be positive"));
        }
        if c.block_maintenance_interval
            .is_some_and(|d| d.as_millis() == 0)
        {
            return Err(bad("block-mi", "must be at least one millisecond"));
        }
        if c.block_maintenance_blocks == Some(0) {
            return Err(bad("block-mn", "must be positive"));
        }
        if let Some(Some(ttl)) = c.block_ttl {
            if ttl.as_millis() == 0 {
                return Err(bad("block-ttl", "use None to keep blocks forever"));
            }
        }
        if let Some(level) = &c.log_level {
            const LEVELS: [&str; 9] = [
                "trace", "debug", "info", "notice", "warn", "error", "fatal", "none", "off",
            ];
            let ok = level.split(';').all(|part| {
                let l = part.rsplit(':').next().unwrap_or(part);
                LEVELS.contains(&l.trim().to_ascii_lowercase().as_str())
            });
            if !ok {
                return Err(bad("log-level", format!("{level:?} is not a log level")));
            }
        }
        Ok(self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_library_keys() {
        let cfg = CodexConfig::builder()
            .data_dir("/tmp/d")
            .listen_addrs(["/ip4/127.0.0.1/tcp/0"])
            .storage_quota(1 << 20)
            .block_ttl(None)
            .block_maintenance_interval(Duration::from_millis(1500))
            .nat(Nat::ExtIp("1.2.3.4".parse().unwrap()))
            .build()
            .unwrap();
        let v: Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert_eq!(v["data-dir"], "/tmp/d");
        assert_eq!(v["storage-quota"], 1 << 20);
        assert_eq!(v["block-ttl"], "0");
        assert_eq!(v["block-mi"], "1500ms");
        assert_eq!(v["nat"], "extip:1.2.3.4");
        assert!(v.get("relay").is_none(), "sent only when set");
        let v: serde_json::Value = serde_json::from_str(
            &CodexConfig::builder()
                .relay(Relay::Never)
                .build()
                .unwrap()
                .to_json(),
        )
        .unwrap();
        assert_eq!(v["relay"], "never");
        assert_eq!(v["log-format"], "none");
        assert!(v.get("max-peers").is_none());
    }

    #[test]
    fn bad_values_are_refused_before_the_library() {
        let e = CodexConfig::builder().storage_quota(0).build().unwrap_err();
        assert!(e.to_string().contains("storage-quota"));
        let e = CodexConfig::builder()
            .listen_addrs(["127.0.0.1:5"])
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("listen-addrs"));
        let e = CodexConfig::builder()
            .log_level("loud")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("log-level"));
        let e = CodexConfig::builder()
            .bootstrap_node("enr:x")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("bootstrap-node"));
    }
}
