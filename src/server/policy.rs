//! Issuance policy: who may have which SVID, with which scopes, for how long.
//!
//! The policy is pure: it judges records the node API has read from the store and says yes
//! (with exactly what to issue) or no (with a [`Refusal`] that names the reason). Identity and
//! scopes come from the entry and the request, never from the CSR.

use std::time::{Duration, SystemTime};

use crate::id::{IdError, Scope, ScopeSet, ScopedId, SpiffeId, TrustDomain};
use crate::mtls::VerifiedPeer;
use crate::store::{AgentRecord, Entry};
use crate::svid::Serial;
use crate::wire::RefusalKind;

/// The default SVID lifetime: minutes, so a stolen credential is soon worthless.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// No entry may allow SVIDs longer-lived than this.
/// The ceiling of any SVID's lifetime.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// The longest task ID.
pub const MAX_TASK_ID_LEN: usize = 128;
/// The most scopes one request may name.
pub const MAX_SCOPES: usize = 64;

/// Why a request was refused. Each variant is one sentence an operator or agent can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The call needs an agent SVID and the connection presented none.
    #[error("this call needs mTLS with an agent SVID; attest first")]
    NotAuthenticated,
    /// The client certificate is an SVID, but not an agent's.
    #[error("{0} is not an agent identity; only agents may call the node API")]
    NotAnAgent(String),
    /// The agent is not in the store: evicted, or never attested.
    #[error(
        "agent {0} is unknown to the server (evicted or never attested); attest again with a new join token"
    )]
    UnknownAgent(String),
    /// The agent was banned by an operator.
    #[error("agent {0} is banned; an operator must register a new agent")]
    Banned(String),
    /// The agent presented an SVID that was replaced by a renewal it already used.
    #[error(
        "agent {agent} presented SVID {serial}, which has been superseded by a renewal; use the newest agent SVID"
    )]
    SupersededSvid {
        /// The agent.
        agent: String,
        /// The serial it presented.
        serial: Serial,
    },
    /// The agent's SVID expired during a long-lived connection.
    #[error("agent {0} presented an expired SVID; renew it or attest again")]
    ExpiredSvid(String),
    /// The entry does not exist, or belongs to another agent (the two are not told apart, so
    /// an agent cannot probe for other agents' entries).
    #[error("entry {0} does not exist or is not registered to this agent")]
    EntryNotAuthorized(String),
    /// A scope asked for is not among the entry's.
    #[error("scope {scope} is not granted by entry {entry}; ask only for the entry's scopes")]
    ScopeNotGranted {
        /// The scope asked for.
        scope: String,
        /// The entry.
        entry: String,
    },
    /// The TTL asked for is above the entry's ceiling.
    #[error("a TTL of {asked}s is above entry {entry}'s ceiling of {ceiling}s; ask for less")]
    TtlAboveCeiling {
        /// Seconds asked for.
        asked: u64,
        /// The entry's ceiling, in seconds.
        ceiling: u64,
        /// The entry.
        entry: String,
    },
    /// A request field is malformed; the text says which and how.
    #[error("{0}")]
    Invalid(String),
    /// The join token is unknown, spent or expired.
    #[error(
        "the join token is unknown, already used or expired; generate a new one with `mayfly token generate`"
    )]
    TokenRefused,
    /// A node attestor found the evidence proves nothing (another CA, expired, a bad
    /// signature, a replayed token); the text is the attestor's sentence.
    #[error("{0}")]
    EvidenceRefused(String),
}

impl Refusal {
    /// A stable machine-readable name of the reason, sent beside the message (see
    /// [`RefusalKind::attach`]).
    pub fn kind(&self) -> RefusalKind {
        match self {
            Self::NotAuthenticated => RefusalKind::NotAuthenticated,
            Self::NotAnAgent(_) => RefusalKind::NotAnAgent,
            Self::UnknownAgent(_) => RefusalKind::UnknownAgent,
            Self::Banned(_) => RefusalKind::Banned,
            Self::SupersededSvid { .. } => RefusalKind::SupersededSvid,
            Self::ExpiredSvid(_) => RefusalKind::ExpiredSvid,
            Self::EntryNotAuthorized(_) => RefusalKind::EntryNotAuthorized,
            Self::ScopeNotGranted { .. } => RefusalKind::ScopeNotGranted,
            Self::TtlAboveCeiling { .. } => RefusalKind::TtlAboveCeiling,
            Self::Invalid(_) => RefusalKind::Invalid,
            Self::TokenRefused => RefusalKind::TokenRefused,
            Self::EvidenceRefused(_) => RefusalKind::EvidenceRefused,
        }
    }

    /// Whether the request itself was malformed (as opposed to not allowed).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Self::Invalid(_))
    }
}

impl From<IdError> for Refusal {
    fn from(e: IdError) -> Self {
        Self::Invalid(e.to_string())
    }
}

