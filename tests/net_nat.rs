//! NAT traversal between real OS processes on 127.0.0.1 (`codex-cli serve`): a node that
//! nobody can dial reserves a slot on a relay, announces the relayed (`/p2p-circuit`)
//! address in its records, and others reach it through the relay, by CID through the DHT
//! and by peer ID alone.
//!
//! How "behind a NAT" is simulated: loopback cannot translate addresses, so the test keeps
//! the one property of a NAT that matters here, honestly: node A has no TCP listener at all
//! (`--listen none`). Like a host behind a NAT without a port mapping, it can open
//! connections but cannot accept any, so every connection that reaches it is one it opened
//! itself: its connection to the relay R, over which R forwards the circuits of others.
//! Its discovery (UDP) socket still works, as a NAT keeps a UDP mapping open for a node
//! that talks to its DHT neighbours. The node decides on its own that it needs a relay
//! (`relay = auto`: no TCP listen address); nothing in the test tells it to.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;

#[path = "common/node.rs"]
mod node;

use std::time::{Duration, Instant};

use codex_node::net::spr::Spr;
use node::{write_random, NodeProc};

/// The addresses in a node's `spr:` record (its discovery address first).
fn spr_addrs(n: &mut NodeProc) -> Vec<String> {
    let spr: Spr = n.info()["spr"].as_str().unwrap().parse().unwrap();
    spr.addrs().iter().map(ToString::to_string).collect()
}

/// Polls `f` every 250 ms for up to `secs` seconds.
fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether there are connections and all go through a relay.
fn all_relayed(addrs: &[String]) -> bool {
    !addrs.is_empty() && addrs.iter().all(|a| a.contains("/p2p-circuit"))
}

#[test]
fn a_node_behind_a_nat_is_reached_through_a_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, data) = write_random(tmp.path(), "data.bin", (2 << 20) + 4321, 21);
    // R: an ordinary node others can dial; it bootstraps the others and relays for them.
    let mut r = NodeProc::start(&[]);
    let boot = r.info()["spr"].as_str().unwrap().to_owned();
    // A: behind the "NAT" (no listener). It reserves a slot on its bootstrap node R.
    let mut a = NodeProc::start(&["--listen", "none", "--bootstrap", &boot]);
    assert!(a.addr.is_empty());
    let circuit = eventually("A's relay reservation in its record", 20, || {
        let addrs = spr_addrs(&mut a);
        addrs.into_iter().find(|s| s.contains("/p2p-circuit"))
    });
    assert!(
        circuit.contains(&r.peer_id) && circuit.ends_with(&a.peer_id),
        "{circuit}"
    );
    let announced: Vec<String> = a.info()["announce"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(announced, vec![circuit.clone()]);
    // R holds A's reservation over the connection A opened.
    assert!(r.is_connected(&a.peer_id));

    let cid = a.ok(&format!("upload {}", file.display()));

    // B: bootstraps to R only, finds A as the provider of the CID through the DHT (whose
    // provider record carries the relayed address) and downloads through R.
    let mut b = NodeProc::start(&["--bootstrap", &boot]);
    assert!(!b.is_connected(&a.peer_id));
    let out = tmp.path().join("out.bin");
    let n = b.ok(&format!("download {cid} {}", out.display()));
    assert_eq!(n, data.len().to_string());
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(b.ok("list"), format!("[\"{cid}\"]"));
    assert_eq!(b.ok(&format!("exists {cid}")), "true");
    // Every connection between them is relayed: the blocks went through R.
    let via = b.peer_addrs(&a.peer_id);
    assert!(all_relayed(&via), "B reached A without the relay? {via:?}");
    // R relayed the data; it never stored it.
    assert_eq!(r.ok(&format!("exists {cid}")), "false");

    // C: finds A by its peer ID alone (A's DHT record, signed again with the relayed
    // address), and connects through R.
    let mut c = NodeProc::start(&["--bootstrap", &boot]);
    eventually("C connecting to A by peer ID", 30, || {
        c.cmd(&format!("connect {}", a.peer_id)).ok()
    });
    let via = c.peer_addrs(&a.peer_id);
    assert!(all_relayed(&via), "C reached A without the relay? {via:?}");
}
