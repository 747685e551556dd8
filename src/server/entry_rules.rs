//! What a registration entry may hold: the admin API's one validation path.
//!
//! An entry that is stored must be issuable, every time, for every task the agent may ask for:
//! otherwise the agent retries it forever, the workload never gets its identity, and (for an
//! entry too large to send) the agent's sync fails for every entry on its node. So the limits
//! here are derived from what issuance and the node API can carry, and an entry over one is
//! refused whole, with nothing stored.

use std::time::{Duration, SystemTime};

use mayfly_attestors::{Selector, SelectorError};

use crate::dns_name::{self, DnsNameError, MAX_DNS_NAME_LEN};
use crate::id::{
    IdError, MAX_SPIFFE_ID_LEN, ScopeSet, ScopedId, SpiffeId, TrustDomain, parse_scopes,
};
use crate::proto::admin as pb;
use crate::server::entry_kind::{EntryKind, check_node_create, check_node_update};
use crate::server::policy::{DEFAULT_TTL, IssuancePolicy, MAX_SCOPES, MAX_TTL};
use crate::store::{Entry, EntryId};
use crate::svid::MAX_LEAF_LEN;
use crate::text::escape_bounded;
use crate::wire::unix_secs;

/// The shortest TTL an entry may have, unless the server is configured otherwise. The agent
/// renews an identity SVID at half its lifetime, so a TTL of seconds makes it re-issue (and
/// the server sign and audit) that identity continuously: a 1 s TTL gave 56 issuances in 10 s.
pub const MIN_TTL: Duration = Duration::from_secs(30);

/// The most scopes one entry may grant: as many as one task request may name
/// ([`MAX_SCOPES`]), so a task can always hold all of its entry's scopes at once. The bytes
/// count too: the entry's ID with all its scopes must be a valid SPIFFE ID (≤ 2,048 bytes).
pub const MAX_ENTRY_SCOPES: usize = MAX_SCOPES;

/// The bytes of a leaf other than its DNS SANs, at most: the longest scoped SPIFFE ID
/// (2,048 bytes) plus 1 KiB for the rest (key, issuer and subject names, validity, serial,
/// other extensions and signature; about 450 bytes are used, as the tests measure).
pub const LEAF_BYTES_WITHOUT_DNS: usize = MAX_SPIFFE_ID_LEN + 1024;

/// The DER bytes one DNS SAN of the longest name takes: its tag, a two-byte length and the
/// name.
const DNS_SAN_MAX_BYTES: usize = 3 + MAX_DNS_NAME_LEN;

/// The most DNS names one entry may have: as many of the longest names as fit in a leaf the
/// verifiers accept ([`MAX_LEAF_LEN`], 16 KiB) beside the longest scoped ID. Every entry at
/// this cap can be signed and verified, whatever its names.
pub const MAX_ENTRY_DNS_NAMES: usize = (MAX_LEAF_LEN - LEAF_BYTES_WITHOUT_DNS) / DNS_SAN_MAX_BYTES;

// The DNS cap is the largest count that fits: one more would not.
const _: () = assert!(
    LEAF_BYTES_WITHOUT_DNS + MAX_ENTRY_DNS_NAMES * DNS_SAN_MAX_BYTES <= MAX_LEAF_LEN
        && LEAF_BYTES_WITHOUT_DNS + (MAX_ENTRY_DNS_NAMES + 1) * DNS_SAN_MAX_BYTES > MAX_LEAF_LEN
);

/// The most selectors one entry may require. A workload attestor reports seven kinds of fact
/// (uid, gid, user, group, supplementary gids, path, sha256), so an entry needs a handful; at
/// 16 of the longest (1 KiB values), an entry at every cap still fits in half of the node
/// API's message limit, so the agent can always sync it beside the bundle and its other
/// entries (the tests check the sum).
pub const MAX_ENTRY_SELECTORS: usize = 16;

/// The longest hint, in characters: a label telling a workload's identities apart (such as
/// `billing` or `read-replica`), not a description.
pub const MAX_HINT_CHARS: usize = 64;

