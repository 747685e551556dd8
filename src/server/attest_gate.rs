//! Bounds on failed attestations (issue 12): `Attest` is the one node API call an anonymous
//! client can make, so what a stream of bad evidence costs the server is bounded here.
//!
//! Per source address, a token bucket ([`AttestLimits::rate_per_sec`], burst
//! [`AttestLimits::burst`]) is charged one token per refused attestation; while it is empty,
//! the source's attestations are answered `ResourceExhausted` before any evidence is read, so
//! the store and the audit log are not touched. A successful attestation costs nothing.
//!
//! The audit log stays bounded too: each source's first [`AttestLimits::audited_each`]
//! refusals of an interval are audited one by one, as before; past them, refusals and
//! throttled attempts are counted, and once per [`AttestLimits::interval`] each source with a
//! count gets one record saying how many, and the last reason. A flood of 1,000 bad
//! attestations thus writes about a dozen rows instead of a thousand.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How many sources are remembered at most; past it, the fullest (least suspicious) buckets
/// are forgotten first.
const MAX_SOURCES: usize = 65_536;

/// The limits, from the server's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttestLimits {
    /// Refused attestations a source may make per second, sustained.
    pub rate_per_sec: f64,
    /// Refused attestations a source may make in a burst.
    pub burst: u32,
    /// Refusals per source and interval audited one by one before counting starts.
    pub audited_each: u32,
    /// How often counted refusals are written as one record per source.
    pub interval: Duration,
}

impl Default for AttestLimits {
    fn default() -> Self {
        Self {
            rate_per_sec: 5.0,
            burst: 20,
            audited_each: 10,
            interval: Duration::from_secs(60),
        }
    }
}

/// What to do with a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// Audit it on its own.
    Individually,
    /// It was counted for the source's next summary.
    Counted,
}

/// The summary of one source's counted refusals over an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// The source address.
    pub(crate) source: IpAddr,
    /// Refusals counted (beyond those audited one by one).
    pub(crate) refused: u64,
    /// Attempts answered `ResourceExhausted`.
    pub(crate) throttled: u64,
    /// The last refusal's reason (empty when only throttled attempts were counted).
    pub(crate) last_reason: String,
}

struct Source {
    tokens: f64,
    refilled: Instant,
    audited: u32,
    refused: u64,
    throttled: u64,
    last_reason: String,
}

/// The per-source state; shared by every `Attest` call.
pub(crate) struct AttestGate {
    pub(crate) limits: AttestLimits,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

impl AttestGate {
    /// A gate with `limits`.
    pub(crate) fn new(limits: AttestLimits) -> Self {
        Self {
            limits,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// How often [`AttestGate::drain`] should run.
    pub(crate) fn interval(&self) -> Duration {
        self.limits.interval
    }

    /// Whether `source` may attest now. `false` counts the attempt as throttled.
    pub(crate) fn admit(&self, source: IpAddr, now: Instant) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(state) = sources.get_mut(&source) else {
            return true;
        };
        self.refill(state, now);
        if state.tokens >= 1.0 {
            return true;
        }
        state.throttled += 1;
        false
    }

    /// Charges `source` for a refused attestation; says whether to audit it on its own.
    pub(crate) fn refused(&self, source: IpAddr, reason: &str, now: Instant) -> Record {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if !sources.contains_key(&source) && sources.len() >= MAX_SOURCES {
            forget_fullest(&mut sources, now, &self.limits);
        }
        let burst = f64::from(self.limits.burst.max(1));
        let state = sources.entry(source).or_insert(Source {
            tokens: burst,
            refilled: now,
            audited: 0,
            refused: 0,
            throttled: 0,
            last_reason: String::new(),
        });
        self.refill(state, now);
        state.tokens = (state.tokens - 1.0).max(0.0);
        if state.audited < self.limits.audited_each {
            state.audited += 1;
            return Record::Individually;
        }
        state.refused += 1;
        reason.clone_into(&mut state.last_reason);
        Record::Counted
    }

    /// The summaries of every source with counted attempts, which start a new interval; the
    /// sources whose bucket is full again are forgotten.
    pub(crate) fn drain(&self, now: Instant) -> Vec<Summary> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for (source, state) in sources.iter_mut() {
            self.refill(state, now);
            if state.refused > 0 || state.throttled > 0 {
                out.push(Summary {
                    source: *source,
                    refused: state.refused,
                    throttled: state.throttled,
                    last_reason: std::mem::take(&mut state.last_reason),
                });
            }
            state.refused = 0;
            state.throttled = 0;
            state.audited = 0;
        }
        let burst = f64::from(self.limits.burst.max(1));
        sources.retain(|_, s| s.tokens < burst);
        out.sort_by_key(|s| s.source);
        out
    }

