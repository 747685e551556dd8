//! A count of operations under way, for paths that take a shortcut when the system is quiet.
//!
//! Batching (of store lookups, of audit appends) pays off under load and only adds thread
//! hand-offs when a request is alone; both places ask the same question, "how many others are
//! under way?", and this answers it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Operations under way; clones share the count.
#[derive(Debug, Clone, Default)]
pub(crate) struct UnderWay(Arc<AtomicUsize>);

impl UnderWay {
    /// Counts one more operation until the returned guard is dropped (also when its caller
    /// gives up on it half-way).
    pub(crate) fn enter(&self) -> Entered<'_> {
        let before = self.0.fetch_add(1, Ordering::AcqRel);
        Entered {
            count: &self.0,
            before,
        }
    }
}

/// One operation counted as under way.
pub(crate) struct Entered<'a> {
    count: &'a AtomicUsize,
    before: usize,
}

impl Entered<'_> {
    /// How many others were under way when this one entered.
    pub(crate) fn others(&self) -> usize {
        self.before
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_others_until_dropped() {
        let count = UnderWay::default();
        let first = count.enter();
        assert_eq!(first.others(), 0);
        let second = count.clone().enter().others();
        assert_eq!(second, 1);
        {
            let third = count.enter();
            assert_eq!(third.others(), 1);
        }
        drop(first);
        assert_eq!(count.enter().others(), 0);
    }
}
