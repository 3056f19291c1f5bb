//! Settings of the archive service.

use std::time::Duration;

/// Settings shared by the owner and member sides. `Default` gives status-go's values where
/// it has them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ArchiveConfig {
    /// Length of the time window of an archive (status-go: 7 days).
    pub partition: Duration,
    /// Owner: time between archiving rounds (status-go: the partition).
    pub interval: Duration,
    /// Owner: largest sum of message sizes (payload + signature) in one archive
    /// (status-go: 30,000,000 bytes).
    pub max_archive_bytes: u64,
    /// Member: largest archive dataset downloaded. An archive's encoding exceeds
    /// `max_archive_bytes` by the per-message protobuf fields and the encryption overhead.
    pub max_archive_download: u64,
    /// Member and owner: largest index dataset downloaded.
    pub max_index_download: u64,
    /// Time allowed for one index or archive download before it is retried later.
    pub download_timeout: Duration,
    /// Member: archives downloaded at once.
    pub concurrency: usize,
    /// First wait before retrying after a transient failure; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
    /// Member: whether archive links are acted on at all.
    pub enabled: bool,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        let week = Duration::from_secs(7 * 24 * 3600);
        Self {
            partition: week,
            interval: week,
            max_archive_bytes: 30_000_000,
            max_archive_download: 256 << 20,
            max_index_download: 64 << 20,
            download_timeout: Duration::from_secs(600),
            concurrency: 3,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            enabled: true,
        }
    }
}

impl ArchiveConfig {
    /// Sets [`partition`](Self::partition) and [`interval`](Self::interval) together.
    #[must_use]
    pub fn with_partition(mut self, every: Duration) -> Self {
        self.partition = every;
        self.interval = every;
        self
    }

    /// Sets [`interval`](Self::interval).
    #[must_use]
    pub fn with_interval(mut self, every: Duration) -> Self {
        self.interval = every;
        self
    }

    /// Sets [`max_archive_bytes`](Self::max_archive_bytes).
    #[must_use]
    pub fn with_max_archive_bytes(mut self, bytes: u64) -> Self {
        self.max_archive_bytes = bytes;
        self
    }

    /// Sets [`download_timeout`](Self::download_timeout).
    #[must_use]
    pub fn with_download_timeout(mut self, t: Duration) -> Self {
        self.download_timeout = t;
        self
    }

    /// Sets [`retry_min`](Self::retry_min) and [`retry_max`](Self::retry_max).
    #[must_use]
    pub fn with_retry(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max.max(min);
        self
    }

    /// Sets [`concurrency`](Self::concurrency) (at least 1).
    #[must_use]
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Sets [`enabled`](Self::enabled).
    #[must_use]
    pub fn with_enabled(mut self, on: bool) -> Self {
        self.enabled = on;
        self
    }

    /// The limits of a download of at most `max_bytes` from the node or its peers.
    pub(crate) fn fetch(&self, max_bytes: u64) -> crate::format::Fetch {
        crate::format::Fetch {
            max_bytes,
            timeout: self.download_timeout,
            local: false,
        }
    }

    /// The wait after `failures` transient failures in a row (at least one).
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(20);
        self.retry_min.saturating_mul(factor).min(self.retry_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c =
            ArchiveConfig::default().with_retry(Duration::from_secs(1), Duration::from_secs(10));
        let waits: Vec<u64> = (1..=6).map(|n| c.backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(c.backoff(1000).as_secs(), 10);
    }
}