/// Checks a task ID: 1 to 128 characters of `[A-Za-z0-9._:-]`.
///
/// # Errors
/// [`Refusal::Invalid`] otherwise.
pub fn check_task_id(task_id: &str) -> Result<(), Refusal> {
    let ok = !task_id.is_empty()
        && task_id.len() <= MAX_TASK_ID_LEN
        && task_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Refusal::Invalid(
            "a task ID is 1 to 128 characters of letters, digits, '.', '_', ':' or '-'".into(),
        ))
    }
}

/// The standing of an agent that passed [`IssuancePolicy::check_agent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It used its current SVID.
    Current,
    /// It used its renewed SVID for the first time: the old one is now superseded.
    FirstUseOfNext,
}

/// What the server grants and to whom.
#[derive(Debug, Clone)]
pub struct IssuancePolicy {
    trust_domain: TrustDomain,
}

impl IssuancePolicy {
    /// The policy for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self { trust_domain }
    }

    /// The SPIFFE ID an agent admitted by `attestor` for `node_id` gets.
    ///
    /// # Errors
    /// [`Refusal::Invalid`] when the node ID cannot be a path segment.
    pub fn agent_id(&self, attestor: &str, node_id: &str) -> Result<SpiffeId, Refusal> {
        Ok(self
            .trust_domain
            .join(&format!("/mayfly/agent/{attestor}/{node_id}"))?)
    }

    /// Whether `id` is an agent identity of this trust domain.
    pub fn is_agent_id(&self, id: &SpiffeId) -> bool {
        id.trust_domain_name() == self.trust_domain.as_str()
            && id.path().starts_with("/mayfly/agent/")
    }

    /// Checks that the peer is an agent in good standing: known, not banned, presenting its
    /// current or next SVID, not expired.
    ///
    /// # Errors
    /// The [`Refusal`] naming the first failed check.
    pub fn check_agent(
        &self,
        peer: Option<&VerifiedPeer>,
        record: Option<&AgentRecord>,
        now: SystemTime,
    ) -> Result<Standing, Refusal> {
        let peer = peer.ok_or(Refusal::NotAuthenticated)?;
        let id = peer.id.spiffe_id();
        if !self.is_agent_id(id) || !peer.id.scopes().is_empty() {
            return Err(Refusal::NotAnAgent(id.to_string()));
        }
        let record = record.ok_or_else(|| Refusal::UnknownAgent(id.to_string()))?;
        if record.banned {
            return Err(Refusal::Banned(id.to_string()));
        }
        if peer.not_after <= now {
            return Err(Refusal::ExpiredSvid(id.to_string()));
        }
        if peer.serial == record.current_serial {
            Ok(Standing::Current)
        } else if record.next_serial == Some(peer.serial) {
            Ok(Standing::FirstUseOfNext)
        } else {
            Err(Refusal::SupersededSvid {
                agent: id.to_string(),
                serial: peer.serial,
            })
        }
    }

    /// Checks that `entry` exists and belongs to `agent`: its parent is the agent, or a node
    /// group the agent is in. `groups` are the node entries whose SPIFFE ID is the entry's
    /// parent (none are needed when the parent is the agent); the agent is in the group when
    /// one of them is a node entry of this server whose selectors the agent all has.
    ///
    /// # Errors
    /// [`Refusal::EntryNotAuthorized`].
    pub fn check_entry<'e>(
        &self,
        entry_id: &str,
        entry: Option<&'e Entry>,
        agent: &AgentRecord,
        groups: &[Entry],
    ) -> Result<&'e Entry, Refusal> {
        let server = crate::wire::server_id(&self.trust_domain);
        let member = |e: &Entry| {
            groups.iter().any(|g| {
                g.spiffe_id == e.parent_id && g.parent_id == server && agent.is_member_of(g)
            })
        };
        match entry {
            Some(e) if e.parent_id == agent.spiffe_id || member(e) => Ok(e),
            _ => Err(Refusal::EntryNotAuthorized(entry_id.to_owned())),
        }
    }

    /// What an identity SVID for `entry` is: its ID without scopes, for its full TTL ceiling.
    ///
    /// # Errors
    /// [`Refusal::Invalid`] if the stored ID cannot be encoded.
    pub fn identity_grant(&self, entry: &Entry) -> Result<(ScopedId, Duration), Refusal> {
        let id = ScopedId::new(entry.spiffe_id.clone(), ScopeSet::new())?;
        Ok((id, Duration::from_secs(entry.ttl_secs.into())))
    }

    /// What a task SVID for `entry` is: exactly the scopes asked for (a non-empty subset of the
    /// entry's), for `ttl_secs` (0: the default, cut to the ceiling).
    ///
    /// # Errors
    /// [`Refusal::Invalid`] for malformed or missing scopes, [`Refusal::ScopeNotGranted`],
    /// [`Refusal::TtlAboveCeiling`].
    pub fn task_grant(
        &self,
        entry: &Entry,
        scopes: &[String],
        ttl_secs: u32,
    ) -> Result<(ScopedId, Duration), Refusal> {
        if scopes.is_empty() {
            return Err(Refusal::Invalid(
                "a task SVID needs at least one scope; name the scopes this task needs".into(),
            ));
        }
        if scopes.len() > MAX_SCOPES {
            return Err(Refusal::Invalid(format!(
                "a task may ask for at most {MAX_SCOPES} scopes"
            )));
        }
        let mut granted = ScopeSet::new();
        for text in scopes {
            let scope = Scope::parse(text)?;
            if !entry.scopes.contains(&scope) {
                return Err(Refusal::ScopeNotGranted {
                    scope: scope.to_string(),
                    entry: entry.id.to_string(),
                });
            }
            granted.insert(scope);
        }
        let ceiling = u64::from(entry.ttl_secs);
        let ttl = match u64::from(ttl_secs) {
            0 => ceiling.min(DEFAULT_TTL.as_secs()),
            asked if asked > ceiling => {
                return Err(Refusal::TtlAboveCeiling {
                    asked,
                    ceiling,
                    entry: entry.id.to_string(),
                });
            }
            asked => asked,
        };
        let id = ScopedId::new(entry.spiffe_id.clone(), granted)?;
        Ok((id, Duration::from_secs(ttl)))
    }
}

