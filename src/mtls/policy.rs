//! Who may connect: the SPIFFE IDs a peer may have and the scopes its SVID must carry.
//!
//! An [`IdPattern`] is matched against the peer's *identity* — its SPIFFE ID without the
//! `/scope/...` tail Mayfly appends — and the required scopes against the scopes in that tail,
//! exactly (`db:read` is not granted by `db:read-admin`, `db:read:all` or `db`).

use std::fmt;
use std::str::FromStr;

use crate::id::{IdError, SCOPE_MARK, Scope, ScopeSet, ScopedId, SpiffeId};

/// The suffix that turns a SPIFFE ID into a prefix pattern.
const WILDCARD_SUFFIX: &str = "/*";

/// Why a policy could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The pattern (without a trailing `/*`) was not a valid SPIFFE ID.
    #[error("'{pattern}' is not a SPIFFE ID pattern")]
    BadId {
        /// The pattern as given.
        pattern: String,
        /// Why its ID part was refused.
        source: IdError,
    },
    /// A `*` appeared anywhere but as the whole last path segment.
    #[error(
        "'{0}' has a '*' that is not the whole last path segment; write spiffe://<td>/<path>/* to allow everything below a path"
    )]
    MisplacedWildcard(String),
    /// An exact pattern named a trust domain's own ID, which no SVID carries.
    #[error(
        "'{0}' names a trust domain, not a workload, so no SVID can match it; write spiffe://<td>/* to allow the whole trust domain"
    )]
    RootId(String),
    /// The pattern contained the `scope` segment; patterns match identities without their
    /// scopes, so it could never match.
    #[error(
        "'{0}' contains the path segment 'scope'; patterns match the identity without its scopes, so require scopes separately"
    )]
    ScopeSegment(String),
    /// An allow list was empty; accepting any trusted ID must be asked for explicitly.
    #[error(
        "the list of allowed SPIFFE IDs is empty; give at least one, or use PeerPolicy::any_id() to accept any ID of a trusted trust domain"
    )]
    NoPatterns,
}

/// Why an authenticated peer was refused by a [`PeerPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer's identity matched none of the allowed patterns.
    #[error(
        "the peer's SPIFFE ID '{id}' is not allowed: its identity '{base}' matches none of {allowed}"
    )]
    IdNotAllowed {
        /// The peer's whole SPIFFE ID, scopes included.
        id: String,
        /// The identity the patterns were matched against.
        base: String,
        /// The allowed patterns, comma-separated.
        allowed: String,
    },
    /// The peer's SVID lacked a scope the policy requires.
    #[error("the peer's SPIFFE ID '{id}' lacks the required scope '{scope}'")]
    MissingScope {
        /// The peer's whole SPIFFE ID, scopes included.
        id: String,
        /// The first missing scope.
        scope: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum PatternKind {
    /// The identity must equal the ID.
    Exact,
    /// The identity must be strictly below the ID, on whole path segments.
    Below,
}

/// An allowed SPIFFE ID: exact (`spiffe://td/agents/bot`), or every ID strictly below a path
/// on whole segments (`spiffe://td/agents/*` matches `/agents/a` and `/agents/a/b`, but neither
/// `/agents` nor `/agentsx`). `spiffe://td/*` matches every workload of trust domain `td`.
/// Matching is byte-exact: SPIFFE paths are case-sensitive.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdPattern {
    id: SpiffeId,
    kind: PatternKind,
}

impl IdPattern {
    /// Parses `spiffe://td/path` (exact) or `spiffe://td/path/*` / `spiffe://td/*` (below).
    ///
    /// # Errors
    /// [`PolicyError::BadId`], [`PolicyError::MisplacedWildcard`], [`PolicyError::RootId`] or
    /// [`PolicyError::ScopeSegment`].
    pub fn parse(pattern: &str) -> Result<Self, PolicyError> {
        let (text, kind) = match pattern.strip_suffix(WILDCARD_SUFFIX) {
            Some(prefix) => (prefix, PatternKind::Below),
            None => (pattern, PatternKind::Exact),
        };
        if text.contains('*') {
            return Err(PolicyError::MisplacedWildcard(pattern.to_owned()));
        }
        let id = SpiffeId::parse(text).map_err(|source| PolicyError::BadId {
            pattern: pattern.to_owned(),
            source,
        })?;
        match kind {
            PatternKind::Exact => Self::exact(id),
            PatternKind::Below => Self::below(id),
        }
    }

    /// Exactly `id`.
    ///
    /// # Errors
    /// [`PolicyError::RootId`] for a trust domain's own ID, [`PolicyError::ScopeSegment`] for
    /// an ID with a `scope` segment.
    pub fn exact(id: SpiffeId) -> Result<Self, PolicyError> {
        if id.is_root() {
            return Err(PolicyError::RootId(id.to_string()));
        }
        Self::checked(id, PatternKind::Exact)
    }

