//! A cluster's service account signing keys, read from its JWKS document (what the API server
//! serves at `/openid/v1/jwks`), and the two signature checks a token may need: RS256 with an
//! RSA key of 2048 to 8192 bits, ES256 with a P-256 key.
//!
//! Keys of any other type, curve or algorithm are skipped, so a JWKS that also publishes keys
//! for other uses still loads; a document with no usable key is refused, so that a broken
//! refresh never replaces keys that work.

use std::collections::HashMap;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents, UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::{K8sPsatError, shown};

/// The largest JWKS document read, in bytes (the HTTPS fetcher has the same limit).
pub const MAX_JWKS: usize = 1024 * 1024;
/// The most keys one document may hold.
const MAX_KEYS: usize = 256;

/// A signature algorithm a token may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA on P-256 with SHA-256, the signature as `r || s`.
    Es256,
}

impl Alg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

/// One verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The uncompressed point `04 || x || y`.
    Ec { point: Vec<u8> },
}

/// The keys of one cluster, by `kid`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: HashMap<String, Key>,
}

/// One JWK as read; every field optional so that keys of other types are skipped, not refused.
#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Reads a JWKS document.
    ///
    /// # Errors
    /// [`K8sPsatError::BadJwks`] when it is too large, not a JWKS, holds a `kid` twice, or holds
    /// no usable RS256 or ES256 key.
    pub fn parse(json: &[u8]) -> Result<Self, K8sPsatError> {
        if json.len() > MAX_JWKS {
            return Err(K8sPsatError::BadJwks(format!(
                "it is {} bytes, over the 1 MiB limit",
                json.len()
            )));
        }
        let document: Document = serde_json::from_slice(json).map_err(|e| {
            K8sPsatError::BadJwks(format!(
                "it is not a JSON object with a \"keys\" array ({})",
                shown(&e.to_string())
            ))
        })?;
        if document.keys.len() > MAX_KEYS {
            return Err(K8sPsatError::BadJwks(format!(
                "it holds {} keys, over the limit of {MAX_KEYS}",
                document.keys.len()
            )));
        }
        let mut keys = HashMap::new();
        for value in document.keys {
            // A key that is not even an object of strings is skipped like one of another type.
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let Some((kid, key)) = usable(jwk)? else {
                continue;
            };
            if keys.contains_key(&kid) {
                return Err(K8sPsatError::BadJwks(format!(
                    "it holds the key ID {} twice",
                    shown(&kid)
                )));
            }
            keys.insert(kid, key);
        }
        if keys.is_empty() {
            return Err(K8sPsatError::BadJwks(
                "it holds no RS256 or ES256 signing key with a kid".into(),
            ));
        }
        Ok(Self { keys })
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the set holds a key named `kid`.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Verifies `signature` over `message` with the key `kid` and algorithm `alg`.
    ///
    /// # Errors
    /// [`K8sPsatError::UnknownKid`] when no key is named `kid` (with an empty cluster name, which
    /// the caller fills in); [`K8sPsatError::AlgMismatch`] when the key is of another type than
    /// `alg`; [`K8sPsatError::BadSignature`] when the signature does not verify.
    pub fn verify(
        &self,
        kid: &str,
        alg: Alg,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), K8sPsatError> {
        let key = self.keys.get(kid).ok_or_else(|| K8sPsatError::UnknownKid {
            kid: shown(kid),
            cluster: String::new(),
        })?;
        let verified = match (key, alg) {
            (Key::Rsa { n, e }, Alg::Rs256) => RsaPublicKeyComponents { n, e }.verify(
                &RSA_PKCS1_2048_8192_SHA256,
                message,
                signature,
            ),
            (Key::Ec { point }, Alg::Es256) => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(message, signature)
            }
            (Key::Rsa { .. }, Alg::Es256) | (Key::Ec { .. }, Alg::Rs256) => {
                return Err(K8sPsatError::AlgMismatch {
                    alg: alg.as_str(),
                    kid: shown(kid),
                });
            }
        };
        verified.map_err(|_| K8sPsatError::BadSignature)
    }
}

/// The key a JWK describes, or `None` for one of another type or use.
///
/// # Errors
/// [`K8sPsatError::BadJwks`] for an RSA or P-256 signing key whose numbers are malformed: a
/// document the operator must fix, not a key to skip silently.
fn usable(jwk: Jwk) -> Result<Option<(String, Key)>, K8sPsatError> {
    let Some(kid) = jwk.kid else {
        return Ok(None);
    };
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let bad = |what: &str| K8sPsatError::BadJwks(format!("the key {} has {what}", shown(&kid)));
    let key = match (jwk.kty.as_deref(), jwk.alg.as_deref(), jwk.crv.as_deref()) {
        (Some("RSA"), None | Some("RS256"), _) => {
            let n = strip_zeros(decode(jwk.n.as_deref()).ok_or_else(|| bad("no base64url n"))?);
            let e = strip_zeros(decode(jwk.e.as_deref()).ok_or_else(|| bad("no base64url e"))?);
            if !(256..=1024).contains(&n.len()) {
                return Err(bad("a modulus outside 2048 to 8192 bits"));
            }
            if e.is_empty() || e.len() > 4 {
                return Err(bad("an exponent that is not a small positive number"));
            }
            Key::Rsa { n, e }
        }
        (Some("EC"), None | Some("ES256"), Some("P-256")) => {
            let x = decode(jwk.x.as_deref()).ok_or_else(|| bad("no base64url x"))?;
            let y = decode(jwk.y.as_deref()).ok_or_else(|| bad("no base64url y"))?;
            if x.len() != 32 || y.len() != 32 {
                return Err(bad("coordinates that are not 32 bytes each"));
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Key::Ec { point }
        }
        _ => return Ok(None),
    };
    Ok(Some((kid, key)))
}

fn decode(text: Option<&str>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text?).ok()
}

fn strip_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}
