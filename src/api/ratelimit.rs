//! `[ratelimit]`: a token bucket per merchant (docs/API.md, "Errors": 429 `rate_limit_error`
//! over the merchant's request rate, when enabled). governor's keyed limiter (GCRA, lock-free
//! per key); merchants idle long enough that their bucket is full again are evicted, so
//! memory follows the merchants active now, not every merchant ever seen.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimitConfig;
use crate::domain::MerchantId;

/// Every this many checks, merchants whose buckets are full again are dropped.
const EVICT_EVERY: u64 = 4_096;

pub struct RateLimiter {
    enabled: bool,
    limiter: DefaultKeyedRateLimiter<MerchantId>,
    checks: AtomicU64,
    /// Failed key look-ups per client.
    pub failed_keys: FailedKeys,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        let per_second = NonZeroU32::new(config.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        RateLimiter {
            enabled: config.enabled,
            limiter: governor::RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            checks: AtomicU64::new(0),
            failed_keys: FailedKeys::new(config.failed_keys_per_minute),
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

/// Clients tracked at most, each by its own count; past it (after the earlier minutes' clients
/// are swept out), new clients share one count, [`OVERFLOW`], until the minute turns.
const MAX_CLIENTS: usize = 65_536;

/// Where the clients that find the map full are counted together: a flood from more addresses
/// than the map holds (an IPv6 /48 has 65,536 /64s) meets one limit, not none.
const OVERFLOW: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// `[ratelimit] failed_keys_per_minute`: how many look-ups of keys that do not exist each client
/// address may make in a minute of the clock, after which its look-ups are refused until the
/// minute ends. Keys already known to this process are answered from memory and never refused.
/// Guessing a key is hopeless (128 random bits); this keeps a client that tries from spending
/// the database's look-up turns that merchants' first requests wait in.
pub struct FailedKeys {
    per_minute: u32,
    /// Client → (minute of the clock, failures in it).
    clients: DashMap<IpAddr, (u64, u32)>,
    /// The minute in which a full map was last swept: once a minute at most, since a sweep
    /// visits every client.
    swept: AtomicU64,
}

impl FailedKeys {
    pub fn new(per_minute: u32) -> FailedKeys {
        FailedKeys {
            per_minute,
            clients: DashMap::new(),
            swept: AtomicU64::new(u64::MAX),
        }
    }

    /// The count `ip` is kept under in `minute`: its own, or [`OVERFLOW`] when the map is full.
    fn key(&self, ip: IpAddr, minute: u64) -> IpAddr {
        let client = Self::client(ip);
        if self.clients.len() < MAX_CLIENTS || self.clients.contains_key(&client) {
            return client;
        }
        if self.swept.swap(minute, Ordering::Relaxed) != minute {
            self.clients.retain(|_, (m, _)| *m == minute);
        }
        if self.clients.len() < MAX_CLIENTS {
            client
        } else {
            OVERFLOW
        }
    }

    /// An IPv6 client is known by its /64, the block one host is usually given.
    fn client(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
            v4 => v4,
        }
    }

    /// The seconds left in the minute when `ip` may look up no more keys in it; `None` when it
    /// may. `now` is seconds since the epoch.
    pub fn refused(&self, ip: IpAddr, now: u64) -> Option<u64> {
        if self.per_minute == 0 {
            return None;
        }
        let entry = self.clients.get(&self.key(ip, now / 60))?;
        let (minute, failures) = *entry;
        (minute == now / 60 && failures >= self.per_minute).then(|| 60 - now % 60)
    }

    /// Counts a look-up by `ip` of a key that does not exist; true when this one used up the
    /// client's minute (from now on it is refused).
    pub fn failed(&self, ip: IpAddr, now: u64) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let minute = now / 60;
        let mut entry = self.clients.entry(self.key(ip, minute)).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 == self.per_minute
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.clients.len()
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
            failed_keys_per_minute: 60,
        })
    }

    #[test]
    fn a_client_whose_keys_fail_is_refused_until_the_minute_ends() {
        let f = FailedKeys::new(3);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        let t = 120 * 60 + 10;
        for i in 0..3 {
            assert_eq!(f.refused(ip, t + i), None, "failure {i} is still allowed");
            assert_eq!(f.failed(ip, t + i), i == 2, "the third uses the minute up");
        }
        assert_eq!(f.refused(ip, t + 5), Some(45), "refused for the rest of the minute");
        assert_eq!(f.refused(other, t + 5), None, "another client is not");
        assert_eq!(f.refused(ip, t + 40), Some(10));
        assert_eq!(f.refused(ip, t + 49), Some(1));
        // The next minute starts afresh.
        assert_eq!(f.refused(ip, 121 * 60), None);
        f.failed(ip, 121 * 60);
        assert_eq!(f.refused(ip, 121 * 60 + 1), None);
    }

    #[test]
    fn an_ipv6_client_is_known_by_its_64_and_a_mapped_ipv4_by_its_address() {
        let f = FailedKeys::new(2);
        let t = 60 * 1_000;
        f.failed("2001:db8:1:2::1".parse().unwrap(), t);
        f.failed("2001:db8:1:2:ffff::9".parse().unwrap(), t);
        assert!(f.refused("2001:db8:1:2::77".parse().unwrap(), t).is_some());
        assert!(f.refused("2001:db8:1:3::1".parse().unwrap(), t).is_none());
        f.failed("::ffff:198.51.100.1".parse().unwrap(), t);
        f.failed("198.51.100.1".parse().unwrap(), t);
        assert!(f.refused("198.51.100.1".parse().unwrap(), t).is_some());
    }

    #[test]
    fn zero_turns_it_off_and_the_clients_tracked_are_bounded() {
        let off = FailedKeys::new(0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..100).all(|_| !off.failed(ip, 60)));
        assert_eq!((off.refused(ip, 60), off.tracked()), (None, 0));
        let f = FailedKeys::new(1);
        let addr = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        (0..MAX_CLIENTS as u32).for_each(|i| {
            f.failed(addr(i), 60);
        });
        assert_eq!(f.tracked(), MAX_CLIENTS);
        // Full in the same minute: new clients share one count, so the flood meets a limit;
        // the tracked ones stay refused.
        let (new, newer) = (addr(MAX_CLIENTS as u32), addr(MAX_CLIENTS as u32 + 1));
        assert!(f.refused(new, 61).is_none());
        assert!(f.failed(new, 61), "the shared count is used up");
        assert!(f.refused(newer, 62).is_some(), "another new client is refused with it");
        assert_eq!(f.tracked(), MAX_CLIENTS + 1);
        assert!(f.refused(addr(0), 61).is_some());
        // A minute later the old minute's clients make room, in one sweep.
        assert!(f.refused(new, 120).is_none());
        f.failed(new, 120);
        assert_eq!(f.tracked(), 1);
        assert!(f.refused(new, 120).is_some());
        assert!(f.refused(newer, 120).is_none());
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