    /// Every ID strictly below `prefix` on whole segments; a trust domain's own ID as `prefix`
    /// means every workload of that trust domain.
    ///
    /// # Errors
    /// [`PolicyError::ScopeSegment`] for a prefix with a `scope` segment.
    pub fn below(prefix: SpiffeId) -> Result<Self, PolicyError> {
        Self::checked(prefix, PatternKind::Below)
    }

    fn checked(id: SpiffeId, kind: PatternKind) -> Result<Self, PolicyError> {
        if id.segments().any(|s| s == SCOPE_MARK) {
            let shown = Self { id, kind }.to_string();
            return Err(PolicyError::ScopeSegment(shown));
        }
        Ok(Self { id, kind })
    }

    /// Whether `identity` (an ID without its scopes) matches.
    pub fn matches(&self, identity: &SpiffeId) -> bool {
        let want = self.id.as_str();
        let have = identity.as_str();
        match self.kind {
            PatternKind::Exact => have == want,
            PatternKind::Below => {
                have.len() > want.len()
                    && have.starts_with(want)
                    && have.as_bytes()[want.len()] == b'/'
            }
        }
    }
}

impl FromStr for IdPattern {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Self::parse(s)
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PatternKind::Exact => f.write_str(self.id.as_str()),
            PatternKind::Below => write!(f, "{}{WILDCARD_SUFFIX}", self.id),
        }
    }
}

impl fmt::Debug for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPattern({self})")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AllowedIds {
    /// Any ID of a trust domain whose bundle the source holds.
    AnyTrusted,
    /// IDs matching one of these (never empty).
    Patterns(Vec<IdPattern>),
}

/// What a peer must be to complete a handshake: an allowed SPIFFE ID and the required scopes.
///
/// Built with [`PeerPolicy::ids`] (an explicit allow list), [`PeerPolicy::exact`] (one peer,
/// the usual expectation of a client), or [`PeerPolicy::any_id`] (any ID of a trust domain
/// the source holds a bundle for — federated ones included — asked for by name, never a
/// default). Scopes are added with [`PeerPolicy::require_scope`]; every one is required.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    ids: AllowedIds,
    required_scopes: ScopeSet,
}

impl PeerPolicy {
    /// Accepts any SPIFFE ID of a trust domain the source holds a bundle for. The chain must
    /// still lead to that trust domain's own roots.
    pub fn any_id() -> Self {
        Self {
            ids: AllowedIds::AnyTrusted,
            required_scopes: ScopeSet::new(),
        }
    }

    /// Accepts the IDs matching at least one of `patterns`.
    ///
    /// # Errors
    /// [`PolicyError::NoPatterns`] when `patterns` is empty.
    pub fn ids(patterns: impl IntoIterator<Item = IdPattern>) -> Result<Self, PolicyError> {
        let patterns: Vec<IdPattern> = patterns.into_iter().collect();
        if patterns.is_empty() {
            return Err(PolicyError::NoPatterns);
        }
        Ok(Self {
            ids: AllowedIds::Patterns(patterns),
            required_scopes: ScopeSet::new(),
        })
    }

