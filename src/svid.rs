//! The X509-SVID profile: build a leaf from a CSR's public key, parse and validate a chain.
//!
//! Issuance takes nothing from a CSR but its public key ([`parse_csr`] keeps only the
//! SubjectPublicKeyInfo, after checking the CSR's self-signature); every field of the leaf is
//! set here, explicitly, because rcgen's defaults are wrong for an SVID. The leaf rules that
//! rustls-webpki does not check (one URI SAN that is a SPIFFE ID with a path, CA=false, no
//! keyCertSign/cRLSign) are here too; the one verifier that applies them with the roots of the
//! leaf's trust domain and webpki's path check is [`crate::mtls`] ([`crate::mtls::verify_chain`]).

// Parsing and the leaf rules are in every build; issuance (a leaf from a CSR, with the
// server's CA) only with the `server` feature, and key generation (a key and a CSR, what an
// agent sends) with the server or the agent: the `mtls` build needs neither, nor rcgen.
use std::collections::HashMap;
#[cfg(any(feature = "server", feature = "agent"))]
use std::fmt;
use std::time::Duration;
#[cfg(feature = "mtls")]
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(any(feature = "server", feature = "agent"))]
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
#[cfg(feature = "server")]
use rcgen::{
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber, SignatureAlgorithm, string::Ia5String,
};
use rustls_pki_types::CertificateDer;
#[cfg(feature = "server")]
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
#[cfg(feature = "mtls")]
use x509_parser::certificate::X509CertificateParser;
#[cfg(feature = "server")]
use x509_parser::certification_request::X509CertificationRequest;
#[cfg(feature = "mtls")]
use x509_parser::extensions::{BasicConstraints, KeyUsage};
use x509_parser::extensions::{GeneralName, SubjectAlternativeName};
#[cfg(feature = "mtls")]
use x509_parser::nom::Parser as _;
use x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME;
#[cfg(feature = "server")]
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED448,
    OID_SIG_ED25519,
};
#[cfg(feature = "mtls")]
use x509_parser::oid_registry::{OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE};
use x509_parser::prelude::FromDer;

mod cause;
mod serial;

pub use cause::Cause;
pub use serial::{GENERATED_SERIAL_LEN, MAX_SERIAL_LEN, Serial};

#[cfg(feature = "server")]
use crate::ca::Authority;
#[cfg(feature = "server")]
use crate::id::ScopedId;
use crate::id::{IdError, SpiffeId, TrustDomain};

/// The largest CSR accepted, in bytes; a P-256 CSR is a few hundred.
pub const MAX_CSR_LEN: usize = 4096;
/// The largest leaf certificate a verifier parses, in bytes.
pub const MAX_LEAF_LEN: usize = 16 * 1024;
/// The most certificates a verifier accepts in one chain (leaf included).
pub const MAX_CHAIN_LEN: usize = 8;
/// How far a leaf's notBefore is backdated, so peers with a slow clock accept it at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// The organization (O=) in every leaf's subject; a non-empty subject keeps the SAN extension
/// non-critical (RFC 5280 §4.2.1.6).
pub const LEAF_ORGANIZATION: &str = "Mayfly";

#[cfg(feature = "server")]
/// The DER prefix of a P-256 SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { id-ecPublicKey,
/// prime256v1 }, BIT STRING (0 unused bits) ... }, followed by the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
#[cfg(feature = "server")]
/// The length of a P-256 SubjectPublicKeyInfo with an uncompressed point.
const P256_SPKI_LEN: usize = P256_SPKI_PREFIX.len() + 65;

