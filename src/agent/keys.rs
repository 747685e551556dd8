//! Keys made ahead of time for the SVIDs the agent asks for.
//!
//! A task SVID is minted while a workload waits: making its P-256 key and signing its CSR is a
//! tenth of that wait. The pool keeps a few key+CSR pairs ready, made in the background while
//! the agent is otherwise idle (typically while the previous request travels to the server), so
//! a mint takes one ready pair and only makes one on the spot when the pool has run dry. Each
//! pair is handed out once and never kept after that; the keys never leave this process except
//! to the workload they are made for.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::Notify;

use crate::svid::{KeyAndCsr, SvidError};

/// How many key+CSR pairs the pool keeps ready.
pub const POOL_SIZE: usize = 8;

/// Ready key+CSR pairs, refilled in the background.
pub struct KeyPool {
    ready: Mutex<Vec<KeyAndCsr>>,
    /// Wakes the refiller: a pair was taken, or the pool is gone.
    wake: Arc<Notify>,
    size: usize,
}

impl Drop for KeyPool {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl KeyPool {
    /// A pool of `size` pairs, filled by a task on the current tokio runtime that ends when the
    /// pool is dropped. Outside a runtime the pool stays empty and every [`KeyPool::take`]
    /// makes its pair on the spot.
    pub fn start(size: usize) -> Arc<Self> {
        let wake = Arc::new(Notify::new());
        let pool = Arc::new(Self {
            ready: Mutex::new(Vec::with_capacity(size)),
            wake: wake.clone(),
            size,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(refill(Arc::downgrade(&pool), wake));
        }
        pool
    }

    /// A fresh key and its CSR, never handed out before.
    ///
    /// # Errors
    /// [`SvidError`] when the pool is empty and a key cannot be made now.
    pub fn take(&self) -> Result<KeyAndCsr, SvidError> {
        let ready = self.lock().pop();
        self.wake.notify_one();
        match ready {
            Some(pair) => Ok(pair),
            None => KeyAndCsr::generate(),
        }
    }

    /// How many pairs are ready now.
    pub fn ready(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<KeyAndCsr>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tops the pool up to its size, one pair at a time (yielding between pairs so requests are
/// not held up behind a refill), then waits to be woken. Holds the pool only while working on
/// it, so it ends once the pool is dropped; it also ends if a key cannot be made (takes then
/// make their own, and report the failure).
async fn refill(pool: Weak<KeyPool>, wake: Arc<Notify>) {
    loop {
        let Some(strong) = pool.upgrade() else { return };
        if strong.ready() >= strong.size {
            drop(strong);
            // A wake between the drop and here is kept as a permit, so none is lost.
            wake.notified().await;
            continue;
        }
        let Ok(pair) = KeyAndCsr::generate() else {
            return;
        };
        strong.lock().push(pair);
        drop(strong);
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    async fn filled(pool: &KeyPool) {
        for _ in 0..500 {
            if pool.ready() == pool.size {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the pool did not fill: {} of {}", pool.ready(), pool.size);
    }

    #[tokio::test]
    async fn fills_in_the_background_and_never_hands_a_key_out_twice() {
        let pool = KeyPool::start(4);
        filled(&pool).await;
        let mut seen = HashSet::new();
        // Taking more than the pool holds: the ready ones first, then made on the spot or
        // refilled meanwhile; every one distinct and with a CSR that verifies for its key.
        for _ in 0..12 {
            let pair = pool.take().unwrap();
            crate::svid::parse_csr(&pair.csr).expect("each CSR verifies");
            assert!(seen.insert(pair.key_pkcs8), "a key was handed out twice");
        }
        // It fills up again after being drained.
        filled(&pool).await;
    }

    #[test]
    fn outside_a_runtime_every_take_makes_its_own_key() {
        let pool = KeyPool::start(4);
        assert_eq!(pool.ready(), 0);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a.key_pkcs8, b.key_pkcs8);
        assert_eq!(pool.ready(), 0);
    }

    #[tokio::test]
    async fn the_refiller_ends_with_the_pool() {
        let pool = KeyPool::start(2);
        filled(&pool).await;
        let wake = pool.wake.clone();
        // The pool's and the refiller's handles.
        assert_eq!(Arc::strong_count(&wake), 3);
        drop(pool);
        for _ in 0..500 {
            if Arc::strong_count(&wake) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the refiller outlived its pool");
    }
}
