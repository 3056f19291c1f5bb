//! The node configuration: the JSON object `codex_new` takes, parsed strictly.
//!
//! Every key of the reference is accepted, plus `relay` ([`RelayMode`]), this node's own;
//! unknown keys, wrong types and bad values are errors naming the key. Durations are
//! strings of `<number><unit>` terms (`w`, `d`, `h`, `m`, `s`, `ms`, `us`, `ns`), such as
//! `"30d"` or `"1h30m"`; `"0"` means zero (for `block-ttl`: blocks never expire).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The discovery UDP port when `disc-port` is not given (the reference's default).
pub const DEFAULT_DISC_PORT: u16 = 8090;

/// NAT handling (`nat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nat {
    /// Try UPnP, then PMP (`any`).
    Any,
    /// No NAT traversal (`none`).
    None,
    /// UPnP only.
    Upnp,
    /// NAT-PMP only.
    Pmp,
    /// A fixed external IP (`extip:<ip>`).
    ExtIp(std::net::IpAddr),
}

/// Circuit relay use (`relay`, a key of this node; the reference has no relay).
///
/// Every node can dial peers through a relay (`/p2p-circuit` addresses). This key decides
/// whether the node also relays for others or reserves a slot on a relay for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// The default: a node reachable directly relays for others (bounded); a node that is
    /// not (no TCP listen address, or only private ones behind `nat` with no mapped or
    /// `extip` address) reserves a slot on its bootstrap nodes and announces the relayed
    /// address.
    Auto,
    /// Always reserve a slot on the bootstrap nodes and announce the relayed address
    /// (for a node whose address looks public but is firewalled); never relay for others.
    Always,
    /// Neither relay for others nor reserve a slot.
    Never,
}

/// Log output format (`log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Colours on a terminal.
    Auto,
    /// Always colours.
    Colors,
    /// Never colours.
    NoColors,
    /// One JSON object per line.
    Json,
    /// No log output.
    None,
}

/// Repository backend (`repo-kind`). This node always uses its own store; the kind is
/// accepted for compatibility and recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// `fs`.
    Fs,
    /// `sqlite`.
    Sqlite,
    /// `leveldb`.
    LevelDb,
}

/// The parsed configuration, with the reference's defaults.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `data-dir`.
    pub data_dir: PathBuf,
    /// `listen-addrs`.
    pub listen_addrs: Vec<String>,
    /// `nat`.
    pub nat: Nat,
    /// `relay` (this node's own key; not in the reference).
    pub relay: RelayMode,
    /// `disc-port`; `None`: [`DEFAULT_DISC_PORT`], or a free port when that one is taken.
    pub disc_port: Option<u16>,
    /// `net-privkey`, relative to `data_dir` unless absolute.
    pub net_privkey: PathBuf,
    /// `bootstrap-node`.
    pub bootstrap_nodes: Vec<String>,
    /// `max-peers`.
    pub max_peers: u32,
    /// `num-threads` (0 = automatic).
    pub num_threads: usize,
    /// `agent-string`.
    pub agent_string: String,
    /// `repo-kind`.
    pub repo_kind: RepoKind,
    /// `storage-quota` in bytes.
    pub storage_quota: u64,
    /// `block-ttl`; `None` when disabled.
    pub block_ttl: Option<Duration>,
    /// `block-mi`.
    pub block_maintenance_interval: Duration,
    /// `block-mn`.
    pub block_maintenance_blocks: usize,
    /// `block-retries`.
    pub block_retries: u32,
    /// `cache-size` in bytes.
    pub cache_size: u64,
    /// `log-level`.
    pub log_level: String,
    /// `log-format`.
    pub log_format: LogFormat,
    /// `log-file`.
    pub log_file: Option<PathBuf>,
    /// `metrics`.
    pub metrics: bool,
    /// `metrics-address`.
    pub metrics_address: std::net::IpAddr,
    /// `metrics-port`.
    pub metrics_port: u16,
}

