//! `codex-cli`: a command-line program embedding a Codex node.
//!
//! With no command it runs the community history demo ([`community`]): an owner and two
//! members, three processes of this program on 127.0.0.1, archive a generated community
//! history, pass it on, and check every message arrived. `transfer-demo` uploads and
//! downloads a large file on one node. The other commands work on a persistent data-dir
//! (`--data-dir`).

mod community;
mod transfer_demo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use codex::{Cid, CodexConfig, CodexNode};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncWriteExt;

/// An in-process Codex storage node on the command line.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Where the node keeps its data.
    #[arg(long, global = true, default_value = "codex-data")]
    data_dir: PathBuf,
    /// Storage quota in bytes (default: 20 GiB, or 90% of the free disk space if less).
    #[arg(long, global = true)]
    quota: Option<u64>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Upload a file and print its CID.
    Upload {
        /// The file.
        file: PathBuf,
        /// Block size in bytes (changes the CID).
        #[arg(long, default_value_t = codex::DEFAULT_BLOCK_SIZE)]
        block_size: usize,
    },
    /// Download a dataset to a file.
    Download {
        /// The dataset CID.
        cid: String,
        /// Where to write it.
        out: PathBuf,
    },
    /// Show a dataset's manifest.
    Manifest {
        /// The dataset CID.
        cid: String,
    },
    /// List the stored datasets.
    List,
    /// Show the quota figures.
    Space,
    /// Delete a dataset.
    Delete {
        /// The dataset CID.
        cid: String,
    },
    /// Run a node until stdin closes, answering one command per line on stdout (the node
    /// program of the multi-node tests and benches). Prints `ready <json>` first; each
    /// command gets one line, `ok <result>` or `err <message>`. Commands: `info` (peer ID,
    /// record, listen and announced addresses),
    /// `connect <peer> <addr>`, `peer <peer>` (fails unless connected), `upload <file>`,
    /// `download <cid> <file>`, `download-part <cid> <bytes>` (reads at least that much,
    /// then drops the download), `fetch <cid>`, `wait-fetch <cid>`, `exists <cid>`,
    /// `list`, `space`, `delete <cid>`, `quit`.
    Serve {
        /// Address to listen on; `none`: no TCP listener (the node only dials out, as one
        /// behind a NAT: others reach it through a relay).
        #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
        listen: String,
        /// A node to connect to at start (its `spr:` record).
        #[arg(long)]
        bootstrap: Vec<String>,
        /// How many times a missing block is asked for again, 2 s apart.
        #[arg(long, default_value_t = 3000)]
        block_retries: u32,
        /// The discovery (DHT) UDP port; 0 picks a free one.
        #[arg(long, default_value_t = 0)]
        disc_port: u16,
    },
    /// The community history demo (the default): an owner and two member processes on
    /// 127.0.0.1 archive, pass on and check a generated community history.
    Demo(community::DemoArgs),
    /// One node uploads a generated file, downloads it back and checks every byte, in a
    /// temporary data-dir.
    TransferDemo {
        /// Size of the generated file in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
    },
    /// A node of the community demo (owner or member), driven one command per line on
    /// stdin by the demo; see `src/community/node.rs`.
    #[command(hide = true)]
    CommunityNode {
        /// The role it plays.
        #[arg(long, value_enum)]
        role: community::node::Role,
    },
}