    fn refill(&self, state: &mut Source, now: Instant) {
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        let burst = f64::from(self.limits.burst.max(1));
        state.tokens = (state.tokens + elapsed * self.limits.rate_per_sec).min(burst);
        state.refilled = now;
    }
}

/// Forgets the tenth of the sources whose buckets are fullest (the least active offenders).
fn forget_fullest(sources: &mut HashMap<IpAddr, Source>, now: Instant, limits: &AttestLimits) {
    let level = |s: &Source| {
        s.tokens + now.saturating_duration_since(s.refilled).as_secs_f64() * limits.rate_per_sec
    };
    let mut levels: Vec<(IpAddr, f64)> = sources.iter().map(|(a, s)| (*a, level(s))).collect();
    levels.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (addr, _) in levels.into_iter().take(MAX_SOURCES / 10 + 1) {
        sources.remove(&addr);
    }
}

/// Once per interval, audits one record per source with counted refusals, until `stop`.
pub(crate) async fn summarise(
    state: std::sync::Arc<super::ServerState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::audit::{AuditAction, AuditEvent, Decision};
    let every = state.attest_gate.interval();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
        for summary in state.attest_gate.drain(Instant::now()) {
            let mut event = AuditEvent::new(AuditAction::AgentAttest);
            event.decision = Some(Decision::Deny);
            event.reason = format!(
                "{} more attestations from {} refused and {} throttled in the last {}s (each source's first {} per interval are audited one by one); the last reason: {}",
                summary.refused,
                summary.source,
                summary.throttled,
                every.as_secs(),
                state.attest_gate.limits.audited_each,
                if summary.last_reason.is_empty() {
                    "none, only throttled attempts"
                } else {
                    &summary.last_reason
                },
            );
            tracing::warn!(source = %summary.source, refused = summary.refused, throttled = summary.throttled, "a source keeps failing to attest");
            if let Err(e) = state.audit.record(event).await {
                tracing::error!(error = %crate::wire::error_chain(&e), "could not audit a summary of refused attestations");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn gate() -> AttestGate {
        AttestGate::new(AttestLimits {
            rate_per_sec: 5.0,
            burst: 20,
            audited_each: 3,
            interval: Duration::from_secs(60),
        })
    }

    #[test]
    fn a_source_is_throttled_after_its_burst_of_refusals_and_others_are_not() {
        let g = gate();
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(g.admit(ip(1), t0));
            g.refused(ip(1), "bad token", t0);
        }
        assert!(!g.admit(ip(1), t0), "the burst is spent");
        assert!(g.admit(ip(2), t0), "another source is not affected");
        // Refilled at 5 per second: after 200 ms, one more attempt.
        assert!(g.admit(ip(1), t0 + Duration::from_millis(200)));
        g.refused(ip(1), "bad token", t0 + Duration::from_millis(200));
        assert!(!g.admit(ip(1), t0 + Duration::from_millis(200)));
    }

    #[test]
    fn refusals_past_the_first_few_are_counted_and_summarised_once_per_interval() {
        let g = gate();
        let t0 = Instant::now();
        let records: Vec<Record> = (0..25)
            .map(|i| g.refused(ip(1), &format!("r{i}"), t0))
            .collect();
        assert_eq!(
            records
                .iter()
                .filter(|r| **r == Record::Individually)
                .count(),
            3
        );
        for _ in 0..7 {
            assert!(!g.admit(ip(1), t0));
        }
        let summary = g.drain(t0);
        assert_eq!(
            summary,
            vec![Summary {
                source: ip(1),
                refused: 22,
                throttled: 7,
                last_reason: "r24".into()
            }]
        );
        // A new interval audits its first refusals again; a quiet interval writes nothing.
        assert_eq!(g.refused(ip(1), "again", t0), Record::Individually);
        assert!(g.drain(t0).is_empty());
        // A source whose bucket is full again is forgotten.
        assert!(g.drain(t0 + Duration::from_secs(60)).is_empty());
        assert!(g.sources.lock().unwrap().is_empty());
    }
}