/// How long a JWT-SVID for an entry lives at most when the entry says nothing (its stored
/// `jwt_ttl_secs` is 0).
pub const DEFAULT_JWT_TTL: Duration = DEFAULT_TTL;

/// How much of a refused value an error repeats, escaped.
const SHOWN_CHARS: usize = 200;

/// Why an entry was refused. Each is one sentence that says what to change.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The SPIFFE ID or the parent ID is malformed, or the ID may not be registered.
    #[error(transparent)]
    Id(#[from] IdError),
    /// The parent is neither an agent of this trust domain nor an ID a node group could have.
    #[error(
        "parent ID '{parent}' must be an agent of trust domain '{td}', such as spiffe://{td}/mayfly/agent/join_token/<id>, or a node group's SPIFFE ID (see `mayfly entry create --node`)"
    )]
    ParentNotAgent {
        /// The parent ID given.
        parent: SpiffeId,
        /// The server's trust domain.
        td: TrustDomain,
    },
    /// The entry names no selector.
    #[error(
        "an entry needs at least one selector (e.g. unix:uid:1001), or any workload on the node would match it"
    )]
    NoSelectors,
    /// More selectors than [`MAX_ENTRY_SELECTORS`].
    #[error(
        "an entry may require at most {MAX_ENTRY_SELECTORS} selectors and this one has {0}; a larger entry could not be sent to its agent"
    )]
    TooManySelectors(usize),
    /// A selector is malformed.
    #[error("{}", escape_bounded(&.0.to_string(), SHOWN_CHARS))]
    Selector(#[source] SelectorError),
    /// More scopes than [`MAX_ENTRY_SCOPES`].
    #[error(
        "an entry may grant at most {MAX_ENTRY_SCOPES} scopes and this one has {0}, more than one task could ever ask for; split it into several entries"
    )]
    TooManyScopes(usize),
    /// A scope is malformed.
    #[error(transparent)]
    Scope(IdError),
    /// The ID with all the entry's scopes is over the SPIFFE ID length limit.
    #[error(
        "the entry's SPIFFE ID with all its scopes is {0} bytes, over the SPIFFE limit of 2048, so a task SVID holding them all could never be issued; use fewer or shorter scopes, or a shorter ID"
    )]
    ScopesTooLong(usize),
    /// More DNS names than [`MAX_ENTRY_DNS_NAMES`].
    #[error(
        "an entry may have at most {MAX_ENTRY_DNS_NAMES} DNS names and this one has {0}; more would not fit in a certificate that verifiers accept"
    )]
    TooManyDnsNames(usize),
    /// A DNS name cannot go in a certificate.
    #[error(transparent)]
    DnsName(#[from] DnsNameError),
    /// The TTL is below the floor.
    #[error(
        "a {what} of {asked}s is below the floor of {floor}s: the agent renews an SVID at half its lifetime, so a shorter TTL would make it re-issue this identity continuously; give a {what} of at least {floor}s"
    )]
    TtlBelowFloor {
        /// Which TTL: `TTL` or `JWT TTL`.
        what: &'static str,
        /// Seconds asked for.
        asked: u64,
        /// The floor, in seconds.
        floor: u64,
    },
    /// The TTL is above the ceiling: 1 h, or 1/6 of the CA TTL when that is shorter.
    #[error(
        "a {what} of {asked}s is above the ceiling of {ceiling}s (at most 1h, and at most 1/6 of the CA TTL so that the CA is rotated before what it signed expires); give a shorter {flag}"
    )]
    TtlAboveCeiling {
        /// Which TTL: `TTL` or `JWT TTL`.
        what: &'static str,
        /// The command-line flag that sets it.
        flag: &'static str,
        /// Seconds asked for.
        asked: u64,
        /// The ceiling, in seconds.
        ceiling: u64,
    },
    /// The hint is longer than [`MAX_HINT_CHARS`].
    #[error(
        "a hint may have at most {MAX_HINT_CHARS} characters and this one has {0}; give a short label such as --hint billing"
    )]
    HintTooLong(usize),
    /// The hint holds a control or invisible formatting character.
    #[error(
        "the hint '{0}' holds a control or invisible formatting character, which would garble what workloads and operators are shown; give printable text only"
    )]
    HintUnprintable(String),
    /// The parent is no agent, and no node entry defines a group by that ID.
    #[error(
        "parent ID '{0}' is neither an agent nor a node group; create the group first with `mayfly entry create --node --spiffe-id {0} --selector <node selector>`"
    )]
    UnknownNodeGroup(SpiffeId),
    /// A node entry was given a parent.
    #[error("a node entry's parent is always the server, so it takes no --parent-id; leave it out")]
    NodeEntryWithParent,
    /// A node entry was given something only an issued identity has.
    #[error(
        "a node entry defines a node group and issues nothing, so it takes no {0}; give only --spiffe-id and --selector"
    )]
    NodeEntryIssuesNothing(&'static str),
    /// A node entry names a workload selector.
    #[error(
        "'{0}' is a workload selector, but a node entry takes only node selectors (x509pop, sshpop, k8s_psat, aws_iid), which a node attestor proves; give those instead"
    )]
    WorkloadSelectorInNodeEntry(String),
    /// A workload entry names a node selector.
    #[error(
        "'{0}' is a node selector, which only a node entry may name (`mayfly entry create --node`); a workload entry takes workload selectors such as unix:uid:1001"
    )]
    NodeSelectorInWorkloadEntry(String),
    /// An update that changes nothing.
    #[error(
        "the update names nothing to change; give at least one of --selector, --scope, --clear-scopes, --ttl, --jwt-ttl, --dns, --clear-dns, --hint"
    )]
    NothingToUpdate,
}