impl Default for Command {
    fn default() -> Self {
        Command::Demo(community::DemoArgs::default())
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    limit_malloc_arenas();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(async_main()),
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that meets contention its own malloc arena (up to 8 per core),
/// and memory freed into one arena is not reused by the others. A node moves blocks
/// between its network, store and caller threads, so its resident memory grew to about
/// twice what it used (the demo's member: 245 MB, against 88 MB with one arena). Two
/// arenas keep the speed (the demo ran as fast) and most of the saving. An explicit
/// `MALLOC_ARENA_MAX` wins. A client embedding the node makes this choice for its own
/// process.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    // The node's own log (RUST_LOG, default warnings), on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Res<()> {
    match cli.command.unwrap_or_default() {
        Command::Demo(args) => community::demo(args, cli.quota).await,
        Command::TransferDemo { size_mib } => transfer_demo::run(size_mib, cli.quota).await,
        Command::CommunityNode { role } => {
            community::node::run(role, &cli.data_dir, cli.quota).await
        }
        Command::Serve {
            listen,
            bootstrap,
            block_retries,
            disc_port,
        } => {
            serve(
                &cli.data_dir,
                cli.quota,
                listen,
                bootstrap,
                block_retries,
                disc_port,
            )
            .await
        }
        command => {
            let node = open(&cli.data_dir, cli.quota).await?;
            let r = one(&node, command).await;
            node.destroy().await?;
            r
        }
    }
}

async fn open(dir: &Path, quota: Option<u64>) -> Res<CodexNode> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let quota = match quota {
        Some(q) => q,
        None => default_quota(dir)?,
    };
    let cfg = CodexConfig::builder()
        .data_dir(dir)
        .storage_quota(quota)
        .build()?;
    let node = CodexNode::new(cfg).await?;
    node.start().await?;
    Ok(node)
}

fn parse_cid(s: &str) -> Res<Cid> {
    Ok(s.parse::<Cid>()?)
}

async fn one(node: &CodexNode, command: Command) -> Res<()> {
    match command {
        Command::Upload { file, block_size } => {
            let cid = upload(node, &file, block_size).await?;
            println!("{cid}");
        }
        Command::Download { cid, out } => {
            download(node, &parse_cid(&cid)?, &out).await?;
        }
        Command::Manifest { cid } => {
            let m = node.manifest(&parse_cid(&cid)?).await?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Command::List => {
            for d in node.list().await? {
                let name = d.manifest.filename.as_deref().unwrap_or("-");
                println!("{}  {:>12}  {name}", d.cid, d.manifest.dataset_size);
            }
        }
        Command::Space => {
            println!("{}", serde_json::to_string_pretty(&node.space().await?)?);
        }
        Command::Delete { cid } => {
            node.delete(&parse_cid(&cid)?).await?;
        }
        Command::Demo(_)
        | Command::TransferDemo { .. }
        | Command::CommunityNode { .. }
        | Command::Serve { .. } => unreachable!("handled by run"),
    }
    Ok(())
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_owned());
    pb
}

async fn upload(node: &CodexNode, file: &Path, block_size: usize) -> Res<Cid> {
    let len = std::fs::metadata(file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    let pb = bar(len, "upload");
    let upload = node.upload().block_size(block_size).file(file);
    let mut progress = upload.progress();
    let pb2 = pb.clone();
    let watcher = tokio::spawn(async move {
        while let Some(p) = progress.next().await {
            pb2.set_position(p.bytes);
        }
    });
    let r = upload.await;
    watcher.abort();
    pb.finish_and_clear();
    Ok(r?)
}

async fn download(node: &CodexNode, cid: &Cid, out: &Path) -> Res<u64> {
    let mut dl = node.download(cid).await?;
    let pb = bar(dl.manifest().dataset_size, "download");
    let mut f = tokio::fs::File::create(out)
        .await
        .map_err(|e| format!("{}: {e}", out.display()))?;
    while let Some(chunk) = dl.next().await {
        let chunk = chunk?;
        f.write_all(&chunk).await?;
        pb.inc(chunk.len() as u64);
    }
    f.sync_all().await?;
    pb.finish_and_clear();
    Ok(dl.received())
}

/// 20 GiB, or 90% of what the data-dir's filesystem has free when that is less.
fn default_quota(dir: &Path) -> Res<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a valid C path and a writable statvfs; initialised when the call returns 0.
    let free = if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } == 0 {
        // SAFETY: statvfs returned 0.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
        free
    } else {
        u64::MAX
    };
    Ok((20u64 << 30).min(free / 10 * 9).max(1 << 20))
}

