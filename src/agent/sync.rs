//! The agent's one background loop: poll the server for the entries authorized for this agent
//! and the bundle, keep an identity SVID for every entry and rotate it at half its life (±10%
//! jitter, so a fleet does not renew in lockstep), renew the agent's own SVID at half-life, and
//! re-attest when the server has forgotten the agent.
//!
//! While the server is unreachable nothing is dropped: the last snapshot stays published, and
//! the Workload API withdraws each SVID at its notAfter on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tokio::sync::watch;

use super::entry_pages::{self, Pass, merge, report};
use super::identity::{self, AgentSvid, Bootstrap, IdentityError, IdentityFiles};
use super::link::ServerLink;
use super::state::{AgentEntry, CachedSvid, Snapshot, SnapshotTx};
pub use super::sync_error::SyncError;
use crate::wire::RefusalKind;

/// How many identity SVIDs are requested at once.
const ISSUE_CONCURRENCY: usize = 16;
/// The longest wait between attempts while the server refuses or is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The longest the agent asks the server to hold a sync call (the server caps it too).
const MAX_HOLD: Duration = Duration::from_secs(25);
/// A round shorter than this that brought nothing was not held: the loop sleeps as it would
/// without holding, so it never spins.
const MIN_HELD: Duration = Duration::from_millis(200);

/// What the loop needs to re-attest on its own.
pub struct Reattest {
    /// The servers' node APIs: attestation goes to whichever answers.
    pub servers: Arc<crate::server_set::ServerSet>,
    /// What the agent attests with (its node attestor, or the join token it was started
    /// with), if anything.
    pub evidence: Option<Arc<dyn mayfly_attestors::NodeEvidence>>,
}

/// The sync loop's state.
pub struct Syncer {
    link: Arc<ServerLink>,
    files: IdentityFiles,
    agent: AgentSvid,
    reattest: Reattest,
    interval: Duration,
    tx: SnapshotTx,
    revision: i64,
    /// The server holds sync calls until something changes (it speaks the incremental
    /// protocol), so the next round may start at once.
    holds: bool,
    /// The last round brought changes.
    changed: bool,
    /// When each entry's SVID is due for rotation.
    rotate_at: HashMap<String, SystemTime>,
    failures: u32,
}

/// How a sync round ended.
enum Round {
    /// It ran to its end.
    Done,
    /// The agent is shutting down: the round stopped while waiting for the server.
    Stopped,
}

