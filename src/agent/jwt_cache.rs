//! The agent's cache of identity JWT-SVIDs (issue 11), as SPIRE keeps one: a token for an
//! entry and an audience is reused until half its life has passed, so a workload that asks
//! for a token per request costs the server one signature per half-lifetime, not one per
//! request. The cache is bounded; past its size the least recently used token is forgotten
//! (and simply asked for again when needed).
//!
//! Task tokens are never cached: each is a fresh authorization, audited on its own.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// How many tokens the cache holds at most.
pub const CAPACITY: usize = 4096;

/// An identity JWT-SVID as the server returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedJwt {
    /// The SPIFFE ID in `sub`.
    pub spiffe_id: String,
    /// The compact JWS.
    pub token: String,
    /// When the agent received it.
    pub issued_at: SystemTime,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

impl CachedJwt {
    /// Whether it may still be handed out at `now`: before half its life.
    fn is_fresh(&self, now: SystemTime) -> bool {
        let life = self
            .expires_at
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO);
        now < self.issued_at + life / 2
    }
}

struct Slot {
    jwt: CachedJwt,
    used: u64,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<(String, String), Slot>,
    clock: u64,
}

/// Identity tokens by (entry ID, audience).
pub struct JwtCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl Default for JwtCache {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl JwtCache {
    /// A cache holding at most `capacity` tokens.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    /// The cached token for `entry_id` and `audience`, if it is still fresh at `now`.
    pub fn get(&self, entry_id: &str, audience: &str, now: SystemTime) -> Option<CachedJwt> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.clock += 1;
        let clock = inner.clock;
        let key = (entry_id.to_owned(), audience.to_owned());
        match inner.slots.get_mut(&key) {
            Some(slot) if slot.jwt.is_fresh(now) => {
                slot.used = clock;
                Some(slot.jwt.clone())
            }
            Some(_) => {
                inner.slots.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Keeps `jwt` for `entry_id` and `audience`, forgetting the least recently used token when
    /// full.
    pub fn put(&self, entry_id: &str, audience: &str, jwt: CachedJwt) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.clock += 1;
        let used = inner.clock;
        let key = (entry_id.to_owned(), audience.to_owned());
        if !inner.slots.contains_key(&key) && inner.slots.len() >= self.capacity {
            // A linear scan: it runs only when the cache is full, and a full cache of a few
            // thousand tokens scans in microseconds, against a round trip to the server.
            if let Some(oldest) = inner
                .slots
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
            {
                inner.slots.remove(&oldest);
            }
        }
        inner.slots.insert(key, Slot { jwt, used });
    }

    /// How many tokens are held.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(token: &str, issued_at: SystemTime, life: u64) -> CachedJwt {
        CachedJwt {
            spiffe_id: "spiffe://t.test/a".into(),
            token: token.into(),
            issued_at,
            expires_at: issued_at + Duration::from_secs(life),
        }
    }

    #[test]
    fn a_token_is_reused_until_half_its_life_then_asked_for_again() {
        let cache = JwtCache::default();
        let t0 = SystemTime::now();
        cache.put("e", "api", jwt("one", t0, 300));
        assert_eq!(
            cache
                .get("e", "api", t0 + Duration::from_secs(149))
                .unwrap()
                .token,
            "one"
        );
        assert!(
            cache.get("e", "other", t0).is_none(),
            "another audience is another token"
        );
        assert!(
            cache
                .get("e", "api", t0 + Duration::from_secs(150))
                .is_none()
        );
        assert!(cache.is_empty(), "a stale token is dropped when found");
    }

    #[test]
    fn the_least_recently_used_token_goes_when_full() {
        let cache = JwtCache::with_capacity(2);
        let t0 = SystemTime::now();
        cache.put("a", "x", jwt("a", t0, 300));
        cache.put("b", "x", jwt("b", t0, 300));
        assert!(
            cache.get("a", "x", t0).is_some(),
            "a is now the more recent"
        );
        cache.put("c", "x", jwt("c", t0, 300));
        assert_eq!(cache.len(), 2);
        assert!(
            cache.get("b", "x", t0).is_none(),
            "b was the least recently used"
        );
        assert!(cache.get("a", "x", t0).is_some());
        assert!(cache.get("c", "x", t0).is_some());
    }
}