async fn serve(
    dir: &Path,
    quota: Option<u64>,
    listen: String,
    bootstrap: Vec<String>,
    block_retries: u32,
    disc_port: u16,
) -> Res<()> {
    use tokio::io::AsyncBufReadExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let quota = match quota {
        Some(q) => q,
        None => default_quota(dir)?,
    };
    let mut cfg = CodexConfig::builder()
        .data_dir(dir)
        .storage_quota(quota)
        .listen_addrs((listen != "none").then_some(listen))
        .disc_port(disc_port)
        .block_retries(block_retries);
    for b in bootstrap {
        cfg = cfg.bootstrap_node(b);
    }
    let node = CodexNode::new(cfg.build()?).await?;
    node.start().await?;
    let mut events = node.events();
    let mut finished: Vec<codex::Event> = Vec::new();
    println!("ready {}", info(&node).await?);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"quit") {
            break;
        }
        let answer = match words.as_slice() {
            ["wait-fetch", cid] => {
                let cid = cid.to_string();
                let is_end = |e: &codex::Event| {
                    (e.kind == "fetchCompleted" || e.kind == "fetchFailed")
                        && e.json.get("cid").and_then(|c| c.as_str()) == Some(cid.as_str())
                };
                let mut end = finished.iter().find(|e| is_end(e)).cloned();
                while end.is_none() {
                    match events.next().await {
                        Some(e) if is_end(&e) => end = Some(e),
                        Some(e) => finished.push(e),
                        None => break,
                    }
                }
                match end {
                    Some(e) if e.kind == "fetchCompleted" => Ok(cid),
                    Some(e) => Err(e.json.to_string().into()),
                    None => Err("the node stopped".into()),
                }
            }
            words => serve_one(&node, words).await,
        };
        match answer {
            Ok(text) => println!("ok {text}"),
            Err(e) => println!("err {}", e.to_string().replace('\n', " ")),
        }
    }
    node.destroy().await?;
    Ok(())
}

async fn info(node: &CodexNode) -> Res<String> {
    let debug = node.debug().await?;
    Ok(serde_json::json!({
        "peerId": debug.id,
        "spr": debug.spr,
        "addrs": debug.addrs,
        "announce": debug.announce_addresses,
    })
    .to_string())
}

async fn serve_one(node: &CodexNode, words: &[&str]) -> Res<String> {
    Ok(match words {
        ["info"] => info(node).await?,
        ["connect", peer, addrs @ ..] => {
            let addrs: Vec<String> = addrs.iter().map(|a| (*a).to_owned()).collect();
            node.connect(peer, &addrs).await?;
            String::new()
        }
        ["peer", peer] => serde_json::to_string(&node.peer_debug(peer).await?)?,
        ["upload", file] => node.upload().file(file).await?.to_string(),
        ["download", cid, out] => node
            .download(&parse_cid(cid)?)
            .await?
            .to_file(out)
            .await?
            .to_string(),
        ["download-part", cid, bytes] => {
            let want: u64 = bytes.parse()?;
            let mut download = node.download(&parse_cid(cid)?).await?;
            let mut got = 0u64;
            while got < want {
                match download.next().await {
                    Some(chunk) => got += chunk?.len() as u64,
                    None => break,
                }
            }
            // Dropping the download cancels it.
            drop(download);
            got.to_string()
        }
        ["fetch", cid] => serde_json::to_string(&node.fetch(&parse_cid(cid)?).await?)?,
        ["exists", cid] => node.exists(&parse_cid(cid)?).await?.to_string(),
        ["list"] => serde_json::to_string(
            &node
                .list()
                .await?
                .iter()
                .map(|d| d.cid.to_string())
                .collect::<Vec<_>>(),
        )?,
        ["space"] => serde_json::to_string(&node.space().await?)?,
        ["delete", cid] => {
            node.delete(&parse_cid(cid)?).await?;
            String::new()
        }
        _ => return Err(format!("unknown command: {}", words.join(" ")).into()),
    })
}
