//! The node-wide budget of block bytes read for peers and not yet written to their streams.
//!
//! Without it every peer's send queue could fill with blocks: 8 messages of 20 blocks each,
//! about 10 MiB per peer, and a peer that asks for everything and stops reading keeps its
//! queue full. With it the node holds at most the budget's total bytes of blocks for
//! all peers together (plus at most one block per peer, see below), split evenly among the
//! peers it is serving at the moment, and no peer more than its cap.
//!
//! A peer that holds nothing may always take one block, so every peer makes progress
//! however many others stall: the budget is the bound, give or take one block per peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::Notify;

use crate::store::lock;

/// How often a wait for budget checks whether it should give up.
const RECHECK: Duration = Duration::from_millis(200);

/// Block bytes held for peers: at most `total` in all, `per_peer` for one peer.
#[derive(Debug)]
pub struct ServeBudget {
    total: u64,
    per_peer: u64,
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes held by all peers.
    used: u64,
    /// Bytes held by each peer holding any.
    held: HashMap<PeerId, u64>,
}

impl ServeBudget {
    /// A budget of `total` bytes, of which one peer may hold `per_peer`.
    pub fn new(total: u64, per_peer: u64) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_peer,
            state: Mutex::new(State::default()),
            freed: Notify::new(),
        })
    }

    /// Bytes held by all peers now.
    pub fn used(&self) -> u64 {
        lock(&self.state).used
    }

    /// Whether `peer` may take `bytes` more.
    fn fits(&self, st: &State, peer: &PeerId, bytes: u64) -> bool {
        let Some(&held) = st.held.get(peer) else {
            return true;
        };
        let share = (self.total / st.held.len() as u64).min(self.per_peer);
        held + bytes <= share && st.used + bytes <= self.total
    }

    fn grant(self: &Arc<Self>, st: &mut State, peer: PeerId, bytes: u64) -> Charge {
        st.used += bytes;
        *st.held.entry(peer).or_default() += bytes;
        Charge {
            budget: Arc::clone(self),
            peer,
            bytes,
        }
    }

    /// Takes `bytes` for `peer` if they fit now.
    pub fn try_take(self: &Arc<Self>, peer: PeerId, bytes: u64) -> Option<Charge> {
        let mut st = lock(&self.state);
        self.fits(&st, &peer, bytes)
            .then(|| self.grant(&mut st, peer, bytes))
    }

    /// Waits until `bytes` fit for `peer` and takes them; `None` as soon as `go_on` says to
    /// give up (it is asked every 200 ms). The wait is a task's, not a thread's: a peer that
    /// stops reading holds no thread while its reads wait.
    pub async fn take(
        self: &Arc<Self>,
        peer: PeerId,
        bytes: u64,
        go_on: impl Fn() -> bool,
    ) -> Option<Charge> {
        loop {
            // Registered before the check, so bytes given back in between still wake it.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(c) = self.try_take(peer, bytes) {
                return Some(c);
            }
            if !go_on() {
                return None;
            }
            let _ = tokio::time::timeout(RECHECK, freed).await;
        }
    }

    fn give(&self, peer: &PeerId, bytes: u64) {
        let mut st = lock(&self.state);
        st.used = st.used.saturating_sub(bytes);
        if let Some(held) = st.held.get_mut(peer) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                st.held.remove(peer);
            }
        }
        drop(st);
        self.freed.notify_waiters();
    }
}

/// Bytes of the budget held for one peer; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<ServeBudget>,
    peer: PeerId,
    bytes: u64,
}

impl Charge {
    /// Joins `other` (for the same peer and budget) into this charge.
    pub fn absorb(&mut self, mut other: Charge) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give(&self.peer, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 64 << 10;

    #[test]
    fn a_peer_stays_within_its_cap_and_its_share() {
        let b = ServeBudget::new(8 * BLOCK, 4 * BLOCK);
        let (p, q) = (PeerId::random(), PeerId::random());
        let mut held: Vec<Charge> = (0..4).map(|_| b.try_take(p, BLOCK).unwrap()).collect();
        assert!(b.try_take(p, BLOCK).is_none(), "over the per-peer cap");
        // A second peer holding something halves the share: four blocks each.
        held.push(b.try_take(q, BLOCK).unwrap());
        held.extend((0..3).map(|_| b.try_take(q, BLOCK).unwrap()));
        assert!(b.try_take(q, BLOCK).is_none());
        assert_eq!(b.used(), 8 * BLOCK);
        drop(held);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_peer_holding_nothing_always_gets_a_block() {
        let b = ServeBudget::new(4 * BLOCK, 4 * BLOCK);
        let p = PeerId::random();
        let _full: Vec<Charge> = (0..4).map(|_| b.try_take(p, BLOCK).unwrap()).collect();
        let others: Vec<Charge> = (0..3)
            .map(|_| b.try_take(PeerId::random(), BLOCK).unwrap())
            .collect();
        assert_eq!(b.used(), 7 * BLOCK, "over by one block per other peer");
        drop(others);
        assert_eq!(b.used(), 4 * BLOCK);
    }

    #[test]
    fn absorbed_charges_are_given_back_once() {
        let b = ServeBudget::new(8 * BLOCK, 8 * BLOCK);
        let p = PeerId::random();
        let mut c = b.try_take(p, BLOCK).unwrap();
        c.absorb(b.try_take(p, 2 * BLOCK).unwrap());
        assert_eq!(b.used(), 3 * BLOCK);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_read_wakes_when_budget_frees_or_gives_up() {
        let b = ServeBudget::new(2 * BLOCK, 2 * BLOCK);
        let p = PeerId::random();
        let first = b.try_take(p, 2 * BLOCK).unwrap();
        let waiter = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.take(p, BLOCK, || true).await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "took bytes that do not fit");
        drop(first);
        // Woken by the bytes given back, not by its next check 200 ms on (the clock is
        // paused and jumps to the earliest timer, here this 1 ms).
        let woke = tokio::time::timeout(Duration::from_millis(1), waiter).await;
        assert!(woke.expect("woken at once").unwrap());
        let _hold = b.try_take(p, 2 * BLOCK).unwrap();
        assert!(b.take(p, BLOCK, || false).await.is_none());
    }
}
