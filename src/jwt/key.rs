//! JWT signing keys (ES256, P-256) and their public halves as JSON Web Keys.
//!
//! A key's `kid` is derived from its public key (base64url of the first 16 bytes of the
//! SHA-256 of the uncompressed point), so every server, agent and verifier computes the same
//! `kid` for the same key and a bundle can never hold two keys under one `kid`.

use std::collections::BTreeMap;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::JwtError;
use crate::id::TrustDomain;

/// Bytes of an uncompressed P-256 point (0x04, x, y).
const POINT_LEN: usize = 65;
/// Bytes of one P-256 coordinate.
const COORD_LEN: usize = 32;

/// A server's private JWT signing key and its `kid`.
pub struct JwtSigner {
    pair: EcdsaKeyPair,
    public: JwtKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// A new random key, and its PKCS#8 form to be stored.
    ///
    /// # Errors
    /// [`JwtError::Key`] when the system cannot make a key.
    pub fn generate() -> Result<(Self, Vec<u8>), JwtError> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| JwtError::Key("a P-256 key could not be generated"))?;
        let der = pkcs8.as_ref().to_vec();
        Ok((Self::from_pkcs8(&der)?, der))
    }

    /// The key stored as PKCS#8 DER.
    ///
    /// # Errors
    /// [`JwtError::Key`] when it is not a P-256 PKCS#8 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| JwtError::Key("the stored key is not a P-256 PKCS#8 key"))?;
        let public = JwtKey::from_point(pair.public_key().as_ref())?;
        Ok(Self {
            pair,
            public,
            rng: SystemRandom::new(),
        })
    }

    /// The public key, as published in the bundle.
    pub fn public(&self) -> &JwtKey {
        &self.public
    }

    /// The key ID.
    pub fn kid(&self) -> &str {
        &self.public.kid
    }

    /// The ES256 signature (r ‖ s, 64 bytes) of `message`.
    ///
    /// # Errors
    /// [`JwtError::Key`] when signing fails.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, JwtError> {
        self.pair
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| JwtError::Key("the signature could not be made"))
    }
}

/// A public JWT key: its `kid` and its uncompressed P-256 point.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JwtKey {
    kid: String,
    point: Vec<u8>,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKey({})", self.kid)
    }
}

impl JwtKey {
    /// The key with the uncompressed P-256 point `point` (65 bytes), its `kid` derived.
    ///
    /// # Errors
    /// [`JwtError::Key`] when `point` is not an uncompressed P-256 point.
    pub fn from_point(point: &[u8]) -> Result<Self, JwtError> {
        if point.len() != POINT_LEN || point[0] != 0x04 {
            return Err(JwtError::Key(
                "the public key is not an uncompressed P-256 point",
            ));
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, point);
        Ok(Self {
            kid: URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]),
            point: point.to_vec(),
        })
    }

    /// The key ID.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The uncompressed point (the form stored and sent between server and agent).
    pub fn point(&self) -> &[u8] {
        &self.point
    }

    /// Whether `signature` (r ‖ s) is this key's ES256 signature of `message`.
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.point)
            .verify(message, signature)
            .is_ok()
    }

    /// The JSON Web Key (RFC 7517/7518) with `use: jwt-svid`.
    pub fn to_jwk(&self) -> Jwk {
        Jwk {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: Some(URL_SAFE_NO_PAD.encode(&self.point[1..1 + COORD_LEN])),
            y: Some(URL_SAFE_NO_PAD.encode(&self.point[1 + COORD_LEN..])),
            kid: Some(self.kid.clone()),
            alg: Some("ES256".into()),
            use_: Some("jwt-svid".into()),
        }
    }

    /// The key a JWK describes, if it is an EC P-256 key.
    ///
    /// # Errors
    /// [`JwtError::BadJwks`] when it is of another type or its coordinates do not decode. The
    /// given `kid` must match the one the key derives, so a bundle cannot rename a key.
    fn from_jwk(jwk: &Jwk) -> Result<Self, JwtError> {
        let bad = |why: &str| JwtError::BadJwks(why.to_owned());
        if jwk.kty != "EC" || jwk.crv.as_deref() != Some("P-256") {
            return Err(bad("a key is not EC P-256"));
        }
        let coord = |c: &Option<String>| -> Result<Vec<u8>, JwtError> {
            let bytes = URL_SAFE_NO_PAD
                .decode(c.as_deref().unwrap_or_default())
                .map_err(|_| bad("a key's coordinate is not base64url"))?;
            if bytes.len() != COORD_LEN {
                return Err(bad("a key's coordinate is not 32 bytes"));
            }
            Ok(bytes)
        };
        let mut point = vec![0x04];
        point.extend(coord(&jwk.x)?);
        point.extend(coord(&jwk.y)?);
        let key = Self::from_point(&point)?;
        match jwk.kid.as_deref() {
            Some(kid) if kid == key.kid => Ok(key),
            Some(_) => Err(bad("a key's kid is not the one its public key derives")),
            None => Err(bad("a key has no kid")),
        }
    }
}

