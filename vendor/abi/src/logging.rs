//! Log output for C hosts: a `tracing` subscriber installed once per process, unless the host
//! already has one (a Rust host keeps its own and receives the node's events there).

use std::fs::OpenOptions;
use std::sync::Mutex;

use codex_node::config::{validate_log_level, LogFormat, NodeConfig};
use once_cell::sync::OnceCell;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static RELOAD: OnceCell<reload::Handle<EnvFilter, Registry>> = OnceCell::new();
static INIT: Mutex<bool> = Mutex::new(false);

/// The `EnvFilter` directives for a reference log level (`info`, `debug;topic:trace`, …).
fn directives(level: &str) -> String {
    let map = |l: &str| match l.trim().to_ascii_lowercase().as_str() {
        "notice" => "info".to_owned(),
        "fatal" => "error".to_owned(),
        "none" | "off" => "off".to_owned(),
        other => other.to_owned(),
    };
    level
        .split(';')
        .map(|part| match part.split_once(':') {
            Some((topic, l)) => format!("{}={}", topic.trim(), map(l)),
            None => map(part),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Installs the subscriber the configuration asks for, once per process.
pub(crate) fn init(cfg: &NodeConfig) {
    let mut done = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if *done || cfg.log_format == LogFormat::None {
        return;
    }
    *done = true;
    let (filter, handle) = reload::Layer::new(EnvFilter::new(directives(&cfg.log_level)));
    let writer = match &cfg.log_file {
        Some(path) => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(Mutex::new(f)),
            Err(e) => {
                eprintln!(
                    "libcodex: cannot open log-file {}: {e}; logging to stderr",
                    path.display()
                );
                tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr)
            }
        },
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let ansi = match cfg.log_format {
        LogFormat::Colors => true,
        LogFormat::Auto => {
            cfg.log_file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr())
        }
        _ => false,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let installed = if cfg.log_format == LogFormat::Json {
        tracing::subscriber::set_global_default(Registry::default().with(filter).with(fmt.json()))
    } else {
        tracing::subscriber::set_global_default(Registry::default().with(filter).with(fmt))
    };
    if installed.is_ok() {
        let _ = RELOAD.set(handle);
    }
}

/// Changes the level of our subscriber (when we installed one).
pub(crate) fn set_level(level: &str) -> Result<(), String> {
    validate_log_level("log-level", level).map_err(|e| e.to_string())?;
    if let Some(handle) = RELOAD.get() {
        handle
            .reload(EnvFilter::new(directives(level)))
            .map_err(|e| format!("changing the log level: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_levels_become_filter_directives() {
        assert_eq!(directives("info"), "info");
        assert_eq!(directives("NOTICE"), "info");
        assert_eq!(directives("debug;blockexc:trace"), "debug,blockexc=trace");
        assert!(set_level("loud").is_err());
        assert!(set_level("warn").is_ok());
    }
}