impl NodeConfig {
    /// The defaults, with `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen_addrs: vec!["/ip4/0.0.0.0/tcp/0".into()],
            nat: Nat::Any,
            relay: RelayMode::Auto,
            disc_port: None,
            net_privkey: PathBuf::from("key"),
            bootstrap_nodes: Vec::new(),
            max_peers: 160,
            num_threads: 0,
            agent_string: format!("Codex-rs {}", env!("CARGO_PKG_VERSION")),
            repo_kind: RepoKind::Fs,
            storage_quota: 20 * 1024 * 1024 * 1024,
            block_ttl: Some(Duration::from_secs(30 * 24 * 3600)),
            block_maintenance_interval: Duration::from_secs(600),
            block_maintenance_blocks: 1000,
            block_retries: 3000,
            cache_size: 0,
            log_level: "info".into(),
            log_format: LogFormat::Auto,
            log_file: None,
            metrics: false,
            metrics_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            metrics_port: 8008,
        }
    }

    /// Parses the JSON text `codex_new` receives.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            key: "(json)".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(cfg_err("(json)", "the configuration must be a JSON object"));
        };
        Self::from_map(&map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self> {
        let mut cfg = Self::new(default_data_dir());
        for (key, v) in map {
            let k = key.as_str();
            match k {
                "data-dir" => cfg.data_dir = PathBuf::from(non_empty(k, v)?),
                "listen-addrs" => {
                    cfg.listen_addrs = strings(k, v)?;
                    for a in &cfg.listen_addrs {
                        validate_multiaddr(k, a)?;
                    }
                }
                "nat" => cfg.nat = parse_nat(k, string(k, v)?)?,
                "relay" => {
                    cfg.relay = match string(k, v)? {
                        "auto" => RelayMode::Auto,
                        "always" => RelayMode::Always,
                        "never" => RelayMode::Never,
                        other => return Err(one_of(k, other, "auto, always, never")),
                    }
                }
                "disc-port" => cfg.disc_port = Some(int(k, v, 0, u64::from(u16::MAX))? as u16),
                "net-privkey" => cfg.net_privkey = PathBuf::from(non_empty(k, v)?),
                "bootstrap-node" => {
                    cfg.bootstrap_nodes = strings(k, v)?;
                    for s in &cfg.bootstrap_nodes {
                        if !s.starts_with("spr:") || s.len() <= 4 {
                            return Err(cfg_err(k, format!("{s:?} is not an `spr:` record")));
                        }
                    }
                }
                "max-peers" => cfg.max_peers = int(k, v, 1, u64::from(u32::MAX))? as u32,
                "num-threads" => cfg.num_threads = int(k, v, 0, 256)? as usize,
                "agent-string" => cfg.agent_string = string(k, v)?.to_owned(),
                "repo-kind" => {
                    cfg.repo_kind = match string(k, v)? {
                        "fs" => RepoKind::Fs,
                        "sqlite" => RepoKind::Sqlite,
                        "leveldb" => RepoKind::LevelDb,
                        other => return Err(one_of(k, other, "fs, sqlite, leveldb")),
                    }
                }
                "storage-quota" => cfg.storage_quota = int(k, v, 1, u64::MAX)?,
                "block-ttl" => {
                    let d = duration(k, v)?;
                    cfg.block_ttl = (!d.is_zero()).then_some(d);
                }
                "block-mi" => {
                    cfg.block_maintenance_interval = duration(k, v)?;
                    if cfg.block_maintenance_interval.is_zero() {
                        return Err(cfg_err(k, "the maintenance interval must be positive"));
                    }
                }
                "block-mn" => cfg.block_maintenance_blocks = int(k, v, 1, 1 << 32)? as usize,
                "block-retries" => cfg.block_retries = int(k, v, 0, u64::from(u32::MAX))? as u32,
                "cache-size" => cfg.cache_size = int(k, v, 0, u64::MAX)?,
                "log-level" => {
                    let level = string(k, v)?;
                    validate_log_level(k, level)?;
                    cfg.log_level = level.to_owned();
                }
                "log-format" => {
                    cfg.log_format = match string(k, v)? {
                        "auto" => LogFormat::Auto,
                        "colors" => LogFormat::Colors,
                        "nocolors" => LogFormat::NoColors,
                        "json" => LogFormat::Json,
                        "none" => LogFormat::None,
                        other => {
                            return Err(one_of(k, other, "auto, colors, nocolors, json, none"))
                        }
                    }
                }
                "log-file" => cfg.log_file = Some(PathBuf::from(non_empty(k, v)?)),
                "metrics" => {
                    cfg.metrics = v.as_bool().ok_or_else(|| type_err(k, "a boolean", v))?
                }
                "metrics-address" => {
                    cfg.metrics_address = string(k, v)?
                        .parse()
                        .map_err(|_| cfg_err(k, "expected an IP address"))?
                }
                "metrics-port" => cfg.metrics_port = int(k, v, 0, u64::from(u16::MAX))? as u16,
                // Accepted for compatibility; the library runs no REST server.
                "api-bindaddr" | "api-cors-origin" | "config-file" => {
                    string(k, v)?;
                }
                "api-port" => {
                    int(k, v, 0, u64::from(u16::MAX))?;
                }
                _ => return Err(cfg_err(k, "unknown configuration key")),
            }
        }
        Ok(cfg)
    }

    /// The key file's path.
    pub fn key_path(&self) -> PathBuf {
        if self.net_privkey.is_absolute() {
            self.net_privkey.clone()
        } else {
            self.data_dir.join(&self.net_privkey)
        }
    }
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("codex")
}