/// Why a CSR, an issuance or a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The CSR was longer than [`MAX_CSR_LEN`]; it was refused before any parsing.
    #[error("the CSR is {0} bytes long, over the limit of 4096 bytes; send a P-256 CSR")]
    CsrTooLarge(usize),
    /// The CSR was empty, not one DER SEQUENCE, or not a PKCS#10 request.
    #[error("the CSR is not a DER-encoded PKCS#10 request: {reason}")]
    CsrMalformed {
        /// What is wrong with it, in words.
        reason: &'static str,
        /// The parser's error, when the parser refused it.
        #[source]
        source: Option<Cause>,
    },
    /// The CSR's public key was not an uncompressed ECDSA P-256 key.
    #[error("the CSR carries {0}, but only ECDSA P-256 keys are accepted; generate a P-256 key")]
    UnsupportedKey(String),
    /// The CSR's self-signature was not ecdsa-with-SHA256 or did not verify with its own key.
    #[error(
        "the CSR's signature does not verify with the key it carries; sign it with that key using ecdsa-with-SHA256"
    )]
    BadSignature,
    /// A DNS name asked for as a SAN was not a valid DNS name.
    #[error("'{0}' is not a valid DNS name for a certificate; fix the entry's DNS names")]
    BadDnsName(String),
    /// The SPIFFE ID to issue is outside the trust domain the CA signs for.
    #[error("cannot issue '{id}': this CA signs only for trust domain '{ca}'")]
    ForeignTrustDomain {
        /// The SPIFFE ID asked for.
        id: String,
        /// The CA's trust domain.
        ca: String,
    },
    /// The requested lifetime was under one second.
    #[error("the requested SVID lifetime is under one second; ask for a longer TTL")]
    ZeroTtl,
    /// The signing CA has already expired.
    #[error("the signing CA has expired; restart the server so it creates a new CA")]
    CaExpired,
    /// The random number generator failed.
    #[error("the system random number generator failed; check the host's entropy source")]
    Random,
    /// Generating a key pair or its CSR failed.
    #[error("generating a P-256 key pair and its CSR failed")]
    KeyGeneration(#[source] Cause),
    /// Signing the certificate failed.
    #[error("signing the certificate failed")]
    Signing(#[source] Cause),
    /// A validity time cannot be written in a certificate.
    #[error("the time {0} (Unix seconds) cannot be written in a certificate")]
    TimeOutOfRange(u64),
    /// The chain to verify held no certificate.
    #[error("the peer presented no certificate; an X509-SVID chain starts with its leaf")]
    EmptyChain,
    /// The chain to verify held more than [`MAX_CHAIN_LEN`] certificates.
    #[error("the chain has {0} certificates, over the limit of 8")]
    ChainTooLong(usize),
    /// The leaf was longer than [`MAX_LEAF_LEN`]; it was refused before any parsing.
    #[error("the leaf certificate is {0} bytes long, over the limit of 16384 bytes")]
    LeafTooLarge(usize),
    /// The leaf could not be parsed, or one of its extensions was malformed or repeated.
    #[error("the leaf certificate is malformed: {reason}")]
    Malformed {
        /// What is wrong with it, in words.
        reason: String,
        /// The parser's error, when the parser refused it.
        #[source]
        source: Option<Cause>,
    },
    /// The leaf had no URI SAN, so no SPIFFE ID.
    #[error("the leaf certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    /// The leaf had more than one URI SAN; the X509-SVID spec allows exactly one.
    #[error("the leaf certificate has {0} URI SANs, but an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    /// The leaf's URI SAN was not a valid SPIFFE ID.
    #[error("the leaf's URI SAN is not a valid SPIFFE ID: {0}")]
    NotSpiffe(IdError),
    /// The SPIFFE ID (to issue, or in a leaf) had no path: it names a trust domain, not a
    /// workload.
    #[error("the SPIFFE ID '{0}' names a trust domain, not a workload; an SVID needs a path")]
    RootId(String),
    /// The leaf's SPIFFE ID carried a malformed scope list.
    #[error("the leaf's SPIFFE ID has a malformed scope list: {0}")]
    BadScopes(IdError),
    /// The leaf was a CA certificate (basicConstraints CA=true).
    #[error(
        "the leaf certificate is a CA (basicConstraints CA=true), which an X509-SVID must not be"
    )]
    LeafIsCa,
    /// The leaf allowed keyCertSign or cRLSign.
    #[error("the leaf certificate has the key usage {0}, which an X509-SVID must not have")]
    ForbiddenKeyUsage(&'static str),
    /// The leaf lacked the digitalSignature key usage (or the key usage extension).
    #[error("the leaf certificate lacks the digitalSignature key usage an X509-SVID must have")]
    MissingDigitalSignature,
    /// The serial number (of a leaf, or given as hex) was not a positive integer of at most 20
    /// octets in its minimal DER encoding.
    #[error(
        "the serial number is not a positive integer of at most 20 octets, as RFC 5280 §4.1.2.2 requires"
    )]
    UnsupportedSerial,
    /// No bundle was known for the trust domain of the leaf's SPIFFE ID.
    #[error("no trust bundle is known for trust domain '{0}'; add it before trusting its SVIDs")]
    UnknownTrustDomain(String),
    /// A certificate of the chain had expired at the verification time.
    #[error("a certificate of the chain has expired; the peer must renew its SVID")]
    Expired,
    /// A certificate of the chain was not yet valid at the verification time.
    #[error("a certificate of the chain is not valid yet; check both clocks")]
    NotYetValid,
    /// The bundle of the leaf's trust domain holds no root webpki can use.
    #[error("the bundle of trust domain '{0}' holds no usable root")]
    NoUsableRoot(String),
    /// The chain did not lead to a root of the bundle of the leaf's trust domain.
    #[error("the chain does not lead to a root of its trust domain's bundle")]
    Untrusted(#[source] Cause),
}

