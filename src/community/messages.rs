//! The demo community's chats and messages, generated pseudo-randomly from a seed.
//!
//! The generator is deterministic: the same plan gives the same messages (timestamps are
//! placed relative to the plan's `end`). Message `i` of `n` is placed at
//! `start + i * span / n` plus a jitter smaller than the gap, so message 0 sits exactly at
//! the start and every week of the span holds messages. Chats get messages in a Zipf-like
//! proportion (the first chat about half), one message in 200 is on the community's
//! universal chat, and payload sizes vary the way chat traffic does: mostly short texts,
//! some longer ones, a few kilobyte-sized, and rarely an image of up to 128 KiB.

use codex_archive::codex_proto::{keccak256, Message, WakuMessage};
use codex_archive::{Community, CommunityId, Topic};

/// Seconds in a week.
pub(crate) const WEEK: u64 = 7 * 24 * 3600;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// How many messages.
    pub(crate) messages: u64,
    /// Over how many weeks, ending at `end`.
    pub(crate) weeks: u64,
    /// End of the span (Unix seconds, exclusive).
    pub(crate) end: u64,
    /// Seed of the generator.
    pub(crate) seed: u64,
}

impl Plan {
    /// First second of the span.
    pub(crate) fn start(&self) -> u64 {
        self.end.saturating_sub(self.weeks * WEEK)
    }
}

const NAMES: [&str; 8] = [
    "general", "random", "dev", "design", "support", "events", "trading", "memes",
];

/// The chat IDs of a community with `n` chats. As in status-go, a community chat's ID is
/// the community ID followed by a per-chat part.
pub(crate) fn chat_ids(community: &CommunityId, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match NAMES.get(i) {
            Some(name) => format!("{community}-{name}"),
            None => format!("{community}-chat{}", i + 1),
        })
        .collect()
}

/// A splitmix64 generator: small, fast and good enough for test data.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let w = self.next().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// The messages of a plan, in batches.
#[derive(Debug, Clone)]
pub(crate) struct Generator {
    plan: Plan,
    rng: Rng,
    next: u64,
    /// Chat topics with their cumulative weights (out of `total`).
    chats: Vec<(Topic, u64)>,
    total: u64,
    universal: Topic,
}

impl Generator {
    /// The generator of `plan` for `community`'s chats.
    pub(crate) fn new(plan: Plan, community: &Community) -> Self {
        // Zipf-like weights: chat k gets a share proportional to 1 / (k + 1).
        let mut total = 0;
        let chats = community
            .chat_ids
            .iter()
            .enumerate()
            .map(|(k, c)| {
                total += 2520 / (k as u64 + 1).min(2520);
                (codex_archive::codex_proto::topic(c), total)
            })
            .collect();
        Self {
            plan,
            rng: Rng(plan.seed ^ 0x005E_ED0F_C0DE),
            next: 0,
            chats,
            total,
            universal: community.id.universal_topic(),
        }
    }

    /// Messages generated so far.
    pub(crate) fn generated(&self) -> u64 {
        self.next
    }

    /// Whether every message was generated.
    pub(crate) fn done(&self) -> bool {
        self.next >= self.plan.messages
    }

    /// The next (up to) `n` messages.
    pub(crate) fn batch(&mut self, n: u64) -> Vec<WakuMessage> {
        let end = (self.next + n).min(self.plan.messages);
        let mut out = Vec::with_capacity((end - self.next) as usize);
        while self.next < end {
            out.push(self.message(self.next));
            self.next += 1;
        }
        out
    }

    fn message(&mut self, i: u64) -> WakuMessage {
        let n = u128::from(self.plan.messages.max(1));
        let span = u128::from(self.plan.weeks * WEEK);
        let at = u128::from(i) * span / n;
        let gap = (span / n).max(1) as u64;
        let jitter = if i == 0 { 0 } else { self.rng.next() % gap };
        let timestamp = self.plan.start() + at as u64 + jitter;

        let topic = if self.rng.next() % 200 == 0 {
            self.universal
        } else {
            let pick = self.rng.next() % self.total.max(1);
            self.chats
                .iter()
                .find(|(_, upto)| pick < *upto)
                .map_or(self.universal, |(t, _)| *t)
        };

        let size = match self.rng.next() % 10_000 {
            0..=7_999 => self.rng.range(20, 300),
            8_000..=9_799 => self.rng.range(300, 1_500),
            9_800..=9_994 => self.rng.range(1_500, 8 << 10),
            _ => self.rng.range(32 << 10, 128 << 10),
        } as usize;
        let mut payload = vec![0u8; size];
        self.rng.fill(&mut payload);
        let mut sig = vec![0u8; 65];
        self.rng.fill(&mut sig);

        let mut m = WakuMessage {
            sig: sig.into(),
            timestamp,
            topic: topic.to_vec().into(),
            payload: payload.into(),
            ..Default::default()
        };
        // The message's identity: the Keccak-256 of its encoding without the hash.
        m.hash = keccak256(&m.encode_to_vec()).to_vec().into();
        m
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use codex_archive::CommunityKey;

    fn community(chats: usize) -> Community {
        let id = CommunityKey::generate().id();
        let chats = chat_ids(&id, chats);
        Community::new(id, chats)
    }

    #[test]
    fn a_plan_gives_the_same_messages_and_covers_every_week() {
        let c = community(4);
        let plan = Plan {
            messages: 5_000,
            weeks: 5,
            end: 1_800_000_000,
            seed: 7,
        };
        let mut a = Generator::new(plan, &c);
        let mut b = Generator::new(plan, &c);
        let all: Vec<WakuMessage> = std::iter::from_fn(|| (!a.done()).then(|| a.batch(999)))
            .flatten()
            .collect();
        assert_eq!(all.len(), 5_000);
        assert_eq!(all, b.batch(10_000));
        assert_eq!(all[0].timestamp, plan.start());
        assert!(all.iter().all(|m| m.timestamp < plan.end));
        for w in 0..plan.weeks {
            let from = plan.start() + w * WEEK;
            assert!(all
                .iter()
                .any(|m| (from..from + WEEK).contains(&m.timestamp)));
        }
        let topics = c.topics();
        assert!(all
            .iter()
            .all(|m| topics.contains(&m.topic[..].try_into().unwrap())));
        let hashes: std::collections::HashSet<_> = all.iter().map(|m| m.hash.clone()).collect();
        assert_eq!(hashes.len(), all.len());
    }

    #[test]
    fn more_chats_than_names_get_numbered_ids() {
        let id = CommunityKey::generate().id();
        let ids = chat_ids(&id, 10);
        assert!(ids[0].ends_with("-general"));
        assert!(ids[9].ends_with("-chat10"));
    }
}