/// The rules an entry is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryRules<'a> {
    /// The server's trust domain.
    pub trust_domain: &'a TrustDomain,
    /// The issuance policy (which IDs are agents).
    pub policy: &'a IssuancePolicy,
    /// The shortest TTL an entry may have ([`MIN_TTL`] unless configured otherwise).
    pub min_ttl: Duration,
    /// The longest TTL an entry may have: min([`MAX_TTL`], ca_ttl / 6).
    pub max_ttl: Duration,
}

impl EntryRules<'_> {
    /// Checks a create request and builds the entry it describes: selectors, scopes and DNS
    /// names sorted and unique, the TTL filled in.
    ///
    /// # Errors
    /// The [`EntryError`] for the first rule the request breaks.
    pub(crate) fn validate(&self, req: &pb::CreateEntryRequest) -> Result<Entry, EntryError> {
        let td = self.trust_domain;
        let spiffe_id = SpiffeId::parse(&req.spiffe_id)?;
        spiffe_id.check_registrable(td)?;
        let (kind, parent_id) = if req.node {
            check_node_create(req)?;
            (EntryKind::Node, crate::wire::server_id(td))
        } else {
            let parent_id = SpiffeId::parse(&req.parent_id)?;
            // An agent, or an ID a node group may have (whether one exists is the admin
            // API's question: it needs the store).
            if !self.policy.is_agent_id(&parent_id) && parent_id.check_registrable(td).is_err() {
                return Err(EntryError::ParentNotAgent {
                    parent: parent_id,
                    td: td.clone(),
                });
            }
            (EntryKind::Workload, parent_id)
        };
        let selectors = check_selectors(&req.selectors)?;
        kind.check_selectors(&selectors)?;
        let scopes = check_scopes(&spiffe_id, &req.scopes)?;
        let ttl_secs = self.check_ttl(req.ttl_seconds)?;
        let jwt_ttl_secs = self.check_jwt_ttl(req.jwt_ttl_seconds)?;
        let dns_names = check_dns_names(&req.dns_names)?;
        let hint = check_hint(&req.hint)?;
        Ok(Entry {
            id: EntryId::generate(),
            spiffe_id,
            parent_id,
            selectors,
            scopes,
            ttl_secs,
            dns_names,
            created_at: unix_secs(SystemTime::now()),
            hint,
            jwt_ttl_secs,
        })
    }

    /// Checks an update request against the same rules as a create and returns `entry` with
    /// the changes applied. A list given replaces the entry's whole list; a field not given
    /// stays as it is. The ID, SPIFFE ID, parent and creation time never change.
    ///
    /// # Errors
    /// The [`EntryError`] for the first rule the request breaks;
    /// [`EntryError::NothingToUpdate`] when it names no change at all.
    pub(crate) fn apply_update(
        &self,
        mut entry: Entry,
        req: &pb::UpdateEntryRequest,
    ) -> Result<Entry, EntryError> {
        if req.selectors.is_none()
            && req.scopes.is_none()
            && req.ttl_seconds.is_none()
            && req.jwt_ttl_seconds.is_none()
            && req.dns_names.is_none()
            && req.hint.is_none()
        {
            return Err(EntryError::NothingToUpdate);
        }
        let kind = EntryKind::of(&entry);
        if kind == EntryKind::Node {
            check_node_update(req)?;
        }
        if let Some(list) = &req.selectors {
            entry.selectors = check_selectors(&list.values)?;
            kind.check_selectors(&entry.selectors)?;
        }
        if let Some(list) = &req.scopes {
            entry.scopes = check_scopes(&entry.spiffe_id, &list.values)?;
        }
        if let Some(ttl) = req.ttl_seconds {
            entry.ttl_secs = self.check_ttl(ttl)?;
        }
        if let Some(ttl) = req.jwt_ttl_seconds {
            entry.jwt_ttl_secs = self.check_jwt_ttl(ttl)?;
        }
        if let Some(list) = &req.dns_names {
            entry.dns_names = check_dns_names(&list.values)?;
        }
        if let Some(hint) = &req.hint {
            entry.hint = check_hint(hint)?;
        }
        Ok(entry)
    }

    /// The TTL to store for `asked` seconds (0: the default).
    fn check_ttl(&self, asked: u32) -> Result<u32, EntryError> {
        if asked == 0 {
            let (floor, ceiling) = self.ttl_bounds();
            let ttl = DEFAULT_TTL.as_secs().max(floor).min(ceiling);
            // At most MAX_TTL (3600 s), so it fits.
            return Ok(u32::try_from(ttl).unwrap_or(u32::MAX));
        }
        self.check_bounds(asked, "TTL", "--ttl")
    }

    /// The JWT TTL to store for `asked` seconds: 0 stays 0 (the server's default at issuance,
    /// [`DEFAULT_JWT_TTL`]), anything else is held to the same floor and ceiling as the TTL,
    /// since a JWT-SVID is signed by the same CA journal's keys and renewed the same way.
    fn check_jwt_ttl(&self, asked: u32) -> Result<u32, EntryError> {
        if asked == 0 {
            return Ok(0);
        }
        self.check_bounds(asked, "JWT TTL", "--jwt-ttl")
    }

    /// The lowest and highest TTL an entry may have, in seconds.
    fn ttl_bounds(&self) -> (u64, u64) {
        (self.min_ttl.as_secs(), self.max_ttl.min(MAX_TTL).as_secs())
    }

    /// `asked` (not 0) when it is within [`Self::ttl_bounds`].
    fn check_bounds(
        &self,
        asked: u32,
        what: &'static str,
        flag: &'static str,
    ) -> Result<u32, EntryError> {
        let (floor, ceiling) = self.ttl_bounds();
        match u64::from(asked) {
            t if t > ceiling => Err(EntryError::TtlAboveCeiling {
                what,
                flag,
                asked: t,
                ceiling,
            }),
            t if t < floor => Err(EntryError::TtlBelowFloor {
                what,
                asked: t,
                floor,
            }),
            _ => Ok(asked),
        }
    }
}