impl SvidError {
    /// [`SvidError::CsrMalformed`] found by our own checks, with no parser error behind it.
    #[cfg(feature = "server")]
    fn csr_malformed(reason: &'static str) -> Self {
        Self::CsrMalformed {
            reason,
            source: None,
        }
    }

    /// [`SvidError::Malformed`] found by our own checks, with no parser error behind it.
    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        Self::Malformed {
            reason: reason.into(),
            source: None,
        }
    }
}

#[cfg(feature = "server")]
/// A public key taken from a CSR whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedKey {
    /// The canonical DER SubjectPublicKeyInfo of an uncompressed P-256 key.
    spki: [u8; P256_SPKI_LEN],
}

#[cfg(feature = "server")]
impl RequestedKey {
    /// The key's DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The uncompressed P-256 point (65 bytes, `04 || X || Y`).
    fn point(&self) -> &[u8] {
        &self.spki[P256_SPKI_PREFIX.len()..]
    }
}

#[cfg(feature = "server")]
impl PublicKeyData for RequestedKey {
    fn der_bytes(&self) -> &[u8] {
        self.point()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

#[cfg(feature = "server")]
/// Whether `der` is exactly one DER SEQUENCE (tag, minimal length, no trailing bytes). Cheap,
/// so it runs before any real parsing.
fn is_one_der_sequence(der: &[u8]) -> bool {
    let (Some(&0x30), Some(&first)) = (der.first(), der.get(1)) else {
        return false;
    };
    let (content_len, header_len) = match first {
        n if n < 0x80 => (usize::from(n), 2),
        0x81 => match der.get(2) {
            Some(&n) if n >= 0x80 => (usize::from(n), 3),
            _ => return false,
        },
        0x82 => match (der.get(2), der.get(3)) {
            (Some(&hi), Some(&lo)) if hi != 0 => (usize::from(hi) << 8 | usize::from(lo), 4),
            _ => return false,
        },
        _ => return false,
    };
    header_len + content_len == der.len()
}

#[cfg(feature = "server")]
/// Describes a key that is not P-256, for the error message.
fn describe_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> String {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        "an elliptic-curve key on another curve, or a compressed point".to_owned()
    } else if *alg == OID_SIG_ED25519 {
        "an Ed25519 key".to_owned()
    } else if *alg == OID_SIG_ED448 {
        "an Ed448 key".to_owned()
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        "an RSA key".to_owned()
    } else {
        format!("a key of algorithm {alg}")
    }
}

#[cfg(feature = "server")]
/// Parses a CSR and verifies its self-signature; only the public key is kept.
///
/// Size, emptiness and the outer DER SEQUENCE are checked before any parsing, so oversized or
/// junk input costs next to nothing.
///
/// # Errors
/// [`SvidError::CsrTooLarge`], [`SvidError::CsrMalformed`], [`SvidError::UnsupportedKey`] or
/// [`SvidError::BadSignature`].
pub fn parse_csr(der: &[u8]) -> Result<RequestedKey, SvidError> {
    if der.len() > MAX_CSR_LEN {
        return Err(SvidError::CsrTooLarge(der.len()));
    }
    if der.is_empty() {
        return Err(SvidError::csr_malformed("it is empty"));
    }
    if !is_one_der_sequence(der) {
        return Err(SvidError::csr_malformed(
            "it is not exactly one DER SEQUENCE (truncated, padded or not DER)",
        ));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| SvidError::CsrMalformed {
            reason: "it does not parse as a PKCS#10 request",
            source: Some(Cause::new(e)),
        })?;
    if !rest.is_empty() {
        return Err(SvidError::csr_malformed("it has bytes after the request"));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let spki_raw = spki.raw;
    if spki_raw.len() != P256_SPKI_LEN
        || !spki_raw.starts_with(&P256_SPKI_PREFIX)
        || spki_raw[P256_SPKI_PREFIX.len()] != 0x04
    {
        return Err(SvidError::UnsupportedKey(describe_key(spki)));
    }
    let mut key = RequestedKey {
        spki: [0; P256_SPKI_LEN],
    };
    key.spki.copy_from_slice(spki_raw);

    let alg = &csr.signature_algorithm;
    if alg.algorithm != OID_SIG_ECDSA_WITH_SHA256 || alg.parameters.is_some() {
        return Err(SvidError::BadSignature);
    }
    if csr.signature_value.unused_bits != 0 {
        return Err(SvidError::BadSignature);
    }
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        key.point(),
    )
    .verify(info.raw, &csr.signature_value.data)
    .map_err(|_| SvidError::BadSignature)?;
    Ok(key)
}

#[cfg(feature = "server")]
/// What to issue.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    /// The identity and scopes: the one URI SAN.
    pub id: &'a ScopedId,
    /// The requester's public key.
    pub key: &'a RequestedKey,
    /// Requested lifetime (cut to the CA's notAfter).
    pub ttl: Duration,
    /// Extra DNS SANs.
    pub dns_names: &'a [String],
}

