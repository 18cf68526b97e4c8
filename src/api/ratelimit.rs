//! `[ratelimit]`: a token bucket per merchant (docs/API.md, "Errors": 429 `rate_limit_error`
//! over the merchant's request rate, when enabled). governor's keyed limiter (GCRA, lock-free
//! per key); merchants idle long enough that their bucket is full again are evicted, so
//! memory follows the merchants active now, not every merchant ever seen.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimitConfig;
use crate::domain::MerchantId;

/// Every this many checks, merchants whose buckets are full again are dropped.
const EVICT_EVERY: u64 = 4_096;

pub struct RateLimiter {
    enabled: bool,
    limiter: DefaultKeyedRateLimiter<MerchantId>,
    checks: AtomicU64,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        let per_second = NonZeroU32::new(config.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        RateLimiter {
            enabled: config.enabled,
            limiter: governor::RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one request from `merchant`'s allowance; false when it has none left.
    pub fn allow(&self, merchant: &MerchantId) -> bool {
        if !self.enabled {
            return true;
        }
        if self.checks.fetch_add(1, Ordering::Relaxed) % EVICT_EVERY == EVICT_EVERY - 1 {
            self.evict_idle();
        }
        self.limiter.check_key(merchant).is_ok()
    }

    /// Drops the merchants whose buckets are full again: they are indistinguishable from new.
    pub fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Merchants tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(enabled: bool, per_second: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            enabled,
            requests_per_second: per_second,
            burst,
        })
    }

    #[test]
    fn a_burst_passes_then_the_bucket_is_empty() {
        let l = limiter(true, 1, 3);
        let m = MerchantId::parse("mer_a").unwrap();
        assert!((0..3).all(|_| l.allow(&m)));
        assert!(!l.allow(&m));
        // Another merchant has a bucket of its own.
        assert!(l.allow(&MerchantId::parse("mer_b").unwrap()));
    }

    #[test]
    fn disabled_never_limits() {
        let l = limiter(false, 1, 3);
        let m = MerchantId::parse("mer_a").unwrap();
        assert!((0..100).all(|_| l.allow(&m)));
    }

    #[test]
    fn idle_merchants_are_evicted_and_a_limited_one_is_kept() {
        let l = limiter(true, 1_000, 1);
        for i in 0..5_000 {
            l.allow(&MerchantId::parse(&format!("mer_{i}")).unwrap());
        }
        assert!(l.tracked() > 0);
        // A slow merchant: its bucket refills in a second, so it is still being limited.
        let slow = limiter(true, 1, 1);
        let m = MerchantId::parse("mer_slow").unwrap();
        assert!(slow.allow(&m) && !slow.allow(&m));
        slow.evict_idle();
        assert_eq!(slow.tracked(), 1, "a merchant still limited is kept");
        assert!(!slow.allow(&m), "and still limited");
        // The fast ones refill within a millisecond: wait for it, with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while l.tracked() > 0 {
            assert!(std::time::Instant::now() < deadline, "{} still tracked", l.tracked());
            std::thread::yield_now();
            l.evict_idle();
        }
    }
}