/// The scopes an entry with `spiffe_id` may grant: at most [`MAX_ENTRY_SCOPES`], each valid,
/// and all of them together still within the SPIFFE ID length limit.
fn check_scopes(spiffe_id: &SpiffeId, texts: &[String]) -> Result<ScopeSet, EntryError> {
    if texts.len() > MAX_ENTRY_SCOPES {
        return Err(EntryError::TooManyScopes(texts.len()));
    }
    let scopes = parse_scopes(texts).map_err(EntryError::Scope)?;
    match ScopedId::new(spiffe_id.clone(), scopes.clone()) {
        Ok(_) => Ok(scopes),
        Err(IdError::TooLong(len)) => Err(EntryError::ScopesTooLong(len)),
        Err(e) => Err(e.into()),
    }
}

/// A hint as stored: at most [`MAX_HINT_CHARS`] characters, none that a terminal would act on
/// or that hides text (the same characters [`crate::text::escape`] escapes). Workloads show it
/// to people choosing an identity, so it is refused rather than escaped.
fn check_hint(hint: &str) -> Result<String, EntryError> {
    let chars = hint.chars().count();
    if chars > MAX_HINT_CHARS {
        return Err(EntryError::HintTooLong(chars));
    }
    if hint.chars().any(crate::text::needs_escape) {
        return Err(EntryError::HintUnprintable(
            escape_bounded(hint, SHOWN_CHARS).into_owned(),
        ));
    }
    Ok(hint.to_owned())
}

