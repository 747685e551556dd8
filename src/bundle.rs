//! The trust bundle's two published forms: PEM, and a SPIFFE bundle (a JWKS whose keys have
//! `use: x509-svid` and carry their certificate in `x5c`).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a bundle could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// A certificate in the bundle could not be parsed.
    #[error("a bundle certificate could not be parsed: {0}")]
    BadCertificate(String),
    /// A certificate's key is not an uncompressed P-256 point.
    #[error("a bundle certificate's key is not a P-256 key, which Mayfly CAs always use")]
    NotP256,
}

/// Certificates as concatenated PEM blocks.
pub fn to_pem(certs: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for der in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[derive(Serialize)]
struct Jwk {
    kty: &'static str,
    crv: &'static str,
    x: String,
    y: String,
    #[serde(rename = "use")]
    use_: &'static str,
    x5c: Vec<String>,
}

#[derive(Serialize)]
struct SpiffeBundle {
    keys: Vec<Jwk>,
    spiffe_refresh_hint: u64,
}

/// How often relying parties should re-fetch the bundle, in seconds.
pub const REFRESH_HINT_SECS: u64 = 300;

/// Certificates as a SPIFFE bundle document (JSON).
///
/// # Errors
/// [`BundleError`] when a certificate is not a parsable P-256 certificate.
pub fn to_spiffe_json(certs: &[Vec<u8>]) -> Result<String, BundleError> {
    let mut keys = Vec::with_capacity(certs.len());
    for der in certs {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| BundleError::BadCertificate(e.to_string()))?;
        let point = cert.public_key().subject_public_key.data.as_ref();
        // An uncompressed P-256 point: 0x04, then 32 bytes of x and 32 of y.
        if point.len() != 65 || point[0] != 0x04 {
            return Err(BundleError::NotP256);
        }
        keys.push(Jwk {
            kty: "EC",
            crv: "P-256",
            x: URL_SAFE_NO_PAD.encode(&point[1..33]),
            y: URL_SAFE_NO_PAD.encode(&point[33..65]),
            use_: "x509-svid",
            x5c: vec![STANDARD.encode(der)],
        });
    }
    let doc = SpiffeBundle {
        keys,
        spiffe_refresh_hint: REFRESH_HINT_SECS,
    };
    serde_json::to_string_pretty(&doc).map_err(|e| BundleError::BadCertificate(e.to_string()))
}
