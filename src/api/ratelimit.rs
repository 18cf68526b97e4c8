//! `[ratelimit]`: a token bucket per merchant (API.md: 429 `rate_limit_error` over the
//! merchant's request rate, when enabled). Integer milli-tokens; one std Mutex per merchant,
//! held for a few arithmetic operations and never across an await.

use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;

use crate::config::RateLimitConfig;
use crate::domain::MerchantId;

/// Merchants tracked at most; past this, new merchants are not limited until the map is
/// cleared (bounded memory beats a perfect limit).
const MAX_TRACKED: usize = 100_000;

pub struct RateLimiter {
    config: RateLimitConfig,
    buckets: DashMap<MerchantId, Mutex<(u64, Instant)>>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            config,
            buckets: DashMap::new(),
        }
    }

    /// Takes one token for `merchant`; false when its bucket is empty.
    pub fn allow(&self, merchant: &MerchantId) -> bool {
        if !self.config.enabled {
            return true;
        }
        let capacity = u64::from(self.config.burst.max(1)) * 1000;
        let per_sec = u64::from(self.config.requests_per_second.max(1));
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(merchant) {
            self.buckets.clear();
        }
        let entry = self
            .buckets
            .entry(merchant.clone())
            .or_insert_with(|| Mutex::new((capacity, Instant::now())));
        let mut bucket = entry.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = (now.duration_since(bucket.1).as_millis() as u64).saturating_mul(per_sec);
        bucket.0 = bucket.0.saturating_add(refill).min(capacity);
        bucket.1 = now;
        if bucket.0 >= 1000 {
            bucket.0 -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(enabled: bool) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            enabled,
            requests_per_second: 1,
            burst: 3,
        })
    }

    #[test]
    fn a_burst_passes_then_the_bucket_is_empty() {
        let l = limiter(true);
        let m = MerchantId::parse("mer_a").unwrap();
        assert!((0..3).all(|_| l.allow(&m)));
        assert!(!l.allow(&m));
        // Another merchant has a bucket of its own.
        assert!(l.allow(&MerchantId::parse("mer_b").unwrap()));
    }

    #[test]
    fn disabled_never_limits() {
        let l = limiter(false);
        let m = MerchantId::parse("mer_a").unwrap();
        assert!((0..100).all(|_| l.allow(&m)));
    }
}
