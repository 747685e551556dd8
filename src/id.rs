//! SPIFFE IDs, trust domains and scopes: parsing, validation and the scope encoding.
//!
//! Every type here is valid by construction: the only way to get a [`SpiffeId`], a
//! [`TrustDomain`] or a [`Scope`] is through a constructor that enforces the SPIFFE ID
//! specification (and Mayfly's scope grammar). Nothing is normalised: an input that is not
//! already in canonical form is rejected, so the string an operator typed is the string that is
//! signed, stored and compared.
//!
//! A scoped identity carries its scopes inside the one URI SAN the X509-SVID spec allows:
//! `spiffe://acme.test/agents/billing-bot/scope/stripe.read.customers/stripe.write.refunds`.
//! The path segment `scope` is reserved in registered IDs, so the first `/scope/` splits the
//! identity from its scopes without ambiguity.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID, in bytes, that the SPIFFE ID specification lets a tool refuse above.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The path segment that separates an identity from its scopes.
pub const SCOPE_MARK: &str = "scope";
/// The first path segment reserved for Mayfly's own identities (agents, servers).
pub const RESERVED_PREFIX: &str = "mayfly";
/// The most tokens one scope may have (`a:b:c:d:e:f:g:h`).
pub const MAX_SCOPE_TOKENS: usize = 8;
/// The longest token of a scope, in bytes.
pub const MAX_SCOPE_TOKEN_LEN: usize = 64;

const SCHEME: &str = "spiffe://";
/// How much of a refused input an [`IdError`] repeats.
const SHOWN_CHARS: usize = 256;

/// A refused input as an error repeats it: escaped and bounded, since it may hold anything
/// (line breaks, terminal escapes, megabytes) and errors reach logs, audit records and
/// terminals.
fn shown(input: &str) -> String {
    crate::text::escape_bounded(input, SHOWN_CHARS).into_owned()
}

/// Why a SPIFFE ID, trust domain or scope was refused. A refused input is held escaped and
/// bounded (at most 256 characters of escaped text and a note of how much was cut), so the
/// message is safe to log, audit or print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input was empty.
    #[error("the SPIFFE ID is empty; give one like spiffe://example.org/service")]
    Empty,
    /// The input did not start with the lowercase `spiffe://` scheme.
    #[error("'{0}' is not a SPIFFE ID: it must start with 'spiffe://' (lowercase)")]
    WrongScheme(String),
    /// The trust domain part was empty.
    #[error("'{0}' has no trust domain: write spiffe://<trust-domain>/<path>")]
    MissingTrustDomain(String),
    /// The trust domain contained a character outside `[a-z0-9.-_]`.
    #[error(
        "trust domain '{0}' has a character that is not allowed: only lowercase letters, digits, '.', '-' and '_' (no port, no user info, no uppercase)"
    )]
    BadTrustDomainChar(String),
    /// The trust domain was longer than 255 bytes.
    #[error("trust domain is {0} bytes long; the limit is 255")]
    TrustDomainTooLong(usize),
    /// The whole ID was longer than 2048 bytes.
    #[error("the SPIFFE ID is {0} bytes long; the limit is 2048")]
    TooLong(usize),
    /// A path segment was empty (`//` or a trailing `/`).
    #[error("'{0}' has an empty path segment ('//' or a trailing '/'); remove it")]
    EmptySegment(String),
    /// A path segment was `.` or `..`.
    #[error("'{0}' has a '.' or '..' path segment, which SPIFFE IDs forbid")]
    DotSegment(String),
    /// A path segment contained a character outside `[A-Za-z0-9.-_]` (this also refuses
    /// percent-encoding, queries and fragments).
    #[error(
        "'{0}' has a path character that is not allowed: only letters, digits, '.', '-' and '_' (no percent-encoding, query or fragment)"
    )]
    BadPathChar(String),
    /// A registered identity named the reserved `scope` segment.
    #[error(
        "'{0}' contains the path segment 'scope', which Mayfly reserves for the scopes it adds; rename that segment"
    )]
    ReservedScopeSegment(String),
    /// A registered identity started with the reserved `/mayfly/` prefix.
    #[error(
        "'{0}' starts with '/mayfly/', which is reserved for Mayfly's agents and servers; choose another path"
    )]
    ReservedPrefix(String),
    /// A workload identity had no path (the trust domain's own ID names no workload).
    #[error("'{0}' names a trust domain, not a workload; add a path such as /agents/billing-bot")]
    RootId(String),
    /// The ID belongs to another trust domain than the one expected.
    #[error("'{id}' is not in trust domain '{expected}'")]
    ForeignTrustDomain {
        /// The ID that was given.
        id: String,
        /// The trust domain it had to be in.
        expected: String,
    },
    /// A scope did not match the grammar.
    #[error(
        "'{0}' is not a valid scope: write 1 to 8 tokens of lowercase letters, digits, '_' or '-' separated by ':' (e.g. stripe:read:customers)"
    )]
    BadScope(String),
    /// The scope segments of an ID were not in strictly ascending order, or repeated.
    #[error("'{0}' lists its scopes out of order or twice; scopes are sorted and unique")]
    UnsortedScopes(String),
    /// The `scope` mark was followed by no scope.
    #[error("'{0}' has the 'scope' mark but no scope after it")]
    EmptyScopeList(String),
}