#[cfg(feature = "server")]
/// An issued SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf first, then the CA's chain tail.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's serial.
    pub serial: Serial,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

#[cfg(feature = "server")]
/// Whole seconds since the Unix epoch (0 before it).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(feature = "server")]
fn datetime(secs: u64) -> Result<OffsetDateTime, SvidError> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or(SvidError::TimeOutOfRange(secs))
}

#[cfg(feature = "server")]
/// Signs a leaf for `spec` with `ca` at `now`.
///
/// The leaf follows the X509-SVID profile exactly: one URI SAN (the scoped ID) plus the DNS
/// SANs asked for, subject O=Mayfly, basicConstraints CA=false, keyUsage digitalSignature
/// (critical), extendedKeyUsage serverAuth + clientAuth, a fresh [`Serial`] (time-ordered,
/// 64 random bits), notBefore `now` − [`CLOCK_SKEW`], notAfter `now` + `ttl` cut to the CA's
/// notAfter, and the CA's key identifier. Only `spec.key` comes from the requester.
///
/// # Errors
/// [`SvidError::ForeignTrustDomain`] or [`SvidError::RootId`] for an ID this CA must not sign,
/// [`SvidError::BadDnsName`], [`SvidError::ZeroTtl`], [`SvidError::CaExpired`], or
/// [`SvidError::Signing`] when signing fails.
pub fn issue(
    ca: &Authority,
    spec: &LeafSpec<'_>,
    now: SystemTime,
) -> Result<IssuedSvid, SvidError> {
    let id = spec.id.spiffe_id();
    if id.trust_domain_name() != ca.trust_domain().as_str() {
        return Err(SvidError::ForeignTrustDomain {
            id: id.to_string(),
            ca: ca.trust_domain().to_string(),
        });
    }
    if id.is_root() {
        return Err(SvidError::RootId(id.to_string()));
    }
    let ttl = spec.ttl.as_secs();
    if ttl == 0 {
        return Err(SvidError::ZeroTtl);
    }
    let now_secs = unix_secs(now);
    let ca_end = ca.not_after_unix();
    if ca_end <= now_secs {
        return Err(SvidError::CaExpired);
    }
    let not_after = now_secs.saturating_add(ttl).min(ca_end);
    let not_before = now_secs.saturating_sub(CLOCK_SKEW.as_secs());

    let mut sans = Vec::with_capacity(1 + spec.dns_names.len());
    sans.push(SanType::URI(
        Ia5String::try_from(id.as_str()).map_err(|e| SvidError::Signing(Cause::new(e)))?,
    ));
    for name in spec.dns_names {
        // The same rule the admin API applies to an entry's names, so what is stored is
        // what can be signed.
        if crate::dns_name::check(name).is_err() {
            return Err(SvidError::BadDnsName(name.clone()));
        }
        let ia5 =
            Ia5String::try_from(name.as_str()).map_err(|_| SvidError::BadDnsName(name.clone()))?;
        sans.push(SanType::DnsName(ia5));
    }

    let serial = Serial::try_generate()?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, LEAF_ORGANIZATION);

    let mut params = CertificateParams::default();
    params.not_before = datetime(not_before)?;
    params.not_after = datetime(not_after)?;
    params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    params.subject_alt_names = sans;
    params.distinguished_name = subject;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.name_constraints = None;
    params.crl_distribution_points = Vec::new();
    params.custom_extensions = Vec::new();
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;

    let leaf = params
        .signed_by(spec.key, ca.issuer())
        .map_err(|e| SvidError::Signing(Cause::new(e)))?;

    let tail = ca.chain_tail();
    let mut chain = Vec::with_capacity(1 + tail.len());
    chain.push(CertificateDer::from(leaf));
    chain.extend(tail.iter().cloned());
    Ok(IssuedSvid {
        chain,
        serial,
        not_after: UNIX_EPOCH + Duration::from_secs(not_after),
    })
}

