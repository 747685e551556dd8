//! The trust bundle's two published forms: PEM, and a SPIFFE bundle (a JWKS whose keys have
//! `use: x509-svid` and carry their certificate in `x5c`).
//!
//! Roots come from Mayfly's own CAs (P-256, URI SAN `spiffe://<td>`) or from an upstream CA an
//! organisation already runs (RSA or EC, usually without any SPIFFE SAN), so nothing here
//! assumes either the key type or the SAN.

mod jwk;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a bundle could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// A certificate in the bundle could not be parsed.
    #[error("a bundle certificate could not be parsed")]
    BadCertificate(#[source] crate::svid::Cause),
    /// A certificate's key cannot be written as a JSON Web Key (it is neither RSA nor EC on
    /// P-256, P-384 or P-521); the text says what it is.
    #[error(
        "a bundle certificate holds {0}, which a SPIFFE bundle cannot publish; use an RSA or EC (P-256, P-384, P-521) upstream CA"
    )]
    UnsupportedKey(String),
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
    let (_, cert) = X509Certificate::from_der(ca_der)
        .map_err(|e| BundleError::BadCertificate(crate::svid::Cause::new(e)))?;
    let uri = first_uri_san(&cert)?.ok_or(BundleError::NoTrustDomain)?;
    let id = crate::id::SpiffeId::parse(uri).map_err(BundleError::BadTrustDomain)?;
    Ok(id.trust_domain())
}

/// The trust domain a CA certificate names, if it names one: `Some` for a URI SAN
/// `spiffe://<td>`, `None` for a root without a SPIFFE URI SAN (an upstream corporate root,
/// whose certificates say nothing about SPIFFE). Readers of a bundle must accept both.
///
/// # Errors
/// [`BundleError::BadCertificate`] when the certificate cannot be parsed;
/// [`BundleError::BadTrustDomain`] when its URI SAN has the `spiffe` scheme but is not a
/// valid SPIFFE ID.
pub fn trust_domain_named(ca_der: &[u8]) -> Result<Option<crate::id::TrustDomain>, BundleError> {
    let (_, cert) = X509Certificate::from_der(ca_der)
        .map_err(|e| BundleError::BadCertificate(crate::svid::Cause::new(e)))?;
    match first_uri_san(&cert)? {
        Some(uri)
            if uri
                .get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")) =>
        {
            let id = crate::id::SpiffeId::parse(uri).map_err(BundleError::BadTrustDomain)?;
            Ok(Some(id.trust_domain()))
        }
        _ => Ok(None),
    }
}

/// The first URI SAN of a certificate, if any.
fn first_uri_san<'a>(cert: &'a X509Certificate<'_>) -> Result<Option<&'a str>, BundleError> {
    use x509_parser::extensions::GeneralName;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| BundleError::BadCertificate(crate::svid::Cause::new(e)))?;
    Ok(san.and_then(|san| {
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
    }))
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
struct SpiffeBundle {
    /// X.509 authorities (`use: x509-svid`), then JWT authorities (`use: jwt-svid`).
    keys: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    spiffe_refresh_hint: u64,
}

/// How often relying parties should re-fetch the bundle, in seconds.
pub(crate) const REFRESH_HINT_SECS: u64 = 300;

/// The bundle document's fields besides its keys. The CA rotation decides them; until it
/// passes its own, [`SpiffeBundleInfo::default`] gives no sequence and the fixed hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeBundleInfo {
    /// `spiffe_sequence`: grows with every change of the bundle (left out when `None`).
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, in seconds.
    pub refresh_hint_secs: u64,
}

impl Default for SpiffeBundleInfo {
    fn default() -> Self {
        Self {
            sequence: None,
            refresh_hint_secs: REFRESH_HINT_SECS,
        }
    }
}

/// Certificates as a SPIFFE bundle document (JSON), with the default
/// [`SpiffeBundleInfo`].
///
/// # Errors
/// [`BundleError`] when a certificate does not parse or holds a key a JWK cannot carry.
pub fn to_spiffe_json(certs: &[Vec<u8>]) -> Result<String, BundleError> {
    to_spiffe_json_with(certs, SpiffeBundleInfo::default())
}

/// Certificates as a SPIFFE bundle document (JSON): one JWK per certificate, RSA (`n`, `e`)
/// or EC (`crv`, `x`, `y`), each with `use: x509-svid` and the certificate in `x5c`.
///
/// # Errors
/// [`BundleError`] when a certificate does not parse or holds a key a JWK cannot carry.
pub fn to_spiffe_json_with(
    certs: &[Vec<u8>],
    info: SpiffeBundleInfo,
) -> Result<String, BundleError> {
    to_spiffe_json_with_jwt(certs, &[], info)
}

/// The whole SPIFFE bundle document: the certificates as in [`to_spiffe_json_with`], then
/// each JWT-SVID key with its `kid` and `use: jwt-svid`.
///
/// # Errors
/// [`BundleError`] when a certificate does not parse or holds a key a JWK cannot carry.
pub fn to_spiffe_json_with_jwt(
    certs: &[Vec<u8>],
    jwt_keys: &[crate::jwt::JwtKey],
    info: SpiffeBundleInfo,
) -> Result<String, BundleError> {
    let encode = |e: serde_json::Error| BundleError::Encode(crate::svid::Cause::new(e));
    let mut keys = Vec::with_capacity(certs.len() + jwt_keys.len());
    for der in certs {
        keys.push(serde_json::to_value(jwk::Jwk::of_certificate(der)?).map_err(encode)?);
    }
    for key in jwt_keys {
        keys.push(serde_json::to_value(key.to_jwk()).map_err(encode)?);
    }
    let doc = SpiffeBundle {
        keys,
        spiffe_sequence: info.sequence,
        spiffe_refresh_hint: info.refresh_hint_secs,
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
    fn a_root_without_a_spiffe_san_names_no_trust_domain_and_is_no_error() {
        assert_eq!(
            trust_domain_named(&self_signed(Some("spiffe://acme.test")))
                .unwrap()
                .map(|td| td.to_string()),
            Some("acme.test".to_owned())
        );
        assert_eq!(trust_domain_named(&self_signed(None)).unwrap(), None);
        assert_eq!(
            trust_domain_named(&self_signed(Some("https://pki.example.com"))).unwrap(),
            None
        );
        assert!(matches!(
            trust_domain_named(&self_signed(Some("spiffe://UPPER case"))),
            Err(BundleError::BadTrustDomain(_))
        ));
        assert!(matches!(
            trust_domain_named(b"not a certificate"),
            Err(BundleError::BadCertificate(_))
        ));
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