impl Syncer {
    /// A loop for the agent `agent`, talking over `link`, publishing to `tx`.
    pub fn new(
        link: Arc<ServerLink>,
        files: IdentityFiles,
        agent: AgentSvid,
        reattest: Reattest,
        interval: Duration,
        tx: SnapshotTx,
    ) -> Self {
        Self {
            link,
            files,
            agent,
            reattest,
            interval,
            tx,
            revision: 0,
            holds: false,
            changed: false,
            rotate_at: HashMap::new(),
            failures: 0,
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let started = Instant::now();
            let wait = match self.tick(&mut shutdown).await {
                Ok(Round::Stopped) => return,
                Ok(Round::Done) => {
                    self.failures = 0;
                    if self.holds && (self.changed || started.elapsed() >= MIN_HELD) {
                        // The server held the call (or brought news): ask again at once.
                        Duration::ZERO
                    } else {
                        self.next_wake()
                    }
                }
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    // Say it once per streak at warn level, then quietly, so an outage does
                    // not flood the log.
                    if self.failures == 1 {
                        tracing::warn!(error = %crate::wire::error_chain(&e), "sync with the server failed; serving cached SVIDs until they expire");
                    } else {
                        tracing::debug!(error = %crate::wire::error_chain(&e), failures = self.failures, "sync failed again");
                    }
                    backoff(self.failures)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// How long to sleep: the poll interval, or less when an SVID is due sooner.
    fn next_wake(&self) -> Duration {
        self.until_due(self.interval).max(Duration::from_millis(50))
    }

    /// The time until the next SVID (an entry's or the agent's) is due, at most `limit`.
    fn until_due(&self, limit: Duration) -> Duration {
        let now = SystemTime::now();
        let mut due = now + limit;
        for at in self.rotate_at.values() {
            due = due.min(*at);
        }
        due = due.min(self.agent.renew_at());
        due.duration_since(now).unwrap_or_default()
    }

    /// How long the server may hold the next sync call: never past the next rotation.
    fn hold_for(&self) -> Duration {
        if self.holds {
            self.until_due(MAX_HOLD)
        } else {
            Duration::ZERO
        }
    }

    /// One round: renew the agent SVID if due, sync entries and bundle, issue and rotate
    /// identity SVIDs, publish. A shutdown while the entry list is awaited (a held call can
    /// last [`MAX_HOLD`]) ends the round at once: that wait only reads, so nothing is cut
    /// half-written, whereas renewals and issuance run to their end.
    async fn tick(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Round, SyncError> {
        let now = SystemTime::now();
        if !self.agent.is_valid_at(now) {
            self.reattest_now().await?;
        } else if now >= self.agent.renew_at() {
            self.renew_agent().await?;
        }
        let listed = tokio::select! {
            listed = self.list_entries() => listed,
            _ = shutdown.changed() => return Ok(Round::Stopped),
        };
        let answer = match listed {
            Err(SyncError::Refused(status))
                if RefusalKind::of(&status) == Some(RefusalKind::UnknownAgent) =>
            {
                self.reattest_now().await?;
                self.list_entries().await?
            }
            other => other?,
        };
        self.apply(answer).await?;
        Ok(Round::Done)
    }

    async fn list_entries(&self) -> Result<Pass, SyncError> {
        // The digest of the bundle the workloads are served, not of `self.agent.bundle`: a
        // renewal brings the server's newest bundle into the latter, and the server would then
        // never send it to be served.
        let held = {
            let served = self.tx.borrow();
            crate::wire::bundle_digest(&served.bundle, &served.jwt_points())
        };
        entry_pages::fetch(&self.link, self.revision, held, self.hold_for()).await
    }

    async fn apply(&mut self, mut pass: Pass) -> Result<(), SyncError> {
        let tainted = std::mem::take(&mut pass.tainted);
        let current = self.tx.borrow().clone();
        let mut next = (*current).clone();
        let revision = pass.revision;
        self.holds = pass.incremental;
        self.changed = !pass.unchanged || !pass.bundle.is_empty();
        if !pass.bundle.is_empty() && pass.bundle != next.bundle {
            self.set_bundle(&pass.bundle)?;
            next.bundle = pass.bundle.clone();
        }
        if !pass.bundle.is_empty() {
            next.jwt_keys = jwt_keys_of(&pass.jwt_keys);
        }
        if !pass.unchanged {
            report(&pass);
            next.entries = merge(&next.entries, pass);
        }
        self.revision = revision;
        // Drop the SVIDs of entries that are gone or changed, then issue what is missing or due.
        // An entry updated by an operator (`entry update`) arrives with its ID unchanged: its
        // SVID is issued again when what the SVID holds (DNS names) or its lifetime changed,
        // compared with the entry as it was when the SVID was held.
        let by_id: HashMap<&str, &Arc<AgentEntry>> =
            next.entries.iter().map(|e| (e.id.as_str(), e)).collect();
        let before: HashMap<&str, &Arc<AgentEntry>> =
            current.entries.iter().map(|e| (e.id.as_str(), e)).collect();
        next.svids.retain(|id, svid| {
            by_id.get(id.as_str()).is_some_and(|e| {
                e.spiffe_id == svid.spiffe_id
                    && before
                        .get(id.as_str())
                        .is_none_or(|old| !old.needs_new_svid(e))
            })
        });
        self.rotate_at.retain(|id, _| next.svids.contains_key(id));
        let agent_tainted = super::taint::mark_due(
            &tainted,
            &next.bundle,
            &next.svids,
            &mut self.rotate_at,
            &self.agent.chain,
        );
        let now = SystemTime::now();
        let due: Vec<Arc<AgentEntry>> = next
            .entries
            .iter()
            .filter(|e| match next.svids.get(&e.id) {
                None => true,
                Some(svid) => {
                    !svid.is_valid_at(now) || self.rotate_at.get(&e.id).is_none_or(|at| *at <= now)
                }
            })
            .cloned()
            .collect();
        let link = self.link.clone();
        let issued: Vec<(Arc<AgentEntry>, Result<CachedSvid, tonic::Status>)> =
            futures::stream::iter(due)
                .map(|entry| {
                    let link = link.clone();
                    async move {
                        let result = link.issue_identity(&entry).await;
                        (entry, result)
                    }
                })
                .buffer_unordered(ISSUE_CONCURRENCY)
                .collect()
                .await;
        let mut refused = None;
        for (entry, result) in issued {
            match result {
                Ok(svid) => {
                    self.rotate_at
                        .insert(entry.id.clone(), rotation_time(&svid));
                    next.svids.insert(entry.id.clone(), Arc::new(svid));
                }
                Err(status) => {
                    tracing::warn!(entry = %entry.id, spiffe_id = %entry.spiffe_id, reason = status.message(), "the server refused an identity SVID");
                    refused = Some(status);
                }
            }
        }
        if agent_tainted {
            self.renew_agent().await?;
        }
        next.ready = true;
        let changed = next.entries != current.entries
            || next.bundle != current.bundle
            || next.jwt_keys != current.jwt_keys
            || next.svids != current.svids
            || !current.ready;
        if changed {
            self.tx.send_replace(Arc::new(next));
        }
        match refused {
            Some(status) => Err(SyncError::Refused(status)),
            None => Ok(()),
        }
    }

    fn set_bundle(&mut self, certs: &[Vec<u8>]) -> Result<(), SyncError> {
        let td = self.agent.trust_domain();
        let map = crate::client::bundle_map(&td, certs);
        self.link
            .source()
            .set_bundles(map)
            .map_err(|e| SyncError::Identity(IdentityError::Tls(e)))?;
        self.agent.bundle = certs.to_vec();
        self.files.save_bundle(certs)?;
        Ok(())
    }

    async fn renew_agent(&mut self) -> Result<(), SyncError> {
        let renewed = match identity::renew(&self.link).await {
            Err(IdentityError::Refused(status))
                if RefusalKind::of(&status) == Some(RefusalKind::UnknownAgent) =>
            {
                return self.reattest_now().await;
            }
            other => other?,
        };
        self.adopt(renewed).await?;
        tracing::info!(agent = %self.agent.spiffe_id, not_after = crate::wire::unix_secs(self.agent.not_after), "renewed the agent SVID");
        Ok(())
    }

    /// Attests again with the agent's node attestor, or the join token it was started with
    /// (which the server refuses once spent).
    async fn reattest_now(&mut self) -> Result<(), SyncError> {
        let Some(evidence) = self.reattest.evidence.clone() else {
            tracing::error!(agent = %self.agent.spiffe_id, "the server no longer knows this agent (evicted, or its SVID expired) and it was started without a join token: generate one with `mayfly token generate` and restart the agent with --join-token");
            return Err(SyncError::NeedsToken);
        };
        let bootstrap = Bootstrap::Bundle(self.agent.bundle.clone());
        let td = self.agent.trust_domain();
        let attestor = evidence.name();
        match identity::attest(&self.reattest.servers, &bootstrap, evidence, Some(&td)).await {
            Ok(svid) => {
                tracing::info!(agent = %svid.spiffe_id, attestor, "attested again");
                // Whatever the server knew of this agent's entries may have changed with its
                // node selectors: the next sync starts from scratch.
                self.adopt(svid).await?;
                self.revision = 0;
                Ok(())
            }
            Err(IdentityError::Refused(status))
                if RefusalKind::of(&status) == Some(RefusalKind::TokenRefused) =>
            {
                tracing::error!(agent = %self.agent.spiffe_id, "the server no longer knows this agent (evicted, or its SVID expired) and its join token is spent: generate a new one with `mayfly token generate` and restart the agent with --join-token");
                self.files.forget();
                Err(SyncError::NeedsToken)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes `svid` the agent's identity: on disk first, then for new connections.
    async fn adopt(&mut self, svid: AgentSvid) -> Result<(), SyncError> {
        self.files.save(&svid)?;
        self.link
            .source()
            .set_svid(svid.cert_chain(), &svid.key_pkcs8)
            .map_err(|e| SyncError::Identity(IdentityError::Tls(e)))?;
        self.agent = svid;
        self.link
            .reconnect()
            .await
            .map_err(|e| SyncError::Identity(e.into()))
    }
}

/// The JWT keys the server sent; a malformed one is skipped (and logged), so one bad key
/// cannot stop the others from validating.
fn jwt_keys_of(points: &[Vec<u8>]) -> Vec<crate::jwt::JwtKey> {
    points
        .iter()
        .filter_map(|p| match crate::jwt::JwtKey::from_point(p) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(error = %e, "the server sent a JWT key that is not a P-256 point; skipped");
                None
            }
        })
        .collect()
}

fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.min(4).saturating_sub(1);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// Half-way through the SVID's life, moved by up to ±10% of the life at random.
fn rotation_time(svid: &CachedSvid) -> SystemTime {
    let life = svid
        .not_after
        .duration_since(svid.issued_at)
        .unwrap_or_default();
    let mut byte = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    // A fraction in [0.4, 0.6] of the lifetime.
    let fraction = 0.4 + 0.2 * f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX);
    svid.issued_at + life.mul_f64(fraction)
}

/// An empty snapshot for `agent`, not ready until the first sync.
pub fn initial_snapshot(agent: &AgentSvid) -> Snapshot {
    Snapshot::empty(agent.trust_domain(), agent.bundle.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::SpiffeId;

    #[test]
    fn rotation_falls_within_ten_percent_of_half_life() {
        let issued_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let svid = CachedSvid {
            spiffe_id: SpiffeId::parse("spiffe://t.test/w").unwrap(),
            chain: vec![],
            key_pkcs8: vec![],
            serial: crate::svid::Serial::from_hex("01").unwrap(),
            issued_at,
            not_after: issued_at + Duration::from_secs(100),
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let at = rotation_time(&svid).duration_since(issued_at).unwrap();
            assert!(
                at >= Duration::from_secs(40) && at <= Duration::from_secs(60),
                "{at:?}"
            );
            seen.insert(at.as_secs());
        }
        assert!(seen.len() > 5, "jitter spreads rotations: {seen:?}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert!(backoff(100) <= MAX_BACKOFF);
    }
}