fn cfg_err(key: &str, message: impl Into<String>) -> Error {
    Error::Config {
        key: key.into(),
        message: message.into(),
    }
}

fn type_err(key: &str, expected: &str, got: &Value) -> Error {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    cfg_err(key, format!("expected {expected}, got {kind}"))
}

fn one_of(key: &str, got: &str, allowed: &str) -> Error {
    cfg_err(key, format!("{got:?} is not one of {allowed}"))
}

fn string<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str().ok_or_else(|| type_err(key, "a string", v))
}

fn non_empty<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    let s = string(key, v)?;
    if s.is_empty() {
        return Err(cfg_err(key, "must not be empty"));
    }
    Ok(s)
}

fn strings(key: &str, v: &Value) -> Result<Vec<String>> {
    let arr = v
        .as_array()
        .ok_or_else(|| type_err(key, "an array of strings", v))?;
    arr.iter()
        .map(|s| string(key, s).map(str::to_owned))
        .collect()
}

fn int(key: &str, v: &Value, min: u64, max: u64) -> Result<u64> {
    let n = v.as_u64().ok_or_else(|| match v {
        Value::Number(_) => cfg_err(key, format!("expected a whole number >= {min}, got {v}")),
        _ => type_err(key, "a whole number", v),
    })?;
    if n < min || n > max {
        return Err(cfg_err(key, format!("{n} is out of range {min}..={max}")));
    }
    Ok(n)
}

fn duration(key: &str, v: &Value) -> Result<Duration> {
    let s = string(key, v)?;
    parse_duration(s).ok_or_else(|| {
        cfg_err(
            key,
            format!("{s:?} is not a duration such as \"30d\" or \"1h30m\""),
        )
    })
}

/// Parses `"30d"`, `"1h30m"`, `"500ms"`, `"0"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "w" => Duration::from_secs(7 * 86400),
            "d" => Duration::from_secs(86400),
            "h" => Duration::from_secs(3600),
            "m" => Duration::from_secs(60),
            "s" => Duration::from_secs(1),
            "ms" => Duration::from_millis(1),
            "us" => Duration::from_micros(1),
            "ns" => Duration::from_nanos(1),
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
    }
    Some(total)
}

fn parse_nat(key: &str, s: &str) -> Result<Nat> {
    Ok(match s {
        "any" => Nat::Any,
        "none" => Nat::None,
        "upnp" => Nat::Upnp,
        "pmp" => Nat::Pmp,
        _ => match s.strip_prefix("extip:") {
            Some(ip) => Nat::ExtIp(
                ip.parse()
                    .map_err(|_| cfg_err(key, format!("{ip:?} is not an IP address")))?,
            ),
            None => return Err(one_of(key, s, "any, none, upnp, pmp, extip:<ip>")),
        },
    })
}

fn validate_multiaddr(key: &str, addr: &str) -> Result<()> {
    let parts: Vec<&str> = addr.split('/').collect();
    let ok = parts.len() >= 5
        && parts[0].is_empty()
        && match parts[1] {
            "ip4" => parts[2].parse::<std::net::Ipv4Addr>().is_ok(),
            "ip6" => parts[2].parse::<std::net::Ipv6Addr>().is_ok(),
            "dns" | "dns4" | "dns6" => !parts[2].is_empty(),
            _ => false,
        }
        && parts[3] == "tcp"
        && parts[4].parse::<u16>().is_ok();
    if ok {
        Ok(())
    } else {
        Err(cfg_err(
            key,
            format!("{addr:?} is not a TCP multiaddr such as /ip4/0.0.0.0/tcp/0"),
        ))
    }
}