/// One JSON Web Key, as much of it as Mayfly reads or writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type.
    pub kty: String,
    /// Curve (EC keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// X coordinate (EC keys), base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// Y coordinate (EC keys), base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// Key ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Intended use (`jwt-svid`, `x509-svid`).
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

/// The JWT keys of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: BTreeMap<String, JwtKey>,
}

#[derive(Serialize, Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
}

impl JwtBundle {
    /// The bundle of `trust_domain` holding `keys`.
    pub fn new(trust_domain: TrustDomain, keys: impl IntoIterator<Item = JwtKey>) -> Self {
        Self {
            trust_domain,
            keys: keys.into_iter().map(|k| (k.kid.clone(), k)).collect(),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The key with `kid`.
    pub fn key(&self, kid: &str) -> Option<&JwtKey> {
        self.keys.get(kid)
    }

    /// Every key, by `kid`.
    pub fn keys(&self) -> impl Iterator<Item = &JwtKey> {
        self.keys.values()
    }

    /// The JWKS document (`{"keys": [...]}`) the Workload API and the OIDC discovery endpoint
    /// serve.
    pub fn to_jwks_json(&self) -> Vec<u8> {
        let keys: Vec<Jwk> = self.keys.values().map(JwtKey::to_jwk).collect();
        serde_json::to_vec(&serde_json::json!({ "keys": keys }))
            .unwrap_or_else(|_| b"{\"keys\":[]}".to_vec())
    }

    /// Reads a JWKS document for `trust_domain`. Keys for other uses (`x509-svid`) are
    /// skipped; a JWT key that is not EC P-256 is refused, since no token it signs could be
    /// accepted.
    ///
    /// # Errors
    /// [`JwtError::BadJwks`] when the document is not JSON with a `keys` array, or a key is
    /// unusable.
    pub fn from_jwks_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, JwtError> {
        let doc: Jwks = serde_json::from_slice(json)
            .map_err(|e| JwtError::BadJwks(super::shown(&e.to_string())))?;
        let mut keys = Vec::new();
        for value in doc.keys {
            let jwk: Jwk = serde_json::from_value(value)
                .map_err(|e| JwtError::BadJwks(super::shown(&e.to_string())))?;
            if jwk.use_.as_deref().is_some_and(|u| u != "jwt-svid") {
                continue;
            }
            keys.push(JwtKey::from_jwk(&jwk)?);
        }
        Ok(Self::new(trust_domain, keys))
    }
}

/// JWT bundles by trust domain: what a validator trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundles(BTreeMap<TrustDomain, JwtBundle>);

impl JwtBundles {
    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: JwtBundle) {
        self.0.insert(bundle.trust_domain.clone(), bundle);
    }

    /// The bundle of `trust_domain`.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        self.0.get(trust_domain)
    }

    /// Every bundle.
    pub fn iter(&self) -> impl Iterator<Item = &JwtBundle> {
        self.0.values()
    }
}

impl FromIterator<JwtBundle> for JwtBundles {
    fn from_iter<I: IntoIterator<Item = JwtBundle>>(iter: I) -> Self {
        let mut all = Self::default();
        for b in iter {
            all.insert(b);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_through_pkcs8_and_jwks_with_the_same_kid() {
        let (signer, pkcs8) = JwtSigner::generate().unwrap();
        let again = JwtSigner::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(signer.kid(), again.kid());
        assert_eq!(signer.kid().len(), 22);
        let td = TrustDomain::new("t.test").unwrap();
        let bundle = JwtBundle::new(td.clone(), [signer.public().clone()]);
        let json = bundle.to_jwks_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"use\":\"jwt-svid\""), "{text}");
        assert!(text.contains("\"alg\":\"ES256\""), "{text}");
        let read = JwtBundle::from_jwks_json(td, &json).unwrap();
        assert_eq!(read, bundle);
    }

    #[test]
    fn a_jwks_that_renames_a_key_or_holds_another_type_is_refused() {
        let (signer, _) = JwtSigner::generate().unwrap();
        let td = TrustDomain::new("t.test").unwrap();
        let mut jwk = signer.public().to_jwk();
        let good = serde_json::json!({ "keys": [jwk.clone()] });
        assert!(JwtBundle::from_jwks_json(td.clone(), good.to_string().as_bytes()).is_ok());
        jwk.kid = Some("other".into());
        let renamed = serde_json::json!({ "keys": [jwk] });
        assert!(JwtBundle::from_jwks_json(td.clone(), renamed.to_string().as_bytes()).is_err());
        let rsa =
            serde_json::json!({ "keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "r"}] });
        assert!(JwtBundle::from_jwks_json(td.clone(), rsa.to_string().as_bytes()).is_err());
        let x509 = serde_json::json!({ "keys": [{"kty": "RSA", "use": "x509-svid"}] });
        let skipped = JwtBundle::from_jwks_json(td, x509.to_string().as_bytes()).unwrap();
        assert_eq!(skipped.keys().count(), 0);
    }

    #[test]
    fn a_point_of_the_wrong_shape_is_not_a_key() {
        assert!(JwtKey::from_point(&[4; 64]).is_err());
        let mut p = vec![2u8];
        p.extend([1u8; 64]);
        assert!(JwtKey::from_point(&p).is_err());
    }
}