/// A SPIFFE trust domain name, such as `acme.test`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name (without the scheme).
    ///
    /// # Errors
    /// [`IdError::MissingTrustDomain`], [`IdError::BadTrustDomainChar`] or
    /// [`IdError::TrustDomainTooLong`] when the name breaks the SPIFFE ID spec.
    pub fn new(name: &str) -> Result<Self, IdError> {
        if name.is_empty() {
            return Err(IdError::MissingTrustDomain(shown(name)));
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdError::TrustDomainTooLong(name.len()));
        }
        if !name.bytes().all(is_trust_domain_byte) {
            return Err(IdError::BadTrustDomainChar(shown(name)));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name, such as `acme.test`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            text: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }

    /// Builds the ID `spiffe://<name><path>` from a path such as `/agents/bot` (or the trust
    /// domain's own ID from an empty path).
    ///
    /// # Errors
    /// The same path errors as [`SpiffeId::parse`], and [`IdError::BadPathChar`] for a path
    /// that does not start with `/` (it would otherwise extend the trust domain name:
    /// `acme.test` + `evil/x` is `spiffe://acme.testevil/x`).
    pub fn join(&self, path: &str) -> Result<SpiffeId, IdError> {
        if !path.is_empty() && !path.starts_with('/') {
            return Err(IdError::BadPathChar(shown(path)));
        }
        SpiffeId::parse(&format!("{SCHEME}{}{path}", self.0))
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    /// Accepts a bare name (`acme.test`) or the trust domain's ID (`spiffe://acme.test`).
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s.strip_prefix(SCHEME) {
            Some(rest) => Self::new(rest),
            None => Self::new(s),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

fn is_trust_domain_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

/// A SPIFFE ID, `spiffe://<trust domain><path>`, validated against the SPIFFE ID spec.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    text: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID strictly: lowercase scheme and trust domain, path segments of
    /// `[A-Za-z0-9.-_]` with no empty, `.` or `..` segment, no trailing slash, no
    /// percent-encoding, query, fragment, port or user info, at most 2048 bytes.
    ///
    /// # Errors
    /// The [`IdError`] variant naming the first rule the input breaks.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdError::WrongScheme(shown(s)))?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let td = &rest[..td_len];
        if td.is_empty() {
            return Err(IdError::MissingTrustDomain(shown(s)));
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdError::TrustDomainTooLong(td.len()));
        }
        if !td.bytes().all(is_trust_domain_byte) {
            return Err(IdError::BadTrustDomainChar(shown(td)));
        }
        let path = &rest[td_len..];
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(IdError::EmptySegment(shown(s)));
                }
                if segment == "." || segment == ".." {
                    return Err(IdError::DotSegment(shown(s)));
                }
                if !segment.bytes().all(is_path_byte) {
                    return Err(IdError::BadPathChar(shown(s)));
                }
            }
        }
        Ok(Self {
            text: s.to_owned(),
            td_end: SCHEME.len() + td_len,
        })
    }

    /// The whole ID as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The trust domain name, such as `acme.test`.
    pub fn trust_domain_name(&self) -> &str {
        &self.text[SCHEME.len()..self.td_end]
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, such as `/agents/bot`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.text[self.td_end..]
    }

    /// The path segments in order (none for a trust domain's own ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        let path = self.path();
        path.get(1..)
            .unwrap_or("")
            .split('/')
            .filter(|s| !s.is_empty())
    }

    /// Whether this ID is a trust domain's own ID, with no path.
    pub fn is_root(&self) -> bool {
        self.path().is_empty()
    }

    /// Whether `self` is `other` or below it on whole path segments (`/a/b` is under `/a`,
    /// `/ab` is not), in the same trust domain.
    pub fn is_under(&self, other: &SpiffeId) -> bool {
        self.text == other.text
            || (self.text.starts_with(&other.text)
                && self.text.as_bytes().get(other.text.len()) == Some(&b'/'))
    }

    /// Checks that this ID may be registered as a workload identity in `td`: in that trust
    /// domain, with a path, no reserved `scope` segment and not under `/mayfly/`.
    ///
    /// # Errors
    /// [`IdError::ForeignTrustDomain`], [`IdError::RootId`],
    /// [`IdError::ReservedScopeSegment`] or [`IdError::ReservedPrefix`].
    pub fn check_registrable(&self, td: &TrustDomain) -> Result<(), IdError> {
        if self.trust_domain_name() != td.as_str() {
            return Err(IdError::ForeignTrustDomain {
                id: self.text.clone(),
                expected: td.to_string(),
            });
        }
        if self.is_root() {
            return Err(IdError::RootId(self.text.clone()));
        }
        if self.segments().any(|s| s == SCOPE_MARK) {
            return Err(IdError::ReservedScopeSegment(self.text.clone()));
        }
        if self.segments().next() == Some(RESERVED_PREFIX) {
            return Err(IdError::ReservedPrefix(self.text.clone()));
        }
        Ok(())
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.text)
    }
}