/// Trust bundles by trust domain.
pub type Bundles = HashMap<TrustDomain, Vec<CertificateDer<'static>>>;

/// Whether the peer is a client or a server (extended key usage checked by webpki).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// clientAuth.
    Client,
    /// serverAuth.
    Server,
}

/// The value of the one extension with `oid`, refusing duplicates, parsed as `T`.
///
/// Leaves are parsed without decoding their extensions ([`parse_leaf`]); the three the
/// X509-SVID rules read are decoded here, one at a time.
fn unique_extension<'a, T: FromDer<'a, x509_parser::error::X509Error>>(
    cert: &X509Certificate<'a>,
    oid: &x509_parser::der_parser::oid::Oid<'_>,
    name: &str,
) -> Result<Option<T>, SvidError> {
    let Some(ext) = cert
        .get_extension_unique(oid)
        .map_err(|_| SvidError::malformed(format!("it has more than one {name} extension")))?
    else {
        return Ok(None);
    };
    let value: &'a [u8] = ext.value;
    T::from_der(value)
        .map(|(_, parsed)| Some(parsed))
        .map_err(|e| SvidError::Malformed {
            reason: format!("its {name} extension cannot be parsed"),
            source: Some(Cause::new(e)),
        })
}

/// The leaf's one SPIFFE ID, after the X509-SVID SAN rules: exactly one URI SAN, and that
/// URI a valid SPIFFE ID. It reads the ID only; the chain and the other leaf rules are the
/// verifier's (see [`crate::mtls`]).
///
/// # Errors
/// [`SvidError::NoUriSan`], [`SvidError::MultipleUriSans`], [`SvidError::NotSpiffe`] or
/// [`SvidError::RootId`] when the URI SANs break those rules; [`SvidError::Malformed`] when the
/// subjectAltName extension is duplicated or unreadable.
pub fn leaf_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris: Vec<&str> = match unique_extension::<SubjectAlternativeName<'_>>(
        cert,
        &OID_X509_EXT_SUBJECT_ALT_NAME,
        "subjectAltName",
    )? {
        None => Vec::new(),
        Some(san) => san
            .general_names
            .into_iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(uri),
                _ => None,
            })
            .collect(),
    };
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    let id = SpiffeId::parse(uri).map_err(SvidError::NotSpiffe)?;
    if id.is_root() {
        return Err(SvidError::RootId(id.to_string()));
    }
    Ok(id)
}

