//! Why a `k8s_psat` token, JWKS or cluster configuration was refused, and how each reason
//! reaches the node API as an [`AttestError`].

use super::NAME;
use crate::node::AttestError;

/// Why a token, a JWKS or a cluster configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum K8sPsatError {
    /// A cluster's configuration cannot be used.
    #[error("the k8s_psat cluster configuration is invalid: {0}")]
    BadCluster(String),
    /// A JWKS document cannot be used; the keys held before stay.
    #[error("the JWKS document is unusable: {0}; fix the cluster's jwks file or URL")]
    BadJwks(String),
    /// The evidence names a cluster the server does not trust.
    #[error("the cluster {0} is not one this server trusts; use a configured cluster name")]
    UnknownCluster(String),
    /// The evidence or token is not of the expected form.
    #[error("{0}")]
    Malformed(String),
    /// The token's algorithm is not RS256 or ES256 (`none` and HMAC included).
    #[error("the token's algorithm {0} is refused; only RS256 and ES256 are accepted")]
    Alg(String),
    /// The token's header names no key.
    #[error("the token's header names no key (kid)")]
    MissingKid,
    /// The cluster's JWKS holds no key of that ID.
    #[error("the token's key {kid} is not in the JWKS of cluster {cluster}")]
    UnknownKid {
        /// The key ID, escaped.
        kid: String,
        /// The cluster.
        cluster: String,
    },
    /// The token's algorithm does not fit the type of the key it names.
    #[error("the token says {alg} but its key {kid} is not a key for {alg}")]
    AlgMismatch {
        /// The token's algorithm.
        alg: &'static str,
        /// The key ID, escaped.
        kid: String,
    },
    /// The signature does not verify with the key named.
    #[error("the token's signature does not verify with its key")]
    BadSignature,
    /// `iss` is not the cluster's issuer.
    #[error("the token's issuer {got} is not the issuer of cluster {cluster}")]
    WrongIssuer {
        /// The token's issuer, escaped.
        got: String,
        /// The cluster.
        cluster: String,
    },
    /// `aud` does not hold the configured audience.
    #[error("the token is not for the audience {0}; project a token with that audience")]
    WrongAudience(String),
    /// `exp` is missing or has passed.
    #[error("the token expired {0}s ago")]
    Expired(u64),
    /// `nbf` or `iat` is further ahead than the allowed skew.
    #[error("the token's {claim} is {ahead}s ahead of the server's clock")]
    NotYetValid {
        /// `nbf` or `iat`.
        claim: &'static str,
        /// By how much, in seconds.
        ahead: u64,
    },
    /// A required claim is missing.
    #[error("the token has no {0} claim; attestation needs a token bound to a pod and a node")]
    MissingClaim(&'static str),
    /// The token's service account is not on the cluster's allow-list.
    #[error("the service account {0} is not allowed to attest in cluster {1}")]
    NotAllowed(String, String),
    /// A claim's value cannot become a node ID or selector.
    #[error("the token's {claim} {value} cannot be used in a node ID or selector")]
    BadValue {
        /// Which claim.
        claim: &'static str,
        /// Its value, escaped.
        value: String,
    },
    /// The agent could not read its token.
    #[error("the service account token {path} could not be read: {reason}")]
    Unreadable {
        /// The token file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl K8sPsatError {
    pub(super) fn into_attest(self) -> AttestError {
        let reason = self.to_string();
        match self {
            Self::Malformed(_) => AttestError::Malformed {
                attestor: NAME,
                reason,
            },
            Self::Unreadable { .. } => AttestError::Unavailable {
                attestor: NAME,
                reason,
            },
            _ => AttestError::Refused {
                attestor: NAME,
                reason,
            },
        }
    }
}

/// Untrusted text in errors: printable and short.
pub(super) fn shown(text: &str) -> String {
    let mut out: String = text.chars().take(80).flat_map(char::escape_debug).collect();
    if text.chars().count() > 80 {
        out.push('…');
    }
    out
}
