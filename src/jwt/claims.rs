//! What a JWT-SVID says, and how one is signed.
//!
//! Claims follow the SPIFFE JWT-SVID profile: `sub` the SPIFFE ID (for a task token the scoped
//! ID, encoded as in a task X509-SVID), one `aud`, `exp`, `iat`, and a unique `jti`. A task
//! token adds `scope`: its scopes in human form, space-separated, the same set `sub` encodes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

use super::{JwtError, JwtSigner};
use crate::id::{ScopeSet, ScopedId, SpiffeId};

/// Whether a token is an identity's or a task's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// An identity JWT-SVID: `sub` is the entry's SPIFFE ID.
    Identity,
    /// A task JWT-SVID: `sub` is the scoped ID and the `scope` claim lists the scopes.
    Task(ScopedId),
}

/// The claims of a token about to be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The subject: the SPIFFE ID the token asserts.
    pub sub: SpiffeId,
    /// The one audience.
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// A unique token ID (16 bytes, 126 of them random bits, hex; a valid serial number).
    pub jti: String,
    /// The scopes of a task token.
    pub scopes: Option<ScopeSet>,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

#[derive(Serialize)]
struct Body<'a> {
    sub: &'a str,
    aud: [&'a str; 1],
    iat: u64,
    exp: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

impl Claims {
    /// Claims for `kind` of `id`, for `aud`, living from `iat` to `exp`, with a fresh `jti`.
    ///
    /// # Errors
    /// [`JwtError::Key`] when no random `jti` can be drawn.
    pub fn new(
        kind: &TokenKind,
        id: &SpiffeId,
        aud: &str,
        iat: u64,
        exp: u64,
    ) -> Result<Self, JwtError> {
        let mut random = [0u8; 16];
        aws_lc_rs::rand::fill(&mut random)
            .map_err(|_| JwtError::Key("no random token ID could be drawn"))?;
        // A positive DER integer without a leading zero (126 random bits), so the audit log
        // can keep the `jti` where it keeps an X509-SVID's serial number.
        random[0] = (random[0] & 0x3f) | 0x40;
        let (sub, scopes) = match kind {
            TokenKind::Identity => (id.clone(), None),
            TokenKind::Task(scoped) => (scoped.spiffe_id().clone(), Some(scoped.scopes().clone())),
        };
        Ok(Self {
            sub,
            aud: aud.to_owned(),
            iat,
            exp,
            jti: hex::encode(random),
            scopes,
        })
    }

    /// The `scope` claim: the scopes in human form, space-separated, in a fixed order.
    pub fn scope_claim(scopes: &ScopeSet) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The signed compact JWS.
    ///
    /// # Errors
    /// [`JwtError::Key`] when signing fails.
    pub fn sign(&self, signer: &JwtSigner) -> Result<String, JwtError> {
        let header = Header {
            alg: "ES256",
            kid: signer.kid(),
            typ: "JWT",
        };
        let body = Body {
            sub: self.sub.as_str(),
            aud: [&self.aud],
            iat: self.iat,
            exp: self.exp,
            jti: &self.jti,
            scope: self.scopes.as_ref().map(Self::scope_claim),
        };
        let mut token = encoded(&header)?;
        token.push('.');
        token.push_str(&encoded(&body)?);
        let signature = signer.sign(token.as_bytes())?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(token)
    }
}

/// A part of the token: JSON, base64url without padding.
fn encoded<T: Serialize>(part: &T) -> Result<String, JwtError> {
    let json =
        serde_json::to_vec(part).map_err(|_| JwtError::Key("the claims could not be encoded"))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}