#[cfg(feature = "mtls")]
/// The leaf's basicConstraints and keyUsage, after the X509-SVID rules.
pub(crate) fn check_leaf_constraints(cert: &X509Certificate<'_>) -> Result<(), SvidError> {
    let bc = unique_extension::<BasicConstraints>(
        cert,
        &OID_X509_EXT_BASIC_CONSTRAINTS,
        "basicConstraints",
    )?;
    if bc.is_some_and(|bc| bc.ca) {
        return Err(SvidError::LeafIsCa);
    }
    match unique_extension::<KeyUsage>(cert, &OID_X509_EXT_KEY_USAGE, "keyUsage")? {
        None => Err(SvidError::MissingDigitalSignature),
        Some(ku) if ku.key_cert_sign() => Err(SvidError::ForbiddenKeyUsage("keyCertSign")),
        Some(ku) if ku.crl_sign() => Err(SvidError::ForbiddenKeyUsage("cRLSign")),
        Some(ku) if !ku.digital_signature() => Err(SvidError::MissingDigitalSignature),
        Some(_) => Ok(()),
    }
}

#[cfg(feature = "mtls")]
pub(crate) fn map_webpki_error(e: &webpki::Error) -> SvidError {
    match e {
        webpki::Error::CertExpired { .. } => SvidError::Expired,
        webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid,
        other => SvidError::Untrusted(Cause::new(other.clone())),
    }
}

#[cfg(feature = "mtls")]
/// Parses a leaf certificate, bounded: at most [`MAX_LEAF_LEN`] bytes, nothing after it.
///
/// # Errors
/// [`SvidError::LeafTooLarge`] or [`SvidError::Malformed`].
pub(crate) fn parse_leaf(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    if der.len() > MAX_LEAF_LEN {
        return Err(SvidError::LeafTooLarge(der.len()));
    }
    // Extensions are left undecoded: the three the X509-SVID rules need are decoded on demand
    // (`unique_extension`), and webpki decodes the ones path validation needs. Decoding all of
    // them was most of the cost of reading a leaf, paid at every handshake with a new SVID.
    let mut parser = X509CertificateParser::new().with_deep_parse_extensions(false);
    let (rest, leaf) = parser.parse(der).map_err(|e| SvidError::Malformed {
        reason: "it does not parse as an X.509 certificate".to_owned(),
        source: Some(Cause::new(e)),
    })?;
    if !rest.is_empty() {
        return Err(SvidError::malformed(
            "it has bytes after the certificate".to_owned(),
        ));
    }
    Ok(leaf)
}

