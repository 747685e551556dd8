//! A projected service account token, read in the order that trusts nothing unverified: the
//! compact form and the header (RS256 or ES256, a `kid`) first, then the signature over exactly
//! the header and payload bytes, and only then the claims.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::jwks::{Alg, KeySet};
use super::{K8sPsatError, shown};

/// A token's header, checked.
#[derive(Debug)]
pub struct Header {
    /// The signature algorithm.
    pub alg: Alg,
    /// The key that signed it.
    pub kid: String,
}

/// A token split into its parts, with its header checked but its signature not yet.
#[derive(Debug)]
pub struct Unverified<'a> {
    /// The checked header.
    pub header: Header,
    /// `header.payload`, the bytes the signature covers.
    signing_input: &'a str,
    payload: &'a str,
    signature: Vec<u8>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

/// The claims of a projected service account token that attestation reads.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// The issuer.
    pub iss: Option<String>,
    /// The audiences.
    pub aud: Option<Audience>,
    /// Expiry, Unix seconds.
    pub exp: Option<u64>,
    /// Not before, Unix seconds.
    pub nbf: Option<u64>,
    /// Issued at, Unix seconds.
    pub iat: Option<u64>,
    /// The token's unique ID.
    pub jti: Option<String>,
    /// The pod binding.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: Option<Binding>,
}

/// `aud`: one audience or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single string.
    One(String),
    /// An array of strings.
    Many(Vec<String>),
}

impl Audience {
    /// Whether `audience` is among them.
    pub fn contains(&self, audience: &str) -> bool {
        match self {
            Self::One(one) => one == audience,
            Self::Many(many) => many.iter().any(|a| a == audience),
        }
    }
}

/// The `kubernetes.io` claim: what the token is bound to.
#[derive(Debug, Deserialize)]
pub struct Binding {
    /// The service account's namespace.
    pub namespace: Option<String>,
    /// The service account.
    pub serviceaccount: Option<Named>,
    /// The pod the token was issued for.
    pub pod: Option<Named>,
    /// The node that pod runs on.
    pub node: Option<Named>,
}

/// An object by name and UID.
#[derive(Debug, Deserialize)]
pub struct Named {
    /// Its name.
    pub name: Option<String>,
    /// Its UID.
    pub uid: Option<String>,
}

/// Splits `token` and checks its header.
///
/// # Errors
/// [`K8sPsatError::Malformed`] for a token that is not a compact JWS;
/// [`K8sPsatError::Alg`] for any algorithm but RS256 and ES256 (`none` and HMAC included);
/// [`K8sPsatError::MissingKid`]; [`K8sPsatError::Malformed`] for a `crit` header.
pub fn split(token: &str) -> Result<Unverified<'_>, K8sPsatError> {
    let malformed = |what: &'static str| K8sPsatError::Malformed(what.into());
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        return Err(malformed(
            "the token is not three base64url parts joined by dots",
        ));
    };
    let header_json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed("the token's header is not base64url"))?;
    let raw: RawHeader = serde_json::from_slice(&header_json)
        .map_err(|_| malformed("the token's header is not a JSON object"))?;
    let alg = match raw.alg.as_deref() {
        Some("RS256") => Alg::Rs256,
        Some("ES256") => Alg::Es256,
        other => return Err(K8sPsatError::Alg(shown(other.unwrap_or("(none given)")))),
    };
    if raw.crit.is_some() {
        return Err(malformed(
            "the token's header has critical extensions (crit), which are not understood here",
        ));
    }
    let kid = raw
        .kid
        .filter(|k| !k.is_empty())
        .ok_or(K8sPsatError::MissingKid)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| malformed("the token's signature is not base64url"))?;
    Ok(Unverified {
        header: Header { alg, kid },
        signing_input: &token[..header.len() + 1 + payload.len()],
        payload,
        signature,
    })
}

impl Unverified<'_> {
    /// Verifies the signature with `keys` and only then reads the claims.
    ///
    /// # Errors
    /// As [`KeySet::verify`]; [`K8sPsatError::Malformed`] when the verified payload is not the
    /// claims of a service account token.
    pub fn verify(self, keys: &KeySet) -> Result<Claims, K8sPsatError> {
        keys.verify(
            &self.header.kid,
            self.header.alg,
            self.signing_input.as_bytes(),
            &self.signature,
        )?;
        let payload = URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| K8sPsatError::Malformed("the token's payload is not base64url".into()))?;
        serde_json::from_slice(&payload).map_err(|e| {
            K8sPsatError::Malformed(format!(
                "the token's claims are not those of a service account token ({})",
                shown(&e.to_string())
            ))
        })
    }
}
