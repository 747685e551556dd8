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
    #[error("a bundle certificate could not be parsed")]
    BadCertificate(#[source] crate::svid::Cause),
    /// A certificate's key is not an uncompressed P-256 point.
    #[error("a bundle certificate's key is not a P-256 key, which Mayfly CAs always use")]
    NotP256,
    /// A PEM block of the text does not decode.
    #[error("the trust bundle is not PEM certificates; pass the output of `mayfly bundle show`")]
    BadPem(#[source] crate::svid::Cause),
    /// The text holds no PEM certificate at all.
    #[error("the trust bundle holds no CERTIFICATE block; pass the output of `mayfly bundle show`")]
    NoCertificate,
    /// A CA certificate has no URI SAN `spiffe://<td>`.
    #[error(
        "a bundle certificate names no SPIFFE trust domain (it has no URI SAN); pass the output of `mayfly bundle show`"
    )]
    NoTrustDomain,
    /// A CA certificate's URI SAN is not a SPIFFE ID.
    #[error(
        "a bundle certificate's URI SAN is not a SPIFFE trust domain; pass the output of `mayfly bundle show`"
    )]
    BadTrustDomain(#[source] crate::id::IdError),
    /// The SPIFFE bundle document could not be written as JSON.
    #[error("the SPIFFE bundle document could not be encoded")]
    Encode(#[source] crate::svid::Cause),
}

/// Reads concatenated PEM certificates into DER.
///
/// # Errors
/// [`BundleError::BadPem`] when a block does not decode, [`BundleError::NoCertificate`] when
/// there is none.
pub fn from_pem(text: &[u8]) -> Result<Vec<Vec<u8>>, BundleError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(text)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::BadPem(crate::svid::Cause::new(e)))?;
    if certs.is_empty() {
        return Err(BundleError::NoCertificate);
    }
    Ok(certs)
}

/// The trust domain a CA certificate serves, from its URI SAN `spiffe://<td>`.
///
/// # Errors
/// [`BundleError`] when the certificate cannot be parsed or names no trust domain.
pub fn trust_domain_of(ca_der: &[u8]) -> Result<crate::id::TrustDomain, BundleError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = X509Certificate::from_der(ca_der)
        .map_err(|e| BundleError::BadCertificate(crate::svid::Cause::new(e)))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| BundleError::BadCertificate(crate::svid::Cause::new(e)))?
        .ok_or(BundleError::NoTrustDomain)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            let id = crate::id::SpiffeId::parse(uri).map_err(BundleError::BadTrustDomain)?;
            return Ok(id.trust_domain());
        }
    }
    Err(BundleError::NoTrustDomain)
}

/// Certificates as concatenated PEM blocks.
pub fn to_pem(certs: &[Vec<u8>]) -> String {
    certs
        .iter()
        .map(|der| pem_block("CERTIFICATE", der))
        .collect()
}

/// One PEM block of `der` labelled `label` (e.g. `PRIVATE KEY`), 64 characters a line.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
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
pub(crate) const REFRESH_HINT_SECS: u64 = 300;

/// Certificates as a SPIFFE bundle document (JSON).
///
/// # Errors
/// [`BundleError`] when a certificate is not a parsable P-256 certificate.
pub fn to_spiffe_json(certs: &[Vec<u8>]) -> Result<String, BundleError> {
    let mut keys = Vec::with_capacity(certs.len());
    for der in certs {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| BundleError::BadCertificate(crate::svid::Cause::new(e)))?;
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
    serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Encode(crate::svid::Cause::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    fn self_signed(uri: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        if let Some(uri) = uri {
            params.subject_alt_names = vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(uri.to_owned()).unwrap(),
            )];
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_ca_certificate_names_its_trust_domain() {
        let td = trust_domain_of(&self_signed(Some("spiffe://acme.test"))).unwrap();
        assert_eq!(td.as_str(), "acme.test");
        let pem = to_pem(&[self_signed(Some("spiffe://acme.test"))]);
        assert_eq!(from_pem(pem.as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn unusable_bundles_are_refused_by_variant_with_their_cause_kept() {
        assert!(matches!(from_pem(b""), Err(BundleError::NoCertificate)));
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let err = from_pem(broken).unwrap_err();
        assert!(matches!(err, BundleError::BadPem(_)), "{err:?}");
        assert!(err.source().is_some(), "the PEM decoder's error is kept");

        let err = trust_domain_of(b"not a certificate").unwrap_err();
        assert!(matches!(err, BundleError::BadCertificate(_)), "{err:?}");
        assert!(err.source().is_some(), "the parser's error is kept");
        assert!(matches!(
            trust_domain_of(&self_signed(None)),
            Err(BundleError::NoTrustDomain)
        ));
        assert!(matches!(
            trust_domain_of(&self_signed(Some("https://acme.test"))),
            Err(BundleError::BadTrustDomain(_))
        ));
    }
}