#[cfg(test)]
mod tests {
    use mayfly_attestors::Selector;

    use super::*;
    use crate::store::EntryId;

    fn sid(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn entry(spiffe_id: &str, parent: &str, selectors: &[&str]) -> Entry {
        Entry {
            id: EntryId::generate(),
            spiffe_id: sid(spiffe_id),
            parent_id: sid(parent),
            selectors: selectors
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
            scopes: ScopeSet::new(),
            ttl_secs: 300,
            dns_names: Vec::new(),
            created_at: 0,
            hint: String::new(),
            jwt_ttl_secs: 0,
        }
    }

    fn agent(selectors: &[&str]) -> AgentRecord {
        AgentRecord {
            spiffe_id: sid("spiffe://acme.test/mayfly/agent/x509pop/ab"),
            attestor: "x509pop".into(),
            current_serial: Serial::from_hex("01").unwrap(),
            next_serial: None,
            not_after: 0,
            banned: false,
            created_at: 0,
            node_selectors: selectors
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
            resync_revision: 0,
        }
    }

    #[test]
    fn an_entry_under_a_group_is_the_members_only() {
        let policy = IssuancePolicy::new(TrustDomain::new("acme.test").unwrap());
        let cn = "x509pop:subject:cn:web-1";
        let ca = "x509pop:ca:fingerprint:00aa";
        let group = entry(
            "spiffe://acme.test/nodes/web",
            "spiffe://acme.test/mayfly/server",
            &[cn, ca],
        );
        let shared = entry(
            "spiffe://acme.test/w/shop",
            "spiffe://acme.test/nodes/web",
            &["unix:uid:1"],
        );
        let groups = [group.clone()];
        // Its own entry needs no group; a member gets the group's.
        let member = agent(&[ca, cn, "x509pop:serialnumber:0a"]);
        let own = entry(
            "spiffe://acme.test/w/own",
            member.spiffe_id.as_str(),
            &["unix:uid:1"],
        );
        assert!(policy.check_entry("e", Some(&own), &member, &[]).is_ok());
        assert!(
            policy
                .check_entry("e", Some(&shared), &member, &groups)
                .is_ok()
        );
        // Missing one of the group's selectors: refused, as an entry not its own.
        let outsider = agent(&[cn]);
        assert!(matches!(
            policy.check_entry("e", Some(&shared), &outsider, &groups),
            Err(Refusal::EntryNotAuthorized(_))
        ));
        // A "group" that is not a node entry of this server counts for nothing.
        let foreign = entry(
            "spiffe://acme.test/nodes/web",
            "spiffe://other.test/mayfly/server",
            &[cn],
        );
        let workload = entry(
            "spiffe://acme.test/nodes/web",
            member.spiffe_id.as_str(),
            &["unix:uid:1"],
        );
        for fake in [foreign, workload] {
            assert!(
                policy
                    .check_entry("e", Some(&shared), &member, &[fake])
                    .is_err()
            );
        }
        // A node entry of another group ID does not admit to this one.
        let other = entry(
            "spiffe://acme.test/nodes/db",
            "spiffe://acme.test/mayfly/server",
            &[cn],
        );
        assert!(
            policy
                .check_entry("e", Some(&shared), &member, &[other])
                .is_err()
        );
        // No entry at all.
        assert!(policy.check_entry("e", None, &member, &groups).is_err());
    }
}
