//! The JWT-SVID validator: what the agent's `ValidateJWTSVID`, the proxy and `mayfly svid
//! validate` accept.
//!
//! The checks run in an order that never trusts what is not yet verified: the shape and the
//! header first (ES256 only, a `kid`), then the signature with the key the bundle of the
//! subject's trust domain holds under that `kid`, and only then the claims (`exp`, `nbf`, one
//! `aud`, `sub` a SPIFFE ID, `scope` agreeing with `sub`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::{JwtBundles, JwtError, shown};
use crate::id::{ScopeSet, ScopedId, SpiffeId, parse_scopes};

/// The longest token accepted. JWT-SVIDs Mayfly issues are well under 2 KiB even with a
/// maximal SPIFFE ID; anything far longer is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// `sub`, split into the registered identity and the scopes it carries.
    pub subject: ScopedId,
    /// The audience it was validated for.
    pub audience: String,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
    /// `jti`, if the token has one.
    pub jti: Option<String>,
    /// Every claim, as sent.
    pub claims: Map<String, Value>,
}

impl Validated {
    /// The SPIFFE ID the token asserts (`sub`, scopes included).
    pub fn spiffe_id(&self) -> &SpiffeId {
        self.subject.spiffe_id()
    }
}

/// Validates `token` for `audience` against `bundles` at `now` (Unix seconds).
///
/// # Errors
/// The first [`JwtError`] that applies, in the order of the module's description.
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &JwtBundles,
    now: u64,
) -> Result<Validated, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong(token.len()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        return Err(JwtError::Malformed(match parts.len() {
            1 => "it has no dots",
            2 => "it has 2 parts, not 3",
            4 | 5 => "it has more than 3 parts; an encrypted JWT is not a JWT-SVID",
            _ => "it does not have 3 parts",
        }));
    };
    let header = json_object(header, "its header is not base64url JSON")?;
    let kid = check_header(&header)?;
    let claims = json_object(payload, "its payload is not base64url JSON")?;
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => SpiffeId::parse(s).map_err(|_| JwtError::BadSubject(shown(s)))?,
        _ => return Err(JwtError::BadClaim("sub")),
    };

    let td = sub.trust_domain();
    let bundle = bundles
        .get(&td)
        .ok_or_else(|| JwtError::UnknownTrustDomain(td.to_string()))?;
    let key = bundle.key(&kid).ok_or_else(|| JwtError::UnknownKid {
        kid: shown(&kid),
        trust_domain: td.to_string(),
    })?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Malformed("its signature is not base64url"))?;
    let signed = &token[..header_and_payload_len(token)];
    if !key.verifies(signed.as_bytes(), &signature) {
        return Err(JwtError::BadSignature);
    }

    let expires_at = seconds(&claims, "exp")?.ok_or(JwtError::BadClaim("exp"))?;
    if now >= expires_at {
        return Err(JwtError::Expired(now - expires_at));
    }
    if let Some(nbf) = seconds(&claims, "nbf")?
        && nbf > now
    {
        return Err(JwtError::NotYetValid(nbf - now));
    }
    let aud = single_audience(&claims)?;
    if aud != audience {
        return Err(JwtError::WrongAudience {
            got: shown(aud),
            want: shown(audience),
        });
    }
    let subject =
        ScopedId::from_spiffe_id(&sub).map_err(|_| JwtError::BadSubject(shown(sub.as_str())))?;
    match claims.get("scope") {
        None => {}
        Some(Value::String(s)) => {
            let listed: Vec<&str> = s.split(' ').filter(|w| !w.is_empty()).collect();
            let scopes: ScopeSet =
                parse_scopes(&listed).map_err(|_| JwtError::BadClaim("scope"))?;
            if &scopes != subject.scopes() {
                return Err(JwtError::ScopeMismatch);
            }
        }
        Some(_) => return Err(JwtError::BadClaim("scope")),
    }
    let jti = match claims.get("jti") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return Err(JwtError::BadClaim("jti")),
    };
    Ok(Validated {
        subject,
        audience: audience.to_owned(),
        expires_at,
        jti,
        claims,
    })
}

/// ES256 and a `kid`, or the reason not.
fn check_header(header: &Map<String, Value>) -> Result<String, JwtError> {
    match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => {}
        None | Some("none") | Some("") => return Err(JwtError::AlgNone),
        Some(alg) if alg.starts_with("HS") => return Err(JwtError::AlgHmac(shown(alg))),
        Some(alg) => return Err(JwtError::AlgUnsupported(shown(alg))),
    }
    if header.contains_key("crit") {
        return Err(JwtError::Malformed("its header has critical extensions"));
    }
    match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => Ok(kid.clone()),
        _ => Err(JwtError::MissingKid),
    }
}

/// The one audience: a string, or an array of exactly one string.
fn single_audience(claims: &Map<String, Value>) -> Result<&str, JwtError> {
    match claims.get("aud") {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(all)) => match &all[..] {
            [Value::String(s)] => Ok(s),
            [] => Err(JwtError::BadClaim("aud")),
            [_] => Err(JwtError::BadClaim("aud")),
            many => Err(JwtError::SeveralAudiences(many.len())),
        },
        _ => Err(JwtError::BadClaim("aud")),
    }
}

/// A NumericDate claim, as whole seconds (fractions are cut; negative is malformed).
fn seconds(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.is_finite())
                    .map(|f| f as u64)
            })
            .map(Some)
            .ok_or(JwtError::BadClaim(name)),
        Some(_) => Err(JwtError::BadClaim(name)),
    }
}

fn json_object(part: &str, why: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(why))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed(why)),
    }
}

/// The length of `header.payload`, the signed bytes.
fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

#[cfg(test)]
mod tests;
