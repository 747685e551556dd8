//! A CA certificate's public key as a JSON Web Key (RFC 7517), the form a SPIFFE bundle
//! publishes it in: RSA keys as `n` and `e`, EC keys (P-256, P-384, P-521) as `crv`, `x` and
//! `y` (RFC 7518 §6), each with the certificate itself in `x5c` and `use: x509-svid`.
//!
//! Upstream CAs are whatever an organisation already runs, so the bundle cannot assume the
//! P-256 keys Mayfly's own CAs use.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::BundleError;

/// One key of a SPIFFE bundle. Fields that do not apply to the key type are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct Jwk {
    kty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    crv: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(rename = "use")]
    use_: &'static str,
    x5c: Vec<String>,
}

/// The named curves a JWK can carry, with the byte length of one coordinate.
const CURVES: [(&x509_parser::der_parser::Oid<'static>, &str, usize); 3] = [
    (&OID_EC_P256, "P-256", 32),
    (&OID_NIST_EC_P384, "P-384", 48),
    (&OID_NIST_EC_P521, "P-521", 66),
];

/// An unsigned big-endian integer as RFC 7518 writes `n` and `e`: base64url of the shortest
/// octet string (DER's leading zero, which only keeps the sign positive, is dropped).
fn unsigned(bytes: &[u8]) -> String {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let trimmed = &bytes[first..];
    URL_SAFE_NO_PAD.encode(if trimmed.is_empty() {
        &[0u8][..]
    } else {
        trimmed
    })
}

fn unsupported(what: impl Into<String>) -> BundleError {
    BundleError::UnsupportedKey(what.into())
}

impl Jwk {
    /// The JWK of the CA certificate `der`.
    ///
    /// # Errors
    /// [`BundleError::BadCertificate`] when `der` does not parse;
    /// [`BundleError::UnsupportedKey`] when its key is neither RSA nor EC on P-256/384/521, or
    /// an EC point is not uncompressed.
    pub(super) fn of_certificate(der: &[u8]) -> Result<Self, BundleError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| BundleError::BadCertificate(crate::svid::Cause::new(e)))?;
        let spki = cert.public_key();
        let algorithm = &spki.algorithm.algorithm;
        let mut jwk = Self {
            kty: "",
            crv: None,
            x: None,
            y: None,
            n: None,
            e: None,
            use_: "x509-svid",
            x5c: vec![STANDARD.encode(der)],
        };
        if *algorithm == OID_PKCS1_RSAENCRYPTION {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err(unsupported(
                    "an RSA key whose modulus and exponent do not parse",
                ));
            };
            jwk.kty = "RSA";
            jwk.n = Some(unsigned(rsa.modulus));
            jwk.e = Some(unsigned(rsa.exponent));
        } else if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let Some((_, name, len)) = CURVES
                .iter()
                .find(|(oid, _, _)| curve.as_ref() == Some(*oid))
            else {
                return Err(unsupported(format!(
                    "an EC key on curve {}",
                    curve.map_or_else(|| "(not named)".to_owned(), |c| c.to_id_string())
                )));
            };
            let point = spki.subject_public_key.data.as_ref();
            // An uncompressed point: 0x04, then x and y, each exactly one coordinate long.
            if point.len() != 1 + 2 * len || point[0] != 0x04 {
                return Err(unsupported(format!(
                    "a {name} key that is not an uncompressed point"
                )));
            }
            jwk.kty = "EC";
            jwk.crv = Some(name);
            jwk.x = Some(URL_SAFE_NO_PAD.encode(&point[1..=*len]));
            jwk.y = Some(URL_SAFE_NO_PAD.encode(&point[1 + len..]));
        } else {
            return Err(unsupported(format!(
                "a key of algorithm {}",
                algorithm.to_id_string()
            )));
        }
        Ok(jwk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_lose_only_their_leading_zeros() {
        assert_eq!(unsigned(&[0x01, 0x00, 0x01]), "AQAB");
        assert_eq!(unsigned(&[0x00, 0x01, 0x00, 0x01]), "AQAB");
        assert_eq!(unsigned(&[0x00, 0x80]), "gA");
        assert_eq!(unsigned(&[0x00]), "AA");
    }
}