/// One permission, such as `stripe:read:customers`: 1 to 8 tokens of `[a-z0-9_-]`.
///
/// People write it with `:`; inside a SPIFFE ID path it is one segment with `.` instead, since
/// `:` is not allowed in a SPIFFE path and `.` is not allowed in a token (the mapping is exact
/// both ways).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope(String);

impl Scope {
    /// Parses the human form, `stripe:read:customers`.
    ///
    /// # Errors
    /// [`IdError::BadScope`] when the text breaks the grammar.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Self::parse_with(s, ':')
    }

    /// Parses the path-segment form used inside SPIFFE IDs, `stripe.read.customers`.
    ///
    /// # Errors
    /// [`IdError::BadScope`] when the segment breaks the grammar.
    pub fn from_segment(segment: &str) -> Result<Self, IdError> {
        Self::parse_with(segment, '.')
    }

    fn parse_with(s: &str, sep: char) -> Result<Self, IdError> {
        let bad = || IdError::BadScope(shown(s));
        let mut count = 0;
        for token in s.split(sep) {
            count += 1;
            if token.is_empty()
                || token.len() > MAX_SCOPE_TOKEN_LEN
                || !token
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
            {
                return Err(bad());
            }
        }
        if count > MAX_SCOPE_TOKENS {
            return Err(bad());
        }
        Ok(Self(s.replace(sep, ":")))
    }

    /// The human form, `stripe:read:customers`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path-segment form, `stripe.read.customers`.
    pub fn to_segment(&self) -> String {
        self.0.replace(':', ".")
    }
}

impl FromStr for Scope {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.0)
    }
}

/// A sorted, duplicate-free set of scopes.
pub type ScopeSet = BTreeSet<Scope>;

/// Parses a list of human-form scopes into a set.
///
/// # Errors
/// [`IdError::BadScope`] for the first malformed scope.
pub fn parse_scopes<S: AsRef<str>>(items: &[S]) -> Result<ScopeSet, IdError> {
    items.iter().map(|s| Scope::parse(s.as_ref())).collect()
}

