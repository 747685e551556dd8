//! Wakes held `ListEntries` calls when entries change (issue 10, long-poll).
//!
//! One watch per server holds the global entry revision. A local admin write refreshes it at
//! once; writes by another server on the same PostgreSQL are seen by one poll of the revision
//! every [`POLL`] per server (not per held call). The same task prunes old tombstones.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::store::Store;
use crate::wire::unix_secs;

/// How often the store's revision is read, for writes made by other servers.
const POLL: Duration = Duration::from_millis(200);
/// How often old tombstones are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How long a deletion is remembered for incremental sync; an agent offline longer gets a
/// full resync.
pub(crate) const TOMBSTONE_TTL: Duration = Duration::from_secs(86_400);

/// The global entry revision as this server last saw it.
pub(crate) struct EntryWatch {
    revision: watch::Sender<i64>,
    /// Turns true when the server shuts down: held calls answer at once, so a graceful
    /// shutdown does not wait for them.
    closing: watch::Sender<bool>,
    store: Arc<dyn Store>,
}

impl EntryWatch {
    /// A watch over `store`'s revision, starting at 0 until the first refresh.
    pub(crate) fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            revision: watch::Sender::new(0),
            closing: watch::Sender::new(false),
            store,
        })
    }

    /// A receiver woken whenever the revision grows.
    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }

    /// A receiver that turns true when the server shuts down.
    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Reads the revision and wakes the waiters when it grew. A failed read is left for the
    /// next poll: the held calls answer at their deadline anyway.
    pub(crate) async fn refresh(&self) {
        match self.store.entries_revision().await {
            Ok(now) => {
                self.revision.send_if_modified(|seen| {
                    let grew = now > *seen;
                    if grew {
                        *seen = now;
                    }
                    grew
                });
            }
            Err(e) => {
                tracing::debug!(error = %crate::wire::error_chain(&e), "could not read the entry revision");
            }
        }
    }
}

/// Polls the revision and prunes tombstones until `stop`.
pub(crate) async fn run(watch: Arc<EntryWatch>, mut stop: watch::Receiver<bool>) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                watch.closing.send_replace(true);
                return;
            }
            _ = poll.tick() => watch.refresh().await,
            _ = prune.tick() => {
                let before = unix_secs(SystemTime::now() - TOMBSTONE_TTL);
                match watch.store.prune_tombstones(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(pruned = n, "forgot the tombstones of entries deleted over a day ago"),
                    Err(e) => tracing::warn!(error = %crate::wire::error_chain(&e), "could not prune entry tombstones; will try again"),
                }
            }
        }
    }
}