    /// Parses each of `patterns` with [`IdPattern::parse`] and accepts the IDs matching one.
    ///
    /// # Errors
    /// The first pattern's [`PolicyError`], or [`PolicyError::NoPatterns`].
    pub fn parse_ids<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PolicyError> {
        let parsed = patterns
            .iter()
            .map(|p| IdPattern::parse(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::ids(parsed)
    }

    /// Accepts exactly the identity `id` (whatever scopes it carries, unless some are
    /// required).
    ///
    /// # Errors
    /// As [`IdPattern::exact`].
    pub fn exact(id: SpiffeId) -> Result<Self, PolicyError> {
        Self::ids([IdPattern::exact(id)?])
    }

    /// Also requires `scope`.
    #[must_use]
    pub fn require_scope(mut self, scope: Scope) -> Self {
        self.required_scopes.insert(scope);
        self
    }

    /// Also requires every one of `scopes`.
    #[must_use]
    pub fn require_scopes(mut self, scopes: impl IntoIterator<Item = Scope>) -> Self {
        self.required_scopes.extend(scopes);
        self
    }

    /// The allowed patterns; `None` for [`PeerPolicy::any_id`].
    pub fn allowed_ids(&self) -> Option<&[IdPattern]> {
        match &self.ids {
            AllowedIds::AnyTrusted => None,
            AllowedIds::Patterns(p) => Some(p),
        }
    }

    /// The scopes a peer must carry, all of them.
    pub fn required_scopes(&self) -> &ScopeSet {
        &self.required_scopes
    }

    /// Authorizes an authenticated peer: its identity (the ID without scopes) against the
    /// allowed IDs, then each required scope, exactly.
    ///
    /// # Errors
    /// [`Refusal::IdNotAllowed`] or [`Refusal::MissingScope`] (the first missing, in order).
    pub fn authorize(&self, peer: &ScopedId) -> Result<(), Refusal> {
        if let AllowedIds::Patterns(patterns) = &self.ids
            && !patterns.iter().any(|p| p.matches(peer.base()))
        {
            return Err(Refusal::IdNotAllowed {
                id: peer.to_string(),
                base: peer.base().to_string(),
                allowed: patterns
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if let Some(missing) = self.required_scopes.iter().find(|s| !peer.grants(s)) {
            return Err(Refusal::MissingScope {
                id: peer.to_string(),
                scope: missing.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::parse_scopes;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn scoped(s: &str) -> ScopedId {
        ScopedId::from_spiffe_id(&id(s)).unwrap()
    }

    #[test]
    fn patterns_match_whole_segments() {
        let p = IdPattern::parse("spiffe://a.test/agents/*").unwrap();
        assert!(p.matches(&id("spiffe://a.test/agents/x")));
        assert!(p.matches(&id("spiffe://a.test/agents/x/y")));
        assert!(!p.matches(&id("spiffe://a.test/agents")));
        assert!(!p.matches(&id("spiffe://a.test/agentsx")));
        assert!(!p.matches(&id("spiffe://a.test/agentsx/y")));
        assert!(!p.matches(&id("spiffe://a.test/Agents/x")));
        assert!(!p.matches(&id("spiffe://b.test/agents/x")));
        assert!(!p.matches(&id("spiffe://a.testx/agents/x")));
        assert_eq!(p.to_string(), "spiffe://a.test/agents/*");

        let td = IdPattern::parse("spiffe://a.test/*").unwrap();
        assert!(td.matches(&id("spiffe://a.test/x")));
        assert!(!td.matches(&id("spiffe://a.testx/x")));
        assert!(!td.matches(&id("spiffe://a.test")));

        let exact = IdPattern::parse("spiffe://a.test/agents/bot").unwrap();
        assert!(exact.matches(&id("spiffe://a.test/agents/bot")));
        assert!(!exact.matches(&id("spiffe://a.test/agents/bot/x")));
        assert!(!exact.matches(&id("spiffe://a.test/agents/bo")));
        assert!(!exact.matches(&id("spiffe://a.test/agents/Bot")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for (p, want) in [
            ("spiffe://a.test/agents*", "MisplacedWildcard"),
            ("spiffe://a.test/*/x", "MisplacedWildcard"),
            ("spiffe://a.test/a/**", "MisplacedWildcard"),
            ("spiffe://a.test/*/*", "MisplacedWildcard"),
            ("*", "MisplacedWildcard"),
            ("spiffe://a.test", "RootId"),
            ("spiffe://a.test/x/scope/db.read", "ScopeSegment"),
            ("spiffe://a.test/scope/*", "ScopeSegment"),
            ("spiffe://A.test/x", "BadId"),
            ("http://a.test/x", "BadId"),
            ("spiffe://a.test/x/", "BadId"),
            ("", "BadId"),
        ] {
            let err = IdPattern::parse(p).unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{p}: {err:?}");
        }
        assert_eq!(
            PeerPolicy::ids(Vec::new()).unwrap_err(),
            PolicyError::NoPatterns
        );
    }

    #[test]
    fn scopes_are_required_exactly_on_the_identity() {
        let policy = PeerPolicy::parse_ids(&["spiffe://a.test/bot"])
            .unwrap()
            .require_scopes(parse_scopes(&["db:read"]).unwrap());
        assert!(
            policy
                .authorize(&scoped("spiffe://a.test/bot/scope/db.read"))
                .is_ok()
        );
        assert!(
            policy
                .authorize(&scoped("spiffe://a.test/bot/scope/db.read/db.write"))
                .is_ok()
        );
        for refused in [
            "spiffe://a.test/bot",
            "spiffe://a.test/bot/scope/db.read-admin",
            "spiffe://a.test/bot/scope/db.read.all",
            "spiffe://a.test/bot/scope/db",
            "spiffe://a.test/bot/db.read",
            "spiffe://a.test/bot/x/scope/db.read",
            "spiffe://a.test/bo/scope/db.read",
        ] {
            assert!(policy.authorize(&scoped(refused)).is_err(), "{refused}");
        }
        let any = PeerPolicy::any_id();
        assert!(any.authorize(&scoped("spiffe://z.test/anything")).is_ok());
        assert!(any.allowed_ids().is_none());
    }
}