/// Checks a log level string: `LEVEL` or `LEVEL;TOPIC:LEVEL;…` as the reference accepts.
pub fn validate_log_level(key: &str, s: &str) -> Result<()> {
    const LEVELS: [&str; 9] = [
        "trace", "debug", "info", "notice", "warn", "error", "fatal", "none", "off",
    ];
    let valid = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    for (i, part) in s.split(';').enumerate() {
        let level = match part.split_once(':') {
            Some((topic, level)) if i > 0 || !topic.is_empty() => level,
            Some(_) => return Err(cfg_err(key, format!("{s:?}: empty topic"))),
            None => part,
        };
        if !valid(level.trim()) {
            return Err(cfg_err(
                key,
                format!(
                    "{s:?}: {level:?} is not one of trace, debug, info, notice, warn, error, fatal"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        NodeConfig::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn accepts_every_reference_key() {
        let cfg = NodeConfig::from_json(
            r#"{"data-dir": "/tmp/x", "listen-addrs": ["/ip4/127.0.0.1/tcp/0"], "nat": "none",
            "disc-port": 8091, "net-privkey": "k", "bootstrap-node": ["spr:abc"],
            "max-peers": 10, "num-threads": 2, "agent-string": "a", "repo-kind": "sqlite",
            "storage-quota": 1000000, "block-ttl": "1h30m", "block-mi": "10s", "block-mn": 5,
            "block-retries": 7, "cache-size": 0, "log-level": "debug;blockexc:trace",
            "log-format": "json", "log-file": "/tmp/log", "metrics": false,
            "metrics-address": "127.0.0.1", "metrics-port": 9000, "api-bindaddr": "127.0.0.1",
            "api-port": 8080, "api-cors-origin": "*", "config-file": "c.toml"}"#,
        )
        .unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.block_ttl, Some(Duration::from_secs(5400)));
        assert_eq!(cfg.block_maintenance_interval, Duration::from_secs(10));
        assert_eq!(cfg.storage_quota, 1_000_000);
        assert_eq!(cfg.key_path(), PathBuf::from("/tmp/x/k"));
        assert_eq!(cfg.nat, Nat::None);
    }

    #[test]
    fn defaults_match_the_reference() {
        let cfg = NodeConfig::from_json("{}").unwrap();
        assert_eq!(cfg.storage_quota, 20 << 30);
        assert_eq!(cfg.block_ttl, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(cfg.disc_port, None);
        assert_eq!(cfg.max_peers, 160);
        assert_eq!(cfg.block_retries, 3000);
        assert_eq!(
            NodeConfig::from_json(r#"{"block-ttl": "0"}"#)
                .unwrap()
                .block_ttl,
            None
        );
    }

    #[test]
    fn bad_input_names_the_key() {
        assert!(err("[]").contains("JSON object"));
        assert!(err("{").contains("not valid JSON"));
        assert!(err(r#"{"bogus": 1}"#).contains("`bogus`: unknown"));
        assert!(err(r#"{"storage-quota": "big"}"#).contains("`storage-quota`: expected a whole"));
        assert!(err(r#"{"storage-quota": -5}"#).contains("`storage-quota`"));
        assert!(err(r#"{"storage-quota": 0}"#).contains("out of range"));
        assert!(err(r#"{"disc-port": 70000}"#).contains("`disc-port`"));
        assert!(err(r#"{"block-ttl": "soon"}"#).contains("`block-ttl`"));
        assert!(err(r#"{"block-ttl": 30}"#).contains("`block-ttl`: expected a string"));
        assert!(err(r#"{"nat": "maybe"}"#).contains("`nat`"));
        assert!(err(r#"{"listen-addrs": ["tcp://x"]}"#).contains("`listen-addrs`"));
        assert!(err(r#"{"listen-addrs": "/ip4/1.2.3.4/tcp/1"}"#).contains("an array"));
        assert!(err(r#"{"log-level": "loud"}"#).contains("`log-level`"));
        assert!(err(r#"{"data-dir": ""}"#).contains("`data-dir`"));
        assert!(err(r#"{"bootstrap-node": ["enr:x"]}"#).contains("`bootstrap-node`"));
        assert!(err(r#"{"metrics": "yes"}"#).contains("`metrics`: expected a boolean"));
    }

    #[test]
    fn relay_key() {
        assert_eq!(NodeConfig::from_json("{}").unwrap().relay, RelayMode::Auto);
        for (v, mode) in [
            ("auto", RelayMode::Auto),
            ("always", RelayMode::Always),
            ("never", RelayMode::Never),
        ] {
            let cfg = NodeConfig::from_json(&format!(r#"{{"relay": "{v}"}}"#)).unwrap();
            assert_eq!(cfg.relay, mode);
        }
        let e = err(r#"{"relay": "sometimes"}"#);
        assert!(
            e.contains("`relay`") && e.contains("auto, always, never"),
            "{e}"
        );
        assert!(err(r#"{"relay": true}"#).contains("`relay`: expected a string"));
        // No TCP listener at all (a node that only dials out) is a valid configuration.
        let cfg = NodeConfig::from_json(r#"{"listen-addrs": []}"#).unwrap();
        assert!(cfg.listen_addrs.is_empty());
        assert_eq!(
            NodeConfig::from_json(r#"{"nat": "extip:203.0.113.7"}"#)
                .unwrap()
                .nat,
            Nat::ExtIp("203.0.113.7".parse().unwrap())
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Some(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2w"), Some(Duration::from_secs(14 * 86400)));
        for bad in ["", "d", "10", "1x", "h1", "99999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
