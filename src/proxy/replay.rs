//! `--single-use`: the proxy's memory of the tokens it has accepted, so that a token is
//! accepted once.
//!
//! An entry is the SHA-256 of the token's subject and `jti` (32 bytes whatever the token says,
//! and a `jti` chosen by one trust domain cannot collide with another's) and the token's `exp`.
//! It is kept until that `exp`: after it, the validator refuses the token as expired anyway.
//!
//! Memory is bounded by [`DEFAULT_CAPACITY`] entries. When the cache is full, entries whose
//! `exp` has passed are dropped; if none has, the new token is **refused** (fail closed) rather
//! than an unexpired entry forgotten, which would let that token be replayed. The scan for
//! expired entries runs at most once per second of token time (it remembers the earliest
//! `exp` left), so a full cache under load costs a lookup per request, not a scan.
//!
//! The cache lives in memory only: after a restart it is empty, and a token seen before the
//! restart is accepted once more until its `exp`.

use std::collections::HashMap;
use std::sync::Mutex;

/// Entries held at most (about 6 MB).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Why a token was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// It was accepted before.
    #[error("the token was already used (jti seen before); --single-use accepts each token once")]
    Replayed,
    /// It has no `jti` to remember it by.
    #[error("the token has no jti claim; --single-use needs one to accept a token only once")]
    NoJti,
    /// The cache holds its capacity in unexpired tokens.
    #[error(
        "the replay cache is full of unexpired tokens ({0}); retry once some expire, or raise the proxy's capacity"
    )]
    Full(usize),
}

struct Entries {
    seen: HashMap<[u8; 32], u64>,
    /// No entry expires before this (Unix seconds): until then a scan cannot free anything.
    earliest_exp: u64,
}

/// Tokens accepted and not yet expired, by subject and `jti`.
pub struct ReplayCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl ReplayCache {
    /// An empty cache holding at most `capacity` tokens.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(Entries {
                seen: HashMap::new(),
                earliest_exp: 0,
            }),
            capacity,
        }
    }

    /// Records the token of `subject` with `jti`, valid until `exp`, at `now` (Unix seconds).
    ///
    /// # Errors
    /// [`ReplayError::Replayed`] when it is recorded and unexpired; [`ReplayError::NoJti`]
    /// without a `jti`; [`ReplayError::Full`] when the cache holds its capacity in unexpired
    /// tokens.
    pub fn record(
        &self,
        subject: &str,
        jti: Option<&str>,
        exp: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        let jti = jti.ok_or(ReplayError::NoJti)?;
        let key = key_of(subject, jti);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&until) = entries.seen.get(&key) {
            if until > now {
                return Err(ReplayError::Replayed);
            }
            entries.seen.remove(&key);
        }
        if entries.seen.len() >= self.capacity {
            if now < entries.earliest_exp {
                return Err(ReplayError::Full(self.capacity));
            }
            entries.seen.retain(|_, until| *until > now);
            entries.earliest_exp = entries.seen.values().copied().min().unwrap_or(0);
            if entries.seen.len() >= self.capacity {
                return Err(ReplayError::Full(self.capacity));
            }
        }
        if entries.seen.is_empty() || exp < entries.earliest_exp {
            entries.earliest_exp = exp;
        }
        entries.seen.insert(key, exp);
        Ok(())
    }

    /// Tokens held now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key_of(subject: &str, jti: &str) -> [u8; 32] {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    context.update(subject.as_bytes());
    // A separator that cannot occur in a SPIFFE ID, so ("a", "bc") and ("ab", "c") differ.
    context.update(b"\n");
    context.update(jti.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_accepted_once_until_its_exp() {
        let cache = ReplayCache::new(10);
        assert_eq!(cache.record("spiffe://t/a", Some("j1"), 100, 50), Ok(()));
        assert_eq!(
            cache.record("spiffe://t/a", Some("j1"), 100, 60),
            Err(ReplayError::Replayed)
        );
        // Another subject with the same jti is another token.
        assert_eq!(cache.record("spiffe://t/b", Some("j1"), 100, 60), Ok(()));
        // After exp the entry no longer counts (the validator refuses the token anyway).
        assert_eq!(cache.record("spiffe://t/a", Some("j1"), 200, 100), Ok(()));
        assert_eq!(
            cache.record("spiffe://t/a", None, 100, 60),
            Err(ReplayError::NoJti)
        );
    }

    #[test]
    fn a_full_cache_drops_only_expired_entries_and_otherwise_refuses() {
        let cache = ReplayCache::new(2);
        cache.record("s", Some("a"), 100, 10).unwrap();
        cache.record("s", Some("b"), 200, 10).unwrap();
        assert_eq!(
            cache.record("s", Some("c"), 300, 50),
            Err(ReplayError::Full(2))
        );
        // "a" expired at 100: its place is taken, "b" is still remembered.
        assert_eq!(cache.record("s", Some("c"), 300, 150), Ok(()));
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.record("s", Some("b"), 200, 160),
            Err(ReplayError::Replayed)
        );
        assert_eq!(
            cache.record("s", Some("d"), 300, 160),
            Err(ReplayError::Full(2))
        );
    }
}