fn check_selectors(texts: &[String]) -> Result<Vec<Selector>, EntryError> {
    if texts.is_empty() {
        return Err(EntryError::NoSelectors);
    }
    if texts.len() > MAX_ENTRY_SELECTORS {
        return Err(EntryError::TooManySelectors(texts.len()));
    }
    let mut selectors = texts
        .iter()
        .map(|s| Selector::parse(s).map_err(EntryError::Selector))
        .collect::<Result<Vec<_>, _>>()?;
    selectors.sort();
    selectors.dedup();
    Ok(selectors)
}

fn check_dns_names(names: &[String]) -> Result<Vec<String>, EntryError> {
    if names.len() > MAX_ENTRY_DNS_NAMES {
        return Err(EntryError::TooManyDnsNames(names.len()));
    }
    for name in names {
        dns_name::check(name)?;
    }
    let mut names = names.to_vec();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_floor_and_ceiling() {
        let td = TrustDomain::new("acme.test").unwrap();
        let policy = IssuancePolicy::new(td.clone());
        let r = EntryRules {
            trust_domain: &td,
            policy: &policy,
            min_ttl: MIN_TTL,
            max_ttl: MAX_TTL,
        };
        assert_eq!(r.check_ttl(0).unwrap(), 300);
        assert_eq!(r.check_ttl(30).unwrap(), 30);
        assert_eq!(r.check_ttl(3600).unwrap(), 3600);
        assert!(matches!(
            r.check_ttl(29),
            Err(EntryError::TtlBelowFloor {
                asked: 29,
                floor: 30,
                ..
            })
        ));
        assert!(matches!(
            r.check_ttl(1),
            Err(EntryError::TtlBelowFloor { .. })
        ));
        assert!(matches!(
            r.check_ttl(3601),
            Err(EntryError::TtlAboveCeiling {
                asked: 3601,
                ceiling: 3600,
                ..
            })
        ));
        // A floor configured above the default TTL raises the default with it.
        let high = EntryRules {
            min_ttl: Duration::from_secs(600),
            ..r
        };
        assert_eq!(high.check_ttl(0).unwrap(), 600);
        // The JWT TTL keeps 0 (the server's default) and is held to the same bounds.
        assert_eq!(r.check_jwt_ttl(0).unwrap(), 0);
        assert_eq!(r.check_jwt_ttl(60).unwrap(), 60);
        let above = r.check_jwt_ttl(3601).unwrap_err().to_string();
        assert!(
            above.contains("JWT TTL of 3601s") && above.contains("--jwt-ttl"),
            "{above}"
        );
        assert!(r.check_jwt_ttl(29).is_err());
    }

    #[test]
    fn a_hint_is_a_short_printable_label() {
        assert_eq!(check_hint("").unwrap(), "");
        assert_eq!(
            check_hint("read-replica (eu)").unwrap(),
            "read-replica (eu)"
        );
        assert_eq!(check_hint(&"é".repeat(64)).unwrap().chars().count(), 64);
        assert!(matches!(
            check_hint(&"a".repeat(65)),
            Err(EntryError::HintTooLong(65))
        ));
        for bad in ["a\nb", "bell\u{7}", "rtl\u{202e}x", "zero\u{200b}width"] {
            assert!(
                matches!(check_hint(bad), Err(EntryError::HintUnprintable(_))),
                "{bad:?}"
            );
        }
    }
}
