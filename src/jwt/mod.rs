//! JWT-SVIDs (SPIFFE JWT-SVID profile): ES256 tokens signed by a server's JWT key, published
//! in the bundle as JSON Web Keys with `use: jwt-svid`, and validated by the agent
//! (`ValidateJWTSVID`), the proxy (bearer tokens) and anyone holding the JWKS.
//!
//! The module is small on purpose: one signing algorithm (ES256), one key type (P-256), one
//! audience per token. Everything a validator accepts is decided in [`validate`]; a token that
//! does not fit the profile exactly is refused with the reason an operator needs.
//!
//! - [`key`]: signing keys, public keys, their `kid`, and the JWKS forms.
//! - [`claims`]: what a token says, and how one is signed.
//! - [`validate`]: the validator.

pub mod claims;
pub mod key;
pub mod validate;

pub use claims::{Claims, TokenKind};
pub use key::{JwtBundle, JwtBundles, JwtKey, JwtSigner};
pub use validate::{MAX_TOKEN_LEN, Validated, validate};

/// Why a JWT-SVID was refused, or a key or bundle could not be used. Each variant's text is one
/// sentence that names what was wrong, so a proxy can return it as the reason of a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The token is longer than any JWT-SVID Mayfly issues.
    #[error("the token is {0} bytes long, over the {max}-byte limit of a JWT-SVID", max = MAX_TOKEN_LEN)]
    TooLong(usize),
    /// The token is not three base64url parts separated by dots.
    #[error("the token is not a compact JWS ({0})")]
    Malformed(&'static str),
    /// The header names no algorithm, or `none`.
    #[error("the token is unsigned (alg none); only ES256 is accepted")]
    AlgNone,
    /// The header names an HMAC algorithm (anyone holding the public key could forge it).
    #[error("the token is HMAC-signed ({0}); only ES256 is accepted")]
    AlgHmac(String),
    /// The header names another signature algorithm.
    #[error("the token's algorithm {0} is not accepted; only ES256 is")]
    AlgUnsupported(String),
    /// The header has no `kid`.
    #[error("the token's header names no key (kid)")]
    MissingKid,
    /// No bundle for the token's trust domain holds its `kid`.
    #[error("the token's key {kid} is not in the JWT bundle of {trust_domain}")]
    UnknownKid {
        /// The key ID, escaped.
        kid: String,
        /// The trust domain of the token's subject.
        trust_domain: String,
    },
    /// No JWT bundle is held for the token's trust domain.
    #[error("no JWT bundle is held for the trust domain {0}")]
    UnknownTrustDomain(String),
    /// The signature does not verify with the named key.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// A required claim is absent or of the wrong type.
    #[error("the token's {0} claim is missing or malformed")]
    BadClaim(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("the token's subject is not a SPIFFE ID: {0}")]
    BadSubject(String),
    /// `exp` has passed.
    #[error("the token expired {0}s ago")]
    Expired(u64),
    /// `nbf` is in the future.
    #[error("the token is not valid for another {0}s (nbf)")]
    NotYetValid(u64),
    /// `aud` names several audiences: a JWT-SVID here is for exactly one.
    #[error("the token names {0} audiences; a JWT-SVID accepted here names exactly one")]
    SeveralAudiences(usize),
    /// `aud` is not the expected audience.
    #[error("the token is for the audience {got}, not {want}")]
    WrongAudience {
        /// The token's audience, escaped.
        got: String,
        /// The expected one.
        want: String,
    },
    /// The `scope` claim does not match the scopes encoded in `sub`.
    #[error("the token's scope claim does not match the scopes of its subject")]
    ScopeMismatch,
    /// A key could not be made, read or used.
    #[error("the JWT signing key is unusable: {0}")]
    Key(&'static str),
    /// A JWKS document could not be read.
    #[error("the JWT bundle is not a JWKS document: {0}")]
    BadJwks(String),
}

/// Strings from a token end up in errors, logs and HTTP answers: keep them short and printable.
fn shown(text: &str) -> String {
    crate::text::escape_bounded(text, 80).into_owned()
}