/// A registered identity together with the scopes one credential grants: the SPIFFE ID of an
/// X509-SVID as Mayfly encodes it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScopedId {
    base: SpiffeId,
    scopes: ScopeSet,
    encoded: SpiffeId,
}

impl ScopedId {
    /// Combines an identity (which must not contain the `scope` segment) with scopes.
    ///
    /// # Errors
    /// [`IdError::ReservedScopeSegment`] when `base` has a `scope` segment, or
    /// [`IdError::TooLong`] when the encoded ID exceeds 2048 bytes.
    pub fn new(base: SpiffeId, scopes: ScopeSet) -> Result<Self, IdError> {
        if base.segments().any(|s| s == SCOPE_MARK) {
            return Err(IdError::ReservedScopeSegment(base.text.clone()));
        }
        let mut text = base.text.clone();
        if !scopes.is_empty() {
            text.push('/');
            text.push_str(SCOPE_MARK);
            // Sorted as the segments are written in the URI, not in the human form: ':' sorts
            // after the digits but '.' before them (`db.read` < `db2.read`, `db2:read` < `db:read`).
            let mut segments: Vec<String> = scopes.iter().map(Scope::to_segment).collect();
            segments.sort_unstable();
            for segment in &segments {
                text.push('/');
                text.push_str(segment);
            }
        }
        if text.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(text.len()));
        }
        let encoded = SpiffeId {
            text,
            td_end: base.td_end,
        };
        Ok(Self {
            base,
            scopes,
            encoded,
        })
    }

    /// Splits an SVID's SPIFFE ID at its first `scope` segment. An ID without one carries no
    /// scopes. The scopes must be in canonical order (unique, segments sorted bytewise as
    /// written in the URI): a verifier never re-orders what was signed.
    ///
    /// # Errors
    /// [`IdError::EmptyScopeList`], [`IdError::BadScope`] or [`IdError::UnsortedScopes`].
    pub fn from_spiffe_id(id: &SpiffeId) -> Result<Self, IdError> {
        let path = id.path();
        let marker = format!("/{SCOPE_MARK}");
        let split = path
            .match_indices(&marker)
            .map(|(i, _)| i)
            .find(|&i| matches!(path.as_bytes().get(i + marker.len()), None | Some(b'/')));
        let Some(at) = split else {
            return Ok(Self {
                base: id.clone(),
                scopes: ScopeSet::new(),
                encoded: id.clone(),
            });
        };
        let base = SpiffeId {
            text: id.text[..id.td_end + at].to_owned(),
            td_end: id.td_end,
        };
        let tail = &path[at + marker.len()..];
        if tail.is_empty() {
            return Err(IdError::EmptyScopeList(id.text.clone()));
        }
        let mut scopes = ScopeSet::new();
        let mut previous: Option<&str> = None;
        for segment in tail[1..].split('/') {
            let scope = Scope::from_segment(segment)?;
            // Compare the segments as written (the order `new` writes them in).
            if previous.is_some_and(|p| p >= segment) {
                return Err(IdError::UnsortedScopes(id.text.clone()));
            }
            previous = Some(segment);
            scopes.insert(scope);
        }
        Ok(Self {
            base,
            scopes,
            encoded: id.clone(),
        })
    }

    /// The registered identity, without scopes.
    pub fn base(&self) -> &SpiffeId {
        &self.base
    }

    /// The scopes this credential grants.
    pub fn scopes(&self) -> &ScopeSet {
        &self.scopes
    }

    /// Whether this credential grants `scope` (exact match: `read` does not grant
    /// `read-admin`).
    pub fn grants(&self, scope: &Scope) -> bool {
        self.scopes.contains(scope)
    }

    /// The encoded SPIFFE ID that goes in the certificate's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.encoded
    }
}

impl fmt::Display for ScopedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encoded.as_str())
    }
}

impl fmt::Debug for ScopedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopedId({})", self.encoded.as_str())
    }
}