#[cfg(feature = "mtls")]
/// A leaf's serial number and notAfter.
///
/// # Errors
/// [`SvidError::UnsupportedSerial`] for a serial that is not a positive integer of at most
/// 20 octets ([`Serial::from_der_integer`]).
pub(crate) fn serial_and_not_after(
    leaf: &X509Certificate<'_>,
) -> Result<(Serial, SystemTime), SvidError> {
    let serial = Serial::from_der_integer(leaf.raw_serial()).ok_or(SvidError::UnsupportedSerial)?;
    let secs = u64::try_from(leaf.validity().not_after.timestamp()).unwrap_or(0);
    Ok((serial, UNIX_EPOCH + Duration::from_secs(secs)))
}

#[cfg(any(feature = "server", feature = "agent"))]
/// A locally generated key pair and a CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 DER private key.
    pub key_pkcs8: Vec<u8>,
    /// DER CSR.
    pub csr: Vec<u8>,
}

#[cfg(any(feature = "server", feature = "agent"))]
impl fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pkcs8", &"[redacted]")
            .field("csr", &hex::encode(&self.csr))
            .finish()
    }
}

#[cfg(any(feature = "server", feature = "agent"))]
impl KeyAndCsr {
    /// Generates a P-256 key and a CSR for it (empty subject, no extensions: the server takes
    /// only the key).
    ///
    /// # Errors
    /// [`SvidError`] when key generation fails.
    pub fn generate() -> Result<Self, SvidError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| SvidError::KeyGeneration(Cause::new(e)))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| SvidError::KeyGeneration(Cause::new(e)))?;
        Ok(Self {
            key_pkcs8: key.serialize_der(),
            csr: csr.der().to_vec(),
        })
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn der_sequence_header_check() {
        assert!(is_one_der_sequence(&[0x30, 0x00]));
        assert!(is_one_der_sequence(&[0x30, 0x01, 0x05]));
        assert!(!is_one_der_sequence(&[0x30, 0x02, 0x05]));
        assert!(!is_one_der_sequence(&[0x31, 0x00]));
        assert!(!is_one_der_sequence(&[0x30]));
        // Non-minimal long form.
        assert!(!is_one_der_sequence(&[0x30, 0x81, 0x01, 0x00]));
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend([0u8; 0x80]);
        assert!(is_one_der_sequence(&long));
        let mut longer = vec![0x30, 0x82, 0x01, 0x00];
        longer.extend([0u8; 0x100]);
        assert!(is_one_der_sequence(&longer));
        assert!(!is_one_der_sequence(&[0x30, 0x82, 0x00, 0x80]));
        assert!(!is_one_der_sequence(&[0x30, 0x83, 0x00, 0x00, 0x00]));
    }

    #[test]
    fn generated_csr_parses_and_keeps_only_the_key() {
        let kc = KeyAndCsr::generate().unwrap();
        let key = parse_csr(&kc.csr).unwrap();
        assert_eq!(key.spki_der().len(), P256_SPKI_LEN);
        let pair = KeyPair::try_from(kc.key_pkcs8.as_slice()).unwrap();
        assert_eq!(pair.subject_public_key_info(), key.spki_der());
        assert!(!format!("{kc:?}").contains(&hex::encode(&kc.key_pkcs8)));
    }

    #[test]
    fn csr_refusals() {
        assert!(matches!(
            parse_csr(&[]),
            Err(SvidError::CsrMalformed { .. })
        ));
        assert_eq!(parse_csr(&[0u8; 4097]), Err(SvidError::CsrTooLarge(4097)));
        let kc = KeyAndCsr::generate().unwrap();
        let mut bad = kc.csr.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert_eq!(parse_csr(&bad), Err(SvidError::BadSignature));
    }
}
